"""`gatenorm-edge passkey`: can the model recall a number hidden thousands of tokens back?"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import CACHE_TYPE_HELP, CacheType, app, check_output_folders, chosen


@app.command(
    epilog=(
        "Examples:\n\n"
        "  gatenorm-edge passkey SmolLM2-135M-Instruct.Q4_1.gguf --ctx 4096\n\n"
        "  gatenorm-edge passkey pruned.gguf --ctx 8192 --trials 20 --json passkey.json\n\n"
        "  gatenorm-edge passkey windowed.gguf --ctx 4096 --cache-type q8_0"
    )
)
def passkey(
    model: Path = typer.Argument(..., help="GGUF model."),
    ctx: int = typer.Option(..., "--ctx", help="Prompt length in tokens (up to the model's training context)."),
    trials: int = typer.Option(10, "--trials", help="Number of keys to hide, taken in turn at 5 depths (0, 25, 50, 75, 100%)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random keys."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for llama.cpp (default: all cores)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help="Flash attention (default on)."),
    cache_type: CacheType = typer.Option("f16", "--cache-type", help=CACHE_TYPE_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the result as JSON here."),
) -> None:
    """Pass-key retrieval: accuracy at recalling a 5-digit number hidden at varied depths of filler text.

    Each prompt fills --ctx tokens with filler text, hides a random number at one depth and asks for it
    at the end; the model answers by greedy decoding and only an exact match counts. Perplexity at 512
    tokens cannot show whether a pruned model still reaches that far back; this does.
    """
    from ..harness.passkey import passkey as run_passkey
    from ..report import passkey_markdown, write_json

    check_output_folders(json_path)
    result = run_passkey(
        model, ctx, trials, seed=seed, flash_attn=flash_attn, n_threads=threads, cache_type=chosen(cache_type), progress=True
    )
    if json_path is not None:
        write_json(json_path, result)
    typer.echo(passkey_markdown(result))
