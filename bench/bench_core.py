"""Benchmark: `lmflow run` against the plain transformers Trainer, same model, data and settings.

Speed is measured in one child process that trains both sides alternately for ``--repeats`` rounds (order
flipped every round): both see the same machine state, so the ratio shows the code's own overhead rather than
the drift of a shared machine between processes. Peak memory is measured with each side in a fresh child
process of its own. Ratios are medians of the per-round lmflow/plain ratios.

* tokens/s: trained tokens per step divided by the step time, over the steps after ``--warmup-steps``; with
  the median step time, and with the 10th-percentile step time (the least disturbed steps: on a shared machine
  whole phases of a run can be slowed down by other work, which the low percentile sees through);
* peak memory: on GPU the peak of ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size of the
  process during training minus its size just before training started (the libraries imported by each side
  differ slightly, training memory should not).

Usage::

    python bench/bench_core.py                 # CPU-sized defaults, about 3 minutes on 2 cores
    python bench/bench_core.py --hidden 1024 --layers 12 --block-size 1024 --batch-size 8 --steps 40  # GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--out",
        type=Path,
        help="Where to write the JSON results (default: bench/results/core-<device>.json).",
    )
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--child", choices=["plain", "lmflow", "speed"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- setup (parent) -----------------------------------------------------------------------------------------


def llama_config(hidden: int, layers: int, block_size: int, tie: bool, vocab_size: int | None = None):
    """The benchmarks' Llama shape, with the demo tokenizer's vocabulary and special tokens."""
    from transformers import AutoTokenizer, LlamaConfig

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    return LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=max(512, block_size),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie,
    )


def save_model(config, directory: Path) -> None:
    """A model of ``config`` with seeded random weights and the demo tokenizer, saved to ``directory``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lmflow_core.demo import demo_model_dir

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(demo_model_dir()).save_pretrained(directory)


def prepare(args: argparse.Namespace, workdir: Path) -> None:
    """Save one seeded model and one text dataset that both sides train on."""
    from lmflow_core.demo import demo_dataset

    save_model(llama_config(args.hidden, args.layers, args.block_size, tie=True), workdir / "model")
    conversations = json.loads(demo_dataset("train").read_text())["instances"]
    texts = [" ".join(m["content"] for m in c["messages"]) for c in conversations]
    (workdir / "data.json").write_text(
        json.dumps({"type": "text_only", "instances": [{"text": t} for t in texts * 4]})
    )


# ---- measurement (children) ---------------------------------------------------------------------------------


