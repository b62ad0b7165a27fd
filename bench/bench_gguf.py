"""Benchmark: `lmflow export gguf` per outtype: export time, peak memory and file size.

A Llama shape with seeded random weights is saved once (with the demo tokenizer); each outtype is then exported
in a fresh process (`python -m` of this file with --one), so that each peak resident memory is its own. The
size of the safetensors directory is given for comparison.

    python bench/bench_gguf.py                     # hidden 512 x 8 layers (about 25M parameters), about 1 minute
    python bench/bench_gguf.py --hidden 1024 --layers 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--output", default=str(HERE / "results" / "gguf-cpu.json"))
    p.add_argument("--one", nargs=3, metavar=("MODEL", "OUT", "OUTTYPE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model(directory: Path, hidden: int, layers: int) -> int:
    """Save a seeded Llama of the given shape with the demo tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def export_one(model: str, out: str, outtype: str) -> None:
    """In this process: export, then print the time, the file size and this process's peak memory as JSON."""
    started = time.perf_counter()
    import gguf  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from lmflow_plugins.gguf import export_gguf

    import lmflow_core

    lmflow_core.load_pretrained  # noqa: B018  (loads the core's loading module)
    imports = time.perf_counter() - started
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    report = export_gguf(model, out, outtype=outtype, overwrite=True)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {
        "seconds": seconds,
        "import_seconds": imports,
        "bytes": report.bytes,
        "peak_mib": peak_kib / 1024,
        "peak_over_imports_mib": (peak_kib - before_kib) / 1024,
        "types": report.types,
    }
    print(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        export_one(*args.one)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        parameters = build_model(model_dir, args.hidden, args.layers)
        safetensors = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        rows = {}
        for outtype in OUTTYPES:
            out = Path(scratch) / f"model-{outtype}.gguf"
            result = subprocess.run(
                [sys.executable, __file__, "--one", str(model_dir), str(out), outtype],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            rows[outtype] = json.loads(result.stdout.strip().splitlines()[-1])
            row = rows[outtype]
            print(
                f"{outtype:5s} {row['seconds']:6.2f} s (imports {row['import_seconds']:.1f} s)  peak "
                f"{row['peak_mib']:7.1f} MiB (+{row['peak_over_imports_mib']:.1f} over the imports)  "
                f"{row['bytes'] / 2**20:7.2f} MiB ({row['bytes'] / safetensors:.3f} of the fp32 safetensors)"
            )
    result = {
        "shape": {"hidden": args.hidden, "layers": args.layers, "parameters": parameters},
        "safetensors_bytes": safetensors,
        "outtypes": rows,
        "note": "each export in a fresh process; seconds: loading the model and writing the file, after the "
        "imports (import_seconds); peak_mib: the process's peak resident memory, imports included",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
