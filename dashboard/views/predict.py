"""Predict: a run's checkpoint on uploaded photos or a camera shot; the slider re-filters boxes."""
from __future__ import annotations

import streamlit as st

from dashboard import model_provenance, predict_view as pv, service_client, settings, ui
from engine.errors import EngineError

runs_dir = settings.runs_dir()
checkpoints_dir = settings.checkpoints_dir()
PREDICTIONS = "_predictions"  # (checkpoint, mtime, file hash) -> prediction dict

st.title("Predict")


@st.cache_resource(show_spinner="Loading the model ...", max_entries=2)
def _predictor(path: str, mtime: float):
    """One model per checkpoint file version (path + mtime)."""
    from engine.predict import Predictor

    return Predictor(path, device="cpu")


LOCAL, SERVICE = "Local checkpoint", "Prediction service"
source = st.radio("Run the model", [LOCAL, SERVICE], horizontal=True, key="predict_source",
                  help="a checkpoint loaded in this dashboard, or a running `python -m engine serve`")
service_url, service_token, predictor, ckpt_path, mtime = None, None, None, None, 0.0
if source == SERVICE:
    c1, c2, c3 = st.columns([2, 1, 2], vertical_alignment="bottom")
    service_url = c1.text_input("Service URL", "http://127.0.0.1:8000", key="predict_service_url")
    service_token = c2.text_input("Token", type="password", key="predict_service_token",
                                  help="needed when the service is bound to a non-loopback address")
    with c3:
        threshold = st.slider("Confidence threshold", 0.05, 1.0, 0.5, 0.01, key="predict_threshold",
                              help="re-filters the boxes without calling the service again")
    try:
        info = service_client.model_info(service_url, token=service_token or None)
    except service_client.ServiceError as exc:
        st.error(str(exc))
        st.caption("Start one with `python -m engine serve --checkpoint checkpoints/RUN/best.pth` (docs/deploy.md).")
        st.stop()
    st.caption(f"Service: {pv.service_caption(info)}")
    test_size, max_size = int(info.get("input_size") or 800), int(info.get("max_size") or 1333)
else:
    names = pv.runs_with_checkpoints(runs_dir, checkpoints_dir)
    if not names:
        st.info(f"No checkpoints yet in `{checkpoints_dir}`: train a run first (Runs page).")
        st.stop()
    c1, c2, c3 = st.columns([2, 1, 2], vertical_alignment="bottom")
    with c1:
        run = ui.run_picker(names, key="predict_run")
    ckpts = pv.available_checkpoints(checkpoints_dir, run)
    with c2:
        which = st.radio("Checkpoint", list(ckpts), horizontal=True, key="predict_which")
    with c3:
        threshold = st.slider("Confidence threshold", 0.05, 1.0, 0.5, 0.01, key="predict_threshold",
                              help="re-filters the boxes without running the model again")
    ckpt_path, mtime = pv.checkpoint_key(ckpts[which])
    try:
        predictor = _predictor(ckpt_path, mtime)
    except ImportError as exc:
        st.error(f"Prediction is not available here: {exc}")
        st.stop()
    except EngineError as exc:
        st.error(str(exc))
        st.stop()
    st.caption(f"Model: `{ckpt_path}`")
    origin = model_provenance.describe_run(run, runs_dir, checkpoints_dir)
    if origin is not None:
        st.caption(f"Trained on {origin.trained_on}"
                   + (f", starting from {origin.pretrained_from}" if origin.pretrained_from else ""))
        if origin.warning:
            st.warning(origin.warning + " Fine-tune it on your own Roboflow export with:")
            st.code(origin.command, language="bash")
    test_size, max_size = int(predictor.test_size), int(predictor.model.transform.max_size)

uploads = st.file_uploader("Photos (jpg, png, webp)", type=list(pv.UPLOAD_TYPES), accept_multiple_files=True,
                           key="predict_upload")
files = list(uploads or [])
if st.toggle("Use the camera", key="predict_camera_on"):
    shot = st.camera_input("Take a photo", key="predict_camera")
    if shot is not None:
        files.append(shot)


PHOTOS = "_photos"  # upload id -> decoded Photo (model-size and display copies)


def _photo(name: str, upload) -> pv.Photo:
    """Decode an upload once per session (keyed by Streamlit's file id, else the content hash)."""
    data = upload.getvalue()
    key = getattr(upload, "file_id", None) or pv.file_hash(data)
    photos = st.session_state.setdefault(PHOTOS, {})
    if key not in photos:
        pv.remember(photos, key, pv.decode_photo(data, name, test_size, max_size))
    return photos[key]


def _predict(photo: pv.Photo) -> dict:
    """The prediction cached per checkpoint + file content: a slider move never re-runs the model."""
    cache = st.session_state.setdefault(PREDICTIONS, {})
    key = (service_url or ckpt_path, mtime, photo.digest)
    if key not in cache:
        cache[key] = (pv.predict_via_service(service_url, service_token, photo) if service_url
                      else pv.predict_photo(predictor, photo))
    return cache[key]


def _show(name: str, upload) -> None:
    try:
        photo = _photo(name, upload)
        pred = _predict(photo)
    except (EngineError, service_client.ServiceError) as exc:
        st.error(f"{name}: {exc}")
        return
    shown = pv.filter_prediction(pred, threshold)
    with st.container(border=True):
        left, right = st.columns([3, 1])
        left.image(pv.display_jpeg(photo, pred, threshold),
                   caption=f"{name} · {len(shown['boxes'])} plate(s) ≥ {threshold:.2f}", width="stretch")
        with right:
            st.metric("plates", len(shown["boxes"]))
            st.metric("inference", f"{pred.get('ms', 0):.0f} ms",
                      help="upload to boxes: decoding at the model's resolution plus the model call")
            st.caption(f"{pred.get('width')}×{pred.get('height')} px")
            if shown["scores"]:
                st.caption("scores: " + ", ".join(f"{s:.2f}" for s in shown["scores"][:10]))
            st.download_button("Annotated JPEG (full size)", lambda: pv.full_size_jpeg(photo, pred, threshold),
                               pv.download_name(name, "_pred.jpg"), icon=":material/download:", mime="image/jpeg",
                               on_click="ignore", key=f"dl_img_{name}_{photo.digest[:8]}")
            st.download_button("Boxes JSON", pv.boxes_json(name, shown, ckpt_path or service_url), pv.download_name(name, "_boxes.json"),
                               icon=":material/download:", mime="application/json", on_click="ignore",
                               key=f"dl_json_{name}_{photo.digest[:8]}")


if not files:
    st.caption("Upload one or more photos to see the detector's boxes.")
for f in files:
    ui.safe(_show, getattr(f, "name", "camera.jpg"), f)