class Meter:
    """Steady-state tokens/s and training peak memory; shared by both sides."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.step_times: list[float] = []
        self.step_tokens: list[int] = []
        self.last_time = 0.0
        self.last_tokens = 0
        self.base_rss = 0
        self.peak_rss = 0
        self._stop = threading.Event()

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                meter.base_rss = _rss()
                meter.peak_rss = meter.base_rss
                threading.Thread(target=meter._sample, daemon=True).start()
                _reset_cuda_peak()

            def on_step_end(self, args, state, control, **kwargs):
                _sync_cuda()
                now, tokens = time.perf_counter(), state.num_input_tokens_seen
                if state.global_step > meter.warmup:
                    meter.step_times.append(now - meter.last_time)
                    meter.step_tokens.append(tokens - meter.last_tokens)
                meter.last_time, meter.last_tokens = now, tokens

            def on_train_end(self, args, state, control, **kwargs):
                meter._stop.set()

        return _Callback()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_rss = max(self.peak_rss, _rss())

    def result(self) -> dict:
        import torch

        peak = (
            torch.cuda.max_memory_allocated()
            if torch.cuda.is_available()
            else max(self.peak_rss, _rss()) - self.base_rss
        )
        tokens = statistics.median(self.step_tokens)
        p10 = statistics.quantiles(self.step_times, n=10)[0]
        return {
            "tokens_per_s": tokens / statistics.median(self.step_times),
            "tokens_per_s_p10": tokens / p10,
            "mean_tokens_per_s": sum(self.step_tokens) / sum(self.step_times),
            "peak_bytes": peak,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        }


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _reset_cuda_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _sync_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def common_settings(args: argparse.Namespace) -> dict:
    return {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "linear",
        "seed": 42,
        "bf16": args.bf16,
    }


def run_plain(args: argparse.Namespace, meter: Meter) -> None:
    """What a user would write with transformers alone (run_clm style: tokenize, group, Trainer)."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    model_dir = args.workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    raw = load_dataset("json", data_files=str(args.workdir / "data.json"), field="instances")["train"]
    block = args.block_size

    def tokenize(batch):
        return {
            "input_ids": [ids + [tokenizer.eos_token_id] for ids in tokenizer(batch["text"])["input_ids"]]
        }

    def group(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        return {"input_ids": [flat[i : i + block] for i in range(0, len(flat), block)]}

    data = raw.map(tokenize, batched=True, remove_columns=["text"]).map(group, batched=True)
    settings = common_settings(args)
    training_args = TrainingArguments(
        output_dir=str(args.workdir / "plain-out"),
        max_steps=settings["max_steps"],
        per_device_train_batch_size=settings["per_device_train_batch_size"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type=settings["lr_scheduler_type"],
        seed=settings["seed"],
        data_seed=settings["seed"],
        bf16=settings["bf16"],
        save_strategy="no",
        report_to=[],
        logging_steps=10,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[meter.callback()],
    )
    trainer.train()


def run_lmflow(args: argparse.Namespace, meter: Meter) -> None:
    from lmflow_core import hookimpl, run

    class MeterPlugin:
        @hookimpl
        def trainer_callbacks(self):
            return [meter.callback()]

    settings = common_settings(args)
    run(
        model=str(args.workdir / "model"),
        dataset=str(args.workdir / "data.json"),
        block_size=args.block_size,
        output_dir=str(args.workdir / "lmflow-out"),
        overwrite=True,
        max_steps=settings["max_steps"],
        batch_size=settings["per_device_train_batch_size"],
        learning_rate=settings["learning_rate"],
        lr_scheduler=settings["lr_scheduler_type"],
        seed=settings["seed"],
        bf16=settings["bf16"],
        save_steps=None,
        logging_steps=10,
        extra_plugins={"meter": MeterPlugin()},
    )


def train_side(args: argparse.Namespace, side: str) -> dict:
    meter = Meter(args.warmup_steps)
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            (run_plain if side == "plain" else run_lmflow)(args, meter)
        finally:
            sys.stdout = stdout
    return meter.result()


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child != "speed":
        print(json.dumps(train_side(args, args.child)))
        return
    print(json.dumps(alternating(args.repeats, lambda side: train_side(args, side))))


def alternating(rounds: int, measure) -> dict[str, list[dict]]:
    """``measure(side)`` for both sides, ``rounds`` times, the order flipped every round."""
    runs: dict[str, list[dict]] = {"plain": [], "lmflow": []}
    for round_ in range(rounds):
        for side in ("plain", "lmflow") if round_ % 2 == 0 else ("lmflow", "plain"):
            runs[side].append(measure(side))
    return runs


# ---- driver -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="lmflow-bench-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMFLOW_CACHE": str(workdir / "cache")}
        prepare(args, workdir)
        runs = _child(workdir, env, args, "speed")
        memory = alternating(args.memory_repeats, lambda side: _child(workdir, env, args, side))
    report(args, runs, memory)


def _child(workdir: Path, env: dict, args: argparse.Namespace, what: str) -> dict:
    return run_child(__file__, workdir, env, what, forwarded(args, CHILD_ARGUMENTS))


CHILD_ARGUMENTS = ("hidden", "layers", "block_size", "batch_size", "steps", "warmup_steps", "repeats")


def run_child(script: str, workdir: Path, env: dict, what: str, arguments: list[str]) -> dict:
    """Run ``script --child what`` in a fresh process; returns the JSON it prints last (exits on failure)."""
    command = [sys.executable, script, "--child", what, "--workdir", str(workdir), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{what} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace, names: tuple[str, ...]) -> list[str]:
    """The command-line arguments that give a child process the same settings."""
    out = []
    for name in names:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + (["--bf16"] if args.bf16 else [])


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def report(args: argparse.Namespace, runs: dict[str, list[dict]], memory: dict[str, list[dict]]) -> None:
    def summarise(data: dict[str, list[dict]], keys: tuple[str, ...]) -> tuple[dict, dict]:
        median = {
            side: {k: statistics.median(r[k] for r in rows) for k in keys} for side, rows in data.items()
        }
        ratios = {k: [b[k] / max(a[k], 1) for a, b in zip(data["plain"], data["lmflow"])] for k in keys}
        ratio: dict = {k: statistics.median(v) for k, v in ratios.items()}
        for k, v in ratios.items():  # the spread of the per-round ratios: how far to trust the median
            q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0], v[0], v[0]]
            ratio[f"{k}_iqr"] = (q[0], q[2])
        return median, ratio

    median, ratio = summarise(runs, ("tokens_per_s", "tokens_per_s_p10"))
    mem_median, mem_ratio = summarise(memory, ("peak_bytes",))
    for side in median:
        median[side].update(mem_median[side])
    ratio.update(mem_ratio)
    device = runs["plain"][0]["device"]
    mib = 1024 * 1024
    lines = [
        f"core overhead: model hidden {args.hidden} x {args.layers} layers, block {args.block_size}, batch "
        f"{args.batch_size}, {args.steps} steps ({args.warmup_steps} warm-up), {'bf16' if args.bf16 else 'fp32'}, "
        f"{device}; speed: medians of {args.repeats} alternating rounds in one process; memory: "
        f"{args.memory_repeats} fresh processes per side",
        "",
        "| | plain Trainer | lmflow run | lmflow / plain |",
        "|---|---:|---:|---:|",
        f"| tokens/s (median step) | {median['plain']['tokens_per_s']:,.0f} | {median['lmflow']['tokens_per_s']:,.0f} | "
        f"{ratio['tokens_per_s']:.3f} (IQR {ratio['tokens_per_s_iqr'][0]:.2f}-{ratio['tokens_per_s_iqr'][1]:.2f}) |",
        f"| tokens/s (10th-percentile step) | {median['plain']['tokens_per_s_p10']:,.0f} | "
        f"{median['lmflow']['tokens_per_s_p10']:,.0f} | {ratio['tokens_per_s_p10']:.3f} "
        f"(IQR {ratio['tokens_per_s_p10_iqr'][0]:.2f}-{ratio['tokens_per_s_p10_iqr'][1]:.2f}) |",
        f"| peak training memory (MiB) | {median['plain']['peak_bytes'] / mib:,.1f} | {median['lmflow']['peak_bytes'] / mib:,.1f} | "
        f"{ratio['peak_bytes']:.3f} |",
    ]
    print("\n".join(lines))
    out = args.out or HERE / "results" / f"core-{device.lower().replace(' ', '-')}.json"
    settings = {k: str(v) for k, v in vars(args).items()}
    write_results(
        out, {"settings": settings, "runs": runs, "memory": memory, "median": median, "ratio": ratio}
    )


if __name__ == "__main__":
    main()
