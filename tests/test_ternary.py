"""The ternary linear (ccli.variants.ternary) and the linear-unit path of the distillation engine, on
tiny models of every family: quantisation, straight-through training, finalising, the units each
`--targets` picks, additions counting, and save/reload to bit-identical outputs."""

import json

import pytest
import torch
from torch import nn

from ccli.arch import view
from ccli.checkpoint import load_converted, save_converted
from ccli.distill import DistillConfig, distill
from ccli.errors import CcliError
from ccli.kernels.ternary import _expand_scale, unpack_ternary
from ccli.variants.ternary import TernaryLinear, TernaryVariant, ternary_modules

from tiny import HIDDEN, LAYERS, WIDTH, tiny


def _dense(in_features=48, out_features=20, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_weights_are_ternary_times_absmean_scales(granularity):
    dense = _dense(50, 12)
    layer = TernaryLinear.from_dense(dense.weight, dense.bias, granularity, group_size=16)
    t = layer.ternary_weight()
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    w = dense.weight.detach()
    if granularity == "tensor":
        assert torch.allclose(layer.scale, w.abs().mean().expand_as(layer.scale))
    elif granularity == "channel":
        assert torch.allclose(layer.scale[:, 0], w.abs().mean(1))
    else:
        assert layer.scale.shape == (12, 4)  # ceil(50 / 16) groups, the last one short
        assert torch.allclose(layer.scale[:, 3], w[:, 48:].abs().mean(1))
    assert torch.equal(unpack_ternary(layer.packed, 50), t)


@pytest.mark.parametrize("act_bits", [8, 16])
def test_forward_is_ternary_weights_on_quantised_activations(act_bits):
    dense = _dense()
    layer = TernaryLinear.from_dense(dense.weight, dense.bias, act_bits=act_bits).eval()
    x = torch.randn(7, 48)
    w = layer.dense_weight()
    if act_bits == 8:
        scale = x.abs().amax(-1, keepdim=True) / 127
        expected = nn.functional.linear(torch.round(x / scale).clamp(-127, 127) * scale, w, dense.bias)
    else:
        expected = nn.functional.linear(x, w, dense.bias)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
        layer.train()  # the straight-through training path computes the same values
        with torch.enable_grad():
            assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)


def test_straight_through_gradients_reach_the_latent_weight_and_finalize_drops_it():
    dense = _dense()
    layer = TernaryLinear.from_dense(dense.weight, dense.bias).train()
    layer(torch.randn(5, 48)).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    before = layer.eval()(torch.ones(2, 48))
    layer.finalize()
    assert layer.weight is None and "weight" not in layer.state_dict()
    assert torch.equal(layer(torch.ones(2, 48)), before)


@pytest.mark.parametrize("granularity,act_bits,outliers", [("tensor", 8, 0), ("group", 16, 0), ("channel", 8, 2)])
def test_a_finalized_layer_passes_gradients_to_its_input_bias_and_outliers(granularity, act_bits, outliers):
    """The ccli::ternary_linear op's gradient: straight through the activation quantisation to x (as
    in training) and to the bias, with the packed weights constant. Without it an earlier recipe
    step's layers, or a saved model's, silently stop gradients that should pass through them."""
    dense = _dense(50, 12)
    with torch.no_grad():
        dense.weight[3, 7] = 40.0
    layer = TernaryLinear.from_dense(dense.weight, dense.bias, granularity, group_size=16, act_bits=act_bits,
                                     outliers=outliers)
    weight = layer.dense_weight()
    layer.finalize()
    layer.train()
    x = torch.randn(5, 50, requires_grad=True)
    grad = torch.randn(5, 12)
    layer(x).backward(grad)
    assert torch.allclose(x.grad, grad @ weight, atol=1e-5)
    assert torch.allclose(layer.bias.grad, grad.sum(0))
    if outliers:
        assert torch.allclose(layer.outlier_values.grad, (grad[:, 3] * x[:, 7]).sum().detach().unsqueeze(0))


