"""Inference benchmark: PyTorch eager and ONNX Runtime latency and throughput at several input sizes.

One synthetic 640x480 street scene is run through every backend; each backend includes the resize
to the input size, the model and the post-processing (what a caller waits for, without JPEG decoding).
Batch-1 latency is the median and 90th percentile of `repeats` timed calls after a warm-up;
images/s is measured at each batch size (PyTorch takes a list of images; the exported ONNX graph
takes one image per call, so its throughput is at batch 1). Every row also carries its speed
relative to PyTorch fp32 on the CPU at the same size, measured in the same run.

The table is written to `runs/<run>/bench.json` (BENCH_FILE, replaced atomically), the run being
the one the checkpoint came from. engine/bench_table.py reads it back and formats it (without torch).
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from engine.bench_table import BENCH_FORMAT, format_table  # noqa: F401  (the CLI prints the table)
from engine.errors import EngineError
from engine.runs import BENCH_FILE

BENCH_IMAGE_SIZE = (640, 480)  # a VGA camera frame
DEFAULT_SIZES = (320, 800)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8)
WARMUP_CALLS = 2
PathLike = Union[str, Path]


class BenchError(EngineError):
    """A benchmark that cannot run as asked; one line."""


def parse_ints(text: Union[str, Sequence[int]], what: str) -> list[int]:
    """'320,800' -> [320, 800]; BenchError on anything else."""
    if not isinstance(text, str):
        return [int(v) for v in text]
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{what} {text!r}: expected comma-separated integers, e.g. 320,800") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{what} {text!r}: expected positive integers, e.g. 320,800")
    return values


def bench_image():
    """The benchmark's input: a deterministic synthetic street scene with plates."""
    from engine.synthetic import render_image

    return render_image(np.random.default_rng(0), *BENCH_IMAGE_SIZE)[0]


