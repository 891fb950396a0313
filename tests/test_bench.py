"""The inference benchmark on a 1-epoch checkpoint: the printed table and runs/<run>/bench.json."""
import json

import pytest

from engine.bench import BENCH_FILE, BenchError, format_table, parse_ints, run_bench
from engine.cli import main
from tests.test_export import train_demo_checkpoint


@pytest.fixture(scope="module")
def checkpoint(plates_real, tmp_path_factory):
    return train_demo_checkpoint(plates_real, tmp_path_factory.mktemp("bench"))


def test_bench_cli_prints_table_and_writes_run_json(checkpoint, capsys):
    assert main(["bench", "--checkpoint", str(checkpoint), "--sizes", "96,160", "--repeats", "2",
                 "--batch-sizes", "1,2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    path = checkpoint.parents[2] / "runs" / "demo1" / BENCH_FILE  # the checkpoint's run folder
    assert printed.strip().endswith(str(path))
    result = json.loads(path.read_text())
    assert result["run"] == "demo1" and result["repeats"] == 2 and result["machine"]["cpu_cores"] >= 1
    rows = result["rows"]
    assert [(r["size"], r["backend"], r["device"]) for r in rows] == [
        (96, "pytorch fp32", "cpu"), (96, "onnxruntime", "cpu"), (160, "pytorch fp32", "cpu"),
        (160, "onnxruntime", "cpu")]
    for row in rows:
        assert 0 < row["latency_ms_median"] <= row["latency_ms_p90"]
        assert row["images_per_s"] == max(row["images_per_s_by_batch"].values()) > 0
        assert str(row["best_batch"]) in row["images_per_s_by_batch"]
    assert set(rows[0]["images_per_s_by_batch"]) == {"1", "2"} and set(rows[1]["images_per_s_by_batch"]) == {"1"}
    assert rows[0]["speedup_vs_pytorch_cpu"] == 1.0 and rows[1]["speedup_vs_pytorch_cpu"] > 0
    table = format_table(result).splitlines()
    assert len(table) == 2 + len(rows) and table[2].startswith("| 96 | pytorch fp32 | cpu |")
    assert all(line in printed for line in table)


def test_bench_uses_a_given_export_and_writes_where_asked(checkpoint, tmp_path):
    assert main(["export", "--checkpoint", str(checkpoint), "--size", "96", "--out", str(tmp_path)]) == 0
    onnx = tmp_path / "best-96.onnx"
    before = onnx.stat().st_mtime_ns
    result = run_bench(checkpoint, onnx=onnx, sizes="96", repeats=1, batch_sizes="1", out=tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == result["rows"]
    assert onnx.stat().st_mtime_ns == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "b.json", "best-96.json", "best-96.onnx"]


def test_bench_bad_arguments(checkpoint, capsys):
    assert parse_ints("320, 800", "--sizes") == [320, 800]
    for bad in ("", "abc", "320,-1", "0"):
        with pytest.raises(BenchError, match="--sizes"):
            parse_ints(bad, "--sizes")
    assert main(["bench", "--checkpoint", str(checkpoint), "--sizes", "320x800"]) == 2
    assert capsys.readouterr().err.startswith("error: --sizes '320x800': expected comma-separated integers")
    assert main(["bench", "--checkpoint", str(checkpoint), "--repeats", "0"]) == 2
    assert "--repeats 0: must be at least 1" in capsys.readouterr().err


def test_bench_keeps_pytorch_rows_when_the_export_cannot_be_verified(checkpoint, tmp_path, monkeypatch):
    from engine import export as export_mod

    monkeypatch.setattr(export_mod, "BOX_TOLERANCE_PX", -1.0)  # no box can match: the export fails verification
    result = run_bench(checkpoint, sizes="96", repeats=1, batch_sizes="1", out=tmp_path / "b.json")
    torch_row, onnx_row = result["rows"]
    assert torch_row["backend"] == "pytorch fp32" and torch_row["latency_ms_median"] > 0
    assert onnx_row["backend"] == "onnxruntime" and onnx_row["note"].startswith("export not verified")
    assert format_table(result).splitlines()[-1].startswith("| 96 | onnxruntime | cpu | — | — | — | export not verified")
