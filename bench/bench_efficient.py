"""Benchmark: lmflow's efficient fine-tuning plugins against plain transformers + peft doing the same thing.

Same model, same variable-length data, same settings, one table:

| method | lmflow | the plain-library equivalent |
|---|---|---|
| full | `lmflow run` | `transformers.Trainer`, padded batches |
| lora | `--plugins lora` | `peft.get_peft_model` + Trainer |
| lisa | `--plugins lisa` (layers switched during the run) | Trainer with all but as many layers frozen |
| lisa + checkpointing | `--plugins lisa --gradient-checkpointing` | the same, with gradient checkpointing |
| packing | `--packing` | Trainer + `DataCollatorWithFlattening` (padding-free batches) |

Speed is real (non-padding) trained tokens per second over the steps after the warm-up, counted from the
labels each forward pass receives (so padded and packed batches are counted alike); both sides of a row run
alternately in one child process for ``--repeats`` rounds. Where both sides train the same batches (every row but
packing) the ratio is the median over all steps and rounds of the per-step time ratios, which cancels most of
the drift of a shared machine; for packing it is the median of the per-round throughput ratios.
Peak memory is measured in a fresh child process per side: on GPU the peak of ``torch.cuda.max_memory_allocated``,
on CPU the peak resident set size during training minus the size when training started.

Goals checked in the output: LISA's peak memory below full fine-tuning's by at least the optimizer state of its
frozen layers; packing at least 1.5x the real tokens/s of padded batches; no lmflow row slower than its plain
equivalent by more than 3%.

Usage::

    python bench/bench_efficient.py                # CPU-sized defaults, about 10 minutes on 2 cores
    python bench/bench_efficient.py --preset gpu   # one GPU: a 0.5B Llama shape, bf16, under 5 minutes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_core import (  # noqa: E402  (same model, measurement and child processes)
    Meter,
    alternating,
    forwarded,
    llama_config,
    run_child,
    save_model,
    write_results,
)

METHODS = ("full", "lora", "lisa", "lisa_gc", "packing")
PRESETS = {
    "cpu": {
        "hidden": 256,
        "layers": 8,
        "block_size": 512,
        "batch_size": 8,
        "steps": 20,
        "warmup_steps": 4,
        "repeats": 3,
        "memory_repeats": 1,
    },
    "gpu": {
        "hidden": 1024,
        "layers": 24,
        "block_size": 2048,
        "batch_size": 8,
        "steps": 20,
        "warmup_steps": 5,
        "bf16": True,
        "repeats": 1,
        "memory_repeats": 0,  # on a GPU the speed runs' own peak (max_memory_allocated, reset per run) is exact
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument(
        "--memory-repeats", type=int, help="Fresh processes per side for memory (0: use the speed runs)"
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--lisa-layers", type=int, default=2)
    p.add_argument("--lisa-interval", type=int, default=5)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/efficient-<device>.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if key == "bf16":
            args.bf16 = args.bf16 or value
        elif getattr(args, key, None) is None:
            setattr(args, key, value)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


# ---- setup (parent) -----------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, workdir: Path) -> None:
    """One seeded model and one variable-length text dataset (lengths log-uniform from 16 to the block)."""
    from lmflow_core.demo import demo_dataset

    save_model(llama_config(args.hidden, args.layers, args.block_size, tie=False), workdir / "model")
    conversations = json.loads(demo_dataset("train").read_text())["instances"]
    sentences = [" ".join(m["content"] for m in c["messages"]) for c in conversations]
    words_per_token = 0.7  # the demo tokenizer makes about 1.4 tokens per word of this corpus
    rng = random.Random(0)
    texts = []
    examples = args.batch_size * (args.steps + 2) * max(args.repeats, 1)
    for _ in range(examples):
        tokens = math.exp(rng.uniform(math.log(16), math.log(args.block_size)))
        words: list[str] = []
        while len(words) < tokens * words_per_token:
            words += rng.choice(sentences).split()
        texts.append(" ".join(words[: int(tokens * words_per_token)]))
    (workdir / "data.json").write_text(
        json.dumps({"type": "text_only", "instances": [{"text": t} for t in texts]})
    )


# ---- measurement (children) ---------------------------------------------------------------------------------


class TokenMeter(Meter):
    """Counts the trained tokens each forward pass receives (``labels`` after the shift that are not -100)."""

    def callback(self):
        base = super().callback()
        meter = self
        meter.forward_tokens = 0
        begin = base.on_train_begin
        step_end = base.on_step_end

        def on_train_begin(args, state, control, **kwargs):
            model = kwargs["model"]

            def count(module, positional, keywords):
                labels = keywords.get("labels")
                if labels is not None:
                    meter.forward_tokens += int((labels[..., 1:] != -100).sum())

            model.register_forward_pre_hook(count, with_kwargs=True)
            begin(args, state, control, **kwargs)

        def on_step_end(args, state, control, **kwargs):
            state.num_input_tokens_seen = meter.forward_tokens
            step_end(args, state, control, **kwargs)

        base.on_train_begin = on_train_begin
        base.on_step_end = on_step_end
        return base

    def result(self) -> dict:
        out = super().result()
        out["tokens_per_s"] = sum(self.step_tokens) / sum(self.step_times)
        out["step_times"] = self.step_times
        out["step_tokens"] = self.step_tokens
        return out


def same_batches(plain: dict, lmflow: dict) -> bool:
    """Whether both sides trained the same batches, step for step (same data, order and seed; not packing)."""
    return plain["step_tokens"] == lmflow["step_tokens"]


def lisa_first_layers(args: argparse.Namespace) -> list[int]:
    """The layers lmflow's LISA trains first, so the plain side freezes the same ones."""
    generator = random.Random("lisa-42-0")
    return sorted(generator.sample(range(args.layers), args.lisa_layers))


