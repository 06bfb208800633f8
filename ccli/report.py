"""Rendering of ccli's records: rich tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys

from .safety import json_safe

from rich.console import Console
from rich.table import Table


def print_json(records) -> None:
    """Only JSON goes to stdout with --json; progress and logs go to stderr."""
    sys.stdout.write(json.dumps(json_safe(records), indent=2, allow_nan=False) + "\n")  # NaN -> null


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def profile_tables(records: list[dict]) -> list[Table]:
    """One side-by-side table (columns = models, ratios to the first) and one active-neuron table."""
    first = records[0]
    summary = Table(title="ccli profile", caption=first["flops_unit"])
    summary.add_column("")
    for rec in records:
        summary.add_column(rec["model"] + (" (random init)" if rec["random_init"] else ""), justify="right")

    def row(label: str, getter, unit: str = "", ratio: bool = True) -> None:
        base = getter(first)
        summary.add_row(label, *(_si(getter(r), unit) + (_ratio(getter(r), base) if ratio and r is not first else "") for r in records))

    summary.add_row("family / layers / hidden", *(f"{r['family']} / {r['layers']} / {r['hidden']}" for r in records))
    summary.add_row("input (batch x seq)", *(f"{r['batch']} x {r['seq']}" for r in records))
    row("parameters", lambda r: r["params"]["total"])
    for part in ("embeddings", "attention", "ffn", "other"):
        row(f"  {part}", lambda r, part=part: r["params"][part])
    row("weight bytes", lambda r: r["weight_bytes"], "B")
    row("FLOPs / token", lambda r: r["flops_per_token"])
    for part in first["flops_by_component"]:
        row(f"  {part}", lambda r, part=part: r["flops_by_component"].get(part))
    if any(r.get("adds_per_token") for r in records):
        row("additions / token (ternary)", lambda r: r.get("adds_per_token"))
        for part in first.get("adds_by_component", {}):
            row(f"  {part}", lambda r, part=part: r.get("adds_by_component", {}).get(part))
    if "flops_per_token_torch" in first:
        row("FLOPs / token (torch check)", lambda r: r.get("flops_per_token_torch"), ratio=False)
    summary.add_row(
        "active FFN neurons / token",
        *(f"{_mean(r, 'computed'):.0f} computed, {_mean(r, 'positive'):.0f} positive" for r in records),
    )

    layers = Table(title="active FFN neurons per token (mean \\[min-max] over tokens)")
    layers.add_column("layer", justify="right")
    for rec in records:
        layers.add_column(f"{rec['model']}: computed", justify="right")
        layers.add_column("positive", justify="right")
    routed = any("expert_load" in layer for r in records for layer in r["active_neurons"])
    if routed:
        layers.add_column("expert load: busiest / mean, unused", justify="right")
    for i in range(max(len(r["active_neurons"]) for r in records)):
        cells = [str(i)]
        loads = []
        for rec in records:
            layer = rec["active_neurons"][i] if i < len(rec["active_neurons"]) else None
            cells += [_span(layer, "computed"), _span(layer, "positive")] if layer else ["", ""]
            if layer and "expert_load" in layer:
                loads.append(f"{layer['load_max']:.2f}x, {layer['experts_unused']} of {len(layer['expert_load'])}")
        if routed:
            cells.append("; ".join(loads) or "-")
        layers.add_row(*cells)
    tables = [summary, layers]
    if any(r.get("routed_blocks") for r in records):
        routed = Table(title="routed blocks (mod): tokens processed of the real tokens given")
        routed.add_column("model")
        routed.add_column("block", justify="right")
        routed.add_column("capacity", justify="right")
        routed.add_column("tokens processed", justify="right")
        for rec in records:
            for b in rec.get("routed_blocks", []):
                routed.add_row(rec["model"], str(b["block"]), f"{b['capacity']:g}",
                               f"{b['tokens']} / {b['real_tokens']} ({b['tokens'] / max(b['real_tokens'], 1):.1%})")
        tables.append(routed)
    return tables


def _mean(record: dict, key: str) -> float:
    values = [layer[key] for layer in record["active_neurons"] if layer[key] is not None]
    return sum(values) / len(values) if values else float("nan")


def _span(layer: dict, key: str) -> str:
    if layer[key] is None:
        return "-"
    lo, hi = layer[f"{key}_min"], layer[f"{key}_max"]
    spread = "" if lo == hi else f" [{lo}-{hi}]"
    return f"{layer[key]:.0f} / {layer['width']}{spread}" if key == "computed" else f"{layer[key]:.0f}{spread}"


def bench_table(rows: list[dict]) -> Table:
    first = rows[0]
    table = Table(
        title=f"ccli bench - {first['device']}, batch {first['batch']}, seq {first['seq']}, {first['threads']} thread(s)",
        caption="end-to-end forward pass; speedup against the model's dense row",
    )
    for name in ("model", "variant", "median ms", "IQR ms", "p90 ms", "tokens/s", "peak MB", "speedup"):
        table.add_column(name, justify="left" if name in ("model", "variant") else "right")
    for r in rows:
        table.add_row(
            r["model"], r["variant"], f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}", f"{r['p90_ms']:.2f}",
            f"{r['tokens_per_s']:.0f}", f"{r['peak_mem_mb']:.0f}", "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        )
    return table


def generation_table(rows: list[dict]) -> Table:
    first = rows[0]
    table = Table(
        title=f"ccli bench --generate {first['new_tokens']} - {first['device']}, batch 1, prompt {first['prompt_tokens']} tokens, "
              f"{first['threads']} thread(s)",
        caption="greedy generation with the KV cache; medians over runs (IQR); speedups against the model's dense row",
    )
    for name in ("model", "variant", "prefill ms", "IQR", "decode ms/token", "IQR ", "decode tokens/s", "runs",
                 "peak MB", "prefill speedup", "decode speedup"):
        table.add_column(name, justify="left" if name in ("model", "variant") else "right")
    for r in rows:
        table.add_row(
            r["model"], r["variant"], f"{r['prefill_ms']:.1f}", f"{r['prefill_iqr_ms']:.1f}",
            f"{r['decode_ms_per_token']:.2f}", f"{r['decode_iqr_ms_per_token']:.2f}", f"{r['decode_tokens_per_s']:.1f}",
            str(r["runs"]), f"{r['peak_mem_mb']:.0f}",
            "-" if r.get("prefill_speedup") is None else f"{r['prefill_speedup']:.2f}x",
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
        )
    return table


def fidelity_tables(record: dict) -> list[Table]:
    """Fidelity to the teacher on held-out text, and each converted layer's FFN error."""
    fid = record["fidelity"]
    where = "the held-out text of the domains it trained on" if "unseen" in fid else "held-out text"
    table = Table(title=f"fidelity to the original on {where} ({fid['paragraphs']} paragraphs)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("pooled-embedding cosine (mean)", f"{fid['embedding_cosine']:.4f}"),
        ("pooled-embedding cosine (worst)", f"{fid['embedding_cosine_min']:.4f}"),
        *([("pooled-embedding cosine, 6-word inputs (mean)", f"{fid['embedding_cosine_short']:.4f}")]
          if "embedding_cosine_short" in fid else []),
        ("final hidden-state cosine (mean over tokens)", f"{fid['hidden_cosine']:.4f}"),
        ("top-1 retrieval agreement with the original", f"{fid['retrieval_agreement']:.1%}"),
        ("top-1 retrieval accuracy: original / converted",
         f"{fid['retrieval_top1_teacher']:.1%} / {fid['retrieval_top1_student']:.1%}"),
    ]
    if "kl" in fid:
        rows += [("next-token KL(original || converted)", f"{fid['kl']:.4f}"),
                 ("perplexity: original / converted", f"{fid['perplexity_teacher']:.2f} / {fid['perplexity_student']:.2f}")]
        if "top1_agreement" in fid:
            rows.append((f"next-token top-1 agreement ({fid.get('lm_tokens', '?')} tokens)", f"{fid['top1_agreement']:.1%}"))
    for name, value in rows:
        table.add_row(name, value)
    layers = Table(title="per-layer FFN fidelity on held-out text",
                   caption="relative error: 0 = exact, 1 = no better than the mean; tokens with large outputs "
                           "dominate it. Token cosine: mean over tokens, every token alike.")
    layers.add_column("layer", justify="right")
    layers.add_column("held-out rel. error", justify="right")
    cosines = fid.get("ffn_token_cosine", {})
    if cosines:
        layers.add_column("held-out token cosine", justify="right")
    train = {r["layer"]: r for r in record.get("layers", []) if r.get("target", "ffn") == "ffn"}
    if train:
        layers.add_column("training: after init", justify="right")
        layers.add_column("after distillation", justify="right")
    for index, err in fid.get("ffn_rel_error", {}).items():
        cells = [str(index), f"{err:.4f}"]
        if cosines:  # same keys as ffn_rel_error: both come from one ffn_fidelity call
            cos = cosines.get(index)
            cells.append("" if cos is None else f"{cos:.4f}")
        if train:
            t = train.get(int(index))
            cells += [f"{t['init_rel_error']:.4f}", f"{t['final_rel_error']:.4f}"] if t else ["", ""]
        layers.add_row(*cells)
    tables = [table] + ([domain_table(fid)] if "domains" in fid else []) + [layers]
    linears = [r for r in record.get("layers", []) if r.get("target", "ffn") != "ffn"]
    if linears:
        trained = Table(title="converted linears: relative error on their training inputs")
        for name in ("linear", "after init", "after distillation"):
            trained.add_column(name, justify="left" if name == "linear" else "right")
        for r in linears:
            trained.add_row(r["target"], f"{r['init_rel_error']:.4f}", f"{r['final_rel_error']:.4f}")
        tables.append(trained)
    return tables


