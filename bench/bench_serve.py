"""Benchmark: `lmflow serve` with continuous batching against the same server one request at a time.

One seeded Llama of a few million parameters (the benchmarks' shape, demo tokenizer, chatml template) is served
by two ``lmflow serve`` processes started side by side by one child process:

* one at a time: ``--max-batch-size 1``: every request goes through the ``decode`` hook (``model.generate``)
  alone, as ``lmflow serve`` did before batching;
* batched: ``--max-batch-size`` (default 32): concurrent requests share the decoding steps.

For 1, 4, 16 and 32 concurrent clients, each client sends ``--requests`` greedy chat completions one after the
other (at least 8 requests per load), the same prompts to both servers. The two loads alternate for ``--rounds``
rounds (order flipped every round), so both see the same machine. Reported (medians over rounds): aggregate
generated tokens/s (all completion tokens over the wall time of the load), p50 and p95 request latency, and
whether both servers returned the same texts.

    python bench/bench_serve.py                        # CPU defaults, about 5 minutes on 2 cores
    python bench/bench_serve.py --hidden 1024 --layers 12 --device cuda --clients 1 4 16 32 64
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_core import (  # noqa: E402  (shared model, alternation, child processes and results)
    alternating,
    llama_config,
    run_child,
    save_model,
    write_results,
)

# bench_core.alternating measures a baseline ("plain") and lmflow's way ("lmflow"): here the same server one
# request at a time, and batching.
SIDES = {"plain": "one at a time", "lmflow": "batched"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument(
        "--requests",
        type=int,
        default=2,
        help="Requests per client, one after the other (8 at least in all).",
    )
    p.add_argument("--rounds", type=int, default=2, help="Alternating rounds per number of clients.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="JSON results (default: bench/results/serve-<device>.json).")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompt(client: int, turn: int) -> list[dict]:
    topics = ["the sea", "numbers", "a city", "the weather", "colours", "music", "trains", "a garden"]
    return [
        {"role": "user", "content": f"Tell me about {topics[(client + turn) % 8]}, part {client}.{turn}."}
    ]


# ---- the child: one server, every load ------------------------------------------------------------------------


def start_server(args: argparse.Namespace, batch: int, port: int) -> subprocess.Popen:
    command = [
        str(Path(sys.executable).with_name("lmflow")),
        "serve",
        str(args.workdir / "model"),
        "--template",
        "chatml",
        "--port",
        str(port),
        "--device",
        args.device,
        "--no-ui",
        "--max-batch-size",
        str(batch),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            sys.exit(f"the server did not start:\n{server.stderr.read()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit("the server did not answer /health in 5 minutes")
        time.sleep(0.5)


def complete(port: int, messages: list[dict], max_tokens: int) -> tuple[float, int, str]:
    """One greedy completion: (seconds, completion tokens, text)."""
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": max_tokens})
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    took = time.perf_counter() - started
    connection.close()
    if response.status != 200:
        sys.exit(f"request failed ({response.status}): {payload}")
    return took, payload["usage"]["completion_tokens"], payload["choices"][0]["message"]["content"]


def load(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` completions in turn."""
    results: dict[tuple[int, int], tuple[float, int, str]] = {}

    def client(i: int) -> None:
        for turn in range(
            max(requests, -(-8 // clients))
        ):  # at least 8 requests per load, for the percentiles
            results[i, turn] = complete(port, prompt(i, turn), max_tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results.values())
    tokens = sum(r[1] for r in results.values())
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
        "texts": {f"{i}.{t}": results[i, t][2] for i, t in sorted(results)},
    }


def child(args: argparse.Namespace) -> None:
    """Both servers up at once (an idle one costs nothing); for each number of clients, the two loads alternate,
    so that both see the same machine (a shared machine's load drifts)."""
    from lmflow_core.launch import free_port

    ports = {"plain": free_port(), "lmflow": free_port()}
    servers = {}
    try:
        for side, batch in (("plain", 1), ("lmflow", args.max_batch_size)):
            servers[side] = start_server(args, batch, ports[side])
            complete(ports[side], prompt(0, 0), args.max_tokens)  # warm-up
        loads = {
            str(clients): alternating(
                args.rounds, lambda side, c=clients: load(ports[side], c, args.requests, args.max_tokens)
            )
            for clients in args.clients
        }
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(timeout=60)
    print(json.dumps(loads))


# ---- the driver -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    arguments = [
        "--hidden", str(args.hidden), "--layers", str(args.layers), "--requests", str(args.requests),
        "--max-tokens", str(args.max_tokens), "--max-batch-size", str(args.max_batch_size),
        "--device", args.device, "--rounds", str(args.rounds), "--clients", *map(str, args.clients),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lmflow-bench-serve-") as tmp:
        workdir = Path(tmp)
        config = llama_config(args.hidden, args.layers, 512, tie=True)
        save_model(config, workdir / "model")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMFLOW_CACHE": str(workdir / "cache")}
        loads = run_child(__file__, workdir, env, "both", arguments)
    report(args, config, loads)


def parameters(config) -> int:
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(config).parameters())


def report(args: argparse.Namespace, config, loads: dict[str, dict[str, list[dict]]]) -> None:
    rows = []
    for clients, runs in loads.items():
        median = {
            side: {k: statistics.median(r[k] for r in runs[side]) for k in ("tokens_per_s", "p50_s", "p95_s")}
            for side in SIDES
        }
        speedups = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs["plain"], runs["lmflow"])]
        rows.append(
            {
                "clients": int(clients),
                "one_at_a_time": median["plain"],
                "batched": median["lmflow"],
                "speedup": statistics.median(speedups),
                "same_texts": all(
                    r["texts"] == runs["plain"][0]["texts"] for side in SIDES for r in runs[side]
                ),
            }
        )
    lines = [
        f"lmflow serve: Llama hidden {args.hidden} x {args.layers} layers ({parameters(config) / 1e6:.1f}M "
        f"parameters), {args.device}, greedy, max_tokens {args.max_tokens}; batched: --max-batch-size "
        f"{args.max_batch_size}; medians of {args.rounds} alternating rounds",
        "",
        "| clients | tokens/s one at a time | tokens/s batched | batched / one at a time | p50 latency (s) one "
        "at a time / batched | p95 latency (s) one at a time / batched | same texts |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        a, b = r["one_at_a_time"], r["batched"]
        lines.append(
            f"| {r['clients']} | {a['tokens_per_s']:,.0f} | {b['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
            f"{a['p50_s']:.2f} / {b['p50_s']:.2f} | {a['p95_s']:.2f} / {b['p95_s']:.2f} | "
            f"{'yes' if r['same_texts'] else 'no'} |"
        )
    print("\n".join(lines))
    out = args.out or HERE / "results" / f"serve-{args.device.split(':')[0]}.json"
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("child", "workdir")}
    for runs in loads.values():
        for side in SIDES:
            for entry in runs[side]:
                entry.pop("texts")
    write_results(out, {"settings": settings, "table": rows, "runs": loads})


if __name__ == "__main__":
    main()
