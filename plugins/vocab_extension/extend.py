"""``extend_vocabulary``: the whole of ``lmflow vocab extend``, from the corpus to the written tokenizer
directory and its report."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmflow_core import (
    ConfigError,
    LmflowError,
    check_output_apart,
    check_replaceable,
    move_into_place,
    write_output_record,
)

from .bpe import extend_byte_level_bpe
from .corpus import Corpus, read_corpus
from .pieces import extend_sentencepiece, train_pieces
from .tokenizer import SENTENCEPIECE, SP_MODEL, TOKENIZER_JSON, BaseTokenizer, find_base, load_tokenizer_dir

REPORT_FILE = "vocab_extension.json"
ROUND_TRIP_SAMPLE = 2000


@dataclass
class ExtensionReport:
    """What ``lmflow vocab extend`` did; written as ``vocab_extension.json`` next to the tokenizer."""

    output: str
    base: str
    kind: str
    corpus_files: list[str]
    corpus_lines: int
    corpus_characters: int
    trained_pieces: int
    new_pieces: int
    added: int
    skipped: dict[str, int]
    base_vocab_size: int
    vocab_size: int
    tokens_before: int
    tokens_after: int
    added_examples: list[str] = field(default_factory=list)

    @property
    def tokens_per_character_before(self) -> float:
        return self.tokens_before / self.corpus_characters

    @property
    def tokens_per_character_after(self) -> float:
        return self.tokens_after / self.corpus_characters

    @property
    def token_reduction(self) -> float:
        """The share of the corpus's tokens that the extension saves."""
        return 1.0 - self.tokens_after / self.tokens_before if self.tokens_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            tokens_per_character_before=round(self.tokens_per_character_before, 6),
            tokens_per_character_after=round(self.tokens_per_character_after, 6),
            token_reduction=round(self.token_reduction, 6),
        )
        return data

    def summary(self) -> list[str]:
        skipped = ", ".join(f"{n:,} {why}" for why, n in self.skipped.items() if n)
        return [
            f"extended {self.base} ({self.kind}): {self.added:,} pieces added, vocabulary "
            f"{self.base_vocab_size:,} -> {self.vocab_size:,}",
            f"  trained {self.trained_pieces:,} pieces on {self.corpus_lines:,} lines "
            f"({self.corpus_characters:,} characters); {self.new_pieces:,} were new to the base"
            + (f"; left out: {skipped}" if skipped else ""),
            f"  corpus: {self.tokens_per_character_before:.4f} tokens per character before, "
            f"{self.tokens_per_character_after:.4f} after ({self.token_reduction:.1%} fewer tokens: "
            f"{self.tokens_before:,} -> {self.tokens_after:,})",
            f"wrote {self.output}",
        ]


def extend_vocabulary(
    corpus: Sequence[str | os.PathLike],
    base: str,
    vocab_size: int,
    output: str | os.PathLike,
    overwrite: bool = False,
) -> ExtensionReport:
    """Train ``vocab_size`` SentencePiece pieces on ``corpus`` and write ``base`` extended with the new ones.

    The output directory is written under a temporary name and renamed into place: it is either complete or
    absent. A non-empty existing ``output`` is replaced only with ``overwrite``.
    """
    output_dir = Path(output)
    check_replaceable(output_dir, overwrite)
    check_output_apart(output_dir, [*corpus, base])
    if vocab_size < 1:
        raise ConfigError(f"--vocab-size {vocab_size} must be positive", "pass the number of pieces to train")
    text = read_corpus(corpus)
    found = find_base(base)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{output_dir.name}-", dir=output_dir.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            base_tokenizer = found.load(Path(scratch))
            if found.kind == SENTENCEPIECE:
                trained, added, skipped = _extend_sentencepiece_base(
                    found, base_tokenizer, text, vocab_size, staging
                )
            else:
                trained, added, skipped = _extend_byte_level_base(found, text, vocab_size, staging)
        new_count = sum(skipped.values()) + len(added)
        if not added:
            raise LmflowError(
                f"none of the {vocab_size:,} pieces learned from the corpus can be added to {base}: "
                + ("it has them all already" if not new_count else f"{new_count:,} new ones were left out"),
                "use a larger --vocab-size, or a corpus of the language or domain the base lacks",
            )
        tokenizer = load_tokenizer_dir(staging, what="the extended tokenizer")  # as users will load it
        _check_extension(base_tokenizer, tokenizer, text)
        before = _count_tokens(base_tokenizer, text.lines)
        after = _count_tokens(tokenizer, text.lines)
        report = ExtensionReport(
            output=str(output_dir),
            base=base,
            kind=found.kind,
            corpus_files=[str(f) for f in text.files],
            corpus_lines=len(text.lines),
            corpus_characters=text.characters,
            trained_pieces=len(trained.pieces),
            new_pieces=new_count,
            added=len(added),
            skipped=skipped,
            base_vocab_size=len(base_tokenizer),
            vocab_size=len(tokenizer),
            tokens_before=before,
            tokens_after=after,
            added_examples=[_piece_text(tokenizer, found.kind, t) for t in added[:20]],
        )
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
        write_output_record(staging, "vocab extend")
        move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _piece_text(tokenizer: Any, kind: str, token: str) -> str:
    """The text of a token, its leading space included (a LLaMA decoder drops a text's first space)."""
    if kind == SENTENCEPIECE:
        return token.replace("\u2581", " ")
    return tokenizer.convert_tokens_to_string([token])