def convert_tables(record: dict) -> list[Table]:
    summary = Table(title=f"ccli convert {record['model']}")
    summary.add_column("")
    summary.add_column("", justify="right")
    steps = " + ".join(f"{s['to']}(" + ", ".join(f"{k}={v}" for k, v in s.items() if k != "to") + ")" for s in record["convert"])
    summary.add_row("conversion", steps)
    summary.add_row("FFN FLOPs / token: dense -> converted",
                    f"{_si(record['ffn_flops_per_token_dense'])} -> {_si(record['ffn_flops_per_token'])} "
                    f"({record['ffn_flops_reduction']:.2f}x fewer)")
    if record.get("weight_bytes"):
        summary.add_row("weight bytes: dense -> converted",
                        f"{_si(record['weight_bytes_dense'], 'B')} -> {_si(record['weight_bytes'], 'B')} "
                        f"({record['weight_bytes_dense'] / record['weight_bytes']:.2f}x smaller)")
    if record.get("adds_per_token"):
        summary.add_row("additions / token (ternary layers)", _si(record["adds_per_token"]))
    summary.add_row("training time", f"{record['seconds']:.0f} s")
    if record.get("e2e_loss_first") is not None:
        all_blocks = record.get("distill", {}).get("e2e_target") == "all"
        summary.add_row("end-to-end " + ("block-output error (mean over blocks)" if all_blocks else "hidden-state error"), f"{record['e2e_loss_first']:.4f} -> {record['e2e_loss_last']:.4f}"
                        + (" (worse on the probe set: undone)" if record.get("e2e_kept") is False else ""))
    if record.get("out"):
        summary.add_row("saved to", record["out"])
    return [summary] + (fidelity_tables(record) if record.get("fidelity") else [])


