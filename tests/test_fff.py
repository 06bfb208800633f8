"""The FFF module: routing, the training path against the kernel path, UltraFastBERT import,
initialisation from a dense FFN, and FLOPs counted from what the routes visit."""

import pytest
import torch
from torch import nn

from ccli.measure.components import flops_by_component
from ccli.arch import view
from ccli.measure.flops import count_flops, torch_flop_count
from ccli.measure.neurons import active_neurons
from ccli.variants.base import DenseFFN
from ccli.variants.fff import FFF, FFFVariant
from tiny import HIDDEN, LAYERS, WIDTH, tiny

# (trees, depth, leaf width, linear neurons per leaf); leaves of 8+ neurons train leaf by leaf
SHAPES = [(1, 0, 4, 0), (1, 3, 1, 0), (2, 2, 3, 0), (3, 1, 5, 0), (1, 5, 2, 0), (2, 3, 9, 0), (1, 0, 8, 0),
          (2, 2, 3, 1), (1, 1, 1, 1), (2, 3, 9, 4), (1, 2, 12, 12)]


# gated trees (LLaMA-family neurons act(gate) * up): (trees, depth, leaf width); no linear leaf neurons
GATED_SHAPES = [(1, 0, 4), (1, 3, 1), (2, 2, 3), (2, 3, 9), (1, 2, 12)]


def _layer(trees, depth, leaf_width, hidden=HIDDEN, seed=0, leaf_linear=0, gated=False):
    torch.manual_seed(seed)
    layer = FFF(hidden, trees, depth, leaf_width, activation="silu" if gated else "gelu", leaf_linear=leaf_linear,
                gated=gated)
    nn.init.normal_(layer.output_bias)
    return layer


@pytest.mark.parametrize("trees, depth, leaf_width, leaf_linear", SHAPES)
def test_each_token_visits_one_path_per_tree(trees, depth, leaf_width, leaf_linear):
    layer = _layer(trees, depth, leaf_width, leaf_linear=leaf_linear)
    x = torch.randn(50, HIDDEN)
    computed, positive = layer.neuron_counts(x)
    assert (computed == trees * (depth + leaf_width)).all()
    assert (positive <= computed).all()


@pytest.mark.parametrize("trees, depth, leaf_width, leaf_linear, gated",
                         [(*shape, False) for shape in SHAPES] + [(*shape, 0, True) for shape in GATED_SHAPES])
def test_training_path_equals_the_kernel_path(trees, depth, leaf_width, leaf_linear, gated):
    layer = _layer(trees, depth, leaf_width, leaf_linear=leaf_linear, gated=gated)
    x = torch.randn(2, 9, HIDDEN)
    layer.train()
    with torch.enable_grad():
        trained = layer(x)
    layer.eval()
    with torch.no_grad():
        inferred = layer(x)
    torch.testing.assert_close(trained, inferred, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("trees, depth, leaf_width, leaf_linear, gated",
                         [(1, 0, 4, 0, False), (1, 3, 1, 0, False), (2, 2, 3, 0, False), (3, 4, 6, 0, False),
                          (1, 6, 2, 0, False), (2, 3, 6, 2, False), (1, 2, 3, 3, False), (2, 3, 6, 0, True),
                          (1, 0, 4, 0, True)])
def test_leaf_by_leaf_training_computes_the_masked_function_and_gradients(trees, depth, leaf_width, leaf_linear, gated):
    """The two training computations (wide leaves: per leaf; narrow: masked dense) agree in outputs
    and in every parameter's and the input's gradient, including leaves that no token reaches."""
    layer = _layer(trees, depth, leaf_width, leaf_linear=leaf_linear, gated=gated).train()
    results = []
    for compute in (layer._masked_training_output, layer._leaf_by_leaf_training_output):
        layer.zero_grad()
        x = torch.randn(37, HIDDEN, generator=torch.Generator().manual_seed(3), requires_grad=True)
        weights = torch.randn(37, HIDDEN, generator=torch.Generator().manual_seed(4))
        y = compute(x)
        (y * weights).sum().backward()
        results.append((y.detach(), x.grad,  # every weight but the output bias, which these computations leave out
                        *(p.grad.clone() for name, p in layer.named_parameters() if name != "output_bias")))
    for masked, leaf_by_leaf in zip(*results):
        torch.testing.assert_close(leaf_by_leaf, masked, atol=1e-5, rtol=1e-5)


def test_inference_follows_every_change_of_the_weights():
    """The kernel's copy of the weights (cached between calls) follows in-place edits, reloads,
    replaced parameters and dtype conversions."""
    layer = _layer(2, 2, 3).eval()
    x = torch.randn(7, HIDDEN)

    def expected():
        with torch.no_grad():
            return nn.functional.linear(layer.routed_activations(x), layer.linear_out.weight) + layer.output_bias

    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected())
        layer.linear_out.weight.mul_(2)
        layer.output_bias.add_(1)
        torch.testing.assert_close(layer(x), expected())
        state = {k: v + 0.5 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x), expected())
        layer.linear_out.weight = nn.Parameter(torch.randn_like(layer.linear_out.weight))
        torch.testing.assert_close(layer(x), expected())
        layer.double()
        x = x.double()  # expected() reads x when called
        assert layer(x).dtype == torch.float64
        torch.testing.assert_close(layer(x), expected())


