"""Benchmark and fuzz cases: structure-aware mutations of a GGUF and a safetensors file, fed to our readers.

A case is a small valid file, built here with every structural field's offset recorded, then damaged:
counts, lengths, type codes, dimensions, offsets and alignment overwritten with boundary values, bits
flipped, bytes inserted or deleted, the file cut anywhere; for safetensors, the JSON header's entries are
rewritten (dtype, shape, data_offsets, nesting, huge numbers) and its length prefix lied about.
A reader must end every case with a result or a ``GatenormError``; anything else is a crash.
``tests/test_fuzz.py`` runs a bounded number of cases in CI; ``make bench BENCH=fuzz`` runs ``CASES``
per reader and reports the crashes, which must be 0.
"""

from __future__ import annotations

import json
import struct
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gatenorm_edge.errors import GatenormError
from gatenorm_edge.sources.gguf_file import GGUFFile
from gatenorm_edge.sources.safetensors_file import read_header, read_tensor

CASES = 10_000
ALIGNMENT = 32
BOUNDARY_VALUES = (0, 1, 2, 3, 4, 5, 8, 12, 31, 32, 33, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1)


@dataclass(frozen=True)
class Slot:
    """A structural integer in the seed file: its offset, width in bytes and what it is."""

    offset: int
    width: int
    what: str


