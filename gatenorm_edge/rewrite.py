"""Write a planned ``deci`` rewrite (``rewrite_plan``) of a GGUF: streamed, atomic, with the source's sha256.

Metadata is copied field by field as raw bytes (only renamed or new keys are encoded, by the plan),
tensor bytes go from file to file in the kernel (``copy_file_range``) or through a bounded buffer, and
only the reordered Q/K tensors and computed linear-attention matrices pass through memory, one at a
time. The output appears only when whole (``fileio.atomic_output``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.quants import quantize

from .errors import GatenormError
from .fileio import BackgroundSha256, atomic_output
from .progress import progress_bar
from .rewrite_plan import LinearMaps, RewritePlan, TensorCopy, align, plan_rewrite, row_geometry
from .sources.geometry import gguf_geometry
from .sources.rope_layout import hf_to_gguf_rows
from .window_plan import NO_SINK, plan_window

COPY_CHUNK = 64 << 20
HEADER_PAGE_SLACK = 1 << 20


@dataclass
class PruneResult:
    """What a rewrite did: attention-free layers of the output, sizes, and what was dropped."""

    source: str
    output: str
    architecture: str
    n_layers: int
    layers_pruned: list[int]
    layers_requested: list[int]
    bytes_in: int
    bytes_out: int
    dropped_bytes: int
    dropped_tensors: list[str]
    permuted_tensors: list[str]
    seconds: float
    source_sha256: str = ""
    linear_layers: list[int] = field(default_factory=list)
    linear_tensor_type: str | None = None
    target: str = "deci"
    windowed_layers: list[int] = field(default_factory=list)
    window: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)



def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int, advance: Callable[[int], None]) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``offset`` to the current position of ``dst_fd``."""
    while count > 0:
        step = min(count, COPY_CHUNK)
        try:
            copied = os.copy_file_range(src_fd, dst_fd, step, offset)
        except OSError:
            copied = 0
        if copied <= 0:
            block = os.pread(src_fd, step, offset)
            if not block:
                raise GatenormError("input file ended early while copying tensor data")
            _write_all(dst_fd, block)
            copied = len(block)
        offset += copied
        count -= copied
        advance(copied)


