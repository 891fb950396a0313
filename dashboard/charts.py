"""Plotly figures. Each figure has a constant `uirevision` so a refresh keeps the user's zoom."""
from __future__ import annotations

from typing import Optional

import plotly.graph_objects as go

from dashboard import series

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
DASHES = ("solid", "dash", "dot", "dashdot")
X_TITLES = {"step": "step", "epoch": "epoch", "wall time": "time"}


def _layout(fig: go.Figure, title: str, key: str, x_axis: str, y_title: str = "", log_y: bool = False,
            height: int = 320) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0.01, font=dict(size=15)), height=height, uirevision=key,
        margin=dict(l=50, r=10, t=40, b=40), legend=dict(orientation="h", y=-0.2, x=0),
        hovermode="x unified", template="plotly_white",
    )
    fig.update_xaxes(title_text=X_TITLES.get(x_axis, x_axis))
    fig.update_yaxes(title_text=y_title, type="log" if log_y else "linear")
    return fig


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def loss_figure(tails: list, x_axis: str, smoothing: float, log_y: bool, key: str = "loss") -> go.Figure:
    """Train loss per logged batch: raw (faint) and smoothed, one colour per run."""
    fig = go.Figure()
    for i, t in enumerate(tails):
        recs = [s for s in t.steps if isinstance(s.get("loss"), (int, float))]
        if not recs:
            continue
        x = series.x_values(recs, x_axis, t.status.get("steps_per_epoch"))
        y = series.column(recs, "loss")
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{t.name} raw" if smoothing > 0 else t.name, legendgroup=t.name,
                                 line=dict(color=_color(i), width=1), opacity=0.3 if smoothing > 0 else 1.0,
                                 showlegend=smoothing <= 0))
        if smoothing > 0:
            fig.add_trace(go.Scatter(x=x, y=series.ema(y, smoothing), mode="lines", name=t.name,
                                     legendgroup=t.name, line=dict(color=_color(i), width=2)))
    return _layout(fig, "Train loss per batch", key, x_axis, "loss", log_y)


def step_metric_figure(tails: list, keys: tuple, title: str, x_axis: str, smoothing: float = 0.0,
                       log_y: bool = False, key: str = "", y_title: str = "") -> go.Figure:
    """One or more step-record keys; colour per key when one run, dash per key when several."""
    fig = go.Figure()
    several = len(tails) > 1
    for i, t in enumerate(tails):
        for j, k in enumerate(keys):
            recs = [s for s in t.steps if isinstance(s.get(k), (int, float))]
            if not recs:
                continue
            y = series.column(recs, k)
            if smoothing > 0:
                y = series.ema(y, smoothing)
            label = k.replace("loss_", "") if len(keys) > 1 else t.name
            if several and len(keys) > 1:
                label = f"{t.name} {label}"
            color = _color(i) if (several or len(keys) == 1) else _color(j)
            fig.add_trace(go.Scatter(
                x=series.x_values(recs, x_axis, t.status.get("steps_per_epoch")), y=y, mode="lines",
                name=label, line=dict(color=color, width=1.5, dash=DASHES[j % len(DASHES)] if several else "solid")))
    return _layout(fig, title, key or title, x_axis, y_title, log_y)


def epoch_metric_figure(tails: list, keys: tuple, title: str, x_axis: str, log_y: bool = False,
                        key: str = "", y_range: Optional[tuple] = (0, 1.02)) -> go.Figure:
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
    fig = _layout(fig, title, key or title, x_axis, "", log_y)
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
