"""`gatenorm-edge zeroshot`: lm-eval-style zero-shot accuracy of a GGUF on CPU, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import GatenormError
from ..options import TASK_NAMES
from .app import app, check_output_folders

ALL_TASKS = ",".join(TASK_NAMES)


@app.command(
    epilog=(
        "Examples:\n\n"
        f"  gatenorm-edge zeroshot model.gguf --tasks {ALL_TASKS}\n\n"
        "  gatenorm-edge zeroshot model.gguf --tasks arc_easy,piqa --limit 200 --json acc.json\n\n"
        "  gatenorm-edge zeroshot pruned.gguf --tasks hellaswag --data-dir ../shared/data --threads 1\n\n"
        "Results are kept per example under --cache-dir as they are computed: run the same command again "
        "after an interruption and it resumes; a larger --limit reuses what a smaller one computed."
    )
)
def zeroshot(
    model: Path = typer.Argument(..., help="GGUF model to evaluate."),
    tasks: str = typer.Option(..., "--tasks", help=f"Comma-separated tasks from: {', '.join(TASK_NAMES)}."),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", help="Task data in ../shared/data's layout (default: ../shared/data when present)."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N examples of each task."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here."),
    cache_dir: Optional[Path] = typer.Option(
        None, "--cache-dir", help="Per-example results (default: zeroshot/ in $GATENORM_CACHE, else in ~/.cache/gatenorm-edge)."
    ),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for llama.cpp (default: all cores)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="Flash attention (default on)."),
) -> None:
    """Zero-shot accuracy (acc, acc_norm ± stderr) on BoolQ, RTE, HellaSwag, WinoGrande, ARC, OpenBookQA, PIQA."""
    from ..harness.zeroshot import evaluate
    from ..report import write_json, zeroshot_markdown

    check_output_folders(json_path)
    if threads is not None and threads < 1:
        raise GatenormError(f"--threads must be at least 1, got {threads}")
    report = evaluate(
        model,
        tasks,
        data_dir=data_dir,
        limit=limit,
        cache_dir=cache_dir,
        n_threads=threads,
        flash_attn=flash_attn,
        progress=True,
    )
    if json_path is not None:
        write_json(json_path, report)
    plural = "s" if report.n_threads != 1 else ""
    typer.echo(f"{model} (flash attention {'on' if flash_attn else 'off'}, {report.n_threads} thread{plural})\n")
    typer.echo(zeroshot_markdown(report))
