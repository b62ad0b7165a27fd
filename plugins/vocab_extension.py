"""Vocabulary extension (plugin ``vocab_extension``): teach a tokenizer a new language or domain.

Two steps. ``lmflow vocab extend`` trains a SentencePiece model on the user's corpus and appends the pieces the
base tokenizer lacks; ``lmflow run --tokenizer DIR --plugins vocab_extension`` then grows the model's embeddings
and LM head for them and fine-tunes.

    lmflow vocab extend --corpus docs/ --base BASE_TOKENIZER --vocab-size 8000 --output tokenizer-ext
    lmflow run --model M --tokenizer tokenizer-ext --plugins vocab_extension --dataset D [--train-new-embeddings-only]

How the pieces are added, and why:

* **SentencePiece tokenizers** (a LLaMA-2 style ``tokenizer.model``): the new pieces are appended to the base's
  ``ModelProto``, after every existing piece, with scores that rank them below the base's own pieces in the
  order the corpus model ranked them. The base's pieces keep their ids and merge first; the new ones then
  join what is left. The trainer uses the base's own normalisation and splitting rules, so every new piece is
  one the base's segmentation can reach.
* **Byte-level BPE tokenizers** (a ``tokenizer.json`` of Llama-3, Qwen or GPT-2 style): each new piece becomes a
  vocabulary entry *and a merge* appended after the base's merges, never an "added token". Added tokens are
  cut out of the text before pre-tokenisation, wherever they occur (inside other words too), and decode
  outside the byte-level decoder; a merge takes part in ordinary BPE within a pre-token, so encoding of text
  without the new pieces is unchanged and every id sequence still decodes byte for byte. A piece is added
  when the base's pre-tokeniser keeps it in one pre-token and the segmentation of its text (by the base plus
  the shorter pieces added before it) has two parts, which the new merge joins; the others are counted as
  skipped.

In both cases every old token keeps its id and ``decode(encode(text))`` is unchanged for any text. The output
directory is a transformers tokenizer directory (plus ``tokenizer.model`` for SentencePiece) with
``vocab_extension.json``, the report: pieces added and the corpus's tokens per character before and after.

During a run, new embedding rows (and LM head rows) start as the mean of the rows of the pieces the model's own
tokenizer splits the new token into. ``--train-new-embeddings-only`` freezes everything else and masks the
gradients of the old rows, so only the new rows change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmflow_core import (
    ConfigError,
    LmflowError,
    PluginOption,
    check_output_apart,
    check_replaceable,
    hookimpl,
    model_source,
    move_into_place,
    note,
    quiet_libraries,
    read_input_text,
    write_output_record,
)

if TYPE_CHECKING:
    import click

    from lmflow_core import RunConfig, StepContext

NAME = "vocab_extension"
REPORT_FILE = "vocab_extension.json"
SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL_BPE = "byte-level BPE"
SP_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
# Files of a transformers tokenizer directory that describe it beyond the vocabulary; carried to the output.
CONFIG_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# SentencePiece BPE scores at or below this mark pieces meant to merge last (LLaMA gives whitespace runs -1e9);
# new pieces rank just above them, where float32 scores still tell them apart.
SENTINEL_SCORE = -1e6
MAX_LINE_BYTES = 1 << 16
ROUND_TRIP_SAMPLE = 2000


# --------------------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """The text to learn pieces from: its files and non-blank lines."""

    files: list[Path]
    lines: list[str]

    @property
    def characters(self) -> int:
        return sum(len(line) for line in self.lines)


def read_corpus(paths: Sequence[str | os.PathLike]) -> Corpus:
    """Read UTF-8 text files (directories are searched for files); an empty or non-text corpus is an error."""
    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise LmflowError(f"--corpus {path} is a directory without files", "pass text files")
            files.extend(found)
        elif path.exists() or path.is_symlink():
            files.append(path)  # read below, where anything but a regular file is refused by name
        else:
            raise LmflowError(f"--corpus {path} does not exist", "pass text files or directories of them")
    lines: list[str] = []
    for path in files:
        text = read_input_text(path, "corpus file", "pass plain text files, converted to UTF-8")
        if "\x00" in text:
            raise LmflowError(
                f"corpus file {path} is binary, not text (it holds NUL bytes)", "pass text files"
            )
        lines.extend(line for line in text.splitlines() if line.strip())
    if not lines:
        raise LmflowError(
            f"the corpus ({', '.join(str(f) for f in files)}) holds no text",
            "pass files with the text to learn new pieces from",
        )
    return Corpus(files, lines)


# --------------------------------------------------------------------------------------------------------------
# The base tokenizer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class BaseTokenizer:
    """Where the tokenizer to extend lives and which kind it is."""

    source: str
    kind: str
    directory: Path | None  # a transformers tokenizer directory, if there is one
    sp_model: Path | None  # the SentencePiece model, for the sentencepiece kind

    def config_files(self) -> list[Path]:
        if self.directory is None:
            return []
        return [self.directory / name for name in CONFIG_FILES if (self.directory / name).is_file()]

    def load(self, scratch: Path) -> Any:
        """The base as a transformers tokenizer (a bare ``tokenizer.model`` loads as a LLaMA tokenizer)."""
        if self.directory is not None and (self.directory / "tokenizer_config.json").is_file():
            return load_tokenizer_dir(self.directory, what=f"the base tokenizer {self.source}")
        assert self.sp_model is not None or self.directory is not None
        folder = scratch / "base"
        folder.mkdir()
        if self.sp_model is not None:
            shutil.copyfile(self.sp_model, folder / SP_MODEL)
        else:
            shutil.copyfile(self.directory / TOKENIZER_JSON, folder / TOKENIZER_JSON)
        return load_tokenizer_dir(folder, what=f"the base tokenizer {self.source}")


def find_base(base: str) -> BaseTokenizer:
    """Locate ``--base``: a directory, a ``tokenizer.model`` file, or a hub id; decide how to extend it."""
    path = Path(base).expanduser()
    if path.is_file():
        if path.suffix == ".model":
            return BaseTokenizer(base, SENTENCEPIECE, None, path)
        if path.name == TOKENIZER_JSON:
            path = path.parent
        else:
            raise LmflowError(
                f"--base {base} is neither a SentencePiece .model file nor a tokenizer directory",
                "pass the directory holding tokenizer.model or tokenizer.json",
            )
    if not path.exists():
        path = _fetch(base)
    if not path.is_dir():
        raise LmflowError(f"--base {base} is not a tokenizer directory", "check --base")
    if (path / SP_MODEL).is_file():
        return BaseTokenizer(base, SENTENCEPIECE, path, path / SP_MODEL)
    if not (path / TOKENIZER_JSON).is_file():
        raise LmflowError(
            f"--base {base} has neither tokenizer.model nor tokenizer.json",
            "pass a SentencePiece (tokenizer.model) or byte-level BPE (tokenizer.json) tokenizer directory",
        )
    try:
        spec = json.loads((path / TOKENIZER_JSON).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LmflowError(f"{path / TOKENIZER_JSON} is not valid JSON ({exc})", "check --base") from exc
    kind = (spec.get("model") or {}).get("type", "unknown")
    if kind == "BPE" and not _is_byte_level(spec):
        raise LmflowError(
            f"--base {base} is a SentencePiece-style tokenizer.json without its tokenizer.model",
            "pass the directory that has tokenizer.model (the original model repository ships it)",
        )
    if kind != "BPE":
        raise LmflowError(
            f"--base {base} is a {kind} tokenizer.json, which vocabulary extension does not handle",
            "pass a SentencePiece tokenizer (with tokenizer.model) or a byte-level BPE tokenizer.json",
        )
    return BaseTokenizer(base, BYTE_LEVEL_BPE, path, None)


def _fetch(base: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["tokenizer.model", "tokenizer.json", *CONFIG_FILES]
    try:
        return Path(snapshot_download(repo_id=base, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repository, invalid id: all mean the same to the user
        raise LmflowError(
            f"--base {base} is not a local path and could not be fetched from the hub",
            "pass a tokenizer directory, a tokenizer.model file or a reachable hub id",
        ) from exc


def _is_byte_level(spec: dict[str, Any]) -> bool:
    def mentions(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(mentions(v) for v in node.values())
        if isinstance(node, list):
            return any(mentions(v) for v in node)
        return False

    return mentions(spec.get("pre_tokenizer"))


def load_tokenizer_dir(directory: Path, what: str, **kwargs: Any) -> Any:
    """A transformers tokenizer from a directory; a bare ``tokenizer.model`` loads as a LLaMA tokenizer."""
    from transformers import AutoTokenizer, LlamaTokenizer

    try:
        if (directory / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(directory, **kwargs)
        if (directory / SP_MODEL).is_file():
            # LLaMA's convention for a bare SentencePiece model: BOS before every text, no EOS.
            settings = {"add_bos_token": True, "add_eos_token": False, **kwargs}
            return LlamaTokenizer.from_pretrained(directory, **settings)
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LmflowError(
            f"cannot load {what}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}",
            "check the tokenizer files",
        ) from exc


# --------------------------------------------------------------------------------------------------------------
# New pieces from the corpus
# --------------------------------------------------------------------------------------------------------------


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


def _normal_pieces(trained: Any) -> list[Any]:
    from sentencepiece import sentencepiece_model_pb2 as pb

    normal = pb.ModelProto.SentencePiece.NORMAL
    return [p for p in trained.pieces if p.type == normal]


# --------------------------------------------------------------------------------------------------------------
# Appending the pieces
# --------------------------------------------------------------------------------------------------------------


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
    for rank, piece in enumerate(_normal_pieces(trained)):
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
    for piece in _normal_pieces(trained):
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


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


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


@hookimpl
def register_commands(cli: click.Group) -> None:
    """Add ``lmflow vocab extend``."""
    import click

    @cli.group("vocab")
    def vocab_group() -> None:
        """Extend a tokenizer's vocabulary for a new language or domain."""

    @vocab_group.command("extend")
    @click.option(
        "--corpus",
        "corpus",
        required=True,
        multiple=True,
        help="UTF-8 text file or directory of them to learn pieces from; repeatable, or comma-separated.",
    )
    @click.option(
        "--base",
        required=True,
        help="Tokenizer to extend: a directory with tokenizer.model (SentencePiece) or a byte-level BPE "
        "tokenizer.json, a tokenizer.model file, or a hub id.",
    )
    @click.option(
        "--vocab-size",
        required=True,
        type=click.IntRange(min=1),
        help="Pieces of the SentencePiece model trained on the corpus; those the base lacks are added.",
    )
    @click.option("--output", required=True, help="Directory to write the extended tokenizer to.")
    @click.option("--overwrite", is_flag=True, help="Replace --output if it already holds something.")
    def vocab_extend(
        corpus: tuple[str, ...], base: str, vocab_size: int, output: str, overwrite: bool
    ) -> None:
        """Train a SentencePiece model on the corpus and append its new pieces to a tokenizer.

        Every old token keeps its id, and any text decodes as before. The report (pieces added, tokens per
        character of the corpus before and after) is printed and written to vocab_extension.json.
        """
        quiet_libraries()
        paths = [p for value in corpus for p in value.split(",") if p]
        report = extend_vocabulary(paths, base, vocab_size, output, overwrite=overwrite)
        for line in report.summary():
            click.echo(line)


