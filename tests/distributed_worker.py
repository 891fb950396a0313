"""One rank of the distributed checks in tests/test_distributed.py; started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT DATA

Runs every scenario in order on a real gloo process group and writes what it saw to
OUT/result-rank-N.json; the tests assert on those files. Scenarios that must fail on purpose
record the error instead of raising, so one launch covers them all.
"""
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import distributed as D  # noqa: E402
from engine.config import config_from_dict  # noqa: E402
from engine.errors import EngineError  # noqa: E402

TINY = {"model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "input": {"train_sizes": [128], "test_size": 128, "max_size": 160},
        "train": {"amp": False, "batch_size": 2, "device": "cpu"},
        "dist": {"timeout_s": 60}}
DDP_STEPS = 3


def scenario_losses(ctx, out):
    rank = ctx.rank
    out["avg"] = D.average_losses({"loss_a": torch.tensor(rank + 1.0), "loss_b": 10.0 * (rank + 1)}, ctx)
    nan_on_1 = D.average_losses({"loss_a": float("nan") if rank == 1 else 1.0, "loss_b": 2.0}, ctx)
    out["nan_avg_nonfinite"] = D.nonfinite_losses(nan_on_1)


def scenario_stop_decision(ctx, out):
    """A loop that agrees once per step; only rank 1 sees a NaN, at step 3."""
    t0 = time.time()
    left_at, reason = None, None
    for step in range(1, 11):
        decision = D.agree(ctx, stop=False, nonfinite=ctx.rank == 1 and step == 3)
        if decision.any():
            left_at, reason = step, decision.who("nonfinite")
            break
    out["nan_left_at"], out["nan_reason"], out["nan_seconds"] = left_at, reason, time.time() - t0


def scenario_names(ctx, out):
    out["run_name"] = D.shared_run_name(ctx, None, lambda: f"default-{ctx.rank}-{os.getpid()}")

    def claim():
        raise EngineError("run 'x' already exists in runs")

    try:
        D.on_main_then_share(ctx, claim)
    except EngineError as exc:
        out["claim_error"] = f"{type(exc).__name__}: {exc}"


def scenario_ddp(ctx, out, data: Path, work: Path, cfg):
    """DDP on the real detector from different initial weights; one train image has no plates."""
    from engine.checkpoint import save_checkpoint
    from engine.data import PlateDataset, collate_fn, load_split
    from engine.model import build_model
    torch.manual_seed(100 + ctx.rank)  # different init per rank: DDP must broadcast rank 0's
    model = build_model(cfg).to(ctx.device)
    out["checksum_before_wrap"] = D.parameter_checksum(model)
    ddp = D.wrap_model(model, ctx)
    out["wrapped"] = type(ddp).__name__
    dataset = PlateDataset(load_split(data, "train"), train=True, augment=cfg.augment)
    batch = D.per_rank_batch_size(cfg.train.batch_size, ctx.world_size)
    torch.manual_seed(D.augmentation_seed(cfg.run.seed, ctx.rank))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, collate_fn=collate_fn,
                                         sampler=D.train_sampler(dataset, ctx, seed=cfg.run.seed, epoch=1))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    ddp.train()
    losses, image_ids = [], []
    for step, (images, targets) in enumerate(loader, 1):
        image_ids += [int(t["image_id"]) for t in targets]
        targets = [{"boxes": t["boxes"].as_subclass(torch.Tensor), "labels": t["labels"]} for t in targets]
        loss_dict = ddp(list(images), targets)
        averaged = D.average_losses({k: v.detach() for k, v in loss_dict.items()}, ctx)
        losses.append(averaged["loss"])
        optimizer.zero_grad(set_to_none=True)
        sum(loss_dict.values()).backward()
        optimizer.step()
        if step == DDP_STEPS:
            break
    out["ddp_losses"], out["ddp_image_ids"] = losses, image_ids
    out["checksums"] = D.gather_checksums(ddp, ctx)
    state = D.model_state_dict(ddp)
    out["module_keys"] = [k for k in state if k.startswith("module.")]
    if ctx.is_main:
        save_checkpoint(work / "ddp.pth", {"format": "plate-detector/1", "model": state, "epoch": 1,
                                           "global_step": DDP_STEPS, "config": cfg.to_dict(), "run": "ddp"})
    D.barrier(ctx)


