"""Check and benchmark: llama.cpp on files written by `lmflow export gguf`, against `lmflow generate`.

Not part of the tests: llama.cpp comes from llama-cpp-python, which is built from source (minutes of C++
compilation), in a separate virtual environment so that the project's stays as it is:

    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python
    lmflow run --output-dir demo                  # or any model lmflow trained
    python bench/bench_llamacpp.py demo --llama-python /tmp/llamacpp/bin/python

The model is exported here (f32, f16, q8_0, q4_0 into a temporary directory). For each of the demo's sample
prompts, lmflow renders the chat prompt and tokenizes it exactly as `lmflow generate` does; llama.cpp is fed the
same token ids, and its greedy tokens are compared with lmflow's: the reply (up to the end-of-turn token, as
`lmflow generate` returns it) and a fixed run of `--new-tokens` tokens that does not stop at the end of turn.
llama.cpp's own tokenizer is asked for the ids of the same prompt text. Decoding speed is new tokens per second
of one greedy generation of `--new-tokens` tokens (prompt included, median of `--repeats`), on `--threads` CPU
threads on both sides: lmflow through transformers' `generate` (what the default `decode` hook calls) on the
f32 model, llama.cpp on each file. Each file runs in its own llama.cpp process, so a file llama.cpp refuses is
reported and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
PROMPTS = ("What is the opposite of hot?", "How do you spell tree?", "What is the capital of Italy?")

# Runs under the llama-cpp-python interpreter: reads a JSON job on stdin, prints one JSON line.
LLAMA_WORKER = r"""
import json, sys, time
job = json.load(sys.stdin)
import llama_cpp
out = {"version": llama_cpp.__version__}
try:
    llm = llama_cpp.Llama(model_path=job["path"], n_ctx=512, n_threads=job["threads"],
                          n_threads_batch=job["threads"], verbose=False)
