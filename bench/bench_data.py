"""Benchmark: preparing conversation data at scale, lmflow against plain `datasets` + `apply_chat_template`.

Generates seeded JSON Lines files of N two-message conversations (a user message and an assistant reply of
varied lengths, about 500 bytes a record, so 200,000 records are about 100 MB) and, for each size, prepares them
for training two ways, every measurement in a fresh child process:

* **plain**: what a user writes with the libraries alone: ``datasets.load_dataset("json", ...)``, then a batched
  ``map`` with ``num_proc=--processes`` calling ``tokenizer.apply_chat_template(messages, tokenize=True)``, the
  tokenizer carrying lmflow's own ``chatml`` template as Jinja (so both sides tokenize the same text). The loss
  mask is built the simplest honest way: the conversation without its final assistant reply is tokenized with
  ``add_generation_prompt=True`` and that many leading tokens of the full conversation get label -100
  (``return_assistant_tokens_mask`` would need a ``{% generation %}`` template). A fresh ``HF_DATASETS_CACHE``
  makes the first run a first run; the second run reuses it (datasets' own cache).
* **lmflow**: exactly what ``lmflow run --dataset FILE --template chatml`` does before it loads the model:
  ``configure`` -> ``check_run`` (reads and validates every record) -> ``tokenizer_for`` -> ``prepare_data``
  (tokenizes with masks, writes the tokenization cache); the second run, in a new process with the same
  ``LMFLOW_CACHE``, is the cached start.

Measured for each run:

* time to prepared data: from starting the process to the data being ready (interpreter start and imports
  included, as a user waits for them); throughput ratio = plain time / lmflow time (same records);
* peak memory: the peak of the summed proportional set size (PSS) of the child and all its descendants, sampled
  every 0.1 s (PSS counts pages that forked workers share once, so it is the memory the job really takes); the
  exact peak resident set size of the largest single process (``wait4``'s ``ru_maxrss``) is recorded too.

Before measuring, a sample of records is tokenized both ways in this process: the token ids must agree record by
record; the counts are reported.

A measurement that runs past ``--timeout`` or is killed (out of memory) is recorded as such; the benchmark goes
on. Results are written after every size.

Usage::

    python bench/bench_data.py                                  # 20k, 200k and 1M records
    python bench/bench_data.py --sizes 20000,200000 --out bench/results/data-cpu-baseline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GENERATOR_VERSION = 1  # bump when the generated records change, so old files are not reused
MB = 1024 * 1024
SAMPLE_RECORDS = 2000  # records tokenized both ways to check that the two sides agree
# Goals from the issue this benchmark was written for.
GOAL_THROUGHPUT = 0.8  # lmflow throughput / plain throughput, at least
GOAL_FLATNESS = 1.5  # lmflow peak at the largest size / peak at the smallest, at most
GOAL_PEAK_200K_MB = 1024
GOAL_CACHED_200K_S = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,200000,1000000", help="Numbers of records, comma-separated.")
    p.add_argument(
        "--processes",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="num_proc of the plain pipeline's map (default: the cores available).",
    )
    p.add_argument("--block-size", type=int, default=512, help="lmflow's block size (the demo model's).")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "data-cpu.json",
        help="Where to write the JSON results.",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="Seconds one measurement may take before it is stopped."
    )
    p.add_argument("--skip-lmflow-above", type=int, help="Measure only the plain pipeline above this size.")
    p.add_argument(
        "--data-dir",
        type=Path,
        help="Where the generated datasets are kept and reused (default: a temporary directory).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=["setup", "plain", "lmflow"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- data ---------------------------------------------------------------------------------------------------

WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has "
    "look more day could go come did number sound no most people my over know water than call first who may "
    "down side been now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence great think say "
    "help low line differ turn cause much mean before move right boy old too same tell does set three want "
    "air well also play small end put home read hand port large spell add even land here must big high such "
    "follow act why ask men change went light kind off need house picture try us again animal point mother "
    "world near build self earth father head stand own page should country found answer school grow study "
    "still learn plant cover food sun four between state keep eye never last let thought city tree cross "
    "farm hard start might story saw far sea draw left late run while press close night real life few north "
    "model data train token loss layer batch memory python function value error result example question"
).split()
ENDINGS = (".", ".", ".", "?", "!", ":")


def sentence(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(4, 18))
    if rng.random() < 0.15:
        words[rng.randrange(len(words))] = str(rng.randint(0, 10_000))
    if rng.random() < 0.2:
        words[rng.randrange(len(words))] += ","
    return " ".join(words).capitalize() + rng.choice(ENDINGS)


def paragraph(rng: random.Random, mean_sentences: float) -> str:
    count = max(1, round(rng.lognormvariate(0, 0.7) * mean_sentences))
    text = " ".join(sentence(rng) for _ in range(count))
    return text.replace(": ", ":\n") if rng.random() < 0.3 else text


def conversation(rng: random.Random) -> dict:
    """One record: a user message and an assistant reply, lengths log-normal (replies longer)."""
    return {
        "messages": [
            {"role": "user", "content": paragraph(rng, 1.6)},
            {"role": "assistant", "content": paragraph(rng, 3.9)},
        ]
    }


def dataset_file(directory: Path, size: int, seed: int) -> Path:
    """The JSON Lines file of ``size`` records, generated (seeded) unless it is there already."""
    path = directory / f"conversations-{size}-seed{seed}-v{GENERATOR_VERSION}.jsonl"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{size}")
    staging = path.with_suffix(".partial")
    with open(staging, "w", encoding="utf-8") as handle:
        for _ in range(size):
            handle.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
    os.replace(staging, path)
    return path


# ---- measured sides (children) ------------------------------------------------------------------------------


def child_plain(args: argparse.Namespace) -> dict:
    """The plain pipeline: datasets + apply_chat_template, prompt-prefix loss mask, ``num_proc`` workers."""
    entered = time.perf_counter()
    from datasets import load_dataset
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.workdir / "tokenizer")  # carries the chatml template
    raw = load_dataset("json", data_files=str(args.data), split="train")
    loaded = time.perf_counter()
    files_before = _arrow_files()
    data = raw.map(
        plain_encode,
        fn_kwargs={"tokenizer": tokenizer},
        batched=True,
        num_proc=args.processes if args.processes > 1 else None,
        remove_columns=raw.column_names,
    )
    mapped = time.perf_counter()
    return {
        "imports_s": started - entered,
        "load_s": loaded - started,
        "map_s": mapped - loaded,
        "map_from_cache": _arrow_files() == files_before,
        **plain_counts(data),
    }


def plain_encode(batch: dict, tokenizer) -> dict:
    """Token ids of each whole conversation; labels -100 over the prompt (all but the final reply)."""
    full = _ids(tokenizer.apply_chat_template(batch["messages"], tokenize=True))
    prompts = _ids(
        tokenizer.apply_chat_template(
            [messages[:-1] for messages in batch["messages"]], tokenize=True, add_generation_prompt=True
        )
    )
    labels = [[-100] * len(prompt) + ids[len(prompt) :] for prompt, ids in zip(prompts, full)]
    return {"input_ids": full, "attention_mask": [[1] * len(ids) for ids in full], "labels": labels}


def _ids(encoded) -> list[list[int]]:
    """``input_ids`` of what ``apply_chat_template`` returns (a BatchEncoding in transformers 5, a list before)."""
    return encoded["input_ids"] if hasattr(encoded, "keys") else encoded


def plain_counts(data) -> dict:
    """Examples, tokens and trained tokens of the plain result, counted in Arrow (nothing loaded into Python)."""
    import pyarrow.compute as pc

    table = data.data.table
    labels = pc.list_flatten(table.column("labels"))
    return {
        "examples": len(data),
        "tokens": pc.sum(pc.list_value_length(table.column("input_ids"))).as_py(),
        "trained_tokens": pc.sum(pc.not_equal(labels, -100)).as_py(),
    }


def _arrow_files() -> set[str]:
    cache = Path(os.environ["HF_DATASETS_CACHE"])
    return {str(p) for p in cache.rglob("*.arrow")} if cache.is_dir() else set()


def child_lmflow(args: argparse.Namespace) -> dict:
    """What `lmflow run --dataset FILE --template chatml` does before it loads the model."""
    entered = time.perf_counter()
    from lmflow_core.data.pipeline import prepare_data
    from lmflow_core.demo import demo_model_dir
    from lmflow_core.loading import tokenizer_for
    from lmflow_core.report import Reporter, quiet_libraries
    from lmflow_core.train import check_run, configure

    started = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        report = Reporter(stream=devnull).activate()
        quiet_libraries()
        config, run_plugins = configure(
            model=str(demo_model_dir()),
            dataset=str(args.data),
            template="chatml",
            block_size=args.block_size,
            output_dir=str(args.workdir / "lmflow-run"),
            max_steps=1,
        )
        checked = check_run(config, run_plugins)
        read = time.perf_counter()
        tokenizer = tokenizer_for(config, run_plugins)
        _, _, stats = prepare_data(
            config,
            run_plugins,
            tokenizer,
            checked.template,
            checked.block_size,
            checked.train_raw,
            None,
            report,
        )
    prepared = time.perf_counter()
    train = stats["train"]
    return {
        "imports_s": started - entered,
        "read_s": read - started,
        "tokenize_s": prepared - read,
        "from_cache": train["cached"],
        "examples": train["examples"],
        "tokens": train["tokens"],
        "trained_tokens": train["trained_tokens"],
        "truncated": train["truncated"],
    }


def child(args: argparse.Namespace) -> None:
    if args.child == "setup":
        save_tokenizer(args.workdir / "tokenizer")
        result = {"machine": machine(), "agreement": agreement(args.data, args.workdir, SAMPLE_RECORDS)}
        print(json.dumps(result), flush=True)
        return
    work_started = time.time()  # after the interpreter started and this script was imported
    result = child_plain(args) if args.child == "plain" else child_lmflow(args)
    # The parent measures from the moment it started this process.
    result["ready_at"], result["work_started_at"] = time.time(), work_started
    print(json.dumps(result), flush=True)


# ---- the same records both ways (parent) --------------------------------------------------------------------


def agreement(path: Path, workdir: Path, count: int) -> dict:
    """Tokenize the first ``count`` records both ways; compare ids and trained tokens record by record."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    from lmflow_core.catalog import get_template
    from lmflow_core.data import load_raw_dataset
    from lmflow_core.templates import Conversation, encode_segments

    logging.set_verbosity_error()  # records longer than the demo's context are expected here

    sample = workdir / "sample.jsonl"
    with open(path, encoding="utf-8") as source:
        sample.write_text("".join(line for _, line in zip(range(count), source)), encoding="utf-8")
    template = get_template("chatml")
    tokenizer = AutoTokenizer.from_pretrained(workdir / "tokenizer")
    records = [json.loads(line) for line in sample.read_text(encoding="utf-8").splitlines()]
    plain = plain_encode({"messages": [r["messages"] for r in records]}, tokenizer)
    raw = load_raw_dataset(sample, template)
    rendered = [
        template.render(Conversation.from_messages(r["messages"], r["system"]), False, tokenizer)
        for r in raw.records
    ]
    ids, labels = encode_segments(tokenizer, rendered, template)
    prompts = _ids(
        tokenizer.apply_chat_template(
            [r["messages"][:-1] for r in records], tokenize=True, add_generation_prompt=True
        )
    )
    trained_plain = [sum(t != -100 for t in x) for x in plain["labels"]]
    trained_lmflow = [sum(t != -100 for t in x) for x in labels]
    lengths = [len(x) for x in ids]
    return {
        "records": len(records),
        "same_ids": sum(a == b for a, b in zip(plain["input_ids"], ids)),
        "same_length": sum(len(a) == len(b) for a, b in zip(plain["input_ids"], ids)),
        "prompt_is_prefix": sum(full[: len(p)] == p for p, full in zip(prompts, plain["input_ids"])),
        "tokens_plain": sum(len(x) for x in plain["input_ids"]),
        "tokens_lmflow": sum(lengths),
        "tokens_per_record_mean": sum(lengths) / len(lengths),
        "tokens_per_record_max": max(lengths),
        "trained_plain": sum(trained_plain),
        "trained_lmflow": sum(trained_lmflow),
        # lmflow trains the reply and <|im_end|>; the plain mask also trains the newline after <|im_end|>.
        "trained_differences": dict(
            sorted(_count(a - b for a, b in zip(trained_plain, trained_lmflow)).items())
        ),
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[str(value)] = out.get(str(value), 0) + 1
    return out


# ---- process measurement (parent) ---------------------------------------------------------------------------


def measure(args: argparse.Namespace, side: str, data: Path, workdir: Path, env: dict) -> dict:
    """Run one side in a fresh process; time to ready data, peak memory of its process tree, its result."""
    command = [sys.executable, __file__, "--child", side, "--data", str(data), "--workdir", str(workdir)]
    command += ["--processes", str(args.processes), "--block-size", str(args.block_size)]
    log = workdir / f"{side}-{int(time.time() * 1000)}.log"
    out = workdir / f"{side}.out"
    with open(log, "w") as stderr, open(out, "w") as stdout:
        spawned = time.time()
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, start_new_session=True)
        peak_pss = peak_rss_sum = 0
        loads: list[float] = []  # the machine's 1-minute load average: other work slows every wall time
        status, usage, outcome = None, None, "ok"
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            loads.append(os.getloadavg()[0])
            pss, rss = tree_memory(process.pid)
            peak_pss, peak_rss_sum = max(peak_pss, pss), max(peak_rss_sum, rss)
            if time.time() - spawned > args.timeout:
                os.killpg(process.pid, signal.SIGKILL)
                _, status, usage = os.wait4(process.pid, 0)
                outcome = "timeout"
                break
            time.sleep(0.1)
        exited = time.time()
        process.returncode = os.waitstatus_to_exitcode(status)
    _kill_leftovers(process.pid)
    result = {
        "outcome": outcome,
        "exit_s": exited - spawned,
        "peak_pss_mb": peak_pss / MB,
        "peak_rss_sum_mb": peak_rss_sum / MB,
        "max_rss_mb": usage.ru_maxrss * 1024 / MB,  # Linux reports kilobytes
        # CPU time of the child and the workers it waited for: less sensitive than wall time to other work.
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load_mean": sum(loads) / len(loads) if loads else os.getloadavg()[0],
    }
    if outcome == "ok" and process.returncode != 0:
        killed = process.returncode == -signal.SIGKILL
        result["outcome"] = "killed (out of memory?)" if killed else f"failed (exit {process.returncode})"
    if result["outcome"] != "ok":
        result["stderr_tail"] = log.read_text(errors="replace")[-2000:]
        return result
    report = json.loads(out.read_text().strip().splitlines()[-1])
    result["ready_s"] = report.pop("ready_at") - spawned
    result["startup_s"] = report.pop("work_started_at") - spawned
    result.update(report)
    return result


