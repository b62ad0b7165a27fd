"""Appending new pieces to a byte-level BPE ``tokenizer.json``: each one a vocabulary entry and a merge."""

from __future__ import annotations

import json
from typing import Any

from .pieces import normal_pieces


def extend_byte_level_bpe(tokenizer_json: str, trained: Any) -> tuple[str, list[str], dict[str, int]]:
    """A byte-level BPE ``tokenizer.json`` with new tokens and merges appended.

    Returns the new JSON, the added tokens (in the model's byte-level alphabet) and the count of pieces left out
    by reason.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    spec = json.loads(tokenizer_json)
    model = spec["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    string_merges = bool(model["merges"]) and isinstance(model["merges"][0], str)
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    taken = [*vocab.values(), *(token["id"] for token in spec.get("added_tokens") or [])]
    next_id = max(taken, default=-1) + 1
    pre_tokenizer = Tokenizer.from_str(tokenizer_json).pre_tokenizer
    to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    candidates: dict[str, None] = {}  # ordered as the corpus model ranks them
    skipped = {"split by the pre-tokenizer": 0, "not one merge away": 0}
    for piece in normal_pieces(trained):
        text = piece.piece.replace("\u2581", " ")
        token = to_bytes.pre_tokenize_str(text)[0][0]
        if token in vocab or token in candidates:
            continue
        parts = pre_tokenizer.pre_tokenize_str(text) if pre_tokenizer is not None else [(token, None)]
        if len(parts) != 1 or parts[0][0] != token:
            skipped["split by the pre-tokenizer"] += 1
            continue
        candidates[token] = None

    options = {
        k: model.get(k)
        for k in ("unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "ignore_merges")
        if model.get(k) is not None
    }
    added: list[str] = []
    # A merge joins two tokens that are each shorter than the result: add pieces shortest first, rebuilding the
    # model once per length so that a piece can build on shorter ones added before it.
    for length in sorted({len(c) for c in candidates}):
        segmenter = models.BPE(
            vocab=vocab, merges=merges, byte_fallback=bool(model.get("byte_fallback")), **options
        )
        for token in (c for c in candidates if len(c) == length):
            parts = [t.value for t in segmenter.tokenize(token)]
            if len(parts) != 2:
                skipped["not one merge away"] += 1
                continue
            merges.append((parts[0], parts[1]))
            vocab[token] = next_id
            next_id += 1
            added.append(token)
    model["vocab"] = vocab
    model["merges"] = [" ".join(m) if string_merges else list(m) for m in merges]
    return json.dumps(spec, ensure_ascii=False), added, skipped
