"""Command line: python -m engine train|synth|evaluate|predict|report|export|bench|serve.

Heavy modules (torch, the evaluation and report code) are imported inside each command, so a
config error is reported in a fraction of a second and the CLI works before every module exists.
Any EngineError -> `error: <message>` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from engine.errors import EngineError
from engine.stop_watch import DEADLINE_S, KILL_AFTER_S


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a plate detector (new run or --resume)",
                       description="Train a new run from a config file, or resume a stopped/failed run.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="FILE", help="YAML config (e.g. configs/demo_cpu.yaml)")
    src.add_argument("--resume", metavar="RUN", help="continue RUN from checkpoints/RUN/last.pth")
    p.add_argument("--run", "--run-name", dest="run", metavar="NAME",
                   help="run name (default: <config stem>-<YYYYmmdd-HHMMSS>); --run-name also passes through torchrun")
    p.add_argument("--data", metavar="DIR", help="dataset root (sets data.root)")
    p.add_argument("--device", metavar="D", help="auto, cpu, cuda or cuda:N (sets train.device)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config value, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--runs-dir", metavar="DIR", help="runs folder (default: run.runs_dir of the config, 'runs')")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes (GPUs) on this machine; N > 1 starts the run with torchrun")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="torchrun restarts a failed job up to N times; it resumes from last.pth")
    p.set_defaults(func=cmd_train)


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate the synthetic plate dataset (Roboflow COCO layout)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--valid", type=int, default=100)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.set_defaults(func=cmd_synth)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split; writes metrics.json")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--config", metavar="FILE", help="config (default: the one stored in the checkpoint)")
    p.add_argument("--device", default="auto", metavar="D")
    p.add_argument("--data", metavar="DIR", help="dataset root (default: data.root of the config)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/<run>/test/)")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="detect plates in images; prints JSON, writes annotated images")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", metavar="DIR", help="annotated images go here (default: <checkpoint dir>/predictions)")
    p.add_argument("--score-threshold", type=float, default=0.5, metavar="T")
    p.add_argument("--device", default="auto", metavar="D")
    p.set_defaults(func=cmd_predict)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write RESULTS.md for a run")
    p.add_argument("--run", required=True, metavar="RUN")
    p.add_argument("--out", metavar="DIR")
    p.add_argument("--runs-dir", default="runs", metavar="DIR")
    p.add_argument("--checkpoints-dir", default="checkpoints", metavar="DIR")
    p.set_defaults(func=cmd_report)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX, verified against PyTorch",
                       description="Export the whole detector to ONNX and check ONNX Runtime against PyTorch.")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.add_argument("--size", type=int, metavar="PX", help="shorter side the model resizes to (default: the "
                   "checkpoint's input.test_size)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: <checkpoint dir>/export)")
    p.add_argument("--opset", type=int, default=17, metavar="N")
    p.add_argument("--verify-images", nargs="+", metavar="IMAGE", help="images to verify on (default: the "
                   "first photos of the checkpoint's test split); synthetic images are always added")
    p.set_defaults(func=cmd_export)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="inference benchmark: PyTorch and ONNX Runtime latency and images/s",
                       description="Measure batch-1 latency and throughput; prints a table and writes "
                                   "runs/<run>/bench.json.")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    p.add_argument("--onnx", metavar="MODEL", help="an exported model (used for its size; other sizes are exported "
                   "to a temporary folder)")
    p.add_argument("--sizes", default="320,800", metavar="A,B", help="input sizes (shorter side), default 320,800")
    p.add_argument("--device", default="cpu", metavar="D", help="cpu or cuda (cuda adds the fp16 and ORT CUDA rows)")
    p.add_argument("--repeats", type=int, default=30, metavar="N", help="timed runs per measurement")
    p.add_argument("--batch-sizes", default="1,2,4,8", metavar="A,B", help="batch sizes tried for images/s")
    p.add_argument("--out", metavar="FILE", help="JSON output (default: runs/<run>/bench.json)")
    p.set_defaults(func=cmd_bench)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="HTTP prediction service (FastAPI + uvicorn)",
                       description="POST /predict, GET /health, GET /model, OpenAPI docs at /docs. A bearer "
                                   "token (env SERVE_TOKEN) is required when bound to a non-loopback address.")
    p.add_argument("--checkpoint", metavar="FILE", help="PyTorch checkpoint (or give --onnx)")
    p.add_argument("--onnx", metavar="MODEL", help="an exported ONNX model, run with ONNX Runtime")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, metavar="N", help="uvicorn worker processes (each loads the model)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="requests inferred at once per worker")
    p.add_argument("--intra-threads", type=int, default=0, metavar="N", help="threads inside one inference "
                   "(torch / ONNX Runtime; 0 = all cores); set it to the container's CPU limit")
    p.add_argument("--device", default="cpu", metavar="D")
    p.add_argument("--max-image-mb", type=float, default=10.0, metavar="MB", help="largest accepted upload per image")
    p.add_argument("--max-images", type=int, default=8, metavar="N", help="most images in one request")
    p.set_defaults(func=cmd_serve)


def _add_config_doc(sub) -> None:
    p = sub.add_parser("config-doc", help="print the config reference table (generated from engine/config.py)")
    p.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE (docs/engine.md)")
    p.set_defaults(func=cmd_config_doc)


def _seconds(text: str) -> float:
    """A duration in seconds, >= 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0 seconds")
    return value


