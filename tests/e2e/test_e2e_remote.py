"""Remote mode: bound to all interfaces the dashboard shows nothing without a password."""
from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from tests.dashboard.fixtures import make_run
from tests.e2e.conftest import Server, free_port
from tests.e2e.test_e2e_dashboard import live_panel

pytestmark = pytest.mark.e2e


def _server(tmp_path, password=None) -> Server:
    env = dict(os.environ, PLATES_RUNS_DIR=str(tmp_path / "runs"), PLATES_CHECKPOINTS_DIR=str(tmp_path / "ck"),
               PLATES_DEMO_DATA_DIR=str(tmp_path / "no-demo"), PLATES_CONFIGS_DIR=str(tmp_path / "no-configs"))
    env.pop("DASHBOARD_PASSWORD", None)
    if password:
        env["DASHBOARD_PASSWORD"] = password
    srv = Server(env, free_port(), tmp_path / f"streamlit-{bool(password)}.log", address="0.0.0.0")
    srv.start()
    return srv


def test_all_interfaces_without_password_shows_no_page(tmp_path, page):
    srv = _server(tmp_path)
    try:
        page.goto(srv.url)
        page.get_by_text("bound to a non-loopback address without a password").wait_for()
        assert page.get_by_role("heading", name="Runs", exact=True).count() == 0
        assert page.get_by_role("link", name="Live").count() == 0
    finally:
        srv.stop()


def test_all_interfaces_with_password_asks_first(tmp_path, page):
    make_run(tmp_path / "runs", "watched")
    srv = _server(tmp_path, password="correct horse")
    try:
        page.goto(srv.url)
        field = page.get_by_role("textbox", name="Password")
        field.fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Wrong password.").wait_for()
        assert page.get_by_role("heading", name="Runs", exact=True).count() == 0
        field.fill("correct horse")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_role("heading", name="Runs", exact=True).wait_for()
        # signed in, the Live page's panel gets its data; without a token minted by a session the endpoint has none
        page.locator('[data-testid="stSidebarNav"] a').filter(has_text="Live").first.click()
        live_panel(page)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{srv.url}/api/live/a-guessed-token", timeout=10)
        assert err.value.code == 404
    finally:
        srv.stop()
