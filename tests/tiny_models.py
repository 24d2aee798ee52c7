"""Fixture builders: a tiny random llama-shaped GGUF (single or split) and the same weights as HF safetensors.

The GGUF holds Q/K rows in llama.cpp's interleaved RoPE order, as the llama converter writes them;
the HF checkpoints are made from the GGUF by undoing that permutation, so both hold the same model.
Everything is written with the upstream ``gguf`` and ``safetensors`` packages, never with our readers.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

from gatenorm_edge.sources.rope_layout import gguf_to_hf_rows

GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_GGUF_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@dataclass(frozen=True)
class TinyConfig:
    n_layers: int = 4
    n_embd: int = 64
    n_head: int = 8
    n_head_kv: int = 4
    n_ff: int = 96
    n_vocab: int = 32

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def hf_name(gguf_name: str) -> str:
    """The HF (transformers llama) name of a GGUF tensor name."""
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    _, layer, rest = gguf_name.split(".", 2)
    return f"model.layers.{layer}.{LAYER_GGUF_TO_HF[rest]}"


def random_gguf_weights(config: TinyConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights of a llama model under GGUF names, numpy shape (rows, cols) as ggml stores them."""
    rng = np.random.default_rng(seed)
    c = config

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def gain(n: int) -> np.ndarray:
        return rng.uniform(0.3, 2.0, n).astype(np.float32)

    weights = {"token_embd.weight": matrix(c.n_vocab, c.n_embd)}
    for i in range(c.n_layers):
        weights |= {
            f"blk.{i}.attn_norm.weight": gain(c.n_embd),
            f"blk.{i}.attn_q.weight": matrix(c.n_head * c.head_dim, c.n_embd),
            f"blk.{i}.attn_k.weight": matrix(c.n_head_kv * c.head_dim, c.n_embd),
            f"blk.{i}.attn_v.weight": matrix(c.n_head_kv * c.head_dim, c.n_embd),
            f"blk.{i}.attn_output.weight": matrix(c.n_embd, c.n_head * c.head_dim),
            f"blk.{i}.ffn_norm.weight": gain(c.n_embd),
            f"blk.{i}.ffn_gate.weight": matrix(c.n_ff, c.n_embd),
            f"blk.{i}.ffn_up.weight": matrix(c.n_ff, c.n_embd),
            f"blk.{i}.ffn_down.weight": matrix(c.n_embd, c.n_ff),
        }
    weights |= {"output_norm.weight": gain(c.n_embd), "output.weight": matrix(c.n_vocab, c.n_embd)}
    return weights


def write_llama_gguf(
    path: Path,
    config: TinyConfig = TinyConfig(),
    *,
    seed: int = 0,
    arch: str = "llama",
    head_count: int | None = None,
    drop: Collection[str] = (),
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    split_max_tensors: int = 0,
    expert_count: int = 0,
) -> Path:
    """Write a tiny random llama GGUF (2-D weights in ``qtype``); returns the path to open (first split).
    ``expert_count`` only adds that metadata key (a file that claims to be a mixture of experts)."""
    writer = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(config.n_layers)
    if expert_count:
        writer.add_expert_count(expert_count)
    writer.add_context_length(128)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(head_count if head_count is not None else config.n_head)
    writer.add_head_count_kv(config.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(config.head_dim)
    for name, values in random_gguf_weights(config, seed).items():
        if name in drop:
            continue
        if values.ndim == 2 and qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, values.astype(np.float16))
        elif values.ndim == 2 and qtype != GGMLQuantizationType.F32:
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path


def read_gguf_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (single-file) GGUF as float32, read with the upstream GGUFReader."""
    reader = GGUFReader(path)
    return {t.name: np.array(dequantize(t.data, t.tensor_type), dtype=np.float32) for t in reader.tensors}


def gguf_to_hf_weights(path: Path, config: TinyConfig) -> dict[str, np.ndarray]:
    """The GGUF's weights under HF names, with the llama converter's Q/K row permutation undone."""
    hf = {}
    for name, values in read_gguf_weights(path).items():
        if name.endswith("attn_q.weight"):
            values = gguf_to_hf_rows(values, config.n_head)
        elif name.endswith("attn_k.weight"):
            values = gguf_to_hf_rows(values, config.n_head_kv)
        hf[hf_name(name)] = values
    return hf


def hf_config(config: TinyConfig, model_type: str = "llama", **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "num_hidden_layers": config.n_layers,
        "hidden_size": config.n_embd,
        "intermediate_size": config.n_ff,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head_kv,
        "rms_norm_eps": 1e-5,
        "vocab_size": config.n_vocab,
    }
    values.update(overrides)
    return values


def write_hf_checkpoint(
    folder: Path,
    weights: dict[str, np.ndarray],
    config: dict[str, object],
    *,
    shards: int = 1,
    index: bool = True,
    dtype: type = np.float32,
) -> Path:
    """Write HF safetensors: one ``model.safetensors``, or ``shards`` files with (or without) an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    arrays = {name: np.ascontiguousarray(values, dtype=dtype) for name, values in weights.items()}
    if shards == 1:
        save_file(arrays, folder / "model.safetensors", metadata={"format": "pt"})
        return folder / "model.safetensors"
    names = list(arrays)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
        shard = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({names[j]: arrays[names[j]] for j in part}, folder / shard, metadata={"format": "pt"})
        weight_map |= {names[j]: shard for j in part}
    if index:
        total = sum(a.nbytes for a in arrays.values())
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json), encoding="utf-8")
    return folder


def write_bf16_safetensors(path: Path, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Write float32 weights as BF16 (truncated) by hand, following the format spec; returns the exact BF16 values."""
    header: dict[str, object] = {}
    blobs = []
    offset = 0
    exact = {}
    for name, values in weights.items():
        bits = (np.ascontiguousarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")
        exact[name] = (bits.astype("<u4") << 16).view("<f4").reshape(values.shape)
        blob = bits.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(blobs))
    return exact
