"""Every CLI failure, option parsing included, is one ``error:`` line on stderr and exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatenorm_edge.cli import app, main

BAD_OPTIONS = [
    (["prune", "{model}", "{out}", "--count", "2", "--variant", "foo"], "Invalid value for '--variant': 'foo' is not one of 'per-head', 'full', 'folded'"),
    (["ppl", "{model}", "--text", "{model}", "--ctx", "abc"], "--ctx"),
    (["prune", "{model}", "{out}", "--count", "x"], "--count"),
    (["score", "{model}", "--nope"], "No such option: --nope"),
    (["prune", "{model}"], "Missing argument"),
    (["nosuchcommand"], "No such command"),
    (["prune", "{model}", "{out}", "--count", "2", "--mode", "bogus"], "bogus"),
    (["zeroshot", "{model}", "--tasks", "rte", "--limit", "1.5"], "--limit"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_OPTIONS)
def test_bad_options_are_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    args = [a.format(model=model, out=tmp_path / "out.gguf") for a in argv]
    with pytest.raises(SystemExit) as status:
        main(args)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert status.value.code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], stderr
    assert not (tmp_path / "out.gguf").exists()


def test_help_stays_rich_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["--help"], ["prune", "--help"]):
        with pytest.raises(SystemExit) as status:
            main(args)
        assert status.value.code == 0
        assert "Usage: gatenorm-edge" in capsys.readouterr().out


def test_the_imported_app_has_every_command() -> None:
    names = {command.name or command.callback.__name__ for command in app.registered_commands}
    assert {"score", "prune", "inspect", "ppl", "bench", "compare", "zeroshot", "study", "demo"} <= names