def test_a_layer_built_under_inference_mode_runs():
    with torch.inference_mode():  # its parameters are inference tensors, without version counters
        layer = _layer(1, 2, 3).eval()
        x = torch.randn(4, HIDDEN)
        expected = nn.functional.linear(layer.routed_activations(x), layer.linear_out.weight) + layer.output_bias
        torch.testing.assert_close(layer(x), expected)


def test_training_path_only_trains_visited_neurons():
    """One token through one tree of depth 3 with leaves of 2: gradients reach exactly the 3 + 2
    neurons of its path (input rows, biases and output columns), and nothing else."""
    layer = _layer(1, 3, 2)
    x = torch.randn(1, HIDDEN)
    layer.train()
    layer(x).sum().backward()
    with torch.no_grad():
        visited = layer.route_mask(layer.linear_in(x))[0].bool()
    assert visited.sum().item() == 3 + 2
    assert torch.equal(layer.linear_in.weight.grad.abs().sum(1) > 0, visited)
    assert torch.equal(layer.linear_in.bias.grad != 0, visited)
    assert torch.equal(layer.linear_out.weight.grad.abs().sum(0) > 0, visited)


def test_ultrafastbert_layer_imports_unchanged():
    """UltraFastBERT's layout: linear_in (K*(2^(D+1)-1), H) + bias, linear_out (H, K*(2^(D+1)-1))."""
    trees, depth, hidden = 2, 4, 16
    nodes = 2 ** (depth + 1) - 1
    w_in, b_in, w_out = torch.randn(trees * nodes, hidden), torch.randn(trees * nodes), torch.randn(hidden, trees * nodes)
    layer = FFF.from_ultrafastbert(w_in, b_in, w_out, trees=trees, depth=depth).eval()
    x = torch.randn(7, hidden)
    expected = torch.zeros(7, hidden)
    for t in range(7):  # UltraFastBERT's forward, written out per token
        for k in range(trees):
            node = 0
            for _ in range(depth + 1):
                row = k * nodes + node
                z = x[t] @ w_in[row] + b_in[row]
                expected[t] += nn.functional.gelu(z) * w_out[:, row]
                node = 2 * node + 1 + int(z >= 0)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)


def _dense(hidden=HIDDEN, width=WIDTH):
    torch.manual_seed(1)
    return DenseFFN(torch.randn(width, hidden) / hidden**0.5, torch.randn(width) * 0.1,
                    torch.randn(hidden, width) / width**0.5, torch.randn(hidden) * 0.1, "gelu")


