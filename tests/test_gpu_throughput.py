"""tools/gpu_throughput.py: the --tiny CPU run, correctness of attention removal and of the KV cache,
and the analytical FLOP/byte model against a hand count."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed (tools/gpu_throughput.py needs it: pip install torch)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_throughput.py"

# the --tiny shape, written out independently of the script
L, D, H, KV, HD, FFN, VOCAB = 6, 128, 4, 2, 32, 352, 512
F32 = 4  # bytes per float32 element


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_throughput"] = module
    spec.loader.exec_module(module)
    return module


tool = load_tool()


@pytest.fixture(autouse=True)
def one_thread():  # tiny tensors: more threads only add contention on a shared CI machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu") / "tiny.json"
    proc = run_tool("--tiny", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


# ----------------------------------------------------------------------------- the --tiny run


def test_tiny_run_structure_and_table(tiny_run: tuple[dict, str]) -> None:
    report, stdout = tiny_run
    assert report["model"] | {"source": None} == {"source": None, "n_layers": L, "dim": D, "n_heads": H,
                                                  "n_kv_heads": KV, "ffn": FFN, "vocab": VOCAB, "head_dim": HD}
    assert report["device"].startswith("cpu") and report["dtype"] == "float32"
    assert [c["removed"] for c in report["configs"]] == [0, 1, 2, 3]
    assert [c["layers"] for c in report["configs"]] == [[], [5], [4, 5], [3, 4, 5]]  # default: the last layers
    cells = {(c["phase"], c["batch"], c["prompt"], c["removed"]) for c in report["results"]}
    assert cells == {(p, b, n, k) for p in ("prefill", "decode") for b in (1, 2) for n in (16, 32)
                     for k in (0, 1, 2, 3)}
    for c in report["results"]:
        assert c["status"] == "ok" and c["gen"] == 8
        assert len(c["seconds"]) == 3 and all(s > 0 for s in c["seconds"])
        tokens = c["batch"] * (c["prompt"] if c["phase"] == "prefill" else c["gen"])
        assert c["tokens_per_s"] == pytest.approx(tokens / sorted(c["seconds"])[1])
        assert c["speedup"] > 0
        if c["removed"] == 0:
            assert c["speedup"] == 1.0 and c["expected"]["flops_saved"] == 0 == c["expected"]["bytes_saved"]
    assert "| batch | prompt | removed | tokens/s | speedup | FLOPs saved | bytes saved | ideal speedup |" in stdout
    assert stdout.count("\n| 2 | 32 | 3 |") == 2  # one row per phase


def test_tiny_run_has_no_kv_cache_for_removed_layers(tiny_run: tuple[dict, str]) -> None:
    report, _ = tiny_run
    for config in report["configs"]:
        assert config["attention_layers"] == [i for i in range(L) if i not in config["layers"]]
    for c in report["results"]:
        kept = [i for i in range(L) if i not in c["layers"]]
        assert c["kv_cache_layers"] == kept
        assert c["kv_cache_bytes"] == len(kept) * 2 * c["batch"] * (c["prompt"] + c["gen"]) * KV * HD * F32


def hand_count(removed: int, batch: int, prompt: int, gen: int) -> dict[str, tuple[int, int]]:
    """(FLOPs, bytes) per phase, counted token by token and tensor by tensor."""
    attn_tensors = [D, H * HD * D, KV * HD * D, KV * HD * D, D * H * HD]  # norm, q, k, v, o
    ffn_tensors = [D, FFN * D, FFN * D, D * FFN]  # norm, gate, up, down
    kept = L - removed

    def weights(tokens: int) -> int:  # elements read by one forward over `tokens` new tokens
        return kept * sum(attn_tensors) + L * sum(ffn_tensors) + D + VOCAB * D + tokens * D

    def token_flops(keys: int) -> int:  # one token through every layer
        ffn = 2 * D * FFN * 3
        attn = 2 * D * H * HD + 2 * 2 * D * KV * HD + 2 * H * HD * D + H * (2 * HD * keys + 2 * keys * HD)
        return L * ffn + kept * attn

    kv_token = 2 * KV * HD  # elements of one token's K and V in one layer
    prefill_flops = batch * (sum(token_flops(p + 1) for p in range(prompt)) + 2 * D * VOCAB)
    prefill_bytes = F32 * (weights(batch * prompt) + kept * batch * prompt * kv_token)
    decode_flops = decode_bytes = 0
    for t in range(gen):
        keys = prompt + t + 1
        decode_flops += batch * (token_flops(keys) + 2 * D * VOCAB)
        decode_bytes += F32 * (weights(batch) + kept * batch * (keys + 1) * kv_token)  # read all, write one
    return {"prefill": (prefill_flops, prefill_bytes), "decode": (decode_flops, decode_bytes)}


def test_tiny_run_analytical_fractions_match_hand_count(tiny_run: tuple[dict, str]) -> None:
    report, _ = tiny_run
    for c in report["results"]:
        full = hand_count(0, c["batch"], c["prompt"], c["gen"])[c["phase"]]
        pruned = hand_count(c["removed"], c["batch"], c["prompt"], c["gen"])[c["phase"]]
        e = c["expected"]
        assert (e["flops"], e["bytes"]) == pruned
        assert e["flops_saved"] == pytest.approx(1 - pruned[0] / full[0], rel=1e-12)
        assert e["bytes_saved"] == pytest.approx(1 - pruned[1] / full[1], rel=1e-12)
        bound = full[0] / pruned[0] if c["phase"] == "prefill" else full[1] / pruned[1]
        assert e["ideal_speedup"] == pytest.approx(bound, rel=1e-12)


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    run_once = tool.run_once

    def full_model_fails_at_batch_2(model, batch, prompt, gen, seed):
        if batch == 2 and len(model.attention_layers) == L:
            raise torch.cuda.OutOfMemoryError("simulated")
        return run_once(model, batch, prompt, gen, seed)

    monkeypatch.setattr(tool, "run_once", full_model_fails_at_batch_2)
    out = tmp_path / "oom.json"
    assert tool.main([*QUICK, "--batch", "1,2", "--count", "2", "--json", str(out)]) == 0
    assert "| 2 | 8 | 0 | oom | – |" in capsys.readouterr().out
    cells = {(c["phase"], c["batch"], c["removed"]): c for c in json.loads(out.read_text())["results"]}
    for phase in ("prefill", "decode"):
        assert cells[(phase, 2, 0)]["status"] == "oom" and cells[(phase, 2, 0)]["speedup"] is None
        assert cells[(phase, 2, 2)]["status"] == "ok" and cells[(phase, 2, 2)]["speedup"] is None
        assert cells[(phase, 2, 2)]["tokens_per_s"] > 0 and cells[(phase, 1, 2)]["speedup"] > 0


# ----------------------------------------------------------------------------- the model itself


@pytest.fixture(scope="module")
def model():  # tiny decoder with random norm weights and q/k/v biases, so every weight matters
    base = tool.random_decoder(tool.TINY, torch.device("cpu"), torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)

    def rnd(n: int) -> torch.Tensor:
        return 1 + 0.2 * torch.randn(n, generator=g)

    blocks = [dataclasses.replace(b, ffn_norm=rnd(D), attn=dataclasses.replace(
        b.attn, norm=rnd(D), bq=0.1 * torch.randn(H * HD, generator=g), bk=0.1 * torch.randn(KV * HD, generator=g),
        bv=0.1 * torch.randn(KV * HD, generator=g))) for b in base.blocks]
    return tool.Decoder(base.shape, base.embed, blocks, rnd(D), base.lm_head)


def reference_logits(model, tokens: list[int], skip: set[int]) -> np.ndarray:
    """Dense float64 NumPy forward pass of one sequence, attention of `skip` layers left out."""
    a = lambda t: None if t is None else t.detach().double().numpy()  # noqa: E731
    n, eps = len(tokens), model.shape.norm_eps
    angles = np.outer(np.arange(n), model.shape.rope_theta ** (-np.arange(0, HD, 2) / HD))
    cos, sin = np.cos(angles), np.sin(angles)

    def norm(x: np.ndarray, w: torch.Tensor) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * a(w)

    def rope(x: np.ndarray) -> np.ndarray:  # heads x n x HD, half-split pairs (i, i + HD/2)
        x1, x2 = x[..., :HD // 2], x[..., HD // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    x = a(model.embed)[tokens]
    for i, b in enumerate(model.blocks):
        if i not in skip:
            at = b.attn
            h = norm(x, at.norm)
            q = rope((h @ a(at.wq).T + a(at.bq)).reshape(n, H, HD).transpose(1, 0, 2))
            k = rope((h @ a(at.wk).T + a(at.bk)).reshape(n, KV, HD).transpose(1, 0, 2))
            v = (h @ a(at.wv).T + a(at.bv)).reshape(n, KV, HD).transpose(1, 0, 2)
            heads = []
            for head in range(H):
                g = head // (H // KV)
                s = q[head] @ k[g].T / math.sqrt(HD)
                s[np.triu_indices(n, 1)] = -np.inf
                p = np.exp(s - s.max(-1, keepdims=True))
                heads.append(p / p.sum(-1, keepdims=True) @ v[g])
            x = x + np.concatenate(heads, axis=-1) @ a(at.wo).T
        h = norm(x, b.ffn_norm)
        gate = h @ a(b.w_gate).T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ a(b.w_up).T)) @ a(b.w_down).T
    return norm(x, model.norm) @ a(model.lm_head).T


TOKENS = [[5, 17, 300, 2, 99, 511, 0, 42, 7, 7, 128, 64, 3, 250, 19, 1, 400, 8, 77, 31],
          [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.mark.parametrize("removed", [[], [2, 5], [1, 3, 4]])
def test_forward_matches_float64_reference(model, removed: list[int]) -> None:
    logits = model.without_attention(removed).forward(torch.tensor(TOKENS))
    for row, tokens in enumerate(TOKENS):
        np.testing.assert_allclose(logits[row].numpy(), reference_logits(model, tokens, set(removed)),
                                   rtol=1e-4, atol=1e-4)


def test_pruned_forward_equals_forward_with_zeroed_attention_output(model) -> None:
    removed = {1, 4, 5}
    zeroed = tool.Decoder(model.shape, model.embed, [
        dataclasses.replace(b, attn=dataclasses.replace(b.attn, wo=torch.zeros_like(b.attn.wo))) if i in removed
        else b for i, b in enumerate(model.blocks)], model.norm, model.lm_head)
    tokens = torch.tensor(TOKENS)
    pruned = model.without_attention(sorted(removed)).forward(tokens)
    torch.testing.assert_close(pruned, zeroed.forward(tokens), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(pruned, model.forward(tokens), atol=1e-3)  # the removal changes the output


@pytest.mark.parametrize("removed", [[], [2, 3, 5]])
def test_kv_cached_decode_equals_full_recompute(model, removed: list[int]) -> None:
    m = model.without_attention(removed)
    tokens = torch.tensor(TOKENS)
    full = m.forward(tokens)
    cache = m.new_cache(batch=2, max_len=20)
    assert cache.layers == [i for i in range(L) if i not in removed]
    steps = [m.forward(tokens[:, :9], cache, last_only=True)]
    steps.append(m.forward(tokens[:, 9:12], cache))  # a chunk after cached tokens: explicit causal mask
    steps += [m.forward(tokens[:, t:t + 1], cache) for t in range(12, 20)]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], rtol=1e-5, atol=1e-5)


def test_gate_norm_scores_match_dense_products(model) -> None:
    scores = tool.gate_norm_scores(model)
    for b, score in zip(model.blocks, scores, strict=True):
        wq = b.attn.wq.double().numpy().reshape(H, HD, D)
        wk = b.attn.wk.double().numpy().reshape(KV, HD, D)
        dense = sum(np.linalg.norm(wq[h].T @ wk[h // (H // KV)]) ** 2 for h in range(H))  # D x D products
        assert score == pytest.approx(math.sqrt(dense), rel=1e-5)


# ----------------------------------------------------------------------------- choosing layers, bad input


def test_positional_layer_choice() -> None:
    assert tool.positional_layers("last", 8, 40) == list(range(32, 40))
    assert tool.positional_layers("spread", 8, 40) == [5, 10, 15, 19, 24, 29, 34, 39]
    for k in range(1, 40):
        spread = tool.positional_layers("spread", k, 40)
        assert len(spread) == k and 0 not in spread and spread[-1] == 39


QUICK = ("--tiny", "--batch", "1", "--prompt", "8", "--gen", "2", "--warmup", "0", "--repeats", "1")


def test_plan_and_gatenorm_choose_layers(tmp_path: Path, model) -> None:
    plan = tmp_path / "score.json"
    plan.write_text(json.dumps({"n_layers": L, "prune_order": [3, 1, 5, 2, 4]}))
    out = tmp_path / "plan.json"
    assert tool.main([*QUICK, "--plan", str(plan), "--json", str(out)]) == 0
    assert [c["layers"] for c in json.loads(out.read_text())["configs"]] == [[], [3], [1, 3], [1, 3, 5]]
    out = tmp_path / "gn.json"
    assert tool.main([*QUICK, "--order", "gatenorm", "--count", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    scores = tool.gate_norm_scores(tool.random_decoder(tool.TINY, torch.device("cpu"), torch.float32, seed=0))
    assert report["selection"]["scores"] == pytest.approx(scores, rel=1e-6)
    lowest = sorted(range(1, L), key=lambda i: scores[i])[:2]
    assert [c["layers"] for c in report["configs"]] == [[], sorted(lowest)]


@pytest.mark.parametrize("args, message", [
    (("--layers", "0,3"), "--layers: layer 0 cannot be made attention-free"),
    (("--layers", "2,9"), "--layers: layer 9 out of range 1..5"),
    (("--layers", "2,2"), "--layers: layer listed twice"),
    (("--count", "6"), "--count 6: must be between 1 and 5"),
    (("--gen", "0"), "--batch, --prompt, --gen and --repeats must be positive"),
    (("--json", "/nonexistent/out.json"), "--json /nonexistent/out.json: folder does not exist"),
    (("--hf-model", "/nonexistent"), "--hf-model /nonexistent: not a Hugging Face model folder"),
])
def test_bad_input_is_refused(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(tool.UsageError, match=re.escape(message)):
        tool.main([*QUICK, *args])


@pytest.mark.parametrize("content, message", [
    (json.dumps({"prune_order": [0, 2]}), "layer 0 cannot be made attention-free"),
    (json.dumps({"layers": []}), "no 'prune_order' list of layer indices"),
    (json.dumps({"n_layers": 40, "prune_order": [1]}), "plan is for 40 layers, the model has 6"),
    (json.dumps({"prune_order": [1, 2]}), "prune_order lists 2 layers, --count asks 3"),
    ("{not json", "cannot read score JSON"),
])
def test_bad_plan_is_refused(tmp_path: Path, content: str, message: str) -> None:
    plan = tmp_path / "score.json"
    plan.write_text(content)
    with pytest.raises(tool.UsageError, match=re.escape(message)):
        tool.main([*QUICK, "--plan", str(plan)])


def test_cli_error_is_one_line_exit_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = run_tool(*QUICK, "--layers", "0", "--json", str(out))
    assert proc.returncode == 2 and proc.stdout == "" and not out.exists()
    assert proc.stderr == "error: --layers: layer 0 cannot be made attention-free\n"


def test_hf_model_without_transformers_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(tool.UsageError, match="needs the transformers package"):
        tool.main([*QUICK, "--hf-model", str(tmp_path)])


# ----------------------------------------------------------------------------- a real HF checkpoint


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_checkpoint_logits_match_transformers(tmp_path: Path, arch: str) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (optional for --hf-model)")
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=arch == "qwen2")
    config = transformers.LlamaConfig(**shape, rope_theta=5e5) if arch == "llama" else transformers.Qwen2Config(**shape)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # make norms and biases non-trivial
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = tool.hf_decoder(tmp_path, torch.device("cpu"), torch.float32)
    assert (model.blocks[0].attn.bq is not None) == (arch == "qwen2")
    tokens = torch.randint(300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(model.forward(tokens), expected, rtol=1e-5, atol=1e-5)
    out = tmp_path / "run.json"
    tool.main(["--hf-model", str(tmp_path), "--device", "cpu", "--count", "1,2", "--batch", "1", "--prompt", "8",
               "--gen", "2", "--warmup", "0", "--repeats", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["selection"]["method"] == "gatenorm"  # the default order for a real checkpoint
    order = report["selection"]["prune_order"]
    assert [c["layers"] for c in report["configs"]] == [[], order[:1], sorted(order[:2])]


HF_CONFIGS = [
    {"num_hidden_layers": 40, "hidden_size": 5120, "num_attention_heads": 40},  # LLaMA-2-13B: MHA
    {"num_hidden_layers": 28, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2},  # qwen2.5-1.5b
    {"num_hidden_layers": 36, "hidden_size": 2560, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
]


@pytest.mark.parametrize("config", HF_CONFIGS)
def test_the_standalone_shape_reads_configs_as_the_package_does(config: dict) -> None:
    """The GPU script stays free of the package; its reading of an HF config must equal ModelGeometry's."""
    from types import SimpleNamespace

    from gatenorm_edge.sources.geometry import ModelGeometry

    extra = {"intermediate_size": 4 * config["hidden_size"], "vocab_size": 32000, "rms_norm_eps": 1e-5}
    shape = tool.shape_from_hf_config(SimpleNamespace(**{"num_key_value_heads": None, "head_dim": None, **config, **extra}))
    geometry = ModelGeometry.from_hf_config(config, "llama", "config.json")
    assert (shape.n_layers, shape.dim, shape.n_heads, shape.n_kv_heads, shape.hd) == (
        geometry.n_layers, geometry.n_embd, geometry.head_count[0], geometry.head_count_kv[0], geometry.head_dim
    )
    assert (shape.q_dim, shape.kv_dim) == (geometry.head_count[0] * geometry.head_dim, geometry.head_count_kv[0] * geometry.head_dim)
