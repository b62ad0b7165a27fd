"""New pieces from the corpus (a SentencePiece model trained on it), and appending them to a SentencePiece
base."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from lmflow_core import LmflowError

from .corpus import Corpus

# SentencePiece BPE scores at or below this mark pieces meant to merge last (LLaMA gives whitespace runs -1e9);
# new pieces rank just above them, where float32 scores still tell them apart.
SENTINEL_SCORE = -1e6
MAX_LINE_BYTES = 1 << 16


def train_pieces(corpus: Corpus, vocab_size: int, base_proto: Any | None) -> Any:
    """Train a SentencePiece model of ``vocab_size`` pieces on the corpus; returns its ``ModelProto``.

    For a SentencePiece base the trainer uses the base's model type, normalisation and splitting rules, so that
    the new pieces are segments the base's own encoder produces; for a byte-level base, BPE on raw text.
    """
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    options: dict[str, Any] = {
        "model_type": "bpe",
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        "split_digits": True,
        "allow_whitespace_only_pieces": True,
        "byte_fallback": False,
    }
    if base_proto is not None:
        spec, norm = base_proto.trainer_spec, base_proto.normalizer_spec
        options.update(
            model_type=pb.TrainerSpec.ModelType.Name(spec.model_type).lower(),
            split_digits=spec.split_digits,
            split_by_whitespace=spec.split_by_whitespace,
            split_by_number=spec.split_by_number,
            split_by_unicode_script=spec.split_by_unicode_script,
            treat_whitespace_as_suffix=spec.treat_whitespace_as_suffix,
            allow_whitespace_only_pieces=spec.allow_whitespace_only_pieces,
            max_sentencepiece_length=spec.max_sentencepiece_length or 16,
            add_dummy_prefix=norm.add_dummy_prefix,
            remove_extra_whitespaces=norm.remove_extra_whitespaces,
        )
        if norm.name in ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"):
            options["normalization_rule_name"] = norm.name
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus.lines),
            model_writer=model,
            vocab_size=vocab_size,
            max_sentence_length=MAX_LINE_BYTES,
            num_threads=max(1, min(16, os.cpu_count() or 1)),
            minloglevel=2,
            **options,
        )
    except RuntimeError as exc:
        raise _training_error(exc, vocab_size, corpus) from exc
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto


def _training_error(exc: RuntimeError, vocab_size: int, corpus: Corpus) -> LmflowError:
    message = str(exc)
    too_high = re.search(r"value <= (\d+)", message)
    if too_high:
        return LmflowError(
            f"--vocab-size {vocab_size} is more than the corpus supports ({corpus.characters:,} characters "
            f"yield at most {too_high.group(1)} pieces)",
            f"use --vocab-size {too_high.group(1)} or less, or a larger corpus",
        )
    too_low = re.search(r"required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        needed = int(too_low.group(2)) + 3  # the characters to cover, plus <unk>, <s> and </s>
        return LmflowError(
            f"--vocab-size {vocab_size} is smaller than the corpus's alphabet ({too_low.group(2)} characters)",
            f"use --vocab-size {needed} or more",
        )
    first = (message.strip().splitlines() or ["unknown error"])[0]
    return LmflowError(
        f"SentencePiece could not train on the corpus: {first}", "check --corpus and --vocab-size"
    )


def normal_pieces(trained: Any) -> list[Any]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    normal = pb.ModelProto.SentencePiece.NORMAL
    return [p for p in trained.pieces if p.type == normal]


def extend_sentencepiece(
    base_proto: Any, trained: Any, reserved: Sequence[tuple[str, bool]] = ()
) -> tuple[Any, list[str]]:
    """The base ``ModelProto`` with the trained pieces it lacks appended; returns it and the added pieces.

    ``reserved`` lists tokens a transformers tokenizer added after the SentencePiece pieces (content, special):
    they are written into the model first, at the ids they already have, so that no new piece takes their id.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece_type = pb.ModelProto.SentencePiece
    merged = pb.ModelProto()
    merged.CopyFrom(base_proto)
    for content, special in reserved:
        entry = merged.pieces.add()
        entry.piece, entry.score = content, 0.0
        entry.type = piece_type.CONTROL if special else piece_type.USER_DEFINED
    known = {p.piece for p in merged.pieces}
    bpe = base_proto.trainer_spec.model_type == pb.TrainerSpec.BPE
    scored = [p.score for p in base_proto.pieces if p.type == piece_type.NORMAL and p.score > SENTINEL_SCORE]
    floor = min(scored, default=0.0)
    added: list[str] = []
    for rank, piece in enumerate(normal_pieces(trained)):
        if piece.piece in known:
            continue
        entry = merged.pieces.add()
        entry.piece, entry.type = piece.piece, piece_type.NORMAL
        # BPE merges the highest score first: new pieces come after the base's, in the corpus model's order.
        # Unigram scores are log-probabilities: the corpus model's own are comparable.
        entry.score = floor - 1.0 - rank if bpe else piece.score
        known.add(piece.piece)
        added.append(piece.piece)
    return merged, added
