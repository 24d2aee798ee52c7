"""Issue 29's go/no-go: windowed files against today's attention-free files of the same predicted tg speed at a
depth (1.1x, 1.2x, 1.3x at 8192), with llama.cpp's default F16 KV cache and with a q8_0 one.

Per model: the speed model of this CPU (drops, patches, windows of W tokens, every cache type of the unchanged
model), then per target the file `prune --speedup X --depth D` writes with today's data-free default (the
self-sampled start texts, 16 x 256 tokens: layers dropped or patched) and the one `prune --mode window` writes.
Then, one measure at a time over every file and cache type (so a run stopped part-way has whole columns): PPL on
WikiText-2 test at ctx 4096 and 8192, pass-key at 2k, 4k and 8k, the KV cache at 32k tokens (the geometry's
figure, and llama.cpp's own allocation where the model's context allows), and tg at the depth measured by
`bench --vs` against the base with an F16 cache (interleaved, in fresh process sets) and llama-bench, each beside
the prediction of this CPU's speed model for the file (a file planned on another CPU is still timed here).

Resumable: every plan, file and measurement is cached in OUT; a finished item is never recomputed.

Usage: python tools/window_study.py MODEL OUT [--window 512] [--depth 8192] [--targets 1.1,1.2,1.3]
                                    [--measures ppl4096,pk2048,...] [--caches f16,q8_0] [--stages plan,quality,speed]
                                    [--files drop-x1.3,window-x1.3]
       python tools/window_study.py --table NAME=OUT [NAME=OUT ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatenorm_edge.budget import Budget, plan_to_budget
from gatenorm_edge.chooser import WINDOW, most_layers, template
from gatenorm_edge.frontier import cached_json
from gatenorm_edge.harness.llama_bench import interleaved
from gatenorm_edge.harness.model import default_threads, open_model
from gatenorm_edge.harness.passkey import passkey
from gatenorm_edge.harness.perplexity import perplexity
from gatenorm_edge.harness.selfcal import CalibrationSpec
from gatenorm_edge.harness.speed import bench, paired_ratio
from gatenorm_edge.rewrite import window_gguf
from gatenorm_edge.selfprune import SelfCalibratedPruner, write_plan
from gatenorm_edge.sources.geometry import gguf_geometry
from gatenorm_edge.speedmodel import Change, SpeedModel, change_of, cpu_name, measure_speed_model, speed_settings
from gatenorm_edge.windows import WindowChooser

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
TODAY = CalibrationSpec(source="starts", tokens=16 * 256)  # the data-free default before issue 28
MEASURES = ("ppl4096", "pk4096", "pk2048", "ppl8192", "pk8192")
KV_CELLS = 32768
LLAMA_BENCH_ROUNDS = 3


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def deepest(model: Path, depth: int) -> int:
    """``depth`` cut to what the training context holds (SmolLM2: 7936 for 8192)."""
    return speed_settings(model, (depth,)).depths[-1]


def speed_models(model: Path, depth: int, window: int, caches: list[str]) -> dict[str, SpeedModel]:
    """This CPU's speed models of ``model`` at depths 0 and ``depth``, one per cache type (F16 and ``caches``),
    timed on every core whatever ``threads`` the quality runs use; cached, so measured once per CPU."""
    settings = speed_settings(model, (0, depth))
    return {cache: measure_speed_model(model, dataclasses.replace(settings, cache_type=cache), window=window,
                                       progress=sys.stderr.isatty()) for cache in dict.fromkeys(("f16", *caches))}


def plans(model: Path, out: Path, targets: list[float], depth: int, window: int, threads: int | None,
          caches: list[str]) -> dict[str, Any]:
    """Per target: the drop plan (today's default) and the window plan, their files and predicted speedups (with
    the F16 cache, and with each other cache type of ``caches``: a speed model at depth per type)."""
    speeds = speed_models(model, depth, window, caches)
    depth = deepest(model, depth)
    n_layers = gguf_geometry(model).n_layers
    for kind, mode in (("drop", "auto"), ("window", WINDOW)):
        missing = [t for t in targets if read(out / f"plan-{kind}-x{t}.json") is None]
        if missing:
            with contextlib.closing(
                SelfCalibratedPruner(model, spec=TODAY, n_threads=threads) if kind == "drop"
                else WindowChooser(model, window, n_threads=threads)
            ) as planner:
                plan = planner.plan
                for target in missing:
                    chosen, entry = plan_to_budget(model, Budget(speedup=target, depth=depth), plan,
                                                   speeds["f16"], most_layers(mode, n_layers), template(mode, window, "f16"))
                    path = out / f"{kind}-x{target}.gguf"
                    if kind == "drop":
                        write_plan(model, path, chosen, force=True, progress=False)
                    else:
                        window_gguf(model, path, chosen.layers, window, planner.sinks, force=True, provenance=chosen.provenance())
                    q8 = speeds["q8_0"].speedup("tg", depth, chosen.change("q8_0")) if "q8_0" in speeds else None
                    record = {"kind": kind, "target": target, "depth": depth, "layers": chosen.layers,
                              "change": dataclasses.asdict(chosen.change()), "held_out_kld": chosen.held_out_kld,
                              "predicted": entry, "predicted_tg_q8_0": q8, "file": path.name}
                    (out / f"plan-{kind}-x{target}.json").write_text(json.dumps(record, indent=1) + "\n")
                    print(f"{kind} x{target}: {len(chosen.layers)} layers, predicted tg {entry['tg_speedup']:.3f}"
                          + (f" (q8_0 {q8:.3f})" if q8 is not None else ""), flush=True)
    cached_json(out / "cache-alone.json", lambda: {  # the F16 model times the unchanged model with every type
        cache: speeds["f16"].speedup("tg", depth, Change(cache_type=cache)) for cache in ("f16", "q8_0")})
    return saved_plans(out, targets)


def saved_plans(out: Path, targets: list[float]) -> dict[str, Any]:
    """The drop and window plans written for ``targets`` so far, by name (``drop-x1.2``)."""
    return {f"{kind}-x{t}": plan for kind in ("drop", "window") for t in targets
            if (plan := read(out / f"plan-{kind}-x{t}.json")) is not None}


def measure(name: str, path: Path, cache: str, threads: int | None, chunks: int) -> Callable[[], dict[str, Any]]:
    """The computation of one measure of one file with one cache type (``chunks`` at ctx 4096, 3 above)."""
    if name.startswith("ppl"):
        ctx = int(name[3:])
        chunks = chunks if ctx <= 4096 else 3
        return lambda: perplexity(path, WIKI, ctx=ctx, chunks=chunks, n_threads=threads, cache_type=cache).to_dict()
    ctx = int(name[2:])
    return lambda: passkey(path, ctx, 5, n_threads=threads, cache_type=cache).to_dict()


def kv_figures(model: Path, path: Path) -> dict[str, Any]:
    """KV bytes at 32k tokens, F16 and q8_0: from the geometry, and llama.cpp's own where the context allows."""
    figures: dict[str, Any] = {}
    trained = gguf_geometry(model).context_length or 0
    for cache in ("f16", "q8_0"):
        figures[f"derived_{cache}"] = change_of(path, cache).kv_bytes(path, KV_CELLS)
        if trained >= KV_CELLS:
            with contextlib.closing(open_model(path, n_ctx=KV_CELLS, n_threads=1, cache_type=cache)) as loaded:
                figures[f"llama_cpp_{cache}"] = loaded.kv_bytes
    return figures


