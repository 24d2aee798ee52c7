"""Read HF safetensors checkpoints lazily: one file, a sharded folder with an index, or a folder of shards.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range)
and the raw tensor bytes. We parse the header ourselves (NumPy has no bfloat16, so the ``safetensors``
package's NumPy loader cannot read BF16) and read each tensor with one positioned read into a private
buffer: memory holds one tensor at a time, never a memory map of the whole shard.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GatenormError
from ..fileio import map_region

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 2**20
STORAGE_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live: file, absolute offset, length, dtype and shape."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def looks_like_safetensors(path: Path) -> bool:
    """True when the file starts like a safetensors file (header length, then a JSON object)."""
    with path.open("rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:9] == b"{"


def _bad(path: Path, problem: str) -> GatenormError:
    return GatenormError(f"{path}: {problem}")


def _parse_entry(path: Path, name: str, spec: object, data_start: int, file_size: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _bad(path, f"not a safetensors file (header entry {name!r} is not an object)")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    valid = (
        isinstance(dtype, str)
        and isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) for n in offsets)
        and 0 <= offsets[0] <= offsets[1]
    )
    if not valid:
        raise _bad(path, f"not a safetensors file (header entry {name!r} lacks dtype, shape or data_offsets)")
    begin, end = offsets
    storage = STORAGE_DTYPES.get(dtype)
    if storage is not None and end - begin != math.prod(shape) * storage.itemsize:
        raise _bad(path, f"tensor {name}'s data_offsets {offsets} span {end - begin} bytes, but its shape {shape} needs a different size")
    if data_start + end > file_size:
        raise _bad(
            path, f"truncated safetensors file: tensor {name}'s data_offsets {offsets} (bytes {data_start + begin}.."
            f"{data_start + end}) run past the end ({file_size} bytes)"
        )
    return TensorEntry(name, path, dtype, tuple(shape), data_start + begin, end - begin)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate one safetensors file's header; no tensor bytes are read."""
    if not path.is_file():
        raise GatenormError(f"{path}: no such file")
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"not a safetensors file (only {file_size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise _bad(path, f"header length {header_len} (offset 0) runs past the end of the file ({file_size} bytes)")
        if header_len > MAX_HEADER_BYTES:
            raise _bad(path, f"header length {header_len} (offset 0) is implausibly large")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: bad JSON or an over-long number
        raise _bad(path, "not a safetensors file (header is not JSON, or nests or numbers beyond reason)") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    return {
        name: _parse_entry(path, name, spec, data_start, file_size)
        for name, spec in header.items()
        if name != "__metadata__"
    }


def read_tensor(entry: TensorEntry, keep_float16: bool = False) -> np.ndarray:
    """The tensor's values as float32 with its stored shape (F32, F16 and BF16); F16 stays float16 if asked."""
    storage = STORAGE_DTYPES.get(entry.dtype)
    if storage is None:
        raise GatenormError(
            f"{entry.path}: tensor {entry.name} has dtype {entry.dtype}; only F32, F16 and BF16 can be read"
        )
    region = map_region(entry.path, entry.offset, entry.nbytes)
    if region is None:
        raise GatenormError(f"{entry.path}: truncated safetensors file: tensor {entry.name} is cut short")
    raw = region.view(storage)
    if entry.dtype == "BF16":
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    elif keep_float16:
        values = raw
    else:
        values = raw.astype(np.float32, copy=False)
    return values.reshape(entry.shape)


def _shards_from_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise GatenormError(f"{index_path}: not a valid safetensors index (needs a weight_map)") from None
    return {name: index_path.parent / shard for name, shard in weight_map.items()}


class SafetensorsCheckpoint:
    """Tensors by name from a single .safetensors file or a folder of shards (with or without an index)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.folder = self.path
            self._entries = self._open_folder()
        else:
            self.folder = self.path.parent
            self._entries = read_header(self.path)
        self.paths = sorted({entry.path for entry in self._entries.values()})

    def _open_folder(self) -> dict[str, TensorEntry]:
        index_path = self.folder / INDEX_NAME
        if index_path.is_file():
            wanted = _shards_from_index(index_path)
            headers = {shard: read_header(shard) for shard in sorted(set(wanted.values()))}
            entries = {}
            for name, shard in wanted.items():
                if name not in headers[shard]:
                    raise GatenormError(f"{index_path}: lists {name} in {shard.name}, which does not hold it")
                entries[name] = headers[shard][name]
            return entries
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            raise GatenormError(f"{self.folder}: no {INDEX_NAME} and no *.safetensors files")
        entries = {}
        for shard in shards:
            for name, entry in read_header(shard).items():
                if name in entries:
                    raise GatenormError(f"{self.folder}: tensor {name} is in both {entries[name].path.name} and {shard.name}")
                entries[name] = entry
        return entries

    def names(self) -> list[str]:
        return list(self._entries)

    def has_tensor(self, name: str) -> bool:
        return name in self._entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise GatenormError(f"{self.path}: tensor {name} is missing") from None

    def tensor(self, name: str, keep_float16: bool = False) -> np.ndarray:
        """Tensor ``name`` as float32 (or float16 if stored so and ``keep_float16``), shape as stored (out x in)."""
        return read_tensor(self.entry(name), keep_float16)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)
