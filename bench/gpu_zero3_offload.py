"""GPU check: ZeRO-3 with CPU offload trains a model too large to fine-tune on this GPU without offload.

Builds a Llama shape whose plain bf16 mixed-precision AdamW fine-tuning would need more memory than the GPU has
(weights, gradients, fp32 master weights and two moments: 16 bytes per parameter), but whose offloaded state
fits in the machine's RAM; then runs a few steps of ``lmflow run --plugins zero3 --zero3-offload-optimizer
--zero3-offload-params`` on it (random init from the config, bf16, gradient checkpointing) and reports the
step times and the peak GPU memory. About 3-5 minutes on an H100/H200 (most of it creating and offloading the
model).

    python bench/gpu_zero3_offload.py            # needs a CUDA GPU and deepspeed
    python bench/gpu_zero3_offload.py --layers 20 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument(
        "--layers", type=int, help="Decoder layers (default: enough to exceed the GPU without offload)"
    )
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "zero3-offload-gpu.json")
    return p.parse_args()


def layer_parameters(hidden: int) -> int:
    intermediate = hidden * 8 // 3 // 256 * 256 + 256
    return 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden


def main() -> None:
    args = parse_args()
    import psutil
    import torch

    if not torch.cuda.is_available():
        sys.exit("this check needs a CUDA GPU")
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    host_bytes = psutil.virtual_memory().total
    vocab = 32000
    embeddings = 2 * vocab * args.hidden
    per_layer = layer_parameters(args.hidden)
    if args.layers is None:
        # The smallest depth whose plain fine-tuning state (16 bytes per parameter) exceeds the GPU by 10%.
        args.layers = int((1.1 * gpu_bytes / 16 - embeddings) // per_layer) + 1
    parameters = embeddings + args.layers * per_layer
    plain_need = 16 * parameters
    offloaded = 14 * parameters  # fp32 master weights, two moments, fp16 copy on the host
    print(
        f"GPU {torch.cuda.get_device_name()} {gpu_bytes / 2**30:.0f} GiB, host {host_bytes / 2**30:.0f} GiB; "
        f"model {parameters / 1e9:.2f}B parameters ({args.layers} layers x hidden {args.hidden}): plain "
        f"fine-tuning needs ~{plain_need / 2**30:.0f} GiB of GPU memory, offloaded state ~{offloaded / 2**30:.0f} "
        "GiB of host memory"
    )
    if offloaded > 0.85 * host_bytes:
        sys.exit("not enough host memory for the offloaded state: pass fewer --layers")

    from transformers import AutoTokenizer, LlamaConfig

    from lmflow_core import hookimpl
    from lmflow_core.demo import demo_model_dir
    from lmflow_core.train import run

    with tempfile.TemporaryDirectory(prefix="lmflow-zero3-") as tmp:
        model_dir = Path(tmp) / "model"
        tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
        LlamaConfig(
            vocab_size=max(vocab, len(tokenizer)),
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3 // 256 * 256 + 256,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 128,
            num_key_value_heads=args.hidden // 128,
            max_position_embeddings=args.block_size,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        words = " ".join(f"word{i % 997}" for i in range(4 * args.block_size))
        data = Path(tmp) / "data.json"
        data.write_text(json.dumps({"type": "text_only", "instances": [{"text": words}] * 16}))

        times: list[float] = []

        class Timer:
            @hookimpl
            def on_step(self, step):
                torch.cuda.synchronize()
                times.append(time.perf_counter())

        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = run(
            model=str(model_dir),
            random_init=True,
            dataset=str(data),
            block_size=args.block_size,
            batch_size=1,
            max_steps=args.steps,
            bf16=True,
            gradient_checkpointing=True,
            save_steps=0,
            logging_steps=1,
            output_dir=str(Path(tmp) / "out"),
            plugins=["zero3"],
            zero3={"offload_optimizer": True, "offload_params": True},
            extra_plugins={"timer": Timer()},
        )
        wall = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated()
    step_times = [b - a for a, b in zip(times, times[1:])]
    report = {
        "gpu": torch.cuda.get_device_name(),
        "gpu_gib": round(gpu_bytes / 2**30, 1),
        "parameters_billion": round(parameters / 1e9, 2),
        "plain_need_gib": round(plain_need / 2**30, 1),
        "peak_gpu_gib": round(peak / 2**30, 2),
        "losses": result.losses,
        "step_seconds": [round(t, 2) for t in step_times],
        "tokens_per_second": round(args.block_size / (sum(step_times) / len(step_times)), 1)
        if step_times
        else None,
        "wall_seconds": round(wall, 1),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
