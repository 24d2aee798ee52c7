"""Issue 15's README table: `prune --speedup X --depth D` for X in 1.1, 1.2, 1.3 and D in 4096, 8192, then
what each chosen file gives: tg speed measured against the base at D (`bench --vs`: interleaved A B A B,
5 rounds, median of per-round ratios), PPL at ctx 512 and at
ctx 4096 on WikiText-2 test, and pass-key accuracy at 2k, 4k and 8k tokens, base vs pruned.

Resumable: every plan, pruned file, benchmark, PPL and pass-key result is cached in OUT and a finished item
is never recomputed (a plan whose pruned file is gone, as when OUT's JSON was copied from docs/budget/, is
planned again: the same seeded plan, the same file). The speed model is the one `make bench BENCH=speedmodel` measures (same settings, same
cache). A depth the model's training context cannot hold with the timed prompt after it is cut to the
deepest that fits (SmolLM2: 7936 for 8192), as `speedmodel.speed_settings` does.
Quality is measured one measure at a time over every file (base first, then by K), cheapest first:
PPL 512, pass-key 2k, PPL 4096, pass-key 4k, 8k; so a run stopped part-way has whole columns.

Usage: python tools/budget_study.py MODEL OUT [--targets 1.1,1.2,1.3] [--depths 4096,8192] [--long-chunks 5]
                                    [--trials 10] [--stages plan,speed,quality]
       python tools/budget_study.py --table NAME=OUT [NAME=OUT ...]          (the README table)
       python tools/budget_study.py --validation bench/out/speedmodel.json   (predicted / measured)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gatenorm_edge.budget import Budget, plan_to_budget
from gatenorm_edge.chooser import most_layers, template
from gatenorm_edge.fileio import write_text_atomic
from gatenorm_edge.harness.passkey import passkey
from gatenorm_edge.harness.perplexity import perplexity
from gatenorm_edge.harness.speed import bench
from gatenorm_edge.selfprune import SelfCalibratedPruner, write_plan
from gatenorm_edge.sources.geometry import gguf_geometry
from gatenorm_edge.speedmodel import measure_speed_model, speed_settings

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PASSKEY_CTX = (2048, 4096, 8192)


def cached(target: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON at ``target``, computed and written (atomically) when missing."""
    if not target.is_file():
        write_text_atomic(target, json.dumps(compute(), indent=1) + "\n")
    return json.loads(target.read_text())


def plans(model: Path, out: Path, targets: list[float], depths: tuple[int, ...], threads: int | None) -> dict[str, Any]:
    """Per (depth, target): the plan `prune --speedup` picks; one pruned file per distinct K."""
    speed = measure_speed_model(model, speed_settings(model, (0, *depths)), progress=sys.stderr.isatty())
    wanted = {f"d{d}-x{t}": (d, t) for d in speed_settings(model, depths).depths for t in targets}
    found = {key: plan for key in wanted if (plan := read(out, f"plan-{key}")) and (out / plan["file"]).is_file()}
    if len(found) < len(wanted):
        with contextlib.closing(SelfCalibratedPruner(model, n_threads=threads)) as pruner:
            for key, (depth, target) in wanted.items():
                if key in found:
                    continue
                most = most_layers("auto", gguf_geometry(model).n_layers)
                report, entry = plan_to_budget(model, Budget(speedup=target, depth=depth), pruner.plan, speed, most,
                                               template("auto", None, "f16"))
                path = out / f"k{len(report.layers)}.gguf"
                if not path.is_file():
                    write_plan(model, path, report, force=True, progress=False)
                found[key] = {"depth": depth, "target": target, "k": len(report.layers), "layers": report.layers,
                              "patched": report.patched, "predicted": entry, "file": path.name}
                write_text_atomic(out / f"plan-{key}.json", json.dumps(found[key], indent=1) + "\n")
                print(f"{key}: K={found[key]['k']} predicted tg {entry['tg_speedup']:.3f}", flush=True)
    return found


def study(args: argparse.Namespace) -> None:
    model, out = args.model, args.out
    out.mkdir(parents=True, exist_ok=True)
    depths = tuple(int(d) for d in args.depths.split(","))
    stages = args.stages.split(",")
    found = plans(model, out, [float(t) for t in args.targets.split(",")], depths, args.threads)
    by_k = sorted(found.values(), key=lambda plan: plan["k"])  # the least pruned first: a partial run has the useful rows
    files = {"base": model} | {Path(p["file"]).stem: out / p["file"] for p in by_k}
    if "speed" in stages:
        settings = dataclasses.replace(speed_settings(model, depths), threads=args.threads, reps=5)
        for name, path in files.items():
            if name != "base":
                cached(out / f"speed-{name}.json", lambda: bench([model, path], settings).to_dict())
                print(f"{name}: speed done", flush=True)
    if "quality" in stages:
        # One measure across every file before the next, cheapest first: a partial run fills whole columns.
        def ppl(ctx: int, chunks: int) -> tuple[str, Callable[[Path], Any]]:
            return f"ppl{ctx}", lambda path: perplexity(path, WIKI, ctx=ctx, chunks=chunks, n_threads=args.threads)

        def pass_key(ctx: int) -> tuple[str, Callable[[Path], Any]]:
            return f"passkey{ctx}", lambda path: passkey(path, ctx, args.trials, n_threads=args.threads)

        short, middle, long = PASSKEY_CTX
        measures = [ppl(512, 20), pass_key(short), ppl(4096, args.long_chunks), pass_key(middle), pass_key(long)]
        for measure, run in measures:
            for name, path in files.items():
                cached(out / f"{measure}-{name}.json", lambda: run(path).to_dict())
            print(f"{measure}: done", flush=True)


