"""The MoE module: routing and the kernel path against a hand-written oracle, the training path, the
dense FFN kept exactly when every expert runs, FLOPs from the experts actually run (router
included), experts nobody picks and all tokens on one expert, gated (LLaMA) and GPT-2 Conv1D FFNs,
and a CI-sized conversion of the default model (saves, reloads bit-identically, beats its
un-distilled initialisation)."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import ccli
from ccli.arch import view
from ccli.cli import app
from ccli.conversion import convert
from ccli.errors import CcliError
from ccli.measure.components import flops_by_component
from ccli.measure.flops import count_flops, torch_flop_count
from ccli.measure.neurons import active_neurons
from ccli.variants.base import DenseFFN, apply_activation
from ccli.variants.moe import MoE, MoEVariant, _balanced_assign
from tiny import HIDDEN, LAYERS, WIDTH, tiny


def _layer(experts=6, width=5, top_k=2, shared=0, gated=False, coverage=0.0, hidden=HIDDEN, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = MoE(hidden, experts, width, top_k, shared, "gelu", gated, bias, True, coverage)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.3)
    return layer.eval()


def _oracle(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per token, written from the module doc: score the experts, take the top k (or the dynamic
    number), add each chosen expert's neurons, the shared neurons and the output bias."""
    x2d = x.reshape(-1, layer.hidden_size).double()
    w = layer.expert_width
    out = torch.zeros_like(x2d)
    for t, xt in enumerate(x2d):
        scores = layer.router.weight.double() @ xt + layer.router.bias.double()
        order = torch.argsort(scores, descending=True)[: layer.top_k].tolist()
        if layer.coverage:
            total, covered, chosen = scores.clamp_min(0).sum(), 0.0, []
            for e in order:
                if chosen and covered >= layer.coverage * total:
                    break
                chosen.append(e)
                covered += max(float(scores[e]), 0.0)
            order = chosen
        y = layer.output_bias.double().clone()
        for e in order:
            rows = slice(e * w, (e + 1) * w)
            z = layer.w_in[rows].double() @ xt + (layer.b_in[rows].double() if layer.b_in is not None else 0)
            h = apply_activation(layer.w_gate[rows].double() @ xt, "gelu") * z if layer.gated else apply_activation(z, "gelu")
            y += h @ layer.w_out[rows].double()
        if layer.shared:
            z = layer.shared_in.weight.double() @ xt + (layer.shared_in.bias.double() if layer.shared_in.bias is not None else 0)
            h = apply_activation(layer.shared_gate.weight.double() @ xt, "gelu") * z if layer.gated else apply_activation(z, "gelu")
            y += layer.shared_out.weight.double() @ h
        out[t] = y
    return out.view(x.shape).float()


SHAPES = [dict(), dict(top_k=1), dict(top_k=6), dict(shared=7), dict(gated=True), dict(gated=True, shared=3, bias=False),
          dict(coverage=0.5, top_k=4), dict(coverage=1.0, top_k=3, gated=True), dict(experts=1, top_k=1, width=9)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_kernel_path_matches_the_oracle(shape):
    layer = _layer(**shape)
    x = torch.randn(3, 7, HIDDEN)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _oracle(layer, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "default")
def test_training_path_equals_the_kernel_path(shape):
    layer = _layer(**shape)
    x = torch.randn(2, 9, HIDDEN)
    layer.train()
    with torch.enable_grad():
        trained = layer(x)
    assert layer.auxiliary_loss() is not None and layer.auxiliary_loss() is None  # read once
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained, layer(x), atol=1e-5, rtol=1e-5)


def test_training_reaches_only_the_chosen_experts_and_the_router_learns_by_regression():
    layer = _layer(experts=6, width=4, top_k=2).train()
    x = torch.randn(1, HIDDEN)
    y = layer(x)
    chosen = layer.routing_mask(x)[0].bool()
    (y.square().sum() + layer.auxiliary_loss()).backward()
    touched = layer.w_out.grad.view(6, 4, -1).abs().sum((1, 2)) > 0
    assert torch.equal(touched, chosen)
    assert layer.router.weight.grad.abs().sum() > 0  # from the regression loss alone (no gates)


