"""prune/inspect: the deci rewrite is byte-exact where it should be, loads in llama.cpp, and refuses cleanly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from gatenorm_edge.errors import GatenormError
from gatenorm_edge.gguf_layout import GGUFLayout
from gatenorm_edge.inspection import attention_free_layers, inspect_gguf
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.rewrite_plan import ATTENTION_TENSORS
from cli_helpers import assert_one_line_error, llama_cpp_logits, run_cli, run_cli_here

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fields(path: Path) -> dict[str, tuple[list, object]]:
    """Every metadata field of a GGUF as (types, contents), read with the upstream gguf reader."""
    reader = GGUFReader(path)
    return {k: (f.types, f.contents()) for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ----------------------------------------------------------------------------------------------
# structure, read back with the upstream gguf package (an independent reader)


def test_pruned_file_structure_is_exact(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.gguf"
    result = prune_gguf(stories260k, out, [2, 3], provenance={"variant": "per-head"})
    src, dst = GGUFReader(stories260k), GGUFReader(out)
    src_fields, dst_fields = fields(stories260k), fields(out)

    assert dst_fields["general.architecture"][1] == "deci"
    assert dst_fields["deci.attention.head_count"][1] == [8, 8, 0, 0, 8]
    assert dst_fields["deci.attention.head_count_kv"][1] == [4, 4, 0, 0, 4]
    assert dst_fields["gatenorm.pruned_layers"][1] == [2, 3]
    assert dst_fields["gatenorm.variant"][1] == "per-head"
    assert dst_fields["gatenorm.source.name"][1] == stories260k.name
    assert dst_fields["gatenorm.source.sha256"][1] == sha256(stories260k)
    for key, (types, contents) in src_fields.items():
        if key.startswith("llama."):
            new_key = "deci." + key[len("llama."):]
            if not new_key.startswith("deci.attention.head_count"):
                assert dst_fields[new_key] == (types, contents), key
        elif key != "general.architecture":
            assert dst_fields[key] == (types, contents), key  # tokenizer and general.* exactly as they were
    assert not any(key.startswith("llama.") for key in dst_fields)

    dropped = {f"blk.{layer}.{suffix}" for layer in (2, 3) for suffix in ATTENTION_TENSORS}
    src_tensors = {t.name: t for t in src.tensors}
    dst_tensors = {t.name: t for t in dst.tensors}
    assert set(dst_tensors) == set(src_tensors) - dropped
    assert sorted(result.dropped_tensors) == sorted(set(src_tensors) & dropped)
    for name, tensor in dst_tensors.items():
        original = src_tensors[name]
        assert tensor.tensor_type == original.tensor_type and list(tensor.shape) == list(original.shape)
        assert tensor.data.tobytes() == original.data.tobytes(), name
        assert tensor.data_offset % dst.alignment == 0

    dropped_bytes = sum(src_tensors[name].n_bytes for name in result.dropped_tensors)
    assert result.dropped_bytes == dropped_bytes
    header_delta = dst.data_offset - src.data_offset
    padding_slack = dst.alignment * len(result.dropped_tensors)
    assert abs((stories260k.stat().st_size - out.stat().st_size) - (dropped_bytes - header_delta)) <= padding_slack
    assert attention_free_layers(out) == [2, 3]


def test_reprune_is_union_of_layers(stories260k: Path, tmp_path: Path) -> None:
    once = tmp_path / "once.gguf"
    twice = tmp_path / "twice.gguf"
    direct = tmp_path / "direct.gguf"
    prune_gguf(stories260k, once, [2])
    result = prune_gguf(once, twice, [3])
    prune_gguf(stories260k, direct, [2, 3])
    assert result.layers_pruned == [2, 3] and result.layers_requested == [3]
    assert attention_free_layers(twice) == [2, 3]
    a, b = GGUFReader(twice), GGUFReader(direct)
    assert [(t.name, t.data.tobytes()) for t in a.tensors] == [(t.name, t.data.tobytes()) for t in b.tensors]
    assert fields(twice)["deci.attention.head_count"] == fields(direct)["deci.attention.head_count"]
    assert fields(twice)["gatenorm.source.architecture"][1] == "llama"  # the first rewrite's record survives


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["stories260k", "smollm2"])
def test_nothing_pruned_gives_bit_identical_logits(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model: Path = request.getfixturevalue(fixture)
    out = tmp_path / "deci.gguf"
    prune_gguf(model, out, [])
    assert inspect_gguf(out).architecture == "deci"
    tokens = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]
    original, rewritten = (llama_cpp_logits(path, tokens, flash_attn=True, f32_kv=False) for path in (model, out))
    assert np.array_equal(original, rewritten)


def _kv_slope(path: Path, flash_attn: bool) -> tuple[int, float]:
    """Bytes per token of llama.cpp's saved KV state, and the KV-cache MiB llama.cpp logs at load."""
    from gatenorm_edge.harness.model import llama_log_lines  # keeps llama.cpp's log in memory

    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, flash_attn=flash_attn, verbose=False, n_threads=2)
    logged = [line for line in llama_log_lines() if "llama_kv_cache: size" in line][-1]
    sizes = []
    for n in (32, 96):
        model.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(model.ctx), True)
        model.eval(list(range(100, 100 + n)))
        sizes.append(llama_cpp.llama_state_get_size(model.ctx))
    model.close()
    return (sizes[1] - sizes[0]) // 64, float(logged.split("size =")[1].split("MiB")[0])


