"""The prediction service as a real server process on a free port, called with a real HTTP client."""
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from engine.cli import main
from engine.export import compare_detections
from engine.predict import Predictor, load_image
from engine.serve import ServeError, ServeSettings, check_settings, is_loopback
from tests.conftest import ROOT
from tests.dashboard.conftest import dash_env  # noqa: F401  (a fixture: the Predict page test)
from tests.test_export import train_demo_checkpoint
from tests.test_predict import _png_header_only

TOKEN = "test-token-4f9a"
MAX_IMAGE_MB = 0.5
MAX_IMAGES = 3
START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m engine serve ...` in a subprocess; stopped with SIGTERM at the end."""

    def __init__(self, args, log_dir: Path, host="127.0.0.1", token=None):
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if k != "SERVE_TOKEN"}
        env.update(PYTHONPATH=str(ROOT), **({"SERVE_TOKEN": token} if token else {}))
        self.log = open(log_dir / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", *args, "--host", host,
                                      "--port", str(self.port)], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"server exited with {self.proc.returncode}: {self.log.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        pytest.fail("server did not answer /health in time")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def checkpoint(plates_real, tmp_path_factory):
    return train_demo_checkpoint(plates_real, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    srv = Server(["--checkpoint", str(checkpoint), "--max-image-mb", str(MAX_IMAGE_MB),
                  "--max-images", str(MAX_IMAGES)], tmp_path_factory.mktemp("serve-log"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def exposed_onnx_server(checkpoint, tmp_path_factory):
    """The exported model behind a token, bound to every interface (a non-loopback address), two workers."""
    out = tmp_path_factory.mktemp("serve-onnx")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    srv = Server(["--onnx", str(out / "best-160.onnx"), "--workers", "2", "--intra-threads", "1"], out,
                 host="0.0.0.0", token=TOKEN)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def photos(plates_real):
    return sorted((plates_real / "test").glob("*.jpg"))[:MAX_IMAGES]


def _files(*items, field="images"):
    return [(field, (name, data, "application/octet-stream")) for name, data in items]


def _assert_4xx(response, status, *fragments):
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    for fragment in fragments:
        assert fragment in detail, detail


def test_health_model_and_docs(server, checkpoint):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx.get(server.url + "/model").json()
    assert info["backend"] == "pytorch" and info["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert info["input_size"] == 160 and info["score_threshold"] == 0.5
    assert info["checkpoint"] == str(checkpoint.resolve()) and info["limits"]["max_images"] == MAX_IMAGES
    docs = httpx.get(server.url + "/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text.lower()
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/predict" in schema["paths"] and "/health" in schema["paths"]


def test_predict_real_photos_matches_the_model(server, checkpoint, photos):
    response = httpx.post(server.url + "/predict", files=_files(*[(p.name, p.read_bytes()) for p in photos]),
                          params={"score_threshold": 0.3}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == "pytorch" and body["score_threshold"] == 0.3 and body["timing"]["request_ms"] > 0
    assert [r["filename"] for r in body["images"]] == [p.name for p in photos]
    predictor = Predictor(checkpoint, device="cpu")
    for photo, result in zip(photos, body["images"]):
        image = load_image(photo)
        assert (result["width"], result["height"]) == image.size
        expected = predictor.predict(image)
        keep = [i for i, s in enumerate(expected["scores"]) if s >= 0.3]
        assert keep and min(result["scores"]) >= 0.3 and result["scores"] == sorted(result["scores"], reverse=True)
        # the server's torch uses more threads than this process: same detections up to float rounding
        same = compare_detections(np.array(expected["boxes"])[keep], np.array(expected["scores"])[keep],
                                  np.array(result["boxes"]), np.array(result["scores"]), threshold=0.3)
        assert same["ok"] and same["count_got"] == len(keep), same
        assert set(result["timing"]) >= {"decode_ms", "model_ms", "total_ms"}
        assert all(0 <= b[0] <= b[2] <= image.width + 0.01 and 0 <= b[1] <= b[3] <= image.height + 0.01
                   for b in result["boxes"])
    default = httpx.post(server.url + "/predict", files=_files((photos[0].name, photos[0].read_bytes())), timeout=60)
    assert default.json()["score_threshold"] == 0.5 and min(default.json()["images"][0]["scores"], default=1) >= 0.5


def test_bad_requests_get_one_line_4xx(server, photos, tmp_path):
    url = server.url + "/predict"
    jpeg = photos[0].read_bytes()
    _assert_4xx(httpx.post(url, files=_files(("notes.txt", b"this is not an image\n"))), 422,
                "notes.txt: not an image")
    _assert_4xx(httpx.post(url, files=_files(("cut.jpg", jpeg[: len(jpeg) // 2]))), 422,
                "cut.jpg: corrupt or truncated")
    _assert_4xx(httpx.post(url, files=_files(("bomb.png", _png_header_only(20000, 20000)))), 422,
                "bomb.png: decompression bomb")
    _assert_4xx(httpx.post(url, files=_files(("empty.jpg", b""))), 422, "empty.jpg: empty file")
    big = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")  # ~1.4 MB of noise: over the per-image cap, under the request cap
    assert MAX_IMAGE_MB * 2**20 < len(buf.getvalue()) < MAX_IMAGES * MAX_IMAGE_MB * 2**20
    _assert_4xx(httpx.post(url, files=_files(("noise.png", buf.getvalue()))), 413,
                "noise.png: file too large (the limit is 0.5 MB)")
    _assert_4xx(httpx.post(url, files=_files(*[(f"{i}.jpg", jpeg) for i in range(MAX_IMAGES + 1)])), 413,
                f"too many images ({MAX_IMAGES + 1}; the limit is {MAX_IMAGES})")
    _assert_4xx(httpx.post(url, files=_files(("a.jpg", jpeg), field="file")), 400, "missing multipart field 'images'")
    _assert_4xx(httpx.post(url, json={"images": ["a.jpg"]}), 400, "missing multipart field 'images'")
    _assert_4xx(httpx.post(url), 400, "missing multipart field 'images'")
    _assert_4xx(httpx.post(url, data={"images": "a.jpg"}), 400, "images")
    _assert_4xx(httpx.post(url, files=_files(("a.jpg", jpeg)), params={"score_threshold": 2}), 400, "score_threshold")
    _assert_4xx(httpx.post(url, content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}),
                400)
    # the whole request over the cap: refused on its declared length, and while streaming without one
    huge = b"\0" * (MAX_IMAGES * int(MAX_IMAGE_MB * 2**20) + 200 * 1024)
    _assert_4xx(httpx.post(url, files=_files(("huge.jpg", huge))), 413, "request too large")
    body = b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"s.jpg\"\r\n\r\n" + huge + b"\r\n--x--\r\n"
    chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
    _assert_4xx(httpx.post(url, content=chunks, headers={"content-type": "multipart/form-data; boundary=x"}), 413,
                "request too large")
    assert httpx.get(server.url + "/health").status_code == 200  # still serving


def test_health_answers_while_a_slow_request_runs(server, photos):
    done = {}

    def slow():
        files = _files(*[(p.name, p.read_bytes()) for p in photos])
        done["predict"] = (httpx.post(server.url + "/predict", files=files, timeout=120), time.perf_counter())

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.15)
    health = httpx.get(server.url + "/health", timeout=10)
    health_at = time.perf_counter()
    thread.join()
    assert health.status_code == 200 and done["predict"][0].status_code == 200
    assert health_at < done["predict"][1]  # answered before the inference finished


def test_token_required_off_loopback(exposed_onnx_server, photos):
    url = exposed_onnx_server.url
    files = _files((photos[0].name, photos[0].read_bytes()))
    _assert_4xx(httpx.post(url + "/predict", files=files), 401, "bearer token")
    _assert_4xx(httpx.post(url + "/predict", files=files, headers={"Authorization": "Bearer wrong"}), 401)
    _assert_4xx(httpx.get(url + "/model"), 401)
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/docs").status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(url + "/model", headers=auth).json()["backend"] == "onnxruntime"
    response = httpx.post(url + "/predict", files=files, headers=auth, params={"score_threshold": 0.3}, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()["images"][0]
    assert (result["width"], result["height"]) == load_image(photos[0]).size and result["boxes"]


def test_refuses_to_start_exposed_without_token(checkpoint, monkeypatch, capsys):
    monkeypatch.delenv("SERVE_TOKEN", raising=False)
    assert main(["serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0", "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to listen on 0.0.0.0 without a token: set SERVE_TOKEN") and err.count("\n") == 1
    assert main(["serve", "--host", "127.0.0.1"]) == 2
    assert "exactly one of --checkpoint or --onnx" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("")
    check_settings(ServeSettings(checkpoint="x", host="0.0.0.0"), token="t")  # with a token it may start
    with pytest.raises(ServeError):
        check_settings(ServeSettings(checkpoint="x", host="192.168.1.5"), token=None)


# ----------------------------------------------------------------------------- dashboard/service_client.py
def test_service_client_against_the_running_service(server, exposed_onnx_server, photos):
    from dashboard import service_client as client

    assert client.health(server.url) and client.health(server.url.replace("http://", ""))
    assert client.model_info(server.url)["backend"] == "pytorch"
    answer = client.predict(server.url, [(p.name, p.read_bytes()) for p in photos[:2]], score_threshold=0.3)
    first = client.as_prediction(answer["images"][0])
    assert (first["width"], first["height"]) == load_image(photos[0]).size
    assert first["boxes"] and len(first["boxes"]) == len(first["scores"]) and first["ms"] > 0
    with pytest.raises(client.ServiceError, match=r"HTTP 422: notes.txt: not an image"):
        client.predict(server.url, [("notes.txt", b"plain text")])
    with pytest.raises(client.ServiceError, match="needs a valid token"):
        client.model_info(exposed_onnx_server.url)
    assert client.model_info(exposed_onnx_server.url, token=TOKEN)["backend"] == "onnxruntime"
    closed = f"http://127.0.0.1:{_free_port()}"
    assert not client.health(closed)
    with pytest.raises(client.ServiceError, match="cannot connect"):
        client.predict(closed, [("a.jpg", b"x")])
    with pytest.raises(client.ServiceError, match="expected http://host:port"):
        client.normalize_url("ftp://example.com")


def test_predict_page_helpers_use_the_service_like_the_local_model(server, checkpoint, photos):
    from dashboard import predict_view as pv, service_client as client

    predictor = Predictor(str(checkpoint), device="cpu")
    info = client.model_info(server.url)
    assert "pytorch on cpu" in pv.service_caption(info) and str(checkpoint) in pv.service_caption(info)
    data = photos[0].read_bytes()
    photo = pv.decode_photo(data, photos[0].name, info["input_size"], info["max_size"])
    remote = pv.predict_via_service(server.url, None, photo)
    local = predictor.predict(load_image(data, photos[0].name))
    assert (remote["width"], remote["height"]) == (photo.width, photo.height)
    assert remote["scores"] == pytest.approx(local["scores"], abs=1e-4)  # every box above the slider's floor
    assert np.allclose(remote["boxes"], local["boxes"], atol=0.05)
    with pytest.raises(client.ServiceError, match="cannot connect"):
        pv.predict_via_service(f"http://127.0.0.1:{_free_port()}", None, photo)


def test_predict_page_in_service_mode(server, dash_env):
    from tests.dashboard.conftest import app_test

    at = app_test("views/predict.py")
    at.radio(key="predict_source").set_value("Prediction service").run()
    at.text_input(key="predict_service_url").set_value(f"127.0.0.1:{_free_port()}").run()
    assert not at.exception
    assert [e.value for e in at.error][0].endswith("cannot connect (ConnectError)")
    at.text_input(key="predict_service_url").set_value(server.url).run()
    assert not at.exception and not at.error
    assert any("Service: fasterrcnn_mobilenet_v3_large_320_fpn" in c.value for c in at.caption)
