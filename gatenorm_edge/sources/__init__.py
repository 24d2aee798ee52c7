"""Read model tensors by name from GGUF files and HF safetensors checkpoints, without loading the model."""

from .architectures import ARCHITECTURES, Architecture, AttentionNames
from .gguf_file import GGUFFile
from .geometry import ModelGeometry
from .model_source import LayerAttention, ModelSource, open_source
from .safetensors_file import SafetensorsCheckpoint

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "AttentionNames",
    "GGUFFile",
    "LayerAttention",
    "ModelGeometry",
    "ModelSource",
    "SafetensorsCheckpoint",
    "open_source",
]
