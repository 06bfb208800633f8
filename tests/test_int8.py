"""The int8 family (W8A8, one activation scale per token): what sets it apart from torch's dynamic int8
quantisation (a token with a large activation does not cost the others their precision), its module's
two lives (latent weight with a straight-through estimator, then int8 weights only), and conversion of
encoders and decoders: saves, reloads bit-identically, profiles with the dense FLOP count. The kernel
against its reference on every backend is in test_kernels.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import ccli
from ccli.api import profile
from ccli.baselines import int8_dynamic
from ccli.cli import app
from ccli.conversion import convert
from ccli.kernels import int8 as I
from ccli.variants.int8 import Int8Linear
from tiny_dirs import one_line_error

BUDGET = dict(tokens=512, batch_tokens=128, e2e_batch=4, heldout_paragraphs=16, show_progress=False)


def test_quantize_weights_is_per_row_absmax():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.03]])
    q, scale = I.quantize_weights(w)
    assert q.dtype is torch.int8 and scale.dtype is torch.float32
    torch.testing.assert_close(scale, torch.tensor([1.0 / 127, I.WEIGHT_EPS, 3.0 / 127]))
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0] and q[2].tolist() == [127, 64, -1]
    torch.testing.assert_close(I.fake_quantize_weights(w), q.float() * scale[:, None])


def test_a_large_token_does_not_cost_the_others_their_precision():
    """torch's dynamic int8 shares one activation scale among all the tokens of a call; with one token
    500x the others (MiniLM and SmolLM2 both have such tokens), the ordinary tokens keep a few levels and
    their outputs go wrong. One scale per token keeps them as precise as when they are alone."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[0] *= 500
    ours = Int8Linear.from_dense(linear.weight, linear.bias)
    ours.finalize()
    with torch.inference_mode():
        exact, torchs, mine = linear(x), int8_dynamic(nn.Sequential(linear))(x), ours(x)
        alone = ours(x[1:])

    def error(y):  # relative error of the ordinary tokens
        return ((y[1:] - exact[1:]).norm(dim=1) / exact[1:].norm(dim=1)).mean().item()

    assert error(mine) < 0.02 < 0.2 < error(torchs)
    torch.testing.assert_close(mine[1:], alone)  # each token on its own scale


def test_module_trains_its_latent_weight_then_keeps_only_int8():
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    layer = Int8Linear.from_dense(dense.weight, dense.bias).train()
    x = torch.randn(5, 16)
    layer(x).pow(2).sum().backward()  # straight through the quantisation to the latent weight
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.weight.add_(0.1)
    layer.eval()
    with torch.inference_mode():
        y = layer(x)  # re-quantised from the moved latent weight
    expected = I.int8_linear_reference(x, *I.quantize_weights(dense.weight.detach() + 0.1), layer.bias.detach())
    torch.testing.assert_close(y, expected)
    layer.finalize()
    assert layer.weight is None and set(layer.state_dict()) == {"qweight", "scale", "bias"}
    assert layer.weight_bytes == 8 * 16 + 8 * 4
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.dense_weight(), I.fake_quantize_weights(dense.weight.detach() + 0.1))


@pytest.mark.slow
def test_an_encoder_converts_saves_reloads_bit_identically_and_profiles(tiny_bert, tmp_path):
    out = tmp_path / "int8-bert"
    record = convert(tiny_bert, to="int8", out=str(out), **BUDGET)
    assert len(record["layers"]) == 2 * 6  # q, k, v, attention output, FFN in and out in each of two blocks
    # no training unless asked: the family's default (Int8Variant.distill_defaults)
    assert json.loads((out / "ccli.json").read_text())["distill"]["steps"] == 0
    assert all(u["final_rel_error"] == u["init_rel_error"] for u in record["layers"])
    assert record["weight_bytes"] < record["weight_bytes_dense"]
    assert record["fidelity"]["embedding_cosine"] > 0.99
    model, tokenizer = ccli.load(str(out))
    state = model.state_dict()
    assert sum(k.endswith(".qweight") for k in state) == 12 and not any(k.endswith("query.weight") for k in state)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in state.items() if k in saved)
    again, _ = ccli.load(str(out))
    enc = tokenizer(["int8 weights reload to the same bits."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).last_hidden_state, again(**enc).last_hidden_state)
    (row,) = profile(str(out), seq=16, cross_check=False)
    (dense,) = profile(tiny_bert, seq=16, cross_check=False)
    assert row["flops_by_component"] == dense["flops_by_component"]  # integer products are still products


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    from conftest import EMBEDDED_VOCAB, _save_tiny
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_inner=64, n_layer=2, n_head=4, vocab_size=EMBEDDED_VOCAB, n_positions=256)
    return _save_tiny(GPT2LMHeadModel(cfg).eval(), tmp_path_factory.mktemp("gpt2") / "tiny-gpt2")


