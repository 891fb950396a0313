"""Optional: screenshots of every page for docs/img from a longer real run (e.g. the CPU demo).

The tiny run of test_e2e_dashboard.py learns almost nothing, so its Predict and Results pages
are empty. Point this test at the folders of a finished run to screenshot it instead:

    SAVE_SCREENSHOTS=1 SHOWCASE_RUNS_DIR=runs SHOWCASE_CHECKPOINTS_DIR=checkpoints \\
        [SHOWCASE_RUN=NAME] [SHOWCASE_IMAGES=a.jpg,b.jpg] .venv/bin/python -m pytest -q tests/e2e/test_e2e_showcase.py
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, Server, free_port, snap

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not os.environ.get("SHOWCASE_RUNS_DIR"), reason="set SHOWCASE_RUNS_DIR to screenshot a finished run")]


def _dir(name: str, default: str) -> Path:
    path = Path(os.environ.get(name) or default)
    return path if path.is_absolute() else ROOT / path


@pytest.fixture
def showcase_server(tmp_path):
    env = dict(os.environ, PLATES_RUNS_DIR=str(_dir("SHOWCASE_RUNS_DIR", "runs")),
               PLATES_CHECKPOINTS_DIR=str(_dir("SHOWCASE_CHECKPOINTS_DIR", "checkpoints")))
    env.pop("DASHBOARD_PASSWORD", None)
    srv = Server(env, free_port(), tmp_path / "streamlit.log")
    srv.start()
    yield srv
    srv.stop()


def test_showcase_screenshots(showcase_server, page, shots, plates_real):
    run = os.environ.get("SHOWCASE_RUN")
    for path, title, charts in (("/", "Runs", 0), ("/live", "Live", 6), ("/results", "Results", 1),
                                ("/dataset", "Dataset", 3), ("/predict", "Predict", 0)):
        page.goto(showcase_server.url + path)
        page.get_by_role("heading", name=title, exact=True).first.wait_for()
        if run and path in ("/results", "/dataset", "/predict", "/"):
            page.get_by_role("combobox", name="Run", exact=True).first.click()
            page.get_by_role("option", name=run, exact=True).click()
        if charts:
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {charts}", timeout=120_000)
        if path == "/predict":
            upload = page.locator('[data-testid="stFileUploader"] input[type="file"]')
            images = os.environ.get("SHOWCASE_IMAGES")
            files = images.split(",") if images else [str(plates_real / "test" / n) for n in ("Cars91.jpg", "Cars9.jpg")]
            upload.set_input_files(files[:2])
            page.get_by_text(re.compile(r"plate\(s\) ≥")).nth(1).wait_for(timeout=120_000)
        page.wait_for_timeout(3000)
        assert page.locator('[data-testid="stException"]').count() == 0
        snap(page, shots / f"{(path.strip('/') or 'runs')}.png")
