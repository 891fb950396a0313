"""The results report: filled from a real run, every number traceable to the run's files."""
import json
import re
import zipfile

import pytest

from engine import runs
from engine.report import PROMPT, loss_convergence, report_zip, write_report


def table_rows(md: str) -> dict:
    """'| **Label** | value | ... |' rows -> {label: [cells...]} (first table wins per label)."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0].strip("*"), cells[1:])
    return rows


@pytest.fixture(scope="module")
def report(tiny_real_run):
    runs_dir, ckpt_dir, name = tiny_real_run
    md_path = write_report(name, runs_dir=str(runs_dir), checkpoints_dir=str(ckpt_dir))
    return md_path, md_path.read_text(encoding="utf-8"), runs_dir / name, ckpt_dir / name


def test_report_has_no_placeholder_and_every_template_section(report):
    _, md, _, _ = report
    assert "[TO BE FILLED]" not in md
    for heading in ("Training Environment", "Dataset Information", "Hyperparameters", "Final Metrics",
                    "Training Curve", "Loss Convergence", "Test Set Evaluation", "Sample Predictions",
                    "Model Checkpoints", "TensorBoard Logs", "Observations", "Training Log Excerpt",
                    "Comparison with Baselines", "Contact"):
        assert heading in md, heading
    assert "Test Author" in md  # from run.author in the config
    assert PROMPT in md  # what a run cannot know is a marked prompt


def test_numbers_match_the_run_files(report):
    _, md, run_dir, ckpt_dir = report
    rows = table_rows(md)
    steps, epochs = runs.read_metrics(run_dir)
    best = max(epochs, key=lambda e: (e["val_map50"], -e["epoch"]))
    test = json.loads((run_dir / "test" / "metrics.json").read_text())
    dataset = json.loads((run_dir / "dataset.json").read_text())
    status = runs.read_status(run_dir)

    assert rows["Best mAP@0.5"][0] == f"{best['val_map50']:.4f}"
    assert rows["Precision"][0] == f"{best['val_precision']:.4f}"
    assert rows["Recall"][0] == f"{best['val_recall']:.4f}"
    assert rows["F1-Score"][0] == f"{best['val_f1']:.4f}"
    assert rows["Best Epoch"][0] == str(best["epoch"])
    assert rows["Total Epochs"][0] == str(len(epochs))
    for e in epochs:  # the training-curve table
        assert rows[str(e["epoch"])] == [f"{e['train_loss']:.4f}", f"{e['val_map50']:.4f}", f"{e['lr']:.2e}"]
    assert rows["Test mAP@0.5"][0] == f"{test['map50']:.4f}"
    assert rows["Test Recall"][0] == f"{test['recall']:.4f}"
    assert rows["Test Precision"][0].startswith(f"{test['precision']:.4f}")
    assert rows["Inference Time"][0].startswith(f"{test['ms_per_image']:.1f} ms/image")
    assert rows["Train Set"][0].startswith(f"{dataset['train']['images']} images, {dataset['train']['boxes']} boxes")
    assert rows["Total Images"][0] == str(sum(d["images"] for d in dataset.values()))
    assert rows["PyTorch Version"][0] == status["torch_version"]
    assert f"Parameters: {test['params']:,}" in md
    for name in ("best.pth", "last.pth"):
        size = (ckpt_dir / name).stat().st_size / 1e6
        assert rows[f"`{ckpt_dir.as_posix()}/{name}`"][0] == f"{size:.1f} MB"
    ours = next(v for k, v in rows.items() if k.startswith("Ours"))
    assert ours[0] == f"{test['map50']:.4f}"
    assert ours[1] == f"{test['params'] / 1e6:.1f}M"
    assert ours[2].startswith(f"{test['speed']['fps_batch1']:.1f}")
    conv = loss_convergence(epochs, steps)
    assert f"**Final Loss:** {epochs[-1]['train_loss']:.4f}" in md
    assert f"**Initial Loss:** {steps[0]['loss']:.4f}" in md
    assert conv["judgement"] in md


def test_report_images_exist_and_zip_holds_them(report):
    md_path, md, _, _ = report
    linked = re.findall(r"\]\((img/[^)]+)\)", md)
    assert "img/training_curve.png" in linked and "img/test_curves.png" in linked
    for rel in linked:
        assert (md_path.parent / rel).is_file(), rel
    with zipfile.ZipFile(__import__("io").BytesIO(report_zip(md_path))) as zf:
        names = set(zf.namelist())
    assert "RESULTS.md" in names and set(linked) <= names


def test_log_excerpt_has_banner_best_and_summary(report):
    _, md, _, _ = report
    excerpt = md.split("## 📝 Training Log Excerpt", 1)[1].split("```", 2)[1]
    assert "New best mAP@0.5" in excerpt
    assert "Training complete" in excerpt


def test_convergence_judgement_from_data():
    ep = lambda i, loss: {"epoch": i, "train_loss": loss}
    assert loss_convergence([ep(1, 2.0), ep(2, 1.5), ep(3, 1.0)], [])["judgement"].startswith("smooth")
    assert "epoch 3" in loss_convergence([ep(1, 2.0), ep(2, 1.5), ep(3, 1.9)], [])["judgement"]
    assert loss_convergence([ep(1, 2.0), ep(2, float("nan"))], [])["judgement"].startswith("unstable")


def test_unknown_run_is_one_clear_error(tmp_path):
    from engine.errors import EngineError

    with pytest.raises(EngineError, match="run 'nope' not found"):
        write_report("nope", runs_dir=str(tmp_path))


def test_without_bench_json_the_speed_rows_are_the_test_ones(report):
    _, md, run_dir, _ = report
    assert not (run_dir / runs.BENCH_FILE).exists()
    assert "Inference Benchmark" not in md and "measured: bench" not in md
    rows = table_rows(md)
    assert rows["YOLOv5s"][2:] == ["~60", "quoted reference (results template), not measured here"]
    assert next(v for k, v in rows.items() if k.startswith("Ours"))[3].startswith("measured: test set, ")


def test_bench_json_fills_the_speed_rows_and_the_baselines_fps(tiny_real_run, tmp_path):
    """The real benchmark (2 timed calls) on the run's best.pth, written into a copy of the run folder."""
    import shutil

    from engine.bench import format_table, run_bench

    runs_dir, ckpt_dir, name = tiny_real_run
    shutil.copytree(runs_dir / name, tmp_path / "runs" / name)
    bench = run_bench(ckpt_dir / name / runs.BEST_CKPT, sizes="160", repeats=2, batch_sizes="1,2",
                      out=tmp_path / "runs" / name / runs.BENCH_FILE)
    md = write_report(name, runs_dir=str(tmp_path / "runs"), checkpoints_dir=str(ckpt_dir),
                      out=str(tmp_path / "report")).read_text(encoding="utf-8")
    rows = table_rows(md)
    cpu = bench["machine"]["cpu"]
    torch_row, ort_row = bench["rows"]
    assert torch_row["backend"] == "pytorch fp32" and ort_row["backend"] == "onnxruntime"
    for row in bench["rows"]:  # a speed row per backend, numbers from bench.json
        cells = rows[f"Inference 160 px, {row['backend']} (cpu)"]
        assert cells[0].startswith(f"{row['latency_ms_median']:.1f} ms/image median, p90 {row['latency_ms_p90']:.1f}")
        assert f"{1000 / row['latency_ms_median']:.1f} FPS" in cells[0] and cpu in cells[0]
        ours = rows[f"Ours, {row['backend']} 160 px"]  # next to the quoted baselines
        assert ours[2] == f"{1000 / row['latency_ms_median']:.1f}"
        assert ours[3] == f"measured: bench, cpu ({cpu}, {bench['machine']['cpu_cores']} cores)"
    assert "Inference Time" in rows  # the test-set rows stay
    assert format_table(bench) in md and f"--sizes 160 --repeats 2" in md
    assert rows["FasterRCNN-ResNet50"][2:] == ["~15", "quoted reference (results template), not measured here"]
