import pytest
import torch

from ccli.arch import view
from ccli.measure.neurons import active_neurons
from ccli.measure.timing import time_call
from tiny import HIDDEN, WIDTH, tiny


def test_positive_neurons_match_a_direct_count_and_skip_padding():
    model = tiny("bert")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # two padding tokens
    captured = {}
    act = model.encoder.layer[0].intermediate

    def hook(module, args, output):
        captured["h"] = output

    handle = act.register_forward_hook(hook)
    rows = active_neurons(view(model), {"input_ids": ids, "attention_mask": mask})
    handle.remove()
    positive = (captured["h"] > 0).sum(-1)[mask.bool()].float()
    assert rows[0]["computed"] == WIDTH
    assert abs(rows[0]["positive"] - positive.mean().item()) < 0.01
    assert rows[0]["positive_min"] == positive.min().item()
    assert rows[0]["positive_max"] == positive.max().item()


def test_timing_reports_ordered_statistics():
    a = torch.randn(64, 64)
    timing = time_call(lambda: a @ a, threads=1, warmup=1, min_run_time=0.05)
    assert timing.runs > 0
    assert 0 < timing.median_ms <= timing.p90_ms
    assert timing.iqr_ms >= 0 and timing.peak_mem_mb > 0


@pytest.mark.slow
def test_fidelity_is_perfect_for_the_original_and_sees_short_inputs():
    import copy

    from ccli.data import load_paragraphs
    from ccli.hub import load
    from ccli.measure.fidelity import compare

    loaded = load("minilm")
    paragraphs = load_paragraphs(None, "heldout")[:16]
    same = compare(loaded.model, loaded.model, loaded.tokenizer, paragraphs)
    for key in ("embedding_cosine", "embedding_cosine_min", "embedding_cosine_short", "hidden_cosine"):
        assert same[key] == pytest.approx(1.0, abs=1e-4), key
    assert same["retrieval_agreement"] == 1.0
    changed = copy.deepcopy(loaded.model)
    with torch.no_grad():
        changed.encoder.layer[2].output.dense.weight.mul_(0.5)
    other = compare(changed, loaded.model, loaded.tokenizer, paragraphs)
    assert other["embedding_cosine_short"] < 0.9999 and other["embedding_cosine"] < 0.9999


def test_ffn_fidelity_pools_errors_but_weighs_every_token_alike_in_the_cosine():
    from ccli.capture import collect_ffn_inputs
    from ccli.measure.fidelity import ffn_fidelity
    from ccli.variants.base import DenseFFN
    from ccli.variants.fff import FFFVariant

    teacher, student = tiny("bert"), tiny("bert")
    dense = {i: DenseFFN.from_view(b.ffn) for i, b in enumerate(view(teacher).blocks)}
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    # depth 0 with every neuron in the one leaf: an exact copy of the dense FFN
    halved, exact = (FFFVariant(trees=1, depth=0, leaf_width=WIDTH).init_from_dense(dense[i], torch.randn(32, HIDDEN), seed=0)
                     for i in (0, 1))
    with torch.no_grad():
        halved.linear_out.weight.mul_(0.5)
        halved.output_bias.mul_(0.5)
    arch = view(student)
    arch.blocks[0].ffn.replace(halved.eval())
    arch.blocks[1].ffn.replace(exact.eval())

    result = ffn_fidelity(student, teacher, batches)

    x = collect_ffn_inputs(student, arch, 0, batches, 10**6)
    assert x.shape[0] == int(mask.sum())  # padding is left out
    with torch.no_grad():
        y = dense[0](x)
    expected = (0.25 * y.pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    assert result["ffn_rel_error"][0] == pytest.approx(expected, rel=1e-3)
    assert result["ffn_token_cosine"][0] == pytest.approx(1.0, abs=1e-5)  # a scaled output points the same way
    assert result["ffn_rel_error"][1] == pytest.approx(0.0, abs=1e-5)
    assert result["ffn_token_cosine"][1] == pytest.approx(1.0, abs=1e-5)
