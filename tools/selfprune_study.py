"""Issue 14's measurement: PPL relative to base for the old default, the new default, each ingredient alone
and in-domain calibration, at several K, on WikiText-2 test and TinyStories. Resumable: every pruned file,
its report and every PPL is cached in OUT, and a finished item is never recomputed.

Recipes:
  old          per-head Gate-Norm order, drop (`prune --count K --criterion per-head --mode drop`)
  new          the data-free default (`prune --count K`): self-sampled calibration, KLD choice, validated patches
  choice       the new layer choice alone: self-calibrated KLD choice, every layer dropped
  patch        the new recovery alone: per-head order, validated self-calibrated patches
  ceiling      the new pipeline calibrated in-domain, on a slice of the evaluation text's own source that the
               evaluated chunks never reach (WikiText-2: lines 3958-4358; TinyStories: the last 20% of lines)

Usage: python tools/selfprune_study.py MODEL OUT [--counts 2,4,6] [--recipes old,new] [--texts wiki,tiny] [--chunks 20]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from gatenorm_edge.fileio import write_text_atomic
from gatenorm_edge.harness.perplexity import perplexity
from gatenorm_edge.rewrite import prune_gguf
from gatenorm_edge.scoring import score_model
from gatenorm_edge.selfprune import SelfCalibratedPruner, write_plan

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TEXTS = {
    "wiki": SHARED / "wikitext-2-raw" / "wiki.test.raw",
    "tiny": SHARED / "tinystories" / "tinystories_val_subset.txt",
}


def in_domain_slice(text: str, out: Path) -> Path:
    """The calibration slice of an evaluation text, disjoint from its first chunks."""
    target = out / f"calib-{text}.txt"
    if not target.is_file():
        lines = TEXTS[text].read_text(encoding="utf-8").splitlines(keepends=True)
        first = 3957 if text == "wiki" else int(len(lines) * 0.8)
        write_text_atomic(target, "".join(lines[first:]))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--counts", default="2,4,6")
    parser.add_argument("--recipes", default="old,new,choice,patch,ceiling")
    parser.add_argument("--texts", default="wiki,tiny")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    counts = [int(k) for k in args.counts.split(",")]
    texts = args.texts.split(",")
    out: Path = args.out
    (out / "ppl").mkdir(parents=True, exist_ok=True)

    def ppl(name: str, path: Path, text: str) -> None:
        target = out / "ppl" / f"{name}-{text}.json"
        if target.is_file():
            return
        result = perplexity(path, TEXTS[text], ctx=512, chunks=args.chunks, n_threads=args.threads)
        write_text_atomic(target, json.dumps(result.to_dict(), indent=1) + "\n")
        print(f"{name} {text}: {result.ppl:.3f} +- {result.ppl_stderr:.3f}", flush=True)

    for text in texts:
        ppl("base", args.model, text)
    for recipe in args.recipes.split(","):
        variants = [(recipe, None, t) for t in [None]] if recipe != "ceiling" else [(f"ceiling-{t}", t, t) for t in texts]
        for name, calib_text, only_text in variants:
            eval_texts = texts if only_text is None else [only_text]
            todo = [k for k in counts if not all((out / "ppl" / f"{name}-k{k}-{t}.json").is_file() for t in eval_texts)]
            if not todo:
                continue
            with contextlib.ExitStack() as stack:
                pruner = None
                if name != "old":
                    calib = in_domain_slice(calib_text, out) if calib_text else None
                    pruner = stack.enter_context(contextlib.closing(SelfCalibratedPruner(
                        args.model, calib=calib, recover=name != "choice", n_threads=args.threads, progress=False,
                    )))
                for k in todo:
                    path = out / f"{name}-k{k}.gguf"
                    if pruner is None:
                        order = score_model(args.model, "per-head").prune_order
                        prune_gguf(args.model, path, order[:k], force=True, provenance={"variant": "per-head"})
                    else:
                        fixed = score_model(args.model, "per-head").prune_order[:k] if name == "patch" else None
                        report = pruner.plan(k, fixed=fixed)
                        write_plan(args.model, path, report, force=True, progress=False)
                        write_text_atomic(out / f"{name}-k{k}.report.json", json.dumps(report.to_dict(), indent=1) + "\n")
                        print(f"{name} k={k}: layers {report.layers}, patched {report.patched}, "
                              f"{report.seconds['total']:.1f} s", flush=True)
                    for text in eval_texts:
                        ppl(f"{name}-k{k}", path, text)
                    path.unlink()


if __name__ == "__main__":
    sys.exit(main())