def read(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def ppl_cell(out: Path, ctx: int, name: str) -> str:
    base, item = read(out, f"ppl{ctx}-base"), read(out, f"ppl{ctx}-{name}")
    if base is None or item is None:
        return "—"
    return f"{item['ppl']:.2f} ± {item['ppl_stderr']:.2f} ({item['ppl'] / base['ppl']:.2f}×)"


def speed_cell(out: Path, name: str, depth: int) -> str:
    """The median of the per-round tg ratios and their range (a noisy run shows as a wide range)."""
    speed = read(out, f"speed-{name}")
    if speed is None:
        return "—"
    base, pruned = (speed["tg_tps"][label][str(depth)]["samples"] for label in speed["models"])
    rounds = [after / before for after, before in zip(pruned, base)]
    return f"{speed['ratios']['tg'][str(depth)]:.3f}× ({min(rounds):.2f}–{max(rounds):.2f})"


def passkey_cell(out: Path, name: str) -> str:
    found = [read(out, f"passkey{ctx}-{name}") for ctx in PASSKEY_CTX]
    return " / ".join("—" if r is None else f"{round(100 * r['accuracy'])}%" for r in found)


def table(studies: list[tuple[str, Path]]) -> str:
    """The README table: one row per model, depth and target, plus one base row per model."""
    head = ("| model | depth | --speedup | K (patched) | tg predicted | tg measured (FA on): median (range) | PPL ctx 512 | "
            "PPL ctx 4096 | passkey 2k / 4k / 8k |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for label, out in studies:
        lines.append(f"| {label} base | | | 0 | | | {ppl_cell(out, 512, 'base')} | {ppl_cell(out, 4096, 'base')} | "
                     f"{passkey_cell(out, 'base')} |")
        for plan_path in sorted(out.glob("plan-*.json"), key=lambda p: (json.loads(p.read_text())["depth"], p.name)):
            plan = json.loads(plan_path.read_text())
            name, depth = Path(plan["file"]).stem, plan["depth"]
            lines.append(
                f"| {label} | {depth} | {plan['target']} | {plan['k']} ({len(plan['patched'])}) | "
                f"{plan['predicted']['tg_speedup']:.3f}× | {speed_cell(out, name, depth)} | {ppl_cell(out, 512, name)} | "
                f"{ppl_cell(out, 4096, name)} | {passkey_cell(out, name)} |"
            )
    return "\n".join(lines) + "\n"


def validation_table(reports: list[Path]) -> str:
    """`make bench BENCH=speedmodel` rows as Markdown, one table per model: predicted / measured (error)."""
    rows = [row for report in reports for row in json.loads(report.read_text())["rows"]]
    lines: list[str] = []
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        columns = sorted({(row["kind"], row["depth"]) for row in mine}, key=lambda c: (c[0] != "tg", c[1]))
        cells = {(r["k"], r["mode"], r["kind"], r["depth"]): r for r in mine}
        lines += [f"| {model}: K, mode | " + " | ".join(f"{kind} d{depth}" for kind, depth in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for k, mode in dict.fromkeys((r["k"], r["mode"]) for r in mine):
            found = [cells[k, mode, kind, depth] for kind, depth in columns]
            lines.append(f"| {k}, {mode} | " + " | ".join(
                f"{r['predicted']:.3f} / {r['measured']:.3f} ({r['error_pct']:+.1f}%)" for r in found) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--targets", default="1.1,1.2,1.3")
    parser.add_argument("--depths", default="4096,8192")
    parser.add_argument("--long-chunks", type=int, default=5)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--stages", default="plan,speed,quality")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", nargs="+", metavar="NAME=OUT")
    parser.add_argument("--validation", nargs="+", type=Path, metavar="SPEEDMODEL_JSON")
    args = parser.parse_args()
    if args.validation:
        print(validation_table(args.validation), end="")
    elif args.table:
        print(table([(item.split("=", 1)[0], Path(item.split("=", 1)[1])) for item in args.table]), end="")
    else:
        study(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
