"""Reward model (plugin ``reward_model``): a scalar score head on a causal LM, trained on preference pairs.

    lmflow run --plugins reward_model --model M --dataset pairs.jsonl --template chatml

The model is loaded as ``AutoModelForSequenceClassification`` with one label (a new ``score`` head on the
language model's last hidden state; the LM head is not used) and trained with the Bradley-Terry loss,
``-log sigmoid(r(chosen) - r(rejected))``. The score of a sequence is the head's output at its last token (the
last token that is not padding). The output directory loads with ``AutoModelForSequenceClassification``;
``lmflow raft --reward DIR`` scores with it exactly as it was trained (the template stored with it renders the
conversation). Logged: ``accuracy`` (chosen scored above rejected) and ``margin`` (mean score difference); the
evaluation data reports ``pair_accuracy``, ``margin`` and ``loss``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmflow_core import ConfigError, hookimpl, model_source

from .pairs import check_pairs, halves, pad_id_of, pair_batches, unwrap

if TYPE_CHECKING:
    from lmflow_core import RunConfig

NAME = "reward_model"


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "dpo": "a reward model scores answers; DPO trains the policy itself: run them one after the other",
        "lora": "lora adapts a causal LM's layers and would leave the new score head untrained; train the "
        "reward model in full",
        "chunked_ce": "chunked_ce replaces the language-modelling head, which a reward model does not use",
    }


@hookimpl
def validate_config(config: RunConfig) -> list[str] | None:
    if config.packing:
        return ["--plugins reward_model scores whole sequences; --packing would mix them: drop --packing"]
    return None


@hookimpl
def configure_model(config: RunConfig, model_config: Any) -> None:
    model_config.num_labels = 1
    model_config.problem_type = "regression"


@hookimpl
def load_model(config: RunConfig, model_config: Any, init_kwargs: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoModelForSequenceClassification, set_seed

    dtype = init_kwargs.pop("dtype", None)
    if dtype == "auto" or dtype is None:
        dtype = None
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kwargs = {k: v for k, v in {**init_kwargs, "dtype": dtype}.items() if v is not None}
    try:
        if config.random_init:
            set_seed(config.seed)
            return AutoModelForSequenceClassification.from_config(
                model_config, trust_remote_code=config.trust_remote_code, **kwargs
            )
        set_seed(config.seed)  # the new score head is drawn from the run's seed
        return AutoModelForSequenceClassification.from_pretrained(
            model_source(config), config=model_config, trust_remote_code=config.trust_remote_code, **kwargs
        )
    except ValueError as exc:
        if "Unrecognized configuration class" not in str(exc):
            raise
        raise ConfigError(
            f"transformers has no sequence-classification model for {type(model_config).__name__}, so "
            f"{model_source(config)} cannot carry a reward head",
            "choose a model whose architecture has a *ForSequenceClassification class (Llama, Qwen2, "
            "Mistral, GPT-2, Gemma, Phi-3...)",
        ) from None


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    # The score is read at the last token that is not padding: the model must know the padding id.
    base = unwrap(model)
    target = base.get_base_model() if hasattr(base, "get_base_model") else base
    target.config.pad_token_id = pad_id_of(tokenizer)


@hookimpl(trylast=True)
def prepare_dataset(dataset: Any, split: str) -> None:
    check_pairs(dataset, NAME, split)


@hookimpl
def compute_loss(model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    import torch.nn.functional as F

    scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    chosen, rejected = halves(scores.squeeze(-1).float())
    difference = chosen - rejected
    loss = -F.logsigmoid(difference).mean()
    return loss, {"accuracy": (difference > 0).float().mean().detach(), "margin": difference.mean().detach()}


@hookimpl
def evaluate(config: RunConfig, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float] | None:
    """Pair accuracy, mean margin and loss of the reward model on the evaluation pairs."""
    import torch
    import torch.nn.functional as F

    check_pairs(dataset, NAME, "eval")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, margins, losses = 0, 0.0, 0.0
    with torch.no_grad():
        for batch in pair_batches(dataset, config.eval_batch_size or config.batch_size, pad_id_of(tokenizer)):
            scores = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            chosen, rejected = halves(scores.squeeze(-1).float())
            difference = chosen - rejected
            correct += int((difference > 0).sum())
            margins += float(difference.sum())
            losses += float(-F.logsigmoid(difference).sum())
    model.train(was_training)
    n = len(dataset)
    return {"pair_accuracy": correct / n, "margin": margins / n, "loss": losses / n, "eval_samples": n}
