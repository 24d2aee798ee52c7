"""Perplexity, KL divergence, KV bytes and bench of the llama.cpp harness, checked against independent computations;
and a Ctrl-C that comes while llama.cpp runs (loading, making a context, logging) is raised, never dropped.

The reference side uses llama-cpp-python's high-level ``Llama.eval`` with ``logits_all=True`` (every
position's raw logits) and NumPy float64 log-softmax, chunked as llama-perplexity chunks.
"""

from __future__ import annotations

import _thread
import contextlib
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from gatenorm_edge.harness.kld import kl_divergence
from gatenorm_edge.harness import model as model_module
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.perplexity import perplexity
from gatenorm_edge.harness.probe import StreamProbe
from gatenorm_edge.harness.speed import BenchSettings, _Runner, bench, peak_rss_bytes
from gatenorm_edge.harness.selfcal import sampled_text
from gatenorm_edge.rewrite import prune_gguf

SMOLLM2_PRUNED_LAYERS = [26, 27, 28, 29]  # any attention-free layers will do for these checks
STORIES_PRUNED_LAYERS = [3, 4]


@pytest.fixture(scope="session")
def smollm2_pruned(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "pruned.gguf"
    prune_gguf(smollm2, out, SMOLLM2_PRUNED_LAYERS)
    return out


@pytest.fixture(scope="session")
def stories_pruned(stories260k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stories") / "pruned.gguf"
    prune_gguf(stories260k, out, STORIES_PRUNED_LAYERS)
    return out


@pytest.fixture(scope="module")
def smollm2_reference(smollm2: Path, wikitext: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """SmolLM2's reference log-probs on the first 2 chunks of WikiText-2 test at ctx 512 (shared by two tests)."""
    return reference_logits(smollm2, wikitext, 512, 2)


def reference_logits(model: Path, text: Path, ctx: int, n_chunks: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per chunk: float64 log-probs of the scored positions and the target tokens, via Llama.eval(logits_all)."""
    content = text.read_bytes().decode("utf-8")
    content = content[:-1] if content.endswith("\n") else content
    llm = llama_cpp.Llama(str(model), n_ctx=ctx, n_batch=ctx, logits_all=True, flash_attn=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    add_bos = llama_cpp.llama_vocab_get_add_bos(vocab)
    tokens = llm.tokenize(content.encode("utf-8"), add_bos=True)
    first = ctx // 2
    log_probs, targets = [], []
    for index in range(n_chunks):
        chunk = tokens[index * ctx : (index + 1) * ctx]
        inputs = [llm.token_bos()] + chunk[1:] if add_bos else chunk
        llm.reset()
        llm.eval(inputs)
        logits = np.array(llm.scores[first : ctx - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs.append(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))
        targets.append(np.array(chunk[first + 1 : ctx]))
    llm.close()
    return log_probs, targets


def reference_ppl(log_probs: list[np.ndarray], targets: list[np.ndarray]) -> tuple[float, float, int]:
    nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in zip(log_probs, targets)])
    ppl = float(np.exp(nll.mean()))
    return ppl, ppl * float(np.sqrt(nll.var() / (nll.size - 1))), nll.size


@pytest.mark.slow
def test_perplexity_matches_numpy_on_smollm2_wikitext(smollm2: Path, wikitext: Path, smollm2_reference) -> None:
    ours = perplexity(smollm2, wikitext, ctx=512, chunks=2)
    ppl, stderr, count = reference_ppl(*smollm2_reference)
    assert ours.chunks == 2 and ours.tokens_scored == count == 2 * 255
    assert ours.ppl == pytest.approx(ppl, rel=1e-6)
    assert ours.ppl_stderr == pytest.approx(stderr, rel=1e-6)
    assert ours.flash_attn is True
    assert set(ours.to_dict()) >= {"model", "text", "ctx", "chunks", "tokens_scored", "ppl", "ppl_stderr", "seconds"}


@pytest.mark.slow
def test_perplexity_replaces_first_token_with_bos(stories260k: Path, tinystories: Path) -> None:
    """stories260K's vocab adds BOS, so each chunk starts with BOS (SmolLM2's does not)."""
    ours = perplexity(stories260k, tinystories, ctx=128, chunks=3)
    ppl, stderr, count = reference_ppl(*reference_logits(stories260k, tinystories, 128, 3))
    assert ours.tokens_scored == count == 3 * 63
    assert ours.ppl == pytest.approx(ppl, rel=1e-6)
    assert ours.ppl_stderr == pytest.approx(stderr, rel=1e-6)


@pytest.mark.slow
def test_kl_divergence_matches_numpy(smollm2: Path, smollm2_pruned: Path, wikitext: Path, smollm2_reference) -> None:
    ours = kl_divergence(smollm2, smollm2_pruned, wikitext, ctx=512, chunks=1)
    base_lp, targets = smollm2_reference[0][:1], smollm2_reference[1][:1]
    other_lp, _ = reference_logits(smollm2_pruned, wikitext, 512, 1)
    kld = np.concatenate([(np.exp(p) * (p - q)).sum(axis=1) for p, q in zip(base_lp, other_lp)])
    same = np.concatenate([p.argmax(axis=1) == q.argmax(axis=1) for p, q in zip(base_lp, other_lp)])
    assert ours.tokens == kld.size == 255
    assert ours.kld_mean == pytest.approx(kld.mean(), rel=1e-6)
    ordered, position = np.sort(kld), 0.99 * (kld.size - 1)  # llama-perplexity's percentile()
    low, frac = int(position), position - int(position)
    assert ours.kld_p99 == pytest.approx((1 - frac) * ordered[low] + frac * ordered[low + 1], rel=1e-6)
    assert ours.kld_max == pytest.approx(kld.max(), rel=1e-6)
    assert ours.top1_agreement == pytest.approx(same.mean())
    assert ours.kld_mean > 1e-3  # removing 4 attention sublayers changes the distributions
    assert ours.base.ppl == pytest.approx(reference_ppl(base_lp, targets)[0], rel=1e-6)
    assert ours.other.ppl == pytest.approx(reference_ppl(other_lp, targets)[0], rel=1e-6)


def test_kl_divergence_of_a_model_from_itself_is_zero(stories260k: Path, tinystories: Path) -> None:
    same = kl_divergence(stories260k, stories260k, tinystories, ctx=64, chunks=2)
    assert same.kld_mean == pytest.approx(0.0, abs=1e-9)
    assert same.top1_agreement == 1.0
    assert same.base.ppl == same.other.ppl


@pytest.mark.slow
def test_kv_bytes_match_llama_cpp_and_shrink_with_flash_attention(smollm2: Path, smollm2_pruned: Path) -> None:
    """SmolLM2: 30 layers x 3 KV heads x 64 dims, f16 K and V; pruned: 26 attention layers."""
    per_layer = 512 * 3 * 64 * 2  # bytes of K (or V) per layer for 512 cells
    expected = {
        (smollm2, True): 30 * 2 * per_layer,
        (smollm2, False): 30 * 2 * per_layer,
        (smollm2_pruned, True): 26 * 2 * per_layer,
        (smollm2_pruned, False): 26 * per_layer + 30 * per_layer,  # without FA every V is padded to the widest
    }
    for (path, flash_attn), kv_bytes in expected.items():
        model = open_model(path, n_ctx=512, flash_attn=flash_attn)
        try:
            assert model.kv_bytes == kv_bytes, (path.name, flash_attn)
        finally:
            model.close()


def test_bench_contract_on_stories260k(stories260k: Path, stories_pruned: Path) -> None:
    settings = BenchSettings(prompt=32, gen=8, depths=(0, 64), reps=2, threads=1)
    result = bench([stories260k, stories_pruned], settings).to_dict()  # the bench --json contract
    assert set(result) >= {"models", "depths", "pp_tps", "tg_tps", "ratios", "kv_bytes", "rss_bytes", "load_seconds"}
    base, pruned = result["models"]
    assert result["depths"] == [0, 64] and result["threads"] == 1 and result["flash_attn"] is True
    for kind in ("pp_tps", "tg_tps"):
        for model in (base, pruned):
            for depth in ("0", "64"):
                cell = result[kind][model][depth]
                assert len(cell["samples"]) == 2
                assert 0 < cell["min"] <= cell["median"] <= cell["max"]
    for kind in ("pp", "tg"):
        for depth in ("0", "64"):
            pairs = [p / b for p, b in zip(result[f"{kind}_tps"][pruned][depth]["samples"], result[f"{kind}_tps"][base][depth]["samples"])]
            assert result["ratios"][kind][depth] == pytest.approx(float(np.median(pairs)))
    # 5 layers x 4 KV heads x 8 dims x 2 bytes, K and V, 256 cells (96 rounded up); pruned keeps 3 layers
    assert result["kv_cells"][base] == 256
    assert result["kv_bytes"][base] == 5 * 256 * 32 * 2 * 2
    assert result["kv_bytes"][pruned] == 3 * 256 * 32 * 2 * 2
    for model in (base, pruned):
        assert 20 * 2**20 < result["rss_bytes"][model] < 2**31  # a Python process with llama.cpp loaded
        assert 0 < result["load_seconds"][model] < 60


def test_bench_processes_pool_every_sets_rounds(stories260k: Path, stories_pruned: Path) -> None:
    settings = BenchSettings(prompt=32, gen=8, depths=(0, 64), reps=2, processes=3, threads=1)
    result = bench([stories260k, stories_pruned], settings)
    assert result.processes == 3
    for kind in ("pp", "tg"):
        for model in result.models:
            assert all(len(result.tps(kind)[model][depth].samples) == 6 for depth in ("0", "64"))
    assert result.kv_bytes[str(stories_pruned)] == 3 * 256 * 32 * 2 * 2


def test_a_snapshot_from_an_earlier_worker_restores_the_same_cache(stories260k: Path, tmp_path: Path) -> None:
    """A later set of bench workers restores the first set's filled cache from disk instead of filling its own.

    The later runners draw other random tokens (seed 99): only the restored snapshot gives the first
    runner's next-token logits, and filling without it gives different ones."""

    def next_logits(seed: int, state_dir: Path | None) -> np.ndarray:
        model = open_model(stories260k, n_ctx=128, n_threads=1)
        try:
            _Runner(model, BenchSettings(prompt=8, gen=2, depths=(64,), threads=1, seed=seed), state_dir).fill(64)
            return model.logits([5], start=64)
        finally:
            model.close()

    first = next_logits(1234, tmp_path)
    assert (tmp_path / "depth64.state").is_file()
    np.testing.assert_array_equal(next_logits(99, tmp_path), first)
    assert np.abs(next_logits(99, None) - first).max() > 1e-3


@pytest.mark.slow
def test_bench_reports_each_workers_own_peak_rss(smollm2: Path, smollm2_pruned: Path) -> None:
    """A parent with 600 MiB resident spawns the workers: each reports its own peak, not the parent's."""
    ballast = np.ones(600 * 2**20 // 8)  # touched, so resident in the parent before the workers start
    parent = peak_rss_bytes()
    settings = BenchSettings(prompt=16, gen=4, depths=(0,), reps=1, threads=1)
    result = bench([smollm2, smollm2_pruned], settings)
    for path in (smollm2, smollm2_pruned):
        assert 20 * 2**20 < result.rss_bytes[str(path)] < parent - 400 * 2**20, path.name
    assert ballast.sum() == ballast.size


def test_sampled_text_is_reproducible(stories260k: Path) -> None:
    model = open_model(stories260k, n_ctx=128)
    try:
        first = sampled_text(model, 80, seed=7, segment=50)
        second = sampled_text(model, 80, seed=7, segment=50)
        other = sampled_text(model, 80, seed=8, segment=50)
        assert first == second != other
        assert len(model.tokenize_text(first)) >= 80
    finally:
        model.close()


class InterruptOnce(deque):
    """llama.cpp's in-memory log, with a Ctrl-C arriving as its next line is kept: Python runs the handler at
    its next bytecode, inside the ctypes log callback, as with a real Ctrl-C while llama.cpp loads or logs."""

    fired = False

    def append(self, line: str) -> None:
        if not self.fired:
            self.fired = True
            _thread.interrupt_main(signal.SIGINT)
        super().append(line)


@pytest.fixture
def arm_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to have a Ctrl-C arrive while llama.cpp logs its next line."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    return lambda: monkeypatch.setattr(model_module, "_log_chunks", InterruptOnce(maxlen=4000))


def test_ctrl_c_while_a_model_loads_is_raised_not_dropped(stories260k: Path, arm_ctrl_c: Callable[[], None]) -> None:
    arm_ctrl_c()
    with pytest.raises(KeyboardInterrupt):
        open_model(stories260k, n_ctx=64, n_threads=1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_while_a_probe_context_is_made_is_raised_not_dropped(
    stories260k: Path, arm_ctrl_c: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    llama_free = llama_cpp.llama_free
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        freed: list[object] = []
        monkeypatch.setattr(llama_cpp, "llama_free", lambda ctx: freed.append(ctx) or llama_free(ctx))
        arm_ctrl_c()
        with pytest.raises(KeyboardInterrupt):
            StreamProbe(model, 32)
        assert len(freed) == 1 and freed[0]  # the context made before the Ctrl-C was raised is not leaked


def test_ctrl_c_a_log_line_caught_between_native_calls_is_raised_at_the_next_ones_end(
    stories260k: Path, arm_ctrl_c: Callable[[], None]
) -> None:
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        arm_ctrl_c()
        model_module._keep_log(2, b"a line logged between native calls\n", None)  # through ctypes, as llama.cpp calls it
        with pytest.raises(KeyboardInterrupt):
            model.logits([1, 2, 3])
        model.clear()
        assert len(model.logits([1, 2, 3])) == 1  # raised once
