"""Plotly figures. Each figure has a constant `uirevision` so a refresh keeps the user's zoom."""
from __future__ import annotations

import json
import time
from typing import Optional

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from dashboard import series, step_buffer

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("solid", "dash", "dot", "dashdot")
X_TITLES = {"step": "step", "epoch": "epoch", "wall time": "time"}
TEMPLATE = "plotly_white"


def _layout(fig: go.Figure, title: str, key: str, x_axis: str, y_title: str = "", log_y: bool = False,
            height: int = 320, styled: bool = True) -> go.Figure:
    """Common layout. styled=False leaves the template out (plotly deep-copies a template on every
    figure): `freeze(fig, TEMPLATE)` puts it into the finished JSON instead."""
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=15)), height=height, uirevision=key,
        margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.2, x=0),
        hovermode="x unified", dragmode="zoom", **({"template": TEMPLATE} if styled else {}),
    )
    fig.update_xaxes(title_text=X_TITLES.get(x_axis, x_axis), type="date" if x_axis == "wall time" else None)
    fig.update_yaxes(title_text=y_title, type="log" if log_y else "linear")
    return fig


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


FINITE_KEYS = ("loss", "grad_norm") + series.LOSS_PARTS  # a null here is a NaN/inf the engine logged


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _points(tail, key: str, step_range: Optional[tuple]) -> step_buffer.Series:
    if step_range:
        return tail.buffer.window(key, int(step_range[0]), int(step_range[1]))
    return tail.buffer.series(key)


def _x(tail, pts: step_buffer.Series, x_axis: str) -> np.ndarray:
    """x of each point: step (int32), fractional epoch, or wall-clock ms for a date axis (local time)."""
    if x_axis == "wall time":
        t = tail.buffer.cols["time"][pts.index]
        return (t + time.localtime().tm_gmtoff) * 1000.0
    if x_axis == "epoch":
        spe = tail.steps_per_epoch
        if spe:
            return pts.steps / float(spe)
        return tail.buffer.cols["epoch"][pts.index]
    steps = pts.steps
    return steps.astype(np.int32) if len(steps) and steps.max() < 2**31 and steps.min() > -2**31 else steps.astype(float)


def _y(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32)


def _nonfinite_trace(x: np.ndarray, pts: step_buffer.Series, label: str, group: str, show_legend: bool):
    bad = pts.missing > 0
    if not bad.any():
        return None
    mean = pts.mean
    idx = np.where(np.isfinite(mean), np.arange(len(mean)), -1)
    idx = np.maximum.accumulate(idx)
    y = np.where(idx >= 0, mean[np.maximum(idx, 0)], 0.0)
    text = [f"{int(n)} NaN/inf value(s)" for n in pts.missing[bad]]
    return go.Scatter(x=x[bad], y=_y(y[bad]), mode="markers", name=f"{label} NaN/inf", legendgroup=group,
                      marker=dict(symbol="x", size=9, color="#d62728"), hovertext=text, hoverinfo="text+x",
                      showlegend=show_legend)


def step_traces(tail, key: str, x_axis: str, smoothing: float, color: str, label: str,
                step_range: Optional[tuple] = None, band_hover: bool = True, mean_line: bool = True,
                dash: str = "solid") -> list:
    """Traces of one step column of one run: min/max band (when downsampled), mean, EMA, NaN marks."""
    pts = _points(tail, key, step_range)
    if not len(pts) or not (np.isfinite(pts.mean).any() or pts.missing.any()):
        return []
    x = _x(tail, pts, x_axis)
    traces = []
    group = f"{tail.name}:{key}"
    if pts.downsampled:
        hover = "y+name" if band_hover else "skip"
        edge = dict(width=0.7, color=_rgba(color, 0.45))  # a one-step spike is a thin but visible line
        traces.append(go.Scatter(x=x, y=_y(pts.low), mode="lines", line=edge, name=f"{label} min",
                                 legendgroup=group, showlegend=False, hoverinfo=hover))
        traces.append(go.Scatter(x=x, y=_y(pts.high), mode="lines", line=edge, fill="tonexty",
                                 fillcolor=_rgba(color, 0.22), name=f"{label} min–max ({pts.width} steps/point)",
                                 legendgroup=group, showlegend=False, hoverinfo=hover))
    smooth = smoothing > 0
    if mean_line or not smooth:
        name = label if not smooth else f"{label} {'mean' if pts.downsampled else 'raw'}"
        traces.append(go.Scatter(x=x, y=_y(pts.mean), mode="lines", name=name, legendgroup=group,
                                 line=dict(color=color, width=1, dash=dash), opacity=0.35 if smooth else 1.0,
                                 showlegend=not smooth))
    if smooth:
        traces.append(go.Scatter(x=x, y=_y(tail.buffer.ema(key, smoothing, pts.index)), mode="lines", name=label,
                                 legendgroup=group, line=dict(color=color, width=2, dash=dash)))
    if key in FINITE_KEYS:
        marks = _nonfinite_trace(x, pts, label, group, show_legend=True)
        if marks is not None:
            traces.append(marks)
    return traces


