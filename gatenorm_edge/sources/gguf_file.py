"""Read GGUF files (single or split) lazily: metadata and tensors by name, one tensor at a time.

The header is scanned with ``GGUFLayout`` (struct over the bytes, tokenizer string arrays skipped),
which opens a model in milliseconds; ``gguf.GGUFReader`` builds a numpy view per tokenizer string
and takes seconds. Each tensor is read from a memory map of its own byte range and dequantized by
``gguf.quants.dequantize``, so memory holds one tensor, never the whole file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from ..errors import GatenormError
from ..fileio import map_region
from ..gguf_layout import GGUFLayout, TensorSpan

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_COUNT_KEY = "split.count"


def split_paths(path: Path) -> list[Path]:
    """All files of a split GGUF set given any one of them (or just ``[path]`` if not split)."""
    match = SPLIT_NAME.match(path.name)
    if match is None:
        return [path]
    count = int(match["count"])
    stem = match["stem"]
    paths = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise GatenormError(f"{path}: split GGUF set is incomplete, missing {', '.join(missing)}")
    return paths


class GGUFFile:
    """A GGUF model, possibly split over several files: metadata from the first, tensors from all."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.paths = split_paths(self.path)
        self.layouts = [GGUFLayout(p) for p in self.paths]
        self._spans: dict[str, tuple[Path, TensorSpan]] = {}
        for layout in self.layouts:
            for name, span in layout.tensors.items():
                if name in self._spans:
                    raise GatenormError(f"{layout.path}: tensor {name} is also in {self._spans[name][0].name}")
                self._spans[name] = (layout.path, span)

    @property
    def architecture(self) -> str:
        return str(self.value("general.architecture"))

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value: a scalar, a string, or a list for arrays; ``default`` when absent."""
        header = self.layouts[0]
        counts = {"GGUF.version": header.version, "GGUF.tensor_count": len(header.tensors), "GGUF.kv_count": len(header.fields)}
        if key in counts:  # the pseudo-fields GGUFReader lists with the metadata
            return counts[key]
        return header.value(key, default)

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """An architecture-scoped value, e.g. ``arch_value("block_count")`` for ``llama.block_count``."""
        return self.value(f"{self.architecture}.{suffix}", default)

    def has_tensor(self, name: str) -> bool:
        return name in self._spans

    def tensor_names(self) -> list[str]:
        return list(self._spans)

    def tensor_span(self, name: str) -> TensorSpan:
        """Where tensor ``name`` lives: ggml dims, type, absolute offset and size in its file."""
        try:
            return self._spans[name][1]
        except KeyError:
            raise GatenormError(f"{self.path}: tensor {name} is missing") from None

    def tensor(self, name: str, keep_float16: bool = False) -> np.ndarray:
        """Tensor ``name`` dequantized to float32 (F16 stays float16 if ``keep_float16``), numpy shape (rows, cols)."""
        span = self.tensor_span(name)
        path = self._spans[name][0]
        block_size, type_size = GGML_QUANT_SIZES[span.tensor_type]
        row_elements, *outer = span.shape  # whole blocks per row: checked by the header scan
        raw = map_region(path, span.data_offset, span.n_bytes)
        if raw is None:
            raise GatenormError(f"{path}: truncated GGUF, tensor {name} is cut short")
        blocks = raw.reshape(*reversed(outer), row_elements // block_size * type_size)
        if keep_float16 and span.tensor_type == GGMLQuantizationType.F16:
            return blocks.view(np.float16)
        try:
            array = dequantize(blocks, span.tensor_type)
        except NotImplementedError:
            raise GatenormError(
                f"{self.path}: tensor {name} has type {span.tensor_type.name}, which the gguf package cannot dequantize"
            ) from None
        return np.asarray(array, dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)
