"""The study: one command on stories260K, its evaluation against the harness's KLD, its tables and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gatenorm_edge.criteria import CRITERIA, CriterionResult
from gatenorm_edge.harness.kld import kl_divergence
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.evaluation import ChunkSpan, EvalPoint, PrunedEvaluator, TextChunks
from gatenorm_edge.report import study_markdown as markdown
from gatenorm_edge.study import CriterionStudy, StudyResult
from cli_helpers import run_cli


@pytest.mark.slow
def test_study_runs_from_one_command(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    out = tmp_path / "study.json"
    result = run_cli(
        "study", str(stories260k), "--text", str(tinystories), "--counts", "1,2,3", "--ctx", "128", "--chunks", "2",
        "--calib-ctx", "128", "--calib-chunks", "2", "--threads", "1", "--json", str(out), "--plot", str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["flash_attn"] is True and data["counts"] == [1, 2, 3]
    assert data["calibration"] == {"text": str(tinystories), "ctx": 128, "first_chunk": 0, "chunks": 2}
    assert data["evaluation"]["first_chunk"] == 2  # evaluated after the calibration tokens, not on them
    assert data["evaluation"]["tokens_scored"] == 2 * 63
    studies = {entry["criterion"]: entry for entry in data["criteria"]}
    assert list(studies) == list(CRITERIA)
    for name, entry in studies.items():
        assert sorted(entry["prune_order"]) == [1, 2, 3, 4], name
        assert [p["layers"] for p in entry["points"]] == [sorted(entry["prune_order"][:k]) for k in (1, 2, 3)]
        assert all(p["ppl"] > 0 and p["kld"] >= 0 for p in entry["points"])
        assert entry["seconds"] >= 0
    assert studies["loo-ppl"]["spearman_vs_loo_ppl"] == pytest.approx(1.0)
    assert studies["last"]["points"][1]["layers"] == [3, 4]
    assert studies["greedy-ppl"]["prune_order"][0] == studies["loo-ppl"]["prune_order"][0]
    # The same layer set gives the same numbers whichever criterion chose it.
    by_set = {}
    for entry in studies.values():
        for point in entry["points"]:
            assert by_set.setdefault(tuple(point["layers"]), point) == point
    assert data["models_evaluated"] == len(by_set)
    assert "| criterion | scoring s | ρ vs loo-ppl |" in result.stdout and "within bar" in result.stdout
    for png in ("stories260K-ppl-kld.png", "stories260K-scores.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_evaluation_equals_the_harness_kl_divergence(stories260k: Path, tinystories: Path, tmp_path: Path) -> None:
    chunks = TextChunks.from_text(stories260k, tinystories, 128, 3)
    evaluate = PrunedEvaluator(stories260k, chunks, tmp_path, n_threads=1, divergence=True)
    point = evaluate.point([2, 4])
    pruned = tmp_path / "pruned.gguf"
    prune_gguf(stories260k, pruned, [2, 4])
    expected = kl_divergence(stories260k, pruned, tinystories, ctx=128, chunks=3, n_threads=1)
    assert evaluate.base_stats.ppl == pytest.approx(expected.base.ppl, rel=1e-9)
    assert point.ppl == pytest.approx(expected.other.ppl, rel=1e-9)
    assert point.ppl_stderr == pytest.approx(expected.other.ppl_stderr, rel=1e-9)
    assert point.kld == pytest.approx(expected.kld_mean, rel=1e-9)
    assert point.kld_stderr == pytest.approx(expected.kld_stderr, rel=1e-9)
    assert point.top1_agreement == pytest.approx(expected.top1_agreement)
    assert evaluate.point([4, 2]) is point  # cached by layer set


def _study(name: str, ppls: list[float]) -> CriterionStudy:
    ranking = CriterionResult(name, "m.gguf", 4, [None, 1.0, 2.0, 3.0], [1, 2, 3], 0.5)
    points = [EvalPoint(k, [1, 2, 3][:k], ppl, 0.1, 0.2, 0.01, 0.9) for k, ppl in enumerate(ppls, start=1)]
    return CriterionStudy(ranking, 0.5, points)


def test_markdown_holds_each_data_free_criterion_to_the_bar() -> None:
    result = StudyResult(
        model="m.gguf", n_layers=4, counts=[1, 2], flash_attn=True, threads=1,
        calibration=ChunkSpan("c.txt", 128, 0, 1), evaluation=ChunkSpan("e.txt", 128, 1, 2), tokens_scored=126,
        base_ppl=9.0, base_ppl_stderr=0.5, models_evaluated=3,
        criteria=[_study("greedy-ppl", [10.0, 20.0]), _study("per-head", [10.5, 24.0]), _study("last", [11.0, 21.0])],
        seconds=1.0,
    )
    text = markdown(result)
    assert "| per-head (default) | +5.0% | +20.0% | no (worst +20.0%) |" in text
    assert "| last | +10.0% | +5.0% | yes |" in text
    assert "| greedy-ppl | 0.5 | 0.500 | 10.000 (0.200) | 20.000 (0.200) |" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--criteria", "per-head,bogus"], "--criteria: unknown 'bogus'"),
        (["--counts", "1,4"], "counts must be between 1 and 3"),
        (["--counts", "one"], "--counts takes comma-separated whole numbers"),
        (["--plot", "no-such-folder"], "no such folder"),
    ],
)
def test_study_refusals(stories260k: Path, tinystories: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    out = tmp_path / "study.json"
    result = run_cli("study", str(stories260k), "--text", str(tinystories), "--json", str(out), *extra)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
