#!/usr/bin/env python3
"""Prefill and decode throughput of a LLaMA decoder with attention sublayers removed.

Reproduces the kind of figure the Gate-Norm paper reports (throughput of a 40-layer
13B LLaMA with 8-16 attention sublayers removed) on a CUDA GPU, and sets each measured
speedup beside its analytical expectation (fraction of FLOPs and of bytes moved saved).

Standalone: needs only torch (transformers only for --hf-model). A removed attention
sublayer does no attention work and has no KV cache; the residual stream passes through.

What is measured, per (batch, prompt length) cell and per configuration (0 removed, then
each K of --count): prefill = one forward over batch x prompt tokens filling the KV cache
(logits for the last position only, as in generation); decode = --gen single-token steps
(fixed random token ids: throughput does not depend on them). Configurations run
interleaved (warm-up rounds, then --repeats rounds, order rotated), and the median is kept;
a configuration that runs out of GPU memory is recorded as "oom" and the run goes on.
All configurations share one set of weights, so a removed layer's attention weights stay
resident (never read): out-of-memory limits are those of the full model's weights plus the
pruned model's KV cache.

Which layers: --layers (one explicit set), --plan (first K of a gatenorm-edge score JSON's
prune_order), --order gatenorm (per-head Gate-Norm on the loaded weights, lowest first),
--order last (the last K layers) or --order spread (K layers spread evenly over 1..L-1).
Default: gatenorm for --hf-model, last for random weights (all layers have the same shape,
so which ones does not change the work; the last ones are what Gate-Norm tends to pick).
Layer 0 always keeps its attention.

Examples:
  # the full table on a GPU (LLaMA-13B shape, random fp16 weights, last layers removed)
  python tools/gpu_throughput.py --json gpu_throughput.json
  # a real checkpoint, layers chosen by Gate-Norm (per-head) on its weights
  python tools/gpu_throughput.py --hf-model ./llama-13b-hf --count 8,12,16
  # layers from a gatenorm-edge score JSON, or an explicit set
  python tools/gpu_throughput.py --plan score.json --count 8
  python tools/gpu_throughput.py --layers 30,32,34,36,38
  # seconds on a CPU (what CI runs)
  python tools/gpu_throughput.py --tiny --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class UsageError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """Hyper-parameters of a LLaMA-style decoder."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.hd


def shape_from_hf_config(config: object, rope_theta: float = 10000.0) -> Shape:
    """The decoder shape an HF config describes (``tests`` hold it equal to the package's ModelGeometry)."""
    return Shape(n_layers=config.num_hidden_layers, dim=config.hidden_size, n_heads=config.num_attention_heads,
                 n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                 ffn=config.intermediate_size, vocab=config.vocab_size,
                 head_dim=getattr(config, "head_dim", None) or 0, norm_eps=config.rms_norm_eps,
                 rope_theta=rope_theta)


LLAMA_13B = Shape(n_layers=40, dim=5120, n_heads=40, n_kv_heads=40, ffn=13824, vocab=32000)
TINY = Shape(n_layers=6, dim=128, n_heads=4, n_kv_heads=2, ffn=352, vocab=512)


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Attention:
    """One attention sublayer's weights (nn.Linear layout: out x in)."""

    norm: torch.Tensor
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None


@dataclass(frozen=True)
class Block:
    """One decoder layer; attn is None when the attention sublayer is removed."""

    attn: Attention | None
    ffn_norm: torch.Tensor
    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor


