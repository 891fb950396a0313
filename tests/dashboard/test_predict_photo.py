"""The Predict page's photo path: decode once at the model's resolution, EXIF orientation, display JPEG."""
import io

import numpy as np
import pytest
from PIL import Image

from dashboard import predict_view as pv
from engine.predict import ImageError, load_image


def _phone_jpeg(orientation: int = 6, size=(4000, 3000)) -> bytes:
    """A 12-MP JPEG stored landscape with a red block at its stored top-left and an EXIF orientation."""
    stored = Image.new("RGB", size, (40, 40, 40))
    stored.paste((255, 0, 0), (0, 0, 800, 600))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_a_rotated_12mp_phone_photo_is_decoded_small_and_upright():
    data = _phone_jpeg(orientation=6)  # 6: rotate 90° clockwise to display
    photo = pv.decode_photo(data, "phone.jpg", test_size=800, max_size=1333)
    assert (photo.width, photo.height) == (3000, 4000)  # portrait, as the phone showed it
    assert photo.model_input.size == pv.model_input_size(3000, 4000, 800, 1333) == (800, 1066)
    assert max(photo.display.size) == pv.DISPLAY_MAX_SIDE and photo.display.size == (960, 1280)
    reference = load_image(data).resize(photo.display.size)  # the full decode, EXIF applied
    # the red block (stored top-left) is now top-right, in both
    for img in (photo.display, reference):
        arr = np.asarray(img)
        assert arr[20, -20, 0] > 200 and arr[20, -20, 1] < 60 and arr[-20, 20, 0] < 80


def test_display_jpeg_is_small_and_boxes_scale_to_it():
    data = _phone_jpeg(orientation=1)
    photo = pv.decode_photo(data, "p.jpg", 800, 1333)
    pred = {"boxes": [[0.0, 0.0, 800.0, 600.0]], "scores": [0.9], "width": 4000, "height": 3000}
    jpeg = pv.display_jpeg(photo, pred, 0.5)
    shown = Image.open(io.BytesIO(jpeg))
    assert shown.format == "JPEG" and shown.size == (1280, 960) and len(jpeg) < 400_000
    full = Image.open(io.BytesIO(pv.full_size_jpeg(photo, pred, 0.5)))
    assert full.size == (4000, 3000)


def test_bad_uploads_give_the_loaders_one_line_errors():
    with pytest.raises(ImageError, match="not an image"):
        pv.decode_photo(b"this is not an image", "notes.jpg", 800, 1333)
    with pytest.raises(ImageError, match="empty file"):
        pv.decode_photo(b"", "empty.jpg", 800, 1333)
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(png, format="PNG")
    photo = pv.decode_photo(png.getvalue(), "small.png", 800, 1333)  # upscaled to the model's size
    assert (photo.width, photo.height) == (300, 200) and photo.model_input.size == (1200, 800)


def test_predictions_on_the_model_copy_map_back_to_full_size(plates_real):
    from tests.dashboard.fixtures import write_real_checkpoint
    from engine.predict import Predictor
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ck = write_real_checkpoint(Path(tmp) / "best.pth")
        predictor = Predictor(ck, device="cpu")
        data = (plates_real / "test" / "Cars91.jpg").read_bytes()
        photo = pv.decode_photo(data, "Cars91.jpg", int(predictor.test_size), int(predictor.model.transform.max_size))
        pred = pv.predict_photo(predictor, photo)
        direct = predictor.predict(load_image(data))
    assert (pred["width"], pred["height"]) == (direct["width"], direct["height"])
    assert pred["timing"]["decode_ms"] >= 0 and len(pred["boxes"]) == len(pred["scores"])
    if pred["boxes"] and direct["boxes"]:  # the same model on the same photo: the top box lands in the same place
        from engine.metrics import box_iou
        assert box_iou(np.array(pred["boxes"][:1]), np.array(direct["boxes"])).max() > 0.7
