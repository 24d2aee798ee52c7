"""One view of a model for the scorer, whatever the file: GGUF (single or split) or HF safetensors.

``open_source(path)`` recognises the format, the architecture and the attention geometry, and hands
out one layer's Q and K weights (and attention-norm gain) at a time, always in GGUF tensor naming and
in the (out_features, in_features) orientation that both formats share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from gguf import Keys

from ..errors import GatenormError
from .architectures import Architecture, architecture_for_gguf, architecture_for_hf
from .geometry import ModelGeometry
from .gguf_file import GGUFFile
from .safetensors_file import SafetensorsCheckpoint, looks_like_safetensors

GGUF_MAGIC = b"GGUF"


class TensorStore(Protocol):
    """What a file reader offers: tensors by their stored name, as float32 (F16 kept as float16 on request)."""

    def has_tensor(self, name: str) -> bool: ...

    def tensor(self, name: str, keep_float16: bool = False) -> np.ndarray: ...


@dataclass(frozen=True)
class LayerAttention:
    """One layer's query and key weights, (heads x head_dim, width) float32 or float16 as stored, and its norm gain."""

    layer: int
    q: np.ndarray
    k: np.ndarray
    norm_gain: np.ndarray | None


class ModelSource:
    """A model's attention weights, one layer at a time (see :func:`open_source`)."""

    def __init__(
        self,
        path: Path,
        file_format: str,
        architecture: Architecture,
        geometry: ModelGeometry,
        store: TensorStore,
        stored_names: dict[str, str] | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        self.path = path
        self.file_format = file_format
        self.architecture = architecture
        self.geometry = geometry
        self.n_head, self.n_head_kv = geometry.uniform_heads(str(path))
        self._store = store
        self._stored_names = stored_names
        self._norm_offset = norm_offset

    def _stored_name(self, gguf_name: str) -> str | None:
        if self._stored_names is None:
            return gguf_name if self._store.has_tensor(gguf_name) else None
        return self._stored_names.get(gguf_name)

    def _layer_tensor(
        self, layer: int, role: str, gguf_name: str, shape: tuple[int, ...], keep_float16: bool = False
    ) -> np.ndarray:
        stored = self._stored_name(gguf_name)
        if stored is None:
            raise GatenormError(f"{self.path}: layer {layer} has no {role} tensor ({gguf_name})")
        values = self._store.tensor(stored, keep_float16)
        if values.shape != shape:
            g = self.geometry
            raise GatenormError(
                f"{self.path}: {role} tensor {stored} has shape {list(values.shape)}, expected {list(shape)} "
                f"({self.n_head} heads, {self.n_head_kv} KV heads of size {g.head_dim}, width {g.n_embd})"
            )
        return values

    def attention(self, layer: int, with_norm_gain: bool = False) -> LayerAttention:
        """Layer ``layer``'s Q and K weights (and the attention RMSNorm gain when asked for)."""
        g = self.geometry
        names = self.architecture.attention_names(layer)
        q = self._layer_tensor(layer, "query", names.q, (self.n_head * g.head_dim, g.n_embd), keep_float16=True)
        k = self._layer_tensor(layer, "key", names.k, (self.n_head_kv * g.head_dim, g.n_embd), keep_float16=True)
        gain = None
        if with_norm_gain:
            gain = self._layer_tensor(layer, "attention norm", names.norm, (g.n_embd,)) + np.float32(self._norm_offset)
        return LayerAttention(layer, q, k, gain)


def _open_gguf(path: Path) -> ModelSource:
    model = GGUFFile(path)
    arch_name = model.value(Keys.General.ARCHITECTURE)
    if arch_name is None:
        raise GatenormError(f"{path}: GGUF has no {Keys.General.ARCHITECTURE}")
    arch = architecture_for_gguf(arch_name, str(path))
    geometry = ModelGeometry.from_gguf(model)
    return ModelSource(path, "gguf", arch, geometry, model)


def _hf_config(checkpoint: SafetensorsCheckpoint) -> tuple[Path, dict[str, Any]]:
    config_path = checkpoint.folder / "config.json"
    if not config_path.is_file():
        raise GatenormError(f"{checkpoint.path}: no config.json beside the safetensors (head counts come from it)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GatenormError(f"{config_path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise GatenormError(f"{config_path}: not a JSON object")
    text_config = config.get("text_config")
    if isinstance(text_config, dict) and "num_attention_heads" in text_config:
        config = text_config
    return config_path, config


def _open_safetensors(path: Path) -> ModelSource:
    checkpoint = SafetensorsCheckpoint(path)
    config_path, config = _hf_config(checkpoint)
    where = str(config_path)
    arch = architecture_for_hf(config.get("model_type"), where)
    geometry = ModelGeometry.from_hf_config(config, arch.name, where)
    stored_names = arch.hf_to_gguf_names(checkpoint.names(), geometry.n_layers)
    return ModelSource(path, "safetensors", arch, geometry, checkpoint, stored_names, arch.hf_norm_offset)


def open_source(path: Path | str) -> ModelSource:
    """Open a GGUF file (any part of a split set), a .safetensors file, or a folder of safetensors shards."""
    path = Path(path)
    if path.is_dir():
        return _open_safetensors(path)
    if not path.is_file():
        raise GatenormError(f"{path}: no such file or folder")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic == GGUF_MAGIC:
        return _open_gguf(path)
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        return _open_safetensors(path)
    raise GatenormError(f"{path}: not a GGUF or safetensors file")
