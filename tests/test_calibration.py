"""The model's own calibration text: prompt sources (BOS, start texts, chat requests through the model's template,
a mix), top-p sampling, dropping the least likely samples, and the one-line refusals."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import assert_one_line_error, run_cli_here
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.harness.model import open_model
from gatenorm_edge.harness.prompts import REQUESTS, STARTS, chat_template, prompt_set, requests
from gatenorm_edge.harness import selfcal
from gatenorm_edge.harness.probe import StreamEdits
from gatenorm_edge.harness.selfcal import (
    CalibrationSpec, Capture, Sampling, _nucleus, check_end_of_generation, sample_sequences, sampler_tables,
    self_calibration,
)


def test_the_nucleus_keeps_the_fewest_most_likely_tokens_holding_top_p() -> None:
    probs = np.array([[0.05, 0.5, 0.1, 0.3, 0.05], [0.2, 0.2, 0.2, 0.2, 0.2]])
    _nucleus(probs, 0.75)
    np.testing.assert_array_equal(probs[0], [0.0, 0.5, 0.0, 0.3, 0.0])  # 0.5 + 0.3 >= 0.75 > 0.5
    assert np.count_nonzero(probs[1]) == 4  # a flat row: four of five reach 0.75


def test_requests_cover_every_kind_with_varied_topics() -> None:
    asked = requests(2 * len(REQUESTS))
    for kind, request in zip(REQUESTS * 2, asked):
        assert request.startswith(kind.split("{topic}")[0])
    assert len(set(asked)) == len(asked)


def test_chat_prompts_go_through_the_models_own_template(smollm2: Path) -> None:
    with contextlib.closing(open_model(smollm2, n_ctx=256, n_threads=1)) as model:
        _, lead, boundary = sampler_tables(model)
        assert chat_template(model) is not None
        prompts = prompt_set(model, "mix", 6, lead, boundary)
        texts = [model.detokenize(list(p), special=True).decode("utf-8") for p in prompts.prompts]
    assert prompts.source == "bos+starts+chat" and prompts.note is None
    assert texts[0] == "<|im_start|>" or prompts.prompts[0] == (boundary,)  # BOS alone
    assert STARTS[0] in texts[1]
    assert "<|im_start|>user\nWrite an encyclopedia article about" in texts[2] and texts[2].endswith("<|im_start|>assistant\n")


def test_a_model_without_a_chat_template_falls_back_and_says_so(stories260k: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        calibration = self_calibration(model, CalibrationSpec(tokens=6 * 48, seq_len=48), cache_dir=tmp_path)
        assert calibration.settings["prompts"] == "bos+starts"
        assert calibration.settings["prompts_note"] == (
            "stories260K.gguf has no chat template: its calibration text is sampled from BOS and start texts only")
        with pytest.raises(GatenormError, match="no chat template; use --calib-source bos, starts or mix"):
            self_calibration(model, CalibrationSpec(source="chat", tokens=96, seq_len=48), cache_dir=tmp_path)
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    done = run_cli_here("prune", stories260k, tmp_path / "p.gguf", "--count", "2")
    assert done.returncode == 0 and "(stories260K.gguf has no chat template" in done.stdout


def test_dropping_the_least_likely_samples_keeps_the_rest_in_order(stories260k: Path, tmp_path: Path) -> None:
    sampling = Sampling(temperature=1.0, drop_worst=0.25)
    spec = CalibrationSpec(source="starts", tokens=6 * 48, seq_len=48, sampling=sampling, seed=3)
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        _, lead, boundary = sampler_tables(model)
        drawn = sample_sequences(model, prompt_set(model, "starts", 8, lead, boundary).prompts, 48, 3, sampling)
        kept = self_calibration(model, spec, cache_dir=tmp_path)
    worst = set(np.argsort(drawn.nll)[-2:])  # 8 drawn for 6 wanted
    assert kept.sequences == tuple(s for i, s in enumerate(drawn.sequences) if i not in worst)
    assert kept.settings["drop_worst"] == 0.25 and len(kept.sequences) == 6


def test_an_interrupted_sampling_run_goes_on_from_its_last_group_to_the_same_tokens(
    stories260k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selfcal, "GROUP", 2)  # 6 sequences: 3 groups
    spec = CalibrationSpec(tokens=6 * 48, seq_len=48, seed=4)
    sample_group = selfcal._sample_group
    calls: list[int] = []

    def interrupted_in_third_group(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return sample_group(*args)

    seen: list[int] = []
    capture = Capture(StreamEdits(), lambda sequences, real: seen.append(len(sequences)))
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        unbroken = self_calibration(model, spec, cache_dir=tmp_path / "unbroken", capture=capture)
        assert unbroken.captured and seen
        monkeypatch.setattr(selfcal, "_sample_group", interrupted_in_third_group)
        with pytest.raises(KeyboardInterrupt):
            self_calibration(model, spec, cache_dir=tmp_path / "broken")
        (progress,) = (tmp_path / "broken").iterdir()
        assert progress.name.endswith(".partial.json")
        assert len(selfcal.read_entry(progress, "calibration progress")["sequences"]) == 4
        monkeypatch.setattr(selfcal, "_sample_group", sample_group)
        seen.clear()
        resumed = self_calibration(model, spec, cache_dir=tmp_path / "broken", capture=capture)
    assert resumed.sequences == unbroken.sequences and resumed.sha256 == unbroken.sha256
    assert not resumed.captured and not seen  # the capture missed the first groups: a second pass is needed
    assert [entry.name for entry in (tmp_path / "broken").iterdir()] == [progress.name.replace(".partial", "")]


def test_top_p_sampling_is_reproducible_and_differs_from_plain(stories260k: Path) -> None:
    with contextlib.closing(open_model(stories260k, n_ctx=64, n_threads=1)) as model:
        prompts = [model.tokenize_text("Once upon a time")] * 3
        nucleus = Sampling(temperature=0.8, top_p=0.95)
        first = sample_sequences(model, prompts, 40, 1, nucleus)
        assert first == sample_sequences(model, prompts, 40, 1, nucleus)
        assert first.sequences != sample_sequences(model, prompts, 40, 1).sequences
    assert np.all(np.isfinite(first.nll)) and min(first.nll) > 0


def test_degenerate_samples_are_one_line() -> None:
    with pytest.raises(GatenormError, match="samples degenerate") as error:
        check_end_of_generation(Path("m.gguf"), np.array([0.9, 0.8, 0.95]))
    assert "\n" not in str(error.value) and "--calib" in str(error.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--calib-temperature", "0"], "sampling needs a temperature above 0"),
        (["--calib-top-p", "1.5"], "top-p in (0, 1]"),
        (["--calib-drop", "1"], "dropped share in [0, 1)"),
        (["--calib-source", "chat"], "no chat template; use --calib-source bos, starts or mix"),
    ],
)
def test_bad_calibration_options_are_one_line_and_write_nothing(stories260k: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                                 message: str) -> None:
    monkeypatch.setenv("GATENORM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.gguf"
    assert_one_line_error(run_cli_here("prune", stories260k, out, "--count", "2", *args), message)
    assert not out.exists()
