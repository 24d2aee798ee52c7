"""Write a 13B-shaped llama checkpoint (Llama-2-13B geometry, random weights) for the scoring benchmark.

Layout: HF safetensors, fp16, three shards plus ``model.safetensors.index.json`` and ``config.json``:
40 layers, width 5120, 40 heads (no GQA), MLP 13824, vocabulary 32000 — every tensor of the real
model is declared at its real size and offset, so the files have the full ~26 GB layout.

Only the tensors the scorer reads hold real random bytes: every layer's ``q_proj``, ``k_proj``
(N(0, 0.02) in fp16) and ``input_layernorm`` (uniform 0.5..1.5). All other tensors are left as holes
in sparse files: they take no disk and read as zeros. About 4.2 GB of real bytes are written, and
a scorer that read anything else would show it in its bytes-read count.

    python tools/make_13b_checkpoint.py DEST_FOLDER
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gatenorm_edge.fileio import atomic_output, write_text_atomic

N_LAYERS, WIDTH, N_HEADS, N_FF, N_VOCAB = 40, 5120, 40, 13824, 32000
SHARD_LAYERS = ((0, 14), (14, 27), (27, 40))
STAMP = "generated.json"
CHUNK_ROWS = 512


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    filled: bool  # real random bytes (read by the scorer) or a sparse hole

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2


def layer_tensors(layer: int) -> list[PlannedTensor]:
    prefix = f"model.layers.{layer}"
    return [
        PlannedTensor(f"{prefix}.input_layernorm.weight", (WIDTH,), True),
        PlannedTensor(f"{prefix}.self_attn.q_proj.weight", (WIDTH, WIDTH), True),
        PlannedTensor(f"{prefix}.self_attn.k_proj.weight", (WIDTH, WIDTH), True),
        PlannedTensor(f"{prefix}.self_attn.v_proj.weight", (WIDTH, WIDTH), False),
        PlannedTensor(f"{prefix}.self_attn.o_proj.weight", (WIDTH, WIDTH), False),
        PlannedTensor(f"{prefix}.post_attention_layernorm.weight", (WIDTH,), False),
        PlannedTensor(f"{prefix}.mlp.gate_proj.weight", (N_FF, WIDTH), False),
        PlannedTensor(f"{prefix}.mlp.up_proj.weight", (N_FF, WIDTH), False),
        PlannedTensor(f"{prefix}.mlp.down_proj.weight", (WIDTH, N_FF), False),
    ]


def shard_plan() -> list[list[PlannedTensor]]:
    """Tensors of each shard, in file order."""
    shards = [[t for layer in range(start, stop) for t in layer_tensors(layer)] for start, stop in SHARD_LAYERS]
    shards[0].insert(0, PlannedTensor("model.embed_tokens.weight", (N_VOCAB, WIDTH), False))
    shards[-1] += [
        PlannedTensor("model.norm.weight", (WIDTH,), False),
        PlannedTensor("lm_head.weight", (N_VOCAB, WIDTH), False),
    ]
    return shards


def config() -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": WIDTH,
        "intermediate_size": N_FF,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_HEADS,
        "rms_norm_eps": 1e-5,
        "vocab_size": N_VOCAB,
        "torch_dtype": "float16",
    }


def _header(tensors: list[PlannedTensor]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor in tensors:
        entries[tensor.name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(entries).encode()
    return text + b" " * (-len(text) % 8)


def _write_values(handle, tensor: PlannedTensor, rng: np.random.Generator) -> None:
    if len(tensor.shape) == 1:
        handle.write(rng.uniform(0.5, 1.5, tensor.shape).astype("<f2").tobytes())
        return
    rows, cols = tensor.shape
    for start in range(0, rows, CHUNK_ROWS):
        block = rng.standard_normal((min(CHUNK_ROWS, rows - start), cols), dtype=np.float32)
        block *= 0.02
        handle.write(block.astype("<f2").tobytes())


def write_checkpoint(folder: Path, seed: int = 0) -> dict[str, object]:
    """Write the checkpoint into ``folder`` (created); returns what was written. Idempotent via a stamp file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    shards = shard_plan()
    weight_map, filled_bytes, total_bytes = {}, 0, 0
    for number, tensors in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header = _header(tensors)
        with atomic_output(folder / name) as handle:
            handle.write(struct.pack("<Q", len(header)) + header)
            for tensor in tensors:
                if tensor.filled:
                    _write_values(handle, tensor, rng)
                    filled_bytes += tensor.nbytes
                else:
                    handle.seek(tensor.nbytes, 1)  # a hole: no disk blocks, reads as zeros
            handle.truncate()
        total_bytes += sum(t.nbytes for t in tensors)
        weight_map |= {t.name: name for t in tensors}
        print(f"wrote {folder / name}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    write_text_atomic(folder / "model.safetensors.index.json", json.dumps(index, indent=1))
    write_text_atomic(folder / "config.json", json.dumps(config(), indent=1))
    summary = {
        "seed": seed,
        "tensor_bytes_declared": total_bytes,
        "tensor_bytes_filled": filled_bytes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_text_atomic(folder / STAMP, json.dumps(summary, indent=1))
    return summary


def ensure_checkpoint(folder: Path) -> dict[str, object] | None:
    """Write the checkpoint unless a complete one (its stamp file) is already there; returns the new summary."""
    if (folder / STAMP).is_file():
        return None
    return write_checkpoint(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write the checkpoint (about 4.2 GB of disk)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(write_checkpoint(args.folder, args.seed), indent=1))


if __name__ == "__main__":
    main()
