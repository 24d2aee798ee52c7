"""Issue 28's measurements: the data-free default's calibration (size, prompt source, sampling), sequential
against independent patches, and the final table against the old default, today's default and the in-domain
ceiling. Resumable: every pruned file's report and every PPL is cached in OUT; a finished item is never redone.

A recipe is a name of dash-separated parts:
  old                   per-head Gate-Norm order, drop (`--criterion per-head --mode drop`)
  today                 the default before issue 28: start texts, 16 x 256 tokens, T = 1, independent patches
                        (issue 14's "new"; its ingredients alone: "choice", today's layer choice with every layer
                        dropped, and "patch", per-head Gate-Norm's layers with today's validated patches)
  new                   the data-free default after issue 28: `prune --count K` as it ships (CalibrationSpec())
  self                  the same, with the guard's choice of layers taken away: always the self-calibrated set
                        (patched where that beats dropping), even where per-head Gate-Norm's set wins held out
  cal-SOURCE-TOKENSk[-t0.8][-p0.95][-d0.2][-seq]
                        self-sampled calibration: source mix|bos|starts|chat, TOKENS thousand tokens, temperature,
                        top-p, the dropped least-likely share, and sequential patches
  ceiling-TEXT          today's pipeline calibrated in-domain on a part of TEXT's source the evaluated chunks never
                        reach (WikiText-2: lines 3958-4358; TinyStories: the last 20% of lines; Botchan: chapter X)
Texts: wiki (WikiText-2 test), tiny (TinyStories), botchan (docs/texts: only for the final table). PPL: ctx 512,
20 chunks (10,240 tokens of which 5,100 scored... see the JSON).

Usage: python tools/calib_study.py MODEL OUT --recipes old,today,cal-mix-16k --counts 2,4,6,8 --texts wiki,tiny
       python tools/calib_study.py --table NAME=OUT [NAME=OUT ...] [--recipes ...] [--texts ...] [--plot PNG]
(issue 14's folders in docs/selfprune-study name today's recipe "new": --table ... --recipes old,new,choice,patch,ceiling)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from gatenorm_edge.fileio import write_text_atomic
from gatenorm_edge.harness.perplexity import perplexity
from gatenorm_edge.harness.selfcal import CalibrationSpec, Sampling
from gatenorm_edge.plots import require_matplotlib, save_figure
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.scoring import score_model
from gatenorm_edge.selfprune import SelfCalibratedPruner, write_plan

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TEXTS = {
    "wiki": SHARED / "wikitext-2-raw" / "wiki.test.raw",
    "tiny": SHARED / "tinystories" / "tinystories_val_subset.txt",
    "botchan": ROOT / "docs" / "texts" / "botchan-ch1-3.txt",
}
TITLES = {"wiki": "WikiText-2", "tiny": "TinyStories", "botchan": "Botchan"}
TODAY = CalibrationSpec(source="starts", tokens=16 * 256)


def in_domain_slice(text: str, out: Path) -> Path:
    """The ceiling's calibration text: a part of the evaluation text's source the evaluated chunks never reach."""
    if text == "botchan":
        return ROOT / "docs" / "texts" / "botchan-ch10.txt"
    target = out / f"calib-{text}.txt"
    if not target.is_file():
        lines = TEXTS[text].read_text(encoding="utf-8").splitlines(keepends=True)
        first = 3957 if text == "wiki" else int(len(lines) * 0.8)
        write_text_atomic(target, "".join(lines[first:]))
    return target


def recipe_spec(recipe: str) -> tuple[CalibrationSpec, bool]:
    """The calibration of a ``cal-...`` recipe and whether its patches are sequential."""
    parts = recipe.split("-")[1:]
    source, tokens = parts[0], int(parts[1].rstrip("k")) * 1024
    options = {part[0]: float(part[1:]) for part in parts[2:] if part != "seq"}
    sampling = Sampling(options.get("t", 1.0), options.get("p", 1.0), options.get("d", 0.0))
    return CalibrationSpec(source=source, tokens=tokens, sampling=sampling), "seq" in parts


def run(args: argparse.Namespace) -> None:
    counts = [int(k) for k in args.counts.split(",")]
    texts = args.texts.split(",")
    out: Path = args.out
    (out / "ppl").mkdir(parents=True, exist_ok=True)

    def ppl(name: str, path: Path, text: str) -> None:
        target = out / "ppl" / f"{name}-{text}.json"
        if not target.is_file():
            result = perplexity(path, TEXTS[text], ctx=512, chunks=args.chunks, n_threads=args.threads)
            write_text_atomic(target, json.dumps(result.to_dict(), indent=1) + "\n")
            print(f"{name} {text}: {result.ppl:.3f} +- {result.ppl_stderr:.3f}", flush=True)

    for text in texts:
        ppl("base", args.model, text)
    for recipe in args.recipes.split(","):
        eval_texts = [recipe.split("-", 1)[1]] if recipe.startswith("ceiling-") else texts
        todo = [k for k in counts if not all((out / "ppl" / f"{recipe}-k{k}-{t}.json").is_file() for t in eval_texts)]
        if not todo:
            continue
        with contextlib.ExitStack() as stack:
            pruner = None
            if recipe != "old":
                spec, sequential = (recipe_spec(recipe) if recipe.startswith("cal-")
                                    else (CalibrationSpec(), False) if recipe in ("new", "self") else (TODAY, False))
                calib = in_domain_slice(eval_texts[0], out) if recipe.startswith("ceiling-") else None
                started = time.perf_counter()
                pruner = stack.enter_context(contextlib.closing(SelfCalibratedPruner(
                    args.model, calib=calib, spec=spec, recover=recipe != "choice", sequential=sequential,
                    n_threads=args.threads)))
                prepared = time.perf_counter() - started
            for k in todo:
                path = out / f"{recipe}-k{k}.gguf"
                if pruner is None:
                    prune_gguf(args.model, path, score_model(args.model, "per-head").prune_order[:k], force=True)
                else:
                    fixed = score_model(args.model, "per-head").prune_order[:k] if recipe == "patch" else None
                    report = pruner.plan(k, fixed=fixed)
                    if recipe == "self" and report.picked != "self-calibrated":
                        own = next(c.layers for c in report.candidates if c.name == "self-calibrated")
                        report = pruner.plan(k, fixed=own)
                    write_plan(args.model, path, report, force=True, progress=False)
                    record = report.to_dict() | {"prepare_seconds": prepared}
                    write_text_atomic(out / f"{recipe}-k{k}.report.json", json.dumps(record, indent=1) + "\n")
                    print(f"{recipe} k={k}: layers {report.layers}, patched {report.patched}, KLD {report.held_out_kld:.4f}"
                          f" (sequential {report.kld_sequential}), {report.seconds['total']:.1f} s", flush=True)
                for text in eval_texts:
                    ppl(f"{recipe}-k{k}", path, text)
                path.unlink()


def cell(out: Path, name: str, text: str) -> str:
    b, r = read_ppl(out, f"base-{text}"), read_ppl(out, f"{name}-{text}")
    if b is None or r is None:
        return "—"
    return f"{r['ppl'] / b['ppl']:.3f}× ({r['ppl']:.2f} ± {r['ppl_stderr']:.2f})"


def table(label: str, out: Path, recipes: list[str], texts: list[str]) -> str:
    """Per K and text: the base's PPL (± stderr, tokens) and each recipe's ratio (PPL ± stderr)."""
    counts = sorted({int(p.stem.split("-k")[1].split("-")[0]) for p in (out / "ppl").glob("*-k*-*.json")})
    rows = [f"**{label}**", "", "| K | text | base PPL (tokens) | " + " | ".join(recipes) + " |",
            "|---:|---|---:|" + "---:|" * len(recipes)]
    for k in counts:
        for text in texts:
            base = out / "ppl" / f"base-{text}.json"
            if not base.is_file():
                continue
            b = json.loads(base.read_text())
            cells = [cell(out, f"ceiling-{text}-k{k}" if r == "ceiling" else f"{r}-k{k}", text) for r in recipes]
            rows.append(f"| {k} | {TITLES[text]} | {b['ppl']:.2f} ± {b['ppl_stderr']:.2f} ({b['tokens_scored']}) | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def size_curve(studies: list[tuple[str, Path]], texts: list[str], path: Path) -> None:
    """PPL ÷ base against the number of self-sampled calibration tokens (the mixed source, T = 1), one panel per
    model, a line per K and text, error bars from the pruned file's stderr."""
    plt = require_matplotlib()
    figure, axes = plt.subplots(1, len(studies), figsize=(5.5 * len(studies), 4), squeeze=False)
    for axis, (label, out) in zip(axes[0], studies):
        sizes = {CalibrationSpec().tokens: "new"}  # the shipped default is the mixed source at 16k
        for item in (out / "ppl").glob("cal-mix-*k-k*-*.json"):
            parts = item.stem.split("-")
            if len(parts) == 5:  # cal-mix-Nk-kK-TEXT: T = 1, no top-p, nothing dropped, independent patches
                sizes[int(parts[2].rstrip("k")) * 1024] = "-".join(parts[:3])
        counts = sorted({int(p.stem.split("-k")[-1].split("-")[0]) for p in (out / "ppl").glob("new-k*-*.json")})
        for k in counts:
            for text in texts:
                base = read_ppl(out, f"base-{text}")
                points = sorted((tokens, read_ppl(out, f"{recipe}-k{k}-{text}")) for tokens, recipe in sizes.items())
                points = [(tokens, r) for tokens, r in points if r is not None]
                if base is None or len(points) < 2:
                    continue
                axis.errorbar([t for t, _ in points], [r["ppl"] / base["ppl"] for _, r in points],
                              yerr=[r["ppl_stderr"] / base["ppl"] for _, r in points], marker="o", capsize=3,
                              label=f"K = {k}, {TITLES[text]}")
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(sizes), [f"{tokens // 1024}k" for tokens in sorted(sizes)])
        axis.set_xlabel("self-sampled calibration tokens (mixed source, T = 1)")
        axis.set_ylabel("PPL ÷ base (ctx 512, 20 chunks)")
        axis.set_title(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def read_ppl(out: Path, name: str) -> dict | None:
    target = out / "ppl" / f"{name}.json"
    return json.loads(target.read_text()) if target.is_file() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("out", type=Path, nargs="?")
    parser.add_argument("--counts", default="2,4,6,8")
    parser.add_argument("--recipes", default="old,today")
    parser.add_argument("--texts", default="wiki,tiny")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--table", nargs="+", metavar="NAME=OUT")
    parser.add_argument("--plot", type=Path, help="with --table: the calibration-size curve as a PNG")
    args = parser.parse_args()
    if args.table:
        recipes, texts = args.recipes.split(","), args.texts.split(",")
        studies = [(name, Path(out)) for name, out in (item.split("=", 1) for item in args.table)]
        print("\n\n".join(table(name, out, recipes, texts) for name, out in studies) + "\n")
        if args.plot:
            size_curve(studies, texts, args.plot)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
