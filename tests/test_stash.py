"""The per-run store plugins keep their state in (``config.stash``)."""

from __future__ import annotations

import pytest

from lmflow_core import RunConfig, Stash, StashKey
from lmflow_core.config import core_fields


def test_keys_are_distinct_and_values_typed_by_key():
    first, second = StashKey[int](), StashKey[str]()
    stash = Stash()
    stash[first] = 1
    assert stash[first] == 1 and first in stash and second not in stash
    assert stash.get(second, "none") == "none" and stash.setdefault(second, "x") == "x"
    assert stash.setdefault(second, "y") == "x" and len(stash) == 2
    del stash[first]
    with pytest.raises(KeyError):
        stash[first]


def test_each_run_config_has_its_own_stash_and_it_is_not_a_setting():
    key = StashKey[list]()
    a, b = RunConfig(), RunConfig()
    a.stash[key] = [1]
    assert key not in b.stash
    assert "stash" not in a.to_dict() and "stash" not in {f.name for f in core_fields()}
    assert a == b  # the stash takes no part in comparing settings


def test_lisa_keeps_its_state_in_the_runs_stash(tiny_llama, chat_data, tmp_path):
    from lmflow_plugins import lisa

    from lmflow_core.train import configure, execute

    config, plugins = configure(
        model=str(tiny_llama),
        dataset=str(chat_data),
        template="chatml",
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        batch_size=4,
        save_steps=0,
        plugins=["lisa"],
        lisa={"activated_layers": 1, "interval_steps": 1},
    )
    execute(config, plugins)
    state = config.stash[lisa.LISA]
    assert state.count == 1 and lisa.active_layers(config) == list(state.active)
    assert lisa.active_layers(RunConfig()) is None  # another run sees nothing of it
    assert not hasattr(lisa, "_RUNS")
