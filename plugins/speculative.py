"""Speculative decoding with a small draft model (plugin ``speculative``; Leviathan et al., arXiv 2211.17192).

The draft proposes ``--num-draft-tokens`` tokens one by one; the target scores them all in one forward pass and
keeps the longest prefix it agrees with, plus one token of its own. Both models keep their KV caches between
rounds; the caches are cut back to the accepted tokens after a rejection. With greedy decoding the output is
token for token the target's own greedy output; with sampling, tokens are accepted with probability
``min(1, p/q)`` and a rejected one is replaced by a sample of ``max(0, p - q)``, which leaves the output
distributed exactly as the target's own samples (``p``, ``q``: the target's and the draft's distributions after
temperature, top-k, top-p and repetition penalty).

    lmflow generate MODEL --plugins speculative --draft-model SMALL --num-draft-tokens 5 --prompt ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmflow_core import LmflowError, PluginOption, hookimpl, load_model_config

if TYPE_CHECKING:
    from lmflow_core import GenerationOptions, RunConfig

NAME = "speculative"


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption(
            "draft_model",
            str,
            None,
            "Small model that proposes tokens (same tokenizer as the target).",
            flag="--draft-model",
        ),
        PluginOption(
            "num_draft_tokens",
            int,
            5,
            "Tokens the draft proposes per round.",
            flag="--num-draft-tokens",
            min=1,
            max=64,
        ),
    ]


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    if not config.options_for(NAME).draft_model:
        return [
            "the speculative plugin needs a draft model: pass --draft-model (a small model with the same tokenizer)"
        ]
    return []


@hookimpl
def prepare_inference(config: RunConfig, model: Any, tokenizer: Any) -> None:
    draft_for(config, model, tokenizer)


def draft_for(config: RunConfig, model: Any, tokenizer: Any) -> Any:
    """The draft model of ``model``, loaded once and checked to share the target's vocabulary."""
    draft = getattr(model, "lmflow_draft", None)
    if draft is not None:
        return draft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = config.options_for(NAME).draft_model
    draft_config = load_model_config(path, option="--draft-model")
    target_rows = model.get_output_embeddings().weight.shape[0]
    if draft_config.vocab_size != target_rows:
        raise LmflowError(
            f"the draft model's vocabulary ({draft_config.vocab_size} tokens) differs from the target's ({target_rows})",
            "speculative decoding needs a draft that uses the target's tokenizer",
        )
    try:
        draft_tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        draft_tokenizer = None  # a draft without tokenizer files is taken to share the target's
    if draft_tokenizer is not None and draft_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise LmflowError(
            "the draft model's tokenizer maps tokens to other ids than the target's",
            "speculative decoding needs a draft that uses the target's tokenizer",
        )
    try:
        draft = AutoModelForCausalLM.from_pretrained(path, dtype=model.dtype).to(model.device).eval()
    except OSError as exc:
        raise LmflowError(
            f"cannot load the draft model {path}: {str(exc).splitlines()[0]}", "check --draft-model"
        ) from exc
    model.lmflow_draft = draft
    return draft


def _cache_argument(model: Any) -> str:
    """The name under which this transformers version takes the KV cache (``cache`` in newer releases)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@hookimpl
def decode(
    config: RunConfig | None,
    model: Any,
    tokenizer: Any,
    input_ids: Any,
    options: GenerationOptions,
    streamer: Any,
    inputs: dict[str, Any],
) -> Any:
    if config is None or inputs:  # a prompt with images: the draft model cannot read them
        return None
    draft = draft_for(config, model, tokenizer)
    return speculative_generate(
        model, draft, tokenizer, input_ids, options, streamer, config.options_for(NAME).num_draft_tokens
    )


class _Distribution:
    """Turns logits into the next token's distribution exactly as ``model.generate`` would."""

    def __init__(self, options: GenerationOptions):
        self.greedy = options.greedy
        self.processors = options.logits_processors()

    def scores(self, history: Any, logits: Any) -> Any:
        return self.processors(history, logits.float().unsqueeze(0))[0] if self.processors else logits.float()

    def probabilities(self, history: Any, logits: Any) -> Any:
        import torch

        return torch.softmax(self.scores(history, logits), dim=-1)


def _crop(cache: Any, keep: int) -> None:
    extra = cache.get_seq_length() - keep
    if extra > 0:
        cache.crop(-extra)


