"""FLOPs from the executed graph against hand formulas and PyTorch's FlopCounterMode."""

import pytest
import torch

from ccli.api import profile
from ccli.measure.components import flops_by_component
from ccli.arch import view
from ccli.hub import load
from ccli.inputs import build_inputs
from ccli.measure.flops import count_flops, torch_flop_count
from tiny import FAMILIES, HIDDEN, LAYERS, WIDTH, tiny


def bert_hand_flops_per_token(layers, hidden, inter, seq, pooler=True):
    """layers x (4H^2 projections + 2SH scores/context + 2HI FFN) MACs, plus the pooler (H^2 per
    sequence), x2 for FLOPs. Elementwise ops and norms are not counted (see ccli.measure.flops)."""
    macs = layers * (4 * hidden**2 + 2 * seq * hidden + 2 * hidden * inter)
    if pooler:
        macs += hidden**2 / seq
    return 2 * macs


@pytest.mark.slow
def test_default_model_flops_equal_the_hand_formula(minilm):
    record = profile(minilm, seq=128)[0]
    hand = bert_hand_flops_per_token(6, 384, 1536, 128)
    assert record["flops_per_token"] == pytest.approx(hand, rel=0.01)
    assert record["flops_per_token"] == pytest.approx(hand, abs=1)  # in fact exact
    parts = record["flops_by_component"]
    assert parts["ffn"] == 6 * 2 * 2 * 384 * 1536
    assert parts["attention_proj"] == 6 * 2 * 4 * 384**2
    assert parts["attention_scores"] == 6 * 2 * 2 * 128 * 384
    assert sum(parts.values()) == record["flops_per_token"]
    assert record["unknown_ops"] == {}


@pytest.mark.slow
def test_default_model_agrees_with_flop_counter_mode_under_eager_attention():
    eager = load("minilm", attn_implementation="eager")
    inputs = build_inputs(eager, seq=64)
    fvcore_total = count_flops(eager.model, inputs).total
    assert torch_flop_count(eager.model, inputs) == pytest.approx(fvcore_total, rel=0.01)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_family_agrees_with_flop_counter_mode(family, attn):
    model = tiny(family, attn)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    flops = count_flops(model, inputs)
    assert flops.unknown_ops == {}
    assert torch_flop_count(model, inputs) == pytest.approx(flops.total, rel=0.01)
    parts = flops_by_component(view(model), flops.by_module)
    gated = family == "llama"
    assert parts["ffn"] == 2 * ids.numel() * HIDDEN * WIDTH * (3 if gated else 2) * LAYERS
    assert sum(parts.values()) == flops.total


def test_random_init_bert_base_matches_the_hand_formula():
    loaded = load("bert-base", random_init=True)
    record = profile(loaded, seq=32, cross_check=False)[0]
    assert record["flops_per_token"] == pytest.approx(bert_hand_flops_per_token(12, 768, 3072, 32), abs=1)
    assert record["params"]["total"] == pytest.approx(109_482_240, rel=1e-6)  # bert-base-uncased
    assert "do not depend on weight values" in record["note"]


def test_removed_ffn_costs_nothing():
    from ccli.baselines import ffn_removed

    model = ffn_removed(tiny("bert"))
    ids = torch.randint(3, 100, (1, 5))
    flops = count_flops(model, {"input_ids": ids})
    assert flops_by_component(view(model), flops.by_module)["ffn"] == 0
