"""Markdown tables from `tools/selfprune_study.py` outputs: PPL relative to base per recipe, K and text.

Usage: python tools/selfprune_table.py NAME=OUT [NAME=OUT ...] [--update FILE]   (e.g. SmolLM2=/work/study/smol)
A cell is `ratio× (PPL ± stderr)`; a dash where that item has not been measured. With --update FILE the
tables replace those in FILE, from the first table's bold title up to the line "**Against the goal**".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECIPES = ("old", "new", "choice", "patch", "ceiling")
TEXTS = {"wiki": "WikiText-2", "tiny": "TinyStories"}


def cell(out: Path, name: str, text: str) -> str:
    base, item = out / "ppl" / f"base-{text}.json", out / "ppl" / f"{name}-{text}.json"
    if not (base.is_file() and item.is_file()):
        return "—"
    b, r = json.loads(base.read_text()), json.loads(item.read_text())
    return f"{r['ppl'] / b['ppl']:.3f}× ({r['ppl']:.2f} ± {r['ppl_stderr']:.2f})"


def table(label: str, out: Path) -> str:
    counts = sorted({int(p.stem.split("-k")[1].split("-")[0]) for p in (out / "ppl").glob("*-k*-*.json")})
    rows = [f"**{label}**", "", "| K | text | base PPL | " + " | ".join(RECIPES) + " |", "|---:|---|---:|" + "---:|" * len(RECIPES)]
    for k in counts:
        for text, title in TEXTS.items():
            base = out / "ppl" / f"base-{text}.json"
            if not base.is_file():
                continue
            b = json.loads(base.read_text())
            cells = [cell(out, f"ceiling-{text}-k{k}" if r == "ceiling" else f"{r}-k{k}", text) for r in RECIPES]
            rows.append(f"| {k} | {title} | {b['ppl']:.2f} ± {b['ppl_stderr']:.2f} ({b['tokens_scored']} tokens) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    arguments = sys.argv[1:]
    target = None
    if "--update" in arguments:
        index = arguments.index("--update")
        target = Path(arguments[index + 1])
        del arguments[index : index + 2]
    tables = "\n\n".join(table(*argument.split("=", 1)[:1], Path(argument.split("=", 1)[1])) for argument in arguments)
    if target is None:
        print(tables + "\n")
        return
    text = target.read_text()
    first_title = "**" + arguments[0].split("=", 1)[0] + "**"
    start, end = text.index(first_title), text.index("**Against the goal**")
    target.write_text(text[:start] + tables + "\n\n" + text[end:])


if __name__ == "__main__":
    main()