def study(args: argparse.Namespace) -> None:
    model, out = args.model, args.out
    out.mkdir(parents=True, exist_ok=True)
    targets = [float(t) for t in args.targets.split(",")]
    stages = args.stages.split(",")
    if "plan" in stages:
        found = plans(model, out, targets, args.depth, args.window, args.threads, args.caches.split(","))
    else:  # the plans an earlier run wrote: their files are what the other stages measure
        found = saved_plans(out, targets)
    files = {"base": model} | {name: out / plan["file"] for name, plan in found.items()
                               if not args.files or name in args.files.split(",")}
    if "quality" in stages:
        for measure_name in args.measures.split(","):
            for cache in args.caches.split(","):
                for name, path in files.items():
                    cached_json(out / f"{measure_name}-{cache}-{name}.json", measure(measure_name, path, cache, args.threads, args.chunks))
                print(f"{measure_name} {cache}: done", flush=True)
        for name, path in files.items():
            cached_json(out / f"kv32k-{name}.json", lambda: kv_figures(model, path))
    if "speed" in stages:  # each measurement beside the prediction of the CPU that made it (plans may be older)
        depth = deepest(model, args.depth)
        settings = dataclasses.replace(speed_settings(model, (depth,)), reps=1, processes=3)  # every core
        speeds = functools.cache(lambda: speed_models(model, args.depth, args.window, args.caches.split(",")))

        def here(path: Path, cache: str) -> dict[str, Any]:  # asked only for a missing measurement: on a new CPU
            predicted = speeds()[cache].speedup("tg", depth, change_of(path, cache))  # the models take an hour
            return {"prediction": {"cpu": cpu_name(), "tg_speedup": predicted}}

        for name, path in files.items():
            for cache in args.caches.split(","):
                if name == "base" and cache == "f16":
                    continue
                cached_json(out / f"speed-{cache}-{name}.json", lambda: bench(
                    [model, path], settings, cache_types=["f16", cache]).to_dict() | here(path, cache))
                cached_json(out / f"llama-bench-{cache}-{name}.json", lambda: {"depth": depth, "tg_tps": interleaved(
                    [(model, "f16"), (path, cache)], depth, settings.gen, LLAMA_BENCH_ROUNDS, default_threads())}
                    | here(path, cache))
                print(f"speed {cache} {name}: done", flush=True)


