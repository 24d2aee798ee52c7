"""The demo: score -> prune -> compare end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gatenorm_edge import demo


def test_demo_end_to_end_on_stories260k(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    text = tinystories
    done = subprocess.run(
        [sys.executable, "-m", "gatenorm_edge", "demo", "--model", str(stories260k), "--text", str(text), "--out", str(out),
         "--count", "2", "--ctx", "64", "--chunks", "2", "--gen", "4", "--depth", "0,32", "--reps", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    prune = json.loads((out / "prune.json").read_text())
    result = json.loads((out / "compare.json").read_text())
    assert result["demo"]["layers_pruned"] == prune["selfprune"]["layers"] and len(prune["selfprune"]["layers"]) == 2
    assert json.loads((out / "scores.json").read_text())["variant"] == "per-head"
    assert result["summary"] in done.stdout and "Removed attention from 2 of 5 layers" in result["summary"]
    assert "at depth 32" in result["summary"] and "KV cache is 40% smaller" in result["summary"]
    assert "(FA on, F16 KV cache, " in result["summary"]  # the cache type it measured with
    table = (out / "compare.md").read_text()
    assert "KLD 99th percentile" in table and "pp512 t/s @ depth 32" in table
    assert table.split("\n\n", 1)[1].strip().splitlines()[0] in done.stdout  # the printed table is the saved one
    pruned = Path(result["pruned"])
    assert pruned.parent == out and pruned.is_file()
    assert result["speed"]["kv_bytes"][str(pruned)] * 5 == result["speed"]["kv_bytes"][str(stories260k)] * 3


def test_demo_samples_its_text_when_no_wikitext(stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "shared_wikitext", lambda: None)  # as on a fresh machine without ../shared
    settings = demo.DemoSettings(out=tmp_path, count=1, model=stories260k, ctx=64, chunks=2, speed=None)
    result = demo.run_demo(settings).to_dict()
    assert result["text_label"].startswith("text sampled from the base model")
    assert Path(result["text"]) == tmp_path / "sampled_text.txt"
    assert result["perplexity"]["base"]["chunks"] == 2 and result["speed"] is None
