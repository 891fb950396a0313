"""kill -9 a CPU training run at random moments, `--resume` it each time, and count what broke.

    python scripts/kill_harness.py --kills 20 [--epochs 3] [--seed 0] [--work /tmp/kill-harness]

Starts a tiny real run (the first 8/4/4 photos of data/plates-real, 160 px, CPU, one thread),
SIGKILLs it after a random delay, then `train --resume`s it, kills that again at random, and so
on; a process that finishes before its kill time completes the run, and the next kill goes to a
new run. After every kill the run's files must parse and the run must read `crashed`; after every
completed run epochs 1..N must appear once each (engine.runs.read_metrics and the report) and no
temp file may be left. Prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import runs  # noqa: E402

SETTINGS = ["model.name=fasterrcnn_mobilenet_v3_large_320_fpn", "model.weights=none", "input.train_sizes=[160]",
            "input.test_size=160", "input.max_size=224", "train.batch_size=4", "train.device=cpu",
            "train.amp=false", "data.num_workers=0", "schedule.warmup_epochs=1", "optim.lr=0.01",
            "eval.probe_images=2"]


def make_subset(src: Path, out: Path, counts=(("train", 8), ("valid", 4), ("test", 4))) -> Path:
    for split, n in counts:
        coco = json.loads((src / split / "_annotations.coco.json").read_text())
        coco["images"] = coco["images"][:n]
        keep = {im["id"] for im in coco["images"]}
        coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in keep]
        (out / split).mkdir(parents=True, exist_ok=True)
        for im in coco["images"]:
            shutil.copy2(src / split / im["file_name"], out / split / im["file_name"])
        (out / split / "_annotations.coco.json").write_text(json.dumps(coco))
    return out


def unloadable_files(run_dir: Path, ckpt_dir: Path) -> list[str]:
    """Files a reader cannot load: status/json files, complete metrics lines, checkpoints."""
    from engine.checkpoint import CheckpointError, load_checkpoint

    bad = []
    for path in run_dir.rglob("*.json"):
        if not path.name.startswith(".") and runs.read_json(path) is None:
            bad.append(str(path))
    for path in ckpt_dir.glob("*.pth"):
        try:
            load_checkpoint(path)
        except CheckpointError:
            bad.append(str(path))
    return bad


def cut_lines(run_dir: Path) -> list[bytes]:
    """Complete metrics.jsonl lines that are not JSON (a line a kill cut, ended by the next start;
    readers skip it). The last one may also be the current kill's; more than one per kill is a bug."""
    path = run_dir / runs.METRICS_FILE
    raw = path.read_bytes() if path.exists() else b""
    out = []
    for line in raw[: raw.rfind(b"\n") + 1].splitlines():
        try:
            if line.strip():
                json.loads(line)
        except ValueError:
            out.append(line)
    return out


def temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.is_dir() for p in f.rglob(f".*{runs.TEMP_SUFFIX}")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kill-harness"))
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "plates-real")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    data = make_subset(args.data if args.data.exists() else Path("/work/shared/data/plates-real"), args.work / "data")
    runs_dir, ckpts = args.work / "runs", args.work / "checkpoints"
    env = {k: v for k, v in os.environ.items() if k != "ENGINE_FAULT_POINT"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    sets = [x for s in SETTINGS + [f"train.epochs={args.epochs}", f"data.root={data}",
                                   f"run.checkpoints_dir={ckpts}"] for x in ("--set", s)]
    kills = resumes = resumes_ok = completed = epochs_once = recovered = run_kills = before_run = 0
    unloadable: list[str] = []
    leftovers: list[Path] = []
    rows = []
    expected = 60.0  # seconds an uninterrupted process takes; updated from the first that finishes
    run_index, resume = 0, False
    t_all = time.time()
    while kills < args.kills or resume:
        run = f"kill-{run_index:02d}"
        cmd = [sys.executable, "-m", "engine", "train"] + (
            ["--resume", run, "--runs-dir", str(runs_dir)] if resume else
            ["--config", "configs/demo_cpu.yaml", "--run", run, "--runs-dir", str(runs_dir), *sets])
        resumes += resume
        delay = rng.uniform(0.5, expected) if kills < args.kills else None
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        killed, err = False, ""
        try:
            _, err = proc.communicate(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            killed = True
        if killed:
            kills += 1
            if not (runs_dir / run / runs.CONFIG_FILE).exists():  # killed before the run existed
                rows.append(f"kill {kills:2d}: {run} after {delay:5.1f}s -> before its config.yaml: a new run")
                before_run += 1
                resume, run_index = False, run_index + 1
                continue
            run_kills += 1
            resumes_ok += resume  # this resume ran until we killed it
            bad = unloadable_files(runs_dir / run, ckpts / run)
            state = runs.effective_state(runs.read_status(runs_dir / run))
            unloadable += bad
            rows.append(f"kill {kills:2d}: {run} after {delay:5.1f}s -> {state}{' UNLOADABLE ' + str(bad) if bad else ''}")
            resume = state != "completed"  # killed after writing `completed`, while exiting: the run is done
            if resume:
                continue
        elif proc.returncode != 0:
            rows.append(f"{run}: {'resume' if resume else 'start'} exited {proc.returncode}: "
                        f"{(err or '').strip().splitlines()[-1:]}")
            resume, run_index, run_kills = False, run_index + 1, 0
            continue
        else:
            if not resume:  # an uninterrupted process: the kill delays are drawn up to its duration
                expected = time.time() - t0
            resumes_ok += resume
        completed += 1
        recovered, run_kills = recovered + run_kills, 0
        from engine.report import gather

        _, epochs = runs.read_metrics(runs_dir / run)
        shown = [e["epoch"] for e in gather(run, str(runs_dir), str(ckpts))["epochs"]]
        once = [e["epoch"] for e in epochs] == list(range(1, args.epochs + 1)) == shown
        epochs_once += once
        left = temp_files(runs_dir / run, ckpts / run)
        leftovers += left
        unloadable += unloadable_files(runs_dir / run, ckpts / run)
        cut = len(cut_lines(runs_dir / run))
        rows.append(f"{run}: completed ({time.time() - t0:.0f}s), epochs once: {once}, temp files left: {len(left)}, "
                    f"cut metrics lines skipped by readers: {cut}")
        resume, run_index = False, run_index + 1
    print("\n".join(rows))
    print()
    print("| kills (before config.yaml existed) | kills resumed to completion | resumes not refused | runs completed | epochs 1..N once "
          "| unloadable files | leftover temp files | wall |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {kills} ({before_run}) | {recovered}/{kills - before_run} | {resumes_ok}/{resumes} | {completed}/{run_index} | "
          f"{epochs_once}/{completed} | {len(unloadable)} | {len(leftovers)} | {time.time() - t_all:.0f} s |")
    return 0 if (recovered == kills - before_run and resumes_ok == resumes and epochs_once == completed and not unloadable
                 and not leftovers) else 1


if __name__ == "__main__":
    sys.exit(main())
