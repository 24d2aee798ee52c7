"""`gatenorm-edge study`: PPL and KLD against the number of removed layers, for every selection criterion."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import CRITERIA, comma_ints, comma_names
from ..errors import GatenormError
from .app import app, check_output_folders


@app.command(
    epilog=(
        "Examples:\n\n"
        "  gatenorm-edge study SmolLM2-135M-Instruct.Q4_1.gguf --text wiki.test.raw\n\n"
        "  gatenorm-edge study model.gguf --text wiki.test.raw --counts 1,2,4,6,8 "
        "--criteria per-head,full,folded,random,last,loo-ppl,greedy-ppl,cosine --json study.json --plot docs/\n\n"
        "  gatenorm-edge study model.gguf --text wiki.test.raw --calib-text stories.txt --calib-chunks 2 --threads 1"
    )
)
def study(
    model: Path = typer.Argument(..., help="GGUF model (llama or qwen2)."),
    text: Path = typer.Option(..., "--text", help="Evaluation text (UTF-8), e.g. WikiText-2 test."),
    counts: str = typer.Option("1,2,4,6,8", "--counts", help="Numbers of attention sublayers to remove."),
    criteria: str = typer.Option(",".join(CRITERIA), "--criteria", help=f"Comma-separated, from: {', '.join(CRITERIA)}."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per evaluation chunk."),
    chunks: int = typer.Option(4, "--chunks", help="Evaluation chunks (after the calibration chunks when the texts are the same)."),
    calib_text: Path | None = typer.Option(None, "--calib-text", help="Calibration text for loo-ppl, greedy-ppl, cosine (default: the start of --text)."),
    calib_ctx: int = typer.Option(512, "--calib-ctx", help="Tokens per calibration chunk."),
    calib_chunks: int = typer.Option(1, "--calib-chunks", help="Calibration chunks (each data-driven evaluation runs them all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random criterion."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for llama.cpp (default: all cores available)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write every measurement as JSON."),
    plot: Path | None = typer.Option(None, "--plot", help="Folder for PNG plots (needs the `plot` extra: matplotlib)."),
) -> None:
    """How well does each criterion choose layers? PPL and KLD vs number of removed attention sublayers.

    Ranks the layers by every criterion (data-driven ones on calibration chunks), removes each criterion's first k layers for every k (prune_gguf into a temporary folder) and evaluates the pruned model in llama.cpp with flash attention on: perplexity (llama-perplexity's method) and KL divergence from the base model, on the same chunks. Also prints each criterion's scoring time, its Spearman rho against loo-ppl, and each data-free criterion's PPL relative to greedy-ppl. See docs/study.md.
    """
    from ..plots import require_matplotlib, save_study_plots
    from ..report import study_markdown, write_json
    from ..study import run_study

    check_output_folders(json_path)
    if plot is not None:
        if not plot.is_dir():
            raise GatenormError(f"{plot}: no such folder (--plot takes a folder)")
        require_matplotlib()
    result = run_study(
        model,
        text,
        counts=comma_ints("--counts", counts, "1,2,4"),
        criteria=comma_names("--criteria", criteria, CRITERIA),
        ctx=ctx,
        chunks=chunks,
        calib_text=calib_text,
        calib_ctx=calib_ctx,
        calib_chunks=calib_chunks,
        seed=seed,
        n_threads=threads,
        progress=True,
    )
    typer.echo(study_markdown(result))
    if json_path is not None:
        write_json(json_path, result)
        typer.echo(f"wrote {json_path}")
    if plot is not None:
        for path in save_study_plots(result, plot):
            typer.echo(f"wrote {path}")
