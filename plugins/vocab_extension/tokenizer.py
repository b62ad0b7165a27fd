"""The base tokenizer: where it lives (a directory, a ``tokenizer.model`` file or a hub id), which kind it is
(SentencePiece or byte-level BPE), and loading a tokenizer directory with transformers."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmflow_core import LmflowError

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
