"""Bad-input corpus: every bad dataset, config, `--set` value, checkpoint, run name and upload gives
a non-zero exit and one `error:` line (no traceback anywhere), and writes nothing outside the run's
own folders.

Each case gets a sandbox `<case>/cwd`: the working directory of the command, with the case's
inputs in `in/` (built by `setup`); runs/ and checkpoints/ are relative to it. The file tree of the sandbox is compared
before and after: new paths may only lie in runs/<run>/ and checkpoints/<run>/ of the case's own
run; inputs must be unchanged. Cases that do not need torch run as one `python -m engine` process
each; the others share a few processes (one torch import) that call engine.cli.main once per case
with file descriptors 1 and 2 sent to per-case files (see run_batch at the bottom).

Evil pickles: their __reduce__ would create a marker file; the marker must stay absent.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import PLATES_REAL, TINY_RUN_SETTINGS, make_real_subset  # noqa: E402

DEMO = ROOT / "configs" / "demo_cpu.yaml"
ANN = "_annotations.coco.json"
RUN = "case"  # the run name every training case asks for
MARKER = "PWNED"  # created by an evil pickle's __reduce__ if it ever ran


# ----------------------------------------------------------------------------- building bad files
class Evil:
    """Unpickling this calls open(<marker>, "w"): the file appears iff the pickle code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def png_header_only(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data: the size is read, nothing decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real, complete 1-bit PNG of side x side black pixels: a few kB that decode to side² pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def real_jpeg() -> bytes:
    return next(iter(sorted((PLATES_REAL / "valid").glob("*.jpg")))).read_bytes()


def truncated_jpeg() -> bytes:
    data = real_jpeg()
    return data[: len(data) // 3]


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


# ----------------------------------------------------------------------------- dataset mutations
def dataset(mutate: Optional[Callable[[Path], None]] = None) -> Callable[[Path], None]:
    """setup: a copy of the tiny real export in in/data, then `mutate(in/data)`."""
    def setup(inp: Path) -> None:
        shutil.copytree(DATA_TEMPLATE, inp / "data")
        if mutate:
            mutate(inp / "data")
    return setup


def coco(split: str, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        path = root / split / ANN
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return mutate


def first_image(root: Path, split: str = "train") -> Path:
    return root / split / json.loads((root / split / ANN).read_text())["images"][0]["file_name"]


def replace_image(data_fn: Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda root: first_image(root).write_bytes(data_fn())


def _set(data: dict, key: str, value, index: int = 0, section: str = "annotations") -> None:
    data[section][index][key] = value


def _dup_file_name(d: dict) -> None:
    d["images"][1]["file_name"] = d["images"][0]["file_name"]


def _dup_image_id(d: dict) -> None:
    d["images"][1]["id"] = d["images"][0]["id"]


def _all_boxes_normalised(d: dict) -> None:
    for a in d["annotations"]:
        a["bbox"] = [0.1, 0.2, 0.3, 0.1]


def _all_boxes_outside(d: dict) -> None:
    for a in d["annotations"]:
        a["bbox"] = [50_000, 50_000, 40, 20]


def _no_images(d: dict) -> None:
    d["images"], d["annotations"] = [], []


def _bomb_image(root: Path) -> None:
    image = first_image(root)
    image.write_bytes(png_bomb(14_200))  # 201 megapixels: over twice Pillow's limit
    coco("train", lambda d: d["images"][0].update(width=14_200, height=14_200))(root)


def _cut_first_image(root: Path) -> None:
    """Headers intact (size still matches the annotations), the last two thirds of the data gone."""
    image = first_image(root)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 3])


def _remove(rel: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return mutate


# ----------------------------------------------------------------------------- other inputs
def file(name: str, data) -> Callable[[Path], None]:
    return lambda inp: _write(inp / name, data() if callable(data) else data)


def evil_torch_file(name: str) -> Callable[[Path], None]:
    def setup(inp: Path) -> None:
        import torch

        torch.save({"format": "plate-detector/1", "model": Evil(inp.parent / MARKER), "config": {}}, inp / name)
    return setup


def evil_pickle_file(name: str) -> Callable[[Path], None]:
    def setup(inp: Path) -> None:
        with open(inp / name, "wb") as fh:
            pickle.dump({"model": Evil(inp.parent / MARKER)}, fh)
    return setup


def torch_file(name: str, obj_fn: Callable[[], object], cut: float = 1.0) -> Callable[[Path], None]:
    def setup(inp: Path) -> None:
        import torch

        buf = io.BytesIO()
        torch.save(obj_fn(), buf)
        data = buf.getvalue()
        _write(inp / name, data[: int(len(data) * cut)])
    return setup


def _small_state():
    import torch

    return {"format": "plate-detector/1", "model": {"w": torch.zeros(4096)}, "config": {}, "epoch": 1}


def good_checkpoint(name: str = "model.pth") -> Callable[[Path], None]:
    return lambda inp: (inp / name).symlink_to(GOOD_CHECKPOINT)


def with_all(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(inp: Path) -> None:
        for s in setups:
            s(inp)
    return setup


def resumable_run(ckpt_data: Callable[[], bytes]) -> Callable[[Path], None]:
    """cwd/runs/case with a config and a failed status, cwd/checkpoints/case/last.pth = ckpt_data()."""
    def setup(inp: Path) -> None:
        cwd = inp.parent
        text = DEMO.read_text().replace("root: data/synthetic", f"root: {inp / 'data'}")
        _write(cwd / "runs" / RUN / "config.yaml", text)
        _write(cwd / "runs" / RUN / "status.json", json.dumps({"run": RUN, "state": "failed", "error": "killed"}))
        _write(cwd / "checkpoints" / RUN / "last.pth", ckpt_data())
    return setup


# ----------------------------------------------------------------------------- the corpus
TRAIN = ["train", "--config", str(DEMO), "--runs-dir", "runs", "--run", RUN,
         "--set", "data.generate_if_missing=false", "--set", "run.checkpoints_dir=checkpoints",
         *(x for s in TINY_RUN_SETTINGS for x in ("--set", s))]


def train_on(data: str = "in/data", *extra: str) -> list[str]:
    return TRAIN + ["--data", data, *extra]


def train_config(*extra: str) -> list[str]:
    return ["train", "--config", "in/config.yaml", "--runs-dir", "runs", "--run", RUN, *extra]


def train_set(*overrides: str) -> list[str]:
    return ["train", "--config", str(DEMO), "--runs-dir", "runs", "--run", RUN,
            *(x for o in overrides for x in ("--set", o))]


@dataclass(frozen=True)
class Case:
    id: str
    argv: list  # after `python -m engine`; paths relative to the case's cwd (its inputs are in in/)
    expect: str  # a fragment of the one error line
    setup: Optional[Callable[[Path], None]] = None  # builds the inputs in <case>/cwd/in
    torch: bool = False  # imports torch: runs in a shared batch process


CASES = [
    # --- datasets (train --data in/data)
    Case("ds-root-missing", train_on("in/nowhere"), "in/nowhere: dataset root not found", torch=True),
    Case("ds-root-is-a-file", train_on("in/data.zip"), "in/data.zip: dataset root not found",
         file("data.zip", b"PK\x03\x04 a zip, not a folder"), True),
    Case("ds-evaluate-unknown-split", ["evaluate", "--checkpoint", "in/model.pth", "--device", "cpu", "--data",
                                       "in/data", "--split", "nope"], "split folder 'nope' not found",
         with_all(good_checkpoint(), dataset()), True),
    Case("ds-split-missing", train_on(), "split folder 'valid' not found", dataset(_remove("valid")), True),
    Case("ds-annotations-missing", train_on(), f"train/{ANN}: annotation file not found",
         dataset(_remove(f"train/{ANN}")), True),
    Case("ds-json-invalid", train_on(), "malformed JSON (line 1",
         dataset(lambda r: (r / "train" / ANN).write_text('{"images": [')), True),
    Case("ds-json-not-object", train_on(), "top level must be an object",
         dataset(lambda r: (r / "train" / ANN).write_text("[1, 2]")), True),
    Case("ds-json-not-utf8", train_on(), "cannot read annotation file",
         dataset(lambda r: (r / "train" / ANN).write_bytes(b"\xff\xfe\x00garbage")), True),
    Case("ds-images-not-list", train_on(), "'images' must be a list",
         dataset(coco("train", lambda d: d.update(images={"a": 1}))), True),
    Case("ds-unknown-category", train_on(), "unknown category id 99",
         dataset(coco("train", lambda d: _set(d, "category_id", 99))), True),
    Case("ds-annotation-for-missing-image", train_on(), "image id 123456 is not in 'images'",
         dataset(coco("train", lambda d: _set(d, "image_id", 123456))), True),
    Case("ds-bbox-three-numbers", train_on(), "'bbox' must be 4 finite numbers",
         dataset(coco("train", lambda d: _set(d, "bbox", [1, 2, 3]))), True),
    Case("ds-bbox-nan", train_on(), "'bbox' must be 4 finite numbers",
         dataset(coco("train", lambda d: _set(d, "bbox", [1, float("nan"), 3, 4]))), True),
    Case("ds-boxes-all-outside", train_on(), "boxes are degenerate or outside their images",
         dataset(coco("train", _all_boxes_outside)), True),
    Case("ds-boxes-all-degenerate", train_on(), "boxes are degenerate or outside their images",
         dataset(coco("train", _all_boxes_normalised)), True),
    Case("ds-width-not-positive", train_on(), "'width' must be a positive integer",
         dataset(coco("train", lambda d: _set(d, "width", 0, section="images"))), True),
    Case("ds-size-mismatch", train_on(), "but _annotations.coco.json says",
         dataset(coco("train", lambda d: _set(d, "width", 999, section="images"))), True),
    Case("ds-file-name-traversal", train_on(), "'file_name' must be a relative file name",
         dataset(coco("train", lambda d: _set(d, "file_name", "../../etc/passwd", section="images"))), True),
    Case("ds-duplicate-image-id", train_on(), "duplicate image id", dataset(coco("train", _dup_image_id)), True),
    Case("ds-duplicate-file-name", train_on(), "duplicate file_name", dataset(coco("train", _dup_file_name)), True),
    Case("ds-image-missing", train_on(), "image file not found",
         dataset(lambda r: first_image(r).unlink()), True),
    Case("ds-image-zero-bytes", train_on(), "unreadable image", dataset(replace_image(lambda: b"")), True),
    Case("ds-image-truncated", train_on(), "truncated JPEG file", dataset(_cut_first_image), True),
    Case("ds-image-not-an-image", train_on(), "unreadable image",
         dataset(replace_image(lambda: b"<html>not a photo</html>" * 50)), True),
    Case("ds-image-bomb", train_on(), "decompression bomb", dataset(_bomb_image), True),
    Case("ds-empty-train-split", train_on(), "need at least one image", dataset(coco("train", _no_images)), True),
    # --- config files
    Case("cfg-missing", ["train", "--config", "in/nope.yaml"], "config file not found"),
    Case("cfg-bad-yaml", train_config(), "not valid YAML", file("config.yaml", "train: [1, 2\n  epochs: 3")),
    Case("cfg-not-a-mapping", train_config(), "top level must be a mapping", file("config.yaml", "- 1\n- 2\n")),
    Case("cfg-binary", train_config(), "in/config.yaml", file("config.yaml", b"\x00\xff\xfe\x80" * 64)),
    Case("cfg-unknown-key", train_config(), "unknown key 'train.epochz'", file("config.yaml", "train:\n  epochz: 3\n")),
    Case("cfg-unknown-section", train_config(), "unknown key 'trainer'", file("config.yaml", "trainer: {}\n")),
    Case("cfg-wrong-type", train_config(), "train.epochs must be an integer",
         file("config.yaml", "train:\n  epochs: many\n")),
    Case("cfg-negative-lr", train_config(), "optim.lr must be", file("config.yaml", "optim:\n  lr: -0.01\n")),
    Case("cfg-batch-zero", train_config(), "train.batch_size must be", file("config.yaml", "train:\n  batch_size: 0\n")),
    Case("cfg-epochs-zero", train_config(), "train.epochs must be", file("config.yaml", "train:\n  epochs: 0\n")),
    Case("cfg-section-not-mapping", train_config(), "train must be a mapping", file("config.yaml", "train: 5\n")),
    Case("cfg-evaluate-missing", ["evaluate", "--checkpoint", "in/model.pth", "--config", "in/nope.yaml",
                                  "--device", "cpu"], "not found", good_checkpoint(), True),
    # --- --set values
    Case("set-no-equals", train_set("train.epochs"), "expected section.key=value"),
    Case("set-no-section", train_set("epochs=3"), "epochs"),
    Case("set-unknown-key", train_set("train.nope=1"), "unknown key 'train.nope'"),
    Case("set-wrong-type", train_set("train.epochs=abc"), "train.epochs must be an integer"),
    Case("set-nan-lr", train_set("optim.lr=nan"), "optim.lr"),
    Case("set-negative-workers", train_set("data.num_workers=-1"), "--set data.num_workers: data.num_workers must be >= 0"),
    Case("set-bad-yaml-value", train_set("input.train_sizes=[1,"), "input.train_sizes"),
    Case("set-section-as-value", train_set("train=3"), "train"),
    Case("set-bad-device", TRAIN + ["--data", "in/data", "--device", "tpu"], "--set train.device: train.device must be", dataset(), True),
    # --- run names
    Case("run-dotdot", TRAIN[:5] + ["--run", ".."], "run name '..'"),
    Case("run-traversal", TRAIN[:5] + ["--run", "../escaped"], "run name '../escaped'"),
    Case("run-absolute", TRAIN[:5] + ["--run", "/tmp/escaped"], "run name '/tmp/escaped'"),
    Case("run-newline", TRAIN[:5] + ["--run", "x\n"], "run name"),
    Case("run-empty", TRAIN[:5] + ["--run", ""], "run name ''"),
    Case("resume-dotdot", ["train", "--resume", "..", "--runs-dir", "runs"], "run name '..'"),
    Case("resume-traversal", ["train", "--resume", "../../x", "--runs-dir", "runs"], "run name '../../x'"),
    Case("report-dotdot", ["report", "--run", "..", "--runs-dir", "runs"], "run name '..'"),
    Case("report-traversal", ["report", "--run", "../..", "--runs-dir", "runs"], "run name '../..'"),
    Case("report-absolute", ["report", "--run", "/tmp", "--runs-dir", "runs"], "run name '/tmp'"),
    Case("set-run-name-traversal", train_set("run.name=../x"), "--set run.name: run.name must be"),
    # --- checkpoints
    Case("ckpt-missing", ["evaluate", "--checkpoint", "in/none.pth", "--device", "cpu"], "not found", torch=True),
    Case("ckpt-text", ["evaluate", "--checkpoint", "in/model.pth", "--device", "cpu"], "in/model.pth",
         file("model.pth", "hello, not a checkpoint\n"), True),
    Case("ckpt-truncated", ["evaluate", "--checkpoint", "in/model.pth", "--device", "cpu"], "in/model.pth",
         torch_file("model.pth", _small_state, cut=0.5), True),
    Case("ckpt-no-model", ["evaluate", "--checkpoint", "in/model.pth", "--device", "cpu"], "in/model.pth",
         torch_file("model.pth", lambda: {"weights": [1, 2, 3]}), True),
    Case("ckpt-evil-torch-evaluate", ["evaluate", "--checkpoint", "in/evil.pth", "--device", "cpu"], "in/evil.pth",
         evil_torch_file("evil.pth"), True),
    Case("ckpt-evil-pickle-predict", ["predict", "--checkpoint", "in/evil.pkl", "--device", "cpu", "in/x.jpg"],
         "in/evil.pkl", with_all(evil_pickle_file("evil.pkl"), file("x.jpg", real_jpeg)), True),
    Case("ckpt-evil-as-weights", train_on("in/data", "--set", "model.weights=in/evil.pth"), "in/evil.pth",
         with_all(dataset(), evil_torch_file("evil.pth")), True),
    Case("ckpt-evil-resume", ["train", "--resume", RUN, "--runs-dir", "runs"], "last.pth: refused",
         lambda inp: (evil_torch_file("evil.pth")(inp),
                      resumable_run(lambda: (inp / "evil.pth").read_bytes())(inp)), True),
    Case("ckpt-truncated-resume", ["train", "--resume", RUN, "--runs-dir", "runs"], "last.pth: not a readable",
         resumable_run(lambda: b"PK\x03\x04" + b"\x00" * 100), True),
    # --- uploads to engine predict (the dashboard's helper is tested below)
    Case("upload-zero-bytes", ["predict", "--checkpoint", "in/model.pth", "--device", "cpu", "in/u.jpg"],
         "in/u.jpg: empty file", with_all(good_checkpoint(), file("u.jpg", b"")), True),
    Case("upload-truncated", ["predict", "--checkpoint", "in/model.pth", "--device", "cpu", "in/u.jpg"],
         "corrupt or truncated image", with_all(good_checkpoint(), file("u.jpg", truncated_jpeg)), True),
    Case("upload-not-an-image", ["predict", "--checkpoint", "in/model.pth", "--device", "cpu", "in/u.jpg"],
         "not an image", with_all(good_checkpoint(), file("u.jpg", b"%PDF-1.4 not a photo" * 20)), True),
    Case("upload-bomb", ["predict", "--checkpoint", "in/model.pth", "--device", "cpu", "in/u.png"],
         "decompression bomb", with_all(good_checkpoint(), file("u.png", lambda: png_bomb(14_200))), True),
    Case("upload-directory", ["predict", "--checkpoint", "in/model.pth", "--device", "cpu", "in/photos.jpg"],
         "in/photos.jpg: file not found", with_all(good_checkpoint(), lambda inp: (inp / "photos.jpg").mkdir()), True),
    Case("upload-missing", ["predict", "--checkpoint", "in/model.pth", "--device", "cpu", "in/none.jpg"],
         "file not found", good_checkpoint(), True),
]
CASE_IDS = [c.id for c in CASES]
assert len(set(CASE_IDS)) == len(CASE_IDS)

# The dashboard's Predict page decodes uploads with engine.predict.load_image and shows
# `st.error(f"{name}: {exc}")` for an EngineError: (id, bytes builder, message fragment).
UPLOADS = [
    ("zero-bytes", lambda: b"", "empty file"),
    ("truncated-jpeg", truncated_jpeg, "corrupt or truncated image"),
    ("not-an-image", lambda: b"GIF89a-but-not-really" * 10, "not an image"),
    ("bomb-201-megapixels", lambda: png_bomb(14_200), "decompression bomb"),
    ("header-60-megapixels", lambda: png_header_only(8000, 7500), "refusing a possible decompression bomb"),
    ("header-4-gigapixels", lambda: png_header_only(65_000, 65_000), "decompression bomb"),
    ("too-many-bytes", lambda: b"\xff\xd8" + b"\x00" * (26 * 2**20), "file too large"),
]


# ----------------------------------------------------------------------------- running the cases
def tree(root: Path) -> dict:
    """relative path -> (size, mtime_ns) for files, None for folders (symlinks are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            out[str((base / name).relative_to(root))] = None
        for name in filenames:
            path = base / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def repo_tree() -> dict:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", "node_modules"}
    out = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames + dirnames:
            out[str(Path(dirpath, name).relative_to(ROOT))] = None
    return out


ALLOWED_NEW = ("cwd/runs", f"cwd/runs/{RUN}", "cwd/checkpoints", f"cwd/checkpoints/{RUN}")


def allowed(rel: str) -> bool:
    return rel in ALLOWED_NEW or rel.startswith((f"cwd/runs/{RUN}/", f"cwd/checkpoints/{RUN}/"))


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ENGINE_TRACEBACK": ""}


CASE_TIMEOUT_S = 60  # a case that runs longer hangs or trains on a bad input: reported, not waited for


def run_subprocess(case: Case, box: Path) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "engine", *case.argv], cwd=box / "cwd", env=child_env(),
                              capture_output=True, text=True, timeout=CASE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        return {"rc": "timeout", "stdout": _text(exc.stdout), "stderr": _text(exc.stderr)}
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def run_batch_process(boxes: list) -> list:
    """One process for several torch cases: [(case, box)] -> [result]."""
    jobs = [{"argv": case.argv, "cwd": str(box / "cwd"), "out": str(box / "out")} for case, box in boxes]
    spec = boxes[0][1].parent / f"batch-{boxes[0][0].id}.json"
    spec.write_text(json.dumps(jobs))
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__)), str(spec)], cwd=spec.parent, env=child_env(),
                              capture_output=True, text=True, timeout=CASE_TIMEOUT_S * len(boxes))
        assert proc.returncode == 0, proc.stderr[-3000:]
    except subprocess.TimeoutExpired:
        pass  # the cases without a result.json are reported as timed out
    results = []
    for _, box in boxes:
        out = box / "out"
        done = (out / "result.json").is_file()
        result = json.loads((out / "result.json").read_text()) if done else {"rc": "timeout"}
        for name in ("stdout", "stderr"):
            result[name] = (out / f"{name}.txt").read_text(errors="replace") if (out / f"{name}.txt").is_file() else ""
        shutil.rmtree(out, ignore_errors=True)
        results.append(result)
    return results


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory, plates_real):
    """Run every case once; {case id: (result, box, tree before)}; the repo tree must not change."""
    global DATA_TEMPLATE, GOOD_CHECKPOINT
    base = tmp_path_factory.mktemp("bad-inputs")
    DATA_TEMPLATE = make_real_subset(plates_real, base / "template",
                                     counts=(("train", 4), ("valid", 2), ("test", 2)))
    GOOD_CHECKPOINT = base / "good" / "model.pth"
    _write_good_checkpoint(GOOD_CHECKPOINT)
    repo_before = repo_tree()
    outside_before = set(os.listdir(base))
    prepared = []
    for case in CASES:
        box = base / case.id
        (box / "cwd" / "in").mkdir(parents=True)
        if case.setup:
            case.setup(box / "cwd" / "in")
        prepared.append((case, box, tree(box)))
    results = {}
    for case, box, _ in prepared:
        if not case.torch:
            results[case.id] = run_subprocess(case, box)
    torch_cases = [(case, box) for case, box, _ in prepared if case.torch]
    for start in range(0, len(torch_cases), 20):
        chunk = torch_cases[start:start + 20]
        for (case, _), result in zip(chunk, run_batch_process(chunk)):
            results[case.id] = result
    assert repo_tree() == repo_before, "a case wrote into the repository"
    new_outside = set(os.listdir(base)) - outside_before - {c.id for c in CASES} - {f"batch-{c.id}.json" for c in CASES}
    assert not new_outside, f"written next to the sandboxes: {new_outside}"
    _write_table(base / "corpus.md", results)
    return {case.id: (results[case.id], box, before) for case, box, before in prepared}


def _write_table(path: Path, results: dict) -> None:
    """case -> exit code -> error line, for a reader of the test's tmp folder."""
    lines = ["| case | exit | error line |", "|---|---|---|"]
    for case in CASES:
        result = results[case.id]
        errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
        lines.append(f"| {case.id} | {result['rc']} | {' / '.join(errors) or '(none)'} |")
    path.write_text("\n".join(lines) + "\n")


def _write_good_checkpoint(path: Path) -> None:
    """An untrained 320 model in our checkpoint format (a real model for predict/evaluate)."""
    from engine.checkpoint import FORMAT, save_checkpoint
    from engine.config import load_config
    from engine.model import build_model

    cfg = load_config(DEMO, TINY_RUN_SETTINGS + ["run.name=good"])
    save_checkpoint(path, {"format": FORMAT, "model": build_model(cfg).state_dict(), "epoch": 1,
                           "global_step": 1, "config": cfg.to_dict(), "run": "good",
                           "best": {"epoch": 1, "map50": 0.0}})


DATA_TEMPLATE: Path = Path()
GOOD_CHECKPOINT: Path = Path()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bad_input_gives_one_line_and_writes_nothing_outside_the_run(case, corpus_results):
    result, box, before = corpus_results[case.id]
    output = result["stdout"] + result["stderr"]
    assert result["rc"] not in (0, "timeout"), f"exit {result['rc']}: {output[-2000:]}"
    assert "Traceback" not in output and 'File "' not in output, output[-3000:]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result["stderr"][-2000:]
    assert case.expect in errors[0], errors[0]
    assert not (box / "cwd" / MARKER).exists(), "an evil pickle ran its code"
    after = tree(box)
    new = sorted(set(after) - set(before))
    assert all(allowed(p) for p in new), f"written outside the run's folders: {[p for p in new if not allowed(p)]}"
    changed = [p for p, v in before.items() if p.startswith("cwd/in/") and after.get(p, "gone") != v]
    assert not changed, f"inputs changed or removed: {changed}"
    _assert_run_files_are_one_line(box / "cwd" / "runs" / RUN)


def _assert_run_files_are_one_line(run_dir: Path) -> None:
    """status.json's error (the Runs page shows it) and train.log's last line carry no traceback."""
    status_file = run_dir / "status.json"
    if status_file.is_file():
        status = json.loads(status_file.read_text())
        if status.get("state") == "failed":
            assert status.get("error") and "\n" not in status["error"] and "Traceback" not in status["error"]
    log = run_dir / "train.log"
    if log.is_file() and log.read_text().strip():
        last = log.read_text().strip().splitlines()[-1]
        assert "Traceback" not in last and not last.startswith(" "), last


def test_corpus_is_large_enough():
    assert len(CASES) + len(UPLOADS) >= 40


@pytest.mark.parametrize("make,expect", [(m, e) for _, m, e in UPLOADS], ids=[u[0] for u in UPLOADS])
def test_dashboard_upload_helper_gives_one_line(make, expect):
    from engine.errors import EngineError
    from engine.predict import load_image

    with pytest.raises(EngineError) as info:
        load_image(make(), name="upload.jpg")
    message = str(info.value)
    assert "\n" not in message and message.startswith("upload.jpg: ") and expect in message, message


# ----------------------------------------------------------------------------- batch process
def run_batch(spec_path: str) -> None:
    """Run engine.cli.main for each job of the spec in this one process (torch imported once)."""
    sys.path.insert(0, str(ROOT))
    from engine.cli import main

    for job in json.loads(Path(spec_path).read_text()):
        out = Path(job["out"])
        out.mkdir(parents=True)
        os.chdir(job["cwd"])
        rc = _run_redirected(main, job["argv"], out)
        (out / "result.json").write_text(json.dumps({"rc": rc}))


def _run_redirected(main, argv: list, out: Path) -> int:
    """main(argv) with file descriptors 1 and 2 (and sys.stdout/err) sent to files in `out`."""
    saved = os.dup(1), os.dup(2)
    with open(out / "stdout.txt", "w") as fo, open(out / "stderr.txt", "w") as fe:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(fo.fileno(), 1), os.dup2(fe.fileno(), 2)
        try:
            with contextlib.redirect_stdout(fo), contextlib.redirect_stderr(fe):
                try:
                    return main(argv)
                except SystemExit as exc:
                    return exc.code if isinstance(exc.code, int) else 1
                except BaseException:  # noqa: BLE001 - what escapes main is reported like Python would
                    import traceback

                    traceback.print_exc()
                    return 99
                finally:
                    fo.flush(), fe.flush()
        finally:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


if __name__ == "__main__":
    run_batch(sys.argv[1])
