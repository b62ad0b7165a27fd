"""Chunked cross-entropy: the LM head and the loss, a chunk of tokens at a time (plugin ``chunked_ce``).

Plain training computes the logits of every token at once, ``[batch x block x vocab]``, upcast to fp32 for the
loss; with today's vocabularies (128k-256k) they outweigh the rest of a small model's activations. With this
plugin a training forward that carries ``labels`` runs the model's body for its hidden states and then, for
each chunk of ``--chunked-ce-chunk-size`` tokens, the LM head, the final-logit softcapping (Gemma 2) and the
cross-entropy. So at most one chunk of logits exists at a time:

    lmflow run --model M --dataset D --plugins chunked_ce --chunked-ce-chunk-size 1024

How it is done, and why:

* **Gradients computed chunk by chunk, in the forward.** The gradients of a chunk's loss with respect to its
  hidden states and to the head's trainable parameters are taken as soon as the chunk's loss is known (with the
  head module itself, so peft's LoRA layers and ``modules_to_save`` wrappers on the head work); the chunk's
  logits are then freed. The backward pass only scales these gradients by the incoming one. The head's matrix
  products are those of plain training (one forward, two backward), not one more as recomputing would cost.
  A bare fp32 ``nn.Linear`` head that nothing hooks (every supported family's, outside autocast) takes these
  products directly and adds each chunk's weight gradient into one buffer in place.
* **The same loss as transformers.** ``ForCausalLMLoss``: labels shifted by one inside (or ``shift_labels``),
  ``-100`` ignored, logits upcast to fp32, the sum divided by ``num_items_in_batch`` when the trainer passes it
  (gradient accumulation), else the mean over the scored tokens.
* **Only training is changed.** In eval mode, or without labels, the model's own forward runs: evaluation,
  samples and generation get their normal logits.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmflow_core import PluginOption, StashKey, hookimpl, note

if TYPE_CHECKING:
    from lmflow_core import RunConfig

NAME = "chunked_ce"
IGNORE_INDEX = -100

# Model types whose causal LM computes ``lm_head(hidden)`` (then, for the Gemma family, the optional
# ``final_logit_softcapping``) and transformers' ``ForCausalLMLoss``, with the body under ``base_model_prefix``.
SUPPORTED_MODEL_TYPES = (
    "gemma",
    "gemma2",
    "gemma3_text",
    "gpt2",
    "llama",
    "mistral",
    "phi3",
    "qwen2",
    "qwen3",
)

# Engines that shard the head's weight or hook every parameter's gradient themselves.
ENGINES_REFUSED = {
    "zero3": "ZeRO-3 gathers the LM head's sharded weight around the model's own forward and hooks every "
    "parameter's gradient, which the chunked loss (gradients taken chunk by chunk) bypasses",
    "zero2": "DeepSpeed hooks every parameter's gradient to partition it, which the chunked loss (gradients "
    "taken chunk by chunk) bypasses",
    "fsdp": "FSDP shards the LM head's weight and reduces its gradient through hooks that the chunked loss "
    "(gradients taken chunk by chunk) bypasses",
}


@hookimpl
def declare_options() -> list[PluginOption]:
    return [
        PluginOption(
            "chunk_size",
            int,
            1024,
            "Tokens whose logits are computed at a time (lower: less memory; the loss is the same).",
            min=1,
        ),
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return dict(ENGINES_REFUSED)


@hookimpl
def validate_config(config: RunConfig, model_config: Any) -> list[str]:
    """Refuse, before anything loads, a model whose LM head is not one the chunked loss reproduces."""
    model_type = getattr(model_config, "model_type", None)
    if model_type in SUPPORTED_MODEL_TYPES:
        return []
    return [
        f"chunked_ce does not support {model_type or 'this'} models: it reproduces the LM head and loss of "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} only; remove chunked_ce from --plugins"
    ]


@dataclass(eq=False)
class ChunkedState:
    """What the run's chunked loss uses: the chunk size, and how many training forwards took the chunked path."""

    chunk_size: int
    chunked_forwards: int = 0


