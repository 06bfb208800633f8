"""The `ccli` command line: parses arguments, calls ccli's Python API and renders what it returns.
No logic of its own lives here."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ._version import __version__
from .errors import CcliError

app = typer.Typer(
    name="ccli",
    help="Conditional computation for transformer models: convert, profile, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Tables keep their columns when stdout is a file or a CI log (rich would assume 80 columns).
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)

ModelsArg = typer.Argument(None, help="Model aliases, local directories or Hub ids (default: the embedded minilm).")
JsonOpt = typer.Option(False, "--json", help="Print only JSON on stdout.")
RandomInitOpt = typer.Option(False, "--random-init", help="Build the architecture from ccli's shipped config with random weights (no download).")
BatchOpt = typer.Option(1, "--batch", "-b", min=1, help="Sequences per forward pass.")


# Library noise a user cannot act on. Every other warning (ccli's own, such as a checkpoint with
# missing tensors, and the native-kernel fallback) reaches the user as one line on stderr.
NOISY_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from rich.markup import escape

    text = " ".join(str(message).split()).removeprefix("ccli: ")
    err.print(f"[yellow]warning:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("default")  # each distinct warning once
    for category in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", category=category)
    warnings.showwarning = _show_warning
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _run(action):
    """Run an API call; a CcliError becomes one line on stderr and a non-zero exit code."""
    _quiet_libraries()
    try:
        return action()
    except CcliError as exc:
        from rich.markup import escape

        # escaped: a message may hold brackets (pip install 'ccli[plot]') that rich would take for markup
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130)


def _status(message: str, as_json: bool):
    """A spinner on stderr when it is a terminal; nothing otherwise."""
    from contextlib import nullcontext

    return err.status(message) if err.is_terminal and not as_json else nullcontext()


@app.command()
def profile(
    models: Optional[List[str]] = ModelsArg,
    seq: Optional[int] = typer.Option(128, "--seq", "-s", min=1, help="Tokens per sequence."),
    batch: int = BatchOpt,
    text: Optional[str] = typer.Option(None, "--text", help="Profile on this text instead of the bundled sample."),
    random_init: bool = RandomInitOpt,
    as_json: bool = JsonOpt,
):
    """Parameters, FLOPs per token by component, and active FFN neurons per token."""
    from .api import profile as run_profile

    with _status("profiling", as_json):
        records = _run(lambda: run_profile(models or [None], seq=seq, batch=batch, text=text, random_init=random_init))
    _emit(records, as_json, "profile")


def _layer_family(models) -> str:
    """The family to time with --layer when --to is not given: the converted model's first, else fff."""
    if models:
        from .checkpoint import MANIFEST, read_manifest

        if (Path(models[0]) / MANIFEST).is_file():
            steps = read_manifest(models[0]).get("convert") or [{"to": "fff"}]
            return steps[0]["to"]
    return "fff"


