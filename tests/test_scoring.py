"""Gate-Norm variants against a dense float64 reference; GGUF vs safetensors; split/sharded; the report contract."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

import tiny_models as tm
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.report import write_json
from gatenorm_edge.scoring import VARIANTS, ScoreReport, _widen_float16, full_score, per_head_score, score_layer, score_model
from gatenorm_edge.sources import open_source
from gatenorm_edge.sources.rope_layout import hf_to_gguf_rows

CONFIG = tm.TinyConfig()


def dense_head_products(q: np.ndarray, k: np.ndarray, n_head: int, n_head_kv: int, gain: np.ndarray | None = None) -> list[np.ndarray]:
    """Each head's width x width coupling Q_h^T K_g in float64; the gain, if any, scales inputs on both sides."""
    q, k = q.astype(np.float64), k.astype(np.float64)
    head_dim = q.shape[0] // n_head
    products = []
    for h in range(n_head):
        g = h * n_head_kv // n_head  # query head h reads KV head g (KV heads repeated consecutively)
        product = q[h * head_dim : (h + 1) * head_dim].T @ k[g * head_dim : (g + 1) * head_dim]
        if gain is not None:
            product = gain[:, None].astype(np.float64) * product * gain[None, :].astype(np.float64)
        products.append(product)
    return products


