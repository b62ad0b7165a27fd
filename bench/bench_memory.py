"""Training memory and step time: plain transformers against ``chunked_ce``, on a model whose vocabulary is
large next to its body (the shape where the logits dominate a training step's memory).

    python bench/bench_memory.py                  # CPU: Qwen2 shape, vocab 151,936, hidden 256, 2 layers
    python bench/bench_memory.py --blocks 1024    # one block size only

Peak memory comes from fresh processes, one per variant and block size: each builds the model (seeded random
weights), takes ``--steps`` AdamW steps on one random batch and reports its peak resident memory
(``getrusage`` ``ru_maxrss``), and the peak before the first step (model built, nothing trained) as the
baseline. Step time comes from one process that alternates the variants step by step on copies of the same
model, so both see the same machine state; the first step of each is a warm-up and the median of the others is
reported. The loss of the first step is compared too (it must be equal). Writes ``bench/results/memory-cpu.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory-cpu.json"
SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("qwen2", **SHAPE), attn_implementation="sdpa"
    )
    return model.train()


def chunked(model, chunk_size: int):
    from lmflow_plugins.chunked_ce import ChunkedState, install

    install(model, ChunkedState(chunk_size))
    return model


def make_batch(block: int, batch: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, block), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def train_step(model, optimizer, inputs) -> float:
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def child_memory(variant: str, block: int, batch: int, steps: int) -> dict:
    """One variant in this fresh process: peak memory before and after ``steps`` training steps."""
    import torch

    model = build_model()
    if variant != "plain":
        model = chunked(model, int(variant.split("-")[1]))
    inputs = make_batch(block, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    baseline = peak_mib()
    losses = [train_step(model, optimizer, inputs) for _ in range(steps)]
    return {"baseline_mib": round(baseline), "peak_mib": round(peak_mib()), "losses": losses}


def child_timing(variants: list[str], block: int, batch: int, steps: int) -> dict:
    """All variants in this one process, step by step in turn: median seconds per step after a warm-up."""
    import torch

    base = build_model()
    models = {
        v: base if v == "plain" else chunked(copy.deepcopy(base), int(v.split("-")[1])) for v in variants
    }
    optimizers = {v: torch.optim.AdamW(m.parameters(), lr=1e-4) for v, m in models.items()}
    inputs = make_batch(block, batch)
    times: dict[str, list[float]] = {v: [] for v in variants}
    first_loss: dict[str, float] = {}
    for _ in range(steps + 1):
        for variant in variants:
            started = time.perf_counter()
            loss = train_step(models[variant], optimizers[variant], inputs)
            times[variant].append(time.perf_counter() - started)
            first_loss.setdefault(variant, loss)
    return {
        v: {"step_s": round(statistics.median(t[1:]), 3), "first_loss": first_loss[v]}
        for v, t in times.items()
    }


def run_child(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="1024,2048", help="Comma-separated block sizes.")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunk-sizes", default="256,1024", help="chunked_ce chunk sizes to measure.")
    parser.add_argument("--steps", type=int, default=2, help="Training steps per memory process.")
    parser.add_argument(
        "--timing-steps", type=int, default=2, help="Timed steps per variant after a warm-up."
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "memory":
            variant, block, batch, steps = rest
            print(json.dumps(child_memory(variant, int(block), int(batch), int(steps))))
        else:
            variants, block, batch, steps = rest
            print(json.dumps(child_timing(variants.split(","), int(block), int(batch), int(steps))))
        return

    variants = ["plain"] + [f"chunked-{size}" for size in args.chunk_sizes.split(",")]
    rows = []
    started = time.monotonic()
    for block in [int(b) for b in args.blocks.split(",")]:
        memory = {v: run_child("memory", v, str(block), str(args.batch), str(args.steps)) for v in variants}
        timing = run_child("timing", ",".join(variants), str(block), str(args.batch), str(args.timing_steps))
        plain = memory["plain"]
        for variant in variants:
            mem, tim = memory[variant], timing[variant]
            training = mem["peak_mib"] - mem["baseline_mib"]
            plain_training = plain["peak_mib"] - plain["baseline_mib"]
            rows.append(
                {
                    "block": block,
                    "batch": args.batch,
                    "variant": variant,
                    "baseline_mib": mem["baseline_mib"],
                    "peak_mib": mem["peak_mib"],
                    "training_mib": training,
                    "peak_ratio": round(mem["peak_mib"] / plain["peak_mib"], 3),
                    "training_ratio": round(training / plain_training, 3),
                    "step_s": tim["step_s"],
                    "time_ratio": round(tim["step_s"] / timing["plain"]["step_s"], 3),
                    "first_loss": tim["first_loss"],
                    "loss_rel_diff": abs(tim["first_loss"] - timing["plain"]["first_loss"])
                    / abs(timing["plain"]["first_loss"]),
                    "memory_losses_equal": mem["losses"] == plain["losses"]
                    or all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(mem["losses"], plain["losses"])),
                }
            )
    import torch
    import transformers

    report = {
        "model": {"type": "qwen2", **SHAPE},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "steps_per_memory_process": args.steps,
        "timed_steps": args.timing_steps,
        "seconds": round(time.monotonic() - started),
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"\nwritten {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}")


def table(rows: list[dict]) -> str:
    lines = [
        "| block x batch | variant | peak MiB (ratio) | training MiB (ratio) | step s (ratio) | loss rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['block']} x {r['batch']} | {r['variant']} | {r['peak_mib']:,} ({r['peak_ratio']:.2f}x) | "
            f"{r['training_mib']:,} ({r['training_ratio']:.2f}x) | {r['step_s']:.2f} ({r['time_ratio']:.2f}x) | "
            f"{r['loss_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
