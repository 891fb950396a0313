"""End-to-end fixtures: a real `streamlit run dashboard/server.py` server and headless Chromium.

The server gets its own runs/, checkpoints/ and configs/ folders in a temporary directory
(PLATES_RUNS_DIR, PLATES_CHECKPOINTS_DIR, PLATES_CONFIGS_DIR), and a tiny copy of plates-real.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync"]
IMG_DIR = ROOT / "docs" / "img"
# Plotly charts of a page and of its same-origin frames (the Live page's panel draws the step charts)
PLOTS_JS = """[...document.querySelectorAll('.js-plotly-plot'), ...[...document.querySelectorAll('iframe')].flatMap(f => {
    try { return [...f.contentDocument.querySelectorAll('.js-plotly-plot')]; } catch (e) { return []; } })]"""


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test in headless Chromium against a real streamlit server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_dataset(src: Path, dst: Path, counts: dict) -> Path:
    """The first N images of each split of a Roboflow export, with their annotations."""
    for split, n in counts.items():
        data = json.loads((src / split / "_annotations.coco.json").read_text())
        images = sorted(data["images"], key=lambda i: i["id"])[:n]
        ids = {i["id"] for i in images}
        (dst / split).mkdir(parents=True, exist_ok=True)
        for img in images:
            shutil.copy(src / split / img["file_name"], dst / split / img["file_name"])
        out = {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
        (dst / split / "_annotations.coco.json").write_text(json.dumps(out))
    return dst


class Server:
    """One streamlit server process (own session); restartable on the same port."""

    def __init__(self, env: dict, port: int, log: Path, address: str = "127.0.0.1"):
        self.env, self.port, self.log, self.address = env, port, log, address
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "server.py"),
                 "--server.port", str(self.port), "--server.address", self.address, "--server.headless", "true"],
                cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"streamlit not healthy after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def e2e_dirs(tmp_path_factory, plates_real):
    base = tmp_path_factory.mktemp("e2e")
    dirs = {k: base / k for k in ("runs", "checkpoints", "configs")}
    for d in dirs.values():
        d.mkdir()
    for p in (ROOT / "configs").glob("*.yaml"):
        shutil.copy(p, dirs["configs"] / p.name)
    data = tiny_dataset(plates_real, base / "data" / "plates-tiny", {"train": 8, "valid": 4, "test": 4})
    common = {
        "data": {"root": str(data), "num_workers": 0},
        "model": {"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none"},
        "input": {"train_sizes": [128], "test_size": 128, "max_size": 224},
        "optim": {"lr": 0.01}, "schedule": {"warmup_epochs": 0.5},
        "train": {"epochs": 3, "batch_size": 2, "device": "cpu", "amp": False, "early_stopping_patience": 0},
        "eval": {"probe_images": 4, "batch_size": 4},
    }
    (dirs["configs"] / "tiny_e2e.yaml").write_text(
        "# e2e: a tiny copy of plates-real, the 320 model from scratch, 128 px, 3 epochs\n" + yaml.safe_dump(common))
    long = {**common, "train": {**common["train"], "epochs": 200}}
    (dirs["configs"] / "tiny_long_e2e.yaml").write_text(
        "# e2e: the same, long enough to be stopped from the browser\n" + yaml.safe_dump(long))
    dirs["data"] = data
    dirs["base"] = base
    return dirs


@pytest.fixture(scope="session")
def server(e2e_dirs, plates_real):
    env = dict(os.environ, PLATES_RUNS_DIR=str(e2e_dirs["runs"]), PLATES_CHECKPOINTS_DIR=str(e2e_dirs["checkpoints"]),
               PLATES_CONFIGS_DIR=str(e2e_dirs["configs"]), PLATES_DEMO_DATA_DIR=str(e2e_dirs["data"]),
               STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    env.pop("DASHBOARD_PASSWORD", None)
    srv = Server(env, free_port(), e2e_dirs["base"] / "streamlit.log")
    srv.start()
    yield srv
    srv.stop()
    _stop_runs(e2e_dirs["runs"])


def _stop_runs(runs_dir: Path) -> None:
    """Kill any training process a test left behind (by the pids in the run folders)."""
    from engine import runs

    for name in runs.list_run_names(runs_dir):
        status = runs.read_status(runs_dir / name) or {}
        pid = status.get("pid")
        if runs.pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    p = context.new_page()
    p.set_default_timeout(30_000)
    yield p
    context.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory):
    """Where screenshots go: docs/img when SAVE_SCREENSHOTS=1, else a temporary folder."""
    if os.environ.get("SAVE_SCREENSHOTS") == "1":
        IMG_DIR.mkdir(parents=True, exist_ok=True)
        return IMG_DIR
    return tmp_path_factory.mktemp("screenshots")


def snap(page, path: Path, max_height: int = 5000) -> Path:
    """Screenshot of the whole page: Streamlit scrolls inside its main area, so the viewport is
    grown to the content's height first (up to max_height) and restored afterwards."""
    size = page.viewport_size
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]');
        const block = document.querySelector('[data-testid="stMainBlockContainer"]');
        return Math.max(main ? main.scrollHeight : 0, block ? block.scrollHeight + 40 : 0, document.body.scrollHeight);
    }""")
    page.set_viewport_size({"width": size["width"], "height": int(min(max(height, size["height"]), max_height))})
    page.wait_for_timeout(1500)  # charts re-layout to the new size
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    _shrink_png(path)
    return path


def _shrink_png(path: Path) -> None:
    """256-colour PNG: a fifth of the size, no visible loss on a dashboard page."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
