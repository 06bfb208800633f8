"""The family protocol from the outside.

- A minimal *block-level* family, defined here and nowhere in ccli (a gate on each block's update,
  every token still going through the block), goes through convert -> save -> reload -> profile ->
  bench with no change to any core file: the proof that a family routing tokens around whole blocks
  (Mixture-of-Depths) fits.
- A LLaMA-family model (gated FFN) converts to ternary, saves, reloads bit-identically and profiles:
  only the families that need a dense FFN teacher build one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

import ccli
from ccli.api import bench, bench_layer, profile
from ccli.arch import view
from ccli.conversion import convert
from ccli.errors import CcliError
from ccli.hub import embedded_model_dir
from ccli.variants import FAMILIES, register
from ccli.variants.base import BlockVariant, ConvertedModule, VariantConfig, option, wrap_block
from tiny import HIDDEN

pytestmark = pytest.mark.slow
BUDGET = dict(steps=12, tokens=512, batch_tokens=128, e2e_batch=4, heldout_paragraphs=16, show_progress=False)


@dataclass
class GateConfig(VariantConfig):
    family = "blockgate"
    init: float = option(0.5, "the gate's starting value", low=0.0, high=1.0)


class GatedBlock(ConvertedModule):
    """A block whose update is scaled by a learned gate: y = x + g (block(x) - x)."""

    unit_kind = "block"

    def forward(self, hidden_states, *args, **kwargs):
        out = super().forward(hidden_states, *args, **kwargs)  # the original block
        update = (out[0] if isinstance(out, tuple) else out) - hidden_states
        return hidden_states + self.gate * update


class BlockGate(BlockVariant):
    name = "blockgate"
    config = GateConfig

    @classmethod
    def wrap(cls, block: nn.Module, spec: dict) -> GatedBlock:
        block = wrap_block(GatedBlock, block)
        block.gate = nn.Parameter(torch.tensor(float(spec["init"])))
        return block


@pytest.fixture
def blockgate():
    register(BlockGate)
    yield BlockGate
    del FAMILIES["blockgate"]




def _outputs(model, text="Every block still sees every token here."):
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    enc = tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        return model(**enc, output_hidden_states=True)


def test_a_block_family_defined_outside_ccli_converts_saves_reloads_profiles_and_benches(blockgate, tiny_bert, tmp_path):
    out = tmp_path / "gated"
    record = convert(tiny_bert, to="blockgate", params={"init": 0.5}, e2e_steps=2, out=str(out), **BUDGET)
    assert [r["target"] for r in record["layers"]] == ["block", "block"]
    for layer in record["layers"]:  # the gate starts at 0.5 and learns to pass the block's update
        assert layer["final_rel_error"] < layer["init_rel_error"]
    manifest = json.loads((out / "ccli.json").read_text())
    assert [(u["key"], u["spec"]) for u in manifest["units"]] == [
        ("0", {"variant": "blockgate", "init": 0.5}), ("1", {"variant": "blockgate", "init": 0.5})]

    model, _ = ccli.load(str(out))
    arch = view(model)
    for block in arch.blocks:
        assert isinstance(block.module, GatedBlock) and block.converted
        assert 0.5 < block.module.gate.item() <= 1.5  # trained, and saved
        assert block.attention.path == f"encoder.layer.{block.index}.attention"  # parts keep their paths
        assert block.ffn.width == 64
    again, _ = ccli.load(str(out))
    first, second = _outputs(model), _outputs(again)
    assert torch.equal(first.last_hidden_state, second.last_hidden_state)
    # transformers still records each wrapped block's own output as its hidden state
    assert torch.equal(first.hidden_states[-1], first.last_hidden_state)

    dense = _outputs(ccli.load(tiny_bert)[0])
    assert not torch.equal(first.last_hidden_state, dense.last_hidden_state)  # the gates changed something

    (row,) = profile(str(out), seq=16, cross_check=False)
    assert row["flops_by_component"]["ffn"] > 0 and row["flops_by_component"]["attention_proj"] > 0
    assert [a["computed"] for a in row["active_neurons"]] == [64, 64]
    rows = bench(str(out), seq=16, min_run_time=0.05)
    assert [r["variant"] for r in rows] == ["dense", "blockgate init=0.5", "int8-dynamic", "ffn-removed"]
    assert all(r["median_ms"] > 0 for r in rows)


def test_a_block_familys_options_are_validated_by_its_config(blockgate, tiny_bert):
    with pytest.raises(CcliError, match=r"blockgate: --init must be from 0.0 to 1.0 \(got 2.0\)"):
        convert(tiny_bert, to="blockgate", params={"init": 2.0}, **BUDGET)
    with pytest.raises(CcliError, match="--depth does not apply to blockgate"):
        convert(tiny_bert, to="blockgate", params={"depth": 2}, **BUDGET)


def test_a_llama_model_converts_to_ternary_saves_reloads_bit_identically_and_profiles(tiny_llama, tmp_path):
    out = tmp_path / "ternary-llama"
    record = convert(tiny_llama, to="ternary", params={"targets": "all"}, out=str(out), **BUDGET)
    assert len(record["layers"]) == 2 * (4 + 3)  # q, k, v, o, gate, up, down in each of two blocks
    assert set(record["fidelity"]["ffn_rel_error"]) == {0, 1}  # gated FFNs measured against the teacher's
    assert record["fidelity"]["kl"] >= 0
    model, _ = ccli.load(str(out))
    again, _ = ccli.load(str(out))
    assert torch.equal(_outputs(model).logits, _outputs(again).logits)
    saved = load_file(str(out / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    (row,) = profile(str(out), seq=16, cross_check=False)
    assert row["adds_per_token"] > 0 and row["family"] == "llama"


def test_a_llama_model_converts_to_gated_fff_saves_reloads_bit_identically_and_beats_its_init(tiny_llama, tmp_path):
    out = tmp_path / "fff-llama"
    record = convert(tiny_llama, to="fff", params={"depth": 1, "leaf_width": 8}, out=str(out), **BUDGET)
    errors = record["fidelity"]["ffn_rel_error"]
    assert set(errors) == {0, 1}
    model, _ = ccli.load(str(out))
    for block in view(model).blocks:
        assert block.ffn.replaced.gated and block.ffn.replaced.linear_up.weight.shape == (1 + 2 * 8, HIDDEN)
    again, _ = ccli.load(str(out))
    assert torch.equal(_outputs(model).logits, _outputs(again).logits)
    untrained = convert(tiny_llama, to="fff", params={"depth": 1, "leaf_width": 8}, out=str(tmp_path / "init"),
                        **{**BUDGET, "steps": 0, "e2e_steps": 0})
    for block, error in errors.items():
        assert error < untrained["fidelity"]["ffn_rel_error"][block]
    # one layer timed against the model's own gated dense FFN, with the gated FLOP count
    rows = bench_layer(str(out), to="fff", tokens=[1, 5], min_run_time=0.02)
    dense, *kernels = [r for r in rows if r["tokens"] == 5]
    assert dense["kernel"] == "dense" and dense["macs_per_token"] == 3 * HIDDEN * 64
    assert {r["macs_per_token"] for r in kernels} == {3 * HIDDEN * (1 + 8)}


def test_fff_refuses_linear_leaf_neurons_on_a_gated_ffn_in_one_line(tiny_llama):
    with pytest.raises(CcliError, match="fff: --leaf-linear is for ungated FFNs"):
        convert(tiny_llama, to="fff", params={"depth": 1, "leaf_width": 4, "leaf_linear": 2}, **BUDGET)