@app.command()
def bench(
    models: Optional[List[str]] = ModelsArg,
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda."),
    batch: int = BatchOpt,
    seq: int = typer.Option(128, "--seq", "-s", min=1, help="Tokens per sequence."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: torch's)."),
    min_time: float = typer.Option(2.0, "--min-time", min=0.05, help="Seconds of timed runs per row."),
    no_baselines: bool = typer.Option(
        False, "--no-baselines", help="Skip the int8 and FFN-removed reference rows (a converted model is then timed alone, without its base model)."),
    random_init: bool = RandomInitOpt,
    layer: bool = typer.Option(False, "--layer", help="Time one converted layer on each kernel against its dense counterpart instead."),
    to: Optional[str] = typer.Option(None, "--to", help="--layer: fff (default), ternary, moe or int8."),
    hidden: int = typer.Option(768, "--hidden", help="--layer without a model: hidden size (ternary, int8: input features)."),
    width: int = typer.Option(3072, "--width", help="--layer without a model: dense FFN width (ternary, int8: output features)."),
    trees: int = typer.Option(1, "--trees", help="--layer without a model: trees."),
    depth: int = typer.Option(11, "--depth", help="--layer without a model: depth."),
    leaf_width: int = typer.Option(1, "--leaf-width", help="--layer without a model: leaf width."),
    act_bits: int = typer.Option(8, "--act-bits", help="--layer --to ternary without a model: 8 or 16."),
    experts: int = typer.Option(64, "--experts", help="--layer --to moe without a model: experts (the width split evenly)."),
    top_k: int = typer.Option(15, "--top-k", help="--layer --to moe without a model: experts per token."),
    tokens: str = typer.Option("1,128,1024", "--tokens", help="--layer: token counts, comma separated."),
    generate: Optional[int] = typer.Option(
        None, "--generate", min=1, help="Decoder LMs: time greedy generation of N tokens at batch 1 with the KV cache "
                                        "(prefill ms of a --seq token prompt, decode tokens/s) instead of one forward pass."),
    as_json: bool = JsonOpt,
):
    """End-to-end latency, tokens/s and peak memory, against int8 dynamic quantization and the FFN-removed floor."""
    from .api import bench as run_bench
    from .api import bench_layer

    if layer:
        if models and len(models) > 1:
            _run(lambda: (_ for _ in ()).throw(CcliError("--layer takes at most one converted model directory")))
        counts = _run(lambda: _int_list(tokens, "--tokens"))
        with _status("benchmarking one layer", as_json):
            rows = _run(lambda: bench_layer(
                models[0] if models else None, to=to or _layer_family(models), hidden=hidden, width=width,
                trees=trees, depth=depth, leaf_width=leaf_width, act_bits=act_bits, experts=experts, top_k=top_k, tokens=counts,
                device=device, threads=threads, min_run_time=min_time,
            ))
        _emit(rows, as_json, "bench-layer")
        return
    with _status("benchmarking", as_json):
        rows = _run(lambda: run_bench(
            models or [None], device=device, batch=batch, seq=seq, threads=threads,
            random_init=random_init, with_baselines=not no_baselines, min_run_time=min_time, generate=generate,
        ))
    _emit(rows, as_json, "bench-generate" if generate else "bench")


def _variant_options() -> list[inspect.Parameter]:
    """One CLI option per field of every family's config (fields of the same name share it)."""
    from .variants import FAMILIES

    merged: dict[str, tuple[type, list[str]]] = {}
    for name, family in FAMILIES.items():
        for f in family.config.options():
            kind, helps = merged.setdefault(f.name, (type(f.default), []))
            helps.append(f"{name}: {f.metadata.get('help', '')} (default {f.default}).")
    return [inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
                              default=typer.Option(None, "--" + key.replace("_", "-"), help="; ".join(helps)))
            for key, (kind, helps) in merged.items()]


def convert(**options):
    """Convert a model's FFNs, linear layers or blocks into a conditional-compute variant by
    distillation, and measure fidelity."""
    from .conversion import convert as run_convert

    params = {p.name: options.pop(p.name) for p in _variant_options()}
    model, as_json = options.pop("model"), options.pop("as_json")
    record = _run(lambda: run_convert(model, params=params, **options))
    _emit([record], as_json, "convert")


def _convert_signature() -> inspect.Signature:
    from .variants import FAMILIES

    def option(name, kind, *flags, help):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                 default=typer.Option(None, *flags, help=help))

    families = ", ".join(FAMILIES)
    return inspect.Signature([
        inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=typer.Argument(
            None, help="Model alias, local directory or Hub id (default: the embedded minilm).")),
        option("to", Optional[str], "--to", help=f"Variant family: {families}."),
        option("recipe", Optional[str], "--recipe", help="YAML recipe (explicit options override it)."),
        *_variant_options(),
        option("steps", Optional[int], "--steps", help="Layer-wise training steps per layer."),
        option("e2e_steps", Optional[int], "--e2e-steps", help="End-to-end training steps after the layers."),
        option("lr", Optional[float], "--lr", help="Layer-wise learning rate."),
        option("e2e_lr", Optional[float], "--e2e-lr", help="End-to-end learning rate."),
        option("seed", Optional[int], "--seed", help="Random seed."),
        option("tokens", Optional[int], "--tokens", help="Calibration tokens per layer."),
        option("short_spans", Optional[float], "--short-spans",
               help="Add this fraction of short random spans (4-64 words) to the training text (default 0)."),
        option("anchor", Optional[float], "--anchor",
               help="Pull converted weights toward their initialisation from the dense layer, with this strength (default 0)."),
        option("e2e_target", Optional[str], "--e2e-target",
               help="End-to-end loss on the final hidden states (last, default), on every block's output (all), or for a language model on the next-token distributions (logits: KL from the original)."),
        option("data", Optional[str], "--data", help="Training text: bundled (its training domains), bundled:NAME[,NAME], a .txt or .jsonl file, or hf:NAME; scored per domain."),
        option("out", Optional[str], "--out", "-o", help="Directory to save the converted model in."),
        inspect.Parameter("heldout_paragraphs", inspect.Parameter.KEYWORD_ONLY, annotation=int, default=typer.Option(
            128, "--paragraphs", min=2, help="Held-out paragraphs to score per text domain.")),
        inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--resume", help="Continue an interrupted conversion into the same --out.")),
        inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--overwrite", help="Replace --out if it exists.")),
        inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=JsonOpt),
    ])