def layer_table(rows: list[dict]) -> Table:
    first = rows[0]
    table = Table(title=f"ccli bench --layer: {first['layer']} (hidden {first['hidden']}), {first['device']}, {first['threads']} thread(s)",
                  caption="speedup against the dense layer at the same number of tokens; "
                          "MAC = multiply-accumulate, add = addition or subtraction")
    fff = "neurons_per_token" in first
    columns = ["tokens", "kernel"] + (["neurons/token"] if fff else ["weight bytes", "adds/token"]) + \
        ["MACs/token", "median ms", "IQR ms", "p90 ms", "speedup"]
    for name in columns:
        table.add_column(name, justify="left" if name == "kernel" else "right")
    for r in rows:
        work = [str(r["neurons_per_token"])] if fff else [_si(r["weight_bytes"], "B"), _si(r["adds_per_token"])]
        table.add_row(str(r["tokens"]), r["kernel"], *work, _si(r["macs_per_token"]), f"{r['median_ms']:.4f}",
                      f"{r['iqr_ms']:.4f}", f"{r['p90_ms']:.4f}", f"{r['speedup']:.1f}x")
    return table


def domain_table(fid: dict) -> Table:
    """Fidelity per text domain, worst first: on the held-out split of each domain the conversion
    trained on and of each it never saw."""
    lm = "top1_agreement" in fid["domains"][0]
    table = Table(title="fidelity per text domain, worst first",
                  caption="trained: the conversion distilled on this domain's train split; unseen: it never saw the domain"
                          + ("" if "unseen" not in fid else
                             f". Unseen domains pooled: cosine {fid['unseen']['embedding_cosine']:.4f}, "
                             f"retrieval agreement {fid['unseen']['retrieval_agreement']:.1%}"))
    for name in ("domain", "training", "paragraphs", "pooled cosine mean", "worst", "6-word cosine", "retrieval agree"):
        table.add_column(name, justify="left" if name in ("domain", "training") else "right")
    if lm:
        table.add_column("KL", justify="right")
        table.add_column("top-1 agree", justify="right")
    for d in fid["domains"]:
        cells = [d["domain"], "trained" if d["seen"] else "unseen", str(d["paragraphs"]), f"{d['embedding_cosine']:.4f}",
                 f"{d['embedding_cosine_min']:.4f}", f"{d['embedding_cosine_short']:.4f}", f"{d['retrieval_agreement']:.1%}"]
        if lm:
            cells += [f"{d['kl']:.4f}", f"{d['top1_agreement']:.1%}"]
        table.add_row(*cells)
    return table


