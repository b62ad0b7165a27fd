"""Benchmark: DPO with `lmflow run --plugins dpo` against TRL's DPOTrainer, same model, data and settings.

Configurations, each trained in a fresh child process on the same seeded Llama (demo tokenizer) and the same
generated preference pairs (``{"prompt", "chosen", "rejected"}`` strings, prompt + answer within ``--seq-len``
tokens, prompts ending on a token boundary so that both sides tokenize them alike):

| configuration | TRL | lmflow |
|---|---|---|
| ref | ``DPOTrainer(ref_model=None)``: a frozen copy of the model | ``--plugins dpo`` |
| precompute | ``precompute_ref_log_probs=True``: no copy kept | ``--plugins dpo --dpo-precompute-ref`` |
| lora | ``peft_config=LoraConfig(...)``: the reference is the model with its adapter off | ``--plugins dpo,lora`` |

Both sides get the same training arguments: TRL's ``DPOConfig`` is built from the ``TrainingArguments`` keyword
arguments lmflow itself passes (``lmflow_core.trainer.training_kwargs``), so optimizer, scheduler, clipping,
seeds, precision and activation checkpointing (off) agree; DPOConfig's own defaults would differ (bf16 and
activation checkpointing on).

Measured for each configuration and round:

* step time: the mean (and median) wall time between consecutive optimizer steps after ``--warmup-steps``
  (on GPU after a ``torch.cuda.synchronize``); the time to the first step (loading, tokenizing, TRL's reference
  precompute) is recorded apart, and the whole process time too;
* peak memory: on CPU the peak resident set size of the child (``getrusage``), also minus its size once the
  libraries are imported (what the run itself takes), and the peak summed PSS of its process tree sampled by
  the parent every 0.05 s; on GPU ``torch.cuda.max_memory_allocated`` over the whole run (reference model and
  precompute included);
* the per-step losses: lmflow's must equal TRL's (within 1e-4) for the comparison to be of the same training.

``--repeats`` rounds, the order of the configurations reversed every other round; medians are reported, and
ratios lmflow / TRL of the medians. Goals checked: lmflow no slower than TRL; with ``--dpo-precompute-ref``
less memory than with a reference copy; equal losses.

Usage::

    python bench/bench_dpo.py      # CPU defaults: a 3.45M-parameter Llama, 18 processes, ~10 min on 2 idle cores
    python bench/bench_dpo.py --only trl --steps 6 --warmup-steps 2 --repeats 1 --out /tmp/dpo.json  # quick
    python bench/bench_dpo.py --hidden 1024 --layers 12 --seq-len 1024 --batch-size 8 --bf16   # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_core import llama_config, save_model  # noqa: E402  (the benchmarks' model)
from bench_data import WORDS, tree_memory  # noqa: E402  (word list, process-tree memory)

MIB = 1024 * 1024
SIDES = ("trl", "lmflow")
VARIANTS = ("ref", "precompute", "lora")
LOSS_TOLERANCE = 1e-4
LORA = {"rank": 8, "alpha": 16, "dropout": 0.0}  # lmflow's defaults, dropout off (TRL disables it anyway)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["all", *SIDES], default="all", help="Measure one side only.")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"Comma-separated configurations among {', '.join(VARIANTS)}.",
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="Longest prompt + answer, in tokens.")
    p.add_argument("--batch-size", type=int, default=4, help="Preference pairs per step.")
    p.add_argument("--records", type=int, default=256, help="Preference pairs generated.")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=5, help="First steps left out of the step time.")
    p.add_argument("--repeats", type=int, default=3, help="Rounds (a fresh process per configuration each).")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], default="sigmoid")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--timeout", type=float, default=1800.0, help="Seconds one child may take.")
    p.add_argument(
        "--out", type=Path, help="Where to write the JSON results (default: bench/results/dpo-<device>.json)."
    )
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variant_list) - set(VARIANTS))
    if unknown or not args.variant_list:
        p.error(
            f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose among {', '.join(VARIANTS)}"
        )
    if args.steps <= args.warmup_steps + 1:
        p.error("--steps must exceed --warmup-steps by at least 2")
    return args


# ---- setup (parent) -----------------------------------------------------------------------------------------


def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def pairs(count: int, seq_len: int, seed: int, tokenizer) -> list[dict]:
    """Seeded preference pairs whose prompt + longer answer + EOS fit in ``seq_len`` tokens.

    The prompt ends with ``"\\nAnswer:"`` and each answer starts with a space: the prompt ends on a token
    boundary, where tokenizing prompt and answer apart (lmflow) and together (TRL) give the same ids.
    """
    rng = random.Random(seed)
    out: list[dict] = []
    budget = max(8, seq_len // 12)  # words; the demo tokenizer takes about 1.5 tokens a word
    while len(out) < count:
        record = {
            "prompt": f"Question: {words(rng, budget // 2, budget)}?\nAnswer:",
            "chosen": f" {words(rng, budget // 2, 2 * budget)}.",
            "rejected": f" {words(rng, budget // 2, 2 * budget)}.",
        }
        longest = max(
            len(tokenizer(record["prompt"] + record[k])["input_ids"]) + 1 for k in ("chosen", "rejected")
        )
        if longest <= seq_len:
            out.append(record)
    return out


def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Save the seeded model (demo tokenizer) and the pairs both sides train on; describe them."""
    from transformers import AutoTokenizer

    save_model(llama_config(args.hidden, args.layers, args.seq_len, tie=True), workdir / "model")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    records = pairs(args.records, args.seq_len, args.seed, tokenizer)
    with open(workdir / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    lengths = [
        len(tokenizer(r["prompt"] + r[k])["input_ids"]) + 1 for r in records for k in ("chosen", "rejected")
    ]
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "records": len(records),
        "tokens_per_sequence_mean": statistics.mean(lengths),
        "tokens_per_sequence_max": max(lengths),
    }


