"""The tokenizer as llama.cpp reads it from a GGUF file: ``tokenizer.ggml.*`` metadata.

Two kinds, as llama.cpp's own converter writes them:

* ``llama`` (SentencePiece): tokens, scores and token types. The scores come from the SentencePiece model
  (``tokenizer.model``) when one is available and agrees with the tokenizer; otherwise from the merge ranks of
  the SentencePiece-style BPE ``tokenizer.json`` (byte fallback, ``▁`` for spaces) that transformers saves in its
  place: a piece made by an earlier merge scores higher, which is the order SentencePiece merges in.
* ``gpt2`` (byte-level BPE): tokens, token types, merges and the pre-tokenizer's name (``tokenizer.ggml.pre``),
  recognised from the tokenizer's own splitting rule.

A vocabulary grown by ``lmflow vocab extend`` is exported like any other (its new pieces and merges included).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmflow_core import LmflowError

# llama.cpp's token types (gguf.TokenType), kept as ints so that this module imports nothing heavy.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PAD_SCORE = -1000.0
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

GPT2_RULE = "byte-level (GPT-2 rule)"
# The splitting rules of the byte-level BPE families llama.cpp knows, by the name it gives them.
PRE_TOKENIZERS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "gpt-2": GPT2_RULE,
}


@dataclass
class GGUFVocab:
    """What a GGUF file says about the tokenizer."""

    model: str  # "llama" or "gpt2"
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def add_to(self, writer: Any) -> None:
        """Write the ``tokenizer.*`` keys with a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def gguf_vocab(
    tokenizer: Any,
    n_vocab: int,
    sp_model: str | Path | None = None,
    fallback_ids: dict[str, Any] | None = None,
) -> GGUFVocab:
    """The GGUF vocabulary of a transformers (fast) tokenizer, padded to the model's ``n_vocab`` embedding rows.

    Args:
        tokenizer: the model's tokenizer, as ``lmflow_core.load_pretrained`` loads it.
        n_vocab: rows of the model's embedding matrix; ids the tokenizer lacks become ``[PAD<id>]`` tokens.
        sp_model: a SentencePiece ``tokenizer.model`` that may hold the true scores (used when it agrees with
            the tokenizer).
        fallback_ids: special token ids for those the tokenizer does not name (``bos``, ``eos``, ``pad``), from
            the model's config, as llama.cpp's converter reads them from ``config.json``.

    Raises:
        LmflowError: a tokenizer of another kind, or one larger than the embedding matrix.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise LmflowError(
            f"the tokenizer ({type(tokenizer).__name__}) has no tokenizer.json form to export",
            "save the model with a fast (tokenizers) tokenizer",
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab or max(vocab.values(), default=-1) >= n_vocab:
        raise LmflowError(
            f"the tokenizer has {len(vocab):,} tokens but the model's embedding matrix has {n_vocab:,} rows",
            "export the tokenizer the model was trained with (a run with --plugins vocab_extension resizes "
            "the embeddings)",
        )
    if model.get("type") == "BPE" and _uses_byte_level(spec):
        result = _byte_level_bpe(tokenizer, spec, vocab, n_vocab)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        result = _sentencepiece(tokenizer, spec, vocab, n_vocab, sp_model)
    else:
        raise LmflowError(
            f"cannot export a {model.get('type', 'unknown')} tokenizer to GGUF",
            "supported: SentencePiece (LLaMA-2 style, byte fallback) and byte-level BPE (GPT-2, Llama-3, Qwen "
            "style) tokenizers",
        )
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    for kind, value in (fallback_ids or {}).items():
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if ids.get(kind) is None and isinstance(value, int) and 0 <= value < n_vocab:
            ids[kind] = value
    result.special_ids = {kind: int(i) for kind, i in ids.items() if i is not None}
    encoded = tokenizer("a", add_special_tokens=True)["input_ids"]
    result.add_bos = tokenizer.bos_token_id is not None and encoded[:1] == [tokenizer.bos_token_id]
    result.add_eos = tokenizer.eos_token_id is not None and encoded[-1:] == [tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    result.chat_template = template if isinstance(template, str) else None
    return result


def _uses_byte_level(spec: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) and "ByteLevel" in json.dumps(
        spec.get("decoder")
    )


def _added(tokenizer: Any) -> dict[int, bool]:
    """Added tokens: id -> whether it is special."""
    return {int(i): bool(token.special) for i, token in tokenizer.added_tokens_decoder.items()}


def _byte_level_bpe(tokenizer: Any, spec: dict[str, Any], vocab: dict[str, int], n_vocab: int) -> GGUFVocab:
    by_id = {i: token for token, i in vocab.items()}
    added = _added(tokenizer)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append((CONTROL if added[i] else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return GGUFVocab("gpt2", pre_tokenizer_name(spec), tokens, types, merges=merges)


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the splitting rule of a byte-level BPE ``tokenizer.json`` (``gpt-2``, ``llama-bpe``,
    ``qwen2``)."""
    rules = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "Split":
                pattern = node.get("pattern", {})
                rules.append(pattern.get("Regex", pattern.get("String")))
            elif node.get("type") == "ByteLevel" and node.get("use_regex", True):
                rules.append(GPT2_RULE)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec.get("pre_tokenizer"))
    for name, rule in PRE_TOKENIZERS.items():
        if rules == [rule]:
            return name
    raise LmflowError(
        f"the byte-level BPE tokenizer splits text by a rule llama.cpp does not know ({rules})",
        f"supported pre-tokenizers: {', '.join(PRE_TOKENIZERS)} (GPT-2, Llama-3 and Qwen2 style tokenizers)",
    )


