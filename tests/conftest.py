"""Shared fixtures: the real models and data of ../shared; without it, the models fetched from their pinned
PyPI packages and the data excerpts of tests/data. The 1.2 MB test model stories260K is checked in there."""

from __future__ import annotations

import bz2
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from gatenorm_edge import fetch
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.sources.rope_layout import gguf_to_hf_rows

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
EXCERPTS = ROOT / "tests" / "data"  # stories260K and small excerpts of ../shared/data, in its layout (tests/data/README.md)


def _model(name: str) -> Path:
    """A real model: ../shared's copy when there is one, else fetched from its pinned PyPI packages."""
    try:
        return fetch.fetch_model(name)
    except GatenormError as exc:
        pytest.skip(f"{fetch.MODELS[name].file}: not in ../shared/models and could not be fetched ({exc})")


def _data(relative: str) -> Path:
    """A data file from ../shared/data, or its excerpt checked in under tests/data."""
    for root in (SHARED / "data", EXCERPTS):
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(f"{relative}: neither in ../shared/data nor in tests/data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The zero-shot task data: ../shared/data, or the excerpts of every task under tests/data."""
    return SHARED / "data" if (SHARED / "data").is_dir() else EXCERPTS


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """The 1.2 MB llama test model: checked in (tests/data/README.md has its licence and sha256), else ../shared's."""
    for path in (EXCERPTS / "stories260K.gguf", SHARED / "models" / "stories260K.gguf"):
        if path.is_file():
            return path
    raise FileNotFoundError("stories260K.gguf: neither in tests/data nor in ../shared/models")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _model("smollm2")


@pytest.fixture(scope="session")
def qwen05() -> Path:
    return _model("qwen05")


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return _model("gemma3")


@pytest.fixture(scope="session")
def wikitext() -> Path:
    return _data("wikitext-2-raw/wiki.test.raw")


@pytest.fixture(scope="session")
def tinystories() -> Path:
    return _data("tinystories/tinystories_val_subset.txt")


def write_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture()
def tiny_data(tmp_path: Path) -> Path:
    """A data folder in ../shared/data's layout with a few hand-written examples per format."""
    data = tmp_path / "data"
    foundry = data / "llm-foundry"
    qa = [{"query": f"Question: What is {n}+{n}?", "choices": [str(2 * n), str(2 * n + 1)], "gold": 0} for n in range(5)]
    for name in ("arc_easy", "arc_challenge"):
        write_lines(foundry / f"{name}.jsonl", qa)
    write_lines(foundry / "piqa.jsonl", [{"query": "Question: open a jar\n", "choices": ["twist the lid", "eat it"], "gold": 0}])
    write_lines(foundry / "openbook_qa.jsonl", [{"query": "The sun is a", "choices": ["star", "moon"], "gold": 0}])
    write_lines(foundry / "boolq.jsonl", [{"query": "Passage: Cats purr.\nQuestion: do cats purr?", "choices": ["no", "yes"], "gold": 1}])
    write_lines(
        foundry / "winogrande.jsonl",
        [{"context_options": ["Ann helped Bo because Ann", "Ann helped Bo because Bo"], "continuation": "was kind. ", "gold": 0}],
    )
    write_lines(
        data / "rte" / "superglue_rte_val.jsonl",
        [
            {"premise": "A dog ran.", "hypothesis": "An animal ran.", "label": "entailment", "idx": 0},
            {"premise": "A dog ran.", "hypothesis": "A cat flew.", "label": "not_entailment", "idx": 1},
        ],
    )
    hellaswag = "Cooking: A man cracks an egg. he\n2\nsings.\nflies away.\npours it into a pan.\nreads.\n"
    (data / "hellaswag").mkdir()
    (data / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(hellaswag.encode("utf-8")))
    return data


@pytest.fixture(scope="session")
def tiny_qwen2(stories260k: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K (F32) recast as a qwen2 file: Q/K rows in NEOX order, random q/k/v biases.

    Written with the upstream GGUFWriter; F32 weights make llama.cpp and NumPy agree to ~1e-5,
    so the qwen2 -> deci rewrite can be checked far below the noise floor of a quantized model.
    """
    reader = GGUFReader(stories260k)
    path = tmp_path_factory.mktemp("tiny") / "tiny-qwen2.gguf"
    writer = GGUFWriter(path, "qwen2")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        key = key.replace("llama.", "qwen2.", 1)
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    n_head, n_head_kv = reader.fields["llama.attention.head_count"].contents(), 4
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            data = gguf_to_hf_rows(data, n_head if "attn_q" in tensor.name else n_head_kv)
        writer.add_tensor(tensor.name, data)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight")):
            bias_name = tensor.name.replace(".weight", ".bias")
            writer.add_tensor(bias_name, (0.3 * rng.standard_normal(data.shape[0])).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
