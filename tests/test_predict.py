"""load_image on bad inputs, and the Predictor / predict_files on a tiny trained checkpoint."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.predict import MAX_IMAGE_BYTES, ImageError, Predictor, draw_boxes, load_image, predict_files
from tests.test_evaluate import make_tiny_checkpoint


def _png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit grayscale PNG signature + IHDR claiming width x height, with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def checkpoint(plates_real, tmp_path_factory):
    return make_tiny_checkpoint(plates_real, tmp_path_factory.mktemp("tiny_predict"))


@pytest.fixture
def photo(plates_real):
    return sorted((plates_real / "test").glob("*.jpg"))[0]


def test_load_image_real_photo_from_path_bytes_and_file(photo):
    from_path = load_image(photo)
    assert from_path.mode == "RGB" and from_path.width > 100
    from_bytes = load_image(photo.read_bytes())
    with open(photo, "rb") as fh:
        from_file = load_image(fh)
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    assert np.array_equal(np.asarray(from_path), np.asarray(from_file))
    rgba = io.BytesIO()
    Image.new("RGBA", (10, 6), (1, 2, 3, 4)).save(rgba, format="PNG")
    assert load_image(rgba.getvalue()).mode == "RGB"


def test_load_image_applies_exif_orientation():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (40, 20), (200, 10, 10)).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (20, 40)


def test_load_image_errors(tmp_path, photo):
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageError, match="notes.txt: not an image"):
        load_image(text)

    truncated = tmp_path / "cut.jpg"
    data = photo.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: corrupt or truncated"):
        load_image(truncated)

    with pytest.raises(ImageError, match="decompression bomb"):  # 400 megapixels claimed in 100 bytes
        load_image(_png_header_only(20000, 20000), name="bomb.png")
    with pytest.raises(ImageError, match="too large .*8000x8000"):  # over our 50 MP limit, under Pillow's
        load_image(_png_header_only(8000, 8000), name="big.png")

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as fh:  # sparse: costs no disk
        fh.truncate(MAX_IMAGE_BYTES + 1)
    with pytest.raises(ImageError, match="huge.jpg: file too large"):
        load_image(huge)
    with pytest.raises(ImageError, match="too large"):
        load_image(b"\0" * (MAX_IMAGE_BYTES + 1))
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageError) as exc:
        load_image(truncated)
    assert "\n" not in str(exc.value)  # one line


def test_predictor_on_tiny_checkpoint(checkpoint, photo):
    predictor = Predictor(checkpoint, device="cpu")
    assert predictor.test_size == 128 and not predictor.model.training
    image = load_image(photo)
    result = predictor.predict(image)
    assert (result["width"], result["height"]) == image.size
    assert result["ms"] > 0 and set(result["timing"]) == {"preprocess_ms", "model_ms", "postprocess_ms"}
    assert len(result["boxes"]) == len(result["scores"]) > 0
    scores = result["scores"]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.05
    boxes = np.array(result["boxes"])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= image.width + 0.01).all()
    assert (boxes[:, 3] <= image.height + 0.01).all() and (boxes[:, 2] >= boxes[:, 0]).all()
    again = predictor.predict(image)  # the model is loaded once and deterministic
    assert again["boxes"] == result["boxes"] and again["scores"] == result["scores"]

    drawn = draw_boxes(image, result["boxes"], result["scores"], threshold=0.0)
    assert drawn.size == image.size and drawn is not image
    assert not np.array_equal(np.asarray(drawn), np.asarray(image))
    none_drawn = draw_boxes(image, result["boxes"], result["scores"], threshold=1.01)
    assert np.array_equal(np.asarray(none_drawn), np.asarray(image))


def test_predict_files_writes_annotated_and_reports_bad_files(checkpoint, photo, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a but broken")
    results = predict_files(checkpoint, [photo, bad, photo], out=tmp_path / "out", score_threshold=0.1,
                            device="cpu")
    assert len(results) == 3
    ok, err, ok2 = results
    assert "error" in err and "bad.png" in err["error"]
    assert all(s >= 0.1 for s in ok["scores"]) and len(ok["boxes"]) == len(ok["scores"])
    assert ok["annotated"] != ok2["annotated"]  # same name twice does not overwrite
    for r in (ok, ok2):
        with Image.open(r["annotated"]) as im:
            assert im.size == (r["width"], r["height"])
    json.dumps(results)  # the CLI prints this as JSON