def run_plain(args: argparse.Namespace, method: str, meter: TokenMeter) -> None:
    """What a user would write with transformers and peft alone for the same method."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainingArguments,
    )

    model_dir = args.workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    raw = load_dataset("json", data_files=str(args.workdir / "data.json"), field="instances")["train"]

    def tokenize(batch):
        ids = [x + [tokenizer.eos_token_id] for x in tokenizer(batch["text"])["input_ids"]]
        ids = [x[: args.block_size] for x in ids]
        return {"input_ids": ids, "labels": [list(x) for x in ids]}

    data = raw.map(tokenize, batched=True, remove_columns=["text"])
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    if method.startswith("lisa"):
        keep = set(lisa_first_layers(args))
        for index, layer in enumerate(model.model.layers):
            layer.requires_grad_(index in keep)
    if method == "packing":
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
        model.config.use_cache = False
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    training_args = TrainingArguments(
        output_dir=str(args.workdir / "plain-out"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4,
        seed=42,
        data_seed=42,
        bf16=args.bf16,
        gradient_checkpointing=method == "lisa_gc",
        gradient_checkpointing_kwargs={"use_reentrant": False} if method == "lisa_gc" else None,
        save_strategy="no",
        report_to=[],
        logging_steps=10,
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[meter.callback()],
    )
    trainer.train()


def run_lmflow(args: argparse.Namespace, method: str, meter: TokenMeter) -> None:
    from lmflow_core import hookimpl, run

    class MeterPlugin:
        @hookimpl
        def trainer_callbacks(self):
            return [meter.callback()]

    plugins: list[str] = []
    extra: dict = {}
    if method == "lora":
        plugins = ["lora"]
        extra["lora"] = {"rank": args.lora_rank, "alpha": 2 * args.lora_rank, "dropout": 0.0}
    if method.startswith("lisa"):
        plugins = ["lisa"]
        extra["lisa"] = {"activated_layers": args.lisa_layers, "interval_steps": args.lisa_interval}
    run(
        model=str(args.workdir / "model"),
        dataset=str(args.workdir / "data.json"),
        block_size=args.block_size,
        group_texts=False,
        packing=method == "packing",
        gradient_checkpointing=method == "lisa_gc",
        output_dir=str(args.workdir / "lmflow-out"),
        overwrite=True,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=1e-4,
        seed=42,
        bf16=args.bf16,
        save_steps=None,
        logging_steps=10,
        plugins=plugins,
        extra_plugins={"meter": MeterPlugin()},
        **extra,
    )


def train_side(args: argparse.Namespace, side: str, method: str) -> dict:
    meter = TokenMeter(args.warmup_steps)
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            (run_plain if side == "plain" else run_lmflow)(args, method, meter)
        finally:
            sys.stdout = stdout
    return meter.result()


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kind, method = args.child.split(":")
    if kind != "speed":
        print(json.dumps(train_side(args, kind, method)))
        return
    print(json.dumps(alternating(args.repeats, lambda side: train_side(args, side, method))))


# ---- driver -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    started = time.monotonic()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lmflow-bench-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMFLOW_CACHE": str(workdir / "cache")}
        prepare(args, workdir)
        for method in args.methods:
            speed = _child(workdir, env, args, f"speed:{method}")
            memory = (
                alternating(
                    args.memory_repeats,
                    lambda side, method=method: _child(workdir, env, args, f"{side}:{method}"),
                )
                if args.memory_repeats
                else speed  # on a GPU the speed runs' own peaks are exact
            )
            results[method] = {"speed": speed, "memory": memory}
            print(f"{method}: done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    report(args, results, time.monotonic() - started)


CHILD_ARGUMENTS = (
    "hidden", "layers", "block_size", "batch_size", "steps", "warmup_steps", "repeats",
    "lisa_layers", "lisa_interval", "lora_rank",
)  # fmt: skip


def _child(workdir: Path, env: dict, args: argparse.Namespace, what: str) -> dict:
    return run_child(__file__, workdir, env, what, forwarded(args, CHILD_ARGUMENTS))


def layer_and_model_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """Parameters of one decoder layer and of the whole model (for the LISA memory goal)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            llama_config(args.hidden, args.layers, args.block_size, tie=False)
        )
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    return layer, sum(p.numel() for p in model.parameters())