# ---- measured sides (children) ------------------------------------------------------------------------------


class Meter:
    """Step times from a Trainer callback; the time the first step started."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.step_times: list[float] = []
        self.train_begin = 0.0
        self.last = 0.0

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                _sync_cuda()
                meter.train_begin = meter.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync_cuda()
                now = time.perf_counter()
                if state.global_step > meter.warmup:
                    meter.step_times.append(now - meter.last)
                meter.last = now

        return _Callback()


def _sync_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def training_settings(args: argparse.Namespace) -> dict:
    """The lmflow run settings both sides train with (TRL's through lmflow's own TrainingArguments)."""
    return {
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "bf16": args.bf16,
        "logging_steps": 1,
        "save_steps": 0,
    }


def run_trl(args: argparse.Namespace, meter: Meter) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from lmflow_core.config import RunConfig
    from lmflow_core.trainer import training_kwargs

    model_dir = args.workdir / "model"
    config = RunConfig(output_dir=str(args.workdir / "trl-out"), **training_settings(args))
    kwargs = training_kwargs(config, has_eval=False)
    kwargs["remove_unused_columns"] = True  # TRL picks its tokenized columns itself
    dpo_args = DPOConfig(
        **kwargs,
        beta=args.beta,
        loss_type=[args.loss],
        max_length=args.seq_len,
        precompute_ref_log_probs=args.variant == "precompute",
    )
    peft_config = None
    if args.variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=LORA["rank"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
        )
    records = [json.loads(line) for line in (args.workdir / "pairs.jsonl").read_text().splitlines()]
    trainer = DPOTrainer(
        model=str(model_dir),
        args=dpo_args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
        callbacks=[meter.callback()],
    )
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run_lmflow(args: argparse.Namespace, meter: Meter) -> list[float]:
    from lmflow_core import hookimpl, run

    class MeterPlugin:
        @hookimpl
        def trainer_callbacks(self):
            return [meter.callback()]

    settings = {
        **training_settings(args),
        "model": str(args.workdir / "model"),
        "dataset": str(args.workdir / "pairs.jsonl"),
        "block_size": args.seq_len,
        "output_dir": str(args.workdir / f"lmflow-out-{args.variant}"),
        "overwrite": True,
        "plugins": ["dpo", "lora"] if args.variant == "lora" else ["dpo"],
        "dpo": {"beta": args.beta, "loss": args.loss, "precompute_ref": args.variant == "precompute"},
    }
    if args.variant == "lora":
        settings["lora"] = dict(LORA)
    result = run(**settings, extra_plugins={"bench_meter": MeterPlugin()})
    return [loss for _, loss in result.losses]


def child(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets  # noqa: F401  (the libraries both sides use, loaded before the baseline)
    import torch
    import transformers  # noqa: F401

    import lmflow_core.trainer  # noqa: F401

    if args.child == "trl":
        import trl  # noqa: F401
    else:
        import lmflow_core.train  # noqa: F401
    imported_rss = _rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    meter = Meter(args.warmup_steps)
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            losses = (run_trl if args.child == "trl" else run_lmflow)(args, meter)
            error = None
        except Exception as exc:  # reported to the parent as this configuration's outcome
            message = str(exc).strip().splitlines()
            losses, error = [], f"{type(exc).__name__}: {message[0] if message else ''}"
        finally:
            sys.stdout = stdout
    if error is not None:
        print(json.dumps({"error": error}))
        sys.exit(3)
    _sync_cuda()
    finished = time.perf_counter()
    times = meter.step_times
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports kilobytes
    print(
        json.dumps(
            {
                "step_s_mean": statistics.mean(times),
                "step_s_median": statistics.median(times),
                "step_times": times,
                "to_first_step_s": meter.train_begin - started,
                "train_s": finished - meter.train_begin,
                "max_rss": max_rss,
                "imported_rss": imported_rss,
                "peak_above_imports": max_rss - imported_rss,
                "cuda_peak": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "losses": losses,
            }
        )
    )


# ---- process measurement (parent) ---------------------------------------------------------------------------


def measure(args: argparse.Namespace, workdir: Path, env: dict, side: str, variant: str) -> dict:
    """Train one configuration in a fresh process; its report plus the peak PSS of its process tree."""
    command = [sys.executable, __file__, "--child", side, "--variant", variant, "--workdir", str(workdir)]
    command += forwarded(args)
    return run_child(command, workdir / f"{side}-{variant}.log", workdir, env, args.timeout)


def run_child(command: list[str], log: Path, workdir: Path, env: dict, timeout: float) -> dict:
    """Run a benchmark child process: its report (the last JSON line of its stdout), its wall time and the peak
    PSS of its process tree; ``outcome`` says ``ok``, ``timeout`` (killed) or why it failed."""
    with open(log, "w") as stderr, open(workdir / "child.out", "w") as stdout:
        spawned = time.time()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
        peak_pss, outcome = 0, "ok"
        while process.poll() is None:
            peak_pss = max(peak_pss, tree_memory(process.pid)[0])
            if time.time() - spawned > timeout:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                outcome = "timeout"
                break
            time.sleep(0.05)
    wall = time.time() - spawned
    lines = (workdir / "child.out").read_text().strip().splitlines()
    report = {}
    if lines:
        try:
            report = json.loads(lines[-1])
        except json.JSONDecodeError:
            report = {}
    if outcome == "ok" and process.returncode != 0:
        outcome = report.get("error") or f"failed (exit {process.returncode}): {_tail(log)}"
    if outcome != "ok":
        return {"outcome": outcome, "wall_s": wall}
    return {"outcome": "ok", "wall_s": wall, "peak_pss": peak_pss, **report}


def _tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


CHILD_ARGUMENTS = (
    "hidden",
    "layers",
    "seq_len",
    "batch_size",
    "steps",
    "warmup_steps",
    "beta",
    "loss",
    "learning_rate",
    "seed",
)


def forwarded(args: argparse.Namespace, names: tuple[str, ...] = CHILD_ARGUMENTS) -> list[str]:
    """The flags that pass ``names`` (and ``--bf16``) on to a child process."""
    out = []
    for name in names:
        out += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return out + (["--bf16"] if args.bf16 else [])


# ---- driver -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    sides = SIDES if args.only == "all" else (args.only,)
    configs = [(side, variant) for variant in args.variant_list for side in sides]
    runs: dict[str, list[dict]] = {name(*c): [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="lmflow-bench-dpo-") as tmp:
        workdir = Path(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMFLOW_CACHE": str(workdir / "cache")}
        described = prepare(args, workdir)
        print(
            f"model: {described['parameters'] / 1e6:.2f}M parameters; {described['records']} pairs, "
            f"{described['tokens_per_sequence_mean']:.0f} tokens a sequence on average "
            f"(max {described['tokens_per_sequence_max']})"
        )
        for round_ in range(args.repeats):
            order = configs if round_ % 2 == 0 else configs[::-1]
            for side, variant in order:
                result = measure(args, workdir, env, side, variant)
                runs[name(side, variant)].append(result)
                shown = (
                    f"{result['step_s_mean'] * 1000:.1f} ms/step, peak {result['max_rss'] / MIB:,.0f} MiB"
                    if result["outcome"] == "ok"
                    else result["outcome"]
                )
                print(f"  round {round_ + 1}: {name(side, variant)}: {shown}", flush=True)
    summary = summarise(runs)
    payload = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child", "variant", "workdir")},
        "setup": described,
        "runs": runs,
        "summary": summary,
    }
    payload["comparison"] = compare(summary, args.variant_list)
    payload["goals"] = goals(payload["comparison"], summary, sides)
    device = next((r["device"] for rows in runs.values() for r in rows if r["outcome"] == "ok"), "cpu")
    out = args.out or HERE / "results" / f"dpo-{device.lower().replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(table(args, described, summary, payload["comparison"], device))
    print()
    for goal, verdict in payload["goals"].items():
        print(f"{goal}: {verdict}")
    print(f"\nresults: {out}")
    failed = sorted(
        {f"{c}: {r['outcome']}" for c, rows in runs.items() for r in rows if r["outcome"] != "ok"}
    )
    if failed:
        sys.exit("some configurations failed:\n  " + "\n  ".join(failed))


def name(side: str, variant: str) -> str:
    return f"{side}-{variant}"


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Medians over the successful rounds of each configuration (or its failure)."""
    out: dict[str, dict] = {}
    for config, rows in runs.items():
        ok = [r for r in rows if r["outcome"] == "ok"]
        if not ok:
            out[config] = {"outcome": rows[0]["outcome"] if rows else "not run"}
            continue
        keys = ("step_s_mean", "step_s_median", "to_first_step_s", "wall_s", "max_rss", "peak_above_imports")
        entry: dict = {"outcome": "ok", **{k: statistics.median(r[k] for r in ok) for k in keys}}
        entry["peak_pss"] = statistics.median(r["peak_pss"] for r in ok)
        cuda = [r["cuda_peak"] for r in ok if r.get("cuda_peak") is not None]
        entry["cuda_peak"] = statistics.median(cuda) if cuda else None
        entry["losses"] = ok[0]["losses"]
        out[config] = entry
    return out


