"""AppTest of the Results page's Export and Benchmark buttons: real background jobs, no browser."""
from __future__ import annotations

import pytest

from dashboard import jobs
from engine import runs
from tests.dashboard.conftest import app_test
from tests.dashboard.fixtures import make_run, write_real_checkpoint
from tests.dashboard.test_jobs import wait_until_ended


def _texts(at, kind: str) -> list[str]:
    return [str(e.value) for e in getattr(at, kind)]


@pytest.fixture
def job_runs(dash_env, monkeypatch):
    """'tiny' with a loadable best.pth, 'broken' with a best.pth that is not a checkpoint; fragment intervals recorded."""
    import streamlit as st

    make_run(dash_env["runs"], "broken")
    (dash_env["checkpoints"] / "broken").mkdir()
    (dash_env["checkpoints"] / "broken" / runs.BEST_CKPT).write_bytes(b"garbage")
    make_run(dash_env["runs"], "tiny")
    write_real_checkpoint(dash_env["checkpoints"] / "tiny" / runs.BEST_CKPT, test_size=96)
    seen, real = [], st.fragment

    def fragment(func=None, *, run_every=None):
        seen.append(run_every)
        return real(func, run_every=run_every)

    monkeypatch.setattr(st, "fragment", fragment)
    return dash_env, seen


def test_benchmark_button_runs_once_shows_progress_then_the_table(job_runs):
    env, seen = job_runs
    at = app_test("views/results.py")
    at.selectbox(key="results_run").set_value("tiny").run()
    assert not at.exception
    assert any("No benchmark yet" in t for t in _texts(at, "caption"))
    at.multiselect(key="bench_sizes").set_value([320]).run()
    at.number_input(key="bench_repeats").set_value(1).run()
    seen.clear()
    at.button(key="btn_bench").click().run()
    assert not at.exception
    assert any(t.startswith("bench started in the background") for t in _texts(at, "success"))
    assert any(t.startswith("bench running (pid") for t in _texts(at, "info"))
    assert jobs.POLL_EVERY in seen  # the job panel polls while the job is alive
    at.button(key="btn_bench").click().run()  # a second press while it runs
    assert any(t.startswith("a bench job is already running") for t in _texts(at, "error"))
    wait_until_ended(env["runs"] / "tiny", jobs.BENCH)
    seen.clear()
    at.run()
    assert not at.exception
    assert any(t.startswith("bench done") for t in _texts(at, "success"))
    assert set(seen) == {None}  # nothing alive: no polling
    frames = [d.value for d in at.dataframe]
    bench = next(f for f in frames if "backend" in f.columns)
    assert bench["input"].tolist()[0] == 320 and bench["backend"].tolist()[0] == "pytorch fp32"
    assert bench["batch-1 median ms"].tolist()[0] > 0
    baseline = next(f for f in frames if "model" in f.columns and "FPS" in f.columns)
    ours = baseline[baseline["model"] == "ours, pytorch fp32 320 px"]
    assert ours["FPS"].tolist() == [pytest.approx(1000 / bench["batch-1 median ms"].tolist()[0], abs=0.1)]
    assert ours["source"].tolist()[0].startswith("measured: bench, cpu (")


def test_export_button_on_a_broken_checkpoint_shows_the_one_line_error(job_runs):
    env, _ = job_runs
    at = app_test("views/results.py")
    at.selectbox(key="results_run").set_value("broken").run()
    at.button(key="btn_export").click().run()
    assert not at.exception
    wait_until_ended(env["runs"] / "broken", jobs.EXPORT)
    at.run()
    [error] = [t for t in _texts(at, "error") if t.startswith("export failed")]
    one_line = error.split("**Error:** ", 1)[1]
    assert "\n" not in one_line and "best.pth" in one_line
    assert f"error: {one_line}" in "\n".join(_texts(at, "code"))  # the log tail holds the CLI's line