def scenario_eval(ctx, out, data: Path, work: Path, cfg):
    from engine.data import PlateDataset, collate_fn, load_split
    from engine.model import load_model_from_checkpoint

    model, _ = load_model_from_checkpoint(work / "ddp.pth", device=ctx.device)
    valid = PlateDataset(load_split(data, "valid"), train=False)
    ddp = D.wrap_model(model, ctx)  # evaluation unwraps it
    for batch in (1, 2):
        loader = D.eval_loader(valid, ctx, batch_size=batch, collate_fn=collate_fn)
        out[f"eval_share_b{batch}"] = [[int(valid.records[i].id) for i in b] for b in loader.batch_sampler]
        out[f"eval_b{batch}"] = D.evaluate_distributed(ddp, valid, ctx, batch_size=batch, collate_fn=collate_fn,
                                                       score_threshold=cfg.eval.score_threshold,
                                                       iou=cfg.eval.iou_threshold)
    calls = {"n": 0}

    def stop_on_rank_1():
        calls["n"] += 1
        return ctx.rank == 1 and calls["n"] == 2

    try:
        D.evaluate_distributed(model, valid, ctx, batch_size=1, collate_fn=collate_fn, score_threshold=0.5,
                               should_stop=stop_on_rank_1)
        out["eval_stop"] = "not stopped"
    except D.EvaluationStopped:
        out["eval_stop"] = f"stopped at batch {calls['n']}"


def signal_loop(mode: str, work: Path) -> int:
    """`kill`: rank 1 dies by SIGKILL at step 10; `stop`: loop until a SIGTERM (sent to torchrun)."""
    import signal

    cfg = config_from_dict({"train": {"device": "cpu"}, "dist": {"timeout_s": 60}}, where="worker")
    ctx = D.init_from_env(cfg)
    heartbeat = D.RankHeartbeat(work / "run", ctx, every_s=0)
    flag = {"term": None}
    signal.signal(signal.SIGTERM, lambda signum, frame: flag.update(term=flag["term"] or time.time()))
    out, step, t_kill = {"rank": ctx.rank}, 0, None
    try:
        while True:
            step += 1
            heartbeat.beat(step=step)
            decision = D.agree(ctx, stop=flag["term"] is not None)
            if decision["stop"]:
                out.update(stopped_at=step, who=decision.who("stop"))
                break
            if mode == "kill" and step == 10:
                t_kill = time.time()
                if ctx.rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.05)
    except Exception as exc:  # what the trainer's failure path will see
        out.update(error=D._first_line(exc), peer_failure=D.is_peer_failure(exc), failed_at=step,
                   seconds_after_kill=time.time() - t_kill if t_kill else None,
                   sigterm_before_error=flag["term"] is not None, lost=D.describe_lost_ranks(work / "run", ctx))
    (work / f"{mode}-rank-{ctx.rank}.json").write_text(json.dumps(out))
    D.shutdown(ctx)
    return 0


def main() -> int:
    if sys.argv[1] in ("kill", "stop"):
        return signal_loop(sys.argv[1], Path(sys.argv[2]))
    work, data = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = config_from_dict({**TINY, "data": {"root": str(data), "num_workers": 0}}, where="worker")
    ctx = D.init_from_env(cfg)
    out = {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device),
           "launcher_pid": ctx.launcher_pid, "parent_pid": os.getppid(), "status": ctx.status_fields()}
    try:
        scenario_losses(ctx, out)
        scenario_stop_decision(ctx, out)
        scenario_names(ctx, out)
        scenario_ddp(ctx, out, data, work, cfg)
        scenario_eval(ctx, out, data, work, cfg)
        D.RankHeartbeat(work / "run", ctx).beat(step=DDP_STEPS, epoch=1, force=True)
    finally:
        (work / f"result-rank-{ctx.rank}.json").write_text(json.dumps(out, default=str))
        D.shutdown(ctx)
    return 0 if not any(isinstance(v, float) and math.isnan(v) for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
