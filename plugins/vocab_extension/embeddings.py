"""Growing a model's embeddings for an extended tokenizer: new rows as the mean of their pieces' rows, and
training only those rows."""

from __future__ import annotations

from typing import Any


def resize_and_initialise(model: Any, base: Any, tokenizer: Any) -> int:
    """Give every token of ``tokenizer`` beyond ``base`` an embedding row: the mean of its old pieces' rows.

    The embeddings (and an untied LM head) grow to ``len(tokenizer)`` rows if they are smaller. A new token's
    pieces are what the base tokenizer's model splits the token's string into; its LM head row is likewise the
    mean of those pieces' LM head rows. Returns how many tokens had no old piece (they get the mean of all old
    rows).
    """
    import torch

    first_new, total = len(base), len(tokenizer)
    if model.get_input_embeddings().weight.shape[0] < total:
        model.resize_token_embeddings(total, mean_resizing=False)
    inputs = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    outputs = head.weight if head is not None and head.weight is not inputs else None
    fallback = 0
    with torch.no_grad():
        for token_id in range(first_new, total):
            pieces = old_pieces(base, tokenizer, token_id)
            if not pieces:
                fallback += 1
            index = torch.tensor(pieces, device=inputs.device) if pieces else slice(0, first_new)
            inputs[token_id] = inputs[index].mean(dim=0)
            if outputs is not None:
                outputs[token_id] = outputs[index].mean(dim=0)
    return fallback


def old_pieces(base: Any, tokenizer: Any, token_id: int) -> list[int]:
    """The ids the base tokenizer splits token ``token_id`` of ``tokenizer`` into (only ids below ``len(base)``)."""
    limit = len(base)
    added = tokenizer.added_tokens_decoder.get(token_id)
    backend = getattr(base, "backend_tokenizer", None)
    if added is not None:
        ids = base.encode(added.content, add_special_tokens=False)
    elif backend is not None:
        # The token's own string (e.g. "▁word" or "Ġword") through the base's model: no normaliser or
        # pre-tokenizer to add a prefix or split it.
        ids = [piece.id for piece in backend.model.tokenize(tokenizer.convert_ids_to_tokens(token_id))]
    else:
        ids = base.encode(tokenizer.decode([token_id]), add_special_tokens=False)
    return [i for i in ids if i < limit]


def train_rows_only(model: Any, first: int, end: int, keep_exact: bool = False) -> None:
    """Freeze the model except rows ``first..end-1`` of the embeddings and LM head.

    The other rows' gradients are masked to zero, so AdamW leaves them as they are. Weight decay still shrinks
    a weight whose gradient is zero: with ``keep_exact`` the other rows are also copied and put back after each
    optimizer step.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    kept = []
    for weight in weights:
        weight.requires_grad_(True)
        weight.register_hook(_row_mask(first, end))
        if keep_exact:
            kept.append((weight, weight.detach()[:first].clone(), weight.detach()[end:].clone()))
    model.lmflow_kept_rows = (first, end, kept)


def _row_mask(first: int, end: int) -> Any:
    def mask(grad: Any) -> Any:
        masked = grad.clone()
        masked[:first] = 0
        masked[end:] = 0
        return masked

    return mask
