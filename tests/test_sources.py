"""Readers: GGUF (single, split, quantized), HF safetensors (file, index, folder; F32/F16/BF16), arch map, Q/K layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

import tiny_models as tm
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.sources import GGUFFile, ModelSource, SafetensorsCheckpoint, open_source
from gatenorm_edge.sources.rope_layout import gguf_to_hf_rows, hf_to_gguf_rows

CONFIG = tm.TinyConfig()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny llama as GGUF (single, split) and as HF safetensors (single, indexed shards, plain shards)."""
    root = tmp_path_factory.mktemp("tiny_sources")
    gguf_path = tm.write_llama_gguf(root / "tiny.gguf", CONFIG)
    (root / "split").mkdir()
    split = tm.write_llama_gguf(root / "split" / "tiny.gguf", CONFIG, split_max_tensors=7)
    hf = tm.gguf_to_hf_weights(gguf_path, CONFIG)
    config = tm.hf_config(CONFIG)
    return {
        "gguf": gguf_path,
        "split": split,
        "hf_file": tm.write_hf_checkpoint(root / "hf_single", hf, config),
        "hf_index": tm.write_hf_checkpoint(root / "hf_index", hf, config, shards=3),
        "hf_folder": tm.write_hf_checkpoint(root / "hf_folder", hf, config, shards=2, index=False),
    }


def test_rope_layout_matches_the_converter_index_rule() -> None:
    # llama.cpp's llama converter puts HF row i of a head (i < d/2) at 2i and row i + d/2 at 2i + 1.
    n_heads, head_dim = 3, 8
    hf = np.arange(n_heads * head_dim * 2, dtype=np.float64).reshape(n_heads * head_dim, 2)
    expected = np.empty_like(hf)
    for head in range(n_heads):
        for i in range(head_dim):
            pos = 2 * i if i < head_dim // 2 else 2 * (i - head_dim // 2) + 1
            expected[head * head_dim + pos] = hf[head * head_dim + i]
    np.testing.assert_array_equal(hf_to_gguf_rows(hf, n_heads), expected)
    np.testing.assert_array_equal(gguf_to_hf_rows(expected, n_heads), hf)
    bias = hf[:, 0].copy()
    np.testing.assert_array_equal(gguf_to_hf_rows(hf_to_gguf_rows(bias, n_heads), n_heads), bias)
    with pytest.raises(ValueError):
        hf_to_gguf_rows(np.zeros((12, 2)), 4)  # heads of odd size 3


def test_gguf_and_safetensors_hold_the_same_weights_in_their_own_row_order(tiny: dict[str, Path]) -> None:
    gguf_source, hf_source = open_source(tiny["gguf"]), open_source(tiny["hf_file"])
    def attention_shape(source: ModelSource) -> tuple:
        g = source.geometry
        return g.n_layers, g.n_embd, g.head_count, g.head_count_kv, g.head_dim

    assert attention_shape(gguf_source) == attention_shape(hf_source)
    assert (gguf_source.file_format, hf_source.file_format) == ("gguf", "safetensors")
    raw = tm.read_gguf_weights(tiny["gguf"])
    for layer in range(CONFIG.n_layers):
        a = gguf_source.attention(layer, with_norm_gain=True)
        b = hf_source.attention(layer, with_norm_gain=True)
        np.testing.assert_array_equal(a.q, raw[f"blk.{layer}.attn_q.weight"])
        np.testing.assert_array_equal(a.q, hf_to_gguf_rows(b.q, CONFIG.n_head))
        np.testing.assert_array_equal(a.k, hf_to_gguf_rows(b.k, CONFIG.n_head_kv))
        np.testing.assert_array_equal(a.norm_gain, b.norm_gain)
        assert not np.array_equal(a.q, b.q)  # the layouts really differ


def test_per_head_query_key_products_are_invariant_under_the_rope_permutation(tiny: dict[str, Path]) -> None:
    gguf_source, hf_source = open_source(tiny["gguf"]), open_source(tiny["hf_file"])
    d, group = CONFIG.head_dim, CONFIG.n_head // CONFIG.n_head_kv
    for layer in range(CONFIG.n_layers):
        a, b = gguf_source.attention(layer), hf_source.attention(layer)
        for h in range(CONFIG.n_head):
            g = h // group
            q_rows, k_rows = slice(h * d, (h + 1) * d), slice(g * d, (g + 1) * d)
            product_gguf = a.q[q_rows].astype(np.float64).T @ a.k[k_rows].astype(np.float64)
            product_hf = b.q[q_rows].astype(np.float64).T @ b.k[k_rows].astype(np.float64)
            np.testing.assert_allclose(product_gguf, product_hf, rtol=1e-12, atol=1e-12)
            # Permuting only the query rows breaks the product: the check above can fail.
            shuffled = hf_to_gguf_rows(b.q, CONFIG.n_head)[q_rows].astype(np.float64).T @ b.k[k_rows].astype(np.float64)
            assert not np.allclose(shuffled, product_hf)


@pytest.mark.parametrize("layout", ["hf_index", "hf_folder"])
def test_sharded_safetensors_read_like_the_single_file(tiny: dict[str, Path], layout: str) -> None:
    single, sharded = SafetensorsCheckpoint(tiny["hf_file"]), SafetensorsCheckpoint(tiny[layout])
    assert len(sharded.paths) > 1
    assert sorted(single.names()) == sorted(sharded.names())
    reference = load_file(tiny["hf_file"])  # the upstream reader
    for name in single.names():
        np.testing.assert_array_equal(sharded.tensor(name), reference[name])
        np.testing.assert_array_equal(single.tensor(name), reference[name])


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.Q4_1])
def test_gguf_file_matches_the_upstream_reader(tmp_path: Path, qtype: GGMLQuantizationType) -> None:
    path = tm.write_llama_gguf(tmp_path / "m.gguf", tm.TinyConfig(n_layers=2), qtype=qtype)
    model, reader = GGUFFile(path), GGUFReader(path)
    assert model.tensor_names() == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        np.testing.assert_array_equal(model.tensor(tensor.name), dequantize(tensor.data, tensor.tensor_type))
    for key, field in reader.fields.items():
        assert model.value(key) == field.contents(), key
    assert model.architecture == "llama" and model.arch_value("block_count") == 2


