"""Both header readers end every damaged file in a result or one clean error (bench/fuzz.py builds the cases)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open

from bench.fuzz import (
    GGUF_SEED,
    Tally,
    gguf_cases,
    read_gguf,
    read_safetensors,
    safetensors_cases,
    safetensors_file,
    safetensors_seed,
)
from gatenorm_edge.errors import GatenormError
from gatenorm_edge.gguf_layout import GGUFLayout
from gatenorm_edge.sources.gguf_file import GGUFFile
from gatenorm_edge.sources.safetensors_file import read_header

CI_CASES = 300
FUZZ_SETTINGS = settings(max_examples=CI_CASES, deadline=None, database=None, suppress_health_check=list(HealthCheck))


def test_gguf_seed_reads_like_the_upstream_reader(tmp_path: Path) -> None:
    path = tmp_path / "seed.gguf"
    path.write_bytes(GGUF_SEED.data)
    model, reader = GGUFFile(path), GGUFReader(path)
    assert model.value("general.alignment") == 32  # a non-default key the scan must not lose its place over
    for key, field in reader.fields.items():
        assert model.value(key) == field.contents(), key
    for tensor in reader.tensors:
        assert model.tensor_span(tensor.name).data_offset == tensor.data_offset


def test_safetensors_seed_reads_like_the_upstream_reader(tmp_path: Path) -> None:
    path = tmp_path / "seed.safetensors"
    path.write_bytes(safetensors_file(*safetensors_seed()))
    with safe_open(path, framework="np") as reference:  # the upstream header parser (it cannot decode BF16)
        assert sorted(read_header(path)) == sorted(reference.keys())


@pytest.mark.parametrize(
    ("offset", "value", "expected"),
    [
        (8, 2**63, "tensor count at offset 8 is 9223372036854775808"),
        (16, 2**40, "metadata count at offset 16"),
        (24, 2**64 - 1, "length of key of metadata field 0 at offset 24"),
    ],
)
def test_lying_counts_are_named_with_their_offset(tmp_path: Path, offset: int, value: int, expected: str) -> None:
    data = bytearray(GGUF_SEED.data)
    data[offset:offset + 8] = struct.pack("<Q", value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GatenormError, match=expected) as error:
        GGUFLayout(path)
    assert "\n" not in str(error.value)


def test_a_lying_tokenizer_length_is_caught_before_it_is_used(tmp_path: Path) -> None:
    slot = next(s for s in GGUF_SEED.slots if s.what == "length of item of tokenizer.ggml.tokens")
    data = bytearray(GGUF_SEED.data)
    data[slot.offset:slot.offset + 8] = struct.pack("<Q", 2**63)  # was an OverflowError traceback
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(GatenormError, match=rf"length of tokenizer.ggml.tokens\[0\] at offset {slot.offset} is 9223372036854775808, past the end"):
        GGUFLayout(path)


@pytest.mark.parametrize("body", ["[" * 50_000 + "]" * 50_000, '{"a": ' + "9" * 5000 + "}"])
def test_pathological_json_headers_are_refused(tmp_path: Path, body: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body.encode())
    with pytest.raises(GatenormError, match="header is not JSON"):
        read_header(path)


def _no_crash(reader, data: bytes, folder: Path) -> None:
    crash = Tally().record(reader, data, folder)
    assert crash is None, crash


@FUZZ_SETTINGS
@given(data=gguf_cases())
def test_fuzzed_gguf_headers_end_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _no_crash(read_gguf, data, tmp_path_factory.mktemp("gguf"))


@FUZZ_SETTINGS
@given(data=safetensors_cases())
def test_fuzzed_safetensors_headers_end_cleanly(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    _no_crash(read_safetensors, data, tmp_path_factory.mktemp("st"))


def test_the_tally_counts_a_crash(tmp_path: Path) -> None:
    """The fuzz harness itself can fail: an exception other than GatenormError is counted as a crash."""

    def broken_reader(path: Path) -> None:
        json.loads(path.read_text())

    tally = Tally()
    assert tally.record(broken_reader, b"not json", tmp_path) is not None
    assert tally.record(broken_reader, b"[1]", tmp_path) is None
    assert tally.cases == 2 and sum(tally.crashes.values()) == 1 and np.isscalar(tally.clean_errors)


def test_safetensors_errors_name_the_entry_and_its_offsets(tmp_path: Path) -> None:
    header, data_bytes = safetensors_seed()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(safetensors_file(header, data_bytes)[:-4])  # the last tensor's bytes cut short
    with pytest.raises(GatenormError, match=r"tensor c\.weight's data_offsets \[32, 40\] \(bytes \d+\.\.\d+\) run past the end"):
        read_header(path)