def _add_stop(sub) -> None:
    p = sub.add_parser("stop", help="stop a running run: it saves last.pth; what does not exit is killed",
                       description="SIGTERM to the run (it finishes its step, saves last.pth, writes `stopped`), "
                                   "then wait; a process still alive --kill-after seconds after the run ended "
                                   "(or --deadline seconds after the stop) gets SIGKILL.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--runs-dir", default="runs", metavar="DIR")
    p.add_argument("--kill-after", type=_seconds, default=KILL_AFTER_S, metavar="S",
                   help=f"after the run ended (default {KILL_AFTER_S:.0f})")
    p.add_argument("--deadline", type=_seconds, default=DEADLINE_S, metavar="S",
                   help=f"after the stop, whatever the status says (default {DEADLINE_S:.0f})")
    p.add_argument("--watch", metavar="JSON", help=argparse.SUPPRESS)  # the dashboard's detached watch
    p.set_defaults(func=cmd_stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description="License-plate detector engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_synth, _add_evaluate, _add_predict, _add_report, _add_export, _add_bench,
                _add_serve, _add_stop, _add_config_doc):
        add(sub)
    return parser


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from engine.config import load_config, validate_run_name

    device = [f"train.device={args.device}"] if args.device else []
    if args.resume is not None:
        if args.config or args.run is not None or args.data or args.overrides:
            raise EngineError("--resume takes only --runs-dir and --device (the run keeps its config)")
        validate_run_name(args.resume)
        from engine.train import load_run_config

        cfg = load_run_config(args.resume, args.runs_dir or "runs", device)
        run_name, resume = args.resume, True
    else:
        cfg = load_config(args.config, list(args.overrides) + device)
        if args.data:
            cfg.data.root = args.data
        if args.runs_dir:
            cfg.run.runs_dir = args.runs_dir
        run_name = validate_run_name(args.run) if args.run is not None else None
        resume = False
    if args.nproc != 1 or args.max_restarts:
        _launch_torchrun(args, cfg, run_name)
    from engine.train import train  # torch is imported only now

    result = train(cfg, run_name, resume=resume)
    return 0 if result.get("state") in ("completed", "stopped") else 1


def _launch_torchrun(args, cfg, run_name) -> None:
    """Replace this process with torchrun running the same command on --nproc processes."""
    from engine import distributed_launch

    raw = list(getattr(args, "raw_argv", None) or [])
    train_args = raw[raw.index("train") + 1:] if "train" in raw else raw
    from engine.distributed import per_rank_batch_size

    per_rank_batch_size(cfg.train.batch_size, args.nproc)  # a count that does not divide the batch fails now
    if not run_name and not args.resume:
        from engine.config import default_run_name

        run_name = default_run_name(cfg.source)
    cmd = distributed_launch.train_launch_command(train_args, run_name)
    if cmd is not None:
        distributed_launch.exec_torchrun(cmd)


def cmd_synth(args) -> int:
    from engine.synthetic import generate_dataset

    summary = generate_dataset(args.out, train=args.train, valid=args.valid, test=args.test, seed=args.seed,
                               width=args.width, height=args.height)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_evaluate(args) -> int:
    from engine.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, config_path=args.config, device=args.device, data_root=args.data,
                        split=args.split, out=args.out)
    return 0


def cmd_predict(args) -> int:
    from engine.predict import predict_files

    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "predictions"
    results = predict_files(args.checkpoint, list(args.images), out=out, score_threshold=args.score_threshold,
                            device=args.device)
    print(json.dumps(results, indent=2))
    failed = [r for r in results if r.get("error")]
    for r in failed:
        print(f"error: {r['error']}", file=sys.stderr)
    return 2 if failed else 0


