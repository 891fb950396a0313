"""metrics.jsonl read into columns: step records as numpy arrays, epoch records as dicts.

The run folder contract (engine/runs.py) fixes the record shapes; this reader parses whole chunks
of complete lines with pyarrow's JSON reader (C++, one pass, no Python dict per record) and falls
back to a line-by-line parse for a chunk pyarrow refuses (a line glued together by a crash and a
resume, a value of the wrong type): bad lines are skipped, the others are kept.

`MetricsFile` reads only bytes added since the last poll, never a half-written last line, and
starts over when the file is replaced or truncated.
"""
from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from engine.tracking import EPOCH_KEYS, STEP_KEYS

STEP_COLUMNS = ("epoch", "time") + STEP_KEYS  # float64 columns next to the int64 step column
EPOCH_FIELDS = ("epoch", "step", "time") + EPOCH_KEYS
CHUNK_BYTES = 8 << 20  # pyarrow block size; also the unit the fallback parse works on
SMALL_BYTES = 256 << 10  # below this, the line-by-line parse is faster than starting pyarrow


@dataclass
class Chunk:
    """What a run of complete lines held: step columns (unsorted, duplicates possible) + epoch dicts."""
    steps: np.ndarray
    columns: dict
    epochs: list

    @staticmethod
    def empty() -> "Chunk":
        return Chunk(np.zeros(0, np.int64), {k: np.zeros(0) for k in STEP_COLUMNS}, [])

    def __len__(self) -> int:
        return len(self.steps)


def _schema():
    import pyarrow as pa

    fields = [("type", pa.string()), ("step", pa.float64())]
    fields += [(k, pa.float64()) for k in STEP_COLUMNS]
    fields += [(k, pa.float64()) for k in EPOCH_KEYS if k not in STEP_COLUMNS and k != "is_best"]
    fields.append(("is_best", pa.bool_()))
    return pa.schema(fields)


def _from_table(table) -> Chunk:
    import pyarrow.compute as pc

    kinds = table.column("type")
    is_step = pc.fill_null(pc.equal(kinds, "step"), False).to_numpy(zero_copy_only=False)
    step_col = table.column("step").to_numpy(zero_copy_only=False)
    good = is_step & np.isfinite(step_col) & (step_col == np.floor(step_col))
    every = bool(good.all())
    steps = (step_col if every else step_col[good]).astype(np.int64)
    columns = {}
    for k in STEP_COLUMNS:
        values = table.column(k).to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        columns[k] = values if every else values[good]
    epochs = []
    if not is_step.all():
        epoch_rows = table.filter(pc.fill_null(pc.equal(kinds, "epoch"), False))
        epochs = [_epoch_dict(r) for r in epoch_rows.select(list(EPOCH_FIELDS)).to_pylist()]
    return Chunk(steps, columns, [e for e in epochs if e is not None])


def _epoch_dict(rec: dict) -> Optional[dict]:
    epoch = rec.get("epoch")
    if not isinstance(epoch, (int, float)) or isinstance(epoch, bool) or epoch != int(epoch):
        return None
    out = {"type": "epoch", **{k: v for k, v in rec.items() if v is not None}}
    out["epoch"] = int(epoch)
    if isinstance(out.get("step"), float) and out["step"] == int(out["step"]):
        out["step"] = int(out["step"])
    return out


def _number(value) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return np.nan


def _parse_lines(data: bytes) -> Chunk:
    """The slow, tolerant path: one json.loads per line, bad lines skipped."""
    steps, rows, epochs = [], [], []
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if rec.get("type") == "step" and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            steps.append(rec["step"])
            rows.append([_number(rec.get(k)) for k in STEP_COLUMNS])
        elif rec.get("type") == "epoch":
            e = _epoch_dict({k: rec.get(k) for k in EPOCH_FIELDS})
            if e is not None and isinstance(rec.get("epoch"), int):
                epochs.append(e)
    table = np.array(rows, dtype=np.float64).reshape(-1, len(STEP_COLUMNS))
    return Chunk(np.array(steps, dtype=np.int64), {k: table[:, i] for i, k in enumerate(STEP_COLUMNS)}, epochs)


