"""Roboflow COCO loading: real export, every quirk, every bad input, dataset items and flips."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from engine.config import AugmentConfig
from engine.data import (ANNOTATIONS_FILE, DatasetError, PlateDataset, check_dataset_root, collate_fn,
                         load_split, summarize_dataset, to_coco_gt)
from engine.errors import EngineError
from tests.conftest import corrupt_png_same_size

ROBOFLOW_CATEGORIES = [
    {"id": 0, "name": "license-plates", "supercategory": "none"},
    {"id": 1, "name": "license_plate", "supercategory": "license-plates"},
]
NO_AUGMENT = AugmentConfig(hflip_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


@pytest.fixture
def real_images(plates_real):
    """Three real photos from plates-real/valid: [(file_name, width, height), ...]."""
    data = json.loads((plates_real / "valid" / ANNOTATIONS_FILE).read_text())
    return [(im["file_name"], im["width"], im["height"]) for im in data["images"][:3]]


def write_split(root, plates_real, real_images, annotations, categories=ROBOFLOW_CATEGORIES, split="valid",
                images=None):
    """A tiny Roboflow split under root/split made of real photos; returns the annotation file path."""
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, _, _ in real_images:
        shutil.copy(plates_real / "valid" / name, split_dir / name)
    if images is None:
        images = [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h) in enumerate(real_images)]
    path = split_dir / ANNOTATIONS_FILE
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def ann(aid, image_id, bbox, category_id=1, **extra):
    return {"id": aid, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": 0, **extra}


# ----------------------------------------------------------------------------- the real export
def test_real_export_loads_with_roboflow_quirks(plates_real):
    summary = summarize_dataset(plates_real)
    assert {k: (v["images"], v["boxes"]) for k, v in summary.items()} == {
        "train": (264, 295), "valid": (75, 87), "test": (39, 42)}
    split = load_split(plates_real, "valid")
    assert split.category_name == "license_plate"  # the id-0 group "license-plates" is not a class
    data = json.loads((plates_real / "valid" / ANNOTATIONS_FILE).read_text())
    first = data["annotations"][0]
    record = next(r for r in split.images if r.id == first["image_id"])
    x, y, w, h = first["bbox"]
    assert record.boxes.dtype == np.float32 and record.boxes.shape[1] == 4
    assert np.allclose(record.boxes[0], [x, y, x + w, y + h], atol=1e-3)  # xywh -> xyxy
    for r in split.images:
        assert r.path.is_file()
        assert np.all(r.boxes[:, 2] <= r.width) and np.all(r.boxes[:, 3] <= r.height)
    assert check_dataset_root(plates_real) == summary


# ----------------------------------------------------------------------------- quirks
def test_negatives_clipping_dropping_and_crowd(tmp_path, plates_real, real_images):
    (_, w0, h0), (_, w1, h1) = real_images[0], real_images[1]
    annotations = [
        ann(0, 0, [10, 20, 30, 15]),                    # normal
        ann(1, 0, [w0 - 20, h0 - 10, 50, 40]),          # pokes out -> clipped
        ann(2, 0, [-5, -5, 25, 20]),                    # pokes out top-left -> clipped
        ann(3, 1, [40, 40, 1, 30]),                     # width 1 -> dropped
        ann(4, 1, [w1 + 5, 10, 30, 20]),                # fully outside -> dropped
        ann(5, 1, [60, 60, -20, 10]),                   # negative width -> dropped
        ann(6, 1, [50, 50, 40, 20], iscrowd=1),         # crowd flag ignored, kept as a plate
        ann(7, 1, [100, 80, 30, 12], category_id=0),    # known category id: a plate too
    ]
    write_split(tmp_path, plates_real, real_images, annotations)
    split = load_split(tmp_path, "valid")
    assert split.summary == {"images": 3, "boxes": 5, "empty_images": 1, "dropped_boxes": 3,
                             "clipped_boxes": 2, "crowd_ignored": 1}
    by_id = {r.id: r for r in split.images}
    assert np.allclose(by_id[0].boxes, [[10, 20, 40, 35], [w0 - 20, h0 - 10, w0, h0], [0, 0, 20, 15]])
    assert np.allclose(by_id[1].boxes, [[50, 50, 90, 70], [100, 80, 130, 92]])
    assert by_id[2].boxes.shape == (0, 4)  # negative image kept
    item_image, target = PlateDataset(split, train=False)[2]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert item_image.shape == (3, real_images[2][2], real_images[2][1])


def test_group_category_detection_by_supercategory(tmp_path, plates_real, real_images):
    categories = [{"id": 0, "name": "plates-group", "supercategory": "none"},
                  {"id": 1, "name": "car_plate", "supercategory": "plates-group"}]
    write_split(tmp_path, plates_real, real_images, [ann(0, 0, [10, 10, 30, 10])], categories=categories)
    assert load_split(tmp_path, "valid").category_name == "car_plate"


# ----------------------------------------------------------------------------- bad inputs
def assert_error(root, split, *fragments):
    with pytest.raises(DatasetError) as info:
        load_split(root, split)
    message = str(info.value)
    assert isinstance(info.value, EngineError) and "\n" not in message
    for fragment in fragments:
        assert str(fragment) in message, message
    return message


def test_missing_split_folder_and_annotation_file(tmp_path, plates_real, real_images):
    assert_error(tmp_path / "nope", "train", tmp_path / "nope")
    tmp_path.joinpath("train").mkdir()
    assert_error(tmp_path, "valid", tmp_path / "valid", "split folder")
    assert_error(tmp_path, "train", tmp_path / "train" / ANNOTATIONS_FILE, "not found")


def test_malformed_json_and_wrong_structure(tmp_path, plates_real, real_images):
    path = write_split(tmp_path, plates_real, real_images, [])
    path.write_text('{"images": [ {"id": 0,')
    assert_error(tmp_path, "valid", path, "malformed JSON", "line 1")
    path.write_text('{"images": {"id": 0}, "annotations": []}')
    assert_error(tmp_path, "valid", path, "'images' must be a list")
    path.write_text('[1, 2]')
    assert_error(tmp_path, "valid", path, "top level")
    path.write_text('{"annotations": []}')
    assert_error(tmp_path, "valid", path, "no 'images'")


def test_duplicate_image_id(tmp_path, plates_real, real_images):
    images = [{"id": 5, "file_name": n, "width": w, "height": h} for n, w, h in real_images[:2]]
    path = write_split(tmp_path, plates_real, real_images[:2], [], images=images)
    assert_error(tmp_path, "valid", path, "duplicate image id 5", real_images[1][0])


def test_unknown_category_and_missing_image_id(tmp_path, plates_real, real_images):
    path = write_split(tmp_path, plates_real, real_images, [ann(0, 0, [1, 1, 20, 10]), ann(41, 1, [1, 1, 20, 10], 7)])
    assert_error(tmp_path, "valid", path, "annotation id 41", "unknown category id 7")
    path = write_split(tmp_path, plates_real, real_images, [ann(42, 99, [1, 1, 20, 10])])
    assert_error(tmp_path, "valid", path, "annotation id 42", "image id 99")
    path = write_split(tmp_path, plates_real, real_images, [ann(43, 0, [1, 1, 20])])
    assert_error(tmp_path, "valid", path, "annotation id 43", "bbox")


def test_missing_unreadable_and_mis_sized_images(tmp_path, plates_real, real_images):
    write_split(tmp_path, plates_real, real_images, [])
    name = real_images[1][0]
    image_path = tmp_path / "valid" / name
    image_path.unlink()
    assert_error(tmp_path, "valid", image_path, "image id 1", "not found")
    image_path.write_bytes(b"this is not a jpeg at all" * 10)
    assert_error(tmp_path, "valid", image_path, "image id 1", "unreadable")
    Image.new("RGB", (17, 9)).save(image_path, format="JPEG")
    assert_error(tmp_path, "valid", image_path, "image id 1", "17x9")


def test_check_dataset_root_names_missing_splits(tmp_path, plates_real, real_images):
    write_split(tmp_path, plates_real, real_images, [], split="train")
    write_split(tmp_path, plates_real, real_images, [], split="valid")
    with pytest.raises(DatasetError, match="missing split.*test"):
        check_dataset_root(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        check_dataset_root(tmp_path / "absent")
    write_split(tmp_path, plates_real, real_images, [], split="test")
    assert set(check_dataset_root(tmp_path)) == {"train", "valid", "test"}


# ----------------------------------------------------------------------------- dataset items and augmentation
def make_marked_image(root):
    """100x50 image, black except a red box [10, 5, 30, 25] (xyxy)."""
    split_dir = root / "train"
    split_dir.mkdir(parents=True)
    pixels = np.zeros((50, 100, 3), np.uint8)
    pixels[5:25, 10:30] = (255, 0, 0)
    Image.fromarray(pixels).save(split_dir / "marked.png")
    (split_dir / ANNOTATIONS_FILE).write_text(json.dumps({
        "images": [{"id": 0, "file_name": "marked.png", "width": 100, "height": 50}],
        "annotations": [ann(0, 0, [10, 5, 20, 20])], "categories": ROBOFLOW_CATEGORIES}))
    return load_split(root, "train")


def test_flip_moves_boxes_with_pixels(tmp_path):
    split = make_marked_image(tmp_path)
    flip = AugmentConfig(hflip_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    image, target = PlateDataset(split, train=True, augment=flip)[0]
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert torch.allclose(target["boxes"], torch.tensor([[70.0, 5.0, 90.0, 25.0]]))
    red = image[0] > 0.5
    ys, xs = torch.nonzero(red, as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1) == (70, 90, 5, 25)
    assert target["labels"].tolist() == [1] and target["image_id"] == 0

    plain, plain_target = PlateDataset(split, train=False, augment=flip)[0]  # eval never flips
    assert torch.allclose(plain_target["boxes"], torch.tensor([[10.0, 5.0, 30.0, 25.0]]))
    assert plain.dtype == torch.float32 and 0.0 <= plain.min() and plain.max() <= 1.0


def test_color_jitter_keeps_boxes_and_range(tmp_path):
    split = make_marked_image(tmp_path)
    jitter = AugmentConfig(hflip_p=0.0, brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1)
    torch.manual_seed(0)
    image, target = PlateDataset(split, train=True, augment=jitter)[0]
    assert torch.allclose(target["boxes"], torch.tensor([[10.0, 5.0, 30.0, 25.0]]))
    assert image.shape == (3, 50, 100) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0


def test_limit_collate_and_loader(plates_real):
    split = load_split(plates_real, "valid")
    dataset = PlateDataset(split, train=True, augment=AugmentConfig(), limit=3)
    assert len(dataset) == 3 and [r.id for r in dataset.records] == [r.id for r in split.images[:3]]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 2
    assert images[0].shape[0] == 3 and targets[0]["boxes"].dtype == torch.float32
    assert targets[0]["labels"].dtype == torch.int64


def test_to_coco_gt_works_with_pycocotools(plates_real):
    from pycocotools.coco import COCO

    split = load_split(plates_real, "test")
    gt = to_coco_gt(split)
    assert [a["id"] for a in gt["annotations"]] == list(range(1, 43))  # ids from 1 (0 means unmatched)
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert len(coco.getImgIds()) == 39 and len(coco.getAnnIds()) == 42
    record = split.images[0]
    first = coco.loadAnns(coco.getAnnIds(imgIds=[record.id]))[0]
    x, y, w, h = first["bbox"]
    assert np.allclose([x, y, x + w, y + h], record.boxes[0], atol=1e-4)
    assert to_coco_gt(split.images[:2])["images"] == gt["images"][:2]


# ----------------------------------------------------------------------------- damaged image files
def test_truncated_jpeg_and_png_are_refused_at_load(tmp_path, plates_real, real_images):
    write_split(tmp_path, plates_real, real_images, [])
    image_path = tmp_path / "valid" / real_images[2][0]
    data = image_path.read_bytes()
    image_path.write_bytes(data[: len(data) // 3])  # headers intact, data cut
    assert_error(tmp_path, "valid", image_path, "image id 2", "truncated JPEG")
    buf = __import__("io").BytesIO()
    Image.open(plates_real / "valid" / real_images[2][0]).save(buf, format="PNG")
    image_path.write_bytes(buf.getvalue()[:-200])
    assert_error(tmp_path, "valid", image_path, "image id 2", "truncated PNG")
    image_path.write_bytes(data + b"\0" * 100)  # padding after the end marker is fine
    assert len(load_split(tmp_path, "valid").images) == 3
    image_path.write_bytes(data + bytes(range(256)) * 64)  # 16 KB appended (a phone's motion-photo video)
    assert len(load_split(tmp_path, "valid").images) == 3


def test_duplicate_file_name(tmp_path, plates_real, real_images):
    (name, w, h), other = real_images[0], real_images[1]
    images = [{"id": 3, "file_name": name, "width": w, "height": h},
              {"id": 4, "file_name": other[0], "width": other[1], "height": other[2]},
              {"id": 9, "file_name": f"./{name}", "width": w, "height": h}]
    path = write_split(tmp_path, plates_real, real_images[:2], [], images=images)
    assert_error(tmp_path, "valid", path, "duplicate file_name", "image ids 3 and 9")


def test_decode_error_in_a_loader_worker_is_one_line_naming_the_image(tmp_path, plates_real, real_images):
    write_split(tmp_path, plates_real, real_images, [])
    dataset = PlateDataset(load_split(tmp_path, "valid"), train=False)
    bad = tmp_path / "valid" / real_images[1][0]
    corrupt_png_same_size(plates_real / "valid" / real_images[1][0], bad)
    assert len(load_split(tmp_path, "valid").images) == 3  # the cheap load-time checks pass
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_fn)
    with pytest.raises(DatasetError) as info:
        list(loader)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"{bad}: unreadable image (image id 1): OSError")
    assert message.endswith("(DataLoader worker process 0)")
    import pickle

    assert str(pickle.loads(pickle.dumps(info.value))) == message


def test_every_box_dropped_is_an_error(tmp_path, plates_real, real_images):
    """Normalised (0..1) boxes or boxes of another image size: nothing would be left to learn from."""
    normalised = [ann(i, i, [0.1, 0.2, 0.3, 0.1]) for i in range(3)]
    path = write_split(tmp_path, plates_real, real_images, normalised)
    assert_error(tmp_path, "valid", path, "all 3 boxes are degenerate or outside")
    outside = [ann(0, 0, [5000, 5000, 40, 20])]
    path = write_split(tmp_path, plates_real, real_images, outside)
    assert_error(tmp_path, "valid", path, "all 1 boxes")


def test_a_failing_transform_names_the_image(tmp_path, plates_real, real_images):
    write_split(tmp_path, plates_real, real_images, [])
    dataset = PlateDataset(load_split(tmp_path, "valid"), train=False)

    def out_of_memory(image, target):
        raise MemoryError("cannot allocate 3 GiB")

    dataset.transform = out_of_memory  # what a worker short of memory meets mid-transform
    with pytest.raises(DatasetError) as info:
        dataset[2]
    assert str(info.value) == (f"{tmp_path / 'valid' / real_images[2][0]}: cannot prepare the image (image id 2): "
                               f"MemoryError: cannot allocate 3 GiB")