# --------------------------------------------------------------------------------------------------------------
# Fine-tuning with the extended tokenizer
# --------------------------------------------------------------------------------------------------------------


@hookimpl
def declare_options() -> list[PluginOption]:
    """``--train-new-embeddings-only`` (``vocab_extension:`` section of a YAML config)."""
    return [
        PluginOption(
            "train_new_embeddings_only",
            bool,
            False,
            "Train only the new tokens' embedding and LM head rows; everything else stays frozen.",
            flag="--train-new-embeddings-only",
        )
    ]


@hookimpl
def declare_conflicts() -> dict[str, str]:
    return {
        "lora": "a LoRA adapter does not carry resized embeddings that a base model loads; extend the vocabulary "
        "with a full fine-tuning run first",
        "zero3": "ZeRO-3 partitions the embedding matrix across processes before it can be resized here; resize "
        "it in a run without zero3 (or with zero2 / DDP) first",
    }


@hookimpl
def validate_config(config: RunConfig) -> list[str]:
    problems = []
    if not config.tokenizer:
        problems.append(
            "the vocab_extension plugin needs --tokenizer DIR: the extended tokenizer written by "
            "`lmflow vocab extend`"
        )
    if config.options_for(NAME).train_new_embeddings_only:
        # The row mask sits on the embedding parameters themselves: engines that replace or shard them, and
        # plugins that make other weights trainable, would quietly train more than the new rows.
        for other, why in (
            ("lisa", "lisa makes decoder layers trainable"),
            ("fsdp", "fsdp replaces the embedding parameters with sharded ones"),
            ("zero2", "zero2 updates its own copy of the weights"),
        ):
            if other in config.plugins:
                problems.append(
                    f"--train-new-embeddings-only cannot be combined with --plugins {other} ({why}); train the "
                    f"new rows in a run without {other}"
                )
    return problems