def cell(out: Path, measure_name: str, cache: str, name: str) -> str:
    item, base = read(out / f"{measure_name}-{cache}-{name}.json"), read(out / f"{measure_name}-f16-base.json")
    if item is None:
        return "—"
    if measure_name.startswith("pk"):
        return f"{round(100 * item['accuracy'])}%"
    ratio = f" ({item['ppl'] / base['ppl']:.2f}×)" if base else ""
    return f"{item['ppl']:.2f} ± {item['ppl_stderr']:.2f}{ratio}"


def ratio_cell(base: list[float], changed: list[float], planned: float | None, measured: dict[str, Any]) -> str:
    """The median of round-by-round ratios, their range, and the prediction's error against the median: the
    prediction of the CPU that measured, where the measurement recorded one (and then named), else the plan's."""
    rounds = [after / before for after, before in zip(changed, base)]
    ratio = paired_ratio(changed, base)
    own = measured.get("prediction")
    predicted = own["tg_speedup"] if own else planned
    error = f", {100 * (predicted / ratio - 1):+.1f}%" if predicted else ""
    named = f" of {own['tg_speedup']:.3f}× predicted on {own['cpu']}" if own else ""
    return f"{ratio:.3f}× ({min(rounds):.2f}–{max(rounds):.2f}){error}{named}"


def speed_cell(out: Path, cache: str, name: str, predicted: float | None) -> str:
    speed = read(out / f"speed-{cache}-{name}.json")
    if speed is None:
        return "—"
    depth = str(speed["depths"][0])
    base, changed = (speed["tg_tps"][label][depth]["samples"] for label in speed["models"])
    return ratio_cell(base, changed, predicted, speed)


def llama_bench_cell(out: Path, cache: str, name: str, predicted: float | None) -> str:
    measured = read(out / f"llama-bench-{cache}-{name}.json")
    return "—" if measured is None else ratio_cell(*measured["tg_tps"], predicted, measured)


def table(studies: list[tuple[str, Path]]) -> str:
    """One row per model, file and cache type: the predicted and measured tg, PPL, pass-key and KV at 32k."""
    lines = ["| model | file | KV cache | layers | tg predicted | tg `bench --vs` (range, error) | tg llama-bench (range, "
             "error) | PPL ctx 4096 | PPL ctx 8192 | pass-key 2k / 4k / 8k | KV at 32k |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for label, out in studies:
        alone = read(out / "cache-alone.json") or {}
        for cache in ("f16", "q8_0"):
            plans_ = [("base", None)] + [(p.stem[5:], json.loads(p.read_text())) for p in sorted(out.glob("plan-*.json"))]
            for name, plan in plans_:
                predicted = None if plan is None else plan["predicted"]["tg_speedup"] if cache == "f16" else plan["predicted_tg_q8_0"]
                if plan is None and cache != "f16":
                    predicted = alone.get(cache)
                kv = read(out / f"kv32k-{name}.json") or {}
                kv_cell = f"{kv.get(f'derived_{cache}', 0) / 2**20:.0f} MiB" if kv else "—"
                keys = " / ".join(cell(out, f"pk{ctx}", cache, name) for ctx in (2048, 4096, 8192))
                layers = "" if plan is None else str(len(plan["layers"]))
                lines.append(
                    f"| {label} | {name} | {cache} | {layers} | {'' if predicted is None else f'{predicted:.3f}×'} | "
                    f"{'' if name == 'base' and cache == 'f16' else speed_cell(out, cache, name, predicted)} | "
                    f"{'' if name == 'base' and cache == 'f16' else llama_bench_cell(out, cache, name, predicted)} | "
                    f"{cell(out, 'ppl4096', cache, name)} | {cell(out, 'ppl8192', cache, name)} | {keys} | {kv_cell} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8192)
    parser.add_argument("--targets", default="1.1,1.2,1.3")
    parser.add_argument("--measures", default=",".join(MEASURES))
    parser.add_argument("--caches", default="f16,q8_0")
    parser.add_argument("--stages", default="plan,quality,speed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--chunks", type=int, default=5, help="PPL chunks at ctx 4096 (the same for every file)")
    parser.add_argument("--files", default="", help="measure only these files (e.g. drop-x1.3,window-x1.3) and the base")
    parser.add_argument("--table", nargs="+", metavar="NAME=OUT")
    args = parser.parse_args()
    if args.table:
        print(table([(item.split("=", 1)[0], Path(item.split("=", 1)[1])) for item in args.table]), end="")
    else:
        study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
