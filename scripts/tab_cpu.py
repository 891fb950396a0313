"""CPU of N Chromium tabs on the Live page of a live 18k-step run, by process type (no trainer).

    .venv/bin/python scripts/tab_cpu.py [--tabs 5] [--window-s 30]

The same watched run, dashboard and Chromium as scripts/browser_bench.py; prints the cores used over
the window by Chromium's renderers, its other processes and the dashboard server (from /proc)."""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import browser_bench as bb
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, Server, free_port

HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict:
    """pid -> (kind, CPU seconds) of Chromium's processes (by --type) and the streamlit server."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if cmd and "chrom" in cmd[0]:  # Chromium rewrites its children's argv into one string: split on spaces
            kind = "chromium " + next((a.split("=", 1)[1] for a in cmd if a.startswith("--type=")), "browser")
        elif any("streamlit" in a for a in cmd):
            kind = "dashboard server"
        else:
            continue
        out[pid] = (kind, (int(fields[11]) + int(fields[12])) / HZ)
    return out


def cores(before: dict, after: dict, seconds: float) -> dict:
    used: dict = {}
    for pid, (kind, t1) in after.items():
        used[kind] = used.get(kind, 0.0) + t1 - before.get(pid, (kind, 0.0))[1]
    return {k: v / seconds for k, v in sorted(used.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tabs", type=int, default=5)
    ap.add_argument("--window-s", type=float, default=30.0)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tab-cpu-") as tmp:
        dirs = bb._prepare(Path(tmp))
        env = dict(os.environ, PLATES_RUNS_DIR=str(dirs["dash_runs"]), PLATES_CHECKPOINTS_DIR=str(dirs["ckpt"]))
        env.pop("DASHBOARD_PASSWORD", None)
        server = Server(env, free_port(), Path(tmp) / "streamlit.log")
        server.start()
        replayer = bb.Replayer(dirs["dash_runs"] / bb.LIVE, bb.HISTORY_STEPS + 1, bb.RECORDS_PER_S)
        replayer.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                bb._open_live_tabs(browser, server.url, args.tabs)
                time.sleep(5)
                t0, before = time.time(), cpu_seconds()
                time.sleep(args.window_s)
                used = cores(before, cpu_seconds(), time.time() - t0)
        finally:
            replayer.halt.set()
            server.stop()
    for kind, c in used.items():
        print(f"| {kind} | {c:.3f} cores |")
    print(f"| all | {sum(used.values()):.3f} cores | ({args.tabs} tabs, {args.window_s:.0f} s) |")


if __name__ == "__main__":
    main()
