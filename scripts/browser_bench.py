"""Issue 9's browser measurements: real Chromium tabs on a real dashboard next to a real training run.

    .venv/bin/python scripts/browser_bench.py [--tabs 5] [--window-s 60] [--samples 10]

What runs (everything on this machine, nothing mocked):
- a trainer: `python -m engine train` (the CPU demo recipe: 320 model, batch 4, 320 px, 32 photos of
  plates-real/train, one thread per process as torch picks it), in a runs folder of its own; its step
  records give the training images/s;
- the watched run: a 50-epoch, 18,000-step metrics.jsonl written by the engine's own writers
  (scripts/perf_bench.write_run), kept live by appending step records through MetricsRecorder +
  JsonlWriter at RECORDS_PER_S (a GPU run's rate: 63 images/s at batch 16) with a status heartbeat;
- a finished 50-epoch run of the same size beside it (state completed);
- the dashboard (`streamlit run dashboard/server.py`) on those two runs, and headless Chromium.

Printed rows (markdown):
1. training images/s with no tab, with N tabs on the Live page of the watched run, and with no tab
   again (the windows bracket drift); the ratio uses the mean of the two tab-less windows;
2. metric-to-screen: a step record with a loss spike (1000 + 100 k) is appended; the time until a
   Plotly trace in the tab holds that value (median and max of `samples`);
3. time to idle of every page (until Streamlit's script state is notRunning with the page's heading
   drawn, and the Live page's six charts): switched to from another page in an open tab (a sidebar
   click), and opened in a fresh tab (a new browser context: empty cache).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import perf_bench  # noqa: E402
from engine import runs  # noqa: E402
from engine.tracking import JsonlWriter, MetricsRecorder  # noqa: E402
from tests.conftest import PLATES_REAL  # noqa: E402
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, PLOTS_JS, Server, free_port  # noqa: E402

CMD = "scripts/browser_bench.py"
HISTORY_STEPS = 18_000  # a 50-epoch run of the recipe: 5,756 images / batch 16 x 50
RECORDS_PER_S = 4.0
LIVE, DONE = "recipe-live", "recipe-done"
PAGES = (("/", "Runs", 0), ("/live", "Live", 6), ("/results", "Results", 0), ("/dataset", "Dataset", 0),
         ("/predict", "Predict", 0))
IDLE_JS = """([heading, charts]) => {
    const app = document.querySelector('.stApp');
    const h = [...document.querySelectorAll('h1')].some(e => e.textContent.trim() === heading);
    return app && app.getAttribute('data-test-script-state') === 'notRunning' && h && %s.length >= charts;
}""" % PLOTS_JS
# _fullData: the traces as Plotly drew them (gd.data holds the base64 typed-array spec Plotly.py 6 sends)
SPIKE_JS = """(value) => %s.some(gd => (gd._fullData || []).some(
    t => Array.from(t.y || []).some(y => y >= value)))""" % PLOTS_JS


class Replayer(threading.Thread):
    """Keeps the watched run live: step records through the engine's recorder at `rate` per second."""

    def __init__(self, run_dir: Path, first_step: int, rate: float):
        super().__init__(daemon=True)
        self.run_dir, self.step, self.rate = run_dir, first_step, rate
        self.recorder = MetricsRecorder([JsonlWriter(run_dir / runs.METRICS_FILE)])
        self.status = runs.StatusWriter(run_dir)
        self.spike: float | None = None
        self.spike_written = threading.Event()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            spike, self.spike = self.spike, None
            scalars = perf_bench._step_scalars(self.step, spike if spike is not None else 0.4)
            self.recorder.record_step(self.step, (self.step - 1) // 360 + 1, **scalars)
            if spike is not None:
                self.written_at = time.time()
                self.spike_written.set()
            self.status.heartbeat(every=5.0, state="running", pid=os.getpid(), global_step=self.step,
                                  epoch=self.step // 360, epochs=50, total_steps=HISTORY_STEPS * 2)
            self.step += 1
            time.sleep(1.0 / self.rate)

    def write_spike(self, value: float) -> float:
        """Ask for a spike in the next record; returns when it was written (time.time())."""
        self.spike_written.clear()
        self.spike = value
        self.spike_written.wait(10)
        return self.written_at


def _prepare(work: Path) -> dict:
    dash_runs, train_runs = work / "dash-runs", work / "train-runs"
    for name, state in ((DONE, "completed"), (LIVE, "running")):
        perf_bench.write_run(dash_runs / name, HISTORY_STEPS, steps_per_epoch=360)
        runs.StatusWriter(dash_runs / name).update(state=state, pid=os.getpid(), epoch=50, epochs=50,
                                                   global_step=HISTORY_STEPS, total_steps=HISTORY_STEPS * 2)
    data = perf_bench._subset(PLATES_REAL, work / "data", 32)
    return {"dash_runs": dash_runs, "train_runs": train_runs, "data": data, "ckpt": work / "ckpt"}


def _start_trainer(dirs: dict, log: Path) -> subprocess.Popen:
    settings = perf_bench.LOOP_SETTINGS + [f"data.root={dirs['data']}", "train.epochs=1000",
                                           f"run.checkpoints_dir={dirs['ckpt']}", "eval.test_after_train=false"]
    cmd = [sys.executable, "-m", "engine", "train", "--config", "configs/demo_cpu.yaml", "--run", "trainer",
           "--runs-dir", str(dirs["train_runs"]), *sum((["--set", s] for s in settings), [])]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _train_rate(train_run: Path, t0: float, t1: float) -> tuple[float, int]:
    """(median images/s, number of steps) of the trainer's step records written in [t0, t1]."""
    steps = [r for r in runs.read_metrics(train_run)[0]
             if r.get("type") == "step" and t0 <= (r.get("time") or 0) <= t1 and r.get("images_per_s")]
    return (statistics.median(r["images_per_s"] for r in steps) if steps else float("nan")), len(steps)


def _window(train_run: Path, seconds: float) -> tuple[float, int]:
    t0 = time.time()
    time.sleep(seconds)
    return _train_rate(train_run, t0, time.time())


def _open_live_tabs(browser, url: str, n: int) -> list:
    pages = []
    for _ in range(n):
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.goto(url + "/live")
        page.wait_for_function(f"{PLOTS_JS}.length >= 6", timeout=180_000)
        pages.append(page)
    return pages


def _metric_to_screen(page, replayer: Replayer, samples: int) -> list[float]:
    latencies = []
    for k in range(samples):
        value = 1000.0 + 100 * k
        written = replayer.write_spike(value)
        page.wait_for_function(SPIKE_JS, arg=value - 1, polling=100, timeout=60_000)
        latencies.append(time.time() - written)
        time.sleep(1.0)
    return latencies


def _time_to_idle(browser, url: str, path: str, heading: str, charts: int) -> float:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(url + path)
    page.wait_for_function(IDLE_JS, arg=[heading, charts], polling=50, timeout=120_000)
    elapsed = time.perf_counter() - t0
    if page.locator('[data-testid="stException"]').count():
        raise SystemExit(f"{path}: the page shows an exception")
    context.close()
    return elapsed


def _switch_to(page, heading: str, charts: int) -> float:
    """Click the page's link in the sidebar of an open app; seconds until it is idle."""
    t0 = time.perf_counter()
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=heading).first.click()
    page.wait_for_function(IDLE_JS, arg=[heading, charts], polling=50, timeout=120_000)
    return time.perf_counter() - t0


def _page_rows(browser, url: str, visits: int) -> list:
    """Per page: a fresh tab (a new browser context: empty cache, Plotly's bundle compiled again) and a
    switch from another page of an open tab (how a user moves around), median of `visits` each."""
    fresh = {path: [_time_to_idle(browser, url, path, h, c) for _ in range(visits)] for path, h, c in PAGES}
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.goto(url + "/")
    page.wait_for_function(IDLE_JS, arg=["Runs", 0], polling=50, timeout=120_000)
    switch: dict = {path: [] for path, _, _ in PAGES}
    for _ in range(visits):
        for path, heading, charts in PAGES[1:] + PAGES[:1]:
            switch[path].append(_switch_to(page, heading, charts))
    page.context.close()
    return [(f"page {h} ({path}) reaches idle, with the two 50-epoch 18k-step runs present: switched to from "
             f"another page / a fresh tab (medians of {visits})",
             f"**{statistics.median(switch[path]):.2f} s** / {statistics.median(fresh[path]):.2f} s", CMD)
            for path, h, _ in PAGES]


def _tab_rows(dirs: dict, browser, url: str, args) -> tuple[list, Replayer]:
    replayer = Replayer(dirs["dash_runs"] / LIVE, HISTORY_STEPS + 1, RECORDS_PER_S)
    replayer.start()
    train_run = dirs["train_runs"] / "trainer"
    before = _window(train_run, args.window_s)
    tabs = _open_live_tabs(browser, url, args.tabs)
    during = _window(train_run, args.window_s)
    for tab in tabs:
        tab.context.close()
    after = _window(train_run, args.window_s)
    base = (before[0] + after[0]) / 2
    return [
        (f"anchor: trainer images/s, no tab (before / after), {args.window_s:.0f} s windows",
         f"{before[0]:.2f} ({before[1]} steps) / {after[0]:.2f} ({after[1]} steps)", CMD),
        (f"trainer images/s with {args.tabs} Chromium tabs on the Live page of the live {HISTORY_STEPS:,}-step run",
         f"{during[0]:.2f} ({during[1]} steps): **{during[0] / base:.2f}x** of no tabs", CMD),
    ], replayer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tabs", type=int, default=5)
    ap.add_argument("--window-s", type=float, default=60.0)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--visits", type=int, default=4)
    ap.add_argument("--pages-only", action="store_true", help="only the page idle times (no trainer, no tabs)")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    print(_table(measure(args)))


def measure(args) -> list:
    """The rows (what, value, command) of one measurement; `args` as main() parses them."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="browser-bench-") as tmp:
        work = Path(tmp)
        dirs = _prepare(work)
        trainer = _start_trainer(dirs, work / "trainer.log")
        env = dict(os.environ, PLATES_RUNS_DIR=str(dirs["dash_runs"]), PLATES_CHECKPOINTS_DIR=str(dirs["ckpt"]))
        env.pop("DASHBOARD_PASSWORD", None)
        server = Server(env, free_port(), work / "streamlit.log")
        server.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                if args.pages_only:
                    _stop(trainer)
                    runs.StatusWriter(dirs["dash_runs"] / LIVE).update(state="completed")
                    return _page_rows(browser, server.url, args.visits)
                _wait_for_steps(dirs["train_runs"] / "trainer", trainer, 5)
                rows, replayer = _tab_rows(dirs, browser, server.url, args)
                page = _open_live_tabs(browser, server.url, 1)[0]
                lat = _metric_to_screen(page, replayer, args.samples)
                rows.append((f"metric-to-screen in Chromium, live run (a step record appended -> its value in a "
                             f"Plotly trace), {len(lat)} samples", f"median **{statistics.median(lat):.2f} s**, "
                             f"max {max(lat):.2f} s", CMD))
                page.context.close()
                replayer.halt.set()
                replayer.join()
                _stop(trainer)
                runs.StatusWriter(dirs["dash_runs"] / LIVE).update(state="completed")
                rows += _page_rows(browser, server.url, args.visits)
                browser.close()
        finally:
            _stop(trainer)
            server.stop()
    return rows


def _table(rows: list) -> str:
    return "\n".join(f"| {r[0]} | {r[1]} |" for r in rows)


def _wait_for_steps(train_run: Path, trainer: subprocess.Popen, n: int, timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if trainer.poll() is not None:
            raise SystemExit(f"the trainer exited with {trainer.returncode}")
        done = [r for r in runs.read_metrics(train_run)[0] if r.get("type") == "step"] if train_run.is_dir() else []
        if len(done) >= n:
            return
        time.sleep(2)
    raise SystemExit(f"the trainer wrote fewer than {n} steps in {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
