"""The CLI through typer's CliRunner: output shapes, JSON, and every error path's exit code."""

import json

import pytest
import torch
from typer.testing import CliRunner

from ccli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_version_and_help():
    assert run("--version").exit_code == 0
    result = run("--help")
    assert result.exit_code == 0 and "profile" in result.stdout and "bench" in result.stdout


@pytest.mark.slow
def test_profile_json_on_the_default_model():
    result = run("profile", "--seq", "32", "--json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)  # stdout holds only JSON
    for key in ("model", "params", "flops_per_token", "flops_by_component", "active_neurons"):
        assert key in record
    assert record["model"] == "minilm"
    layer = record["active_neurons"][0]
    assert layer["computed"] == 1536 and 0 < layer["positive"] < 1536


@pytest.mark.slow
def test_profile_table_side_by_side_with_ratios():
    result = run("profile", "minilm", "bert-base", "--random-init", "--seq", "16")
    assert result.exit_code == 0, result.output
    assert "ccli profile" in result.stdout and "x)" in result.stdout  # ratio to the first model
    assert "active FFN neurons" in result.stdout


@pytest.mark.slow
def test_bench_json_has_dense_int8_and_floor_rows():
    result = run("bench", "--device", "cpu", "--seq", "16", "--min-time", "0.05", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["variant"] for r in rows] == ["dense", "int8-dynamic", "ffn-removed"]
    for row in rows:
        for key in ("model", "variant", "device", "batch", "seq", "median_ms", "iqr_ms", "p90_ms",
                    "tokens_per_s", "peak_mem_mb"):
            assert key in row
        assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] - 1e-9
    assert rows[0]["speedup"] == 1.0


def test_bench_table_random_init():
    result = run("bench", "distilbert", "--random-init", "--seq", "8", "--min-time", "0.05", "--no-baselines")
    assert result.exit_code == 0, result.output
    assert "ccli bench" in result.stdout and "dense" in result.stdout and "random weights" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("profile", "no-such-model-here"), "cannot load"),
        (("profile", "--seq", "100000"), "longer than the model's 512 positions"),
        (("profile", "gpt2", "--random-init", "--text", "hello"), "no tokenizer"),
        (("profile", "someone/x", "--random-init"), "--random-init needs one of the aliases"),
        (("bench", "--device", "tpu"), "unknown device 'tpu'"),
    ],
)
def test_error_paths_are_one_line_with_exit_code_2(args, message, monkeypatch):
    import ccli.hub

    monkeypatch.setattr(ccli.hub, "hub_reachable", lambda timeout=3.0: False)
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu():
    result = run("bench", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr


@pytest.mark.parametrize("args", [("profile", "--batch", "0"), ("bench", "--threads", "0"), ("profile", "--nope")])
def test_bad_flags(args):
    result = run(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_unsupported_family_from_a_local_directory(tmp_path):
    from tiny import tiny

    tiny("opt").save_pretrained(tmp_path)
    result = run("profile", str(tmp_path))
    assert result.exit_code == 2 and "unsupported model family 'opt'" in result.stderr
