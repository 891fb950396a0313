"""Model builders, weights (coco via a temporary TORCH_HOME, none, checkpoint path), devices."""
import logging

import pytest
import torch
import torchvision.models.detection as tvd

from engine.config import config_from_dict
from engine.errors import EngineError
from engine.model import (OFFLINE_ENV, WeightsError, build_model, coco_weights_path, count_parameters,
                          load_model_from_checkpoint, resolve_device)

SMALL_INPUT = {"train_sizes": [64, 96], "test_size": 64, "max_size": 128}


def make_cfg(name="fasterrcnn_mobilenet_v3_large_320_fpn", weights="none", **sections):
    return config_from_dict({"model": {"name": name, "weights": str(weights)}, "input": SMALL_INPUT, **sections})


def run_eval(model, seed=0):
    torch.manual_seed(seed)
    image = torch.rand(3, 64, 64)
    model.eval()
    with torch.no_grad():
        return model([image])[0]


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                                  "fasterrcnn_resnet50_fpn_v2"])
def test_builders_with_random_weights_run(name):
    torch.manual_seed(0)
    model = build_model(make_cfg(name))
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.score_thresh == pytest.approx(0.05) and model.roi_heads.detections_per_img == 100
    if name == "fasterrcnn_resnet50_fpn_v2":
        assert 40e6 < count_parameters(model) < 46e6
        return
    out = run_eval(model)
    assert set(out) == {"boxes", "labels", "scores"}
    assert out["boxes"].shape[1] == 4 and torch.all(out["boxes"] <= 64)
    assert torch.all(out["labels"] == 1)


def test_train_and_eval_sizes_follow_config():
    model = build_model(make_cfg(input={"train_sizes": [200, 240], "test_size": 224, "max_size": 320}))
    model.train()
    assert tuple(model.transform.min_size) == (200, 240) and model.transform.max_size == 320
    model.eval()  # torchvision uses min_size[-1] in eval: it must be test_size
    assert tuple(model.transform.min_size) == (224,)
    images, _ = model.transform([torch.rand(3, 120, 160)])
    assert images.image_sizes[0][0] == 224 and abs(images.image_sizes[0][1] - 224 * 4 / 3) <= 1
    model.train()
    assert tuple(model.transform.min_size) == (200, 240)


def test_mobilenet_fpn_parameter_count_is_the_one_in_the_docs():
    count = count_parameters(build_model(make_cfg("fasterrcnn_mobilenet_v3_large_fpn")))
    assert count == 18_954_629  # docs/results-report.md quotes this number


