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
Metric = choices("Metric", ("tg", "pp"))


@app.command(
    epilog=(
        "Examples:\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --criterion per-head --mode drop\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --calib my-own-text.txt --json result.json\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --speedup 1.2 --depth 8192\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --kv-budget 256M --ctx 32768\n\n"
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
    speedup: Optional[float] = typer.Option(
        None, "--speedup", help="Instead of --count: the fewest layers (in the data-free default's order) whose "
        "predicted speedup at --depth reaches this ratio; the speed model of this CPU is measured once and cached.",
    ),
    depth: int = typer.Option(4096, "--depth", help="--speedup: the context depth in tokens the speedup is for."),
    metric: Metric = typer.Option("tg", "--metric", help="--speedup: tg (generation) or pp (prompt processing)."),
    kv_budget: Optional[str] = typer.Option(
        None, "--kv-budget", help="Instead of --count: the fewest layers whose KV cache for --ctx tokens fits this "
        "size (e.g. 512M, 8GiB; F16 cache, flash attention on).",
    ),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="--kv-budget: the tokens the KV cache must hold."),
    max_kld: Optional[float] = typer.Option(
        None, "--max-kld", help="Instead of --count: the most layers whose KL divergence from the model on held-out "
        "calibration text stays within this.",
    ),
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
    targets = [name for name, given in (("--speedup", speedup), ("--kv-budget", kv_budget), ("--max-kld", max_kld)) if given is not None]
    if targets:
        budget = budget_from_options(model, targets, layers, count, plan, criterion, mode, speedup, depth,
                                     chosen(metric), kv_budget, ctx, max_kld)
        result, report = self_prune(model, out, None, budget=budget, calib=calib, recover=mode != "drop", seed=seed,
                                    force=force, progress=True)
        if json_path is not None:
            write_json(json_path, result.to_dict() | {"selfprune": report.to_dict(), "predicted": report.predicted})
        typer.echo(prune_markdown(result, model, out, selfprune_summary(report)))
        return
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
        summary = selfprune_summary(report)
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


def selfprune_summary(report: Any) -> list[tuple[str, Any]]:
    """The rows the table adds for the data-free default's decisions."""
    rows = [("calibration", f"{report.calibration.tokens} tokens, {report.calibration.source}"),
            ("vetoed (critical) layers", ", ".join(map(str, report.vetoed)) or "none"),
            ("picked (lowest held-out KLD)", report.picked),
            ("seconds (whole pipeline)", f"{report.seconds['total']:.1f}")]
    if report.predicted:
        rows += [(f"predicted {key.replace('_', ' ')}", f"{value:.3f}x" if "speedup" in key else f"{value:,}")
                 for key, value in report.predicted.items()]
    return rows


def budget_from_options(
    model: Path, targets: list[str], layers: str | None, count: int | None, plan: Path | None, criterion: str | None,
    mode: str | None, speedup: float | None, depth: int, metric: str, kv_budget: str | None, ctx: int | None,
    max_kld: float | None,
) -> Any:
    """The ``Budget`` the target options ask for; one-line errors for options that cannot go with a target."""
    from ..budget import Budget, parse_size

    others = [name for name, given in (("--count", count), ("--layers", layers), ("--plan", plan)) if given is not None]
    if others:
        raise GatenormError(f"{targets[0]} chooses how many layers to remove: give it without {' or '.join(others)}")
    if criterion not in (None, SELF) or mode not in (None, AUTO, "drop"):
        raise GatenormError(f"{targets[0]} takes layers in the data-free default's order (--criterion self, --mode auto or drop)")
    size = parse_size(kv_budget) if kv_budget is not None else None
    return Budget(speedup=speedup, depth=depth, metric=metric, kv_budget=size, ctx=ctx, max_kld=max_kld)


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