def _parse_fast(data) -> Chunk:
    """pyarrow's reader (several threads over 8 MB blocks); raises on any bad line."""
    import pyarrow as pa
    import pyarrow.json as pj

    options = pj.ParseOptions(explicit_schema=_schema(), unexpected_field_behavior="ignore")
    table = pj.read_json(pa.BufferReader(pa.py_buffer(data)), read_options=pj.ReadOptions(block_size=CHUNK_BYTES),
                         parse_options=options)
    return _from_table(table)


def parse(data) -> Chunk:
    """Records of complete JSON lines (data should end with a newline); bad lines are skipped.

    A poll's few new lines go through json.loads (pyarrow's reader costs milliseconds to start)."""
    if not len(data):
        return Chunk.empty()
    if len(data) < SMALL_BYTES:
        return _parse_lines(bytes(data))
    try:
        return _parse_fast(data)
    except Exception:  # pyarrow refuses a whole block for one bad line (or is missing)
        return _parse_lines(bytes(data))


def concat(chunks: list) -> Chunk:
    chunks = [c for c in chunks if len(c) or c.epochs]
    if not chunks:
        return Chunk.empty()
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(np.concatenate([c.steps for c in chunks]),
                 {k: np.concatenate([c.columns[k] for c in chunks]) for k in STEP_COLUMNS},
                 [e for c in chunks for e in c.epochs])


def parse_in_chunks(data, chunk_bytes: int = CHUNK_BYTES) -> Chunk:
    """`parse` of the whole; when a bad line makes pyarrow refuse it, line-aligned pieces are parsed
    separately, so only the piece holding the bad line takes the slow path."""
    if len(data) <= chunk_bytes:
        return parse(data)
    try:
        return _parse_fast(data)
    except Exception:
        pass
    data = bytes(data)
    pieces, start = [], 0
    while start < len(data):
        end = data.find(b"\n", min(start + chunk_bytes, len(data) - 1))
        end = len(data) if end < 0 else end + 1
        pieces.append(parse(data[start:end]))
        start = end
    return concat(pieces)


@dataclass
class MetricsFile:
    """Incremental reader: each `read_new()` parses only the complete lines added since the last call."""
    path: Path
    offset: int = 0
    inode: Optional[int] = None
    generation: int = 0  # bumped when the file was replaced or truncated (the caller starts over)
    _size_seen: int = field(default=-1, repr=False)

    def changed_on_disk(self) -> bool:
        """A cheap stat: True when the file's size or identity moved since the last read."""
        try:
            st = os.stat(self.path)
        except OSError:
            return self.offset != 0
        return st.st_ino != self.inode or st.st_size != self._size_seen

    def read_new(self) -> Chunk:
        try:
            st = os.stat(self.path)
            inode, size = st.st_ino, st.st_size
        except OSError:
            inode, size = None, 0
        if inode != self.inode or size < self.offset:
            if self.inode is not None or self.offset:
                self.generation += 1
            self.inode, self.offset = inode, 0
        self._size_seen = size
        if size <= self.offset:
            return Chunk.empty()
        try:
            with open(self.path, "rb") as fh:
                if size - self.offset > CHUNK_BYTES:  # a first load: map the file instead of copying it
                    with mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as mapped:
                        return self._consume(memoryview(mapped)[self.offset:size])
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except (OSError, ValueError):
            return Chunk.empty()
        return self._consume(memoryview(data))

    def _consume(self, data: memoryview) -> Chunk:
        """Parse the complete lines of `data` (read from self.offset) and move the offset past them."""
        try:
            end = bytes(data[-65536:]).rfind(b"\n")
            if end < 0:
                end = bytes(data).rfind(b"\n")
            else:
                end += max(0, len(data) - 65536)
            if end < 0:
                return Chunk.empty()  # only a half-written line so far
            chunk = parse_in_chunks(data[: end + 1])
            self.offset += end + 1
            return chunk
        finally:
            data.release()