def _extend_sentencepiece_base(
    found: BaseTokenizer, base_tokenizer: Any, corpus: Corpus, vocab_size: int, staging: Path
) -> tuple[Any, list[str], dict[str, int]]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    assert found.sp_model is not None
    base_proto = pb.ModelProto()
    try:
        base_proto.ParseFromString(found.sp_model.read_bytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise LmflowError(f"{found.sp_model} is not a SentencePiece model", "check --base") from exc
    trained = train_pieces(corpus, vocab_size, base_proto)
    merged, added = extend_sentencepiece(
        base_proto, trained, _reserved_tokens(base_tokenizer, len(base_proto.pieces))
    )
    for path in found.config_files():
        shutil.copyfile(path, staging / path.name)
    (staging / SP_MODEL).write_bytes(merged.SerializeToString())
    # Saving adds tokenizer.json (and transformers' own config), so that later loads need no conversion.
    # A tokenizer converted from tokenizer.model adds BOS/EOS as told, not as the base's tokenizer.json did.
    framing = _framing(base_tokenizer)
    settings = {"add_bos_token": bool(framing[0]), "add_eos_token": bool(framing[1])}
    load_tokenizer_dir(staging, what="the extended tokenizer", **settings).save_pretrained(staging)
    return trained, added, {}


def _framing(tokenizer: Any, probe: str = "x") -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after a text."""
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain) :]
    return [], []


def _reserved_tokens(base_tokenizer: Any, pieces: int) -> list[tuple[str, bool]]:
    """Tokens a transformers tokenizer added after the SentencePiece model's pieces, in id order."""
    extra = {i: t for i, t in base_tokenizer.added_tokens_decoder.items() if i >= pieces}
    if sorted(extra) != list(range(pieces, pieces + len(extra))):
        raise LmflowError(
            f"the base tokenizer's added tokens leave gaps after its {pieces} SentencePiece pieces "
            f"(ids {sorted(extra)})",
            "extend a tokenizer whose added tokens follow its pieces without gaps",
        )
    return [(extra[i].content, bool(extra[i].special)) for i in sorted(extra)]


def _extend_byte_level_base(
    found: BaseTokenizer, corpus: Corpus, vocab_size: int, staging: Path
) -> tuple[Any, list[str], dict[str, int]]:
    assert found.directory is not None
    trained = train_pieces(corpus, vocab_size, None)
    spec, added, skipped = extend_byte_level_bpe(
        (found.directory / TOKENIZER_JSON).read_text(encoding="utf-8"), trained
    )
    for path in found.config_files():
        shutil.copyfile(path, staging / path.name)
    (staging / TOKENIZER_JSON).write_text(spec, encoding="utf-8")
    load_tokenizer_dir(staging, what="the extended tokenizer").save_pretrained(staging)
    return trained, added, skipped


def _check_extension(base_tokenizer: Any, tokenizer: Any, corpus: Corpus) -> None:
    """Old ids unchanged, and text decodes as it did: a failure here is a bug, and nothing is written."""
    extended = tokenizer.get_vocab()
    moved = [t for t, i in base_tokenizer.get_vocab().items() if extended.get(t) != i]
    if moved:
        raise RuntimeError(f"vocabulary extension changed the ids of {len(moved)} tokens (e.g. {moved[0]!r})")
    if _framing(tokenizer) != _framing(base_tokenizer):
        framed = (_framing(tokenizer), _framing(base_tokenizer))
        raise RuntimeError(
            f"the extended tokenizer frames a text with {framed[0]}, the base with {framed[1]}"
        )
    sample = corpus.lines[:ROUND_TRIP_SAMPLE]
    old = base_tokenizer(sample, add_special_tokens=False)["input_ids"]
    new = tokenizer(sample, add_special_tokens=False)["input_ids"]
    for line, a, b in zip(sample, old, new):
        if tokenizer.decode(b) != base_tokenizer.decode(a):
            raise RuntimeError(f"the extended tokenizer decodes {line[:60]!r} differently from the base")


def _count_tokens(tokenizer: Any, lines: list[str], batch: int = 2048) -> int:
    return sum(
        len(ids)
        for start in range(0, len(lines), batch)
        for ids in tokenizer(lines[start : start + batch], add_special_tokens=False)["input_ids"]
    )