@pytest.mark.slow
def test_a_gpt2_and_a_llama_convert_with_every_linear_int8(tiny_gpt2_dir, tiny_llama, tmp_path):
    for name, source, linears in [("gpt2", tiny_gpt2_dir, 4), ("llama", tiny_llama, 7)]:
        out = tmp_path / f"int8-{name}"
        record = convert(source, to="int8", out=str(out), **BUDGET)
        assert len(record["layers"]) == 2 * linears, name  # GPT-2's Conv1D layers too
        assert record["fidelity"]["top1_agreement"] > 0.9 and record["fidelity"]["kl"] < 0.01, name
        model, _ = ccli.load(str(out))
        assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * linears
        assert not isinstance(model.get_output_embeddings(), Int8Linear)  # the head only with --head
    out = tmp_path / "int8-llama-head"
    record = convert(tiny_llama, to="int8", params={"head": True}, out=str(out), **BUDGET)
    assert record["layers"][-1]["target"] == "lm_head" and len(record["layers"]) == 2 * 7 + 1
    model, tokenizer = ccli.load(str(out))
    head = model.get_output_embeddings()
    assert isinstance(head, Int8Linear) and head.weight is None  # no float copy of the head came back
    assert model.get_input_embeddings().weight.dtype is torch.float32
    again, _ = ccli.load(str(out))
    enc = tokenizer(["The head reloads to the same bits."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, again(**enc).logits)


def test_int8_options_are_checked():
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--to", "int8", "--depth", "3"])
    assert result.exit_code == 2 and "--depth does not apply to int8" in result.stderr
    result = runner.invoke(app, ["convert", "--to", "int8", "--targets", "heads"])
    assert result.exit_code == 2 and "int8: --targets must be one of ffn, attention, all (got 'heads')" in result.stderr


def test_the_head_is_refused_on_a_model_without_one(tiny_bert, no_training):
    result = CliRunner().invoke(app, ["convert", tiny_bert, "--to", "int8", "--head"])
    one_line_error(result, "int8: --head needs a model with a language-model head (this one has none)", alone=False)


def test_layer_bench_times_the_int8_linear_beside_torchs_int8_of_it():
    from ccli.api import bench_layer

    rows = bench_layer(to="int8", hidden=64, width=48, tokens=[1, 4], min_run_time=0.02)
    for n in (1, 4):
        kernels = {r["kernel"]: r for r in rows if r["tokens"] == n}
        assert list(kernels)[:3] == ["dense", "int8-dynamic", "int8-reference"] and "int8-native" in kernels
        assert {r["macs_per_token"] for r in kernels.values()} == {64 * 48}
        assert kernels["dense"]["weight_bytes"] == 64 * 48 * 4
        assert kernels["int8-native"]["weight_bytes"] == 64 * 48 + 48 * 4  # int8 weights and a scale per row
        assert 64 * 48 <= kernels["int8-dynamic"]["weight_bytes"] < 64 * 48 * 2
        assert all(r["median_ms"] > 0 for r in kernels.values())


def test_native_kernel_handles_rows_longer_than_its_small_token_path():
    """Rows of more than 65,536 inputs could overflow the small-token kernel's int32 sums of q + 128;
    they go to torch._int_mm, whatever the token count, and agree exactly with the reference."""
    from ccli.kernels import native

    if native.INT8.load() is None:
        pytest.skip(f"native int8 kernel unavailable: {native.INT8.failure_reason()}")
    g = torch.Generator().manual_seed(0)
    x = torch.full((2, 70_000), 3.0)
    x[1, ::2] = -3.0
    weight = torch.full((3, 70_000), 127, dtype=torch.int8)
    weight[1] = -127
    weight[2] = torch.randint(-127, 128, (70_000,), generator=g, dtype=torch.int8)
    scale = torch.full((3,), 1e-3)
    torch.testing.assert_close(I.int8_linear_native(x, weight, scale), I.int8_linear_reference(x, weight, scale))