@pytest.mark.parametrize("gated", [False, True])
def test_every_expert_running_is_the_dense_ffn(gated):
    """top_k = experts: the experts together are the dense FFN's neurons with their exact weights."""
    model = tiny("llama" if gated else "bert")
    dense = DenseFFN.from_view(view(model).blocks[0].ffn)
    x = torch.randn(300, HIDDEN)
    for params in (dict(experts=8, top_k=8), dict(experts=5, top_k=5, shared=10), dict(experts=4, top_k=4, grouping="contiguous")):
        layer = MoEVariant(**params).init_from_dense(dense, x, seed=0).eval()
        assert layer.gated == gated
        with torch.no_grad():
            torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_init_partitions_the_dense_neurons_and_fits_the_router():
    model = tiny("bert")
    dense = DenseFFN.from_view(view(model).blocks[1].ffn)
    x = torch.randn(2000, HIDDEN)
    layer = MoEVariant(experts=8, top_k=2, shared=4).init_from_dense(dense, x, seed=0)
    assert layer.expert_width == (WIDTH - 4) // 8 + (1 if (WIDTH - 4) % 8 else 0)
    rows = torch.cat([layer.w_in.detach(), layer.shared_in.weight.detach()])
    real = rows[rows.abs().sum(1) > 0]  # padding neurons are all zero
    assert len(real) == WIDTH
    assert torch.equal(torch.sort(real, dim=0).values, torch.sort(dense.w_in, dim=0).values)  # each neuron once
    with torch.no_grad():
        norms = layer.expert_norms(layer._neurons(x))
        fitted = ((layer.scores(x) - norms) ** 2).mean()
        constant = ((norms.mean(0) - norms) ** 2).mean()
    assert fitted < constant  # the router predicts the experts' output norms better than their means


def test_balanced_assignment_respects_capacity():
    sim = torch.randn(23, 5)
    assign = _balanced_assign(sim, 5)
    assert (assign >= 0).all() and torch.bincount(assign, minlength=5).max() <= 5


def test_an_expert_nobody_picks_and_every_token_on_one_expert():
    layer = _layer(experts=5, width=3, top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0]))
    x = torch.randn(40, HIDDEN)
    load = layer.expert_load(x)
    assert load.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _oracle(layer, x), atol=1e-4, rtol=1e-4)
    computed, positive = layer.neuron_counts(x)
    assert (computed == 3).all() and (positive <= 3).all()


def _tiny_moe_model(family, **params):
    model = tiny(family)
    x = torch.randn(500, HIDDEN)
    for ffn in view(model).ffns():
        dense = DenseFFN.from_view(ffn)
        ffn.replace(MoEVariant(**params).init_from_dense(dense, x, seed=0).eval())
    return model.eval()


@pytest.mark.parametrize("family, params, per_token", [
    ("bert", dict(experts=8, top_k=3), 3 * 8 * 2 * HIDDEN + 8 * HIDDEN),
    ("bert", dict(experts=4, top_k=1, shared=8), (14 * 2 + 8 * 2) * HIDDEN + 4 * HIDDEN),
    ("llama", dict(experts=8, top_k=2), 2 * 8 * 3 * HIDDEN + 8 * HIDDEN),
    ("gpt2", dict(experts=16, top_k=5), 5 * 4 * 2 * HIDDEN + 16 * HIDDEN),
])
def test_ffn_flops_are_the_router_plus_the_experts_run(family, params, per_token):
    """Multiply-accumulates per token (FLOPs / 2): the router (H x E) and W x H x (2, or 3 gated)
    per expert run, plus the shared neurons: the hand formula, from both counters."""
    model = _tiny_moe_model(family, **params)
    ids = torch.randint(3, 100, (2, 11))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    counted = count_flops(model, inputs)
    ffn = flops_by_component(view(model), counted.by_module)["ffn"]
    assert ffn == LAYERS * 2 * per_token * ids.numel()
    assert counted.unknown_ops == {}
    assert torch_flop_count(model, inputs) == pytest.approx(counted.total, rel=1e-6)


def test_dynamic_k_flops_follow_the_experts_each_token_ran():
    model = _tiny_moe_model("bert", experts=8, top_k=6, coverage=0.5)
    ids = torch.randint(3, 100, (1, 13))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ran = []
    handles = [m.register_forward_hook(lambda m, a, o: ran.append(int(m.routing_mask(a[0].reshape(-1, HIDDEN)).sum())))
               for m in model.modules() if isinstance(m, MoE)]
    counted = count_flops(model, inputs)
    for h in handles:
        h.remove()
    ffn = flops_by_component(view(model), counted.by_module)["ffn"]
    pairs = sum(ran[:LAYERS])
    assert pairs < LAYERS * 6 * 13  # fewer than top-k for some tokens
    assert ffn == 2 * (pairs * 8 * 2 * HIDDEN + LAYERS * 13 * 8 * HIDDEN)
    rows = active_neurons(view(model), inputs)
    assert all(r["computed_min"] >= 8 and r["computed_max"] <= 6 * 8 for r in rows)