def speculative_generate(
    target: Any, draft: Any, tokenizer: Any, input_ids: Any, options: GenerationOptions, streamer: Any, k: int
) -> Any:
    """Generate after ``input_ids`` (batch of one); returns prompt + new tokens, as ``model.generate`` does."""
    import torch
    from transformers import DynamicCache

    device = target.device
    distribution = _Distribution(options)
    tokens: list[int] = input_ids[0].tolist()
    prompt_length = len(tokens)
    eos = tokenizer.eos_token_id
    stops = tuple(s for s in options.stop_strings if s)
    target_cache, draft_cache = DynamicCache(config=target.config), DynamicCache(config=draft.config)
    target_key, draft_key = _cache_argument(target), _cache_argument(draft)
    target_len = draft_len = 0  # how many of `tokens` each cache holds
    proposed = accepted_total = 0
    if streamer is not None:
        streamer.put(input_ids[0].cpu())

    def history(extra: list[int]) -> Any:
        return torch.tensor([tokens + extra], device=device)

    def choose(scores_or_probs: Any) -> int:
        if distribution.greedy:
            return int(torch.argmax(scores_or_probs))
        return int(torch.multinomial(scores_or_probs, 1))

    done = False
    while not done:
        budget = options.max_new_tokens - (len(tokens) - prompt_length)
        rounds_k = min(k, budget - 1) if budget > 1 else 0
        # 1. The draft proposes rounds_k tokens, one at a time, from its cache.
        proposals: list[int] = []
        draft_probs: list[Any] = []
        feed = tokens[draft_len:]
        for _ in range(rounds_k):
            logits = draft(
                input_ids=torch.tensor([feed], device=device), use_cache=True, **{draft_key: draft_cache}
            ).logits[0, -1]
            draft_len += len(feed)
            if distribution.greedy:
                token = choose(distribution.scores(history(proposals), logits))
            else:
                probs = distribution.probabilities(history(proposals), logits)
                draft_probs.append(probs)
                token = choose(probs)
            proposals.append(token)
            feed = [token]
        # 2. The target scores the proposals (and what its cache lacks) in one forward pass.
        feed = tokens[target_len:] + proposals
        logits = target(
            input_ids=torch.tensor([feed], device=device), use_cache=True, **{target_key: target_cache}
        ).logits[0]
        target_len += len(feed)
        logits = logits[-(len(proposals) + 1) :]
        # 3. Keep the longest agreeing prefix, then one token of the target's own.
        accepted: list[int] = []
        next_token = None
        for j, token in enumerate(proposals):
            if distribution.greedy:
                own = choose(distribution.scores(history(accepted), logits[j]))
                if own == token:
                    accepted.append(token)
                    continue
                next_token = own
            else:
                p = distribution.probabilities(history(accepted), logits[j])
                q = draft_probs[j]
                if (
                    torch.rand((), device=p.device) * q[token] < p[token]
                ):  # accept with probability min(1, p/q)
                    accepted.append(token)
                    continue
                residual = torch.clamp(p - q, min=0)
                next_token = choose(residual / residual.sum() if residual.sum() > 0 else p)
            break
        if next_token is None:
            scores = distribution.scores(history(accepted), logits[len(accepted)])
            next_token = choose(scores if distribution.greedy else torch.softmax(scores, dim=-1))
        proposed += len(proposals)
        accepted_total += len(accepted)
        # 4. Cut both caches back to the tokens that stand.
        keep = len(tokens) + len(accepted)
        _crop(target_cache, keep)
        target_len = keep
        draft_len = min(draft_len, keep)
        _crop(draft_cache, draft_len)
        # 5. Emit, stopping at EOS, the token limit or a stop string.
        for token in [*accepted, next_token]:
            tokens.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            generated = len(tokens) - prompt_length
            if token == eos or generated >= options.max_new_tokens:
                done = True
                break
        if not done and stops:
            tail = tokenizer.decode(tokens[prompt_length:][-64:], skip_special_tokens=False)
            done = any(stop in tail for stop in stops)
    if streamer is not None:
        streamer.end()
    options.stats.update(
        draft_tokens=proposed,
        accepted_tokens=accepted_total,
        acceptance_rate=accepted_total / proposed if proposed else 0.0,
    )
    return torch.tensor([tokens], device=device)