class KVCache:
    """Preallocated keys/values, only for the layers that keep attention."""

    def __init__(self, shape: Shape, layers: Sequence[int], batch: int, max_len: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        size = (batch, shape.n_kv_heads, max_len, shape.hd)
        self.kv = {i: (torch.empty(size, device=device, dtype=dtype),
                       torch.empty(size, device=device, dtype=dtype)) for i in layers}
        self.length = 0

    @property
    def layers(self) -> list[int]:
        return sorted(self.kv)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv.values())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder:
    """LLaMA decoder (RMSNorm, RoPE in the HF half-split layout, SwiGLU) with a KV cache."""

    def __init__(self, shape: Shape, embed: torch.Tensor, blocks: list[Block],
                 norm: torch.Tensor, lm_head: torch.Tensor) -> None:
        self.shape, self.embed, self.blocks, self.norm, self.lm_head = shape, embed, blocks, norm, lm_head
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.attn is not None]

    def without_attention(self, layers: Sequence[int]) -> Decoder:
        """A view sharing all weights, with the attention sublayers of `layers` removed."""
        drop = set(layers)
        blocks = [replace(b, attn=None) if i in drop else b for i, b in enumerate(self.blocks)]
        return Decoder(self.shape, self.embed, blocks, self.norm, self.lm_head)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.shape, self.attention_layers, batch, max_len, self.device, self.dtype)

    def rope(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].shape[0] < start + n:
            length = max(start + n, 4096)
            hd = self.shape.hd
            inv = 1.0 / self.shape.rope_theta ** (torch.arange(0, hd, 2, device=self.device).double() / hd)
            freqs = torch.outer(torch.arange(length, device=self.device).double(), inv)
            angles = torch.cat((freqs, freqs), dim=-1)
            self._rope = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))
        cos, sin = self._rope
        return cos[start:start + n], sin[start:start + n]

    def attention(self, a: Attention, x: torch.Tensor, start: int,
                  kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        s = self.shape
        batch, n, _ = x.shape
        h = rms_norm(x, a.norm, s.norm_eps)
        q = F.linear(h, a.wq, a.bq).view(batch, n, s.n_heads, s.hd).transpose(1, 2)
        k = F.linear(h, a.wk, a.bk).view(batch, n, s.n_kv_heads, s.hd).transpose(1, 2)
        v = F.linear(h, a.wv, a.bv).view(batch, n, s.n_kv_heads, s.hd).transpose(1, 2)
        cos, sin = self.rope(start, n)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if kv is not None:
            k_cache, v_cache = kv
            k_cache[:, :, start:start + n] = k
            v_cache[:, :, start:start + n] = v
            k, v = k_cache[:, :, :start + n], v_cache[:, :, :start + n]
        mask = None
        if 1 < n < start + n:  # several new tokens after cached ones: explicit causal mask
            mask = torch.arange(n, device=x.device)[:, None] + start >= torch.arange(start + n, device=x.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start == 0 and n > 1,
                                             enable_gqa=s.n_kv_heads != s.n_heads)
        return F.linear(out.transpose(1, 2).reshape(batch, n, s.q_dim), a.wo)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits for tokens (batch x n) that follow the cache's contents (or start a sequence)."""
        s = self.shape
        start = cache.length if cache is not None else 0
        x = F.embedding(tokens, self.embed)
        for i, b in enumerate(self.blocks):
            if b.attn is not None:
                x = x + self.attention(b.attn, x, start, cache.kv[i] if cache is not None else None)
            h = rms_norm(x, b.ffn_norm, s.norm_eps)
            x = x + F.linear(F.silu(F.linear(h, b.w_gate)) * F.linear(h, b.w_up), b.w_down)
        if cache is not None:
            cache.length = start + tokens.shape[1]
        if last_only:
            x = x[:, -1:]
        return F.linear(rms_norm(x, self.norm, s.norm_eps), self.lm_head)


def random_decoder(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Decoder:
    """Random weights created on the device in the target dtype (no host copy of the model)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(rows: int, cols: int) -> torch.Tensor:
        return torch.empty(rows, cols, device=device, dtype=dtype).normal_(0.0, cols ** -0.5, generator=gen)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    s = shape
    blocks = [Block(attn=Attention(norm=ones(s.dim), wq=normal(s.q_dim, s.dim), wk=normal(s.kv_dim, s.dim),
                                   wv=normal(s.kv_dim, s.dim), wo=normal(s.dim, s.q_dim)),
                    ffn_norm=ones(s.dim), w_gate=normal(s.ffn, s.dim), w_up=normal(s.ffn, s.dim),
                    w_down=normal(s.dim, s.ffn))
              for _ in range(s.n_layers)]
    embed = torch.empty(s.vocab, s.dim, device=device, dtype=dtype).normal_(0.0, 1.0, generator=gen)
    return Decoder(s, embed, blocks, ones(s.dim), normal(s.vocab, s.dim))


def hf_decoder(path: Path, device: torch.device, dtype: torch.dtype) -> Decoder:
    """A LLaMA-family HF checkpoint (llama, mistral, qwen2) loaded with transformers."""
    if not (path / "config.json").is_file():
        raise UsageError(f"--hf-model {path}: not a Hugging Face model folder (no config.json)")
    try:
        import transformers
    except ImportError:
        raise UsageError("--hf-model needs the transformers package (pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type not in ("llama", "mistral", "qwen2"):
        raise UsageError(f"{path}: model_type {config.model_type!r} is not LLaMA-shaped (llama, mistral, qwen2)")
    rope = getattr(config, "rope_parameters", None) or {}
    theta = getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    scaling = getattr(config, "rope_scaling", None) or rope
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        print(f"note: {path}: RoPE scaling is not modelled (throughput is unaffected)", file=sys.stderr)
    shape = shape_from_hf_config(config, float(theta))
    dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, low_cpu_mem_usage=True, **{dtype_arg: dtype})

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().to(device=device, dtype=dtype)

    blocks = []
    for layer in hf.model.layers:  # moved to the device one tensor at a time
        at, mlp = layer.self_attn, layer.mlp
        if getattr(at.o_proj, "bias", None) is not None:
            raise UsageError(f"{path}: attention output bias is not supported")
        blocks.append(Block(attn=Attention(norm=take(layer.input_layernorm.weight), wq=take(at.q_proj.weight),
                                           wk=take(at.k_proj.weight), wv=take(at.v_proj.weight),
                                           wo=take(at.o_proj.weight), bq=take(at.q_proj.bias),
                                           bk=take(at.k_proj.bias), bv=take(at.v_proj.bias)),
                            ffn_norm=take(layer.post_attention_layernorm.weight), w_gate=take(mlp.gate_proj.weight),
                            w_up=take(mlp.up_proj.weight), w_down=take(mlp.down_proj.weight)))
    embed = take(hf.model.embed_tokens.weight)
    tied = hf.lm_head.weight is hf.model.embed_tokens.weight
    return Decoder(shape, embed, blocks, take(hf.model.norm.weight), embed if tied else take(hf.lm_head.weight))


# ----------------------------------------------------------------------------- which layers


def gate_norm_scores(model: Decoder) -> list[float]:
    """Per-head Gate-Norm: sqrt(sum_h tr((Wq_h Wq_h^T)(Wk_g Wk_g^T))), g the KV head of head h."""
    s = model.shape
    scores = []
    for b in model.blocks:
        if b.attn is None:
            raise UsageError("Gate-Norm needs every layer's attention weights")
        q = b.attn.wq.float().view(s.n_heads, s.hd, s.dim)
        k = b.attn.wk.float().view(s.n_kv_heads, s.hd, s.dim)
        gram_q = q @ q.transpose(1, 2)  # heads x hd x hd
        gram_k = (k @ k.transpose(1, 2)).repeat_interleave(s.n_heads // s.n_kv_heads, dim=0)
        scores.append(math.sqrt(float((gram_q * gram_k).sum())))  # tr(AB) = sum(A * B^T), both symmetric
    return scores


def positional_layers(where: str, k: int, n_layers: int) -> list[int]:
    """k layers (never layer 0): the last ones, or spread evenly over 1..n_layers-1."""
    if where == "last":
        return list(range(n_layers - k, n_layers))
    return sorted({n_layers - 1 - round(i * (n_layers - 1) / k) for i in range(k)})


def read_plan(path: Path, n_layers: int) -> list[int]:
    """prune_order from a gatenorm-edge score JSON, checked against the model."""
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read score JSON ({exc})") from None
    order = plan.get("prune_order") if isinstance(plan, dict) else None
    if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in order):
        raise UsageError(f"{path}: no 'prune_order' list of layer indices")
    if isinstance(plan.get("n_layers"), int) and plan["n_layers"] != n_layers:
        raise UsageError(f"{path}: plan is for {plan['n_layers']} layers, the model has {n_layers}")
    return order


def check_layers(layers: Sequence[int], n_layers: int, what: str) -> None:
    """Refuse repeated, out-of-range layers and layer 0 (llama.cpp takes the head size from it)."""
    if len(set(layers)) != len(layers):
        raise UsageError(f"{what}: layer listed twice")
    for i in layers:
        if i == 0:
            raise UsageError(f"{what}: layer 0 cannot be made attention-free")
        if not 0 < i < n_layers:
            raise UsageError(f"{what}: layer {i} out of range 1..{n_layers - 1}")


# ----------------------------------------------------------------------------- analytical model


def expected_savings(s: Shape, removed: int, batch: int, prompt: int, gen: int, elem_bytes: int) -> dict:
    """Fractions of FLOPs and bytes moved that removing `removed` attention sublayers saves.

    FLOPs count matmuls only (2 per multiply-add): projections, the attention core
    (QK^T and PV over the causal context) and the LM head (prefill: last position only).
    Bytes: every weight read once per forward, plus the KV cache: written in prefill,
    read in full and appended to at each decode step. Activations are left out.
    """
    L, d, f = s.n_layers, s.dim, s.ffn
    kept = L - removed
    attn_proj = 2 * d * (2 * s.q_dim + 2 * s.kv_dim)  # per token
    ffn = 2 * 3 * d * f
    head = 2 * d * s.vocab
    ctx_prefill = prompt * (prompt + 1) // 2  # sum of causal context lengths
    ctx_decode = gen * prompt + gen * (gen + 1) // 2  # step t attends to prompt + t + 1 keys
    core = 4 * s.q_dim  # per (token, key) pair
    attn_weights = elem_bytes * (d * (2 * s.q_dim + 2 * s.kv_dim) + d)
    other_weights = elem_bytes * (L * (3 * d * f + d) + d + s.vocab * d)
    kv_token = 2 * s.kv_dim * elem_bytes  # one token's K and V in one layer

    prefill_attn = prompt * attn_proj + core * ctx_prefill
    prefill_flops = batch * (L * prompt * ffn + kept * prefill_attn + head)
    prefill_bytes = (other_weights + batch * prompt * d * elem_bytes + kept * attn_weights
                     + kept * batch * prompt * kv_token)
    decode_attn = gen * attn_proj + core * ctx_decode
    decode_flops = batch * (gen * L * ffn + kept * decode_attn + gen * head)
    decode_kv = batch * kv_token * (ctx_decode + gen)  # reads of the whole context plus the append
    decode_bytes = gen * (other_weights + batch * d * elem_bytes + kept * attn_weights) + kept * decode_kv
    out = {}
    for phase, flops, nbytes, saved_flops, saved_bytes, bound in (
        ("prefill", prefill_flops, prefill_bytes, batch * removed * prefill_attn,
         removed * (attn_weights + batch * prompt * kv_token), "flops"),
        ("decode", decode_flops, decode_bytes, batch * removed * decode_attn,
         removed * (gen * attn_weights + decode_kv), "bytes"),
    ):
        fl = saved_flops / (flops + saved_flops)
        by = saved_bytes / (nbytes + saved_bytes)
        out[phase] = {"flops": flops, "bytes": nbytes, "flops_saved": fl, "bytes_saved": by,
                      "ideal_speedup_flops": 1 / (1 - fl), "ideal_speedup_bytes": 1 / (1 - by),
                      "bound": bound, "ideal_speedup": 1 / (1 - (fl if bound == "flops" else by))}
    return out


# ----------------------------------------------------------------------------- timing


def timed(device: torch.device, fn: Callable[[], object]) -> float:
    """Seconds fn takes; CUDA events after a synchronize on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_once(model: Decoder, batch: int, prompt: int, gen: int, seed: int) -> dict:
    """One prefill of batch x prompt tokens, then gen single-token decode steps (fixed random ids)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    tokens = torch.randint(model.shape.vocab, (batch, prompt + gen), device=model.device, generator=g)
    cache = model.new_cache(batch, prompt + gen)
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(model.device)
    prefill = timed(model.device, lambda: model.forward(tokens[:, :prompt], cache, last_only=True))

    def decode() -> None:
        for t in range(prompt, prompt + gen):
            model.forward(tokens[:, t:t + 1], cache)

    decode_s = timed(model.device, decode)
    peak = torch.cuda.max_memory_allocated(model.device) if model.device.type == "cuda" else None
    return {"prefill_s": prefill, "decode_s": decode_s, "kv_cache_layers": cache.layers,
            "kv_cache_bytes": cache.nbytes, "peak_memory_bytes": peak}


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_cell(models: list[tuple[list[int], Decoder]], batch: int, prompt: int, gen: int,
                 warmup: int, repeats: int) -> list[dict]:
    """Interleaved runs of every configuration for one (batch, prompt) cell; medians per configuration."""
    runs: list[list[dict]] = [[] for _ in models]
    oom = [False] * len(models)
    for rep in range(warmup + repeats):
        order = list(range(len(models)))
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate to spread drift evenly
        for c in order:
            if oom[c]:
                continue
            try:
                result = run_once(models[c][1], batch, prompt, gen, seed=rep)
            except torch.cuda.OutOfMemoryError:
                oom[c] = True
                result = None
            free_memory(models[c][1].device)
            if result is not None and rep >= warmup:
                runs[c].append(result)
    cells = []
    for (layers, _), samples, failed in zip(models, runs, oom, strict=True):
        for phase, tokens in (("prefill", batch * prompt), ("decode", batch * gen)):
            cell = {"phase": phase, "batch": batch, "prompt": prompt, "gen": gen, "removed": len(layers),
                    "layers": layers, "status": "oom" if failed else "ok"}
            if not failed:
                seconds = [r[f"{phase}_s"] for r in samples]
                cell.update(seconds=seconds, tokens_per_s=tokens / statistics.median(seconds),
                            kv_cache_layers=samples[0]["kv_cache_layers"],
                            kv_cache_bytes=samples[0]["kv_cache_bytes"],
                            peak_memory_bytes=samples[0]["peak_memory_bytes"])
            cells.append(cell)
    return cells


def add_speedups(cells: list[dict], shape: Shape, elem_bytes: int) -> None:
    """Measured speedup over the unpruned configuration, and the analytical expectation."""
    base = {(c["phase"], c["batch"], c["prompt"]): c for c in cells if c["removed"] == 0}
    for c in cells:
        ref = base[(c["phase"], c["batch"], c["prompt"])]
        ok = c["status"] == "ok" and ref["status"] == "ok"
        c["speedup"] = c["tokens_per_s"] / ref["tokens_per_s"] if ok else None
        c["expected"] = expected_savings(shape, c["removed"], c["batch"], c["prompt"], c["gen"],
                                         elem_bytes)[c["phase"]]


# ----------------------------------------------------------------------------- output


def markdown(report: dict) -> str:
    s = report["model"]
    lines = [f"device: {report['device']}, dtype {report['dtype']}, attention: {report['sdpa']}, "
             f"model: {report['model']['source']} ({s['n_layers']} layers, width {s['dim']}, "
             f"{s['n_heads']} heads), {report['settings']['gen']} generated tokens, "
             f"median of {report['settings']['repeats']}",
             f"removed attention sublayers ({report['selection']['method']}): "
             + "; ".join(f"{c['removed']}: {c['layers']}" for c in report["configs"][1:]), ""]
    for phase, bound in (("prefill", "FLOPs"), ("decode", "bytes")):
        lines += [f"### {phase} (ideal speedup from the {bound} saved)", "",
                  "| batch | prompt | removed | tokens/s | speedup | FLOPs saved | bytes saved | ideal speedup |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in report["results"]:
            if c["phase"] != phase:
                continue
            e = c["expected"]
            tps = "oom" if c["status"] == "oom" else f"{c['tokens_per_s']:.1f}"
            speed = "–" if c["speedup"] is None else f"{c['speedup']:.3f}×"
            lines.append(f"| {c['batch']} | {c['prompt']} | {c['removed']} | {tps} | {speed} | "
                         f"{e['flops_saved']:.1%} | {e['bytes_saved']:.1%} | {e['ideal_speedup']:.3f}× |")
        lines.append("")
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Atomic write: temporary file beside the target, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- main


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="small 6-layer model on the CPU in float32, small defaults (seconds; for CI)")
    p.add_argument("--hf-model", type=Path, metavar="DIR", help="HF checkpoint folder (needs transformers)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--layers", type=int_list, help="remove exactly these attention sublayers (one row)")
    which.add_argument("--plan", type=Path, metavar="SCORE.json",
                       help="remove the first K of the score JSON's prune_order, for each K of --count")
    which.add_argument("--order", choices=("last", "spread", "gatenorm"),
                       help="which K layers: the last ones, spread evenly, or Gate-Norm per-head on the loaded "
                            "weights (default: gatenorm for --hf-model, last for random weights)")
    p.add_argument("--count", type=int_list, metavar="K[,K...]",
                   help="numbers of attention sublayers to remove (default 8,12,16; --tiny 1,2,3); "
                        "0 (the baseline) is always measured")
    p.add_argument("--batch", type=int_list, help="batch sizes (default 1,8,32; --tiny 1,2)")
    p.add_argument("--prompt", type=int_list, help="prompt lengths (default 128,512,2048; --tiny 16,32)")
    p.add_argument("--gen", type=int, help="generated tokens per decode run (default 128; --tiny 8)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration and cell (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default float16 on CUDA, float32 on the CPU")
    p.add_argument("--device", help="torch device (default cuda; --tiny cpu)")
    p.add_argument("--sdpa", choices=("flash", "auto"), default="flash",
                   help="flash: FlashAttention backend where the device supports it (default); auto: torch's choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="PATH", help="write the full results as JSON")
    args = p.parse_args(argv)
    args.count = args.count if args.count is not None else ([1, 2, 3] if args.tiny else [8, 12, 16])
    args.batch = args.batch or ([1, 2] if args.tiny else [1, 8, 32])
    args.prompt = args.prompt or ([16, 32] if args.tiny else [128, 512, 2048])
    args.gen = args.gen if args.gen is not None else (8 if args.tiny else 128)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    return args


def choose_sdpa(mode: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[Callable, str]:
    """A context that restricts SDPA to FlashAttention where it runs here, else torch's own choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if mode == "flash" and device.type == "cuda":
        q = torch.zeros(1, 1, 2, head_dim, device=device, dtype=dtype)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            return (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), "SDPA, FlashAttention backend"
        except RuntimeError:
            return contextlib.nullcontext, "SDPA, torch's choice (FlashAttention unavailable here)"
    return contextlib.nullcontext, "SDPA, torch's choice"


def layer_sets(args: argparse.Namespace, model: Decoder) -> tuple[list[list[int]], dict]:
    """The removed-layer sets to measure (the empty set first) and how they were chosen."""
    n = model.shape.n_layers
    if args.layers is not None:
        check_layers(args.layers, n, "--layers")
        return [[], sorted(args.layers)], {"method": "layers"}
    for k in args.count:
        if not 0 < k < n:
            raise UsageError(f"--count {k}: must be between 1 and {n - 1} (layer 0 keeps its attention)")
    if args.plan is not None:
        order = read_plan(args.plan, n)
        check_layers(order, n, str(args.plan))
        if max(args.count) > len(order):
            raise UsageError(f"{args.plan}: prune_order lists {len(order)} layers, --count asks {max(args.count)}")
        return [[]] + [sorted(order[:k]) for k in args.count], {"method": "plan", "prune_order": order}
    method = args.order or ("gatenorm" if args.hf_model else "last")
    if method == "gatenorm":
        scores = gate_norm_scores(model)
        order = sorted(range(1, n), key=lambda i: scores[i])
        return [[]] + [sorted(order[:k]) for k in args.count], {"method": "gatenorm", "scores": scores,
                                                                  "prune_order": order}
    return [[]] + [positional_layers(method, k, n) for k in args.count], {"method": method}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA device here: run with --tiny (CPU smoke run) or --device cpu")
    if min(args.batch + args.prompt) < 1 or args.gen < 1 or args.repeats < 1 or args.warmup < 0:
        raise UsageError("--batch, --prompt, --gen and --repeats must be positive, --warmup not negative")
    if args.json is not None and not args.json.parent.is_dir():
        raise UsageError(f"--json {args.json}: folder does not exist")
    dtype = DTYPES[args.dtype]
    if args.hf_model is not None:
        model, source = hf_decoder(args.hf_model, device, dtype), str(args.hf_model)
    else:
        model = random_decoder(TINY if args.tiny else LLAMA_13B, device, dtype, args.seed)
        source = f"random weights ({'tiny' if args.tiny else 'LLaMA-13B'} shape)"
    sets, selection = layer_sets(args, model)
    sdpa_context, sdpa_name = choose_sdpa(args.sdpa, device, dtype, model.shape.hd)
    configs = [(layers, model.without_attention(layers)) for layers in sets]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: list[dict] = []
    with torch.inference_mode(), sdpa_context():
        for batch in args.batch:
            for prompt in args.prompt:
                print(f"measuring batch {batch}, prompt {prompt} ({len(configs)} configurations)", file=sys.stderr)
                results += measure_cell(configs, batch, prompt, args.gen, args.warmup, args.repeats)
    add_speedups(results, model.shape, torch.empty(0, dtype=dtype).element_size())
    report = {
        "tool": "tools/gpu_throughput.py",
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "sdpa": sdpa_name,
        "model": {"source": source, **{k: getattr(model.shape, k) for k in
                                       ("n_layers", "dim", "n_heads", "n_kv_heads", "ffn", "vocab")},
                  "head_dim": model.shape.hd},
        "selection": selection,
        "configs": [{"removed": len(layers), "layers": layers, "attention_layers": m.attention_layers}
                    for layers, m in configs],
        "settings": {"batch": args.batch, "prompt": args.prompt, "gen": args.gen, "warmup": args.warmup,
                     "repeats": args.repeats, "seed": args.seed},
        "results": results,
    }
    print(markdown(report))
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
