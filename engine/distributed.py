"""Training on several processes (GPUs, machines) with torch.distributed, launched by torchrun.

Every process runs the same training loop. This module holds what that loop calls to share work
and agree on decisions; in a single process (world size 1) every function is a cheap no-op and no
process group exists, so the one-GPU / CPU path is unchanged.

    ctx = init_from_env(cfg)                    # RANK, LOCAL_RANK, WORLD_SIZE... from torchrun
    batch = per_rank_batch_size(cfg.train.batch_size, ctx.world_size)
    model = wrap_model(model, ctx)              # DDP only when world size > 1
    losses = average_losses(loss_dict, ctx)     # the same floats on every rank
    decision = agree(ctx, stop=..., nonfinite=...)   # one all_gather per step: who wants what
    metrics = evaluate_distributed(model, valid_ds, ctx, ...)   # each rank predicts its share
    torch.save(model_state_dict(model))         # never a `module.` prefix
    shutdown(ctx)

Rules the functions assume: every rank calls every collective here at the same point of the loop
(so no `if ctx.is_main:` around them); small tensors (flags, losses) and objects travel on CPU
through gloo, also on CUDA, where the process group is "cpu:gloo,cuda:nccl".

Per-rank heartbeats: each rank replaces `<run_dir>/ranks/rank-N.json` (last step, host, pid, time,
CUDA peak memory) so a reader sees every rank, including a dead one, without a collective.
"""
from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from engine.data import start_loader_iterator
from engine.errors import EngineError
from engine.runs import RANKS_DIR  # <run_dir>/ranks/rank-N.json, one heartbeat file per rank

HEARTBEAT_EVERY_S = 5.0
CPU_BACKEND = "gloo"
CUDA_BACKEND = "cpu:gloo,cuda:nccl"  # NCCL for gradients, gloo for CPU flags and objects
TORCHRUN_MARKER = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent in every worker

T = TypeVar("T")
PathLike = Union[str, Path]


class DistributedError(EngineError):
    """Distributed training cannot start or go on (bad launch variables, batch, device, dead rank)."""


# ----------------------------------------------------------------------------- launch variables
@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or srun + torchrun, Kubeflow) tells a worker about itself."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    group_rank: int = 0  # the node's index
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    restart_count: int = 0
    max_restarts: int = 0
    run_id: Optional[str] = None  # TORCHELASTIC_RUN_ID: the same for every node and every restart
    under_torchrun: bool = False


def _int_var(env: Mapping[str, str], name: str, default: Optional[int]) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Parse and check the launcher's variables; none of them set = one process."""
    env = os.environ if env is None else env
    world = _int_var(env, "WORLD_SIZE", None)
    rank = _int_var(env, "RANK", None)
    if world is None and rank is None:
        return LaunchEnv(under_torchrun=TORCHRUN_MARKER in env)
    if world is None or rank is None:
        raise DistributedError("RANK and WORLD_SIZE must be set together (start the workers with torchrun)")
    local_rank = _int_var(env, "LOCAL_RANK", rank)
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if not 0 <= local_rank < max(1, local_world):
        raise DistributedError(f"LOCAL_RANK={local_rank} and LOCAL_WORLD_SIZE={local_world}: need "
                               f"0 <= LOCAL_RANK < LOCAL_WORLD_SIZE")
    addr, port = env.get("MASTER_ADDR") or None, _int_var(env, "MASTER_PORT", None)
    if world > 1 and (not addr or port is None):
        raise DistributedError(f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set "
                               f"(start the workers with torchrun)")
    return LaunchEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                     group_rank=_int_var(env, "GROUP_RANK", 0), master_addr=addr, master_port=port,
                     restart_count=_int_var(env, "TORCHELASTIC_RESTART_COUNT", 0),
                     max_restarts=_int_var(env, "TORCHELASTIC_MAX_RESTARTS", 0),
                     run_id=env.get(TORCHRUN_MARKER) or None, under_torchrun=TORCHRUN_MARKER in env)