def _gated_dense(hidden=HIDDEN, width=WIDTH):
    torch.manual_seed(1)
    return DenseFFN(torch.randn(width, hidden) / hidden**0.5, None, torch.randn(hidden, width) / width**0.5, None, "silu",
                    w_gate=torch.randn(width, hidden) / hidden**0.5)


@pytest.mark.parametrize("gated", [False, True])
def test_one_leaf_holding_every_neuron_is_the_dense_ffn(gated):
    dense = _gated_dense() if gated else _dense()
    x = torch.randn(64, HIDDEN)
    layer = FFFVariant(trees=1, depth=0, leaf_width=WIDTH).init_from_dense(dense, x, seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)


def test_init_keeps_dense_neurons_in_the_leaves():
    dense = _dense()
    x = torch.randn(256, HIDDEN)
    layer = FFFVariant(trees=2, depth=2, leaf_width=8).init_from_dense(dense, x, seed=0)
    per_tree, internal = layer.per_tree, 3
    leaf_rows = torch.cat([layer.linear_in.weight[k * per_tree + internal : (k + 1) * per_tree] for k in range(2)])
    # every leaf neuron is an exact copy of a dense neuron, and trees share none
    matches = (leaf_rows[:, None, :] == dense.w_in[None]).all(-1)
    assert matches.any(1).all()
    used = matches.float().argmax(1)
    assert len(set(used[:32].tolist()) & set(used[32:].tolist())) == 0


def test_linear_leaf_neurons_are_fitted_to_what_the_leaf_misses():
    """With leaf_linear R, each leaf keeps W - R exact dense neurons and its R linear neurons are
    fitted to the rest: the layer is closer to the dense FFN, on unseen tokens, than the same layer
    with those neurons silent, and closer than spending the R neurons on more dense ones."""
    dense = _dense()
    x, unseen = torch.randn(4096, HIDDEN), torch.randn(512, HIDDEN)
    layer = FFFVariant(trees=1, depth=1, leaf_width=20, leaf_linear=6).init_from_dense(dense, x, seed=0).eval()
    gated = torch.cat([layer.linear_in.weight[1 + j * 20 : 1 + j * 20 + 14] for j in range(2)])
    assert (gated[:, None, :] == dense.w_in[None]).all(-1).any(1).all()
    wider = FFFVariant(trees=1, depth=1, leaf_width=20).init_from_dense(dense, x, seed=0).eval()
    silent = FFF(HIDDEN, 1, 1, 20, leaf_linear=6).eval()
    silent.load_state_dict(layer.state_dict())
    with torch.no_grad():
        for j in range(2):
            silent.linear_out.weight[:, 1 + j * 20 + 14 : 1 + (j + 1) * 20] = 0
        errors = [((f(unseen) - dense(unseen)).pow(2).sum() / dense(unseen).pow(2).sum()).item() for f in (layer, silent, wider)]
    assert errors[0] < errors[1] and errors[0] < errors[2]


def test_gated_leaves_keep_the_dense_gate_up_and_down_rows():
    dense = _gated_dense()
    x = torch.randn(256, HIDDEN)
    layer = FFFVariant(trees=2, depth=2, leaf_width=8).init_from_dense(dense, x, seed=0)
    assert layer.gated and layer.output_bias is not None and not layer.output_bias.any()
    per_tree = layer.per_tree
    for k in range(2):
        rows = slice(k * per_tree + 3, (k + 1) * per_tree)  # the leaves of tree k
        gate = (layer.linear_in.weight[rows][:, None] == dense.w_gate[None]).all(-1)
        neuron = gate.float().argmax(1)
        assert gate.any(1).all() and not layer.linear_in.bias[rows].any()
        assert torch.equal(layer.linear_up.weight[rows], dense.w_in[neuron])
        assert torch.equal(layer.linear_out.weight[:, rows], dense.w_out[:, neuron])
        nodes = slice(k * per_tree, k * per_tree + 3)  # silent at first, with up rows that let them learn
        assert not layer.linear_out.weight[:, nodes].any() and layer.linear_up.weight[nodes].norm(dim=1).min() > 0