def render(console: Console, tables) -> None:
    for table in tables:
        console.print(table)


def _fidelity_columns(task: str) -> list[tuple[str, object]]:
    """(header, cell) for compare's fidelity columns: pooled-embedding measures for embedding
    models, next-token measures for models with an LM head."""
    if task == "lm":
        return [("perplexity", lambda f: f"{f['perplexity_student']:.2f}"),
                ("KL", lambda f: f"{f['kl']:.4f}"),
                ("top-1 agree", lambda f: f"{f['top1_agreement']:.1%}")]
    return [("worst domain", lambda f: f"{f['worst_domain_cosine']:.4f} {f['worst_domain']}"),
            ("trained", lambda f: f"{f['embedding_cosine']:.4f}"),
            ("unseen", lambda f: f"{f['unseen']['embedding_cosine']:.4f}" if "unseen" in f else "-"),
            ("retrieval", lambda f: f"{f['retrieval_agreement']:.1%}")]


def compare_table(records: list[dict]) -> Table:
    """ccli compare: one row per model or baseline; fidelity, work, latency and speedup per length."""
    first = records[0]
    seqs = [entry["seq"] for entry in first["latency"]]
    held = first["heldout"]
    measure = "worst domain's pooled cosine" if first["frontier_measure"] == "worst_domain_cosine" else "KL"
    table = Table(
        title=f"ccli compare - {first['base_model']}, {first['device']}, batch 1, {first['threads']} thread(s)",
        caption=f"fidelity against {first['base_model']} on {held['paragraphs']} held-out paragraphs of "
                f"{len(first['fidelity']['domains'])} text domains ({held['data']}): pooled cosine on the worst domain, "
                f"the bundled corpus's training domains and its unseen ones, retrieval agreement on the training "
                f"domains (per domain, 6-word and worst-paragraph cosines: --json); "
                f"latency: median over {first['latency'][0]['rounds']} interleaved rounds; speedup against dense; "
                f"* = on the {measure} / latency Pareto frontier at that length; FLOPs at seq {seqs[-1]}",
    )
    table.add_column("row")
    table.add_column("conversion")
    columns = _fidelity_columns(first["task"])
    for header, _ in columns:
        table.add_column(header, justify="right")
    table.add_column("FLOPs/token", justify="right")
    table.add_column("weights", justify="right")
    for s in seqs:
        table.add_column(f"ms @{s}", justify="right")
        table.add_column(f"x @{s}", justify="right")
    for r in records:
        cells = [r["row"], r["conversion"] or ""]
        cells += [cell(r["fidelity"]) for _, cell in columns]
        cells += [_si(r["latency"][-1]["flops_per_token"]), _si(r["weight_bytes"], "B")]
        for entry in r["latency"]:
            mark = "*" if entry["pareto"] else ""
            cells += [f"{entry['median_ms']:.2f}{mark}", f"{entry['speedup']:.2f}x"]
        table.add_row(*cells)
    return table