def write_coco_file(tmp_path, monkeypatch, name="fasterrcnn_mobilenet_v3_large_320_fpn"):
    """A stand-in for torchvision's COCO file: a 91-class model saved under the weights' exact file name."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    builder = {"fasterrcnn_mobilenet_v3_large_320_fpn": tvd.fasterrcnn_mobilenet_v3_large_320_fpn}[name]
    torch.manual_seed(123)
    state = builder(weights=None, weights_backbone=None, num_classes=91).state_dict()
    url = tvd.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1.url
    path = tmp_path / "torch_home" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert coco_weights_path(name) == path
    return path, state


def test_coco_weights_load_from_torch_home(tmp_path, monkeypatch):
    path, saved = write_coco_file(tmp_path, monkeypatch)
    model = build_model(make_cfg(weights="coco"))
    own = model.state_dict()
    for key in ("backbone.body.0.0.weight", "backbone.fpn.inner_blocks.0.0.weight", "backbone.body.0.1.running_var", "rpn.head.conv.0.0.weight",
                "roi_heads.box_head.fc6.weight"):
        assert torch.equal(own[key], saved[key]), key
    assert model.roi_heads.box_predictor.cls_score.out_features == 2  # head replaced for plate + background
    assert isinstance(model.backbone.body["0"][1], torchvision_frozen_bn())
    assert run_eval(model)["boxes"].shape[1] == 4


def torchvision_frozen_bn():
    from torchvision.ops.misc import FrozenBatchNorm2d

    return FrozenBatchNorm2d


def test_missing_coco_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(WeightsError) as info:
        build_model(make_cfg(weights="coco"))
    message = str(info.value)
    assert str(coco_weights_path("fasterrcnn_mobilenet_v3_large_320_fpn")) in message
    assert str(tmp_path / "empty_home" / "hub" / "checkpoints") in message
    assert "weights: none" in message and "\n" not in message


def test_corrupt_coco_file_is_a_clear_error(tmp_path, monkeypatch):
    path, _ = write_coco_file(tmp_path, monkeypatch)
    path.write_bytes(b"truncated")
    with pytest.raises(WeightsError, match="cannot load COCO weights"):
        build_model(make_cfg(weights="coco"))


def test_fine_tune_from_checkpoint_path_round_trip(tmp_path):
    torch.manual_seed(1)
    source = build_model(make_cfg())
    cfg = make_cfg()
    ours = tmp_path / "best.pth"
    torch.save({"format": "plate-detector/1", "model": source.state_dict(), "config": cfg.to_dict(), "epoch": 3}, ours)
    raw = tmp_path / "raw.pth"
    torch.save(source.state_dict(), raw)
    for path in (ours, raw):
        torch.manual_seed(99)
        model = build_model(make_cfg(weights=path))
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(run_eval(model)["scores"], run_eval(source)["scores"])


def test_fine_tune_from_91_class_file_skips_the_head(tmp_path, monkeypatch, caplog):
    path, saved = write_coco_file(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="engine.model"):
        model = build_model(make_cfg(weights=path))
    assert "roi_heads.box_predictor.cls_score.weight" in caplog.text
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert torch.equal(model.state_dict()["rpn.head.conv.0.0.weight"], saved["rpn.head.conv.0.0.weight"])


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_model(make_cfg(weights=tmp_path / "absent.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="garbage.pth"):
        build_model(make_cfg(weights=garbage))
    state = build_model(make_cfg()).state_dict()
    state["backbone.body.0.0.weight"] = torch.zeros(3, 3, 3, 3)
    wrong = tmp_path / "wrong.pth"
    torch.save({"model": state}, wrong)
    with pytest.raises(WeightsError, match=r"wrong.pth: does not fit .*backbone.body.0.0.weight"):
        build_model(make_cfg(weights=wrong))
    other = tmp_path / "other.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, other)
    with pytest.raises(WeightsError, match="unexpected key 'x'"):
        build_model(make_cfg(weights=other))


def test_load_model_from_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(2)
    cfg = make_cfg(train={"epochs": 7})
    source = build_model(cfg)
    path = tmp_path / "best.pth"
    torch.save({"format": "plate-detector/1", "model": source.state_dict(), "config": cfg.to_dict()}, path)
    model, loaded_cfg = load_model_from_checkpoint(path)
    assert not model.training and loaded_cfg.train.epochs == 7 and loaded_cfg.to_dict() == cfg.to_dict()
    assert torch.equal(run_eval(model)["boxes"], run_eval(source)["boxes"])

    write_coco_file(tmp_path, monkeypatch)  # a checkpoint trained from COCO weights (frozen BatchNorm)
    coco_cfg = make_cfg(weights="coco")
    coco_model = build_model(coco_cfg)
    coco_path = tmp_path / "coco_best.pth"
    torch.save({"model": coco_model.state_dict(), "config": coco_cfg.to_dict()}, coco_path)
    reloaded, _ = load_model_from_checkpoint(coco_path)
    assert torch.equal(run_eval(reloaded)["scores"], run_eval(coco_model)["scores"])

    with pytest.raises(WeightsError, match="not found"):
        load_model_from_checkpoint(tmp_path / "absent.pth")
    no_config = tmp_path / "no_config.pth"
    torch.save(source.state_dict(), no_config)
    with pytest.raises(WeightsError, match="needs 'model' and 'config'"):
        load_model_from_checkpoint(no_config)
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": source.state_dict(), "config": cfg.to_dict(), "evil": object()}, pickled)
    with pytest.raises(WeightsError, match="weights_only"):
        load_model_from_checkpoint(pickled)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EngineError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(EngineError):
            resolve_device("cuda:1")


def test_anchor_config_sets_wide_small_anchors_and_survives_a_checkpoint(tmp_path):
    from torchvision.ops import box_iou
    from engine.config import ConfigError

    cfg = make_cfg(model={"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none",
                          "anchor_sizes": [16, 32, 64, 128, 256], "anchor_aspect_ratios": [0.25, 0.5, 1.0]})
    model = build_model(cfg)
    default = build_model(make_cfg())
    assert model.rpn.anchor_generator.aspect_ratios[0] == (0.25, 0.5, 1.0)
    assert model.rpn.anchor_generator.sizes[0] == (16, 32, 64, 128, 256)
    # the RPN head keeps its shape, so a default model's state loads into it and back
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.state_dict().items()}

    def best_iou(m, box):  # best anchor IoU of a plate-shaped box on a 64x64 image
        m.eval()
        images, _ = m.transform([torch.rand(3, 64, 64)])
        features = list(m.backbone(images.tensors).values())
        anchors = m.rpn.anchor_generator(images, features)[0]
        return box_iou(torch.tensor([box], dtype=torch.float), anchors).max().item()

    plate = [20.0, 28.0, 44.0, 34.0]  # 24 x 6 px: the 10% smallest plates of plates-real at 240 px
    assert best_iou(model, plate) > best_iou(default, plate) + 0.2

    path = tmp_path / "best.pth"
    torch.save({"format": "plate-detector/1", "model": model.state_dict(), "config": cfg.to_dict(), "epoch": 1}, path)
    loaded, _ = load_model_from_checkpoint(path)
    assert loaded.rpn.anchor_generator.aspect_ratios[0] == (0.25, 0.5, 1.0)
    with pytest.raises(ConfigError, match="needs 5 sizes"):
        build_model(make_cfg(model={"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none",
                                    "anchor_sizes": [16, 32]}))
    with pytest.raises(ConfigError, match="between 0.05 and 20"):
        make_cfg(model={"name": "fasterrcnn_mobilenet_v3_large_320_fpn", "weights": "none",
                        "anchor_aspect_ratios": [0.25, 0, 1]})


def test_test_canvas_pads_eval_images_only():
    cfg = make_cfg(input={"train_sizes": [64], "test_size": 64, "max_size": 128, "test_canvas": [96, 128]})
    model = build_model(cfg)
    model.eval()
    images, _ = model.transform([torch.rand(3, 60, 80)])
    assert tuple(images.tensors.shape[-2:]) == (96, 128) and images.image_sizes[0] == (64, 85)
    images, _ = model.transform([torch.rand(3, 200, 100)])  # taller than the canvas: padded to 32 only
    assert tuple(images.tensors.shape[-2:]) == (128, 128)
    model.train()
    images, _ = model.transform([torch.rand(3, 60, 80)], [{"boxes": torch.tensor([[1.0, 1, 20, 10]]),
                                                          "labels": torch.tensor([1])}])
    assert tuple(images.tensors.shape[-2:]) == (64, 96)  # training batches keep torchvision's padding
    plain = build_model(make_cfg(input={"train_sizes": [64], "test_size": 64, "max_size": 128}))
    plain.eval()
    images, _ = plain.transform([torch.rand(3, 60, 80)])
    assert tuple(images.tensors.shape[-2:]) == (64, 96)