def test_active_neurons_and_expert_load_come_from_the_routing():
    model = _tiny_moe_model("bert", experts=8, top_k=3)
    ids = torch.randint(3, 100, (1, 13))
    rows = active_neurons(view(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    for row in rows:
        assert row["computed"] == row["computed_min"] == row["computed_max"] == 3 * 8
        assert 0 <= row["positive_min"] <= row["positive_max"] <= 24
        assert len(row["expert_load"]) == 8 and sum(row["expert_load"]) == pytest.approx(3.0, abs=1e-3)
        assert row["load_max"] >= 1.0 and 0 <= row["experts_unused"] <= 5


VOCAB = 30522  # the embedded model's WordPiece tokenizer, saved with the tiny models below
TINY_BUDGET = dict(steps=12, tokens=512, batch_tokens=128, e2e_steps=3, e2e_batch=4, heldout_paragraphs=16,
                   show_progress=False)


def _save_tiny(family, path) -> str:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from ccli.hub import embedded_model_dir

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                             pad_token_id=0))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_embd=HIDDEN, n_inner=WIDTH, n_layer=LAYERS, n_head=4, vocab_size=VOCAB))
    model.eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(str(embedded_model_dir())).save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gated_and_conv1d_ffns_convert_save_and_reload_bit_identically(family, tmp_path):
    source = _save_tiny(family, tmp_path / f"tiny-{family}")
    out = tmp_path / "moe"
    record = convert(source, to="moe", params={"experts": 8, "top_k": 2, "shared": 8}, out=str(out), **TINY_BUDGET)
    assert [r["target"] for r in record["layers"]] == ["ffn"] * LAYERS
    assert all(0 <= layer["final_rel_error"] < 1 for layer in record["layers"])  # trained: see the minilm test
    manifest = json.loads((out / "ccli.json").read_text())
    assert {u["spec"]["gated"] for u in manifest["units"]} == {family == "llama"}
    model, tokenizer = ccli.load(str(out))
    again, _ = ccli.load(str(out))
    assert sum(isinstance(m, MoE) for m in model.modules()) == LAYERS
    enc = tokenizer(["Gated experts keep their gate, up and down rows."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, again(**enc).logits)


def test_moe_options_are_checked():
    with pytest.raises(CcliError, match=r"moe: --top-k 9 is more than the 8 experts"):
        MoEVariant(experts=8, top_k=9)
    with pytest.raises(CcliError, match=r"moe: --experts must be >= 1 \(got 0\)"):
        MoEVariant(experts=0)
    with pytest.raises(CcliError, match=r"moe: --coverage must be from 0.0 to 1.0 \(got 1.5\)"):
        MoEVariant(coverage=1.5)
    with pytest.raises(CcliError, match=r"moe: --grouping must be one of cluster, contiguous"):
        MoEVariant(grouping="random")
    dense = DenseFFN.from_view(view(tiny("bert")).blocks[0].ffn)
    with pytest.raises(CcliError, match="moe: the FFN has 64 neurons; with --shared 60 there are 4 left for 8 experts"):
        MoEVariant(experts=8, top_k=2, shared=60).check_dense(dense)
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--to", "moe", "--depth", "3"])
    assert result.exit_code == 2 and "--depth does not apply to moe" in result.stderr


# --- the default model, CI-sized ------------------------------------------------------------------------

BUDGET = dict(to="moe", params={"experts": 32, "top_k": 8}, tokens=2048, batch_tokens=512, heldout_paragraphs=48,
              show_progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "moe"
    init_only = convert("minilm", steps=0, **BUDGET)
    trained = convert("minilm", steps=40, e2e_steps=0, out=str(out), **BUDGET)
    return init_only, trained, out


@pytest.mark.slow
def test_minilm_conversion_beats_its_initialisation_and_reloads_identically(converted):
    init_only, trained, out = converted
    assert trained["fidelity"]["embedding_cosine"] > init_only["fidelity"]["embedding_cosine"]
    for layer in trained["layers"]:
        assert layer["final_rel_error"] < layer["init_rel_error"]
    router, experts = 384 * 32, 8 * 48 * 2 * 384
    assert trained["ffn_flops_reduction"] == pytest.approx(1536 * 2 * 384 / (router + experts), rel=0.01)
    manifest = json.loads((out / "ccli.json").read_text())
    assert [(u["key"], u["spec"]["variant"]) for u in manifest["units"]] == [(str(i), "moe") for i in range(6)]
    model, tokenizer = ccli.load(str(out))
    again, _ = ccli.load(str(out))
    enc = tokenizer(["Experts must reload to the same bits."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).last_hidden_state, again(**enc).last_hidden_state)


@pytest.mark.slow
def test_profile_and_layer_bench_know_moe(converted):
    _, _, out = converted
    runner = CliRunner()
    result = runner.invoke(app, ["profile", str(out), "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["flops_by_component"]["ffn"] == 6 * 2 * (384 * 32 + 8 * 48 * 2 * 384)
    assert record["active_neurons"][0]["computed"] == 8 * 48
    assert len(record["active_neurons"][0]["expert_load"]) == 32
    result = runner.invoke(app, ["bench", str(out), "--layer", "--tokens", "1,8", "--min-time", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["kernel"] == "dense" and any(r["kernel"].startswith("moe-") for r in rows)
    assert rows[1]["neurons_per_token"] == 8 * 48


def test_random_layer_bench():
    from ccli.api import bench_layer

    rows = bench_layer(to="moe", hidden=64, width=256, experts=16, top_k=4, tokens=[1, 9], min_run_time=0.05)
    kernels = {r["kernel"] for r in rows}
    assert "dense" in kernels and "moe-reference" in kernels
    assert {r["macs_per_token"] for r in rows if r["kernel"] != "dense"} == {2 * 64 * 64 + 64 * 16}
