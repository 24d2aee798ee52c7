"""The byte layout of a GGUF file's header: where each metadata field and tensor lives, nothing more.

``gguf.GGUFReader`` builds a numpy view for every string of the tokenizer (about 100k of them in a
small model, 300k in a qwen2 file): seconds and hundreds of MB before the first byte is copied.
A rewrite only needs byte ranges, so this scanner walks the header once with ``struct`` over an
``mmap``, decodes scalars, strings and numeric arrays on demand, and skips string arrays.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 2 and 3, little-endian).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


GGML_MAX_DIMS = 4
MIN_FIELD_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset


class GGUFLayout:
    """Header of one GGUF file: fields and tensors by byte range; values decoded on request.

    Every length, count and offset is checked against the bytes that remain before it is used, so a
    damaged file fails with one line that names the field and its offset, never with a huge allocation.
    """

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
        except BaseException:
            self._map.close()
            raise

    def close(self) -> None:
        self._map.close()

    def __enter__(self) -> GGUFLayout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _damaged(self, what: str, problem: str, at: int | None = None) -> GatenormError:
        offset = self._pos if at is None else at
        return GatenormError(f"{self.path}: corrupt or truncated GGUF: {what} at offset {offset} {problem}")

    def _need(self, n_bytes: int, what: str) -> None:
        """Fail unless ``n_bytes`` remain from the current position."""
        remaining = self.size - self._pos
        if n_bytes > remaining:
            raise self._damaged(what, f"needs {n_bytes} bytes, only {max(remaining, 0)} remain")

    def _unpack(self, fmt: str, what: str = "value") -> Any:
        width = struct.calcsize(fmt)
        self._need(width, what)
        value = struct.unpack_from(fmt, self._map, self._pos)[0]
        self._pos += width
        return value

    def _count(self, what: str, item_bytes: int) -> int:
        """A u64 count of items at least ``item_bytes`` each, checked against the bytes that remain."""
        count = self._unpack("<Q", what)
        if count * item_bytes > self.size - self._pos:
            raise self._damaged(what, f"is {count}, more than the {self.size - self._pos} bytes left can hold", self._pos - 8)
        return count

    def _string(self, what: str = "string") -> str:
        length = self._count(f"length of {what}", 1)
        start = self._pos
        self._pos += length
        try:
            return self._map[start:self._pos].decode("utf-8")
        except UnicodeDecodeError:
            raise self._damaged(what, "is not UTF-8", start) from None

    def _value_type(self, what: str) -> GGUFValueType:
        code = self._unpack("<I", what)
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self._damaged(what, f"is {code}, not a GGUF value type", self._pos - 4) from None

    def _skip_value(self, value_type: GGUFValueType, key: str) -> None:
        if value_type in SCALAR_FORMATS:
            width = struct.calcsize(SCALAR_FORMATS[value_type])
            self._need(width, f"value of {key}")
            self._pos += width
        elif value_type == GGUFValueType.STRING:
            length = self._count(f"length of {key}", 1)
            self._pos += length
        else:
            item_type = self._value_type(f"item type of {key}")
            if item_type in SCALAR_FORMATS:
                width = struct.calcsize(SCALAR_FORMATS[item_type])
                count = self._count(f"length of {key}", width)
                self._pos += count * width
            elif item_type == GGUFValueType.STRING:
                self._skip_strings(self._count(f"length of {key}", 8), key)
            else:  # llama.cpp reads no nested arrays either
                raise self._damaged(f"item type of {key}", "is ARRAY; arrays of arrays are not supported", self._pos - 4)

    def _skip_strings(self, count: int, key: str) -> None:
        """Skip ``count`` length-prefixed strings (tokenizer vocabularies): the hot loop of the scan, left
        unchecked; a length that runs past the end is then found and named by a checked pass."""
        buffer, length_at, pos = self._map, struct.Struct("<Q").unpack_from, self._pos
        try:
            for _ in range(count):
                pos += 8 + length_at(buffer, pos)[0]
        except (struct.error, OverflowError):  # read past the end, or an offset beyond any file
            pos = self.size + 1
        if pos > self.size:
            self._name_the_bad_string(count, key)
        self._pos = pos

    def _name_the_bad_string(self, count: int, key: str) -> None:
        """Raise for the first string of the array at the current position that runs past the end."""
        buffer, length_at, size, pos = self._map, struct.Struct("<Q").unpack_from, self.size, self._pos
        for index in range(count):
            if pos + 8 > size:
                self._pos = pos
                raise self._damaged(f"length of {key}[{index}]", f"needs 8 bytes, only {size - pos} remain")
            length = length_at(buffer, pos)[0]
            if length > size - pos - 8:
                raise self._damaged(f"length of {key}[{index}]", f"is {length}, past the end of the file", pos)
            pos += 8 + length
        raise AssertionError("the fast pass ran past the end, the checked pass did not")

    def _scan(self) -> None:
        self._pos = 4
        self.version = self._unpack("<I", "version")
        if self.version not in (2, 3):
            raise GatenormError(f"{self.path}: GGUF version {self.version} is not supported (big-endian or unknown)")
        n_tensors = self._count("tensor count", MIN_TENSOR_BYTES)
        n_kv = self._count("metadata count", MIN_FIELD_BYTES)
        self.fields: dict[str, FieldSpan] = {}
        for index in range(n_kv):
            start = self._pos
            key = self._string(f"key of metadata field {index}")
            value_type = self._value_type(f"type of {key}")
            value_start = self._pos
            self._skip_value(value_type, key)
            if key in self.fields:
                raise self._damaged(f"metadata key {key}", "appears twice", start)
            self.fields[key] = FieldSpan(key, value_type, start, value_start, self._pos)
        alignment = self.value(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GatenormError(f"{self.path}: corrupt GGUF: {Keys.General.ALIGNMENT} = {alignment!r} is not a power of two")
        self.alignment = alignment
        entries = [self._tensor_entry(index) for index in range(n_tensors)]
        self.header_bytes = self._pos
        self.data_offset = (self._pos + alignment - 1) // alignment * alignment
        self.tensors: dict[str, TensorSpan] = {}
        for name, shape, tensor_type, offset in entries:
            block_size, type_size = GGML_QUANT_SIZES[tensor_type]
            n_elements = math.prod(shape)
            if shape[0] % block_size:
                raise GatenormError(f"{self.path}: corrupt GGUF: tensor {name} has rows of {shape[0]}, not whole {tensor_type.name} blocks")
            span = TensorSpan(name, shape, tensor_type, self.data_offset + offset, n_elements // block_size * type_size)
            if offset % alignment:
                raise GatenormError(f"{self.path}: corrupt GGUF: tensor {name} starts at data offset {offset}, not a multiple of {alignment}")
            if span.data_offset + span.n_bytes > self.size:
                raise GatenormError(f"{self.path}: truncated GGUF, tensor {name} runs past the end")
            if name in self.tensors:
                raise GatenormError(f"{self.path}: tensor {name} appears twice")
            self.tensors[name] = span

    def _tensor_entry(self, index: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        """Name, ggml dims, type and data offset of the ``index``-th tensor in the tensor table."""
        name = self._string(f"name of tensor {index}")
        n_dims = self._unpack("<I", f"dimension count of tensor {name}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise self._damaged(f"dimension count of tensor {name}", f"is {n_dims}, not 1 to {GGML_MAX_DIMS}", self._pos - 4)
        self._need(8 * n_dims, f"dimensions of tensor {name}")
        shape = struct.unpack_from(f"<{n_dims}Q", self._map, self._pos)
        self._pos += 8 * n_dims
        code = self._unpack("<I", f"type of tensor {name}")
        try:
            tensor_type = GGMLQuantizationType(code)
            GGML_QUANT_SIZES[tensor_type]
        except (ValueError, KeyError):
            raise self._damaged(f"type of tensor {name}", f"is {code}, not a ggml type", self._pos - 4) from None
        return name, shape, tensor_type, self._unpack("<Q", f"data offset of tensor {name}")

    def raw(self, start: int, end: int) -> bytes:
        return self._map[start:end]

    def value(self, key: str, default: Any = None) -> Any:
        """A scalar, a string, or an array as a list; ``default`` when absent. The scan position is kept."""
        span = self.fields.get(key)
        if span is None:
            return default
        scan_position, self._pos = self._pos, span.value_start
        try:
            return self._decode(span.type, key)
        finally:
            self._pos = scan_position

    def _decode(self, value_type: GGUFValueType, key: str) -> Any:
        """The value at the current position, which the scan has already bounds-checked."""
        if value_type in SCALAR_FORMATS:
            return self._unpack(SCALAR_FORMATS[value_type])
        if value_type == GGUFValueType.STRING:
            return self._string(key)
        item_type = GGUFValueType(self._unpack("<I"))
        count = self._unpack("<Q")
        if item_type == GGUFValueType.STRING:  # a tokenizer vocabulary: 50k-150k strings, decoded one by one
            return [self._string(key) for _ in range(count)]
        dtype = np.dtype(SCALAR_FORMATS[item_type])
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self._pos).tolist()

    @property
    def split_count(self) -> int:
        """How many files the model is split over (1: not split)."""
        return int(self.value(Keys.Split.LLM_KV_SPLIT_COUNT, 1))

    @property
    def architecture(self) -> str:
        arch = self.value(Keys.General.ARCHITECTURE)
        if not isinstance(arch, str):
            raise GatenormError(f"{self.path}: general.architecture is missing")
        return arch

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        return self.value(f"{self.architecture}.{suffix}", default)