def test_gated_ffn_flops_count_gate_up_and_down_rows_of_the_visited_neurons():
    model = tiny("llama")
    for ffn in view(model).ffns():
        ffn.replace(_layer(2, 2, 3, gated=True))
    model.eval()
    ids = torch.randint(3, 100, (1, 9))
    counted = count_flops(model, {"input_ids": ids})
    per_token_ffn = flops_by_component(view(model), counted.by_module)["ffn"] / ids.numel()
    assert per_token_ffn == LAYERS * 2 * (3 * HIDDEN) * 2 * (2 + 3)
    assert counted.unknown_ops == {}


def test_fitted_routers_beat_random_routing():
    """Routing by the fitted routers captures more of each token's activation mass than chance."""
    dense = _dense()
    x = torch.randn(2048, HIDDEN)
    fitted = FFFVariant(trees=1, depth=3, leaf_width=8).init_from_dense(dense, x, seed=0).eval()
    shuffled = FFFVariant(trees=1, depth=3, leaf_width=8).init_from_dense(dense, x, seed=0).eval()
    with torch.no_grad():
        shuffled.linear_in.weight[:7] = torch.randn(7, HIDDEN)
        err = lambda layer: ((layer(x) - dense(x)).pow(2).sum() / dense(x).pow(2).sum()).item()  # noqa: E731
        assert err(fitted) < err(shuffled)


def _tiny_fff_model(trees, depth, leaf_width, leaf_linear=0):
    model = tiny("bert")
    for ffn in view(model).ffns():
        ffn.replace(_layer(trees, depth, leaf_width, leaf_linear=leaf_linear))
    return model.eval()


@pytest.mark.parametrize("trees, depth, leaf_width, leaf_linear", [(1, 3, 1, 0), (2, 2, 4, 0), (2, 2, 4, 3)])
def test_ffn_flops_count_only_visited_nodes(trees, depth, leaf_width, leaf_linear):
    model = _tiny_fff_model(trees, depth, leaf_width, leaf_linear)
    ids = torch.randint(3, 100, (2, 11))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    counted = count_flops(model, inputs)
    per_token_ffn = flops_by_component(view(model), counted.by_module)["ffn"] / ids.numel()
    assert per_token_ffn == LAYERS * 2 * (2 * HIDDEN) * trees * (depth + leaf_width)  # 2 FLOPs per MAC
    assert counted.unknown_ops == {}
    assert torch_flop_count(model, inputs) == pytest.approx(counted.total, rel=1e-6)


def test_active_neurons_come_from_the_routing():
    model = _tiny_fff_model(2, 3, 2)
    ids = torch.randint(3, 100, (1, 13))
    rows = active_neurons(view(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    for row in rows:
        assert row["computed"] == row["computed_min"] == row["computed_max"] == 2 * (3 + 2)
        assert 0 <= row["positive_min"] <= row["positive"] <= row["positive_max"] <= 10


def test_bad_shapes_are_clear_errors():
    from ccli.errors import CcliError

    with pytest.raises(CcliError, match=r"fff: --depth must be from 0 to 20 \(got -1\)"):
        FFFVariant(depth=-1)
    with pytest.raises(CcliError, match=r"fff: --leaf-width must be >= 1 \(got 0\)"):
        FFFVariant(leaf_width=0)
    with pytest.raises(CcliError, match=r"fff: --depth must be from 0 to 20 \(got 25\)"):
        FFFVariant(depth=25)
    with pytest.raises(CcliError, match="leaf-linear 5 is more than the leaf width 4"):
        FFFVariant(leaf_width=4, leaf_linear=5)
    with pytest.raises(CcliError, match=r"fff: --leaf-linear must be >= 0 \(got -1\)"):
        FFFVariant(leaf_linear=-1)
    with pytest.raises(CcliError, match=r"fff: --trees must be an integer \(got 1.5\)"):
        FFFVariant(trees=1.5)
