"""Mixture-of-Depths after training (ccli.variants.mod): the routed block against hand-written
references, its FLOPs against the hand formula, convert -> save -> reload bit-identical, profile's
routing record, the config's one-line errors, and a CI-sized conversion of the default model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel

import ccli
from ccli import report
from ccli.api import profile
from ccli.arch import view
from ccli.capture import collect_block_calls
from ccli.conversion import convert
from ccli.errors import CcliError
from ccli.hub import embedded_model_dir
from ccli.measure.flops import count_flops
from ccli.variants.mod import MoDBlock, MoDVariant, real_tokens
from tests.tiny import tiny

HIDDEN, WIDTH, HEADS = 32, 64, 4
BUDGET = dict(steps=8, tokens=512, batch_tokens=128, e2e_batch=4, heldout_paragraphs=16, show_progress=False)


def _padded_call(model, block: int, lengths=(9, 5, 1), seed=0):
    """One captured call of `block` (hidden states, real mask, the kwargs the model passes) on a
    padded batch of random ids with the given real lengths."""
    g = torch.Generator().manual_seed(seed)
    seq = max(lengths)
    ids = torch.randint(1, 100, (len(lengths), seq), generator=g)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    path = view(model).blocks[block].path
    (call,) = collect_block_calls(model, path, [{"input_ids": ids, "attention_mask": mask}], 1).data
    return call


def _routed(block, capacity, attention="routed", seed=1) -> MoDBlock:
    module = MoDVariant.wrap(copy.deepcopy(block), {"capacity": capacity, "attention": attention})
    torch.manual_seed(seed)
    with torch.no_grad():
        module.router.weight.normal_(0, 1.0)
        module.router.bias.normal_(0, 1.0)
    return module.eval()


@pytest.mark.parametrize("family,attention", [("bert", "routed"), ("bert", "all"), ("roberta", "all"),
                                              ("distilbert", "routed")])
def test_capacity_one_is_the_block_with_its_update_scaled_by_the_router(family, attention):
    model = tiny(family)
    block = view(model).blocks[1].module
    call = _padded_call(model, 1)
    module = _routed(block, 1.0, attention)
    with torch.no_grad():
        got = module(call.hidden, **call.kwargs)
        dense = block(call.hidden, **call.kwargs)
        g = 2 * torch.sigmoid(call.hidden @ module.router.weight[0] + module.router.bias)
        expected = call.hidden + g[..., None] * (dense - call.hidden)
    torch.testing.assert_close(got[call.real], expected[call.real], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a router scoring 0 scales by exactly 1: the original block
        module.router.weight.zero_()
        module.router.bias.zero_()
        torch.testing.assert_close(module(call.hidden, **call.kwargs)[call.real], dense[call.real], rtol=1e-5, atol=1e-6)


def _masked_reference(block, module: MoDBlock, call, capacity: float, attention: str) -> torch.Tensor:
    """The routed block computed densely: every token through the block (attention restricted to the
    routed keys by a mask, or over every real key), then skipped tokens reset to their input.
    Selection by a per-sequence loop."""
    hidden = call.hidden
    batch, seq, _ = hidden.shape
    scores = hidden @ module.router.weight[0] + module.router.bias
    chosen = torch.zeros(batch, seq, dtype=torch.bool)
    for b in range(batch):
        real = call.real[b].nonzero().flatten().tolist()
        k = min(len(real), max(1, math.ceil(capacity * len(real))))
        ranked = sorted(real, key=lambda i: -float(scores[b, i]))
        chosen[b, ranked[:k]] = True
    mask = (chosen if attention == "routed" else call.real)[:, None, None, :].expand(batch, 1, seq, seq)
    kwargs = dict(call.kwargs)
    old = kwargs.get("attention_mask")
    kwargs["attention_mask"] = mask if old is None or old.dtype == torch.bool else \
        torch.zeros((), dtype=old.dtype).masked_fill(~mask, torch.finfo(old.dtype).min)
    out = block(hidden, **kwargs)
    g = 2 * torch.sigmoid(scores)
    return torch.where(chosen[..., None], hidden + g[..., None] * (out - hidden), hidden)


@pytest.mark.parametrize("attention", ["routed", "all"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("capacity", [0.75, 0.5, 0.25, 0.125])
def test_gather_scatter_equals_a_masked_reference_with_padding(attn, capacity, attention):
    model = tiny("bert", attn=attn)
    block = view(model).blocks[1].module
    call = _padded_call(model, 1, lengths=(12, 7, 3, 1), seed=int(capacity * 8))
    module = _routed(block, capacity, attention)
    with torch.no_grad():
        got = module(call.hidden, **call.kwargs)
        expected = _masked_reference(block, module, call, capacity, attention)
    torch.testing.assert_close(got[call.real], expected[call.real], rtol=1e-5, atol=1e-5)
    assert module.routing() == {"capacity": capacity, "real_tokens": 23,
                                "tokens": sum(max(1, math.ceil(capacity * n)) for n in (12, 7, 3, 1))}
    # padding never counts and never changes: the padded positions leave as they came
    assert torch.equal(got[~call.real], call.hidden[~call.real])


def test_real_tokens_reads_bool_float_2d_and_missing_masks():
    pad = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    four_d = pad[:, None, None, :].expand(2, 1, 4, 4)
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~four_d, torch.finfo(torch.float32).min)
    assert torch.equal(real_tokens(four_d, 2, 4, None), pad)
    assert torch.equal(real_tokens(additive, 2, 4, None), pad)
    assert torch.equal(real_tokens(pad.long(), 2, 4, None), pad)
    assert real_tokens(None, 2, 4, None).all()


@pytest.mark.parametrize("attention", ["routed", "all"])
@pytest.mark.parametrize("capacity", [1.0, 0.5, 0.125])
def test_the_flop_counter_sees_only_the_routed_tokens(capacity, attention):
    model = BertModel(BertConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2,
                                 num_attention_heads=HEADS, vocab_size=100)).eval()
    seq = 24
    inputs = {"input_ids": torch.randint(1, 100, (1, seq)), "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    dense = count_flops(model, inputs).by_module
    arch = view(model)
    arch.blocks[1].replace(MoDVariant.wrap(arch.blocks[1].module, {"capacity": capacity, "attention": attention}))
    counted = count_flops(model, inputs).by_module
    k = math.ceil(capacity * seq)
    h, i = HIDDEN, WIDTH
    if attention == "routed":
        # router (H -> 1 on every token) + q, k, v, out and both FFN linears on the routed tokens +
        # attention scores and context among the routed tokens (k x k per head)
        expected = 2 * seq * h + 2 * k * (4 * h * h + 2 * h * i) + 2 * 2 * k * k * h
    else:
        # router + k, v on every token + q, out and the FFN on the routed tokens + k x seq scores and context
        expected = 2 * seq * h + 2 * seq * 2 * h * h + 2 * k * (2 * h * h + 2 * h * i) + 2 * 2 * k * seq * h
    assert counted["encoder.layer.1"] == expected
    assert counted["encoder.layer.0"] == dense["encoder.layer.0"]
    assert dense["encoder.layer.1"] == 2 * seq * (4 * h * h + 2 * h * i) + 2 * 2 * seq * seq * h


def test_config_errors_are_one_line():
    with pytest.raises(CcliError, match=r"mod: --capacity must be above 0"):
        MoDVariant(capacity=0.0)
    with pytest.raises(CcliError, match=r"mod: --capacity must be from 0.0 to 1.0 \(got 1.5\)"):
        MoDVariant(capacity=1.5)
    with pytest.raises(CcliError, match=r"mod: --blocks must be one of alternate, all-but-first, all or block indices"):
        MoDVariant(blocks="odd")
    with pytest.raises(CcliError, match=r"mod: --blocks names a block twice"):
        MoDVariant(blocks="1,1")
    with pytest.raises(CcliError, match=r"mod: --blocks 7 is out of range: the model has blocks 0-5"):
        MoDVariant(blocks="1,7").layers(6)
    assert MoDVariant().layers(6) == [1, 3, 5]
    assert MoDVariant(blocks="all-but-first").layers(3) == [1, 2]
    assert MoDVariant(blocks="3, 1").layers(6) == [1, 3]


def test_all_keys_attention_needs_a_bert_style_block():
    with pytest.raises(CcliError, match="mod: --attention all needs a BERT or RoBERTa block"):
        MoDVariant.wrap(view(tiny("distilbert")).blocks[1].module, {"capacity": 0.5, "attention": "all"})
    with pytest.raises(CcliError, match="mod: --attention must be one of routed, all"):
        MoDVariant(attention="keys")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoders_are_refused_in_one_line(family):
    with pytest.raises(CcliError, match=f"mod: {family} is a decoder and mod routes encoders only for now"):
        MoDVariant().units(view(tiny(family)), 1)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=4, num_attention_heads=HEADS,
                     vocab_size=30522)
    path = tmp_path_factory.mktemp("bert") / "tiny-bert"
    BertModel(cfg).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(str(embedded_model_dir())).save_pretrained(path)
    return str(path)


def test_convert_saves_reloads_bit_identically_and_profile_shows_the_routing(tiny_bert, tmp_path):
    out = tmp_path / "mod"
    record = convert(tiny_bert, to="mod", params={"capacity": 0.5}, e2e_steps=2, out=str(out), **BUDGET)
    assert [(r["layer"], r["target"]) for r in record["layers"]] == [(1, "block"), (3, "block")]  # alternate blocks
    manifest = json.loads((out / "ccli.json").read_text())
    assert [u["key"] for u in manifest["units"]] == ["1", "3"]
    assert manifest["units"][0]["spec"] == {"variant": "mod", "capacity": 0.5, "blocks": "alternate", "attention": "routed",
                                             "train": "block"}

    model, tokenizer = ccli.load(str(out))
    again, _ = ccli.load(str(out))
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    assert any(name.endswith("layer.1.router.weight") for name in saved)
    arch = view(model)
    assert [isinstance(b.module, MoDBlock) for b in arch.blocks] == [False, True, False, True]
    assert arch.blocks[1].attention.path == "encoder.layer.1.attention"  # parts keep their paths
    enc = tokenizer(["Only some tokens go through the routed blocks.", "Padding never counts."],
                    padding=True, return_tensors="pt")
    with torch.inference_mode():
        first, second = model(**enc, output_hidden_states=True), again(**enc, output_hidden_states=True)
    assert torch.equal(first.last_hidden_state, second.last_hidden_state)
    assert torch.equal(first.hidden_states[-1], first.last_hidden_state)
    # block 1 changes ceil(capacity x real tokens) of each sequence; the others ride the residual
    unchanged = (first.hidden_states[2] == first.hidden_states[1]).all(dim=-1) & enc["attention_mask"].bool()
    n_real = enc["attention_mask"].sum(dim=1)
    assert unchanged.sum(dim=1).tolist() == (n_real - torch.ceil(n_real * 0.5).long()).tolist()

    (row,) = profile(str(out), seq=16, cross_check=False)
    assert row["routed_blocks"] == [{"block": 1, "capacity": 0.5, "tokens": 8, "real_tokens": 16},
                                    {"block": 3, "capacity": 0.5, "tokens": 8, "real_tokens": 16}]
    routed_table = report.profile_tables([row])[-1]
    assert routed_table.title.startswith("routed blocks (mod)")
    assert list(routed_table.columns[3].cells) == ["8 / 16 (50.0%)", "8 / 16 (50.0%)"]
    (dense_row,) = profile(tiny_bert, seq=16, cross_check=False)
    assert len(report.profile_tables([dense_row])) == 2  # no routing table without routed blocks
    assert dense_row["routed_blocks"] == []
    assert row["flops_per_token"] < dense_row["flops_per_token"]


def test_a_ci_sized_conversion_of_the_default_model_beats_its_own_undistilled_routers():
    """Routers as initialised from the blocks' update norms (no training) against the same conversion
    trained end to end: the trained one is closer to the original on held-out text."""
    settings = dict(to="mod", params={"capacity": 0.5, "blocks": "1,2", "attention": "all"}, tokens=1024,
                    max_length=64, e2e_batch=8, e2e_target="all", e2e_lr=1e-4, heldout_paragraphs=48,
                    show_progress=False)
    untrained = convert("minilm", steps=0, e2e_steps=0, **settings)
    trained = convert("minilm", steps=0, e2e_steps=E2E_STEPS, **settings)
    assert trained["e2e_kept"] is True
    assert trained["e2e_loss_last"] < trained["e2e_loss_first"]
    assert trained["fidelity"]["embedding_cosine"] > untrained["fidelity"]["embedding_cosine"]
    assert trained["fidelity"]["hidden_cosine"] > untrained["fidelity"]["hidden_cosine"]


E2E_STEPS = 40
