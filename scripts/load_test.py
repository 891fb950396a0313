"""Bounded load test of the prediction service on loopback, next to the bare model measured in the same run.

    python scripts/load_test.py --checkpoint CKPT [--onnx MODEL] [--requests 200] [--concurrency 8]

1. bare model: the same predictor the service uses (Predictor or OnnxPredictor), in this process,
   on the decoded image: median latency and images/s;
2. starts `python -m engine serve` on a free loopback port with the same model;
3. sequential: `--sequential` requests one at a time -> the service's latency over the bare model's
   (HTTP, multipart, JPEG decoding, JSON: the overhead ratio);
4. load: `--requests` requests, `--concurrency` in flight -> p50 / p99 latency and requests/s,
   and requests/s over the bare model's images/s.
Every request posts the same JPEG (the benchmark's synthetic 640x480 scene unless --image is given).
Prints a Markdown table; --out writes the numbers as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image_bytes(path) -> bytes:
    if path:
        return Path(path).read_bytes()
    from engine.bench import bench_image

    buf = io.BytesIO()
    bench_image().save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _stats(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p90_ms": round(float(np.percentile(ms, 90)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def bare_model(args, data: bytes) -> dict:
    from engine.predict import Predictor, load_image

    if args.onnx:
        from engine.export import OnnxPredictor

        predictor = OnnxPredictor(args.onnx)
    else:
        predictor = Predictor(args.checkpoint, device="cpu")
    image = load_image(data)
    for _ in range(3):
        predictor.predict(image)
    ms = []
    for _ in range(args.bare):
        start = time.perf_counter()
        predictor.predict(image)
        ms.append((time.perf_counter() - start) * 1000)
    out = _stats(ms)
    out["images_per_s"] = round(1000.0 / out["p50_ms"], 2)
    return out


def start_server(args, port: int, log) -> subprocess.Popen:
    model = ["--onnx", args.onnx] if args.onnx else ["--checkpoint", args.checkpoint]
    env = {k: v for k, v in os.environ.items() if k != "SERVE_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", *model, "--host", "127.0.0.1", "--port",
                             str(port), "--threads", str(args.threads)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("server did not answer /health in 180 s")


async def _load(url: str, data: bytes, requests: int, concurrency: int) -> dict:
    import httpx

    latencies, failures = [], 0
    queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client):
        nonlocal failures
        while not queue.empty():
            queue.get_nowait()
            start = time.perf_counter()
            response = await client.post(url, files=[("images", ("frame.jpg", data, "image/jpeg"))])
            latencies.append((time.perf_counter() - start) * 1000)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {**_stats(latencies), "concurrency": concurrency, "failures": failures,
            "requests_per_s": round(requests / wall, 2), "wall_s": round(wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="PyTorch checkpoint (or --onnx)")
    parser.add_argument("--onnx", help="exported model (python -m engine export)")
    parser.add_argument("--image", help="JPEG posted by every request (default: synthetic 640x480)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sequential", type=int, default=30, help="requests sent one at a time")
    parser.add_argument("--bare", type=int, default=30, help="timed bare-model calls")
    parser.add_argument("--threads", type=int, default=1, help="the service's inference threads")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    if bool(args.checkpoint) == bool(args.onnx):
        parser.error("give exactly one of --checkpoint or --onnx")
    data = _image_bytes(args.image)
    bare = bare_model(args, data)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/predict"
    with tempfile.NamedTemporaryFile("w+", prefix="load-test-serve-", suffix=".log", delete=False) as log:
        proc = start_server(args, port, log)
        try:
            sequential = asyncio.run(_load(url, data, args.sequential, 1))
            load = asyncio.run(_load(url, data, args.requests, args.concurrency))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"model": args.onnx or args.checkpoint, "backend": "onnxruntime" if args.onnx else "pytorch",
              "image_bytes": len(data), "bare": bare, "sequential": sequential, "load": load,
              "overhead_ratio": round(sequential["p50_ms"] / bare["p50_ms"], 2),
              "throughput_ratio": round(load["requests_per_s"] / bare["images_per_s"], 2)}
    print(f"| measurement | p50 ms | p99 ms | per second |\n|---|---:|---:|---:|\n"
          f"| bare model, in process ({bare['n']} calls) | {bare['p50_ms']:.1f} | {bare['p99_ms']:.1f} | "
          f"{bare['images_per_s']:.2f} images/s |\n"
          f"| service, 1 request at a time ({sequential['n']}) | {sequential['p50_ms']:.1f} | "
          f"{sequential['p99_ms']:.1f} | {sequential['requests_per_s']:.2f} req/s |\n"
          f"| service, {load['n']} requests, {load['concurrency']} concurrent | {load['p50_ms']:.1f} | "
          f"{load['p99_ms']:.1f} | {load['requests_per_s']:.2f} req/s |\n\n"
          f"overhead (service p50 one at a time / bare p50): {result['overhead_ratio']:.2f}x; "
          f"throughput under load / bare images/s: {result['throughput_ratio']:.2f}; "
          f"failed requests: {sequential['failures'] + load['failures']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 1 if sequential["failures"] + load["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
