"""Direct Preference Optimization (plugin ``dpo``; Rafailov et al., arXiv 2305.18290).

    lmflow run --plugins dpo --model SFT_MODEL --dataset pairs.jsonl --template chatml --dpo-beta 0.1

The policy is trained to prefer each pair's chosen answer over the rejected one more than a fixed reference
model does. With ``pi`` and ``ref`` the summed log-probabilities of an answer's tokens (the prompt is never
scored) and ``z = (pi(chosen) - ref(chosen)) - (pi(rejected) - ref(rejected))``:

* ``--dpo-loss sigmoid`` (DPO): ``-log sigmoid(beta * z)``;
* ``--dpo-loss ipo`` (IPO, Azar et al. 2023): ``(z - 1 / (2 * beta))^2`` with per-token mean log-probabilities;
* ``--dpo-loss hinge`` (SLiC): ``max(0, 1 - beta * z)``.

Chosen and rejected answers go through the model in one forward pass (2B rows). The reference is the model as
it was loaded, in one of three forms, decided once before training:

* under ``--plugins lora``: the same model with its adapter disabled (no second copy in memory);
* ``--dpo-precompute-ref``: the reference log-probabilities of every pair, computed once before training;
  nothing of the reference stays in memory (each pair carries its index through the batches to find them);
* otherwise: a frozen copy of the model.

Dropout is switched off in the policy (as in the reference), so that at the first step, policy = reference,
the sigmoid loss is exactly ln 2. Logged beside the loss: ``rewards/chosen`` and ``rewards/rejected``
(``beta * (pi - ref)``), ``rewards/margins`` and ``rewards/accuracies`` (the chosen reward above the rejected);
with evaluation data, the same for the evaluation pairs at the end of the run.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmflow_core import PluginOption, StashKey, hookimpl, note

from .pairs import answer_logps, check_pairs, halves, pad_id_of, pair_batches, unwrap

if TYPE_CHECKING:
    from lmflow_core import RunConfig

NAME = "dpo"
LOSSES = ("sigmoid", "ipo", "hinge")
INDEX = "pair_index"


@dataclass
class DpoState:
    """The reference of a run: a frozen copy, the adapter-disabled model, or precomputed log-probabilities."""

    reference: Any = None
    adapter_reference: bool = False
    #: split -> tensor [pairs, 4]: reference logp and token count of the chosen, then the rejected answers
    precomputed: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, Any] = field(default_factory=dict)


STATE = StashKey[DpoState]()


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption(
            "beta",
            float,
            0.1,
            "How far the policy may move from the reference (higher: closer to it).",
            min_exclusive=0,
        ),
        PluginOption("loss", str, "sigmoid", "The preference loss.", choices=LOSSES),
        PluginOption(
            "precompute_ref",
            bool,
            False,
            "Compute the reference log-probabilities once before training instead of keeping a reference copy.",
        ),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    # chunked_ce computes the loss from labels inside the model's forward; DPO scores answers from the logits
    return {"chunked_ce": "DPO scores the answers from the model's logits, which chunked_ce never builds"}


@hookimpl
def validate_config(config: RunConfig) -> list[str] | None:
    problems = []
    if config.packing:
        problems.append("--plugins dpo scores whole answers; --packing would mix examples: drop --packing")
    if "zero3" in config.plugins and "lora" not in config.plugins:
        # A partitioned model can neither be copied nor run outside DeepSpeed's engine before training.
        problems.append(
            "--plugins dpo under zero3 needs the adapter-disabled model as its reference: add --plugins lora"
        )
    return problems or None


@hookimpl(trylast=True)
def prepare_dataset(config: RunConfig, dataset: Any, split: str) -> Any:
    check_pairs(dataset, NAME, split)
    if not config.options_for(NAME).precompute_ref:
        return None
    # Each pair carries its index to the loss, which looks its reference log-probabilities up.
    if INDEX in dataset.column_names:
        dataset = dataset.remove_columns(INDEX)
    dataset = dataset.add_column(INDEX, list(range(len(dataset))))
    _state(config).datasets[split] = dataset
    return dataset


@hookimpl(wrapper=True)
def data_collator(config: RunConfig) -> Any:
    collator = yield
    if not config.options_for(NAME).precompute_ref:
        return collator
    return IndexedCollator(collator)


class IndexedCollator:
    """The batch of the wrapped collator plus each pair's ``pair_index``."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.collator([{k: v for k, v in f.items() if k != INDEX} for f in features])
        batch[INDEX] = torch.tensor([f[INDEX] for f in features], dtype=torch.long)
        return batch


