"""Mixture-of-Depths after training (ccli.variants.mod): the routed block against hand-written
references, its FLOPs against the hand formula, convert -> save -> reload bit-identical, profile's
routing record, the config's one-line errors, and a CI-sized conversion of the default model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
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


def _routed(block, capacity, attention="routed", seed=1, skip_rank=0) -> MoDBlock:
    module = MoDVariant.wrap(copy.deepcopy(block), {"capacity": capacity, "attention": attention, "skip_rank": skip_rank})
    torch.manual_seed(seed)
    with torch.no_grad():
        module.router.weight.normal_(0, 1.0)
        module.router.bias.normal_(0, 1.0)
        if module.skip is not None:
            module.skip[1].bias.normal_(0, 1.0)  # a skip path that changes what it is given
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
    skipped = hidden if module.skip is None else hidden + module.skip(hidden)
    return torch.where(chosen[..., None], hidden + g[..., None] * (out - hidden),
                       torch.where(call.real[..., None], skipped, hidden))


@pytest.mark.parametrize("skip_rank", [0, 4])
@pytest.mark.parametrize("attention", ["routed", "all"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("capacity", [0.75, 0.5, 0.25, 0.125])
def test_gather_scatter_equals_a_masked_reference_with_padding(attn, capacity, attention, skip_rank):
    model = tiny("bert", attn=attn)
    block = view(model).blocks[1].module
    call = _padded_call(model, 1, lengths=(12, 7, 3, 1), seed=int(capacity * 8))
    module = _routed(block, capacity, attention, skip_rank=skip_rank)
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


@pytest.mark.parametrize("skip_rank", [0, 4])
@pytest.mark.parametrize("attention", ["routed", "all"])
@pytest.mark.parametrize("capacity", [1.0, 0.5, 0.125])
def test_the_flop_counter_sees_only_the_routed_tokens(capacity, attention, skip_rank):
    model = BertModel(BertConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=2,
                                 num_attention_heads=HEADS, vocab_size=100)).eval()
    seq = 24
    inputs = {"input_ids": torch.randint(1, 100, (1, seq)), "attention_mask": torch.ones(1, seq, dtype=torch.long)}
    dense = count_flops(model, inputs).by_module
    arch = view(model)
    arch.blocks[1].replace(MoDVariant.wrap(arch.blocks[1].module, {"capacity": capacity, "attention": attention,
                                                                   "skip_rank": skip_rank}))
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
    expected += 2 * (seq - k) * 2 * h * skip_rank  # the skip path (H -> rank -> H) on the skipped tokens only
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
    with pytest.raises(CcliError, match="mod: --attention must be one of auto, routed, all"):
        MoDVariant(attention="keys")


# --- decoders: per-token decisions, every token's K/V in the cache ---------------------------------

def _decoder_call(model, block: int, ids, mask=None):
    """The inputs block `block` gets in a full forward (no cache): (args, kwargs)."""
    calls = []
    handle = model.get_submodule(view(model).blocks[block].path).register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    handle.remove()
    return calls[0]


def _routed_decoder(model, block: int, capacity: float, seed: int = 1, skip_rank: int = 0) -> MoDBlock:
    """Block `block` of `model` wrapped in place, router and predictor random (the predictor routes
    about half the tokens)."""
    arch = view(model)
    module = MoDVariant.wrap(arch.blocks[block].module, {"capacity": capacity, "skip_rank": skip_rank})
    torch.manual_seed(seed)
    with torch.no_grad():
        for linear in (module.router, module.predictor):
            linear.weight.normal_(0, 1.0)
            linear.bias.zero_()
    return module.eval()


@pytest.mark.parametrize("skip_rank", [0, 4])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_routed_block_equals_the_dense_block_kept_at_the_routed_tokens(family, attn, skip_rank):
    """Routed queries attend over every token's K/V, so a routed token's output is the dense block's
    output there, its update scaled by the router; skipped tokens take the skip path (or leave as
    they came) and padding tokens leave as they came."""
    model = tiny(family, attn=attn)
    dense_block = copy.deepcopy(view(model).blocks[1].module)
    module = _routed_decoder(model, 1, 0.5, skip_rank=skip_rank)
    ids = torch.randint(1, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :9] = 0
    args, kwargs = _decoder_call(model, 1, ids, mask)
    hidden = args[0]
    with torch.no_grad():
        got = module(*args, **kwargs)
        dense = dense_block(*args, **kwargs)
        chosen = (module.predictor(hidden).squeeze(-1) > 0) & mask.bool()
        g = 2 * torch.sigmoid(module.router(hidden).squeeze(-1))
        skipped = hidden if module.skip is None else hidden + module.skip(hidden)
        expected = torch.where(chosen[..., None], hidden + g[..., None] * (dense - hidden), skipped)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[~real], hidden[~real])  # padding never routed, never changed
    assert 0 < int(chosen.sum()) < int(real.sum())
    assert module.routing() == {"capacity": 0.5, "tokens": int(chosen.sum()), "real_tokens": int(real.sum())}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_capacity_one_is_the_block_with_its_update_scaled(family):
    model = tiny(family)
    dense_block = copy.deepcopy(view(model).blocks[1].module)
    module = _routed_decoder(model, 1, 1.0)
    args, kwargs = _decoder_call(model, 1, torch.randint(1, 100, (2, 9)))
    with torch.no_grad():
        module.router.weight.zero_()
        module.router.bias.zero_()
        torch.testing.assert_close(module(*args, **kwargs), dense_block(*args, **kwargs), rtol=1e-5, atol=1e-6)
    assert module.routing()["tokens"] == 18


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoding_with_the_kv_cache_routes_and_outputs_as_a_full_forward(family, batch):
    """Prefill 4 tokens, then one token at a time with the cache: each step's decisions in every
    routed block and its logits equal the full forward's over the same tokens."""
    from transformers import DynamicCache

    model = tiny(family)
    modules = [_routed_decoder(model, b, 0.5, seed=b, skip_rank=4 * b) for b in (0, 1)]  # block 1 with a skip path
    decided: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, kwargs: decided.append(mod.decisions(args[0], torch.ones(args[0].shape[:2], dtype=torch.bool))),
        with_kwargs=True) for m in modules]
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(5))[:batch]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        full_decisions = torch.stack(decided)
        decided.clear()
        cache, steps = DynamicCache(), []
        for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, 12)]:
            steps.append(model(input_ids=ids[:, start:stop], cache=cache, use_cache=True).logits)
    for h in hooks:
        h.remove()
    stepwise_decisions = torch.cat([torch.stack(decided[i:i + 2]) for i in range(0, len(decided), 2)], dim=2)
    assert torch.equal(stepwise_decisions, full_decisions)
    assert 0 < int(full_decisions.sum()) < full_decisions.numel()  # some tokens skip, some do not
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 12 and cache.layers[1].keys.shape[-2] == 12  # skipped tokens' K/V are there


