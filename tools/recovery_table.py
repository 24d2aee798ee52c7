"""Markdown tables for docs/study-recovery.md from the JSON that tools/recovery_study.sh writes.

Usage: python tools/recovery_table.py OUT_FOLDER [PPL_FOLDER]   (PPL JSON from OUT_FOLDER unless given)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gatenorm_edge.report import markdown_table
from gatenorm_edge.inspection import attention_cost

MODES = ("drop", "fold-vo", "fold-vo-search", "linear", "linear-wiki")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cost_cell(cost: dict) -> str:
    return f"{cost['flops'] / 1e6:.2f} M / {cost['kv_bytes']:,} B"


def main(out: Path, ppl_dir: Path) -> None:
    base = load(ppl_dir / "base.ppl.json")
    ks = sorted({int(p.name.split("-")[0][1:]) for p in out.glob("k*-drop.gguf")})
    rows = []
    if base:
        base_cost = cost_cell(attention_cost(base["model"]).to_dict()["per_token"])
        rows.append(["0", "base", "", f"{base['ppl']:.3f} ± {base['ppl_stderr']:.3f}", "1.000", base_cost, ""])
    for k in ks:
        for mode in MODES:
            prune = load(out / f"k{k}-{mode}.prune.json")
            ppl = load(ppl_dir / f"k{k}-{mode}.ppl.json")
            if prune is None:
                continue
            recovery = prune["recovery"]
            detail = ""
            if recovery["alpha"] is not None:
                detail = f"α {recovery['alpha']}"
            if recovery["fits"]:
                detail = "residual " + ", ".join(f"L{f['layer']} {f['residual']:.2f}" for f in recovery["fits"])
            cost = attention_cost(out / f"k{k}-{mode}.gguf").to_dict()["per_token"]
            rows.append([
                str(k), mode, ",".join(map(str, prune["layers_requested"])),
                f"{ppl['ppl']:.3f} ± {ppl['ppl_stderr']:.3f}" if ppl else "not run",
                f"{ppl['ppl'] / base['ppl']:.3f}" if ppl and base else "",
                cost_cell(cost), detail,
            ])
    header = [
        "k", "mode", "layers", "PPL", "PPL / base",
        "attn FLOPs / KV bytes per token", "detail",
    ]
    print(markdown_table(header, rows))
    speed_rows = []
    for bench_path in sorted(out.glob("*.bench.json")):
        bench = load(bench_path)
        a, b = bench["models"]
        for depth in map(str, bench["depths"]):
            speed_rows.append([
                f"{Path(b).name} / {Path(a).name}", depth,
                *(f"{bench['ratios'][kind][depth]:.3f}×" for kind in ("pp", "tg")),
                *(f"{bench[f'{kind}_tps'][m][depth]['median']:.1f}" for kind in ("pp", "tg") for m in (a, b)),
            ])
    if speed_rows:
        print()
        print(markdown_table(["pair", "depth", "pp ratio", "tg ratio", "pp t/s A", "pp t/s B", "tg t/s A", "tg t/s B"], speed_rows))

if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]))
