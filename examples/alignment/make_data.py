"""Preference pairs and RAFT prompts from the bundled demo's conversations, for the alignment walkthrough.

    python examples/alignment/make_data.py alignment-data

writes ``pairs.jsonl`` (training pairs), ``pairs_eval.jsonl`` and ``prompts.jsonl`` (questions without answers)
into the directory given. Each pair's chosen answer is the demo's correct answer; the rejected one is the answer
to another question, half of the time one of the same kind ("What is the capital of Italy?" -> "The capital of
Austria is Vienna."): wrong but fluent, which is what a reward model and DPO must learn to tell apart. The
evaluation pairs and the prompts ask 48 questions that no training pair asks. ``reward.py`` beside this file
is the rule-based reward RAFT can use with the same data.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

from lmflow_core import demo_dataset


def single_turns(split: str) -> list[tuple[str, str]]:
    """The demo's one-question conversations as (question, answer)."""
    records = json.loads(Path(demo_dataset(split)).read_text(encoding="utf-8"))["instances"]
    return [
        (r["messages"][0]["content"], r["messages"][1]["content"])
        for r in records
        if len(r["messages"]) == 2 and not r.get("system")
    ]


def kind(question: str) -> str:
    """Questions of one kind differ only in their numbers and their last word ("What is the capital of X?")."""
    words = re.sub(r"\d+", "#", question).split()
    return " ".join(words[:-1])


def pairs(turns: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    answers = defaultdict(set)
    for question, answer in turns:
        answers[kind(question)].add(answer)
    everything = sorted({answer for _, answer in turns})
    out = []
    for question, answer in turns:
        wrong = sorted(answers[kind(question)] - {answer})
        if rng.random() < 0.5 or not wrong:  # half the time an answer to another kind of question
            wrong = [other for other in everything if other not in answers[kind(question)]]
        if wrong:
            out.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": answer,
                    "rejected": rng.choice(wrong),
                }
            )
    return out


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    turns = single_turns("train") + single_turns("eval")
    everything = pairs(turns, rng)
    rng.shuffle(everything)
    evaluation = everything[:48]  # questions held out of training
    held_out = {p["prompt"][0]["content"] for p in evaluation}
    files = {
        "pairs.jsonl": [p for p in everything if p["prompt"][0]["content"] not in held_out],
        "pairs_eval.jsonl": evaluation,
        "prompts.jsonl": [{"prompt": q} for q in sorted(held_out)],
    }
    for name, records in files.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        print(f"{out / name}: {len(records)} records")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/alignment/make_data.py OUT_DIR")
    main(sys.argv[1])