@hookimpl(trylast=True)
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Decide the reference (after every other plugin's change, e.g. a LoRA adapter) and switch dropout off."""
    _disable_dropout(model)
    state = _state(config)
    options = config.options_for(NAME)
    if options.precompute_ref:
        started = time.monotonic()
        for split, dataset in state.datasets.items():
            state.precomputed[split] = _reference_logps(config, model, tokenizer, dataset)
        pairs = sum(len(d) for d in state.datasets.values())
        note(
            f"dpo: reference log-probabilities of {pairs:,} pairs computed in "
            f"{time.monotonic() - started:.1f} s (no reference model kept in memory)"
        )
        state.datasets.clear()
    elif hasattr(unwrap(model), "disable_adapter"):
        state.adapter_reference = True
    else:
        state.reference = copy.deepcopy(model).eval().requires_grad_(False)


@hookimpl
def compute_loss(config: RunConfig, model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    split = "train" if model.training else "eval"
    loss, metrics = _pair_loss(config, model, inputs, split)
    return loss.mean(), {name: value.mean() for name, value in metrics.items()}


@hookimpl
def evaluate(config: RunConfig, model: Any, tokenizer: Any, dataset: Any) -> dict[str, float] | None:
    """The DPO loss, reward accuracy and margin of the final model on the evaluation pairs."""
    import torch

    check_pairs(dataset, NAME, "eval")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    totals: dict[str, float] = {}
    start = 0
    # A pair's precomputed reference is found by the index it carries (whatever reordered the dataset since).
    indexes = dataset[INDEX] if INDEX in dataset.column_names else list(range(len(dataset)))
    with torch.no_grad():
        for batch in pair_batches(dataset, config.eval_batch_size or config.batch_size, pad_id_of(tokenizer)):
            pairs = batch["input_ids"].shape[0] // 2
            batch = {k: v.to(device) for k, v in batch.items()}
            batch[INDEX] = torch.tensor(indexes[start : start + pairs], device=device)
            start += pairs
            loss, metrics = _pair_loss(config, model, batch, "eval")
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + float(value.float().sum())
    model.train(was_training)
    n = len(dataset)
    names = {
        "loss": "dpo_loss",
        "rewards/chosen": "dpo_reward_chosen",
        "rewards/rejected": "dpo_reward_rejected",
        "rewards/margins": "dpo_margin",
        "rewards/accuracies": "dpo_pair_accuracy",
    }
    return {names[name]: total / n for name, total in totals.items()}


# --------------------------------------------------------------------------------------------------------------


def _state(config: RunConfig) -> DpoState:
    state = config.stash.get(STATE, None)
    if state is None:
        state = config.stash[STATE] = DpoState()
    return state


def _pair_loss(
    config: RunConfig, model: Any, inputs: dict[str, Any], split: str
) -> tuple[Any, dict[str, Any]]:
    """Per-pair loss and metrics (tensors of B values) of a batch of 2B rows."""
    import torch
    import torch.nn.functional as F

    options = config.options_for(NAME)
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    logps, counts = answer_logps(model(input_ids=ids, attention_mask=mask).logits, labels)
    with torch.no_grad(), _autocast(config, ids.device):
        ref_logps, ref_counts = _reference(config, model, inputs, split)
    if options.loss == "ipo":  # IPO compares per-token mean log-probabilities
        logps, ref_logps = logps / counts.clamp(min=1), ref_logps / ref_counts.clamp(min=1)
    chosen, rejected = halves(logps)
    ref_chosen, ref_rejected = halves(ref_logps.to(logps.device, logps.dtype))
    z = (chosen - ref_chosen) - (rejected - ref_rejected)
    beta = options.beta
    if options.loss == "sigmoid":
        loss = -F.logsigmoid(beta * z)
    elif options.loss == "ipo":
        loss = (z - 1 / (2 * beta)) ** 2
    else:
        loss = torch.relu(1 - beta * z)
    chosen_reward = (beta * (chosen - ref_chosen)).detach()
    rejected_reward = (beta * (rejected - ref_rejected)).detach()
    return loss, {
        "rewards/chosen": chosen_reward,
        "rewards/rejected": rejected_reward,
        "rewards/margins": chosen_reward - rejected_reward,
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
    }


def _reference(config: RunConfig, model: Any, inputs: dict[str, Any], split: str) -> tuple[Any, Any]:
    """The reference log-probabilities and token counts of the batch's 2B answers."""
    import torch

    state = _state(config)
    if state.precomputed:
        rows = state.precomputed[split][inputs[INDEX].cpu()]
        return torch.cat([rows[:, 0], rows[:, 2]]), torch.cat([rows[:, 1], rows[:, 3]])
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    if state.adapter_reference:
        peft_model = unwrap(model)
        with peft_model.disable_adapter():
            logits = peft_model(input_ids=ids, attention_mask=mask).logits
    else:
        reference = state.reference
        if _device_of(reference) != ids.device:
            reference.to(ids.device)
        logits = reference(input_ids=ids, attention_mask=mask).logits
    return answer_logps(logits, labels)


def _reference_logps(config: RunConfig, model: Any, tokenizer: Any, dataset: Any) -> Any:
    """Tensor [pairs, 4] (chosen logp, chosen tokens, rejected logp, rejected tokens) of the model as loaded."""
    import torch

    device = _compute_device(model)
    moved = device is not None and _device_of(model) != device
    if moved:
        model.to(device)
    was_training = model.training
    model.eval()
    rows = []
    peft_model = unwrap(model)
    guard = peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else nullcontext()
    with torch.no_grad(), guard, _autocast(config, _device_of(model)):
        for batch in pair_batches(dataset, config.eval_batch_size or config.batch_size, pad_id_of(tokenizer)):
            batch = {k: v.to(_device_of(model)) for k, v in batch.items()}
            logps, counts = answer_logps(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"],
            )
            chosen, rejected = halves(logps.cpu())
            chosen_n, rejected_n = halves(counts.cpu().float())
            rows.append(torch.stack([chosen, chosen_n, rejected, rejected_n], dim=1))
    model.train(was_training)
    return torch.cat(rows) if rows else torch.zeros((0, 4))


def _compute_device(model: Any) -> Any:
    """Where to compute the reference before training: the accelerator the trainer will use, if any."""
    import torch

    if getattr(unwrap(model), "hf_device_map", None) or not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _autocast(config: RunConfig, device: Any) -> Any:
    """The mixed precision the trainer runs the policy in (``--bf16``/``--fp16``), for the reference too: so that
    at the first step the reference equals the policy exactly."""
    import torch

    if config.bf16 or config.fp16:
        return torch.autocast(device.type, dtype=torch.bfloat16 if config.bf16 else torch.float16)
    return nullcontext()


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def _disable_dropout(model: Any) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
