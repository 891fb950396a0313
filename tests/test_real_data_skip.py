"""Tests that need the real photos skip with one reason on a clone without them; CI fails instead."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEEDS_PHOTOS = "tests/dashboard/test_dashboard_helpers.py::test_box_stats_and_drawing_on_real_images"


def _pytest(tmp_path, **env):
    """pytest on one test that needs the photos, pointed at a folder without them; the environment
    of this run (CI sets REQUIRE_PLATES_REAL=1) is replaced by `env`."""
    base = {k: v for k, v in os.environ.items() if k != "REQUIRE_PLATES_REAL"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider", NEEDS_PHOTOS],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**base, "PLATES_REAL": str(tmp_path / "no-photos"), **env})


def test_missing_photos_skip_with_one_clear_reason(tmp_path):
    out = _pytest(tmp_path)
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout
    assert f"needs the real photos: no Roboflow export at {tmp_path / 'no-photos'}" in out.stdout


def test_ci_turns_the_skip_into_a_failure(tmp_path):
    out = _pytest(tmp_path, REQUIRE_PLATES_REAL="1")
    assert out.returncode == 1 and "1 error" in out.stdout, out.stdout  # a failing fixture
    assert "REQUIRE_PLATES_REAL=1 forbids skipping" in out.stdout
    assert "REQUIRE_PLATES_REAL=1 make test" in (ROOT / ".ci" / "run").read_text()
