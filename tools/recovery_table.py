"""Markdown tables for docs/study-recovery.md from the JSON that tools/recovery_study.sh writes.

Usage: python tools/recovery_table.py OUT_FOLDER
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gatenorm_edge.report import markdown_table
from gatenorm_edge.rewrite import attention_cost

MODES = ("drop", "fold-vo", "fold-vo-search", "linear", "linear-wiki")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cost_cell(cost: dict) -> str:
    return f"{cost['flops'] / 1e6:.2f} M / {cost['kv_bytes']:,} B"


def main(out: Path) -> None:
    base = load(out / "base.ppl.json")
    ks = sorted({int(p.name.split("-")[0][1:]) for p in out.glob("k*-drop.gguf")})
    rows = []
    if base:
        base_cost = cost_cell(attention_cost(base["model"])["per_token"])
        rows.append(["0", "base", "", f"{base['ppl']:.3f} ± {base['ppl_stderr']:.3f}", "1.000", base_cost, ""])
    for k in ks:
        for mode in MODES:
            prune = load(out / f"k{k}-{mode}.prune.json")
            ppl = load(out / f"k{k}-{mode}.ppl.json")
            if prune is None:
                continue
            recovery = prune["recovery"]
            detail = ""
            if recovery["alpha"] is not None:
                detail = f"α {recovery['alpha']}"
            if recovery["fits"]:
                detail = "residual " + ", ".join(f"L{f['layer']} {f['residual']:.2f}" for f in recovery["fits"])
            cost = attention_cost(out / f"k{k}-{mode}.gguf")["per_token"]
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
    for bench_path in sorted(out.glob("*.bench.json")):
        bench = load(bench_path)
        a, b = (Path(m).name for m in bench["models"])
        print(
            f"\n{b} / {a}: pp{bench['prompt']} {bench['ratios']['pp']['0']:.3f}×, tg{bench['gen']} "
            f"{bench['ratios']['tg']['0']:.3f}× ({bench['reps']} reps, {bench['threads']} threads, FA "
            f"{'on' if bench['flash_attn'] else 'off'}; medians t/s pp {bench['pp_tps'][a]['0']['median']:.1f} vs "
            f"{bench['pp_tps'][b]['0']['median']:.1f}, tg {bench['tg_tps'][a]['0']['median']:.2f} vs {bench['tg_tps'][b]['0']['median']:.2f})"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
