"""Evaluate a data-free order with its critical layers vetoed, on the same tokens as a finished study.

A layer is vetoed when its single-layer calibration perplexity (the study's ``loo-ppl`` scores) exceeds
``--factor`` times their median; the criterion's order is then followed without it. Prints one line of
JSON per (criterion, k): the layers, PPL and KLD, measured as ``gatenorm-edge study`` measures them.

    python tools/study_veto.py docs/study-smollm2.json --criteria per-head,full --counts 4,6,8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from gatenorm_edge.evaluation import PrunedEvaluator, TextChunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="JSON from `gatenorm-edge study --json` (with loo-ppl)")
    parser.add_argument("--criteria", default="per-head,full")
    parser.add_argument("--counts", default="4,6,8")
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    study = json.loads(args.study.read_text())
    by_name = {entry["criterion"]: entry for entry in study["criteria"]}
    loo = by_name["loo-ppl"]["scores"]
    median = float(np.median(loo[1:]))
    vetoed = {layer for layer in range(1, len(loo)) if loo[layer] > args.factor * median}
    print(json.dumps({"median_loo_ppl": median, "vetoed": sorted(vetoed)}))
    ev = study["evaluation"]
    model = Path(study["model"])
    chunks = TextChunks.from_text(model, ev["text"], ev["ctx"], ev["chunks"], ev["first_chunk"])
    with tempfile.TemporaryDirectory(prefix="gatenorm-veto-") as folder:
        evaluate = PrunedEvaluator(model, chunks, Path(folder), args.threads, divergence=True)
        for name in args.criteria.split(","):
            order = [layer for layer in by_name[name]["prune_order"] if layer not in vetoed]
            for k in (int(part) for part in args.counts.split(",")):
                point = evaluate.point(order[:k])
                print(json.dumps({"criterion": f"{name}+veto", "k": k, "layers": point.layers, "ppl": point.ppl, "kld": point.kld}))


if __name__ == "__main__":
    main()
