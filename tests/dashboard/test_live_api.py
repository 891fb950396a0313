"""The Live page's JSON endpoint: real run folders written by the engine's writers, served through the
same Starlette routes the dashboard server mounts."""
from __future__ import annotations

import json
import os

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from dashboard import live_api, live_figures
from engine import runs
from engine.tracking import JsonlWriter, MetricsRecorder


def _write_run(run_dir, steps: int, state: str = "running", first: int = 1):
    rec = MetricsRecorder([JsonlWriter(run_dir / runs.METRICS_FILE)])
    for step in range(first, first + steps):
        rec.record_step(step, 1 + step // 100, loss=1.0 / step, lr=0.01, grad_norm=2.0, images_per_s=12.5,
                        loss_classifier=0.1, loss_box_reg=0.1, loss_objectness=0.1, loss_rpn_box_reg=0.1)
    runs.StatusWriter(run_dir).update(state=state, pid=os.getpid(), global_step=first + steps - 1,
                                      total_steps=1000, epoch=1, epochs=10)


@pytest.fixture
def client():
    return TestClient(Starlette(routes=live_api.routes()))


def test_a_token_serves_the_header_and_the_step_charts_of_its_run(tmp_path, client):
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    _write_run(run_dir, 300)
    token = live_api.register([run_dir], live_figures.View())

    body = client.get(f"/api/live/{token}").json()
    assert body["alive"] is True and body["poll_ms"] == 3000
    (row,) = body["header"]
    assert (row["name"], row["state"], row["progress_text"], row["images_per_s"]) == ("r1", "running", "step 300/1000", "12.5")
    assert set(body["figures"]) == set(live_api.PANEL_FIGURES)
    loss = body["figures"]["live_loss"]["figure"]
    assert loss["layout"]["title"]["text"] and loss["data"], loss

    fast = client.get(f"/api/live/{token}?slow=0").json()
    assert set(fast["figures"]) == {"live_loss"}
    assert fast["figures"]["live_loss"]["version"] == body["figures"]["live_loss"]["version"]  # nothing new: same drawing

    rec = MetricsRecorder([JsonlWriter(run_dir / runs.METRICS_FILE)])
    rec.record_step(301, 4, loss=0.001)
    runs.StatusWriter(run_dir).update(state="completed")
    after = client.get(f"/api/live/{token}?slow=0").json()
    assert after["alive"] is False and after["header"][0]["state"] == "completed"
    assert after["figures"]["live_loss"]["version"] != body["figures"]["live_loss"]["version"]


def test_unknown_tokens_get_a_404_and_no_data(tmp_path, client):
    res = client.get("/api/live/not-a-token")
    assert res.status_code == 404 and "reload the page" in res.json()["error"]
    run_dir = tmp_path / "r2"
    run_dir.mkdir()
    _write_run(run_dir, 5, state="completed")
    token = live_api.register([run_dir], live_figures.View())
    assert client.get(f"/api/live/{token}").status_code == 200
    live_api.forget(token)
    assert client.get(f"/api/live/{token}").status_code == 404


def test_a_run_without_step_records_sends_captions_not_charts(tmp_path, client):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    runs.StatusWriter(run_dir).update(state="queued")
    body = client.get(f"/api/live/{live_api.register([run_dir], live_figures.View())}").json()
    assert all(v is None for v in body["figures"].values())
    assert body["captions"]["live_loss"].startswith("Train loss: no step records yet")
    assert body["header"][0]["state"] == "queued"


def test_the_plotly_bundle_is_served_from_the_installed_package(client):
    res = client.get("/api/plotly.min.js")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/javascript")
    assert b"plotly" in res.content[:2000].lower() and len(res.content) > 1_000_000


def test_old_tokens_expire(tmp_path, client, monkeypatch):
    run_dir = tmp_path / "r3"
    run_dir.mkdir()
    _write_run(run_dir, 3)
    old = live_api.register([run_dir], live_figures.View())
    monkeypatch.setattr(live_api, "TOKEN_TTL_S", -1.0)  # every token is now too old: the next register prunes
    new = live_api.register([run_dir], live_figures.View(smoothing=0.0))
    assert not live_api.known(old) and live_api.known(new)
    assert json.loads(client.get(f"/api/live/{new}").text)["header"][0]["name"] == "r3"