def time_calls(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Milliseconds of each of `repeats` calls of fn, after WARMUP_CALLS untimed ones."""
    for _ in range(WARMUP_CALLS):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times


def _row(size: int, backend: str, device: str, latencies: list[float], throughput: dict[int, float]) -> dict:
    best = max(throughput, key=throughput.get)
    return {"size": size, "backend": backend, "device": device,
            "latency_ms_median": round(float(np.median(latencies)), 2),
            "latency_ms_p90": round(float(np.percentile(latencies, 90)), 2),
            "best_batch": best, "images_per_s": round(throughput[best], 2),
            "images_per_s_by_batch": {str(b): round(v, 2) for b, v in throughput.items()}}


def bench_pytorch(model: torch.nn.Module, image: torch.Tensor, device: torch.device, fp16: bool, repeats: int,
                  batch_sizes: Sequence[int]) -> tuple[list[float], dict[int, float]]:
    """(batch-1 latencies in ms, {batch size: images/s}) for the eager model."""
    image = image.to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def run(batch: int):
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            return model([image] * batch)

    latencies = time_calls(lambda: run(1), repeats, sync)
    throughput = {1: 1000.0 / float(np.median(latencies))}
    for batch in batch_sizes:
        if batch > 1:
            ms = float(np.median(time_calls(lambda: run(batch), max(3, repeats // batch), sync)))
            throughput[batch] = batch * 1000.0 / ms
    return latencies, throughput


def bench_onnx(predictor, image: torch.Tensor, repeats: int) -> tuple[list[float], dict[int, float]]:
    latencies = time_calls(lambda: predictor.detect(image), repeats)
    return latencies, {1: 1000.0 / float(np.median(latencies))}


def _onnx_for_size(checkpoint: Path, onnx: Optional[PathLike], size: int, tmp: Path) -> Path:
    """The given export when it has this input size, else a fresh export into tmp, verified on the bench frame."""
    from engine.export import export_onnx, load_export

    if onnx and int(load_export(onnx)["input"]["size"]) == size:
        return Path(onnx)
    frame = tmp / "bench-frame.png"
    if not frame.exists():
        bench_image().save(frame)
    # verified on the frame it is timed on (plus export's synthetic images), not on the run's photos
    return Path(export_onnx(checkpoint, size=size, out=tmp, verify_images=[frame])["onnx_path"])


def _machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _size_rows(checkpoint: Path, onnx, size: int, device: torch.device, repeats: int, batch_sizes, tmp: Path,
               image: torch.Tensor) -> list[dict]:
    from engine.export import ExportError, OnnxPredictor, available_providers, load_sized_model

    rows = []
    model, _cfg, size, _max = load_sized_model(checkpoint, size, device="cpu")
    rows.append(_row(size, "pytorch fp32", "cpu", *bench_pytorch(model, image, torch.device("cpu"), False, repeats,
                                                                  batch_sizes)))
    try:
        onnx_path = _onnx_for_size(checkpoint, onnx, size, tmp)
    except ExportError as exc:  # the PyTorch rows still stand; the table says why ONNX Runtime is missing
        onnx_path = None
        rows.append({"size": size, "backend": "onnxruntime", "device": "cpu", "note": str(exc)})
    if onnx_path:
        predictor = OnnxPredictor(onnx_path, device="cpu", threads=torch.get_num_threads())
        rows.append(_row(size, "onnxruntime", "cpu", *bench_onnx(predictor, image, repeats)))
    if device.type == "cuda":
        model = model.to(device)
        for fp16 in (False, True):
            rows.append(_row(size, f"pytorch {'fp16' if fp16 else 'fp32'}", "cuda",
                             *bench_pytorch(model, image, device, fp16, repeats, batch_sizes)))
        if onnx_path and "CUDAExecutionProvider" in available_providers():
            predictor = OnnxPredictor(onnx_path, device="cuda")
            rows.append(_row(size, "onnxruntime", "cuda", *bench_onnx(predictor, image, repeats)))
        elif onnx_path:
            rows.append({"size": size, "backend": "onnxruntime", "device": "cuda",
                         "note": "no CUDAExecutionProvider in this onnxruntime (install onnxruntime-gpu)"})
    anchor = rows[0]["latency_ms_median"]
    for row in rows:
        if "latency_ms_median" in row:
            row["speedup_vs_pytorch_cpu"] = round(anchor / row["latency_ms_median"], 2)
    return rows


def run_bench(checkpoint: PathLike, onnx: Optional[PathLike] = None, sizes="320,800", device: str = "cpu",
              repeats: int = 30, batch_sizes="1,2,4,8", out: Optional[PathLike] = None) -> dict:
    """Benchmark every backend at every size; writes the JSON (default runs/<run>/bench.json) and returns it."""
    from engine.model import _read_checkpoint, resolve_device
    from engine.predict import image_to_tensor
    from engine.runs import atomic_write_json

    checkpoint = Path(checkpoint)
    sizes, batch_sizes = parse_ints(sizes, "--sizes"), parse_ints(batch_sizes, "--batch-sizes")
    if repeats < 1:
        raise BenchError(f"--repeats {repeats}: must be at least 1")
    torch_device = resolve_device(device)
    ckpt = _read_checkpoint(checkpoint)
    run = ckpt.get("run") if isinstance(ckpt, dict) else None
    runs_dir = ((ckpt.get("config") or {}).get("run") or {}).get("runs_dir", "runs") if isinstance(ckpt, dict) else "runs"
    del ckpt
    if out is None and not run:
        raise BenchError(f"{checkpoint}: the checkpoint names no run; give --out FILE")
    path = Path(out) if out else Path(runs_dir) / str(run) / BENCH_FILE
    image = image_to_tensor(bench_image())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for size in sizes:
            rows += _size_rows(checkpoint, onnx, size, torch_device, repeats, batch_sizes, Path(tmp), image)
    result = {"format": BENCH_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "checkpoint": str(checkpoint), "run": run, "image": f"synthetic {BENCH_IMAGE_SIZE[0]}x{BENCH_IMAGE_SIZE[1]}",
              "repeats": repeats, "batch_sizes": batch_sizes, "machine": _machine(torch_device), "rows": rows}
    atomic_write_json(path, result)
    return {**result, "path": str(path)}
