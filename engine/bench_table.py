"""runs/<run>/bench.json read back and formatted, without torch (the report and the dashboard use it).

engine/bench.py writes the file; each row is one backend at one input size:
{"size", "backend", "device", "latency_ms_median", "latency_ms_p90", "best_batch", "images_per_s",
"images_per_s_by_batch", "speedup_vs_pytorch_cpu"} or, for a backend that could not run,
{"size", "backend", "device", "note"}.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from engine import runs

BENCH_FORMAT = "plate-detector-bench/1"


def read_bench(run_dir: Union[str, Path]) -> Optional[dict]:
    """The run's last benchmark, or None when bench.json is missing, unreadable or not a benchmark."""
    data = runs.read_json(Path(run_dir) / runs.BENCH_FILE)
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT or not isinstance(data.get("rows"), list):
        return None
    rows = [r for r in data["rows"] if isinstance(r, dict) and {"size", "backend", "device"} <= set(r)]
    return {**data, "rows": rows}


def measured(row: dict) -> bool:
    return isinstance(row.get("latency_ms_median"), (int, float)) and row["latency_ms_median"] > 0


def fps_batch1(row: dict) -> float:
    """Images per second at batch 1: 1000 / median latency."""
    return 1000.0 / float(row["latency_ms_median"])


def machine_text(result: dict, device: str = "cpu") -> str:
    """'<CPU model>, N cores' for cpu rows, the GPU name for cuda rows."""
    machine = result.get("machine") or {}
    if device == "cuda" and machine.get("gpu"):
        return str(machine["gpu"])
    cores = f", {machine['cpu_cores']} cores" if machine.get("cpu_cores") else ""
    return f"{machine.get('cpu') or 'CPU'}{cores}"


def format_table(result: dict) -> str:
    """The rows as a Markdown table (printed by the CLI, pasted into docs, put in RESULTS.md)."""
    lines = ["| input | backend | device | batch-1 median ms | batch-1 p90 ms | images/s (best batch) | "
             "speed vs PyTorch fp32 CPU |", "|---|---|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if not measured(row):
            lines.append(f"| {row['size']} | {row['backend']} | {row['device']} | — | — | — | {row.get('note', '')} |")
            continue
        lines.append(f"| {row['size']} | {row['backend']} | {row['device']} | {row['latency_ms_median']:.1f} | "
                     f"{row['latency_ms_p90']:.1f} | {row['images_per_s']:.1f} (batch {row['best_batch']}) | "
                     f"{row['speedup_vs_pytorch_cpu']:.2f}x |")
    return "\n".join(lines)


def table_rows(result: dict) -> list[dict]:
    """One dict per row for a dataframe (the dashboard's table)."""
    out = []
    for row in result["rows"]:
        ok = measured(row)
        out.append({"input": row["size"], "backend": row["backend"], "device": row["device"],
                    "batch-1 median ms": row["latency_ms_median"] if ok else None,
                    "batch-1 p90 ms": row.get("latency_ms_p90") if ok else None,
                    "FPS (batch 1)": round(fps_batch1(row), 1) if ok else None,
                    "images/s (best batch)": row.get("images_per_s") if ok else None,
                    "best batch": row.get("best_batch") if ok else None,
                    "vs PyTorch fp32 CPU": row.get("speedup_vs_pytorch_cpu") if ok else None,
                    "note": row.get("note", "")})
    return out