def cmd_report(args) -> int:
    from engine.report import write_report

    path = write_report(args.run, runs_dir=args.runs_dir, checkpoints_dir=args.checkpoints_dir, out=args.out)
    print(path)
    return 0


def cmd_export(args) -> int:
    from engine.export import export_onnx

    result = export_onnx(args.checkpoint, size=args.size, out=args.out, opset=args.opset,
                         verify_images=args.verify_images)
    check = result["verification"]
    print(f"{result['onnx_path']}: verified on {len(check['images'])} images (max box difference "
          f"{check['max_box_px']:.2g} px, max score difference {check['max_score_diff']:.2g}; tolerance "
          f"{check['box_tolerance_px']} px / {check['score_tolerance']})")
    print(result["meta_path"])
    return 0


def cmd_bench(args) -> int:
    from engine.bench import format_table, run_bench

    result = run_bench(args.checkpoint, onnx=args.onnx, sizes=args.sizes, device=args.device, repeats=args.repeats,
                       batch_sizes=args.batch_sizes, out=args.out)
    print(format_table(result))
    print(result["path"])
    return 0


def cmd_serve(args) -> int:
    from engine.serve import serve

    serve(checkpoint=args.checkpoint, onnx=args.onnx, host=args.host, port=args.port, workers=args.workers,
          threads=args.threads, device=args.device, max_image_mb=args.max_image_mb, max_images=args.max_images,
          intra_threads=args.intra_threads)
    return 0


def one_line(text: str) -> str:
    """The first non-empty line of an error message (a user sees one line, never a traceback)."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def end_loader_workers() -> None:
    """Make the process able to exit after a command: end DataLoader workers still alive.

    A loader iterator kept alive by an exception's traceback never shuts its workers down, and the
    workers ignore SIGTERM (engine.train.seed_worker), so multiprocessing's exit handler would
    `terminate()` them without effect and then wait for them forever. The command is over: SIGKILL
    the workers left, then collect garbage so the iterators' own shutdown finds them gone."""
    if "multiprocessing" not in sys.modules:
        return
    import gc
    import multiprocessing
    import signal

    children = multiprocessing.active_children()
    if children:
        # torch's SIGCHLD handler would raise "DataLoader worker ... killed" into this cleanup
        # (whenever the signal lands) for the workers killed here; the command is over.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join(timeout=10)
    gc.collect()


def close_progress_bars() -> None:
    """Close the progress bars an exception left open, so the error line is not drawn over by them."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def report_error(text: str) -> None:
    close_progress_bars()
    print(f"error: {text}", file=sys.stderr, flush=True)




def cmd_stop(args) -> int:
    """Foreground: signal, then watch. With --watch (spawned by engine.launch.stop_run): watch only."""
    from engine import launch, runs, stop_watch
    from engine.config import validate_run_name

    validate_run_name(args.run)
    run_dir = Path(args.runs_dir) / args.run
    if args.watch is not None:
        try:
            targets, sent_at = stop_watch.decode(args.watch)
        except ValueError as exc:
            raise launch.LaunchError(str(exc)) from None
    else:
        pid, targets, sent_at = launch.send_stop(args.run, args.runs_dir)
        print(f"SIGTERM sent to run {args.run} (pid {pid}); waiting for it to save last.pth and exit", flush=True)
    killed = stop_watch.watch(run_dir, targets, kill_after_s=args.kill_after, deadline_s=args.deadline,
                              sent_at=sent_at)
    if args.watch is None:
        print(f"run {args.run}: {runs.effective_state(runs.read_status(run_dir))}", flush=True)
    return 1 if killed else 0


def cmd_config_doc(args) -> int:
    from engine.config import reference_table, replace_reference_table

    if not args.write:
        print(reference_table())
        return 0
    path = Path(args.write)
    path.write_text(replace_reference_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(path)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except EngineError as exc:
        report_error(one_line(exc))
        return 2
    except KeyboardInterrupt:
        report_error("interrupted")
        return 130
    except Exception as exc:
        if os.environ.get("ENGINE_TRACEBACK"):
            raise
        # train() has logged the traceback to train.log and marked the run failed
        hint = "" if args.command == "train" else " (unexpected; set ENGINE_TRACEBACK=1 to see where)"
        report_error(f"{type(exc).__name__}: {one_line(exc)}{hint}")
        return 1
    finally:
        end_loader_workers()
