"""`gatenorm-edge score`: rank a model's attention sublayers by Gate-Norm."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import VARIANTS
from .app import app, check_output_folders, choices

Variant = choices("Variant", VARIANTS)


@app.command()
def score(
    model: Path = typer.Argument(
        ..., help="A GGUF file (any part of a split set), a .safetensors file, or a folder of safetensors shards."
    ),
    variant: Variant = typer.Option(
        "per-head",
        "--variant",
        help="per-head: exact per-head score from head_dim Gram matrices (fast); full: the paper's "
        "literal ||W_Q W_K^T||_F (slow, O(width^3)); folded: per-head with the attention RMSNorm gain folded in.",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report as JSON (the contract `prune --plan` reads)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a bar chart PNG (needs the `plot` extra: matplotlib)."),
) -> None:
    """Rank attention sublayers by query-key coupling (Gate-Norm), from the weights alone.

    Reads one layer at a time, so it works on checkpoints larger than memory. Prints a table (layer, score, prune rank, bar) and the suggested prune order: least coupled first, layer 0 never listed.

    Examples:

      gatenorm-edge score SmolLM2-135M-Instruct.Q4_1.gguf

      gatenorm-edge score model-00001-of-00003.gguf --json scores.json

      gatenorm-edge score ./Llama-2-13b-hf --variant folded --plot scores.png
    """
    from ..plots import require_matplotlib, save_score_plot
    from ..report import prune_order_line, score_markdown, write_json
    from ..scoring import score_model

    check_output_folders(json_path, plot)
    if plot is not None:
        require_matplotlib()
    report = score_model(model, variant=variant.value, progress=True)
    typer.echo(score_markdown(report))
    typer.echo(prune_order_line(report))
    typer.echo(f"Scored {report.n_layers} layers of a {report.architecture} model ({report.variant}) in {report.seconds:.2f} s.")
    if json_path is not None:
        write_json(json_path, report)
        typer.echo(f"wrote {json_path}")
    if plot is not None:
        save_score_plot(report, plot)
        typer.echo(f"wrote {plot}")