@pytest.mark.parametrize("act_bits", [8, 16])
def test_outliers_keep_the_weights_ternarisation_clips_most_in_float(act_bits):
    dense = _dense()
    with torch.no_grad():
        dense.weight[3, 7] = 40.0  # a "massive activation" weight: far beyond its row's absmean
        dense.weight[11, 0] = -25.0
    layer = TernaryLinear.from_dense(dense.weight, dense.bias, "channel", act_bits=act_bits, outliers=5)
    assert layer.outliers == 2  # at most 5, and only these two are far beyond their row's scale
    assert sorted(zip(layer.outlier_rows.tolist(), layer.outlier_cols.tolist())) == [(3, 7), (11, 0)]
    assert layer.outlier_values.tolist() == [40.0, -25.0]
    t = layer.ternary_weight()
    assert t[3, 7] == 0 and t[11, 0] == 0  # the ternary matrix leaves them out, and its scale too
    assert torch.allclose(layer.scale[3, 0], dense.weight[3].detach().abs().sum() / 48 - 40.0 / 48)
    w = layer.dense_weight()
    assert w[3, 7] == 40.0 and w[11, 0] == -25.0
    x = torch.randn(7, 48)
    if act_bits == 8:
        scale = x.abs().amax(-1, keepdim=True) / 127
        xq = torch.round(x / scale).clamp(-127, 127) * scale
    else:
        xq = x
    ternary_part = w.clone()
    ternary_part[3, 7] = ternary_part[11, 0] = 0
    expected = nn.functional.linear(xq, ternary_part, dense.bias)  # the outliers see the float activations
    expected[:, 3] += 40.0 * x[:, 7]
    expected[:, 11] -= 25.0 * x[:, 0]
    with torch.no_grad():
        assert torch.allclose(layer.eval()(x), expected, atol=1e-4, rtol=1e-4)
    layer.train()
    out = layer(x)
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4)  # the straight-through path agrees
    out.pow(2).sum().backward()
    assert layer.outlier_values.grad.abs().min() > 0  # the outliers train
    assert layer.weight.grad[3, 7] == 0 and layer.weight.grad[11, 0] == 0  # their latent entries never move
    assert layer.weight_bytes == 20 * 12 + 20 * 4 + 2 * (8 + 8 + 4)


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_recentring_keeps_the_quantised_layer_and_moves_weights_off_thresholds(granularity):
    dense = _dense(50, 12)
    layer = TernaryLinear.from_dense(dense.weight, dense.bias, granularity, group_size=16)
    def column_scales():
        return _expand_scale(layer.scale, 50, layer.group_size)

    with torch.no_grad():  # park some latent weights near a rounding threshold, as training does
        layer.weight[:, ::3] = 0.4999 * column_scales()[:, ::3] * layer.weight[:, ::3].sign()
    layer._sync()
    packed, scale = layer.packed.clone(), layer.scale.clone()
    x = torch.randn(6, 50)
    before = layer.eval()(x)
    layer.recentre_latent()
    layer._sync()
    assert torch.equal(layer.packed, packed)
    torch.testing.assert_close(layer.scale, scale)
    torch.testing.assert_close(layer(x), before)
    # every latent weight is now at least half a scale away from the thresholds at +-s/2
    s = column_scales()
    distance = ((layer.weight.abs() - 0.5 * s).abs() / s).min()
    assert distance >= 0.5 - 1e-5


def test_packed_weights_are_sixteen_times_smaller_than_fp32():
    layer = TernaryLinear(768, 3072)
    assert 768 * 3072 * 4 / layer.weight_bytes > 15
    assert layer.adds_per_token == 768 * 3072


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
@pytest.mark.parametrize("targets", ["ffn", "attention", "all"])
def test_targets_pick_the_adapters_linears(family, targets):
    arch = view(tiny(family))
    units = TernaryVariant(targets=targets).units(arch, 0)
    attention = set(arch.blocks[0].attention.linears)
    paths = [u.key for u in units]
    if targets == "attention":
        assert set(paths) == attention
    elif targets == "ffn":
        assert paths and not set(paths) & attention
        assert len(paths) == (3 if family == "llama" else 2)
    else:
        assert set(paths) >= attention and len(paths) == len(attention) + (3 if family == "llama" else 2)