class GGUFSeed:
    """A small valid GGUF file, written field by field so that every structural integer's offset is known."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.slots: list[Slot] = []

    def integer(self, value: int, width: int, what: str) -> None:
        self.slots.append(Slot(len(self.data), width, what))
        self.data += value.to_bytes(width, "little")

    def string(self, text: str, what: str) -> None:
        encoded = text.encode()
        self.integer(len(encoded), 8, f"length of {what}")
        self.data += encoded

    def field(self, key: str, value_type: GGUFValueType, value: object, item_type: GGUFValueType | None = None) -> None:
        self.string(key, "key")
        self.integer(value_type, 4, f"type of {key}")
        if value_type == GGUFValueType.STRING:
            self.string(str(value), key)
        elif value_type == GGUFValueType.ARRAY:
            assert item_type is not None and isinstance(value, list)
            self.integer(item_type, 4, f"item type of {key}")
            self.integer(len(value), 8, f"count of {key}")
            for item in value:
                if item_type == GGUFValueType.STRING:
                    self.string(item, f"item of {key}")
                else:
                    self.data += struct.pack("<i", item)
        else:
            self.data += struct.pack({GGUFValueType.UINT32: "<I", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?"}[value_type], value)

    @classmethod
    def build(cls) -> GGUFSeed:
        seed = cls()
        seed.data += b"GGUF"
        seed.integer(3, 4, "version")
        tensors = [
            ("token_embd.weight", (8, 4), GGMLQuantizationType.F32, 4 * 32),
            ("blk.0.attn_q.weight", (32, 2), GGMLQuantizationType.Q8_0, 2 * 34),
            ("output_norm.weight", (8,), GGMLQuantizationType.F16, 2 * 8),
        ]
        seed.integer(len(tensors), 8, "tensor count")
        seed.integer(8, 8, "metadata count")
        seed.field("general.architecture", GGUFValueType.STRING, "llama")
        seed.field("general.alignment", GGUFValueType.UINT32, ALIGNMENT)
        seed.field("llama.block_count", GGUFValueType.UINT32, 2)
        seed.field("llama.attention.head_count", GGUFValueType.ARRAY, [4, 0], GGUFValueType.INT32)
        seed.field("llama.rope.freq_base", GGUFValueType.FLOAT32, 10000.0)
        seed.field("general.name", GGUFValueType.STRING, "fuzz seed")
        seed.field("tokenizer.ggml.tokens", GGUFValueType.ARRAY, ["a", "bc", "", "é"], GGUFValueType.STRING)
        seed.field("tokenizer.ggml.add_bos_token", GGUFValueType.BOOL, True)
        offset = 0
        for name, dims, tensor_type, n_bytes in tensors:
            seed.string(name, "tensor name")
            seed.integer(len(dims), 4, f"dimension count of {name}")
            for dim in dims:
                seed.integer(dim, 8, f"dimension of {name}")
            seed.integer(tensor_type, 4, f"type of {name}")
            seed.integer(offset, 8, f"offset of {name}")
            offset += -(-n_bytes // ALIGNMENT) * ALIGNMENT
        seed.data += bytes(-len(seed.data) % ALIGNMENT)
        seed.data += np.random.default_rng(0).integers(0, 256, offset, dtype=np.uint8).tobytes()
        return seed


GGUF_SEED = GGUFSeed.build()


@st.composite
def gguf_cases(draw: st.DrawFn) -> bytes:
    """The seed GGUF with one to four structural or byte-level mutations."""
    data = bytearray(GGUF_SEED.data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("slot", "slot", "slot", "flip", "truncate", "insert", "delete")))
        if kind == "slot":
            slot = draw(st.sampled_from(GGUF_SEED.slots))
            value = draw(st.one_of(st.sampled_from(BOUNDARY_VALUES), st.integers(0, 2 ** (8 * slot.width) - 1)))
            if slot.offset + slot.width <= len(data):
                data[slot.offset:slot.offset + slot.width] = (value % 2 ** (8 * slot.width)).to_bytes(slot.width, "little")
        elif kind == "flip":
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "insert":
            position = draw(st.integers(0, len(data)))
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            position = draw(st.integers(0, max(len(data) - 1, 0)))
            del data[position:position + draw(st.integers(1, 16))]
        if not data:
            break
    return bytes(data)


def read_gguf(path: Path) -> None:
    """What our tools do with a GGUF: scan the header, decode every value, read every tensor."""
    model = GGUFFile(path)
    try:
        header = model.layouts[0]
        for key, span in header.fields.items():
            if span.type != GGUFValueType.ARRAY or key != "tokenizer.ggml.tokens":
                header.value(key)
        for name in model.tensor_names():
            model.tensor(name)
    finally:
        for layout in model.layouts:
            layout.close()


SAFETENSORS_TENSORS = {
    "a.weight": ("F32", [2, 3]),
    "b.weight": ("F16", [4]),
    "c.weight": ("BF16", [2, 2]),
}


def safetensors_file(header: dict[str, object], data_bytes: int) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes)


def safetensors_seed() -> tuple[dict[str, object], int]:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in SAFETENSORS_TENSORS.items():
        n_bytes = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n_bytes]}
        offset += n_bytes
    return header, offset


JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8),
    st.sampled_from(BOUNDARY_VALUES), st.lists(st.integers(-5, 2**64), max_size=5),
)


@st.composite
def safetensors_cases(draw: st.DrawFn) -> bytes:
    """The seed safetensors file with its header entries rewritten and/or its bytes damaged."""
    header, data_bytes = safetensors_seed()
    names = [*SAFETENSORS_TENSORS, "__metadata__"]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(names))
        entry = header[name]
        key = draw(st.sampled_from(("dtype", "shape", "data_offsets", "whole", "extra")))
        if key == "whole":
            header[name] = draw(JSON_VALUES)
        elif key == "extra":
            header[draw(st.text(max_size=4))] = draw(JSON_VALUES)
        elif isinstance(entry, dict):
            entry[key] = draw(st.one_of(JSON_VALUES, st.sampled_from(("F32", "F16", "BF16", "I8", "F64")),
                                        st.lists(st.sampled_from(BOUNDARY_VALUES), min_size=0, max_size=3)))
    encoded = bytearray(safetensors_file(header, data_bytes))
    for _ in range(draw(st.integers(0 if len(encoded) else 1, 3))):
        kind = draw(st.sampled_from(("length", "flip", "truncate", "nesting", "digits")))
        if kind == "length":
            encoded[:8] = struct.pack("<Q", draw(st.one_of(st.sampled_from(BOUNDARY_VALUES), st.integers(0, 2**64 - 1))))
        elif kind == "flip" and encoded:
            position = draw(st.integers(0, len(encoded) - 1))
            encoded[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del encoded[draw(st.integers(0, len(encoded))):]
        elif kind in ("nesting", "digits"):  # a header that is valid JSON but breaks naive parsers
            depth = draw(st.integers(1, 100_000))
            body = ("[" * depth + "]" * depth) if kind == "nesting" else '{"a.weight": ' + "9" * depth + "}"
            encoded = bytearray(struct.pack("<Q", len(body)) + body.encode() + bytes(data_bytes))
    return bytes(encoded)


def read_safetensors(path: Path) -> None:
    """What our tools do with a safetensors file: parse the header, read every tensor."""
    for entry in read_header(path).values():
        read_tensor(entry)


@dataclass
class Tally:
    """Cases run against one reader and the crashes among them, by exception and line."""

    cases: int = 0
    clean_errors: int = 0
    crashes: dict[str, int] = field(default_factory=dict)

    def record(self, reader: Callable[[Path], None], data: bytes, folder: Path) -> str | None:
        """Run one case; None if it ended in a result or a GatenormError, else the crash's description."""
        self.cases += 1
        path = folder / "case"
        path.write_bytes(data)
        try:
            reader(path)
        except GatenormError:
            self.clean_errors += 1
            return None
        except Exception as exc:  # noqa: BLE001 (any other exception is what we count)
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            crash = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            self.crashes[crash] = self.crashes.get(crash, 0) + 1
            return crash
        return None


READERS: dict[str, tuple[Callable[[Path], None], st.SearchStrategy[bytes]]] = {
    "gguf": (read_gguf, gguf_cases()),
    "safetensors": (read_safetensors, safetensors_cases()),
}


def fuzz(reader_name: str, cases: int) -> Tally:
    """Run ``cases`` generated cases (no shrinking, no example database) and tally the outcomes."""
    reader, strategy = READERS[reader_name]
    tally = Tally()
    with tempfile.TemporaryDirectory() as folder:

        @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one_case(data: bytes) -> None:
            tally.record(reader, data, Path(folder))

        one_case()
    return tally


def run() -> dict[str, object]:
    result: dict[str, object] = {"target": "0 crashes per reader", "cases_per_reader": CASES}
    for name in READERS:
        started = time.perf_counter()
        tally = fuzz(name, CASES)
        result[name] = {
            "cases": tally.cases,
            "clean_errors": tally.clean_errors,
            "crashes": sum(tally.crashes.values()),
            "crash_kinds": tally.crashes,
            "seconds": round(time.perf_counter() - started, 1),
        }
    return result
