"""Hugging Face hub datasets as --dataset org/name[:split]: read through `datasets` from this machine's caches
(no network in the tests), validated like local files, the revision recorded, and a fast one-line error when
the dataset is not here and the hub cannot be reached."""

from __future__ import annotations

import json
import time

import pytest
from helpers import assert_one_line_error, conversations, invoke, write_json

from lmflow_core.data import load_raw_dataset
from lmflow_core.data.hub import HubReference, hub_reference
from lmflow_core.errors import DataError

DATASETS_SHA = "0123456789abcdef0123456789abcdef01234567"
SNAPSHOT_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def sharegpt(n: int, tag: str) -> list[dict]:
    return [
        {
            "conversations": [
                {"from": "human", "value": f"{tag} question {i}?"},
                {"from": "gpt", "value": f"{i}."},
            ]
        }
        for i in range(n)
    ]


def datasets_cache_entry(cache, repo: str, splits: dict[str, list[dict]], sha: str, config: str = "default"):
    """What `datasets.load_dataset(repo)` leaves in its cache after an online load: Arrow files and their info,
    in a directory named after the commit that was read."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    name = repo.split("/")[1]
    folder = cache / repo.replace("/", "___") / config / "0.0.0" / sha
    folder.mkdir(parents=True)
    info = datasets.DatasetInfo(config_name=config, dataset_name=name, builder_name="parquet")
    info.splits = datasets.SplitDict(dataset_name=name)
    for split, rows in splits.items():
        table = datasets.Dataset.from_list(rows)
        with ArrowWriter(features=table.features, path=str(folder / f"{name}-{split}.arrow")) as writer:
            writer.write_table(table.data.table)
            examples, size = writer.finalize()
        info.features = table.features
        info.splits.add(datasets.SplitInfo(split, num_bytes=size, num_examples=examples, dataset_name=name))
    info.write_to_directory(str(folder))


def hub_cache_snapshot(cache, repo: str, files: dict[str, list[dict]], sha: str):
    """What `hf download --repo-type dataset repo` leaves in the hub cache: refs/main and a snapshot."""
    root = cache / f"datasets--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    for name, rows in files.items():
        path = root / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def hub_caches(tmp_path, monkeypatch):
    """Empty `datasets` and hub caches for this test; the hub itself is offline (HF_HUB_OFFLINE=1)."""
    import datasets.config
    from huggingface_hub import constants

    caches = tmp_path / "datasets-cache", tmp_path / "hub-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", caches[0])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(caches[1]))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return caches


def test_what_is_a_hub_id_and_what_stays_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_json(tmp_path / "data" / "train.json", [{"text": "x"}])
    assert hub_reference("org/name") is not None
    assert (hub_reference("org/name:test").repo, hub_reference("org/name:test").split) == ("org/name", "test")
    assert hub_reference("org/name:train[:10]").split == "train[:10]"
    for path in (
        "data",
        "data/train.json",
        "data/missing.json",
        "./org/name",
        "/abs/x",
        "~/x",
        "name",
        "a/b/c",
    ):
        assert hub_reference(path) is None, path


def test_a_local_directory_named_like_a_hub_id_wins(tmp_path, monkeypatch, hub_caches):
    monkeypatch.chdir(tmp_path)
    datasets_cache_entry(hub_caches[0], "org/name", {"train": sharegpt(3, "hub")}, DATASETS_SHA)
    (tmp_path / "org" / "name").mkdir(parents=True)
    write_json(tmp_path / "org" / "name" / "local.json", [{"text": "local text"}])
    raw = load_raw_dataset("org/name")
    assert raw.hub is None and raw.records == [{"text": "local text"}]


def test_a_prepared_datasets_cache_is_read_offline_and_its_revision_recorded(
    tmp_path, hub_caches, tiny_llama
):
    from lmflow_core import run

    splits = {"train": sharegpt(8, "train"), "test": sharegpt(3, "test")}
    datasets_cache_entry(hub_caches[0], "lmflow-tests/chat", splits, DATASETS_SHA)
    out = tmp_path / "out"
    run(
        model=str(tiny_llama),
        dataset="lmflow-tests/chat",
        eval_dataset="lmflow-tests/chat",  # no split named: its validation or test split
        template="chatml",
        output_dir=str(out),
        max_steps=1,
        save_steps=0,
    )
    data = json.loads((out / "lmflow_run.json").read_text())["result"]["data"]
    expected = {
        "repo": "lmflow-tests/chat",
        "config": "default",
        "revision": DATASETS_SHA,
        "from": "datasets cache",
    }
    assert data["train"]["hub"] | expected == data["train"]["hub"]
    assert (data["train"]["hub"]["split"], data["train"]["records"], data["train"]["formats"]) == (
        "train",
        8,
        {"sharegpt": 8},
    )
    assert (data["eval"]["hub"]["split"], data["eval"]["records"]) == ("test", 3)


def test_a_hub_cache_snapshot_is_read_offline(hub_caches, runner):
    rows = [{"messages": m["messages"]} for m in conversations(4)]
    hub_cache_snapshot(
        hub_caches[1],
        "lmflow-tests/qa",
        {"data/train.jsonl": rows, "data/test.jsonl": rows[:2]},
        SNAPSHOT_SHA,
    )
    raw = load_raw_dataset("lmflow-tests/qa:test")
    assert raw.hub["revision"] == SNAPSHOT_SHA and raw.hub["from"] == "hub cache" and len(raw) == 2
    assert raw.records[0]["messages"] == rows[0]["messages"]
    result = invoke(runner, "data", "check", "lmflow-tests/qa", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hub"]["split"] == "train"
    text = invoke(runner, "data", "check", "lmflow-tests/qa:test")
    assert (
        f"dataset: lmflow-tests/qa:test (conversation, hub dataset lmflow-tests/qa (config default, split test, "
        f"revision {SNAPSHOT_SHA}, from the hub cache))" in text.output
    )
    pinned = load_raw_dataset("lmflow-tests/qa", dataset_revision=SNAPSHOT_SHA)
    assert pinned.hub["revision"] == SNAPSHOT_SHA
    with pytest.raises(
        DataError, match=f"lmflow-tests/qa at revision {'0' * 40} is neither a local path nor"
    ):
        load_raw_dataset("lmflow-tests/qa", dataset_revision="0" * 40)


def test_rows_are_validated_with_the_dataset_split_and_row_named(hub_caches):
    rows = sharegpt(3, "ok") + [{"conversations": [{"from": "robot", "value": "x"}]}]
    datasets_cache_entry(hub_caches[0], "lmflow-tests/bad", {"train": rows}, DATASETS_SHA)
    with pytest.raises(DataError, match=r"lmflow-tests/bad\[train\]#3: turn 0 is from 'robot'"):
        load_raw_dataset("lmflow-tests/bad")
    assert len(load_raw_dataset("lmflow-tests/bad", max_samples=3)) == 3


@pytest.mark.parametrize(
    "spec, options, message",
    [
        ("lmflow-tests/chat:dev", {}, 'lmflow-tests/chat:dev: Unknown split "dev". Should be one of'),
        (
            "lmflow-tests/chat",
            {"dataset_config": "other"},
            "Couldn't find cache for lmflow-tests/chat for config",
        ),
        (
            "lmflow-tests/absent",
            {},
            "dataset lmflow-tests/absent is neither a local path nor in this machine's",
        ),
    ],
)
def test_problems_with_a_hub_dataset_are_one_line_errors(hub_caches, spec, options, message):
    datasets_cache_entry(hub_caches[0], "lmflow-tests/chat", {"train": sharegpt(2, "x")}, DATASETS_SHA)
    with pytest.raises(DataError, match=message):
        load_raw_dataset(spec, **options)


def test_several_splits_and_none_named_for_training_asks_which(hub_caches):
    splits = {"first": sharegpt(2, "a"), "second": sharegpt(2, "b")}
    datasets_cache_entry(hub_caches[0], "lmflow-tests/two", splits, DATASETS_SHA)
    with pytest.raises(
        DataError, match=r"has the splits first, second; which one .* --dataset lmflow-tests/two:first"
    ):
        load_raw_dataset("lmflow-tests/two")


def test_an_unreachable_hub_fails_within_seconds_without_retries(hub_caches, monkeypatch, runner):
    import datasets.config
    from huggingface_hub import constants

    # Online mode, but the hub's address refuses connections (port 9: nothing listens there).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    started = time.monotonic()
    result = invoke(runner, "data", "check", "lmflow-tests/not-downloaded")
    assert time.monotonic() - started < 10
    assert_one_line_error(
        result,
        "dataset lmflow-tests/not-downloaded is neither a local path nor in this machine's Hugging Face cache, "
        "and the hub cannot be reached",
        "hf download --repo-type dataset lmflow-tests/not-downloaded",
    )
    # What was downloaded before is still read.
    datasets_cache_entry(hub_caches[0], "lmflow-tests/chat", {"train": sharegpt(2, "x")}, DATASETS_SHA)
    started = time.monotonic()
    assert len(load_raw_dataset("lmflow-tests/chat")) == 2
    assert time.monotonic() - started < 10


def test_evaluate_scores_a_hub_datasets_test_split(hub_caches, chat_model, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": m["messages"]} for m in conversations(6)]
    hub_cache_snapshot(
        hub_caches[1],
        "lmflow-tests/qa",
        {"data/train.jsonl": rows, "data/test.jsonl": rows[:3]},
        SNAPSHOT_SHA,
    )
    write_json(tmp_path / "local.json", rows[:3])
    result = invoke(runner, "evaluate", chat_model, "--dataset", "lmflow-tests/qa")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval-qa.json").read_text())
    assert (report["hub"]["split"], report["hub"]["revision"], report["records"]) == ("test", SNAPSHOT_SHA, 3)
    local = invoke(runner, "evaluate", chat_model, "--dataset", "local.json")
    assert local.exit_code == 0, local.output
    same = json.loads((tmp_path / "eval-local.json").read_text())["metrics"]
    assert same["nll_per_sample"] == pytest.approx(report["metrics"]["nll_per_sample"], rel=1e-6)


def test_a_typo_beside_a_local_directory_stays_a_path_and_hf_prefix_forces_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_json(tmp_path / "data" / "train.json", [{"text": "x"}])
    assert hub_reference("data/tarin") is None
    with pytest.raises(DataError, match="dataset data/tarin does not exist"):
        load_raw_dataset("data/tarin")
    assert hub_reference("hf://datasets/data/tarin:test") == HubReference("data/tarin", "test")
    with pytest.raises(DataError, match="hf://datasets/x does not name a hub dataset"):
        hub_reference("hf://datasets/x")


def test_evaluation_never_reads_a_train_only_dataset_unasked(hub_caches):
    datasets_cache_entry(hub_caches[0], "lmflow-tests/one", {"train": sharegpt(2, "x")}, DATASETS_SHA)
    with pytest.raises(DataError, match=r"has only a train split.*--eval-dataset lmflow-tests/one:train"):
        load_raw_dataset("lmflow-tests/one", purpose="eval")
    assert load_raw_dataset("lmflow-tests/one:train", purpose="eval").hub["split"] == "train"


def test_a_cached_copy_that_cannot_be_read_says_so(hub_caches):
    hub_cache_snapshot(hub_caches[1], "lmflow-tests/broken", {"train.jsonl": []}, SNAPSHOT_SHA)
    snapshot = hub_caches[1] / "datasets--lmflow-tests--broken" / "snapshots" / SNAPSHOT_SHA / "train.jsonl"
    snapshot.write_text('{"messages": [oops\n')
    with pytest.raises(
        DataError, match=r"the copy of lmflow-tests/broken in the hub cache .* could not be read"
    ):
        load_raw_dataset("lmflow-tests/broken")


def test_branches_tags_and_short_commits_are_checked_offline(hub_caches):
    datasets_cache_entry(hub_caches[0], "lmflow-tests/chat", {"train": sharegpt(2, "x")}, DATASETS_SHA)
    refs = hub_caches[1] / "datasets--lmflow-tests--chat" / "refs"
    refs.mkdir(parents=True)
    (refs / "v2").write_text(DATASETS_SHA)
    (refs / "v1").write_text(SNAPSHOT_SHA)
    assert load_raw_dataset("lmflow-tests/chat", dataset_revision="v2").hub["revision"] == DATASETS_SHA
    assert (
        load_raw_dataset("lmflow-tests/chat", dataset_revision=DATASETS_SHA[:8]).hub["revision"]
        == DATASETS_SHA
    )
    for other in ("v1", "v3", SNAPSHOT_SHA[:8]):  # another commit, an unknown tag, another commit's start
        with pytest.raises(DataError, match=f"lmflow-tests/chat at revision {other} is neither a local path"):
            load_raw_dataset("lmflow-tests/chat", dataset_revision=other)


def test_hf_datasets_offline_alone_counts_as_offline(monkeypatch):
    from huggingface_hub import constants

    from lmflow_core import hub_offline_requested

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not hub_offline_requested()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_offline_requested()