def _batches(vocab=100, n=4, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, vocab, (n, length), generator=g),
             "attention_mask": torch.ones(n, length, dtype=torch.long)} for _ in range(2)]


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_converted_tiny_model_saves_and_reloads_bit_identically(family, tmp_path):
    teacher = tiny(family)
    student = tiny(family)
    cfg = DistillConfig(steps=3, tokens=64, batch_tokens=32, e2e_steps=2, e2e_batch=2)
    for model in (teacher, student):  # one outlier weight in each of block 0's linears (spec: at most 2)
        for path in view(model).blocks[0].linears("all"):
            weight = model.get_submodule(path).weight.data.view(-1)
            weight[3] = 100 * weight.abs().mean()
    specs, report = distill(student, teacher, TernaryVariant(targets="all", scale="channel", outliers=2),
                            _batches(), cfg)
    assert len(report.layers) == len(specs) == LAYERS * len(view(teacher).blocks[0].linears("all"))
    modules = ternary_modules(student)
    assert len(modules) == len(specs) and all(m.weight is None for m in modules)  # finalised
    block0 = set(view(teacher).blocks[0].linears("all"))
    kept = {name: m.outliers for name, m in student.named_modules() if m in modules}
    assert kept == {name: int(name in block0) for name in kept}
    manifest = {"base_model": family, "base_source": "tiny", "family": family, "convert": [{"to": "ternary"}],
                "units": [{"key": key, "spec": spec} for key, spec in specs.items()]}
    save_converted(student, None, tmp_path / "out", manifest)
    again = load_converted(tmp_path / "out").model
    assert {name: m.outliers for name, m in again.named_modules() if isinstance(m, TernaryLinear)} == kept
    ids = _batches(seed=1)[0]
    with torch.inference_mode():
        a, b = student(**ids), again(**ids)
    key = "logits" if family != "bert" else "last_hidden_state"
    assert torch.equal(getattr(a, key), getattr(b, key))
    # a manifest of format 1 (ccli 0.2.0 and before: FFN specs under 'layers', linears under 'linears') still loads
    old = json.loads((tmp_path / "out" / "ccli.json").read_text())
    old.update(format=1, layers={}, linears=dict(specs))
    del old["units"]
    (tmp_path / "out" / "ccli.json").write_text(json.dumps(old))
    with torch.inference_mode():
        assert torch.equal(getattr(load_converted(tmp_path / "out").model(**ids), key), getattr(a, key))
    # the profile counts the ternary weight products as additions, by component
    from ccli.measure.components import additions_by_component

    adds = additions_by_component(view(again))
    assert adds["ffn"] == LAYERS * (3 if family == "llama" else 2) * HIDDEN * WIDTH
    assert adds["attention_proj"] > 0 and adds["other"] == 0


def test_ternary_ffn_linears_keep_the_ffn_dense_in_the_view():
    model = tiny("distilbert")
    arch = view(model)
    path = next(iter(arch.blocks[0].linears("ffn")))
    lin = model.get_submodule(path)
    model.set_submodule(path, TernaryLinear.from_dense(lin.weight, lin.bias))
    ffn = view(model).blocks[0].ffn
    assert ffn.replaced is None and ffn.converted and ffn.width == WIDTH
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        assert ffn.run(x).shape == (3, HIDDEN)


def test_bad_options_are_clear_errors():
    with pytest.raises(CcliError, match=r"ternary: --targets must be one of ffn, attention, all \(got 'heads'\)"):
        TernaryVariant(targets="heads")
    with pytest.raises(CcliError, match=r"ternary: --act-bits must be one of 8, 16 \(got 4\)"):
        TernaryVariant(act_bits=4)
    with pytest.raises(CcliError, match="ternary: --scale must be one of tensor, channel, group"):
        TernaryVariant(scale="row")
    with pytest.raises(CcliError, match=r"ternary: --group-size must be >= 1 \(got 0\)"):
        TernaryVariant(group_size=0)
    with pytest.raises(CcliError, match=r"ternary: --outliers must be >= 0 \(got -1\)"):
        TernaryVariant(outliers=-1)
    with pytest.raises(CcliError, match=r"ternary: --outliers must be an integer \(got True\)"):
        TernaryVariant(outliers=True)


def test_end_to_end_training_that_makes_things_worse_is_undone():
    teacher, student = tiny("bert"), tiny("bert")
    base = DistillConfig(steps=3, tokens=64, batch_tokens=32, e2e_batch=2)
    layerwise = tiny("bert")
    distill(layerwise, teacher, TernaryVariant(targets="ffn"), _batches(), base)
    cfg = DistillConfig(**{**base.__dict__, "e2e_steps": 3, "e2e_lr": 0.9})  # absurd: ruins the weights
    _, report = distill(student, teacher, TernaryVariant(targets="ffn"), _batches(), cfg)
    assert report.e2e_kept is False
    for a, b in zip(ternary_modules(student), ternary_modules(layerwise)):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale)