except Exception as error:
    out["load_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(out))
    sys.exit(0)
out["metadata"] = {k: (v if len(v) <= 120 else v[:120] + "...") for k, v in llm.metadata.items()}
out["chat_template"] = llm.metadata.get("tokenizer.chat_template")
out["n_vocab"], out["bos"], out["eos"] = llm.n_vocab(), llm.token_bos(), llm.token_eos()

def greedy(ids, n):
    llm.reset()  # no prefix reuse: every run evaluates the whole prompt
    new = []
    start = time.perf_counter()
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        new.append(int(token))
        if len(new) == n:
            break
    return new, time.perf_counter() - start

rows = []
for prompt in job["prompts"]:
    greedy(prompt["ids"], 4)  # warm-up
    runs = [greedy(prompt["ids"], job["new_tokens"]) for _ in range(job["repeats"])]
    ids = runs[0][0]
    rows.append({
        "ids": ids,
        "same_each_repeat": all(r[0] == ids for r in runs),
        "seconds": [r[1] for r in runs],
        "text": llm.detokenize(ids).decode("utf-8", errors="replace"),
        "tokenize": llm.tokenize(prompt["text"].encode(), add_bos=False, special=True),
        "tokenize_add_bos": llm.tokenize(prompt["text"].encode(), add_bos=True, special=True),
    })
out["prompts"] = rows
print(json.dumps(out))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model directory lmflow trained (e.g. the demo's output)")
    p.add_argument(
        "--llama-python", required=True, help="a Python interpreter with llama-cpp-python installed"
    )
    p.add_argument("--outtypes", nargs="+", default=list(OUTTYPES), choices=OUTTYPES)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="where the GGUF files go (default: a temporary directory)")
    p.add_argument("--output", default=str(HERE / "results" / "llamacpp-cpu.json"))
    return p.parse_args(argv)


def lmflow_side(model: str, new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """Prompt ids, replies and fixed-length greedy ids from lmflow, and its decoding time."""
    import torch

    from lmflow_core.generate import GenerationOptions, chat_prompt, reply_prompt_ids
    from lmflow_core.inference import open_session
    from lmflow_core.templates import Conversation

    torch.set_num_threads(threads)
    session = open_session(model, device="cpu", dtype="float32")
    hook, template, tokenizer = session.plugins.hook, session.template, session.tokenizer
    model_ = session.model

    def fixed(ids: list[int]) -> tuple[list[int], float]:
        # Greedy, as the default decode hook calls generate, but not stopping at the end of turn.
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        with torch.no_grad():
            output = model_.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                temperature=None,
                top_k=None,
                top_p=None,
                eos_token_id=None,
                pad_token_id=tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
        return output[0, len(ids) :].tolist(), seconds

    def margin(ids: list[int]) -> float:
        """How far lmflow's top next-token logit after ``ids`` is ahead of the second."""
        with torch.no_grad():
            top = model_(torch.tensor([ids])).logits[0, -1].float().topk(2).values
        return float(top[0] - top[1])

    rows = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        conversation = Conversation.from_messages(messages)
        prompt = chat_prompt(hook, template, conversation, tokenizer, session.config)
        ids = reply_prompt_ids(hook, template, conversation, tokenizer, session.config)
        reply = session.chat(messages, GenerationOptions(greedy=True, max_new_tokens=new_tokens))
        fixed(ids[:4])  # warm-up
        runs = [fixed(ids) for _ in range(repeats)]
        rows.append(
            {
                "prompt": text,
                "prompt_text": prompt,
                "prompt_ids": ids,
                "reply": reply.text,
                "reply_ids": reply.token_ids,
                "ids": runs[0][0],
                "seconds": [r[1] for r in runs],
            }
        )
    return {
        "template": session.template_name,
        "eos_id": tokenizer.eos_token_id,
        "parameters": sum(p.numel() for p in model_.parameters()),
        "prompts": rows,
        "margin": margin,
    }


def export_all(model: str, workdir: Path, outtypes: list[str]) -> dict[str, dict[str, Any]]:
    from lmflow_plugins.gguf import export_gguf

    files = {}
    for outtype in outtypes:
        path = workdir / f"model-{outtype}.gguf"
        start = time.perf_counter()
        report = export_gguf(model, str(path), outtype=outtype, overwrite=True)
        files[outtype] = {
            "path": str(path),
            "bytes": report.bytes,
            "types": report.types,
            "export_s": time.perf_counter() - start,
        }
    return files


def llama_side(python: str, path: str, lm: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    job = {
        "path": path,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "prompts": [{"ids": p["prompt_ids"], "text": p["prompt_text"]} for p in lm["prompts"]],
    }
    result = subprocess.run(
        [python, "-c", LLAMA_WORKER],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {
            "load_error": f"llama.cpp process exited {result.returncode}: {result.stderr.strip()[-2000:]}"
        }
    return json.loads(lines[-1])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokens_per_s(seconds: list[list[float]], new_tokens: int) -> float:
    return new_tokens / statistics.median(s for runs in seconds for s in runs)


def compare(lm: dict[str, Any], llama: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    rows = []
    for mine, theirs in zip(lm["prompts"], llama["prompts"]):
        reply = mine["reply_ids"]
        rows.append(
            {
                "prompt": mine["prompt"],
                "llama_ids": theirs["ids"],
                "reply_equal": theirs["ids"][: len(reply)] == reply,
                "common_prefix": common_prefix(mine["ids"], theirs["ids"]),
                "all_equal": mine["ids"] == theirs["ids"],
                "tokenizer_equal": theirs["tokenize"] == mine["prompt_ids"],
                "tokenizer_add_bos_equal": theirs["tokenize_add_bos"] == mine["prompt_ids"],
                "llama_tokenize": theirs["tokenize"],
                "llama_text": theirs["text"],
                "same_each_repeat": theirs["same_each_repeat"],
            }
        )
    for mine, row in zip(lm["prompts"], rows):
        if not row["all_equal"]:
            # lmflow's logit margin where the two first differ: a near tie can go either way.
            row["margin_at_divergence"] = lm["margin"](
                mine["prompt_ids"] + mine["ids"][: row["common_prefix"]]
            )
    return {
        "replies_equal": sum(r["reply_equal"] for r in rows),
        "runs_equal": sum(r["all_equal"] for r in rows),
        "mean_common_prefix": statistics.mean(r["common_prefix"] for r in rows),
        "tokenizer_equal": sum(r["tokenizer_equal"] for r in rows),
        "tokens_per_s": tokens_per_s([p["seconds"] for p in llama["prompts"]], new_tokens),
        "margins_at_divergence": [r["margin_at_divergence"] for r in rows if "margin_at_divergence" in r],
        "prompts": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    version = subprocess.run(
        [args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lm = lmflow_side(args.model, args.new_tokens, args.repeats, args.threads)
    lm_speed = tokens_per_s([p["seconds"] for p in lm["prompts"]], args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        files = export_all(args.model, workdir, args.outtypes)
        results: dict[str, Any] = {}
        for outtype, file in files.items():
            llama = llama_side(args.llama_python, file["path"], lm, args)
            entry: dict[str, Any] = {"bytes": file["bytes"], "types": file["types"]}
            if "load_error" in llama:
                entry.update(loaded=False, error=llama["load_error"])
            else:
                entry.update(loaded=True, **compare(lm, llama, args.new_tokens))
                entry["metadata"] = llama["metadata"]
                template = Path(args.model) / "chat_template.jinja"
                if template.exists():
                    entry["chat_template_equal"] = llama["chat_template"] == template.read_text(
                        encoding="utf-8"
                    )
            results[outtype] = entry

    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "llama_cpp_python": version,
        "model": str(args.model),
        "parameters": lm["parameters"],
        "template": lm["template"],
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "lmflow": {
            "tokens_per_s": lm_speed,
            "prompts": [
                {k: v for k, v in p.items() if k != "seconds"} | {"seconds": p["seconds"]}
                for p in lm["prompts"]
            ],
        },
        "llamacpp": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    n = len(PROMPTS)
    print(
        f"llama-cpp-python {version}, {args.threads} threads, {args.new_tokens} new tokens, median of {args.repeats}"
    )
    print(
        f"{'':8} {'loads':>5} {'replies equal':>13} {'64-token runs equal':>19} {'tokenizer':>9} {'tok/s':>7} {'vs lmflow':>9}"
    )
    print(f"{'lmflow':8} {'':>5} {'':>13} {'':>19} {'':>9} {lm_speed:7.1f} {1.0:8.2f}x")
    for outtype, entry in results.items():
        if not entry["loaded"]:
            print(f"{outtype:8} {'no':>5}  {entry['error']}")
            continue
        print(
            f"{outtype:8} {'yes':>5} {entry['replies_equal']:>9}/{n:<3} {entry['runs_equal']:>15}/{n:<3}"
            f" {entry['tokenizer_equal']:>7}/{n} {entry['tokens_per_s']:7.1f} {entry['tokens_per_s'] / lm_speed:8.2f}x"
        )
    for outtype, entry in results.items():
        if entry.get("margins_at_divergence"):
            margins = ", ".join(f"{m:.4f}" for m in entry["margins_at_divergence"])
            print(f"{outtype}: lmflow's top-2 logit margin where a 64-token run first differs: {margins}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