def tree_memory(root: int) -> tuple[int, int]:
    """Summed PSS and RSS, in bytes, of ``root`` and its descendants (processes gone meanwhile are skipped)."""
    pss = rss = 0
    pending = [root]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
            pending += children(pid)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pss, rss


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _kill_leftovers(group: int) -> None:
    """Workers of a killed child may outlive it; they are in its session's process group."""
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- driver -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="lmflow-bench-data-") as tmp:
        workdir = Path(tmp)
        data_dir = args.data_dir or workdir / "datasets"
        payload: dict = {"settings": settings(args, sizes), "sizes": []}
        for size in sizes:
            started = time.perf_counter()
            path = dataset_file(data_dir, size, args.seed)
            print(
                f"{size:,} records: {path.stat().st_size / MB:.1f} MB ({time.perf_counter() - started:.0f} s)"
            )
            if "agreement" not in payload:
                payload.update(setup(path, workdir))
                print(f"agreement on the first {SAMPLE_RECORDS:,} records: {payload['agreement']}")
            payload["sizes"].append(measure_size(args, size, path, workdir))
            payload["goals"] = goals(payload["sizes"])
            write_results(args.out, payload)
    print()
    print(table(payload))
    print()
    for name, verdict in payload["goals"].items():
        print(f"{name}: {verdict}")
    print(f"\nresults: {args.out}")


