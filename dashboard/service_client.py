"""Call a running prediction service (python -m engine serve) and read its answers.

Plain functions for the Predict page: every failure (no service there, wrong token, a rejected
image, an answer that is not the service's JSON) raises ServiceError with one line.
`as_prediction` turns one image of an answer into the dict engine.predict.Predictor.predict
returns, so the page draws service results and local results the same way.
"""
from __future__ import annotations

from typing import Optional, Sequence
from urllib.parse import urlparse

import httpx

DEFAULT_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 3.0


class ServiceError(Exception):
    """The service could not be used; str(e) is one line."""


def normalize_url(url: str) -> str:
    """'localhost:8000' -> 'http://localhost:8000'; ServiceError for anything that is not http(s)://host[:port]."""
    text = (url or "").strip().rstrip("/")
    if text and "://" not in text:
        text = "http://" + text
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ServiceError(f"service URL {url!r}: expected http://host:port")
    return text


def _headers(token: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = str(detail) if detail else (response.text or response.reason_phrase or "")
    return " ".join(text.split())[:300]


def _request(method: str, url: str, token: Optional[str], timeout: float, **kwargs) -> dict:
    try:
        response = httpx.request(method, url, headers=_headers(token), timeout=timeout, **kwargs)
    except httpx.TimeoutException:
        raise ServiceError(f"{url}: no answer within {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise ServiceError(f"{url}: cannot connect ({exc.__class__.__name__})") from None
    if response.status_code == 401:
        raise ServiceError(f"{url}: the service needs a valid token ({_detail(response)})")
    if response.status_code >= 400:
        raise ServiceError(f"{url}: HTTP {response.status_code}: {_detail(response)}")
    try:
        body = response.json()
    except ValueError:
        raise ServiceError(f"{url}: the answer is not JSON (is this the prediction service?)") from None
    if not isinstance(body, dict):
        raise ServiceError(f"{url}: unexpected answer (not a JSON object)")
    return body


def health(url: str, timeout: float = HEALTH_TIMEOUT_S) -> bool:
    """True when GET /health answers {"status": "ok"}; never raises."""
    try:
        return _request("GET", normalize_url(url) + "/health", None, timeout).get("status") == "ok"
    except ServiceError:
        return False


def model_info(url: str, token: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """GET /model: backend, model name, input size, threshold, limits."""
    return _request("GET", normalize_url(url) + "/model", token, timeout)


def predict(url: str, images: Sequence[tuple[str, bytes]], token: Optional[str] = None,
            score_threshold: Optional[float] = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """POST /predict with (filename, bytes) pairs; the service's JSON, checked to hold one result per image."""
    if not images:
        raise ServiceError("no images to send")
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    params = {"score_threshold": score_threshold} if score_threshold is not None else None
    body = _request("POST", normalize_url(url) + "/predict", token, timeout, files=files, params=params)
    results = body.get("images")
    if not isinstance(results, list) or len(results) != len(images) or not all(
            isinstance(r, dict) and {"boxes", "scores", "width", "height"} <= set(r) for r in results):
        raise ServiceError(f"{url}: unexpected answer (no result per image)")
    return body


def as_prediction(result: dict) -> dict:
    """One image of a /predict answer in Predictor.predict's shape (boxes, scores, ms, width, height, timing)."""
    timing = dict(result.get("timing") or {})
    return {"boxes": [list(map(float, b)) for b in result["boxes"]], "scores": [float(s) for s in result["scores"]],
            "ms": float(timing.get("total_ms", 0.0)), "width": int(result["width"]), "height": int(result["height"]),
            "timing": timing}
