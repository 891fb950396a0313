"""engine/formatting.py and engine/targets.py: the text and targets shared by the report and the dashboard."""
from pathlib import Path

from engine import formatting as fmt
from engine.targets import TARGETS, load_baselines, met

ROOT = Path(__file__).resolve().parents[1]


def test_numbers_params_rates_and_times():
    assert (fmt.number(None), fmt.number(True), fmt.number(1234567), fmt.number(0.123456)) == \
        ("—", "yes", "1,234,567", "0.1235")
    assert fmt.number(float("nan")) == "nan" and fmt.number(2.0, 1) == "2.0" and fmt.number("x") == "x"
    assert (fmt.params(18_954_629), fmt.params(None), fmt.params(0)) == ("19.0M", "—", "—")
    assert fmt.learning_rate(0.005) == "5.00e-03" and fmt.learning_rate(None) == "—"
    assert fmt.utc_time(0) == "—" and fmt.utc_time(86400 * 365) == "1971-01-01 00:00 UTC"


def test_targets_are_strict_and_baselines_are_read_from_the_file(tmp_path):
    assert met(TARGETS["map50"], TARGETS["map50"]) is False and met(0.86, 0.85) is True and met(None, 0.85) is None
    assert [b["name"] for b in load_baselines()] == ["YOLOv5s", "FasterRCNN-ResNet50"]
    (tmp_path / "b.yaml").write_text("baselines: [{name: A}, 3]\n")
    assert load_baselines(tmp_path / "b.yaml") == [{"name": "A"}]
    (tmp_path / "bad.yaml").write_text("baselines: [\n")
    assert load_baselines(tmp_path / "bad.yaml") == [] and load_baselines(tmp_path / "missing.yaml") == []
