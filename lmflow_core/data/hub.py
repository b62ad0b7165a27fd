"""Datasets on the Hugging Face hub: ``--dataset org/name`` or ``org/name:split``.

A ``--dataset`` that names an existing local path is always read from disk. Otherwise, a value shaped like a hub
id (``org/name``, one slash, no data-file suffix) is loaded with ``datasets.load_dataset``: from the hub when it
can be reached, else from this machine's caches (the ``datasets`` cache that an earlier online load filled, or
a repository snapshot that ``hf download --repo-type dataset org/name`` put in the hub cache). Its rows are then
validated exactly like a local file's, each named ``org/name[split]#i``.

The hub is probed with one short connection first, so an unreachable hub (or ``HF_HUB_OFFLINE=1``) costs a
second or two and ends in a one-line error saying how to download the dataset, never in a minute of retries.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..network import hub_offline, hub_offline_requested, hub_reachable

#: ``org/name``: hub user or organisation, then the dataset's name.
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
#: Names that are files, not hub datasets: ``data/train.json`` that does not exist is a missing file.
_FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    ".gz",
    ".csv",
    ".tsv",
    ".parquet",
    ".arrow",
    ".txt",
    ".zip",
    ".bz2",
    ".xz",
)
_COMMIT = re.compile(r"[0-9a-f]{40}")
#: Splits a run reads when none is named: training data from "train", evaluation data from the first found.
_DEFAULT_SPLITS = {"train": ("train",), "eval": ("validation", "valid", "dev", "test")}


@dataclass(frozen=True)
class HubReference:
    """A hub dataset named on the command line: the repository and, if given, the split."""

    repo: str
    split: str | None = None

    def __str__(self) -> str:
        return self.repo + (f":{self.split}" if self.split else "")


#: Names a hub dataset even where a local directory has the name of its owner.
HUB_PREFIX = "hf://datasets/"


def hub_reference(spec: str) -> HubReference | None:
    """The hub dataset ``spec`` names, or ``None`` when it is a local path or looks like one.

    An existing path always wins; a missing path that starts like one (``/``, ``.``, ``~``), has no slash or
    two, ends in a data-file suffix, or whose first part is a local directory (``data/tarin`` beside
    ``data/``) stays a path, so that a typo is reported as a missing file and never looked up on the hub.
    ``hf://datasets/org/name[:split]`` always names the hub dataset.
    """
    forced = spec.startswith(HUB_PREFIX)
    if forced:
        spec = spec[len(HUB_PREFIX) :]
    elif not spec or Path(spec).expanduser().exists() or Path(spec).is_symlink():
        return None
    repo, _, split = spec.partition(":")
    if not _REPO.fullmatch(repo):
        if forced:
            raise DataError(
                f"{HUB_PREFIX}{spec} does not name a hub dataset", f"write {HUB_PREFIX}org/name[:split]"
            )
        return None
    if not forced and (
        spec.startswith(("/", ".", "~"))
        or repo.lower().endswith(_FILE_SUFFIXES)
        or Path(repo).parent.is_dir()
    ):
        return None
    return HubReference(repo, split or None)


def read_hub_dataset(
    reference: HubReference, config_name: str | None, revision: str | None, purpose: str
) -> tuple[Iterator[dict[str, Any]], dict[str, Any]]:
    """The rows of a hub dataset's split and what was read: ``{"repo", "config", "split", "revision", "rows",
    "from"}`` (``revision`` is the commit loaded, when known; ``from`` is ``hub``, ``datasets cache`` or
    ``hub cache``)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a core dependency
        raise DataError(f"reading {reference} needs the datasets package", "pip install datasets") from exc
    datasets.logging.set_verbosity_error()  # "Using the latest cached version..." is said in our own words
    offline = hub_offline_requested()
    reachable = not offline and hub_reachable()
    loaded, origin, snapshot = None, "hub", None
    problem: Exception | None = None
    with hub_offline(not reachable):
        try:
            loaded = datasets.load_dataset(
                reference.repo, name=config_name, revision=revision, split=reference.split
            )
            origin = "hub" if reachable else "datasets cache"
        except Exception as exc:
            problem = exc
        if loaded is not None and not reachable and not _revision_matches(loaded, revision, reference.repo):
            loaded, problem = None, None  # the datasets cache holds another revision: try the hub cache
        if loaded is None and not reachable:
            snapshot = _snapshot(reference.repo, revision)
            if snapshot is not None:
                try:
                    loaded = datasets.load_dataset(str(snapshot), name=config_name, split=reference.split)
                    origin, problem = "hub cache", None
                except Exception as exc:
                    if not _names_a_choice(exc):  # a copy is here but cannot be read: say so, not "download"
                        raise DataError(
                            f"the copy of {reference.repo} in the hub cache ({snapshot}) could not be read: "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}",
                            "fix or delete that copy and download it again",
                        ) from exc
                    problem = exc
    if loaded is None:
        raise _load_error(reference, config_name, revision, problem, reachable, offline)
    split = reference.split
    if isinstance(loaded, datasets.DatasetDict):
        split = _choose_split(reference, list(loaded), purpose)
        loaded = loaded[split]
    info = {
        "repo": reference.repo,
        "config": config_name or loaded.info.config_name,
        "split": str(split),
        "revision": snapshot.name if origin == "hub cache" else _cached_revision(loaded),
        "requested_revision": revision,
        "rows": loaded.num_rows,
        "from": origin,
    }
    return iter(loaded), info