PLOT_FORMATS = (".png", ".svg")


def check_plot(path: str) -> None:
    """Fail before any measuring when --plot cannot be written: wrong format, or no matplotlib."""
    from pathlib import Path

    from .errors import CcliError

    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise CcliError(f"--plot {path}: give a .png or .svg file name")
    if not Path(path).expanduser().resolve().parent.is_dir():
        raise CcliError(f"--plot {path}: its directory does not exist")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CcliError("--plot needs matplotlib: pip install 'ccli[plot]' (or pip install matplotlib)") from None


def plot_frontier(records: list[dict], path: str) -> str:
    """Fidelity against latency, one panel per sequence length, one labelled point per row, the
    Pareto frontier drawn as a line; written as PNG or SVG (by the file name). Returns the path."""
    check_plot(path)
    from matplotlib.figure import Figure

    first = records[0]
    lm = first["frontier_measure"] == "kl"
    seqs = [entry["seq"] for entry in first["latency"]]
    figure = Figure(figsize=(5.2 * len(seqs), 4.4), layout="constrained")
    axes = figure.subplots(1, len(seqs), squeeze=False)[0]
    for k, (ax, s) in enumerate(zip(axes, seqs)):
        xs = [r["latency"][k]["median_ms"] for r in records]
        ys = [r["fidelity"][first["frontier_measure"]] for r in records]
        on = [r["latency"][k]["pareto"] for r in records]
        ax.scatter([x for x, o in zip(xs, on) if not o], [y for y, o in zip(ys, on) if not o],
                   color="0.55", zorder=2, label="dominated")
        ax.scatter([x for x, o in zip(xs, on) if o], [y for y, o in zip(ys, on) if o],
                   color="tab:red", zorder=3, label="Pareto frontier")
        front = sorted((x, y) for x, y, o in zip(xs, ys, on) if o)
        ax.plot([x for x, _ in front], [y for _, y in front], color="tab:red", linewidth=1.2, zorder=1, drawstyle="steps-post")
        for x, y, r in zip(xs, ys, records):
            ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(f"latency at batch 1, seq {s} (ms, median)")
        ax.set_ylabel("next-token KL to the base model (lower is better)" if lm
                      else "pooled-embedding cosine, worst text domain (mean)")
        if lm:
            ax.invert_yaxis()
        ax.set_title(f"seq {s}", fontsize=10)
        ax.grid(True, linewidth=0.3)
        ax.legend(fontsize=7, loc="lower right" if not lm else "upper right")
    figure.suptitle(f"ccli compare: {first['base_model']}, {first['device']}, {first['threads']} thread(s)", fontsize=10)
    figure.savefig(path, metadata={"Software": None} if path.lower().endswith(".png") else {"Date": None})
    return path
