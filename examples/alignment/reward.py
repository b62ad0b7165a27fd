"""A rule-based reward for the demo's questions: 1 for the demo's correct answer, else the share of its words.

    lmflow raft --model sft --prompts alignment-data/prompts.jsonl --reward examples/alignment/reward.py:reward

The answers are those of the bundled demo's data (train and eval), so the reward knows every question the
prompts file asks.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmflow_core import demo_dataset


def _known_answers() -> dict[str, str]:
    known = {}
    for split in ("train", "eval"):
        for record in json.loads(Path(demo_dataset(split)).read_text(encoding="utf-8"))["instances"]:
            messages = record["messages"]
            for question, answer in zip(messages[::2], messages[1::2]):
                known[question["content"]] = answer["content"]
    return known


KNOWN = _known_answers()


def reward(prompts: list[list[dict]], answers: list[str]) -> list[float]:
    """One score in [0, 1] per (prompt, answer): the exact answer scores 1, others the share of its words.

    ``prompts[i]`` is the conversation answered (messages ending with the user's question).
    """
    scores = []
    for messages, answer in zip(prompts, answers):
        expected = KNOWN.get(messages[-1]["content"])
        if expected is None:
            scores.append(0.0)
            continue
        if answer.strip() == expected:
            scores.append(1.0)
            continue
        words, given = expected.split(), set(answer.split())
        scores.append(0.9 * sum(word in given for word in words) / len(words))
    return scores
