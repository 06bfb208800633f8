"""The `ccli` command line: parses arguments, calls ccli's Python API and renders what it returns.
No logic of its own lives here."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import List, Optional

import typer
from rich.console import Console

from . import __version__
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


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _run(action):
    """Run an API call; a CcliError becomes one line on stderr and a non-zero exit code."""
    _quiet_libraries()
    try:
        return action()
    except CcliError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
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


@app.command()
def bench(
    models: Optional[List[str]] = ModelsArg,
    device: str = typer.Option("cpu", "--device", "-d", help="cpu or cuda."),
    batch: int = BatchOpt,
    seq: int = typer.Option(128, "--seq", "-s", min=1, help="Tokens per sequence."),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: torch's)."),
    min_time: float = typer.Option(2.0, "--min-time", min=0.05, help="Seconds of timed runs per row."),
    no_baselines: bool = typer.Option(False, "--no-baselines", help="Skip the int8 and FFN-removed reference rows."),
    random_init: bool = RandomInitOpt,
    as_json: bool = JsonOpt,
):
    """End-to-end latency, tokens/s and peak memory, against int8 dynamic quantization and the FFN-removed floor."""
    from .api import bench as run_bench

    with _status("benchmarking", as_json):
        rows = _run(lambda: run_bench(
            models or [None], device=device, batch=batch, seq=seq, threads=threads,
            random_init=random_init, with_baselines=not no_baselines, min_run_time=min_time,
        ))
    _emit(rows, as_json, "bench")


def _emit(records: list[dict], as_json: bool, kind: str) -> None:
    from . import report

    if as_json:
        report.print_json(records)
        return
    tables = report.profile_tables(records) if kind == "profile" else [report.bench_table(records)]
    report.render(out, tables)
    notes = {r["note"] for r in records if r.get("note")}
    for note in notes:
        out.print(f"note: {note}", highlight=False)
    if kind == "bench" and any(r.get("random_init") for r in records):
        out.print("note: random weights: timings do not depend on weight values", highlight=False)


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