def measure_size(args: argparse.Namespace, size: int, path: Path, workdir: Path) -> dict:
    """Plain first run, plain cached run, lmflow first run, lmflow cached run, each in a fresh process."""
    entry = {"records": size, "file_mb": path.stat().st_size / MB, "plain": {}, "lmflow": {}}
    skip_lmflow = args.skip_lmflow_above is not None and size > args.skip_lmflow_above
    for side in ("plain", "lmflow"):
        if side == "lmflow" and skip_lmflow:
            entry[side] = {"first": {"outcome": "skipped"}, "cached": {"outcome": "skipped"}}
            continue
        caches = workdir / f"caches-{side}-{size}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(caches / "hf-datasets"),
            "LMFLOW_CACHE": str(caches / "lmflow"),
        }
        for run in ("first", "cached"):
            result = measure(args, side, path, workdir, env)
            entry[side][run] = result
            shown = f"{result['ready_s']:.1f} s" if "ready_s" in result else result["outcome"]
            print(f"  {side} {run}: {shown}, peak {result['peak_pss_mb']:,.0f} MB (PSS of all processes)")
        shutil.rmtree(caches, ignore_errors=True)
    return entry


def setup(path: Path, workdir: Path) -> dict:
    """Machine info, the chatml tokenizer both sides load, and the agreement check, in a child process.

    The parent stays small: a child's ``ru_maxrss`` starts from the size of the process that started it.
    """
    command = [sys.executable, __file__, "--child", "setup", "--data", str(path), "--workdir", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.exit(f"setup failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_tokenizer(directory: Path) -> None:
    """The demo tokenizer with lmflow's chatml template as its Jinja chat template."""
    from transformers import AutoTokenizer

    from lmflow_core.catalog import get_template
    from lmflow_core.demo import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    tokenizer.chat_template = get_template("chatml").to_jinja()
    tokenizer.save_pretrained(directory)


def settings(args: argparse.Namespace, sizes: list[int]) -> dict:
    return {
        "sizes": sizes,
        "processes": args.processes,
        "block_size": args.block_size,
        "timeout_s": args.timeout,
        "skip_lmflow_above": args.skip_lmflow_above,
        "seed": args.seed,
        "tokenizer": "bundled demo, lmflow chatml template",
        "lmflow_processes": "lmflow runs as `lmflow run` does: --preprocessing-workers by default, the cores available",
    }


def machine() -> dict:
    import datasets
    import pyarrow
    import torch
    import transformers

    from lmflow_core.version import __version__

    cpu = next(
        (line.split(":", 1)[1].strip() for line in _lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    memory = next((line.split()[1] for line in _lines("/proc/meminfo") if line.startswith("MemTotal")), "0")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cores_available": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(int(memory) / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
        "lmflow": __version__,
        "commit": commit.strip(),
    }


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def goals(entries: list[dict]) -> dict[str, str]:
    """The issue's goals, judged on what was measured ("not measured" where a size or side is missing)."""
    out: dict[str, str] = {}
    ratios = [f"{e['records']:,}: {r:.2f}" for e in entries if (r := ratio(e)) is not None]
    worst = min((r for e in entries if (r := ratio(e)) is not None), default=None)
    out[f"throughput >= {GOAL_THROUGHPUT}x plain"] = (
        "not measured" if worst is None else f"{_verdict(worst >= GOAL_THROUGHPUT)} ({', '.join(ratios)})"
    )
    peaks = [
        (e["records"], p) for e in entries if (p := _get(e, "lmflow", "first", "peak_pss_mb")) is not None
    ]
    if len(peaks) > 1:
        growth = peaks[-1][1] / peaks[0][1]
        out[f"peak at {peaks[-1][0]:,} <= {GOAL_FLATNESS}x peak at {peaks[0][0]:,}"] = (
            f"{_verdict(growth <= GOAL_FLATNESS)} ({growth:.2f}x)"
        )
    at_200k = next((e for e in entries if e["records"] == 200_000), None)
    peak = _get(at_200k, "lmflow", "first", "peak_pss_mb") if at_200k else None
    cached = _get(at_200k, "lmflow", "cached", "ready_s") if at_200k else None
    out[f"peak at 200,000 <= {GOAL_PEAK_200K_MB} MB"] = (
        "not measured" if peak is None else f"{_verdict(peak <= GOAL_PEAK_200K_MB)} ({peak:,.0f} MB)"
    )
    out[f"cached start at 200,000 <= {GOAL_CACHED_200K_S:.0f} s"] = (
        "not measured" if cached is None else f"{_verdict(cached <= GOAL_CACHED_200K_S)} ({cached:.1f} s)"
    )
    return out


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def _get(entry: dict | None, side: str, run: str, key: str):
    return (entry or {}).get(side, {}).get(run, {}).get(key)


def ratio(entry: dict) -> float | None:
    """lmflow throughput / plain throughput on the first (uncached) run: plain time / lmflow time."""
    plain, lmflow = _get(entry, "plain", "first", "ready_s"), _get(entry, "lmflow", "first", "ready_s")
    return plain / lmflow if plain and lmflow else None


def table(payload: dict) -> str:
    def seconds(entry: dict, side: str, run: str) -> str:
        result = entry[side][run]
        return f"{result['ready_s']:.1f}" if "ready_s" in result else result["outcome"]

    def peak(entry: dict, side: str) -> str:
        result = entry[side]["first"]
        return f"{result['peak_pss_mb']:,.0f}" if result["outcome"] == "ok" else result["outcome"]

    def cpu(entry: dict, side: str) -> str:
        result = entry[side]["first"]
        return f"{result['cpu_s']:.1f}" if result["outcome"] == "ok" else "-"

    def load(entry: dict) -> str:
        values = [entry[side]["first"].get("load_mean") for side in ("plain", "lmflow")]
        return " / ".join(f"{v:.1f}" for v in values if v is not None)

    processes = payload["settings"]["processes"]
    lines = [
        f"data preparation: demo tokenizer, chatml template, plain map with num_proc={processes}; times from "
        "process start to prepared data; peak = summed PSS of all processes; CPU s = user + system time of "
        "all processes; load = the machine's mean 1-minute load average during the first runs",
        "",
        "| records | file MB | plain s | lmflow s | lmflow / plain throughput | plain peak MB | lmflow peak MB "
        "| plain cached s | lmflow cached s | plain CPU s | lmflow CPU s | load |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in payload["sizes"]:
        r = ratio(e)
        lines.append(
            f"| {e['records']:,} | {e['file_mb']:.1f} | {seconds(e, 'plain', 'first')} | "
            f"{seconds(e, 'lmflow', 'first')} | {'-' if r is None else f'{r:.2f}'} | {peak(e, 'plain')} | "
            f"{peak(e, 'lmflow')} | {seconds(e, 'plain', 'cached')} | {seconds(e, 'lmflow', 'cached')} | "
            f"{cpu(e, 'plain')} | {cpu(e, 'lmflow')} | {load(e)} |"
        )
    return "\n".join(lines)


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
