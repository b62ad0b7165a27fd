"""Several processes for one run: ``lmflow run --nproc N`` starts them through torchrun.

The launching process checks the whole configuration first (so a mistake is reported once, before any process
starts), then runs ``python -m torch.distributed.run ... -m lmflow_core.cli run <the same arguments>``. Each
process trains with the Trainer's data parallelism (DDP), or with the engine a plugin selects (``zero3``,
``zero2``, ``fsdp``); only the first process prints and writes the output directory.

Users who start the processes themselves run the same module::

    torchrun --nproc-per-node 4 -m lmflow_core.cli run --model M --dataset D ...
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

import click

from .errors import ConfigError

GROUP = "Launch (several processes)"


@dataclass
class Launch:
    """How many processes to start, on how many machines."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500

    @property
    def distributed(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def launch_params() -> list[click.Option]:
    """The ``run`` options that start several processes."""
    params = [
        click.Option(
            ["--nproc"],
            type=click.IntRange(min=1),
            default=1,
            help="Processes to start on this machine (one per GPU; on CPU, processes over gloo). [default: 1]",
        ),
        click.Option(
            ["--nnodes"], type=click.IntRange(min=1), default=1, help="Machines taking part. [default: 1]"
        ),
        click.Option(
            ["--node-rank"],
            type=click.IntRange(min=0),
            default=0,
            help="This machine's index among --nnodes (0 on the first). [default: 0]",
        ),
        click.Option(["--master-addr"], help="Address of machine 0, reachable from all (with --nnodes > 1)."),
        click.Option(
            ["--master-port"],
            type=click.IntRange(min=1, max=65535),
            default=29500,
            help="Free TCP port on machine 0 (with --nnodes > 1). [default: 29500]",
        ),
    ]
    for param in params:
        param.lmflow_group = GROUP  # type: ignore[attr-defined]
        param.lmflow_launch = True  # type: ignore[attr-defined]
    return params


def check_launch(launch: Launch) -> None:
    """Refuse launches that cannot work, before anything starts."""
    if not launch.distributed:
        return
    if os.environ.get("LOCAL_RANK") is not None:
        raise ConfigError(
            "--nproc/--nnodes given inside a process that torchrun (or another launcher) already started",
            "drop --nproc and --nnodes: the launcher decides how many processes run",
        )
    if launch.nnodes > 1 and not launch.master_addr:
        raise ConfigError(
            f"--nnodes {launch.nnodes} needs --master-addr (the address of machine 0)",
            "pass --master-addr HOST and the same --master-port on every machine",
        )
    if launch.node_rank >= launch.nnodes:
        raise ConfigError(
            f"--node-rank {launch.node_rank} is not below --nnodes {launch.nnodes}",
            f"number the machines 0 to {launch.nnodes - 1}",
        )
    import torch

    if torch.cuda.is_available() and launch.nproc > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc {launch.nproc} exceeds the {torch.cuda.device_count()} GPUs of this machine",
            f"use --nproc {torch.cuda.device_count()} or fewer (one process per GPU)",
        )


def strip_launch_args(args: list[str]) -> list[str]:
    """The command-line arguments without the launch flags (what each started process receives)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in LAUNCH_FLAGS:
            skip = True
            continue
        if arg.split("=", 1)[0] in LAUNCH_FLAGS and "=" in arg:
            continue
        out.append(arg)
    return out


def torchrun_command(launch: Launch, run_args: list[str]) -> list[str]:
    """The torchrun command line that starts ``lmflow run run_args`` in every process of this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.nnodes == 1:
        command.append("--standalone")  # a rendezvous on a free local port
    else:
        command += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            f"--master-addr={launch.master_addr}",
            f"--master-port={launch.master_port}",
        ]
    return [*command, "-m", "lmflow_core.cli", "run", *run_args]


def start(launch: Launch, run_args: list[str]) -> int:
    """Run the processes of this machine and wait for them; returns the exit code."""
    command = torchrun_command(launch, run_args)
    click.echo(f"starting {launch.nproc} processes: {shlex.join(command[1:])}", err=True)
    env = {**os.environ, "LMFLOW_LAUNCHED": "1"}
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise warn that it found no GPU
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc)))
    return subprocess.call(command, env=env)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    """A TCP port on this machine that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