@hookimpl(wrapper=True)
def load_tokenizer(config: RunConfig) -> Any:
    """Check, before any model loads, that the tokenizer the run loads (``--tokenizer``, by the core's loader or
    a plugin's) extends the model's own tokenizer."""
    tokenizer = yield
    base = model_tokenizer(config)
    check_extends(base, tokenizer, config.tokenizer)
    new = len(tokenizer) - len(base)
    if new <= 0:
        if config.options_for(NAME).train_new_embeddings_only:
            raise ConfigError(
                f"--tokenizer {config.tokenizer} has no token beyond the model's own {len(base):,}, so "
                "--train-new-embeddings-only has nothing to train",
                "pass the extended tokenizer, or leave out --train-new-embeddings-only",
            )
        note(
            f"--tokenizer {config.tokenizer} adds no token to the model's own; the embeddings stay as they are"
        )
    return tokenizer


def model_tokenizer(config: RunConfig) -> Any:
    """The tokenizer stored with the run's model: it tells which tokens are new and how to split them."""
    from transformers import AutoTokenizer

    source = model_source(config)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise LmflowError(
            f"the model {source} has no tokenizer of its own, which the vocab_extension plugin needs to tell the "
            "new tokens from the old and to initialise their embeddings",
            "save the base tokenizer next to the model",
        ) from exc