# The run's chunked-loss state, in its per-run store.
CHUNKED = StashKey["ChunkedState"]()


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Route the causal LM's training forward (the one with ``labels``) through the chunked head and loss."""
    state = ChunkedState(chunk_size=config.options_for(NAME).chunk_size)
    config.stash[CHUNKED] = state
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    install(causal_lm, state)
    vocab = causal_lm.get_output_embeddings().weight.shape[0]
    note(
        f"chunked_ce: logits of {state.chunk_size} tokens at a time in training "
        f"({_size(state.chunk_size * vocab * 4)} in fp32 for the {vocab:,}-token vocabulary)"
    )


def install(model: Any, state: ChunkedState) -> None:
    """Replace ``model.forward`` (a transformers causal LM) with one that takes the chunked path in training
    when ``labels`` are given, and the model's own forward otherwise."""
    original = getattr(model.forward, "__wrapped__", model.forward) if _installed(model) else model.forward
    signature = inspect.signature(original)
    keywords = next(
        (n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None
    )

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not model.training:
            return original(*args, **kwargs)
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        extra = arguments.pop(keywords, {}) if keywords else {}
        labels = arguments.pop("labels", None)
        if labels is None:
            return original(*args, **kwargs)
        arguments.pop("logits_to_keep", None)
        state.chunked_forwards += 1
        return chunked_forward(model, arguments, extra, labels, state.chunk_size)

    forward.chunked_ce_state = state  # type: ignore[attr-defined]
    model.forward = forward


def _installed(model: Any) -> bool:
    return hasattr(model.forward, "chunked_ce_state")


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if count < 1024:
            return f"{count:,.0f} {unit}"
        count /= 1024
    return f"{count:,.1f} GiB"


def chunked_forward(
    model: Any, arguments: dict[str, Any], extra: dict[str, Any], labels: Any, chunk_size: int
) -> Any:
    """The model's body for its hidden states, then the chunked head and loss; no logits are returned."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    body = getattr(model, model.base_model_prefix)
    outputs = body(**arguments, **extra)
    loss = chunked_causal_lm_loss(
        outputs.last_hidden_state,
        model.get_output_embeddings(),
        labels,
        chunk_size=chunk_size,
        softcap=getattr(model.config, "final_logit_softcapping", None),
        num_items_in_batch=extra.get("num_items_in_batch"),
        ignore_index=extra.get("ignore_index", IGNORE_INDEX),
        shift_labels=extra.get("shift_labels"),
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def chunked_causal_lm_loss(
    hidden_states: Any,
    head: Any,
    labels: Any,
    *,
    chunk_size: int,
    softcap: float | None = None,
    num_items_in_batch: Any = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: Any = None,
) -> Any:
    """transformers' ``ForCausalLMLoss`` of ``head(hidden_states)``, computed ``chunk_size`` tokens at a time.

    Args:
        hidden_states: ``[batch, seq, hidden]``, the body's last hidden states.
        head: the LM head module (called once per chunk).
        labels: ``[batch, seq]`` token ids, not shifted; ``ignore_index`` where no loss is taken.
        chunk_size: tokens per chunk.
        softcap: ``final_logit_softcapping``: logits become ``tanh(logits / softcap) * softcap``.
        num_items_in_batch: divide the summed loss by this (gradient accumulation); else take the mean.
        ignore_index: the label that takes no loss.
        shift_labels: labels already shifted (then ``labels`` is not used).

    Returns: the scalar loss, differentiable with respect to ``hidden_states`` and the head's parameters.
    """
    import torch

    if shift_labels is None:
        padded = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = padded[..., 1:]
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(flat_hidden.device)
    params = [p for p in head.parameters() if p.requires_grad]
    needs_grad = torch.is_grad_enabled() and (flat_hidden.requires_grad or bool(params))
    if needs_grad:
        total = _ChunkedLoss.apply(flat_hidden, targets, head, chunk_size, softcap, ignore_index, *params)
    else:
        with torch.no_grad():
            total = sum(
                _chunk_loss(
                    head, flat_hidden[i : i + chunk_size], targets[i : i + chunk_size], softcap, ignore_index
                )
                for i in range(0, targets.shape[0], chunk_size)
            )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / (targets != ignore_index).sum()


def _chunk_loss(head: Any, hidden: Any, targets: Any, softcap: float | None, ignore_index: int) -> Any:
    """The summed cross-entropy of one chunk, with the ops (and their order) of the model and transformers."""
    return _logits_loss(head(hidden), targets, softcap, ignore_index)


def _logits_loss(logits: Any, targets: Any, softcap: float | None, ignore_index: int) -> Any:
    import torch

    if softcap is not None:
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    return torch.nn.functional.cross_entropy(
        logits.float(), targets, ignore_index=ignore_index, reduction="sum"
    )


def _plain_linear(head: Any) -> bool:
    """Whether ``head`` is a bare fp32 ``nn.Linear`` that nothing hooks, outside autocast: then its matrix
    products are taken directly and the weight's gradient accumulates in place, chunk after chunk."""
    import torch
    from torch.nn.modules import module

    hooked = (
        head._forward_hooks
        or head._forward_pre_hooks
        or head._backward_hooks
        or head._backward_pre_hooks
        or module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )
    return (
        type(head) is torch.nn.Linear
        and not hooked
        and head.weight.dtype == torch.float32
        and not torch.is_autocast_enabled(head.weight.device.type)
    )


def _autograd_function() -> Any:
    import torch

    class ChunkedLoss(torch.autograd.Function):
        """Summed cross-entropy of ``head(hidden)``; the gradients are taken chunk by chunk in the forward."""

        @staticmethod
        def forward(ctx, hidden, targets, head, chunk_size, softcap, ignore_index, *params):  # type: ignore[override]
            wants_hidden = hidden.requires_grad
            grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
            grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            linear = _plain_linear(head)
            slot = {id(p): i for i, p in enumerate(params)}
            for start in range(0, targets.shape[0], chunk_size):
                end = start + chunk_size
                chunk = hidden[start:end].detach().requires_grad_(wants_hidden and not linear)
                if linear:
                    loss = _linear_chunk(
                        head,
                        chunk,
                        targets[start:end],
                        softcap,
                        ignore_index,
                        grad_hidden,
                        start,
                        end,
                        slot,
                        grad_params,
                    )
                    total += loss
                    continue
                with torch.enable_grad():
                    loss = _chunk_loss(head, chunk, targets[start:end], softcap, ignore_index)
                inputs = ([chunk] if wants_hidden else []) + list(params)
                grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else ()
                if wants_hidden and grads and grads[0] is not None:
                    grad_hidden[start:end] = grads[0]
                for accumulated, grad in zip(grad_params, grads[1 if wants_hidden else 0 :]):
                    if grad is not None:
                        accumulated += grad
                total += loss.detach()
            ctx.grad_hidden = grad_hidden
            ctx.grad_params = [g.to(p.dtype) for g, p in zip(grad_params, params)]
            return total

        @staticmethod
        def backward(ctx, grad_output):  # type: ignore[override]
            grad_hidden = ctx.grad_hidden
            if grad_hidden is not None:
                grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
            grad_params = [g.mul_(grad_output.to(g.dtype)) for g in ctx.grad_params]
            ctx.grad_hidden, ctx.grad_params = None, None
            return (grad_hidden, None, None, None, None, None, *grad_params)

    return ChunkedLoss


def _linear_chunk(head, chunk, targets, softcap, ignore_index, grad_hidden, start, end, slot, grad_params):
    """One chunk through a bare ``nn.Linear`` head: its loss, and its gradients added into the accumulators
    (the products autograd takes for a linear layer, written into place)."""
    import torch

    with torch.no_grad():
        logits = torch.nn.functional.linear(chunk, head.weight, head.bias)
    logits.requires_grad_(True)
    with torch.enable_grad():
        loss = _logits_loss(logits, targets, softcap, ignore_index)
    (grad_logits,) = torch.autograd.grad(loss, logits)
    if grad_hidden is not None:
        torch.mm(grad_logits, head.weight, out=grad_hidden[start:end])
    if id(head.weight) in slot:
        grad_params[slot[id(head.weight)]].addmm_(grad_logits.t(), chunk)
    if head.bias is not None and id(head.bias) in slot:
        grad_params[slot[id(head.bias)]] += grad_logits.sum(0)
    return loss.detach()


class _LazyFunction:
    """The autograd function, built on first use so that importing the plugin does not import torch."""

    function: Any = None

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if cls.function is None:
            cls.function = _autograd_function()
        return cls.function.apply(*args)


_ChunkedLoss = _LazyFunction
