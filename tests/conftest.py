"""Shared fixtures: the real models and data in ../shared, skipped with a reason where absent."""

from __future__ import annotations

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
