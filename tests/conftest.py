"""Shared fixtures: the real models and data in ../shared, skipped with a reason where absent."""

from __future__ import annotations

import bz2
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODELS_DIR = Path(os.environ.get("GATENORM_MODELS", Path.home() / ".cache" / "gatenorm-edge" / "models"))


def _require(path: Path, why: str) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} not found: {why}")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (real models and data live there; CI provides it)")
    return SHARED


@pytest.fixture(scope="session")
def stories260k(shared_dir: Path) -> Path:
    return _require(shared_dir / "models" / "stories260K.gguf", "the tiny llama model from ../shared")


@pytest.fixture(scope="session")
def smollm2(shared_dir: Path) -> Path:
    return _require(shared_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2 from ../shared")


@pytest.fixture(scope="session")
def wikitext(shared_dir: Path) -> Path:
    return _require(shared_dir / "data" / "wikitext-2-raw" / "wiki.test.raw", "WikiText-2 test from ../shared")


@pytest.fixture(scope="session")
def tinystories(shared_dir: Path) -> Path:
    return _require(shared_dir / "data" / "tinystories" / "tinystories_val_subset.txt", "TinyStories from ../shared")


@pytest.fixture(scope="session")
def qwen05() -> Path:
    return _require(
        MODELS_DIR / "qwen2.5-coder-0.5b-instruct-q4.gguf",
        "run ../shared/fetch-models.sh $GATENORM_MODELS qwen05 (CI does)",
    )


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return _require(
        MODELS_DIR / "gemma-3-270m-q4_k_m.gguf",
        "run ../shared/fetch-models.sh $GATENORM_MODELS gemma3 (CI does)",
    )


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