def loss_figure(tails: list, x_axis: str, smoothing: float, log_y: bool, key: str = "loss",
                step_range: Optional[tuple] = None, styled: bool = True) -> go.Figure:
    """Train loss per logged batch, one colour per run: min/max band per point when downsampled,
    the mean (faint when smoothed), the EMA, and a red x where a NaN/inf was logged."""
    fig = go.Figure()
    for i, t in enumerate(tails):
        for trace in step_traces(t, "loss", x_axis, smoothing, _color(i), t.name, step_range):
            fig.add_trace(trace)
    return _layout(fig, "Train loss per batch", key, x_axis, "loss", log_y, styled=styled)


def step_metric_figure(tails: list, keys: tuple, title: str, x_axis: str, smoothing: float = 0.0,
                       log_y: bool = False, key: str = "", y_title: str = "", step_range: Optional[tuple] = None,
                       band: bool = True, styled: bool = True) -> go.Figure:
    """One or more step-record keys; colour per key when one run, dash per key when several."""
    fig = go.Figure()
    several = len(tails) > 1
    for i, t in enumerate(tails):
        for j, k in enumerate(keys):
            label = k.replace("loss_", "") if len(keys) > 1 else t.name
            if several and len(keys) > 1:
                label = f"{t.name} {label}"
            color = _color(i) if (several or len(keys) == 1) else _color(j)
            for trace in step_traces(t, k, x_axis, smoothing, color, label, step_range, band_hover=False,
                                     mean_line=False, dash=DASHES[j % len(DASHES)] if several else "solid"):
                if not band and trace.fill == "tonexty":
                    continue
                if not band and trace.name.endswith(" min"):
                    continue
                fig.add_trace(trace)
    return _layout(fig, title, key or title, x_axis, y_title, log_y, styled=styled)


def epoch_metric_figure(tails: list, keys: tuple, title: str, x_axis: str, log_y: bool = False,
                        key: str = "", y_range: Optional[tuple] = (0, 1.02), styled: bool = True) -> go.Figure:
    """Per-epoch validation metrics with markers; colour per metric (one run) or per run (several)."""
    fig = go.Figure()
    several = len(tails) > 1
    for i, t in enumerate(tails):
        for j, k in enumerate(keys):
            recs = [e for e in t.epochs if isinstance(e.get(k), (int, float))]
            if not recs:
                continue
            name = series.EPOCH_METRICS.get(k, k)
            fig.add_trace(go.Scatter(
                x=series.x_values(recs, x_axis), y=series.column(recs, k), mode="lines+markers",
                name=f"{t.name} {name}" if several else name,
                line=dict(color=_color(i) if several else _color(j), dash=DASHES[j % len(DASHES)] if several else "solid")))
    fig = _layout(fig, title, key or title, x_axis, "", log_y, styled=styled)
    if y_range and not log_y:
        fig.update_yaxes(range=list(y_range))
    return fig


