"""The byte layout of a GGUF file's header: where each metadata field and tensor lives, nothing more.

``gguf.GGUFReader`` builds a numpy view for every string of the tokenizer (about 100k of them in a
small model, 300k in a qwen2 file): seconds and hundreds of MB before the first byte is copied.
A rewrite only needs byte ranges, so this scanner walks the header once with ``struct`` over an
``mmap``, decodes scalars, strings and numeric arrays on demand, and skips string arrays.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 2 and 3, little-endian).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from .errors import GatenormError

GGUF_MAGIC = b"GGUF"
SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True)
class FieldSpan:
    """One metadata key/value pair: its key, type and byte range [start, end) in the file."""

    key: str
    type: GGUFValueType
    start: int
    value_start: int
    end: int


@dataclass(frozen=True)
class TensorSpan:
    """One tensor: name, ggml dims (fastest first), type, absolute data offset and byte size."""

    name: str
    shape: tuple[int, ...]
    tensor_type: GGMLQuantizationType
    data_offset: int
    n_bytes: int


class GGUFLayout:
    """Header of one GGUF file: fields and tensors by byte range; values decoded on request."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GatenormError(f"{self.path}: no such file")
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise GatenormError(f"{self.path}: not a GGUF file (bad magic)")
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._scan()
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise GatenormError(f"{self.path}: corrupt or truncated GGUF header ({exc})") from None

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> GGUFLayout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        if self._pos + length > self.size:
            raise ValueError("string runs past the end of the file")
        text = self._map[self._pos:self._pos + length].decode("utf-8")
        self._pos += length
        return text

    def _skip_value(self, value_type: GGUFValueType) -> None:
        if value_type in SCALAR_FORMATS:
            self._pos += struct.calcsize(SCALAR_FORMATS[value_type])
        elif value_type == GGUFValueType.STRING:
            self._pos += 8 + struct.unpack_from("<Q", self._map, self._pos)[0]
        elif value_type == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self._unpack("<I"))
            count = self._unpack("<Q")
            if item_type in SCALAR_FORMATS:
                self._pos += count * struct.calcsize(SCALAR_FORMATS[item_type])
            elif item_type == GGUFValueType.STRING:
                self._pos = self._skip_strings(self._pos, count)
            else:
                for _ in range(count):
                    self._skip_value(item_type)
        else:
            raise ValueError(f"unknown value type {value_type}")
        if self._pos > self.size:
            raise ValueError("metadata runs past the end of the file")

    def _skip_strings(self, pos: int, count: int) -> int:
        """Position after ``count`` length-prefixed strings starting at ``pos`` (tokenizer vocabularies)."""
        buffer, length_at = self._map, struct.Struct("<Q").unpack_from
        for _ in range(count):
            pos += 8 + length_at(buffer, pos)[0]
        return pos

    def _scan(self) -> None:
        self._pos = 4
        self.version = self._unpack("<I")
        if self.version not in (2, 3):
            raise GatenormError(f"{self.path}: GGUF version {self.version} is not supported (big-endian or unknown)")
        n_tensors, n_kv = self._unpack("<Q"), self._unpack("<Q")
        self.fields: dict[str, FieldSpan] = {}
        for _ in range(n_kv):
            start = self._pos
            key = self._string()
            value_type = GGUFValueType(self._unpack("<I"))
            value_start = self._pos
            self._skip_value(value_type)
            self.fields[key] = FieldSpan(key, value_type, start, value_start, self._pos)
        alignment = int(self.value(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment {alignment} is not a power of two")
        self.alignment = alignment
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            shape = struct.unpack_from(f"<{n_dims}Q", self._map, self._pos)
            self._pos += 8 * n_dims
            tensor_type = GGMLQuantizationType(self._unpack("<I"))
            entries.append((name, shape, tensor_type, self._unpack("<Q")))
        self.header_bytes = self._pos
        self.data_offset = (self._pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, TensorSpan] = {}
        for name, shape, tensor_type, offset in entries:
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            n_elements = int(np.prod(shape, dtype=object)) if shape else 1
            span = TensorSpan(name, tuple(shape), tensor_type, self.data_offset + offset, n_elements // block_size * type_size)
            if span.data_offset + span.n_bytes > self.size:
                raise GatenormError(f"{self.path}: truncated GGUF, tensor {name} runs past the end")
            if name in self.tensors:
                raise GatenormError(f"{self.path}: tensor {name} appears twice")
            self.tensors[name] = span

    def raw(self, start: int, end: int) -> bytes:
        return self._map[start:end]

    def value(self, key: str, default: Any = None) -> Any:
        """A scalar, string or numeric array (as a list); ``default`` when absent. String arrays: error."""
        span = self.fields.get(key)
        if span is None:
            return default
        self._pos = span.value_start
        if span.type in SCALAR_FORMATS:
            return self._unpack(SCALAR_FORMATS[span.type])
        if span.type == GGUFValueType.STRING:
            return self._string()
        item_type = GGUFValueType(self._unpack("<I"))
        count = self._unpack("<Q")
        if item_type not in SCALAR_FORMATS:
            raise GatenormError(f"{self.path}: {key} is an array of {item_type.name}, not numbers")
        dtype = np.dtype(SCALAR_FORMATS[item_type])
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).tolist()

    @property
    def architecture(self) -> str:
        arch = self.value(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise GatenormError(f"{self.path}: general.architecture is missing")
        return arch

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        return self.value(f"{self.architecture}.{suffix}", default)


class ArchMetadata(Protocol):
    """What per-layer metadata needs: a path for messages and architecture-scoped values."""

    path: Path

    @property
    def architecture(self) -> str: ...

    def arch_value(self, suffix: str, default: Any = None) -> Any: ...


def head_counts(model: ArchMetadata, n_layers: int) -> tuple[list[int], list[int]]:
    """Per-layer query and KV head counts: scalars apply to every layer, KV defaults to the query count."""

    def per_layer(suffix: str, default: Any = None) -> list[int]:
        value = model.arch_value(suffix, default)
        if value is None:
            raise GatenormError(f"{model.path}: metadata key {model.architecture}.{suffix} is missing")
        if isinstance(value, list):
            if len(value) != n_layers:
                raise GatenormError(f"{model.path}: {model.architecture}.{suffix} has {len(value)} entries, not {n_layers}")
            return [int(v) for v in value]
        return [int(value)] * n_layers

    return per_layer("attention.head_count"), per_layer("attention.head_count_kv", model.arch_value("attention.head_count"))