def test_split_gguf_reads_like_the_single_file(tiny: dict[str, Path]) -> None:
    single, split = GGUFFile(tiny["gguf"]), GGUFFile(tiny["split"])
    assert len(split.paths) > 2
    assert sorted(single.tensor_names()) == sorted(split.tensor_names())
    for name in single.tensor_names():
        np.testing.assert_array_equal(split.tensor(name), single.tensor(name))
    last_part = open_source(split.paths[-1])  # any part of the set opens the whole set
    np.testing.assert_array_equal(last_part.attention(3).k, open_source(tiny["gguf"]).attention(3).k)


def test_f16_and_bf16_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    weights = {"a": rng.standard_normal((6, 10)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    tm.write_hf_checkpoint(tmp_path / "f16", weights, {}, dtype=np.float16)
    f16 = SafetensorsCheckpoint(tmp_path / "f16" / "model.safetensors")
    for name, values in weights.items():
        read = f16.tensor(name)
        assert read.dtype == np.float32
        np.testing.assert_array_equal(read, values.astype(np.float16).astype(np.float32))
    exact = tm.write_bf16_safetensors(tmp_path / "bf16.safetensors", weights)
    bf16 = SafetensorsCheckpoint(tmp_path / "bf16.safetensors")
    for name, values in weights.items():
        np.testing.assert_array_equal(bf16.tensor(name), exact[name])
        np.testing.assert_allclose(bf16.tensor(name), values, rtol=2**-7)  # truncation loses 16 mantissa bits


def test_quantized_gguf_is_dequantized_one_tensor_at_a_time(tmp_path: Path) -> None:
    path = tm.write_llama_gguf(tmp_path / "q8.gguf", CONFIG, qtype=GGMLQuantizationType.Q8_0)
    source = open_source(path)
    reader = GGUFReader(path)
    info = next(t for t in reader.tensors if t.name == "blk.2.attn_q.weight")
    assert info.tensor_type == GGMLQuantizationType.Q8_0
    float_weights = tm.random_gguf_weights(CONFIG)["blk.2.attn_q.weight"]
    q = source.attention(2).q
    np.testing.assert_allclose(q, float_weights, atol=np.abs(float_weights).max() / 100)
    assert not np.array_equal(q, float_weights)


@pytest.mark.parametrize(
    ("model_type", "arch", "interleaved", "norm_offset"),
    [
        ("llama", "llama", True, 0.0),
        ("mistral", "llama", True, 0.0),
        ("qwen2", "qwen2", False, 0.0),
        ("qwen3", "qwen3", False, 0.0),
        ("gemma3_text", "gemma3", False, 1.0),
    ],
)
def test_hf_architectures_map_to_gguf_names_and_geometry(
    tmp_path: Path, model_type: str, arch: str, interleaved: bool, norm_offset: float
) -> None:
    # head_dim given explicitly and different from width / heads, as in qwen3 and gemma3.
    config = tm.TinyConfig(n_layers=2, n_embd=48, n_head=4, n_head_kv=2)
    head_dim = 16
    rng = np.random.default_rng(2)
    weights = {}
    for i in range(config.n_layers):
        weights[f"model.layers.{i}.self_attn.q_proj.weight"] = rng.standard_normal((4 * head_dim, 48)).astype(np.float32)
        weights[f"model.layers.{i}.self_attn.k_proj.weight"] = rng.standard_normal((2 * head_dim, 48)).astype(np.float32)
        weights[f"model.layers.{i}.input_layernorm.weight"] = rng.standard_normal(48).astype(np.float32)
    tm.write_hf_checkpoint(tmp_path, weights, tm.hf_config(config, model_type, head_dim=head_dim))
    source = open_source(tmp_path)
    assert source.architecture.name == arch
    assert source.architecture.gguf_qk_interleaved is interleaved
    assert (source.n_head, source.n_head_kv, source.geometry.head_dim) == (4, 2, head_dim)
    layer = source.attention(1, with_norm_gain=True)
    np.testing.assert_array_equal(layer.q, weights["model.layers.1.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(layer.norm_gain, weights["model.layers.1.input_layernorm.weight"] + np.float32(norm_offset))
    assert source.architecture.attention_names(1) == ("blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_norm.weight")


def test_real_stories260k_geometry(stories260k: Path) -> None:
    source = open_source(stories260k)
    g = source.geometry
    assert (source.architecture.name, g.n_layers, g.n_embd, source.n_head, source.n_head_kv, g.head_dim) == ("llama", 5, 64, 8, 4, 8)
    assert g.head_count == (8,) * 5 and g.context_length == 2048 and g.rope_base == 10000.0


def test_library_errors_are_gatenorm_errors(tmp_path: Path) -> None:
    # The CLI tests cover the whole list through the command line; this checks the API raises the same type.
    with pytest.raises(GatenormError, match="no such file"):
        open_source(tmp_path / "absent.gguf")
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(GatenormError, match="runs past the end"):
        SafetensorsCheckpoint(tmp_path / "x.safetensors")