# The variant options come from the registered families' configs, so a new family's options appear
# here without touching this file.
convert.__signature__ = _convert_signature()
app.command()(convert)


@app.command("eval")
def evaluate(
    directory: str = typer.Argument(..., help="A directory written by ccli convert --out."),
    data: Optional[str] = typer.Option(None, "--data", help="Your own text (.txt or .jsonl file, or hf:NAME), scored as a domain of its own beside the bundled ones."),
    paragraphs: int = typer.Option(128, "--paragraphs", min=2, help="Held-out paragraphs to score per text domain."),
    as_json: bool = JsonOpt,
):
    """Fidelity of a converted model to its base model on held-out text, per text domain."""
    from .conversion import evaluate as run_eval

    with _status("evaluating", as_json):
        record = _run(lambda: run_eval(directory, data=data, heldout_paragraphs=paragraphs))
    _emit([record], as_json, "eval")


@app.command()
def compare(
    models: Optional[List[str]] = typer.Argument(None, help="Converted directories (or the base model itself); default: the embedded minilm."),
    baselines: bool = typer.Option(False, "--baselines", help="Add the base model's int8-dynamic and FFN-removed rows, and fp16/bf16 where the device computes them natively."),
    baseline: Optional[List[str]] = typer.Option(None, "--baseline", help="Add this baseline row (repeatable): int8-dynamic, ffn-removed, fp16, bf16."),
    seq: str = typer.Option("16,128", "--seq", "-s", help="Sequence lengths to time, comma separated."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: torch's)."),
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda (for timing; fidelity is measured on CPU)."),
    min_time: float = typer.Option(0.5, "--min-time", min=0.01, help="Seconds of timed runs per row, length and round."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Interleaved timing rounds; the median over rounds is reported."),
    data: Optional[str] = typer.Option(None, "--data", help="Your own text (.txt or .jsonl file, or hf:NAME), scored as a domain of its own beside the bundled ones."),
    paragraphs: int = typer.Option(128, "--paragraphs", min=2, help="Held-out paragraphs to score per text domain."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Also write fidelity against latency, with the Pareto frontier, to this .png or .svg."),
    as_json: bool = JsonOpt,
):
    """Fidelity against the base model, FLOPs, weights and latency of models and baselines in one
    interleaved run, with the fidelity/latency Pareto frontier marked."""
    from . import report
    from .frontier import compare_models

    seqs = _run(lambda: _int_list(seq, "--seq"))
    if plot:
        _run(lambda: report.check_plot(plot))
    chosen = (["all"] if baselines else []) + list(baseline or [])
    with _status("comparing", as_json):
        records = _run(lambda: compare_models(
            models or [None], baselines=chosen,
            seq=seqs, threads=threads, device=device, min_time=min_time, rounds=rounds, data=data,
            heldout_paragraphs=paragraphs, progress=None if as_json else (lambda message: err.print(message, highlight=False)),
        ))
    if plot:
        _run(lambda: report.plot_frontier(records, plot))
    _emit(records, as_json, "compare")
    if plot and not as_json:
        out.print(f"plot written to {plot}", highlight=False)


def _emit(records: list[dict], as_json: bool, kind: str) -> None:
    from . import report

    if as_json:
        report.print_json(records)
        return
    tables = {
        "profile": lambda: report.profile_tables(records),
        "bench": lambda: [report.bench_table(records)],
        "convert": lambda: report.convert_tables(records[0]),
        "eval": lambda: report.fidelity_tables(records[0]),
        "bench-layer": lambda: [report.layer_table(records)],
        "compare": lambda: [report.compare_table(records)],
        "bench-generate": lambda: [report.generation_table(records)],
    }[kind]()
    report.render(out, tables)
    notes = {r["note"] for r in records if r.get("note")}
    for note in notes:
        out.print(f"note: {note}", highlight=False)
    if kind in ("bench", "bench-generate") and any(r.get("random_init") for r in records):
        out.print("note: random weights: timings do not depend on weight values", highlight=False)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CcliError(f"{flag} takes comma-separated integers (got '{text}')") from None
    if not values or min(values) < 1:
        raise CcliError(f"{flag} takes positive integers (got '{text}')")
    return values


def _version(value: bool) -> None:
    if value:
        out.print(f"ccli {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    """Conditional computation for transformer models."""


def entry() -> None:  # console script
    try:
        app()
    except CcliError as exc:  # raised outside a command (should not happen, but never a traceback)
        err.print(f"error: {exc}", highlight=False)
        sys.exit(exc.exit_code)