def _choose_split(reference: HubReference, splits: list[str], purpose: str) -> str:
    for name in _DEFAULT_SPLITS.get(purpose, ("train",)):
        if name in splits:
            return name
    if purpose == "eval" and splits == ["train"]:
        raise DataError(
            f"{reference.repo} has only a train split, and evaluation never reads training data unasked",
            f"name it if that is what you mean: --eval-dataset {reference.repo}:train",
        )
    if len(splits) == 1:
        return splits[0]
    option = "--eval-dataset" if purpose == "eval" else "--dataset"
    raise DataError(
        f"{reference.repo} has the splits {', '.join(splits)}; which one should be read?",
        f"name it: {option} {reference.repo}:{splits[0]}",
    )


def _names_a_choice(exc: Exception) -> bool:
    """Whether a load failed on the split or configuration asked for (reported as such), not on the data."""
    text = str(exc).lower()
    return ("split" in text and "should be one of" in text) or (
        "config" in text and ("available" in text or "missing" in text)
    )


def _load_error(
    reference: HubReference,
    config_name: str | None,
    revision: str | None,
    problem: Exception | None,
    reachable: bool,
    offline: bool,
) -> DataError:
    text = " ".join(str(problem).split()) if problem is not None else ""
    name = type(problem).__name__ if problem is not None else ""
    if problem is not None and _names_a_choice(problem):
        if "split" in text.lower() and "should be one of" in text.lower():
            return DataError(f"{reference}: {text}", f"name an existing split: {reference.repo}:SPLIT")
        return DataError(
            f"{reference.repo}: {text}", "pass --dataset-config NAME with one of the configurations named"
        )
    # Told the hub was reachable (behind a proxy it is not probed), yet the connection failed.
    network = "ConnectionError" in name or "Proxy" in name or "reach" in text.lower()
    if reachable and not network:
        if name == "DatasetNotFoundError":
            return DataError(
                f"dataset {reference.repo} is not a local path, and the Hugging Face hub has no dataset of "
                "that name (or it is private or gated)",
                "check the name; for a gated or private dataset log in first with `hf auth login`",
            )
        return DataError(f"hub dataset {reference}: {name}: {text}", "check the name, split and options")
    why = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
    if reachable:
        why = f"the hub could not be reached ({name})"
    pinned = f" at revision {revision}" if revision else ""
    return DataError(
        f"dataset {reference.repo}{pinned} is neither a local path nor in this machine's Hugging Face cache, and "
        f"{why}",
        f"download it first where the hub is reachable (`hf download --repo-type dataset {reference.repo}"
        f"{f' --revision {revision}' if revision else ''}`, or "
        "run this command once online), or pass a local file",
    )


def _snapshot(repo: str, revision: str | None) -> Path | None:
    """The hub-cache snapshot of the dataset repository (``hf download``), or ``None`` if there is none."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo, repo_type="dataset", revision=revision or "main", local_files_only=True)
        )
    except Exception:
        return None


def _cached_revision(dataset: Any) -> str | None:
    """The commit a loaded dataset came from: ``datasets`` names its cache directory after it."""
    for entry in getattr(dataset, "cache_files", None) or ():
        candidate = Path(entry["filename"]).parent.name
        if _COMMIT.fullmatch(candidate):
            return candidate
    return None


def _revision_matches(loaded: Any, revision: str | None, repo: str) -> bool:
    """Whether a dataset loaded from the ``datasets`` cache is the revision asked for.

    A commit (or the start of one, 7 characters or more) is compared with the cached commit; a branch or tag
    is resolved through the hub cache's ``refs/`` (what ``hf download`` records) and, where it cannot be, the
    cached copy is not taken for it.
    """
    if revision is None:
        return True
    import datasets

    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    cached = {_cached_revision(part) for part in parts}
    if None in cached or len(cached) != 1:
        return False
    (commit,) = cached
    if re.fullmatch(r"[0-9a-f]{7,40}", revision) and commit.startswith(revision):
        return True
    return _resolve_ref(repo, revision) == commit


def _resolve_ref(repo: str, revision: str) -> str | None:
    """The commit a branch or tag pointed at when the dataset was last downloaded into the hub cache."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None