def check_extends(base: Any, tokenizer: Any, where: str) -> None:
    """Every token of ``base`` must have the same id in ``tokenizer``."""
    extended = tokenizer.get_vocab()
    moved = [(t, i, extended.get(t)) for t, i in base.get_vocab().items() if extended.get(t) != i]
    if moved:
        token, old, new = moved[0]
        raise LmflowError(
            f"--tokenizer {where} does not extend the model's tokenizer: {len(moved):,} of its tokens have other "
            f"ids there (e.g. {token!r}: {old} -> {new})",
            "pass a tokenizer written by `lmflow vocab extend --base <the model's tokenizer>`",
        )


@hookimpl
def prepare_model(config: RunConfig, model: Any, tokenizer: Any) -> None:
    """Grow the embeddings and LM head, initialise the new rows, and freeze all else if asked."""
    base = model_tokenizer(config)
    first_new, total = len(base), len(tokenizer)
    if total <= first_new:
        return
    rows_before = model.get_input_embeddings().weight.shape[0]
    fallback = resize_and_initialise(model, base, tokenizer)
    rows = model.get_input_embeddings().weight.shape[0]
    note(
        f"vocabulary extension: {total - first_new:,} new tokens; embeddings {rows_before:,} -> {rows:,} rows, "
        "new rows start as the mean of their pieces' embeddings under the model's tokenizer"
        + (f" ({fallback:,} without pieces start as the mean of all rows)" if fallback else "")
    )
    if config.options_for(NAME).train_new_embeddings_only:
        train_rows_only(model, first_new, total, keep_exact=config.weight_decay > 0)
        note(
            f"--train-new-embeddings-only: only embedding and LM head rows {first_new:,}-{total - 1:,} train"
        )


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


@hookimpl
def on_step(config: RunConfig, step: StepContext) -> None:
    """Put the frozen rows back after weight decay shrank them (``--train-new-embeddings-only``)."""
    import torch

    model = step.model
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    first, end, kept = getattr(model, "lmflow_kept_rows", (0, 0, []))
    with torch.no_grad():
        for weight, head, tail in kept:
            weight[:first].copy_(head)
            weight[end:].copy_(tail)
