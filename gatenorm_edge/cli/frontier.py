"""`gatenorm-edge frontier`: every lever on this machine at once, speed at depth against perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app, check_output_folders


@app.command(
    epilog=(
        "Examples:\n\n"
        "  gatenorm-edge frontier SmolLM2-135M-Instruct.Q4_1.gguf --text wiki.test.raw --out frontier-smollm2\n\n"
        "  gatenorm-edge frontier model.gguf --text wiki.test.raw --out f --speedups 1.2 --depth 8192 --window 1024 "
        "--plot frontier.png --json frontier.json"
    )
)
def frontier(
    model: Path = typer.Argument(..., help="The GGUF to shrink (llama or qwen2)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text for perplexity (keep it apart from anything calibrated on)."),
    out: Path = typer.Option(Path("gatenorm-frontier"), "--out", help="Folder for the files and measurements (reused: a rerun resumes)."),
    speedups: str = typer.Option("1.1,1.2,1.3", "--speedups", help="tg speedup targets for the drop and window files."),
    depth: int = typer.Option(4096, "--depth", help="Context depth the speed is measured (and the files are planned) at."),
    window: int = typer.Option(512, "--window", help="Tokens a windowed layer sees."),
    ctx: int = typer.Option(4096, "--ctx", help="Tokens per perplexity chunk."),
    chunks: int = typer.Option(5, "--chunks", help="Perplexity chunks."),
    stack: str = typer.Option("q8_0", "--stack", help="Quantized KV caches to run the drop and window files with, besides f16."),
    reps: int = typer.Option(3, "--reps", help="Interleaved rounds of the speed runs."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default: all cores available)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write every point as JSON."),
    md_path: Optional[Path] = typer.Option(None, "--md", help="Also write the table as Markdown."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also plot tg speedup against PPL (needs matplotlib)."),
) -> None:
    """Speed at depth against perplexity for every lever, measured here: the base with each KV-cache type, and
    for each speedup target the data-free default's file (layers dropped or patched) and a windowed file,
    each with llama.cpp's default F16 cache and with a quantized one on top. Prints the table (the Pareto
    frontier in bold); a quantized cache alone is often the cheapest speed at depth.
    """
    from ..frontier import frontier as measure_frontier
    from ..harness.speed import BenchSettings
    from ..options import CACHE_TYPES, comma_floats, comma_names
    from ..plots import require_matplotlib, save_frontier_plot
    from ..report import frontier_markdown, write_json, write_markdown

    check_output_folders(json_path, md_path, plot)
    if plot is not None:
        require_matplotlib()
    targets = comma_floats("--speedups", speedups, "1.1,1.2")
    caches = comma_names("--stack", stack, CACHE_TYPES[1:])
    settings = BenchSettings(prompt=256, gen=32, depths=(depth,), reps=reps, threads=threads)
    result = measure_frontier(model, text, out, targets=targets, depth=depth, window=window, ctx=ctx, chunks=chunks,
                              stack=caches, settings=settings, threads=threads, progress=True)
    table = frontier_markdown(result)
    typer.echo(table)
    if md_path is not None:
        write_markdown(md_path, table)
    if json_path is not None:
        write_json(json_path, result)
    if plot is not None:
        save_frontier_plot(result, plot)