def pr_figure(curves: list[tuple[str, dict]], key: str = "pr") -> go.Figure:
    """Precision-recall curves (the monotone envelope), one per (label, pr_curve.json)."""
    fig = go.Figure()
    for i, (label, curve) in enumerate(curves):
        recall = curve.get("recall") or []
        precision = curve.get("precision_envelope") or curve.get("precision") or []
        if not recall:
            continue
        ap = curve.get("ap")
        name = f"{label} (AP50 {ap:.3f})" if isinstance(ap, (int, float)) else label
        fig.add_trace(go.Scatter(x=[0.0, *recall], y=[precision[0] if precision else 1.0, *precision],
                                 mode="lines", name=name, line=dict(color=_color(i), width=2, shape="hv")))
    fig.update_layout(title=dict(text="Precision-recall (IoU 0.5)", x=0.01), height=360, uirevision=key,
                      template="plotly_white", margin=dict(l=50, r=10, t=40, b=40),
                      legend=dict(orientation="h", y=-0.2, x=0))
    fig.update_xaxes(title_text="recall", range=[0, 1.02])
    fig.update_yaxes(title_text="precision", range=[0, 1.02])
    return fig


def prf_confidence_figure(prf: dict, thresholds: dict, key: str = "prf") -> go.Figure:
    """Precision, recall and F1 against the confidence threshold, with thresholds marked.

    `thresholds` maps a label (e.g. 'deployment') to a threshold value."""
    fig = go.Figure()
    x = prf.get("threshold") or prf.get("thresholds") or []
    for j, k in enumerate(("precision", "recall", "f1")):
        y = prf.get(k) or []
        if x and y:
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name="F1" if k == "f1" else k,
                                     line=dict(color=_color(j), width=2)))
    for j, (label, thr) in enumerate(thresholds.items()):
        if isinstance(thr, (int, float)):
            fig.add_vline(x=thr, line=dict(color="#555", dash=DASHES[(j + 1) % len(DASHES)], width=1),
                          annotation_text=f"{label} {thr:.2f}",
                          annotation_position="bottom left" if j else "top right")
    fig.update_layout(title=dict(text="Precision / recall / F1 vs confidence", x=0.01), height=360,
                      uirevision=key, template="plotly_white", margin=dict(l=50, r=10, t=40, b=40),
                      legend=dict(orientation="h", y=-0.2, x=0), hovermode="x unified")
    fig.update_xaxes(title_text="confidence threshold", range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return fig


def histogram_figure(values: dict[str, list], title: str, x_title: str, nbins: int = 30,
                     key: str = "") -> go.Figure:
    """Overlaid histograms, one per split."""
    fig = go.Figure()
    for i, (label, vals) in enumerate(values.items()):
        if vals:
            fig.add_trace(go.Histogram(x=vals, name=label, nbinsx=nbins, opacity=0.6,
                                       marker_color=_color(i)))
    fig.update_layout(title=dict(text=title, x=0.01), barmode="overlay", height=300, uirevision=key or title,
                      template="plotly_white", margin=dict(l=50, r=10, t=40, b=40),
                      legend=dict(orientation="h", y=-0.25, x=0))
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text="count")
    return fig


class FrozenFigure(go.Figure):
    """A finished figure whose JSON-ready dict is computed once.

    st.plotly_chart calls `to_dict()` (a deep copy) and encodes every array on each rerun; a frozen
    figure hands back the dict it already encoded (arrays as base64), so re-sending an unchanged
    chart costs almost nothing. Build a new one when the data changes.
    """

    def to_dict(self):
        return self._frozen_spec

    @property
    def json_bytes(self) -> int:
        return self._frozen_size


_TEMPLATE_JSON: dict = {}


def _template_spec(name: str) -> dict:
    if name not in _TEMPLATE_JSON:
        styled = go.Figure(layout={"template": name})  # the template as plotly writes it into a figure
        _TEMPLATE_JSON[name] = json.loads(pio.to_json(styled, validate=False))["layout"]["template"]
    return _TEMPLATE_JSON[name]


def freeze(fig: go.Figure, template: Optional[str] = None) -> FrozenFigure:
    """The figure's JSON computed once; `template` (for a figure built with styled=False) replaces
    the layout's template in that JSON, which costs nothing next to plotly validating a copy of it."""
    spec = json.loads(pio.to_json(fig, validate=False))
    layout = spec.setdefault("layout", {})
    if template:
        layout["template"] = _template_spec(template)
    frozen = FrozenFigure()
    frozen._frozen_spec = spec
    frozen._frozen_size = len(json.dumps(spec, separators=(",", ":")).encode("utf-8"))
    return frozen
