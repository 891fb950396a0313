"""Results page in headless Chromium: press Benchmark inference on a tiny run and see the table."""
from __future__ import annotations

import re

import pytest

from engine import runs
from tests.dashboard.fixtures import make_run, write_real_checkpoint
from tests.e2e.conftest import snap
from tests.e2e.test_e2e_dashboard import goto, no_exception, select_option

pytestmark = pytest.mark.e2e
RUN = "e2e-bench"


def test_benchmark_button_runs_in_the_background_and_shows_the_table(page, server, e2e_dirs, shots):
    make_run(e2e_dirs["runs"], RUN)
    write_real_checkpoint(e2e_dirs["checkpoints"] / RUN / runs.BEST_CKPT, test_size=96)
    goto(page, server, "/results", "Results")
    select_option(page, "Run", RUN)
    page.get_by_text("No benchmark yet").first.wait_for()
    page.get_by_role("button", name=re.compile("800")).first.click()  # remove 800 from the sizes: 320 only
    repeats = page.get_by_role("spinbutton", name="Timed calls per measurement")
    repeats.fill("2")
    repeats.press("Enter")
    page.wait_for_timeout(1000)
    page.get_by_role("button", name="Benchmark inference").click()
    page.get_by_text(re.compile(r"^bench running \(pid \d+\)")).first.wait_for(timeout=30_000)
    page.get_by_role("button", name="Benchmark inference").click()  # a second press while it runs
    page.get_by_text(re.compile("a bench job is already running")).first.wait_for(timeout=30_000)
    page.get_by_text(re.compile(r"^bench done")).first.wait_for(timeout=300_000)  # the panel refreshes itself
    page.get_by_text("Last inference benchmark").first.wait_for(timeout=30_000)
    result = runs.read_json(e2e_dirs["runs"] / RUN / runs.BENCH_FILE)
    assert [r["size"] for r in result["rows"]] == [320, 320] and result["repeats"] == 2
    no_exception(page)
    page.get_by_text("Export and inference benchmark").first.scroll_into_view_if_needed()
    snap(page, shots / "results-bench.png")
