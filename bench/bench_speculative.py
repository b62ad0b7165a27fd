"""Benchmark: speculative decoding against plain decoding of the target and transformers' assisted generation.

The benchmark trains its own pair with `lmflow run` on one synthetic corpus of predictable sequences (cycles of
number words, days, colours...), so that the draft agrees with the target well: a target (deep, the
model users care about) and a much smaller draft. Then, at batch size 1 and greedy decoding, it generates the same
number of new tokens after the same prompts three ways and reports tokens/s and speedups:

* plain: ``target.generate`` (transformers greedy decoding);
* assisted: ``target.generate(assistant_model=draft)`` with the same number of draft tokens per round;
* lmflow: the ``speculative`` plugin (``lmflow generate --plugins speculative``'s decoder).

All three must produce the same tokens (greedy speculative decoding is exact); the benchmark checks it.

    python bench/bench_speculative.py                  # CPU sizes, about 6 minutes on 2 cores
    python bench/bench_speculative.py --device cuda --target-layers 24 --target-hidden 1024 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-hidden", type=int, default=256)
    p.add_argument("--target-layers", type=int, default=8)
    p.add_argument("--draft-hidden", type=int, default=64)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=250, help="Training steps for each model.")
    p.add_argument("--num-draft-tokens", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out", type=Path, help="JSON results (default: bench/results/speculative-<device>.json)."
    )
    return p.parse_args(argv)


CYCLES = [
    "zero one two three four five six seven eight nine ten eleven twelve".split(),
    "monday tuesday wednesday thursday friday saturday sunday".split(),
    "red orange yellow green blue purple brown black white".split(),
    "spring summer autumn winter".split(),
    "north east south west".split(),
]


def corpus(rng: random.Random, n: int) -> list[str]:
    """Predictable text: words of fixed cycles (number words, days, colours, seasons, directions) from a random
    starting point, so that a good model, large or small, knows each next token."""
    texts = []
    for _ in range(n):
        cycle = rng.choice(CYCLES)
        start = rng.randrange(len(cycle))
        texts.append(" ".join(cycle[(start + i) % len(cycle)] for i in range(rng.randint(30, 60))))
    return texts


def model_dir(workdir: Path, name: str, hidden: int, layers: int) -> Path:
    """A config + tokenizer directory for `lmflow run --random-init`."""
    from transformers import AutoTokenizer, LlamaConfig

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    path = workdir / f"{name}-init"
    LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32 + 32,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train(workdir: Path, args: argparse.Namespace) -> tuple[Path, Path, dict]:
    from lmflow_core import run
    from lmflow_core.report import Reporter

    data = workdir / "corpus.json"
    data.write_text(
        json.dumps({"type": "text_only", "instances": [{"text": t} for t in corpus(random.Random(0), 3000)]})
    )
    results = {}
    for name, hidden, layers in (
        ("target", args.target_hidden, args.target_layers),
        ("draft", args.draft_hidden, args.draft_layers),
    ):
        started = time.monotonic()
        result = run(
            model=str(model_dir(workdir, name, hidden, layers)),
            random_init=True,
            dataset=str(data),
            output_dir=str(workdir / name),
            max_steps=args.steps,
            batch_size=16,
            block_size=128,
            learning_rate=3e-3,
            lr_scheduler="cosine",
            warmup=0.05,
            save_steps=0,
            logging_steps=50,
            reporter=Reporter(main=False),
            bf16=args.device.startswith("cuda"),
        )
        results[name] = {
            "final_loss": result.losses[-1][1],
            "train_seconds": round(time.monotonic() - started, 1),
        }
        print(
            f"trained {name}: loss {result.losses[-1][1]:.3f} in {results[name]['train_seconds']}s",
            flush=True,
        )
    return workdir / "target", workdir / "draft", results


def measure(args: argparse.Namespace, target_path: Path, draft_path: Path) -> dict:
    import torch
    from lmflow_plugins.speculative import speculative_generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmflow_core.generate import GenerationOptions

    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(target_path)
    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=dtype).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_path, dtype=dtype).to(device).eval()
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("target", target), ("draft", draft))}
    for model in (target, draft):  # every method generates exactly `new` tokens: EOS does not stop anyone
        model.generation_config.eos_token_id = None
    prompts = [t[: len(t) // 3] for t in corpus(random.Random(1), args.prompts)]
    k, new = args.num_draft_tokens, args.new_tokens

    def plain(ids, **extra):
        return target.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=tokenizer.pad_token_id,
            **extra,
        )

    def assisted(ids):
        draft.generation_config.num_assistant_tokens = k
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0
        return plain(ids, assistant_model=draft)

    stats = {"accepted": 0, "proposed": 0}

    def ours(ids):
        options = GenerationOptions(max_new_tokens=new)
        out = speculative_generate(target, draft, _NoEos(tokenizer), ids, options, None, k)
        stats["accepted"] += options.stats["accepted_tokens"]
        stats["proposed"] += options.stats["draft_tokens"]
        return out

    methods = {"plain": plain, "assisted": assisted, "lmflow": ours}
    timings: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, list[list[int]]] = {m: [] for m in methods}
    with torch.no_grad():
        warm = tokenizer(prompts[0], return_tensors="pt")["input_ids"].to(device)
        for fn in methods.values():
            fn(warm)
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            for name, fn in methods.items():
                _sync(device)
                started = time.perf_counter()
                out = fn(ids)
                _sync(device)
                timings[name].append(time.perf_counter() - started)
                outputs[name].append(out[0, ids.shape[1] :].tolist())
    same = all(outputs["lmflow"][i] == outputs["plain"][i] for i in range(len(prompts)))
    rate = {m: new * len(prompts) / sum(t) for m, t in timings.items()}
    return {
        "parameters": params,
        "tokens_per_s": rate,
        "median_seconds": {m: statistics.median(t) for m, t in timings.items()},
        "speedup_vs_plain": {m: rate[m] / rate["plain"] for m in rate},
        "lmflow_vs_assisted": rate["lmflow"] / rate["assisted"],
        "acceptance_rate": stats["accepted"] / max(1, stats["proposed"]),
        "identical_to_plain": same,
        "assisted_identical_to_plain": all(
            outputs["assisted"][i] == outputs["plain"][i] for i in range(len(prompts))
        ),
    }


class _NoEos:
    """The tokenizer with no EOS, so that every method generates exactly the same number of tokens."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = None

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="lmflow-spec-") as tmp:
        os.environ["LMFLOW_CACHE"] = str(Path(tmp) / "cache")
        target_path, draft_path, training = train(Path(tmp), args)
        results = measure(args, target_path, draft_path)
    results["training"] = training
    results["settings"] = {k: str(v) for k, v in vars(args).items()}
    p = results["parameters"]
    lines = [
        f"speculative decoding: target {p['target'] / 1e6:.1f}M parameters ({args.target_layers} layers), draft "
        f"{p['draft'] / 1e6:.2f}M ({args.draft_layers} layer), {args.num_draft_tokens} draft tokens per round, "
        f"{args.new_tokens} new tokens x {args.prompts} prompts, greedy, batch 1, {args.device}",
        "",
        "| decoding | tokens/s | speedup vs plain |",
        "|---|---:|---:|",
    ]
    for name, label in (
        ("plain", "plain target (transformers)"),
        ("assisted", "transformers assisted generation"),
        ("lmflow", "lmflow speculative"),
    ):
        lines.append(
            f"| {label} | {results['tokens_per_s'][name]:,.1f} | {results['speedup_vs_plain'][name]:.2f}x |"
        )
    lines += [
        "",
        f"lmflow vs assisted: {results['lmflow_vs_assisted']:.2f}x; draft acceptance rate {results['acceptance_rate']:.1%}; "
        f"output identical to plain decoding: {results['identical_to_plain']}",
    ]
    print("\n".join(lines))
    out = args.out or HERE / "results" / f"speculative-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if not results["identical_to_plain"]:
        sys.exit("speculative output differs from plain greedy decoding")


if __name__ == "__main__":
    main()
