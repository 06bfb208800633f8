"""ccli compare: every column for an embedding model and an LM, baselines measured like conversions,
the Pareto marking, the plot, and the one-line errors. Tiny models, seq 8, tiny timing budgets."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import pytest
from torch import nn
from typer.testing import CliRunner

import ccli
from ccli.cli import app
from ccli.conversion import convert
from ccli.data import DOMAINS
from ccli.errors import CcliError
from ccli.frontier import BASELINES, pareto_front
from ccli.report import compare_table

FAST = dict(seq=[8], min_time=0.01, rounds=2, threads=1, heldout_paragraphs=12)
EMBEDDING_COLUMNS = ("embedding_cosine", "embedding_cosine_min", "embedding_cosine_short", "retrieval_agreement",
                     "worst_domain_cosine")
LM_COLUMNS = ("perplexity_student", "kl", "top1_agreement")
runner = CliRunner()




@pytest.fixture(scope="module")
def tiny_fff(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("fff") / "tiny-fff"
    convert(tiny_bert, to="fff", params={"depth": 1, "leaf_width": 16}, steps=4, tokens=512, batch_tokens=128,
            out=str(out), evaluate_fidelity=False, show_progress=False)
    return str(out)


@pytest.fixture(scope="module")
def bert_records(tiny_bert, tiny_fff):
    return ccli.compare([tiny_fff], baselines=["int8-dynamic", "ffn-removed", "fp16", "bf16"], **FAST)


def _cells(table) -> list[list[str]]:
    columns = [list(c.cells) for c in table.columns]
    return [list(row) for row in zip(*columns)]


def test_embedding_rows_hold_every_column(bert_records, tiny_fff):
    assert [r["row"] for r in bert_records] == ["dense", tiny_fff, "int8-dynamic", "ffn-removed", "fp16", "bf16"]
    for r in bert_records:
        assert r["task"] == "embedding" and r["frontier_measure"] == "worst_domain_cosine"
        domains = r["fidelity"]["domains"]
        assert r["fidelity"]["worst_domain"] == domains[0]["domain"] and len(domains) == len(DOMAINS)
        assert [d["embedding_cosine"] for d in domains] == sorted(d["embedding_cosine"] for d in domains)
        assert r["fidelity"]["worst_domain_cosine"] == domains[0]["embedding_cosine"]
        assert {d["domain"] for d in domains if not d["seen"]} == {d.name for d in DOMAINS if d.left_out}
        for key in EMBEDDING_COLUMNS:
            assert 0 <= r["fidelity"][key] <= 1.0
        assert r["weight_bytes"] > 0 and r["heldout"]["paragraphs"] >= 2
        (entry,) = r["latency"]
        assert entry["seq"] == 8 and entry["rounds"] == 2 and entry["median_ms"] > 0 and entry["speedup"] > 0
        assert entry["flops_per_token"] > 0 and isinstance(entry["pareto"], bool)
        assert r["pareto"] == ([8] if entry["pareto"] else [])
    converted = bert_records[1]
    assert converted["kind"] == "converted" and converted["conversion"].startswith("fff ")
    assert {r["kind"] for r in bert_records[2:]} == {"baseline"}
    json.dumps(bert_records)  # clean JSON: no tensors, no modules

    cells = _cells(compare_table(bert_records))
    assert [row[0] for row in cells] == [r["row"] for r in bert_records]
    headers = [c.header for c in compare_table(bert_records).columns]
    assert headers == ["row", "conversion", "worst domain", "trained", "unseen", "retrieval",
                       "FLOPs/token", "weights", "ms @8", "x @8"]
    assert all(len(row) == len(headers) and all(row[2:]) for row in cells)


def test_dense_against_itself_is_exact_and_every_row_is_scored_against_it(bert_records):
    dense = bert_records[0]
    assert dense["row"] == "dense" and dense["kind"] == "base"
    for key in EMBEDDING_COLUMNS:
        assert dense["fidelity"][key] == 1.0
    assert dense["latency"][0]["speedup"] > 0
    # half precision changes the numbers a little, the FFN-removed floor a lot: measured, not assumed
    by_row = {r["row"]: r for r in bert_records}
    assert by_row["ffn-removed"]["fidelity"]["embedding_cosine"] < by_row["fp16"]["fidelity"]["embedding_cosine"]
    assert by_row["fp16"]["fidelity"]["embedding_cosine"] > 0.99


def test_baseline_work_and_weights_follow_their_definitions(bert_records, tiny_bert):
    """fp16/bf16 halve every floating-point weight (index buffers stay int64); int8-dynamic keeps each linear's weight in one byte plus a scale and a
    zero point (8 bytes) and its bias in fp32; FFN-removed does no FFN work."""
    model, _ = ccli.load(tiny_bert)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    by_row = {r["row"]: r for r in bert_records}
    dense = by_row["dense"]["weight_bytes"]
    index = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_floating_point())
    assert index > 0
    assert by_row["fp16"]["weight_bytes"] == by_row["bf16"]["weight_bytes"] == (dense - index) // 2 + index
    assert by_row["int8-dynamic"]["weight_bytes"] == dense - sum(3 * m.weight.numel() - 8 for m in linears)
    flops = {name: r["latency"][0]["flops_per_token"] for name, r in by_row.items()}
    assert flops["fp16"] == flops["bf16"] == flops["int8-dynamic"] == flops["dense"]
    ffn_flops = 2 * 2 * 2 * 32 * 64  # 2 layers x 2 linears x 2 FLOPs per MAC x hidden x width
    assert flops["dense"] - flops["ffn-removed"] == ffn_flops


def test_lm_rows_hold_every_column(tiny_llama):
    records = ccli.compare(tiny_llama, baselines=["ffn-removed", "int8-dynamic"], **FAST)
    assert [r["row"] for r in records] == ["dense", "ffn-removed", "int8-dynamic"]
    dense = records[0]
    assert dense["fidelity"]["kl"] == 0.0 and dense["fidelity"]["top1_agreement"] == 1.0
    assert dense["fidelity"]["perplexity_student"] == dense["fidelity"]["perplexity_teacher"]
    for r in records:
        assert r["task"] == "lm" and r["frontier_measure"] == "kl"
        for key in LM_COLUMNS:
            assert r["fidelity"][key] >= 0
        assert 0 <= r["fidelity"]["top1_agreement"] <= 1
    assert records[1]["fidelity"]["kl"] > 0
    headers = [c.header for c in compare_table(records).columns]
    assert headers == ["row", "conversion", "perplexity", "KL", "top-1 agree", "FLOPs/token", "weights", "ms @8", "x @8"]


def test_pareto_front_on_constructed_rows():
    # (fidelity, latency): higher fidelity and lower latency are better
    points = [(1.0, 10.0), (0.9, 5.0), (0.8, 6.0), (0.95, 10.0), (0.5, 1.0), (0.9, 5.0), (1.0, 12.0)]
    assert pareto_front(points) == [True, True, False, False, True, True, False]
    assert pareto_front([(0.5, 3.0)]) == [True]
    assert pareto_front([]) == []


def test_frontier_marks_follow_the_rows(bert_records):
    points = [(r["fidelity"]["embedding_cosine"], r["latency"][0]["median_ms"]) for r in bert_records]
    assert [r["latency"][0]["pareto"] for r in bert_records] == pareto_front(points)
    # nothing is faster than the fastest row (the most faithful of them if several tie), so it is on the frontier
    fastest = max(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))
    assert bert_records[fastest]["latency"][0]["pareto"]
    marked = [row[-2].endswith("*") for row in _cells(compare_table(bert_records))]
    assert marked == [r["latency"][0]["pareto"] for r in bert_records]


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_plot_is_a_valid_image(bert_records, tmp_path, suffix):
    from ccli.report import plot_frontier

    path = tmp_path / f"frontier.{suffix}"
    plot_frontier(bert_records, str(path))
    data = path.read_bytes()
    if suffix == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    else:
        root = ElementTree.fromstring(data)
        assert root.tag.endswith("svg")
        assert b"dense" in data and b"int8-dynamic" in data  # the points are labelled


def test_cli_json_and_table_with_plot(tiny_bert, tmp_path):
    plot = tmp_path / "f.png"
    args = ["compare", tiny_bert, "--baseline", "ffn-removed", "--seq", "8", "--min-time", "0.01", "--rounds", "1",
            "--threads", "1", "--paragraphs", "8"]
    result = runner.invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)  # stdout holds only JSON
    assert [r["row"] for r in records] == ["dense", "ffn-removed"]
    result = runner.invoke(app, args + ["--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "ccli compare" in result.stdout and "ffn-removed" in result.stdout and "worst domain" in result.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["not-a-model-dir"], "holds no config.json"),
    (["TINY", "--baseline", "int4"], "unknown baseline 'int4'"),
    (["TINY", "--seq", "8,x"], "--seq takes comma-separated integers"),
    (["TINY", "--plot", "frontier.pdf"], "give a .png or .svg"),
    (["TINY", "--baseline", "int8-dynamic", "--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_inputs_are_one_line_errors(args, message, tiny_bert, tmp_path):
    if args[0] == "not-a-model-dir":
        (tmp_path / "not-a-model-dir").mkdir()
        args = [str(tmp_path / "not-a-model-dir")]
    args = [tiny_bert if a == "TINY" else a for a in args]
    result = runner.invoke(app, ["compare", *args, "--min-time", "0.01", "--rounds", "1"])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_models_with_different_bases_are_refused(tiny_bert, tiny_llama):
    with pytest.raises(CcliError, match="different bases"):
        ccli.compare([tiny_bert, tiny_llama], **FAST)
    assert set(BASELINES) >= {"dense", "int8-dynamic", "ffn-removed", "fp16", "bf16"}


def test_plot_without_matplotlib_names_the_install_command(tiny_bert, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = runner.invoke(app, ["compare", tiny_bert, "--plot", str(tmp_path / "f.svg")])
    assert result.exit_code == 2 and "pip install 'ccli[plot]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_rows_are_timed_in_interleaved_rounds_and_the_median_of_rounds_is_reported(tiny_bert, monkeypatch):
    """Each round times every row at every length in turn; a row's latency is the median of its
    rounds' medians and its speedup is the dense row's median over its own."""
    import statistics

    import ccli.frontier as frontier
    from ccli.measure.timing import Timing

    calls = []

    def fake_time_call(fn, **kwargs):
        model, x = fn.__defaults__
        calls.append((model, x["input_ids"].shape[1]))
        ms = float(len(calls) % 7 + 1)  # a different, known number per call
        return Timing(median_ms=ms, iqr_ms=0.0, p90_ms=ms, runs=1, peak_mem_mb=0.0)

    monkeypatch.setattr(frontier, "time_call", fake_time_call)
    records = ccli.compare(tiny_bert, baselines=["ffn-removed", "fp16"], **{**FAST, "seq": [4, 8], "rounds": 3})
    models = [m for m, _ in calls[:3]]
    assert len(set(map(id, models))) == 3
    expected = [(models[i], s) for _ in range(3) for s in (4, 8) for i in range(3)]
    assert [(id(m), s) for m, s in calls] == [(id(m), s) for m, s in expected]
    for i, record in enumerate(records):
        for k, s in enumerate((4, 8)):
            mine = [n % 7 + 1 for n, (m, length) in enumerate(calls, 1) if m is models[i] and length == s]
            dense = [n % 7 + 1 for n, (m, length) in enumerate(calls, 1) if m is models[0] and length == s]
            entry = record["latency"][k]
            assert entry["rounds"] == 3 and entry["median_ms"] == statistics.median(mine)
            assert entry["speedup"] == round(statistics.median(dense) / statistics.median(mine), 3)