def test_decoder_flops_count_the_routed_tokens_and_every_tokens_kv():
    model = tiny("llama")
    module = _routed_decoder(model, 1, 0.5)
    seq = 24
    inputs = {"input_ids": torch.randint(1, 100, (1, seq), generator=torch.Generator().manual_seed(2))}
    counted = count_flops(model, inputs).by_module
    k = module.routing()["tokens"]
    assert 0 < k < seq
    cfg = model.config
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    # predictor and K/V projections on every token; router (update scale), Q, O, the routed queries'
    # scores and context over every key and the gated FFN on the routed tokens
    expected = 2 * seq * h + 2 * seq * 2 * h * kv + 2 * k * h + 2 * k * 2 * h * h + 2 * 2 * k * seq * h + 2 * k * 3 * h * i
    assert counted["model.layers.1"] == expected


def test_the_predictor_reproduces_the_routers_per_sequence_choices():
    """Calls whose sequences each hold a spread of router scores: a per-token threshold can match
    per-sequence top-k closely. The fitted predictor routes `capacity` of the calibration tokens and
    its reported accuracy is its agreement with the router's top-k there."""
    from ccli.capture import BlockCall
    from ccli.variants.mod import fit_predictor

    g = torch.Generator().manual_seed(0)
    router, predictor = nn.Linear(16, 1), nn.Linear(16, 1)
    calls = []
    for _ in range(6):
        hidden = torch.randn(4, 40, 16, generator=g)
        real = torch.ones(4, 40, dtype=torch.bool)
        real[3, 30:] = False  # padding is neither labelled nor counted
        calls.append(BlockCall(hidden, {}, real))
    accuracy = fit_predictor(predictor, router, calls, capacity=0.25)
    agree = total = routed = 0
    with torch.no_grad():
        for call in calls:
            scores, decided = router(call.hidden).squeeze(-1), predictor(call.hidden).squeeze(-1) > 0
            for b in range(4):
                s, d = scores[b][call.real[b]], decided[b][call.real[b]]
                label = torch.zeros_like(d)
                label[s.topk(math.ceil(0.25 * len(s))).indices] = True
                agree += int((label == d).sum())
                total += len(s)
                routed += int(d.sum())
    assert accuracy == pytest.approx(agree / total)
    assert accuracy > 0.9
    assert routed / total == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_settings_that_do_not_apply_are_one_line_errors(family):
    block = view(tiny(family)).blocks[1].module
    with pytest.raises(CcliError, match="mod: --attention routed is for encoders"):
        MoDVariant.wrap(copy.deepcopy(block), {"capacity": 0.5, "attention": "routed"})
    with pytest.raises(CcliError, match="mod: --train router is for encoders"):
        MoDVariant(train="router").units(view(tiny(family)), 1)


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
    assert manifest["units"][0]["spec"] == {"variant": "mod", "capacity": 0.5, "blocks": "alternate", "attention": "auto",
                                             "skip_rank": 0, "train": "block"}

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


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.test_decoders import _save, _tiny_lm

    return _save(_tiny_lm("llama"), tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_llama"])
def test_the_fitted_skip_path_lowers_each_routed_blocks_error(which, request):
    """The same routing with and without a skip path (no training): the one fitted to the blocks'
    updates on the skipped tokens is closer to the original blocks, and reports what it explains."""
    settings = dict(to="mod", steps=0, e2e_steps=0, tokens=512, evaluate_fidelity=False, show_progress=False)
    path = request.getfixturevalue(which)
    plain = convert(path, params={"capacity": 0.5}, **settings)["layers"]
    skipping = convert(path, params={"capacity": 0.5, "skip_rank": 8}, **settings)["layers"]
    for without, with_skip in zip(plain, skipping):
        assert with_skip["init_rel_error"] < without["init_rel_error"]
        assert 0 < with_skip["init"]["skip_explained"] <= 1
        assert "skip_explained" not in without["init"]
    # the first routed block sees the same inputs either way, so its router is fitted alike
    assert skipping[0]["init"]["router_correlation"] == pytest.approx(plain[0]["init"]["router_correlation"], abs=1e-6)
    if which == "tiny_llama":
        assert 0.5 < skipping[0]["init"]["predictor_accuracy"] <= 1


MOE_THEN_MOD = """
convert:
  - {to: moe, experts: 8, top_k: 2, layers: [1, 3]}
  - {to: mod, capacity: 0.5, blocks: "1", attention: all}
"""


# torch warns when a backward pass goes through an op without a gradient formula (an MoE left on its
# inference kernel while training) and when the optimizer holds a parameter twice
@pytest.mark.filterwarnings("error::UserWarning")
def test_a_routed_block_composes_with_a_converted_ffn(tiny_bert, tmp_path):
    """A recipe routes tokens around a block whose FFN an earlier step made a mixture of experts: the
    MoE trains on its own training path inside the routed block, runs on the routed tokens only, the
    fidelity report reads its inputs there, and the model saves and reloads bit-identically."""
    from ccli.variants.moe import MoE

    recipe = tmp_path / "moe-mod.yaml"
    recipe.write_text(MOE_THEN_MOD)
    out = tmp_path / "moe-mod"
    record = convert(tiny_bert, recipe=str(recipe), e2e_steps=2, out=str(out), **BUDGET)
    last = record["layers"][-1]
    assert (last["layer"], last["target"]) == (1, "block")
    manifest = json.loads((out / "ccli.json").read_text())
    assert [u["spec"]["variant"] for u in manifest["units"]] == ["moe", "moe", "mod"]

    model, tokenizer = ccli.load(str(out))
    again, _ = ccli.load(str(out))
    blocks = [b.module for b in view(model).blocks]
    assert [isinstance(b, MoDBlock) for b in blocks] == [False, True, False, False]
    (inner,) = [m for m in blocks[1].modules() if isinstance(m, MoE)]
    assert len([m for m in blocks[3].modules() if isinstance(m, MoE)]) == 1
    blocks[1].train()
    assert inner.training and not blocks[1].attention.training  # its training path; no dropout elsewhere
    blocks[1].eval()
    assert set(record["fidelity"]["ffn_rel_error"]) == {1, 3}
    enc = tokenizer(["The routed block runs its experts on the routed tokens alone."], return_tensors="pt")
    rows = []
    hook = inner.register_forward_hook(lambda module, args, output: rows.append(args[0].reshape(-1, HIDDEN).shape[0]))
    with torch.inference_mode():
        first, second = model(**enc).last_hidden_state, again(**enc).last_hidden_state
    hook.remove()
    assert rows == [math.ceil(0.5 * int(enc["attention_mask"].sum()))]
    assert torch.equal(first, second)