def _sentencepiece(
    tokenizer: Any, spec: dict[str, Any], vocab: dict[str, int], n_vocab: int, sp_model: str | Path | None
) -> GGUFVocab:
    by_id = {i: token for token, i in vocab.items()}
    added = _added(tokenizer)
    scores = _proto_scores(sp_model, by_id) or _merge_scores(spec, vocab)
    unk = tokenizer.unk_token_id
    lowest = min(scores.values(), default=0.0)
    tokens, types, token_scores = [], [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            token_scores.append(PAD_SCORE)
            continue
        tokens.append(token)
        if i == unk:
            kind = UNKNOWN
        elif i in added:
            kind = CONTROL if added[i] else USER_DEFINED
        elif BYTE_TOKEN.fullmatch(token):
            kind = BYTE
        else:
            kind = NORMAL
        types.append(kind)
        if i in scores:
            token_scores.append(scores[i])
        elif kind == NORMAL:  # a piece no merge makes (a single character): below every merged piece
            token_scores.append(lowest - 1.0 - i)
        else:
            token_scores.append(0.0 if kind in (UNKNOWN, CONTROL, BYTE) else PAD_SCORE)
    return GGUFVocab("llama", "default", tokens, types, scores=token_scores)


def _proto_scores(sp_model: str | Path | None, by_id: dict[int, str]) -> dict[int, float] | None:
    """The SentencePiece model's scores, when its pieces are the tokenizer's (same text, same ids)."""
    if sp_model is None or not Path(sp_model).is_file():
        return None
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    except (OSError, RuntimeError):
        return None
    size = processor.get_piece_size()
    if any(by_id.get(i) != processor.id_to_piece(i) for i in range(size)):
        return None
    return {i: float(processor.get_score(i)) for i in range(size)}


def _merge_scores(spec: dict[str, Any], vocab: dict[str, int]) -> dict[int, float]:
    """Scores that order pieces as the merges do: the piece of merge r scores -r (its first merge counts)."""
    scores: dict[int, float] = {}
    for rank, merge in enumerate(spec["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        piece = vocab.get(left + right)
        if piece is not None and piece not in scores:
            scores[piece] = -float(rank)
    return scores
