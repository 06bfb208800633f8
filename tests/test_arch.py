import pytest
import torch

from ccli.arch import RemovedFFN, linear_weight, view
from ccli.errors import CcliError
from tiny import FAMILIES, HIDDEN, LAYERS, WIDTH, tiny


def _ids():
    return torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_view_finds_every_part(family):
    model = tiny(family)
    arch = view(model)
    assert arch.family == family
    assert len(arch.blocks) == LAYERS
    assert arch.hidden_size == HIDDEN
    for block in arch.blocks:
        assert block.ffn.width == WIDTH
        assert block.ffn.gated == (family == "llama")
        for path in block.ffn.paths + list(block.attention.linears) + [block.attention.path]:
            model.get_submodule(path)  # every path names a real module
        w = block.ffn.dense_weights()
        assert w["w_in"].shape == (WIDTH, HIDDEN) and w["w_out"].shape == (HIDDEN, WIDTH)
    assert arch.embeddings
    n_attention = 2 if family == "gpt2" else 4
    assert len(arch.linears("attention")) == LAYERS * n_attention
    assert len(arch.linears("ffn")) == LAYERS * (3 if family == "llama" else 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_forward_matches_the_models_own_ffn(family):
    """The view's FFN function reproduces what the model's FFN computes on its real input."""
    model = tiny(family)
    ffn = view(model).blocks[0].ffn
    seen = {}
    first, last = ffn.paths[0], ffn.paths[-1]
    def keep(key, pick):
        def hook(module, args, output):  # a hook must return None, or it replaces the output
            seen.setdefault(key, pick(args, output))
        return hook

    h1 = model.get_submodule(first).register_forward_hook(keep("x", lambda a, o: a[0]))
    h2 = model.get_submodule(last).register_forward_hook(keep("y", lambda a, o: o))
    with torch.no_grad():
        model(input_ids=_ids())
        expected = seen["y"]
        got = ffn.dense_forward(seen["x"])
    h1.remove(), h2.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_swaps_the_whole_ffn(family):
    model = tiny(family)
    with torch.no_grad():
        before = model(input_ids=_ids())[0]
    arch = view(model)
    for ffn in arch.ffns():
        ffn.replace(RemovedFFN())
    again = view(model)  # a fresh view sees the replacement
    assert all(isinstance(f.replaced, RemovedFFN) for f in again.ffns())
    assert again.linears("ffn") == {}
    with torch.no_grad():
        after = model(input_ids=_ids())[0]
    assert not torch.allclose(before, after)


def test_linear_weight_reads_conv1d_in_linear_layout():
    model = tiny("gpt2")
    conv = model.transformer.h[0].mlp.c_fc
    w, b = linear_weight(conv)
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(conv(x), torch.nn.functional.linear(x, w, b))


def test_unsupported_family_is_a_one_line_error():
    with pytest.raises(CcliError, match="unsupported model family 'opt': ccli supports .*bert.*llama"):
        view(tiny("opt"))


def test_unknown_targets():
    with pytest.raises(CcliError, match="unknown linear targets"):
        view(tiny("bert")).linears("everything")