def reference_score(q: np.ndarray, k: np.ndarray, n_head: int, n_head_kv: int, variant: str, gain: np.ndarray | None) -> float:
    products = dense_head_products(q, k, n_head, n_head_kv, gain if variant == "folded" else None)
    if variant == "full":
        return float(np.linalg.norm(sum(products)))
    return float(np.sqrt(sum(np.sum(p * p) for p in products)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_scoring")
    gguf_path = tm.write_llama_gguf(root / "tiny.gguf", CONFIG, seed=7)
    (root / "split").mkdir()
    hf = tm.gguf_to_hf_weights(gguf_path, CONFIG)
    return {
        "gguf": gguf_path,
        "split": tm.write_llama_gguf(root / "split" / "tiny.gguf", CONFIG, seed=7, split_max_tensors=9),
        "hf_file": tm.write_hf_checkpoint(root / "hf_single", hf, tm.hf_config(CONFIG)),
        "hf_index": tm.write_hf_checkpoint(root / "hf_index", hf, tm.hf_config(CONFIG), shards=3),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_equals_the_dense_float64_reference(tiny: dict[str, Path], variant: str) -> None:
    weights = tm.read_gguf_weights(tiny["gguf"])
    report = score_model(tiny["gguf"], variant)
    assert report.variant == variant and report.n_layers == CONFIG.n_layers and report.architecture == "llama"
    for entry in report.layers:
        i = entry.layer
        expected = reference_score(
            weights[f"blk.{i}.attn_q.weight"],
            weights[f"blk.{i}.attn_k.weight"],
            CONFIG.n_head,
            CONFIG.n_head_kv,
            variant,
            weights[f"blk.{i}.attn_norm.weight"],
        )
        assert entry.score == pytest.approx(expected, rel=1e-5)


def test_variants_really_differ(tiny: dict[str, Path]) -> None:
    scores = {v: [e.score for e in score_model(tiny["gguf"], v).layers] for v in VARIANTS}
    assert not np.allclose(scores["per-head"], scores["full"], rtol=1e-3)
    assert not np.allclose(scores["per-head"], scores["folded"], rtol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("other", ["hf_file", "hf_index", "split"])
def test_gguf_safetensors_split_and_shards_give_the_same_scores(tiny: dict[str, Path], variant: str, other: str) -> None:
    reference = [e.score for e in score_model(tiny["gguf"], variant).layers]
    scores = [e.score for e in score_model(tiny[other], variant).layers]
    np.testing.assert_allclose(scores, reference, rtol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float16_checkpoints_score_like_their_float32_values(tiny: dict[str, Path], tmp_path: Path, variant: str) -> None:
    # F16 Q/K stay float16 until each head is widened inside the scorer: same result as widening first.
    hf = tm.gguf_to_hf_weights(tiny["gguf"], CONFIG)

    def rounded(matrices_only: bool) -> dict[str, np.ndarray]:
        return {n: v.astype(np.float16).astype(np.float32) if v.ndim == 2 or not matrices_only else v for n, v in hf.items()}

    tm.write_hf_checkpoint(tmp_path / "f16", hf, tm.hf_config(CONFIG), dtype=np.float16)
    tm.write_hf_checkpoint(tmp_path / "f32", rounded(matrices_only=False), tm.hf_config(CONFIG))
    # GGUF keeps norm vectors in F32, as llama.cpp's converter does.
    tm.write_hf_checkpoint(tmp_path / "f32_gguf_like", rounded(matrices_only=True), tm.hf_config(CONFIG))
    gguf_f16 = tm.write_llama_gguf(tmp_path / "f16.gguf", CONFIG, seed=7, qtype=GGMLQuantizationType.F16)
    for model, reference in ((tmp_path / "f16", tmp_path / "f32"), (gguf_f16, tmp_path / "f32_gguf_like")):
        expected = [e.score for e in score_model(reference, variant).layers]
        np.testing.assert_allclose([e.score for e in score_model(model, variant).layers], expected, rtol=1e-6)
    assert open_source(gguf_f16).attention(1).q.dtype == np.float16


def test_float16_widening_is_exact_for_every_finite_value() -> None:
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    widened = np.empty(every.shape, dtype=np.float32)
    _widen_float16(every, widened)
    exact = every.astype(np.float32)
    finite = np.isfinite(exact)
    assert finite.sum() == 2**16 - 2 * 1024  # Inf and NaN: exponent all ones, 1024 mantissas, two signs
    np.testing.assert_array_equal(widened[finite].view(np.uint32), exact[finite].view(np.uint32))
    assert np.all(np.abs(widened[~finite]) >= 65536)  # what the scorer's fallback detects


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan, 60000.0])
def test_float16_heads_with_inf_nan_or_huge_values_score_like_float32(special: float) -> None:
    rng = np.random.default_rng(8)
    n_head, head_dim, width = 4, 8, 64
    q = rng.standard_normal((n_head * head_dim, width)).astype(np.float16)
    k = rng.standard_normal((n_head * head_dim, width)).astype(np.float16)
    q[head_dim + 3, 5:7] = special  # two 60000s: a finite row whose square sum passes 2**32
    got = per_head_score(q, k, n_head, n_head)
    expected = per_head_score(q.astype(np.float32), k.astype(np.float32), n_head, n_head)
    if np.isnan(expected) or np.isinf(expected):
        assert np.isnan(expected) == np.isnan(got) and np.isinf(expected) == np.isinf(got)
    else:
        assert got == pytest.approx(expected, rel=1e-6)


def test_grouped_query_heads_read_consecutive_kv_heads() -> None:
    rng = np.random.default_rng(3)
    n_head, n_head_kv, head_dim, width = 4, 2, 4, 16
    q = rng.standard_normal((n_head * head_dim, width))
    k = rng.standard_normal((n_head_kv * head_dim, width))
    only_second_group = q.copy()
    only_second_group[: 2 * head_dim] = 0  # heads 0 and 1 silenced: only heads 2, 3 (KV head 1) remain
    k_without_first = k.copy()
    k_without_first[:head_dim] = 0
    assert per_head_score(only_second_group, k_without_first, n_head, n_head_kv) == pytest.approx(
        per_head_score(only_second_group, k, n_head, n_head_kv)
    )
    q_first_group = q.copy()
    q_first_group[2 * head_dim :] = 0
    assert per_head_score(q_first_group, k_without_first, n_head, n_head_kv) == 0.0
    assert full_score(q_first_group, k_without_first, n_head, n_head_kv) == 0.0


def test_scores_are_invariant_to_a_shared_row_permutation_but_not_to_a_query_only_one() -> None:
    rng = np.random.default_rng(4)
    n_head, n_head_kv, head_dim, width = 6, 3, 8, 48
    q = rng.standard_normal((n_head * head_dim, width)).astype(np.float32)
    k = rng.standard_normal((n_head_kv * head_dim, width)).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, width).astype(np.float32)
    q_perm, k_perm = hf_to_gguf_rows(q, n_head), hf_to_gguf_rows(k, n_head_kv)
    for variant in VARIANTS:
        before = score_layer(q, k, n_head, n_head_kv, variant, gain)
        assert score_layer(q_perm, k_perm, n_head, n_head_kv, variant, gain) == pytest.approx(before, rel=1e-5)
        assert score_layer(q_perm, k, n_head, n_head_kv, variant, gain) != pytest.approx(before, rel=1e-3)


def test_per_head_never_forms_a_width_by_width_product() -> None:
    rng = np.random.default_rng(5)
    width, n_head, n_head_kv = 2048, 16, 4
    q = rng.standard_normal((width, width), dtype=np.float32)
    k = rng.standard_normal((width // 4, width), dtype=np.float32)
    square_bytes = width * width * 4
    peaks = {}
    for name, function in (("per-head", per_head_score), ("full", full_score)):
        tracemalloc.start()
        function(q, k, n_head, n_head_kv)
        peaks[name] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks["full"] >= square_bytes  # the measurement sees a width x width array when there is one
    assert peaks["per-head"] < square_bytes / 16


def test_prune_order_is_lowest_first_without_layer_zero(tiny: dict[str, Path]) -> None:
    report = score_model(tiny["gguf"])
    scores = {e.layer: e.score for e in report.layers}
    assert sorted(report.prune_order) == list(range(1, CONFIG.n_layers))
    assert [scores[i] for i in report.prune_order] == sorted(scores[i] for i in range(1, CONFIG.n_layers))


def test_report_json_contract_round_trips(tiny: dict[str, Path], tmp_path: Path) -> None:
    report = score_model(tiny["gguf"], "folded")
    data = report.to_dict()
    assert list(data) == ["model", "architecture", "n_layers", "variant", "seconds", "layers", "prune_order"]
    assert all(list(entry) == ["layer", "score"] for entry in data["layers"])
    path = tmp_path / "scores.json"
    write_json(path, report)
    assert ScoreReport.from_json(path) == report


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("layers"), "missing layers"),
        (lambda d: d.update(variant="cosine"), "variant"),
        (lambda d: d.update(n_layers=0), "n_layers"),
        (lambda d: d["layers"].pop(), "layers 0..3"),
        (lambda d: d["layers"][1].update(score="high"), "layers must be"),
        (lambda d: d["prune_order"].append(0), "prune_order"),
        (lambda d: d["prune_order"].append(d["prune_order"][0]), "prune_order"),
        (lambda d: d.update(seconds=-1), "seconds"),
    ],
)
def test_report_from_json_rejects_bad_reports(tiny: dict[str, Path], tmp_path: Path, change, message: str) -> None:
    data = score_model(tiny["gguf"]).to_dict()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(GatenormError, match=message):
        ScoreReport.from_json(path)


def test_report_from_json_rejects_non_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(GatenormError, match="not valid JSON"):
        ScoreReport.from_json(path)
    with pytest.raises(GatenormError, match="no such file"):
        ScoreReport.from_json(tmp_path / "absent.json")


def test_real_stories260k_matches_the_reference(stories260k: Path) -> None:
    reader = GGUFReader(stories260k)
    weights = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}
    for variant in VARIANTS:
        report = score_model(stories260k, variant)
        for entry in report.layers:
            i = entry.layer
            expected = reference_score(
                weights[f"blk.{i}.attn_q.weight"], weights[f"blk.{i}.attn_k.weight"], 8, 4, variant, weights[f"blk.{i}.attn_norm.weight"]
            )
            assert entry.score == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("model", "expected"),
    [("qwen05", ("qwen2", 24, 896, 14, 2, 64)), ("gemma3", ("gemma3", 18, 640, 4, 1, 256))],
)
def test_real_qwen2_and_gemma3_match_the_reference(request: pytest.FixtureRequest, model: str, expected: tuple) -> None:
    path = request.getfixturevalue(model)
    source = open_source(path)
    g = source.geometry
    assert (source.architecture.name, g.n_layers, g.n_embd, source.n_head, source.n_head_kv, g.head_dim) == expected
    for layer in (1, g.n_layers - 1):
        attention = source.attention(layer, with_norm_gain=True)
        for variant in VARIANTS:
            expected_score = reference_score(attention.q, attention.k, source.n_head, source.n_head_kv, variant, attention.norm_gain)
            assert score_layer(attention.q, attention.k, source.n_head, source.n_head_kv, variant, attention.norm_gain) == pytest.approx(
                expected_score, rel=1e-5
            )
    report = score_model(path)
    assert report.n_layers == g.n_layers and len(report.prune_order) == g.n_layers - 1