def _write_reordered(src_fd: int, dst_fd: int, copy: TensorCopy) -> None:
    n_rows, row_bytes = row_geometry(copy.info)
    raw = os.pread(src_fd, copy.info.n_bytes, copy.info.data_offset)
    if len(raw) != n_rows * row_bytes:
        raise GatenormError(f"input file ended early while reading {copy.name}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(n_rows, row_bytes)
    _write_all(dst_fd, hf_to_gguf_rows(rows, copy.rope_heads).tobytes())


def _write_computed(dst_fd: int, copy: TensorCopy, computed: Callable[[int], np.ndarray]) -> None:
    """Compute, quantize and write one layer's new tensor (a linear-attention matrix, rows = outputs; sinks)."""
    shape = tuple(reversed(copy.info.shape))
    values = np.asarray(computed(copy.computed_layer), dtype=np.float32)
    if values.shape != shape or not np.isfinite(values).all():
        raise GatenormError(f"{copy.name}: must be finite numbers of shape {shape}, not {values.shape}")
    data = quantize(values, copy.info.tensor_type).tobytes()
    if len(data) != copy.info.n_bytes:
        raise GatenormError(f"{copy.name}: quantized to {len(data)} bytes, expected {copy.info.n_bytes}")
    _write_all(dst_fd, data)


def check_output_path(src: Path, dst: Path, force: bool) -> None:
    """Refuse an output that is the input, a directory, an existing file without ``force``, or in no folder."""
    if (dst.exists() and os.path.samefile(src, dst)) or dst.resolve() == src.resolve():
        raise GatenormError(f"output {dst} is the input file; choose another output path")
    if dst.is_dir():
        raise GatenormError(f"output {dst} is a directory")
    if dst.exists() and not force:
        raise GatenormError(f"{dst} exists; pass --force to overwrite it")
    if not dst.parent.is_dir():
        raise GatenormError(f"output folder {dst.parent} does not exist")


def _check_free_space(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst.parent).free
    if free < needed + HEADER_PAGE_SLACK:
        raise GatenormError(
            f"not enough free disk space in {dst.parent}: the output needs {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB are free"
        )


def prune_gguf(
    src: Path,
    dst: Path,
    layers: Sequence[int],
    *,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    progress: bool = False,
    linear_maps: LinearMaps | None = None,
    linear: Collection[int] | None = None,
) -> PruneResult:
    """Write ``dst``: ``src`` as a ``deci`` GGUF whose ``layers`` (plus any already so) are attention-free.

    ``provenance`` entries are stored as ``gatenorm.<key>`` strings (e.g. ``{"variant": "per-head"}``).
    With ``linear_maps`` the ``linear`` ones of ``layers`` (default: all) become linear attention instead:
    ``linear_maps(layer)`` gives the n_embd x n_embd matrix (float, rows = outputs) written as that layer's
    ``attn_output``.
    """
    if linear_maps is None:
        linear = ()
    return _rewrite(
        src, dst, lambda: plan_rewrite(src, layers, provenance, linear=layers if linear is None else linear),
        force, progress, linear_maps,
    )


def window_gguf(
    src: Path,
    dst: Path,
    layers: Sequence[int],
    window: int,
    sinks: Callable[[int], np.ndarray] | None = None,
    *,
    force: bool = False,
    provenance: dict[str, str] | None = None,
    progress: bool = False,
) -> PruneResult:
    """Write ``dst``: ``src`` as a ``granite_swa`` GGUF whose ``layers`` attend to the last ``window`` tokens.

    ``sinks(layer)`` gives a windowed layer's attention-sink logits (one per head); without it, and for the
    layers that keep full attention, the sinks add nothing (``NO_SINK``).
    """

    def layer_sinks(layer: int) -> np.ndarray:
        if sinks is not None and layer in layers:
            return sinks(layer)
        return np.full(gguf_geometry(src).head_count[layer], NO_SINK, dtype=np.float32)

    return _rewrite(src, dst, lambda: plan_window(src, layers, window, provenance), force, progress, layer_sinks)


def _rewrite(
    src: Path, dst: Path, plan_of: Callable[[], RewritePlan], force: bool, progress: bool,
    computed: Callable[[int], np.ndarray] | None,
) -> PruneResult:
    """Plan (while the source is hashed in the background), check the disk, write; what was done."""
    started = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise GatenormError(f"{src}: no such file")
    check_output_path(src, dst, force)
    with BackgroundSha256(src) as sha256:  # hashed while the header is planned and the data copied
        plan = plan_of()
        _check_free_space(dst, plan.output_bytes)
        _write(src, dst, plan, sha256, force, progress, computed)
    return PruneResult(
        source=str(src),
        output=str(dst),
        architecture=plan.architecture,
        n_layers=plan.n_layers,
        layers_pruned=plan.attention_free,
        layers_requested=plan.requested,
        bytes_in=src.stat().st_size,
        bytes_out=dst.stat().st_size,
        dropped_bytes=sum(info.n_bytes for info in plan.dropped),
        dropped_tensors=[info.name for info in plan.dropped],
        permuted_tensors=[copy.name for copy in plan.tensors if copy.rope_heads is not None],
        seconds=time.perf_counter() - started,
        source_sha256=sha256.result(),
        linear_layers=plan.linear,
        linear_tensor_type=next((c.info.tensor_type.name for c in plan.tensors if c.computed_layer is not None), None) if plan.linear else None,
        target=plan.target,
        windowed_layers=plan.windowed,
        window=plan.window,
    )


def _write(
    src: Path, dst: Path, plan: RewritePlan, sha256: BackgroundSha256, force: bool, progress: bool,
    computed: Callable[[int], np.ndarray] | None,
) -> None:
    """Stream ``plan`` into ``dst`` atomically: header, copied or rewritten tensors, then the source hash."""
    bar = progress_bar(f"writing {dst.name}", plan.output_bytes, progress, in_bytes=True)
    with bar as advance, atomic_output(dst, force=force) as handle, open(src, "rb", buffering=0) as source:
        out_fd, src_fd = handle.fileno(), source.fileno()
        data_start = align(len(plan.header), plan.alignment)
        _write_all(out_fd, plan.header + bytes(data_start - len(plan.header)))
        advance(data_start)
        for copy in plan.tensors:
            padding = data_start + copy.out_offset - os.lseek(out_fd, 0, os.SEEK_CUR)
            _write_all(out_fd, bytes(padding))
            if copy.computed_layer is not None:
                _write_computed(out_fd, copy, computed)
                advance(copy.info.n_bytes)
            elif copy.rope_heads is None:
                _copy_range(src_fd, out_fd, copy.info.data_offset, copy.info.n_bytes, advance)
            else:
                _write_reordered(src_fd, out_fd, copy)
                advance(copy.info.n_bytes)
            advance(padding)
        os.fdatasync(out_fd)  # the data reaches the disk while the hash finishes; the final fsync is then small
        os.pwrite(out_fd, sha256.result().encode("ascii"), plan.sha256_offset)
