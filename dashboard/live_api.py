"""The Live page's fast path: a JSON endpoint that an open tab polls instead of rerunning the page.

Why: every Streamlit rerun costs each open tab about 70 ms of browser CPU even when nothing on the
page changes (scripts/tab_cpu.py on a page whose 3-s fragment drew nothing: 3 tabs, 0.06-0.075
cores), and a Plotly chart whose data changed is unmounted and drawn anew (Streamlit hashes the
figure into the element's id). Five tabs refreshing every 3 s on the training machine took a third
of its CPU. The header and the six charts are instead drawn by one small component
(dashboard/live_panel) that fetches `/api/live/<token>` every few seconds and updates its charts in
place (Plotly.react).

A token names what one Live page shows (run folders + view) and is minted for a session that has
passed the password gate; the endpoint answers only known tokens, so it is no wider than the page.
Tokens unused for TOKEN_TTL_S are forgotten (the tab then shows "reload the page").
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dashboard import formatting as fmt, live_figures, series
from engine import runs

TOKEN_TTL_S = 15 * 60
MAX_TOKENS = 512
POLL_S = 3.0  # how often an open tab asks for the header and loss chart while a run is alive
SLOW_POLL_S = 15.0  # and for the other charts


@dataclass
class Watch:
    run_dirs: tuple
    view: live_figures.View
    used_at: float = field(default_factory=time.monotonic)


_watches: dict = {}
_lock = threading.Lock()
_cache = live_figures.LiveCache()


def shared_cache() -> live_figures.LiveCache:
    """The process-wide tails and figures: the Live page and the endpoint read the same buffers."""
    return _cache


def register(run_dirs: list, view: live_figures.View) -> str:
    """A new token for these runs and view; the Live page keeps it while it shows them."""
    now = time.monotonic()
    with _lock:
        for token, watch in list(_watches.items()):
            if now - watch.used_at > TOKEN_TTL_S:
                del _watches[token]
        token = secrets.token_urlsafe(18)
        _watches[token] = Watch(tuple(str(d) for d in run_dirs), view, now)
        while len(_watches) > MAX_TOKENS:
            del _watches[next(iter(_watches))]
    return token


def known(token: str) -> bool:
    with _lock:
        return token in _watches


def forget(token: str) -> None:
    with _lock:
        _watches.pop(token, None)


def _header_row(t: series.RunTail) -> dict:
    h = series.header(t.status, t.buffer.last("images_per_s") if len(t.buffer) else None)
    return {
        "name": t.name, "state": h.state, "color": fmt.STATE_COLORS.get(h.state, "gray"),
        "epoch": h.epoch, "images_per_s": fmt.number(h.images_per_s, 1),
        "eta": fmt.duration(h.eta_s) if h.eta_s is not None else "—",
        "heartbeat": fmt.duration(h.heartbeat_age_s), "progress": h.progress, "progress_text": h.progress_text,
        "error": (t.status or {}).get("error") or "",
    }


PANEL_FIGURES = ("live_loss", "live_parts", "live_grad", "live_map", "live_prf", "live_lr")  # the panel draws all six
FAST_FIGURES = ("live_loss",)  # asked for on every poll; the others on every `slow` poll


def payload(token: str, slow: bool = True) -> Optional[str]:
    """The JSON the panel draws: header rows, the six figures (each with a version: the same
    version is not drawn again) and whether to keep polling. `slow=False` sends the loss chart only.
    None for an unknown or expired token."""
    with _lock:
        watch = _watches.get(token)
        if watch is None:
            return None
        watch.used_at = time.monotonic()
    tails = [_cache.tail(Path(d)) for d in watch.run_dirs]
    for t in tails:
        t.poll()
    figs, _ = _cache.figures(tails, watch.view)
    alive = any(runs.effective_state(t.status) in runs.LIVE_STATES for t in tails)
    widths = {t.buffer.width for t in tails if len(t.buffer)}
    head = {
        "header": [_header_row(t) for t in tails], "alive": alive, "poll_ms": int(POLL_S * 1000),
        "slow_ms": int(SLOW_POLL_S * 1000), "bucket": max(widths, default=1) if watch.view.step_range is None else 1,
        "captions": {k: v for k, v in live_figures.FIGURES if k in PANEL_FIGURES},
    }
    parts = [json.dumps(head, separators=(",", ":"), allow_nan=False)[:-1], ',"figures":{']
    keys = PANEL_FIGURES if slow else FAST_FIGURES
    parts.append(",".join(f'"{k}":{_encoded(figs.get(k))}' for k in keys))
    parts.append("}}")
    return "".join(parts)


_encodings: "OrderedDict[int, tuple]" = OrderedDict()


def _encoded(fig) -> str:
    """{"version", "figure"} as JSON text, encoded once per frozen figure (every tab asks for the same one)."""
    if fig is None:
        return "null"
    with _lock:
        hit = _encodings.get(id(fig))
        if hit is not None and hit[0] is fig:
            return hit[1]
    text = '{"version":%d,"figure":%s}' % (id(fig), json.dumps(fig.to_dict(), separators=(",", ":"),
                                                                  default=_json_default))
    with _lock:
        _encodings[id(fig)] = (fig, text)  # holding the figure keeps its id unique
        while len(_encodings) > 64:
            _encodings.popitem(last=False)
    return text


async def live_endpoint(request):
    """GET /api/live/{token}[?slow=0]: the payload as JSON; 404 for an unknown token."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    slow = request.query_params.get("slow", "1") != "0"
    text = await run_in_threadpool(payload, request.path_params["token"], slow)
    if text is None:
        return Response('{"error": "unknown or expired view: reload the page"}', status_code=404,
                        media_type="application/json", headers={"Cache-Control": "no-store"})
    return Response(text, media_type="application/json", headers={"Cache-Control": "no-store"})


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


async def plotly_js(request):
    """The plotly.js bundle of the installed plotly package (offline: no CDN), cached by the browser."""
    import plotly
    from starlette.responses import FileResponse

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})


def routes() -> list:
    from starlette.routing import Route

    return [Route("/api/live/{token}", live_endpoint), Route("/api/plotly.min.js", plotly_js)]