def peak(entry: dict) -> float:
    """The memory figure compared: the GPU's peak where there is one, else the peak above the imports."""
    return entry["cuda_peak"] if entry.get("cuda_peak") is not None else entry["peak_above_imports"]


def compare(summary: dict[str, dict], variants: list[str]) -> dict[str, dict]:
    """lmflow / TRL for each configuration both sides ran."""
    out: dict[str, dict] = {}
    for variant in variants:
        trl, lmflow = summary.get(name("trl", variant)), summary.get(name("lmflow", variant))
        if not trl or not lmflow or trl["outcome"] != "ok" or lmflow["outcome"] != "ok":
            continue
        diffs = [abs(a - b) for a, b in zip(trl["losses"], lmflow["losses"])]
        out[variant] = {
            "step_time_ratio": lmflow["step_s_mean"] / trl["step_s_mean"],
            "peak_ratio": peak(lmflow) / peak(trl),
            "peak_rss_ratio": lmflow["max_rss"] / trl["max_rss"],
            "loss_max_abs_diff": max(diffs) if diffs else None,
            "same_step_count": len(trl["losses"]) == len(lmflow["losses"]),
        }
    return out


def goals(comparison: dict[str, dict], summary: dict[str, dict], sides: tuple[str, ...]) -> dict[str, str]:
    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    out: dict[str, str] = {}
    for variant, c in comparison.items():
        out[f"{variant}: lmflow no slower than TRL"] = (
            f"{verdict(c['step_time_ratio'] <= 1.0)} ({c['step_time_ratio']:.3f}x the step time)"
        )
        diff = c["loss_max_abs_diff"]
        out[f"{variant}: losses equal to TRL's within {LOSS_TOLERANCE:g}"] = (
            "not measured"
            if diff is None
            else f"{verdict(diff <= LOSS_TOLERANCE and c['same_step_count'])} (max |diff| {diff:.2e})"
        )
    for side in sides:
        ref, pre = summary.get(name(side, "ref")), summary.get(name(side, "precompute"))
        if ref and pre and ref["outcome"] == pre["outcome"] == "ok":
            ratio = peak(pre) / peak(ref)
            out[f"{side}: precompute takes less memory than a reference copy"] = (
                f"{verdict(ratio < 1.0)} ({ratio:.3f}x the peak)"
            )
    return out