def report(args: argparse.Namespace, results: dict[str, dict], seconds: float) -> None:
    mib = 1024 * 1024
    rows = []
    summary: dict[str, dict] = {}
    for method, data in results.items():
        speed, memory = data["speed"], data["memory"]
        pairs = list(zip(speed["plain"], speed["lmflow"]))
        per_step = all(same_batches(a, b) for a, b in pairs)
        if per_step:  # the same batches on both sides: every step's time ratio (plain time / lmflow time)
            ratios = [x / y for a, b in pairs for x, y in zip(a["step_times"], b["step_times"])]
        else:  # one throughput ratio per round
            ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        entry = {
            "plain_tokens_per_s": statistics.median(r["tokens_per_s"] for r in speed["plain"]),
            "lmflow_tokens_per_s": statistics.median(r["tokens_per_s"] for r in speed["lmflow"]),
            "speed_ratio": statistics.median(ratios),
            "speed_ratio_kind": "per-step time" if per_step else "throughput per round",
            "speed_ratio_iqr": (quartiles[0], quartiles[2]),
            "plain_peak_bytes": statistics.median(r["peak_bytes"] for r in memory["plain"]),
            "lmflow_peak_bytes": statistics.median(r["peak_bytes"] for r in memory["lmflow"]),
        }
        summary[method] = entry
        rows.append(
            f"| {method.replace('_gc', ' + checkpointing')} | {entry['plain_tokens_per_s']:,.0f} | "
            f"{entry['lmflow_tokens_per_s']:,.0f} | {entry['speed_ratio']:.3f} "
            f"({entry['speed_ratio_iqr'][0]:.2f}-{entry['speed_ratio_iqr'][1]:.2f}, {entry['speed_ratio_kind']}) | "
            f"{entry['plain_peak_bytes'] / mib:,.1f} | {entry['lmflow_peak_bytes'] / mib:,.1f} |"
        )
    device = next(iter(results.values()))["speed"]["plain"][0]["device"]
    lines = [
        f"efficient fine-tuning: Llama shape hidden {args.hidden} x {args.layers} layers, texts of 16-"
        f"{args.block_size} tokens (log-uniform), batch {args.batch_size}, {args.steps} steps "
        f"({args.warmup_steps} warm-up), {'bf16' if args.bf16 else 'fp32'}, {device}; LoRA r{args.lora_rank} "
        f"all linear layers; LISA {args.lisa_layers} of {args.layers} layers, switched every "
        f"{args.lisa_interval} steps; {args.repeats} alternating rounds; {seconds / 60:.1f} min",
        "",
        "| method | plain tokens/s | lmflow tokens/s | lmflow / plain speed (IQR, from) | plain peak MiB | lmflow peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]
    goals = {}
    if "full" in summary and "packing" in summary:
        gain = summary["packing"]["lmflow_tokens_per_s"] / summary["full"]["lmflow_tokens_per_s"]
        goals["packing_vs_padded"] = gain
        lines.append(
            f"\npacking vs padded batches (lmflow, real tokens/s): {gain:.2f}x (goal: at least 1.5x)"
        )
    if "full" in summary and "lisa" in summary:
        layer, _total = layer_and_model_sizes(args)
        bytes_per_value = 4  # AdamW's two fp32 moments: 8 bytes per trained value
        frozen_state = 2 * bytes_per_value * layer * (args.layers - args.lisa_layers)
        saved = summary["full"]["lmflow_peak_bytes"] - summary["lisa"]["lmflow_peak_bytes"]
        goals["lisa_memory_saved_bytes"] = saved
        goals["lisa_frozen_optimizer_state_bytes"] = frozen_state
        lines.append(
            f"LISA peak memory below full fine-tuning by {saved / mib:,.1f} MiB; the optimizer state of its "
            f"frozen layers is {frozen_state / mib:,.1f} MiB (goal: saved >= that)"
        )
    slowest = min(summary.values(), key=lambda e: e["speed_ratio"])
    goals["slowest_ratio"] = slowest["speed_ratio"]
    lines.append(f"slowest lmflow / plain ratio: {slowest['speed_ratio']:.3f} (goal: at least 0.97)")
    print("\n".join(lines))
    out = args.out or HERE / "results" / f"efficient-{device.lower().replace(' ', '-')}.json"
    settings = {k: str(v) for k, v in vars(args).items()}
    write_results(
        out, {"settings": settings, "results": results, "summary": summary, "goals": goals, "table": lines}
    )


if __name__ == "__main__":
    main()
