"""Dataset: per-split counts, box statistics and sample images with their boxes."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard import charts, dataset_view as dv, settings, ui
from engine import runs
from engine.errors import EngineError

st.title("Dataset")
runs_dir = settings.runs_dir()


def _mtime(root: Path, split: str) -> float:
    try:
        return (root / split / "_annotations.coco.json").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner="Reading the dataset ...", max_entries=16)
def _summaries(root: str, stamp: tuple) -> dict:
    from engine.data import summarize_dataset

    return summarize_dataset(root)


@st.cache_resource(show_spinner="Loading annotations ...", max_entries=8)
def _split(root: str, split: str, stamp: float):
    from engine.data import load_split

    return load_split(root, split)


names = runs.list_run_names(runs_dir)
sources = (["a run's dataset.json"] if names else []) + ["a dataset folder"]
source = st.radio("Source", sources, horizontal=True, key="ds_source")
splits: dict = {}
root_text = None
if source == "a run's dataset.json":
    run = ui.run_picker(names, key="ds_run")
    splits, root_text = dv.read_run_dataset(runs.run_path(runs_dir, run))
    if not splits:
        st.info(f"{run} has no dataset.json yet (written when training starts).")
    if root_text:
        st.caption(f"Dataset root from the run: `{root_text}`")
else:
    root_text = st.text_input("Dataset root", value=str(settings.demo_data_dir()), key="ds_root",
                              help="Roboflow COCO export: <root>/{train,valid,test}/_annotations.coco.json")
root = settings.resolve_project_path(root_text) if root_text else None

if not splits and root is not None:
    if not root.exists():
        st.warning(f"{root} does not exist.")
    else:
        try:
            splits = _summaries(str(root), tuple(_mtime(root, s) for s in dv.SPLITS))
        except ImportError as exc:
            st.warning(f"Cannot read datasets here: {exc}")
        except EngineError as exc:
            st.error(str(exc))

if splits:
    st.subheader("Splits")
    st.dataframe(pd.DataFrame(dv.summary_table(splits)), hide_index=True)


def _details() -> None:
    available = [s for s in dv.SPLITS if (root / s / "_annotations.coco.json").is_file()]
    if not available:
        return
    picked = st.multiselect("Splits for the statistics", available, default=available, key="ds_splits")
    loaded = {}
    for split in picked:
        try:
            loaded[split] = _split(str(root), split, _mtime(root, split))
        except ImportError as exc:
            st.warning(f"Cannot read datasets here: {exc}")
            return
        except EngineError as exc:
            st.error(str(exc))
    if not loaded:
        return
    stats = {split: dv.box_stats(s.images) for split, s in loaded.items()}
    st.subheader("Boxes")
    c1, c2, c3 = st.columns(3)
    c1.plotly_chart(charts.histogram_figure({k: v["boxes_per_image"] for k, v in stats.items()},
                                            "Boxes per image", "boxes", nbins=10, key="ds_per_image"),
                    key="ds_per_image")
    c2.plotly_chart(charts.histogram_figure({k: v["box_size_px"] for k, v in stats.items()},
                                            "Box size (√area, px)", "px", key="ds_size"), key="ds_size")
    c3.plotly_chart(charts.histogram_figure({k: v["aspect"] for k, v in stats.items()},
                                            "Box aspect (width / height)", "w / h", key="ds_aspect"),
                    key="ds_aspect")

    st.subheader("Samples")
    s1, s2, s3 = st.columns([1, 1, 1], vertical_alignment="bottom")
    split = s1.selectbox("Split", list(loaded), key="ds_sample_split")
    count = s2.slider("Images", 4, 24, 8, 4, key="ds_sample_n")
    if s3.button("Shuffle", icon=":material/shuffle:", key="ds_shuffle"):
        st.session_state["ds_seed"] = st.session_state.get("ds_seed", 0) + 1
    picks = dv.pick_samples(loaded[split].images, count, seed=st.session_state.get("ds_seed", 0))
    for start in range(0, len(picks), 4):
        cols = st.columns(4)
        for col, rec in zip(cols, picks[start:start + 4]):
            try:
                col.image(dv.draw_boxes(rec.path, rec.boxes), caption=f"{rec.file_name} · {len(rec.boxes)} box(es)",
                          width="stretch")
            except OSError as exc:
                col.error(f"{rec.file_name}: {exc}")


if root is not None and root.is_dir():
    ui.safe(_details)