# ----------------------------------------------------------------------------- the process group
@dataclass(frozen=True)
class DistContext:
    """Who this process is. `device` is the one it trains on (cuda:LOCAL_RANK on GPUs)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None  # None: no process group (world size 1)
    timeout_s: float = 1800.0
    restart_count: int = 0
    max_restarts: int = 0
    run_id: Optional[str] = None
    launcher_pid: Optional[int] = None  # the torchrun agent: signal its process group to stop the run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def status_fields(self) -> dict:
        """What status.json records about the job (rank 0 writes it)."""
        pgid = None
        if self.launcher_pid:
            try:
                pgid = os.getpgid(self.launcher_pid)
            except OSError:
                pgid = None
        return {"world_size": self.world_size, "nnodes": max(1, self.world_size // max(1, self.local_world_size)),
                "backend": self.backend, "restart_count": self.restart_count, "max_restarts": self.max_restarts,
                "elastic_run_id": self.run_id, "launcher_pid": self.launcher_pid, "launcher_pgid": pgid}


def rank_device(requested: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when training on CUDA with several processes."""
    from engine.model import resolve_device

    device = resolve_device(requested)
    if device.type != "cuda":
        return device
    if world_size > 1 and device.index is not None:
        raise DistributedError(f"train.device {requested!r}: with several processes each rank uses "
                               f"cuda:LOCAL_RANK; set train.device to cuda or auto")
    if device.index is None:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(f"LOCAL_RANK {local_rank} needs GPU {local_rank} but {socket.gethostname()} has "
                                   f"{count}; use at most {count} processes per node (--nproc-per-node)")
        device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def init_from_env(cfg, env: Optional[Mapping[str, str]] = None) -> DistContext:
    """Join the job torchrun started (gloo on CPU, NCCL + gloo on CUDA, timeout cfg.dist.timeout_s).

    World size 1 (plain `python -m engine train`, or torchrun with one process) creates no
    process group. Raises DistributedError with one line on a bad launch. `env` (default
    os.environ) is what is parsed; the process group itself always rendezvouses through
    os.environ (env://, torchrun's store).
    """
    launch = read_launch_env(env)
    timeout_s = float(cfg.dist.timeout_s)
    device = rank_device(cfg.train.device, launch.local_rank, launch.world_size)
    launcher_pid = os.getppid() if launch.under_torchrun else None
    common = dict(rank=launch.rank, local_rank=launch.local_rank, world_size=launch.world_size,
                  local_world_size=launch.local_world_size, device=device, timeout_s=timeout_s,
                  restart_count=launch.restart_count, max_restarts=launch.max_restarts, run_id=launch.run_id,
                  launcher_pid=launcher_pid)
    if launch.world_size == 1:
        return DistContext(**common)
    if dist.is_initialized():
        raise DistributedError("a torch.distributed process group already exists in this process")
    backend = CUDA_BACKEND if device.type == "cuda" else CPU_BACKEND
    try:
        dist.init_process_group(backend=backend, store=_attempt_store(launch, timeout_s), rank=launch.rank,
                                world_size=launch.world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except Exception as exc:
        raise DistributedError(f"rank {launch.rank}: cannot join the process group at "
                               f"{launch.master_addr}:{launch.master_port} ({type(exc).__name__}: "
                               f"{_first_line(exc)})") from None
    return DistContext(**common, backend=backend)


def _attempt_store(launch: LaunchEnv, timeout_s: float):
    """The env:// rendezvous store, with keys of this attempt only (prefix `attempt-<restart count>`).

    torchrun (2.14.1) keeps one store across elastic restarts and the workers of a restart would
    otherwise read the previous attempt's addresses from it (gloo: "connectFullMesh failed ...
    Connection refused" to a port of the dead attempt), depending on who writes first."""
    store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size, timeout=timedelta(seconds=timeout_s)))
    return dist.PrefixStore(f"engine/attempt-{launch.restart_count}", store)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (if any); safe to call twice and after a failed collective."""
    if ctx.distributed and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


PEER_FAILURE_TEXTS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "timed out",
                      "Timed out", "NCCL communicator was aborted", "failed to recv", "failed to send")


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when another rank died or stopped answering."""
    if isinstance(exc, getattr(dist, "DistBackendError", ())) or isinstance(exc, getattr(dist, "DistNetworkError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in PEER_FAILURE_TEXTS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- batches and samplers
def per_rank_batch_size(global_batch: int, world_size: int) -> int:
    """train.batch_size is the global batch; each rank takes its share (world size must divide it)."""
    if world_size < 1:
        raise DistributedError(f"world size {world_size}: must be >= 1")
    if global_batch % world_size:
        lower = (global_batch // world_size) * world_size
        upper = lower + world_size
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise DistributedError(f"train.batch_size {global_batch} is the global batch and must be divisible by the "
                               f"number of processes ({world_size}); use {hint}, or another process count")
    return global_batch // world_size


def steps_per_epoch(num_images: int, global_batch: int, world_size: int) -> int:
    """Optimizer steps per epoch: DistributedSampler pads the set to a multiple of the world size,
    and each rank takes batches of global_batch / world_size (the last one may be short)."""
    per_rank_images = math.ceil(num_images / world_size)
    return math.ceil(per_rank_images / per_rank_batch_size(global_batch, world_size))


def train_sampler(dataset, ctx: DistContext, seed: int, epoch: int) -> DistributedSampler:
    """This rank's shuffled share of the epoch; the same seed on every rank, reshuffled per epoch."""
    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return sampler


def eval_batches(num_images: int, batch_size: int, ctx: DistContext) -> list[list[int]]:
    """This rank's evaluation batches: the one-process batches [0..B-1], [B..2B-1], ... dealt out in
    turn (rank r takes batches r, r + W, ...). Every image is predicted once, inside exactly the batch
    it has in a single process, so the predictions (and the metrics) are the same bit for bit;
    DistributedSampler's image-level split regroups images and moves scores (see docs/distributed.md)."""
    if batch_size < 1:
        raise DistributedError(f"evaluation batch size {batch_size}: must be >= 1")
    batches = [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]
    return batches[ctx.rank::ctx.world_size]


def eval_rounds(num_images: int, batch_size: int, world_size: int) -> int:
    """Batches of the rank with the most: every rank takes part in that many stop decisions."""
    return math.ceil(math.ceil(num_images / batch_size) / world_size)


def augmentation_seed(seed: int, rank: int) -> int:
    """The per-rank seed for augmentation RNGs (flip, jitter, size), so ranks do not draw alike."""
    return int(seed) + 1000003 * int(rank)


# ----------------------------------------------------------------------------- the model
def wrap_model(model: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `model` (already on ctx.device) when world size > 1."""
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (what is saved, evaluated and probed)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def model_state_dict(model: nn.Module) -> dict:
    """The state dict to save: keys exactly as a plain model has them (no `module.` prefix)."""
    return unwrap_model(model).state_dict()


def parameter_checksum(model: nn.Module) -> str:
    """sha256 of every parameter's name and bytes: equal only when the weights are bit-identical."""
    digest = hashlib.sha256()
    for name, param in unwrap_model(model).named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def gather_checksums(model: nn.Module, ctx: DistContext) -> list[str]:
    """parameter_checksum of every rank, in rank order (on every rank)."""
    return all_gather_object(parameter_checksum(model), ctx)


# ----------------------------------------------------------------------------- collectives
def all_gather_object(obj: T, ctx: DistContext) -> list[T]:
    if ctx.world_size == 1:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """`obj` of rank `src` on every rank (e.g. the run name decided once by rank 0)."""
    if ctx.world_size == 1:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def on_main_then_share(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Rank 0 runs `fn` (e.g. claim the run folder); every rank gets its result, or, when it raised,
    every other rank raises DistributedError with the same message (nobody waits for a rank that left)."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as exc:
            error = exc
    shared = broadcast_object((result, None if error is None else _first_line(error)), ctx)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise DistributedError(f"rank 0 failed: {shared[1]}")
    return shared[0]


def average_losses(loss_dict: Mapping[str, Any], ctx: DistContext) -> dict[str, float]:
    """{name: mean over ranks} for every loss of `loss_dict`, plus "loss" (the mean of each rank's sum).

    Every rank gets the same floats; a NaN or inf on any rank makes the average non-finite on all
    of them, so a check on the result stops all ranks at the same step. All ranks must pass the
    same keys (Faster R-CNN always returns its four losses).
    """
    keys = sorted(k for k in loss_dict if k != "loss")
    values = [float(loss_dict[k].detach()) if isinstance(loss_dict[k], torch.Tensor) else float(loss_dict[k])
              for k in keys]
    raw_total = loss_dict.get("loss")
    total = float(raw_total.detach() if isinstance(raw_total, torch.Tensor) else raw_total) \
        if raw_total is not None else sum(values)
    local = torch.tensor(values + [total], dtype=torch.float64)
    if ctx.world_size > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM)
        local /= ctx.world_size
    averaged = local.tolist()
    return {**dict(zip(keys, averaged[:-1])), "loss": averaged[-1]}


def nonfinite_losses(losses: Mapping[str, float]) -> list[str]:
    """The names of the losses that are NaN or infinite."""
    return [k for k, v in losses.items() if not math.isfinite(v)]


@dataclass(frozen=True)
class Decision:
    """The flags of every rank after `agree`: `decision["stop"]` is True when any rank raised it."""
    ranks: dict  # flag name -> the ranks that raised it

    def __getitem__(self, name: str) -> bool:
        return bool(self.ranks.get(name))

    def any(self) -> bool:
        return any(self.ranks.values())

    def who(self, name: str) -> str:
        ranks = self.ranks.get(name) or []
        return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks)) if ranks else ""


def agree(ctx: DistContext, **flags: bool) -> Decision:
    """One all_gather of this rank's flags (e.g. stop=, nonfinite=, early_stop=): every rank learns
    which ranks raised which flag and so every rank takes the same branch at the same step."""
    names = sorted(flags)
    local = torch.tensor([1 if flags[n] else 0 for n in names], dtype=torch.int32)
    if ctx.world_size == 1:
        rows = [local]
    else:
        rows = [torch.zeros_like(local) for _ in range(ctx.world_size)]
        dist.all_gather(rows, local)
    return Decision({n: [r for r, row in enumerate(rows) if int(row[i])] for i, n in enumerate(names)})


# ----------------------------------------------------------------------------- evaluation
class EvaluationStopped(Exception):
    """A rank asked to stop during distributed evaluation; all ranks leave it at the same batch."""


def eval_loader(dataset, ctx: DistContext, batch_size: int, collate_fn, num_workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """This rank's share of `dataset` (eval_batches), in dataset order."""
    return DataLoader(dataset, batch_sampler=eval_batches(len(dataset), batch_size, ctx), num_workers=num_workers,
                      collate_fn=collate_fn, pin_memory=pin_memory)


def merge_shards(shards: Sequence[tuple[list, list]], num_images: int, batch_size: int = 1) -> tuple[list, list]:
    """(gts, preds) of the whole set from each rank's (gts, preds), in dataset order.

    Rank r predicted batches r, r + W, ... of `batch_size` images (eval_batches); dealing them
    back restores the order. Entries whose image id was already seen are dropped (a sampler that
    pads, such as DistributedSampler's, repeats images). Raises DistributedError when the merged
    set is not exactly `num_images` images.
    """
    gts, preds, seen = [], [], set()
    rounds = max((math.ceil(len(s[0]) / batch_size) for s in shards), default=0)
    for k in range(rounds):
        for shard_gts, shard_preds in shards:
            chunk = slice(k * batch_size, (k + 1) * batch_size)
            for gt, pred in zip(shard_gts[chunk], shard_preds[chunk]):
                image_id = int(gt["image_id"])
                if image_id in seen:
                    continue
                seen.add(image_id)
                gts.append(gt)
                preds.append(pred)
    if len(gts) != num_images:
        raise DistributedError(f"distributed evaluation merged {len(gts)} distinct images, expected {num_images}")
    return gts, preds


def _agreeing_loader(loader, rounds: int, ctx: DistContext, should_stop: Optional[Callable[[], bool]], beat):
    """Yield the batches of `loader`. Every rank goes through `rounds` rounds (a rank with one batch
    fewer yields nothing in its last); with `should_stop`, all ranks agree in each round whether to stop."""
    batches = start_loader_iterator(loader)
    for _ in range(rounds):
        batch = next(batches, None)
        if beat is not None:
            beat()
        if should_stop is not None and agree(ctx, stop=bool(should_stop()))["stop"]:
            raise EvaluationStopped()
        if batch is not None:
            yield batch


def evaluate_distributed(model: nn.Module, dataset, ctx: DistContext, *, batch_size: int, collate_fn,
                         score_threshold: float, iou: float = 0.5, amp: bool = False,
                         amp_dtype: torch.dtype = torch.float16, num_workers: int = 0,
                         should_stop: Optional[Callable[[], bool]] = None, beat: Optional[Callable[[], None]] = None,
                         progress: bool = False) -> dict:
    """engine.metrics.detection_metrics of `dataset`, each rank predicting its share.

    Each rank predicts the one-process batches eval_batches gives it; rank 0 gathers the predictions,
    puts them back in dataset order (dropping any repeated image) and computes the metrics once;
    every rank returns the same dict (rank 0 broadcasts it), so best.pth and early stopping decide
    alike everywhere. The model is evaluated unwrapped (no DDP collectives in its forward) and its
    train/eval mode is restored. `should_stop` is asked before each batch and agreed on by all
    ranks (EvaluationStopped on every rank); `beat` is called before each batch.
    """
    from engine import metrics
    from engine.evaluate import predict_loader

    plain = unwrap_model(model)
    was_training = plain.training
    loader = eval_loader(dataset, ctx, batch_size, collate_fn, num_workers, pin_memory=ctx.device.type == "cuda")
    rounds = eval_rounds(len(dataset), batch_size, ctx.world_size)
    try:
        gts, preds = predict_loader(plain, _agreeing_loader(loader, rounds, ctx, should_stop, beat), ctx.device, amp,
                                    progress=progress and ctx.is_main, desc="validate", amp_dtype=amp_dtype)
    finally:
        plain.train(was_training)
    if ctx.world_size == 1:
        return metrics.detection_metrics(gts, preds, score_threshold, iou)
    shards: Optional[list] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object((gts, preds), shards, dst=0)
    result: Optional[dict] = None
    error: Optional[str] = None
    if ctx.is_main:
        try:
            all_gts, all_preds = merge_shards(shards, len(dataset), batch_size)
            result = metrics.detection_metrics(all_gts, all_preds, score_threshold, iou)
        except Exception as exc:  # shared, so no rank waits for a result that never comes
            error = f"{type(exc).__name__}: {_first_line(exc)}"
    result, error = broadcast_object((result, error), ctx)
    if error is not None:
        raise DistributedError(f"distributed evaluation failed on rank 0: {error}")
    return result


# ----------------------------------------------------------------------------- heartbeats
def heartbeat_path(run_dir: PathLike, rank: int) -> Path:
    return Path(run_dir) / RANKS_DIR / f"rank-{int(rank)}.json"


def cuda_peak_mb(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


class RankHeartbeat:
    """Replaces <run_dir>/ranks/rank-N.json at most every `every_s` seconds (always with force=True)."""

    def __init__(self, run_dir: PathLike, ctx: DistContext, every_s: float = HEARTBEAT_EVERY_S):
        self.path = heartbeat_path(run_dir, ctx.rank)
        self.ctx, self.every_s = ctx, float(every_s)
        self.last_write = 0.0
        self.record: dict = {"rank": ctx.rank, "local_rank": ctx.local_rank, "world_size": ctx.world_size,
                             "host": socket.gethostname(), "pid": os.getpid(), "device": str(ctx.device),
                             "restart_count": ctx.restart_count, "started_at": time.time()}

    def beat(self, step: int, epoch: Optional[int] = None, force: bool = False, **extra: Any) -> bool:
        """Record this rank's progress; returns True when the file was written."""
        from engine.runs import atomic_write_json

        now = time.time()
        self.record.update(step=int(step), epoch=epoch, **extra)
        if not force and now - self.last_write < self.every_s:
            return False
        self.record.update(time=now, gpu_mem_peak_mb=cuda_peak_mb(self.ctx.device))
        atomic_write_json(self.path, self.record)
        self.last_write = now
        return True


def read_heartbeats(run_dir: PathLike) -> list[dict]:
    """Every rank's last heartbeat, by rank; unreadable or half-written files are skipped."""
    from engine.runs import read_json

    folder = Path(run_dir) / RANKS_DIR
    out = []
    for path in sorted(folder.glob("rank-*.json")) if folder.is_dir() else []:
        record = read_json(path)
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            out.append(record)
    return sorted(out, key=lambda r: r["rank"])


def prune_heartbeats(run_dir: PathLike, world_size: int) -> None:
    """Drop the files of ranks >= world_size (left by an earlier, larger attempt of this run)."""
    for record in read_heartbeats(run_dir):
        if record["rank"] >= world_size:
            try:
                heartbeat_path(run_dir, record["rank"]).unlink()
            except OSError:
                pass


def rank_table(run_dir: PathLike, now: Optional[float] = None) -> list[dict]:
    """Per rank: rank, host, pid, step, epoch, age_s (since its last heartbeat), gpu_mem_peak_mb and
    alive (False when the pid is gone on this host; None when it runs on another host)."""
    from engine.runs import hostname, pid_alive

    now = time.time() if now is None else now
    here = hostname()
    rows = []
    for r in read_heartbeats(run_dir):
        alive = pid_alive(r.get("pid")) if r.get("host") == here else None
        rows.append({"rank": r["rank"], "host": r.get("host"), "pid": r.get("pid"), "step": r.get("step"),
                     "epoch": r.get("epoch"), "age_s": round(now - float(r.get("time") or 0), 1),
                     "gpu_mem_peak_mb": r.get("gpu_mem_peak_mb"), "alive": alive})
    return rows


def describe_lost_ranks(run_dir: PathLike, ctx: DistContext, stale_after_s: Optional[float] = None) -> str:
    """One line naming the ranks that are gone (pid dead on this host, or no heartbeat for longer than
    `stale_after_s`, default the collective timeout); "" when none is known to be gone."""
    stale_after_s = ctx.timeout_s if stale_after_s is None else stale_after_s
    lost = []
    for row in rank_table(run_dir):
        if row["rank"] == ctx.rank:
            continue
        if row["alive"] is False or row["age_s"] > stale_after_s:
            lost.append(f"rank {row['rank']} (host {row['host']}, pid {row['pid']}, last step {row['step']}, "
                        f"last heartbeat {row['age_s']:.0f} s ago)")
    return "lost " + "; ".join(lost) if lost else ""


# ----------------------------------------------------------------------------- resume
def gather_rng_states(ctx: DistContext, state: Any) -> list:
    """Every rank's RNG state (engine.checkpoint.rng_state()), in rank order, for the checkpoint."""
    return all_gather_object(state, ctx)


def resume_progress(saved_world_size: Optional[int], world_size: int,
                    epoch_progress: Optional[dict]) -> tuple[Optional[dict], Optional[str]]:
    """(the epoch progress to resume with, a warning for the log or None).

    A stop in the middle of an epoch counts batches of one particular split of the data over the
    ranks; with another number of processes that split is different, so the interrupted epoch is
    trained again from its start (the checkpoint's `epoch` is the last completed one). Checkpoints
    without `world_size` were written by one process.
    """
    saved = int(saved_world_size or 1)
    if saved == world_size:
        return epoch_progress, None
    where = (f"epoch {epoch_progress['epoch']} restarts from its first batch" if epoch_progress
             else "from the next epoch")
    return None, (f"resuming a run trained on {saved} process(es) with {world_size}: {where}; "
                  f"the global batch and the LR schedule are unchanged, data order and random draws differ")


# ----------------------------------------------------------------------------- faults (tests only)
FAULT_ENV = "ENGINE_TEST_FAULT"  # "nan:RANK:STEP" or "crash:RANK:STEP" (a crash only on the first attempt)


class FaultInjection(nn.Module):
    """Wraps the (DDP) model of one rank: at global step `at` its loss turns NaN, or the process
    dies (os._exit, as a kill would). Used by the acceptance tests through ENGINE_TEST_FAULT."""

    def __init__(self, model: nn.Module, kind: str, at: int, steps_done: int):
        super().__init__()
        self.model, self.kind, self.at, self.step = model, kind, int(at), int(steps_done)

    def forward(self, *args, **kwargs):
        self.step += 1
        out = self.model(*args, **kwargs)
        if self.step == self.at and self.kind == "crash":
            os._exit(3)
        if self.step == self.at and self.kind == "nan":
            out = {k: v * float("nan") for k, v in out.items()}
        return out


def inject_faults(model: nn.Module, ctx: DistContext, steps_done: int,
                  env: Optional[Mapping[str, str]] = None) -> nn.Module:
    """`model`, wrapped in FaultInjection when ENGINE_TEST_FAULT names this rank."""
    spec = (os.environ if env is None else env).get(FAULT_ENV)
    if not spec:
        return model
    try:
        kind, rank, step = spec.split(":")
        rank_n, step_n = int(rank), int(step)
    except ValueError:
        raise DistributedError(f"{FAULT_ENV}={spec!r}: expected nan|crash:RANK:STEP") from None
    if kind not in ("nan", "crash") or rank_n != ctx.rank or (kind == "crash" and ctx.restart_count > 0):
        return model
    return FaultInjection(model, kind, step_n, steps_done)


# ----------------------------------------------------------------------------- run names
def shared_run_name(ctx: DistContext, explicit: Optional[str], make_default: Callable[[], str]) -> str:
    """The run name every rank uses: the explicit one, else rank 0's default (a timestamp) broadcast.

    An elastic restart re-runs every worker from scratch, so it must find the same run again: a
    restarted job (TORCHELASTIC_RESTART_COUNT > 0) without an explicit name is refused.
    """
    if explicit:
        return explicit
    if ctx.restart_count > 0:
        raise DistributedError("an elastic restart needs the run name on the command line (--run-name NAME) "
                               "to resume the same run")
    return broadcast_object(make_default() if ctx.is_main else None, ctx)
