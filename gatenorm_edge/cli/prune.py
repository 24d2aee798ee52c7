"""`prune` and `inspect`: rewrite a GGUF with attention-free layers, and show what a GGUF holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import GatenormError
from ..options import AUTO, CRITERIA, DEFAULT_CALIB_CTX, DEFAULT_CALIB_TOKENS, DEFAULT_RIDGE, MODES, SELF, VARIANTS
from .app import app, check_output_folders, choices, chosen

Variant = choices("Variant", VARIANTS)
Criterion = choices("Criterion", (SELF, *CRITERIA))
Mode = choices("Mode", MODES)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --criterion per-head --mode drop\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --calib my-own-text.txt --json result.json\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --layers 12,20,25\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --plan scores.json --count 4\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --criterion greedy-ppl --criterion-text tinystories.txt\n\n"
        "  gatenorm-edge prune model.gguf folded.gguf --count 4 --mode fold-vo --alpha-search tinystories.txt"
    )
)
def prune(
    model: Path = typer.Argument(..., help="Input GGUF (llama, qwen2, or an already pruned deci file)."),
    out: Path = typer.Argument(..., help="Output GGUF (deci architecture)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated layers to make attention-free."),
    count: Optional[int] = typer.Option(
        None, "--count",
        help="Remove K attention sublayers. Alone, this runs the data-free default: the model samples its own "
        "calibration text, critical layers are vetoed by KL divergence, and each removed layer gets a linear "
        "patch only where that beats dropping it on held-out text.",
    ),
    variant: Optional[Variant] = typer.Option(None, "--variant", help="Choose the --count layers by this Gate-Norm variant."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="Score JSON from `gatenorm-edge score --json`."),
    criterion: Optional[Criterion] = typer.Option(
        None, "--criterion",
        help="How to choose the --count layers: self (the default), or another criterion. Data-driven ones "
        "(loo-ppl, greedy-ppl, cosine) calibrate on --criterion-text. per-head with --mode drop is the paper's "
        "Gate-Norm and the old default. See `study`.",
    ),
    criterion_text: Optional[Path] = typer.Option(None, "--criterion-text", help="Calibration text for a data-driven --criterion."),
    criterion_chunks: int = typer.Option(1, "--criterion-chunks", help="Calibration chunks of 512 tokens for --criterion-text."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
    mode: Optional[Mode] = typer.Option(
        None, "--mode",
        help="auto (default with --count alone): a validated linear patch where it beats dropping, else drop; "
        "drop (default otherwise): no attention; fold-vo: alpha*W_O*W_V; linear: least-squares linear attention "
        "fitted on --calib.",
    ),
    alpha: float = typer.Option(1.0, "--alpha", help="fold-vo scale (data-free default 1.0)."),
    alpha_search: Optional[Path] = typer.Option(
        None, "--alpha-search", help="fold-vo: choose alpha by perplexity on this text (ctx 256, 4 chunks)."
    ),
    calib: Optional[Path] = typer.Option(
        None, "--calib",
        help="auto: calibrate on this text instead of text sampled from the model; linear: the calibration text "
        "(keep it apart from evaluation text).",
    ),
    seed: int = typer.Option(0, "--seed", help="auto: the seed of the self-sampled calibration text."),
    calib_tokens: int = typer.Option(DEFAULT_CALIB_TOKENS, "--calib-tokens", help="linear: calibration tokens."),
    calib_ctx: int = typer.Option(DEFAULT_CALIB_CTX, "--calib-ctx", help="linear: tokens per calibration sequence."),
    ridge: float = typer.Option(DEFAULT_RIDGE, "--ridge", help="linear: ridge, relative to the mean input energy."),
) -> None:
    """Rewrite MODEL so the chosen layers run without attention in stock llama.cpp (deci architecture).

    Patched layers become deci linear attention (x + W·attn_norm(x), one n_embd x n_embd matrix per
    layer, no KV cache); the others are attention-free.
    """
    from ..criteria import choose_layers
    from ..recovery import check_recovery_options, prune_with_recovery
    from ..report import prune_markdown, write_json
    from ..selfprune import self_prune

    check_output_folders(json_path)
    variant, criterion, mode = chosen(variant), chosen(criterion), chosen(mode)
    picked, provenance = choose_layers(model, layers, count, variant, plan, criterion, criterion_text, criterion_chunks)
    mode = mode or (AUTO if picked is None else "drop")
    check_recovery_options(mode, alpha, alpha_search, calib)
    details: dict[str, Any] = {}
    if mode == AUTO or picked is None:
        if mode not in (AUTO, "drop"):
            raise GatenormError(f"--criterion self goes with --mode auto or drop, not {mode}")
        result, report = self_prune(
            model, out, count, calib=calib, fixed=picked, recover=mode == AUTO, seed=seed, force=force, progress=True
        )
        details = {"selfprune": report.to_dict()}
        summary = [("calibration", f"{report.calibration.tokens} tokens, {report.calibration.source}"),
                   ("vetoed (critical) layers", ", ".join(map(str, report.vetoed)) or "none"),
                   ("picked (lowest held-out KLD)", report.picked),
                   ("seconds (whole pipeline)", f"{report.seconds['total']:.1f}")]
    else:
        result, recovery = prune_with_recovery(
            model, out, picked, mode, alpha=alpha, alpha_search_text=alpha_search, calib_text=calib,
            calib_tokens=calib_tokens, calib_ctx=calib_ctx, ridge=ridge, force=force, provenance=provenance, progress=True,
        )
        details = {"recovery": recovery.to_dict()}
        summary = [("mode", mode + (f", alpha {recovery.alpha}" if recovery.alpha is not None else "")),
                   ("seconds", f"{result.seconds:.2f}")]
    if json_path is not None:
        write_json(json_path, result.to_dict() | details)
    typer.echo(prune_markdown(result, model, out, summary))


@app.command(
    epilog="Examples:\n\n  gatenorm-edge inspect model.gguf\n\n  gatenorm-edge inspect pruned.gguf --json info.json"
)
def inspect(
    model: Path = typer.Argument(..., help="GGUF file to describe."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the description as JSON here."),
) -> None:
    """Show a GGUF's architecture, layers, attention-free layers, size, tensor types and attention cost per token."""
    from ..inspection import inspect_gguf
    from ..report import inspect_markdown, write_json

    info = inspect_gguf(model)
    if json_path is not None:
        write_json(json_path, info)
    typer.echo(inspect_markdown(info))
