"""`python -m engine train ... --nproc N`: start the run on N processes with torchrun.

The command becomes (one node, a free port chosen by torchrun):

    python -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node N
        --max-restarts R --shutdown-timeout S -m engine train <our flags> --run-name NAME

and replaces the engine process (exec), so the pid the dashboard recorded is torchrun's agent,
whose process group a Stop signals; the agent forwards SIGTERM to every worker.

torchrun parses the whole command line before it hands the rest to the module, and its argparse
refuses any flag of ours that is an ambiguous abbreviation of two of its own options (`--run` of
`--run-path`/`--run_path`: "ambiguous option: --run could match --run-path, --run_path"). So the
workers get `--run-name` instead of `--run`, and `check_passes_through` rejects any other such flag.
The run name is fixed here (the default one too) so that every rank, and every elastic restart,
trains the same run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from engine.errors import EngineError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_MODULE = "torch.distributed.run"
DEFAULT_SHUTDOWN_TIMEOUT_S = 120  # SIGTERM -> SIGKILL grace: a stop finishes its step and saves last.pth
DEFAULT_RDZV_PORT = 29400
RUN_FLAG, RUN_NAME_FLAG = "--run", "--run-name"
LAUNCH_FLAGS = ("--nproc", "--max-restarts")  # ours, consumed here, never passed to the workers


class DistributedLaunchError(EngineError):
    """The torchrun command line cannot be built (bad process count, a flag torchrun would take)."""


def torchrun_options() -> list[str]:
    """Every option string torchrun's own parser knows (torch 2.14.1: --run-path, --nproc-per-node...)."""
    from torch.distributed.run import get_args_parser

    return sorted(s for action in get_args_parser()._actions for s in action.option_strings)


def check_passes_through(engine_args: Sequence[str], options: Optional[Sequence[str]] = None) -> None:
    """Refuse a flag of ours that torchrun's parser would claim: a prefix of one of its options."""
    options = torchrun_options() if options is None else options
    for arg in engine_args:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        clashes = [o for o in options if o.startswith(flag)]
        if clashes:
            raise DistributedLaunchError(f"flag {flag} cannot pass through torchrun (it abbreviates its "
                                         f"{', '.join(clashes)}); rename it")


def _take_option(args: list[str], flag: str) -> tuple[list[str], Optional[str]]:
    """(args without `flag VALUE` / `flag=VALUE`, the last value given or None)."""
    out, value, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == flag:
            if i + 1 >= len(args):
                raise DistributedLaunchError(f"{flag} needs a value")
            value, i = args[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            value, i = arg.split("=", 1)[1], i + 1
            continue
        out.append(arg)
        i += 1
    return out, value


def _count(value: Optional[str], flag: str, minimum: int) -> Optional[int]:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise DistributedLaunchError(f"{flag} {value!r}: expected an integer") from None
    if number < minimum:
        raise DistributedLaunchError(f"{flag} {number}: must be >= {minimum}")
    return number


def split_launch_args(train_args: Sequence[str]) -> tuple[list[str], int, int]:
    """(the train arguments for the workers, nproc, max_restarts) from `python -m engine train` arguments.

    `--nproc` and `--max-restarts` are removed; `--run NAME` becomes `--run-name NAME`.
    """
    args = list(train_args)
    args, nproc = _take_option(args, "--nproc")
    args, restarts = _take_option(args, "--max-restarts")
    args, run = _take_option(args, RUN_FLAG)
    args, run_name = _take_option(args, RUN_NAME_FLAG)
    name = run_name or run
    if name:
        args += [RUN_NAME_FLAG, name]
    return args, _count(nproc, "--nproc", 1) or 1, _count(restarts, "--max-restarts", 0) or 0


def needs_torchrun(nproc: int, max_restarts: int) -> bool:
    """One process without restarts is today's plain path (no torchrun, no process group)."""
    return nproc > 1 or max_restarts > 0


def torchrun_command(worker_args: Sequence[str], nproc: int, max_restarts: int = 0, *,
                     nnodes: int = 1, rdzv_endpoint: Optional[str] = None, rdzv_id: Optional[str] = None,
                     shutdown_timeout_s: int = DEFAULT_SHUTDOWN_TIMEOUT_S,
                     python: Optional[str] = None) -> list[str]:
    """The torchrun command that runs `python -m engine <worker_args>` on `nproc` processes per node.

    One node: `--standalone` (rendezvous on localhost, a free port). Several: c10d rendezvous at
    `rdzv_endpoint` (host:port of one node) under `rdzv_id` (the same on every node).
    """
    if nproc < 1:
        raise DistributedLaunchError(f"--nproc {nproc}: must be >= 1")
    if max_restarts < 0:
        raise DistributedLaunchError(f"--max-restarts {max_restarts}: must be >= 0")
    check_passes_through(worker_args)
    cmd = [python or sys.executable, "-m", TORCHRUN_MODULE]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        if not rdzv_endpoint or not rdzv_id:
            raise DistributedLaunchError(f"{nnodes} nodes need a rendezvous endpoint (host:port) and id")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id]
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--shutdown-timeout", str(int(shutdown_timeout_s)), "-m", "engine", *worker_args]
    return cmd


def launch_environment(env: Optional[dict] = None) -> dict:
    """The launcher's environment: the engine importable in every worker, output unbuffered."""
    env = dict(os.environ if env is None else env)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PROJECT_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *paths])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def exec_torchrun(cmd: Sequence[str]) -> None:  # pragma: no cover - replaces the process
    """Replace this process with torchrun (same pid: the dashboard's recorded pid is the agent)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], list(cmd), launch_environment())


def under_torchrun(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or "WORLD_SIZE" in env


def train_launch_command(train_args: Sequence[str], run_name: Optional[str]) -> Optional[list[str]]:
    """The torchrun command for `python -m engine train <train_args>`, or None for one plain process.

    `run_name` is the name every rank must use (the default one decided now); it is added as
    --run-name unless the arguments resume a run (`--resume NAME` names it already).
    """
    worker_args, nproc, max_restarts = split_launch_args(train_args)
    if not needs_torchrun(nproc, max_restarts):
        return None
    if under_torchrun():
        raise DistributedLaunchError("--nproc / --max-restarts start torchrun, and this already runs under it; "
                                     "use torchrun's --nproc-per-node / --max-restarts instead")
    resuming = any(a == "--resume" or a.startswith("--resume=") for a in worker_args)
    if not resuming and RUN_NAME_FLAG not in worker_args and run_name:
        worker_args += [RUN_NAME_FLAG, run_name]
    return torchrun_command(["train", *worker_args], nproc, max_restarts)
