"""Dashboard test fixtures: an isolated runs/checkpoints/configs tree pointed at by the env vars."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = str(ROOT / "dashboard" / "app.py")


@pytest.fixture
def dash_env(tmp_path, monkeypatch, plates_real):
    """tmp runs/, checkpoints/, configs/ (copies of the project's) and the demo dataset = plates-real."""
    runs_dir, ckpt_dir, cfg_dir = tmp_path / "runs", tmp_path / "checkpoints", tmp_path / "configs"
    runs_dir.mkdir()
    ckpt_dir.mkdir()
    cfg_dir.mkdir()
    for p in (ROOT / "configs").glob("*.yaml"):
        shutil.copy(p, cfg_dir / p.name)
    monkeypatch.setenv("PLATES_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("PLATES_CHECKPOINTS_DIR", str(ckpt_dir))
    monkeypatch.setenv("PLATES_CONFIGS_DIR", str(cfg_dir))
    monkeypatch.setenv("PLATES_DEMO_DATA_DIR", str(plates_real))  # present: nothing is generated
    monkeypatch.delenv("DASHBOARD_PASSWORD", raising=False)
    monkeypatch.chdir(ROOT)  # AppTest reads .streamlit/config.toml from the working directory
    return {"runs": runs_dir, "checkpoints": ckpt_dir, "configs": cfg_dir, "tmp": tmp_path}


def app_test(page: str | None = None, timeout: float = 60):
    """An AppTest of dashboard/app.py, run once, switched to `page` (e.g. 'views/live.py') and run again."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=timeout).run()
    if page:
        at.switch_page(page).run()
    return at