def table(args, described: dict, summary: dict, comparison: dict, device: str) -> str:
    gpu = any(e.get("cuda_peak") is not None for e in summary.values())
    memory = "GPU peak MiB" if gpu else "peak above imports MiB"
    lines = [
        f"DPO ({args.loss}, beta {args.beta}): Llama {described['parameters'] / 1e6:.2f}M parameters "
        f"(hidden {args.hidden} x {args.layers} layers), {described['records']} pairs of up to {args.seq_len} "
        f"tokens, batch {args.batch_size} pairs, {args.steps} steps ({args.warmup_steps} warm-up), "
        f"{'bf16' if args.bf16 else 'fp32'}, {device}; medians of {args.repeats} fresh processes per configuration",
        "",
        f"| configuration | step ms (mean) | step ms (median) | s to first step | {memory} | peak RSS MiB "
        "| peak PSS MiB (tree) | loss step 1 | loss last |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config, e in summary.items():
        if e["outcome"] != "ok":
            lines.append(f"| {config} | {e['outcome']} |||||||")
            continue
        losses = e["losses"]
        lines.append(
            f"| {config} | {e['step_s_mean'] * 1000:.1f} | {e['step_s_median'] * 1000:.1f} | "
            f"{e['to_first_step_s']:.1f} | {peak(e) / MIB:,.1f} | {e['max_rss'] / MIB:,.0f} | "
            f"{e['peak_pss'] / MIB:,.0f} | {losses[0]:.6f} | {losses[-1]:.6f} |"
        )
    if comparison:
        lines += [
            "",
            "| configuration | step time lmflow / TRL | memory lmflow / TRL | peak RSS lmflow / TRL "
            "| max abs loss difference |",
            "|---|---:|---:|---:|---:|",
        ]
        for variant, c in comparison.items():
            diff = "-" if c["loss_max_abs_diff"] is None else f"{c['loss_max_abs_diff']:.2e}"
            lines.append(
                f"| {variant} | {c['step_time_ratio']:.3f} | {c['peak_ratio']:.3f} | {c['peak_rss_ratio']:.3f} "
                f"| {diff} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
