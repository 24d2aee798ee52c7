"""`prune` and `inspect`: rewrite a GGUF with attention-free layers, and show what a GGUF holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import GatenormError
from ..options import (
    AUTO, CALIB_SOURCES, CRITERIA, DEFAULT_CALIB_CTX, DEFAULT_CALIB_TOKENS, DEFAULT_FILE_TOKENS, DEFAULT_RIDGE, DEFAULT_SELF_TOKENS,
    DEFAULT_WINDOW, MODES, SELF, VARIANTS,
)
from .app import CacheType, app, check_output_folders, choices, chosen

Variant = choices("Variant", VARIANTS)
Criterion = choices("Criterion", (SELF, *CRITERIA))
Mode = choices("Mode", MODES)
Metric = choices("Metric", ("tg", "pp"))
CalibSource = choices("CalibSource", CALIB_SOURCES)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --criterion per-head --mode drop\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --calib my-own-text.txt --json result.json\n\n"
        "  gatenorm-edge prune model.gguf windowed.gguf --speedup 1.2 --depth 8192\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --speedup 1.2 --depth 8192 --mode auto\n\n"
        "  gatenorm-edge prune model.gguf windowed.gguf --count 8 --mode window --window 512\n\n"
        "  gatenorm-edge prune model.gguf windowed.gguf --speedup 1.3 --depth 8192 --mode window --cache-type q8_0\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --kv-budget 256M --ctx 32768\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --layers 12,20,25\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --plan scores.json --count 4\n\n"
        "  gatenorm-edge prune model.gguf pruned.gguf --count 4 --criterion greedy-ppl --criterion-text tinystories.txt\n\n"
        "  gatenorm-edge prune model.gguf folded.gguf --count 4 --mode fold-vo --alpha-search tinystories.txt"
    )
)
def prune(
    model: Path = typer.Argument(..., help="Input GGUF (llama, qwen2, or an already pruned deci file)."),
    out: Path = typer.Argument(..., help="Output GGUF (deci architecture; granite_swa with --mode window)."),
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
        "window (default with --speedup): see below; drop (default otherwise): no attention; fold-vo: alpha*W_O*W_V; linear: least-squares linear attention "
        "fitted on --calib; window: the layers keep attention but see only the last --window tokens, with sink "
        "logits fitted on the model's own samples (llama.cpp's granite_swa; its cost stops growing with depth).",
    ),
    window: int = typer.Option(DEFAULT_WINDOW, "--window", help="window: how many recent tokens a windowed layer sees."),
    cache_type: CacheType = typer.Option(
        "f16", "--cache-type",
        help="--speedup/--kv-budget: the KV-cache type the file will run with (llama.cpp's -ctk/-ctv); speedups stay "
        "over the model with llama.cpp's default f16 cache, so a quantized cache's own gain counts.",
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
    seed: int = typer.Option(0, "--seed", help="auto, window: the seed of the self-sampled calibration text."),
    calib_source: CalibSource = typer.Option(
        "mix", "--calib-source",
        help="auto, window: what the model's own calibration text is sampled from: bos (the beginning-of-text token "
        "alone), starts (the first words of many kinds of text), chat (requests for many kinds of text, through the "
        "model's chat template), or mix (the three in turn; without a chat template, bos and starts).",
    ),
    calib_tokens: Optional[int] = typer.Option(
        None, "--calib-tokens",
        help=f"Calibration tokens: auto and window sampled (default {DEFAULT_SELF_TOKENS}; 65536 fits better "
        f"and samples 4x longer: docs/study.md; an interrupted run goes on from its last group of 64); auto cut from --calib "
        f"(default {DEFAULT_FILE_TOKENS}); linear cut from --calib (default {DEFAULT_CALIB_TOKENS}).",
    ),
    calib_temperature: float = typer.Option(1.0, "--calib-temperature", help="auto, window: sampling temperature."),
    calib_top_p: float = typer.Option(1.0, "--calib-top-p", help="auto, window: the top-p nucleus sampled from (1: all)."),
    calib_drop: float = typer.Option(
        0.0, "--calib-drop", help="auto, window: the share of samples the model finds least likely, sampled extra and dropped."
    ),
    calib_ctx: int = typer.Option(DEFAULT_CALIB_CTX, "--calib-ctx", help="linear: tokens per calibration sequence."),
    ridge: float = typer.Option(DEFAULT_RIDGE, "--ridge", help="linear: ridge, relative to the mean input energy."),
    speedup: Optional[float] = typer.Option(
        None, "--speedup", help="Instead of --count: the fewest layers whose predicted speedup at --depth reaches "
        "this ratio, windowed (--window tokens) unless --mode auto or drop is given; the speed model of this CPU is "
        "measured once and cached.",
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
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="CPU threads for llama.cpp's sampling, evaluation and speed model (default: all cores).",
    ),
) -> None:
    """Rewrite MODEL so the chosen layers run without attention, or windowed, in stock llama.cpp.

    Removed layers are attention-free (deci architecture); patched ones become deci linear attention
    (x + W·attn_norm(x), one n_embd x n_embd matrix per layer, no KV cache). With --mode window the file
    becomes granite_swa: the chosen layers keep attention over the last --window tokens only, with a
    fitted attention-sink logit per head, and their KV cache stops growing past the window.
    """
    from ..chooser import WINDOW, prune_model
    from ..harness.selfcal import DEFAULT_SEQ_LEN, CalibrationSpec, Sampling
    from ..criteria import choose_layers
    from ..recovery import check_recovery_options, prune_with_recovery
    from ..report import prune_markdown, write_json

    check_output_folders(json_path)
    variant, criterion, mode = chosen(variant), chosen(criterion), chosen(mode)
    targets = [name for name, given in (("--speedup", speedup), ("--kv-budget", kv_budget), ("--max-kld", max_kld)) if given is not None]
    budget = None
    if targets:
        budget = budget_from_options(targets, layers, count, plan, criterion, mode, speedup, depth, chosen(metric),
                                     kv_budget, ctx, max_kld, chosen(cache_type), threads)
    elif chosen(cache_type) != "f16":
        raise GatenormError("--cache-type goes with --speedup or --kv-budget (the file itself has no cache type)")
    if speedup is not None and mode is None and calib is None:
        mode = WINDOW  # issue 29's go/no-go (docs/windows.md): at the same speed, windows keep far more quality
    if targets or mode == WINDOW:
        if mode == WINDOW and (layers is not None or plan is not None or criterion not in (None, SELF)):
            raise GatenormError("--mode window chooses its own layers: give it --count K or a target, not --layers, --plan or --criterion")
        picked = None
    else:
        picked, provenance = choose_layers(model, layers, count, variant, plan, criterion, criterion_text, criterion_chunks)
        mode = mode or (AUTO if picked is None else "drop")
        check_recovery_options(mode, alpha, alpha_search, calib)
    if budget is not None or mode == WINDOW or mode == AUTO or picked is None:
        if mode not in (None, AUTO, "drop", WINDOW):
            raise GatenormError(f"--criterion self goes with --mode auto, drop or window, not {mode}")
        result, report, note = prune_model(
            model, out, mode=mode or AUTO, count=count, budget=budget, window=window if mode == WINDOW else None,
            calib=calib, fixed=picked, force=force, n_threads=threads, progress=True,
            spec=CalibrationSpec(chosen(calib_source), calib_tokens or (DEFAULT_FILE_TOKENS if calib else DEFAULT_SELF_TOKENS),
                                 DEFAULT_SEQ_LEN,
                                 Sampling(calib_temperature, calib_top_p, calib_drop), seed),
        )
        key = "windows" if mode == WINDOW else "selfprune"
        details = {key: report.to_dict()} | ({"predicted": report.predicted} if budget is not None else {})
        summary = window_summary(report) if mode == WINDOW else selfprune_summary(report)
        if note is not None:
            typer.echo(note, err=True)
    else:
        result, recovery = prune_with_recovery(
            model, out, picked, mode, alpha=alpha, alpha_search_text=alpha_search, calib_text=calib,
            calib_tokens=calib_tokens or DEFAULT_CALIB_TOKENS, calib_ctx=calib_ctx, ridge=ridge, force=force, provenance=provenance,
            n_threads=threads, progress=True,
        )
        details = {"recovery": recovery.to_dict()}
        summary = [("mode", mode + (f", alpha {recovery.alpha}" if recovery.alpha is not None else "")),
                   ("seconds", f"{result.seconds:.2f}")]
    if json_path is not None:
        write_json(json_path, result.to_dict() | details)
    typer.echo(prune_markdown(result, model, out, summary))


def selfprune_summary(report: Any) -> list[tuple[str, Any]]:
    """The rows the table adds for the data-free default's decisions."""
    settings = report.calibration.settings
    prompts = f" from {settings['prompts']}" if "prompts" in settings else ""
    rows = [("calibration", f"{report.calibration.tokens} tokens, {report.calibration.source}{prompts}"
             + (f" ({settings['prompts_note']})" if "prompts_note" in settings else "")),
            ("vetoed (critical) layers", ", ".join(map(str, report.vetoed)) or "none"),
            ("picked (lowest held-out KLD)", report.picked),
            ("seconds (whole pipeline)", f"{report.seconds['total']:.1f}")]
    return rows + predicted_rows(report.predicted)


