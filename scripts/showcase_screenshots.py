"""Screenshots of every page for docs/img from a finished run (e.g. the CPU demo).

The tiny run of tests/e2e learns almost nothing, so its Predict and Results pages are empty. This
script points a real dashboard at the folders of a finished run and screenshots each page:

    .venv/bin/python scripts/showcase_screenshots.py --runs-dir runs --checkpoints-dir checkpoints \\
        [--run NAME] [--images a.jpg,b.jpg] [--out docs/img]

It is a tool, not a test: it checks only that no page shows an exception.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import PLATES_REAL  # noqa: E402  (one place finds the real dataset)
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, PLOTS_JS, Server, free_port, snap  # noqa: E402

PAGES = (("/", "Runs", 0), ("/live", "Live", 6), ("/results", "Results", 1), ("/dataset", "Dataset", 3),
         ("/predict", "Predict", 0))


def _shoot(page, url: str, out: Path, run: str | None, images: list[str]) -> None:
    for path, title, charts in PAGES:
        page.goto(url + path)
        page.get_by_role("heading", name=title, exact=True).first.wait_for()
        if run and path in ("/results", "/dataset", "/predict", "/"):
            page.get_by_role("combobox", name="Run", exact=True).first.click()
            page.get_by_role("option", name=run, exact=True).click()
        if charts:
            page.wait_for_function(f"{PLOTS_JS}.length >= {charts}", timeout=120_000)
        if path == "/predict":
            page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(images[:2])
            page.get_by_text(re.compile(r"plate\(s\) ≥")).nth(1).wait_for(timeout=120_000)
        page.wait_for_timeout(3000)
        if page.locator('[data-testid="stException"]').count():
            raise SystemExit(f"{path}: the page shows an exception")
        print(snap(page, out / f"{(path.strip('/') or 'runs')}.png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--checkpoints-dir", default="checkpoints")
    ap.add_argument("--run", help="the run to show (default: the newest)")
    ap.add_argument("--images", help="comma-separated photos for the Predict page (default: two of plates-real/test)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    env = dict(os.environ, PLATES_RUNS_DIR=str(Path(args.runs_dir).resolve()),
               PLATES_CHECKPOINTS_DIR=str(Path(args.checkpoints_dir).resolve()))
    env.pop("DASHBOARD_PASSWORD", None)
    images = args.images.split(",") if args.images else [str(PLATES_REAL / "test" / n) for n in ("Cars91.jpg", "Cars9.jpg")]
    server = Server(env, free_port(), Path(tempfile.mkdtemp()) / "streamlit.log")
    server.start()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            _shoot(page, server.url, Path(args.out), args.run, images)
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