@pytest.mark.slow
def test_pruned_smollm2_loads_generates_and_shrinks_kv(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.gguf"
    layers = [3, 7, 11, 15]
    result = prune_gguf(smollm2, out, layers)
    with GGUFLayout(smollm2) as src, GGUFLayout(out) as dst:
        dropped = sum(src.tensors[name].n_bytes for name in result.dropped_tensors)
        slack = abs(dst.data_offset - src.data_offset) + dst.alignment * len(result.dropped_tensors)
    assert len(result.dropped_tensors) == 5 * len(layers) and result.dropped_bytes == dropped
    assert abs(smollm2.stat().st_size - out.stat().st_size - dropped) <= slack

    model = llama_cpp.Llama(model_path=str(out), n_ctx=128, flash_attn=True, verbose=False, n_threads=2)
    text = model("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    model.close()
    assert len(text.strip()) > 0

    # KV bytes per token from llama.cpp's own state serialization: 30 layers x (K + V) f16 rows before,
    # 26 after; each layer holds 3 KV heads x 64 dims x 2 bytes for K and the same for V.
    per_layer = 2 * 3 * 64 * 2
    before, mib_before = _kv_slope(smollm2, flash_attn=True)
    after, mib_after = _kv_slope(out, flash_attn=True)
    assert before - after == len(layers) * per_layer
    assert abs(after / before - 26 / 30) < 0.01
    # the allocated cache llama.cpp logs (flash attention on) shrinks by the same fraction
    assert abs(mib_after / mib_before - 26 / 30) < 0.01


# ----------------------------------------------------------------------------------------------
# refusals, through the CLI: exit != 0, one line, no OUT, input unchanged


def _write_fake_gguf(path: Path, arch: str, expert_count: int = 0) -> None:
    writer = GGUFWriter(path, arch)
    writer.add_block_count(2)
    if expert_count:
        writer.add_expert_count(expert_count)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


REFUSALS = [
    (["--layers", "0,2"], "layer 0 cannot be made attention-free"),
    (["--layers", "1,2,3,4"], "all 4 prunable layers"),
    (["--layers", "2,3,2"], "more than once: 2"),
    (["--layers", "2,5"], "out of range: 5"),
    (["--layers", "two"], "--layers takes comma-separated whole numbers such as 12,20,25"),
    ([], "exactly one of --layers, --count or --plan"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS)
def test_refusals(stories260k: Path, tmp_path: Path, args: list[str], message: str) -> None:
    before = sha256(stories260k)
    out = tmp_path / "out.gguf"
    proc = run_cli_here("prune", stories260k, out, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert sha256(stories260k) == before


def test_refuses_output_equal_to_input(stories260k: Path, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(stories260k.read_bytes())
    (tmp_path / "link.gguf").symlink_to(model)
    before = sha256(model)
    for out, cwd in ((model, ROOT), (tmp_path / "link.gguf", ROOT), (Path("model.gguf"), tmp_path)):
        proc = run_cli("prune", model, out, "--layers", "2", "--force", cwd=cwd)
        assert proc.returncode == 2 and "is the input file" in proc.stderr, (out, proc.stderr)
        assert sha256(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.gguf", "model.gguf"]


def test_refuses_existing_output_without_force(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    proc = run_cli_here("prune", stories260k, out, "--layers", "2")
    assert proc.returncode == 2 and "exists; pass --force" in proc.stderr
    assert out.read_bytes() == b"keep me"
    proc = run_cli_here("prune", stories260k, out, "--layers", "2", "--force")
    assert proc.returncode == 0, proc.stderr
    assert attention_free_layers(out) == [2]


def test_refuses_unsupported_architecture(tmp_path: Path) -> None:
    model = tmp_path / "qwen3.gguf"
    _write_fake_gguf(model, "qwen3")
    before = sha256(model)
    proc = run_cli_here("prune", model, tmp_path / "out.gguf", "--layers", "1")
    assert proc.returncode == 2
    assert "cannot prune architecture 'qwen3': q/k RMSNorm" in proc.stderr
    assert not (tmp_path / "out.gguf").exists() and sha256(model) == before


def test_refuses_mixture_of_experts_llama(tmp_path: Path) -> None:
    model = tmp_path / "mixtral.gguf"
    _write_fake_gguf(model, "llama", expert_count=8)
    proc = run_cli_here("prune", model, tmp_path / "out.gguf", "--layers", "1")
    assert_one_line_error(proc, "mixture-of-experts models (8 experts per layer) are not supported")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_refuses_truncated_and_foreign_files(stories260k: Path, tmp_path: Path, command: str) -> None:
    truncated, foreign = tmp_path / "truncated.gguf", tmp_path / "notes.gguf"
    truncated.write_bytes(stories260k.read_bytes()[:600_000])
    foreign.write_text("not a model")
    for model, message in ((truncated, "truncated"), (foreign, "not a GGUF file")):
        args = [model, tmp_path / "out.gguf", "--layers", "1"] if command == "prune" else [model]
        proc = run_cli_here(command, *args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "out.gguf").exists()


def test_refuses_when_disk_is_too_small(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import gatenorm_edge.rewrite as rewrite

    monkeypatch.setattr(rewrite.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(GatenormError, match="not enough free disk space"):
        prune_gguf(stories260k, tmp_path / "out.gguf", [2])
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# CLI: inspect, --plan and --count


def test_inspect_cli_original_and_pruned(stories260k: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned.gguf"
    assert run_cli_here("prune", stories260k, out, "--layers", "1,4", "--json", tmp_path / "r.json").returncode == 0
    assert json.loads((tmp_path / "r.json").read_text())["layers_pruned"] == [1, 4]
    proc = run_cli_here("inspect", stories260k)
    assert proc.returncode == 0 and "| architecture | llama |" in proc.stdout
    assert "| attention-free layers | none |" in proc.stdout
    proc = run_cli_here("inspect", out, "--json", tmp_path / "i.json")
    assert "| attention-free layers | 1, 4 |" in proc.stdout and "| F32 | 38 |" in proc.stdout
    info = json.loads((tmp_path / "i.json").read_text())
    assert info == inspect_gguf(out).to_dict()  # the inspect --json contract
    assert info["architecture"] == "deci" and info["attention_layers"] == 3


def test_prune_by_plan_and_by_count_use_the_scores(stories260k: Path, tmp_path: Path) -> None:
    from gatenorm_edge.scoring import score_model

    report = score_model(stories260k, variant="per-head")
    plan = tmp_path / "scores.json"
    plan.write_text(json.dumps(report.to_dict()))
    by_plan, by_count = tmp_path / "plan.gguf", tmp_path / "count.gguf"
    proc = run_cli_here("prune", stories260k, by_plan, "--plan", plan, "--count", "2")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli_here("prune", stories260k, by_count, "--count", "2", "--variant", "per-head")
    assert proc.returncode == 0, proc.stderr
    expected = sorted(report.prune_order[:2])
    assert attention_free_layers(by_plan) == expected == attention_free_layers(by_count)
    assert GGUFReader(by_count).fields["gatenorm.variant"].contents() == "per-head"
    proc = run_cli_here("prune", stories260k, tmp_path / "x.gguf", "--plan", plan)
    assert proc.returncode == 2 and "--plan needs --count" in proc.stderr


def test_help_has_examples() -> None:
    proc = run_cli_here("prune", "--help")
    assert proc.returncode == 0 and "--layers 12,20,25" in proc.stdout
    proc = run_cli_here("inspect", "--help")
    assert proc.returncode == 0 and "inspect pruned.gguf --json" in proc.stdout