def window_summary(report: Any) -> list[tuple[str, Any]]:
    """The rows the table adds for windowed layers."""
    rows = [("window", f"{report.window} tokens"),
            ("calibration", f"{report.calibration['tokens']} tokens, {report.calibration['source']}"),
            ("held-out KLD (windowed vs full)", f"{report.kld:.4f}"),
            ("seconds (whole pipeline)", f"{report.seconds['total']:.1f}")]
    return rows + predicted_rows(report.predicted)


def predicted_rows(predicted: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """A budget's prediction: speedups as ratios, the KV bytes, the cache type."""
    if not predicted:
        return []
    return [(f"predicted {key.replace('_', ' ')}", f"{value:.3f}x" if "speedup" in key else
             f"{value:,}" if isinstance(value, int) else value) for key, value in predicted.items()]


def budget_from_options(
    targets: list[str], layers: str | None, count: int | None, plan: Path | None, criterion: str | None,
    mode: str | None, speedup: float | None, depth: int, metric: str, kv_budget: str | None, ctx: int | None,
    max_kld: float | None, cache_type: str, threads: int | None,
) -> Any:
    """The ``Budget`` the target options ask for; one-line errors for options that cannot go with a target."""
    from ..budget import Budget, parse_size

    others = [name for name, given in (("--count", count), ("--layers", layers), ("--plan", plan)) if given is not None]
    if others:
        raise GatenormError(f"{targets[0]} chooses how many layers to remove: give it without {' or '.join(others)}")
    if criterion not in (None, SELF) or mode not in (None, AUTO, "drop", "window"):
        raise GatenormError(
            f"{targets[0]} takes layers in the data-free default's order (--criterion self, --mode auto, drop or window)"
        )
    size = parse_size(kv_budget) if kv_budget is not None else None
    return Budget(speedup=speedup, depth=depth, metric=metric, kv_budget=size, ctx=ctx, max_kld=max_kld, cache_type=cache_type,
                  threads=threads)


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
