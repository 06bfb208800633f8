"""Ternary conversion of the default model with a tiny budget: distillation beats plain post-training
ternarisation, the saved directory holds packed weights, reloads to bit-identical outputs and works
with profile and bench --layer."""

import json

import pytest
import torch
from typer.testing import CliRunner

import ccli
from ccli.cli import app
from ccli.conversion import convert

pytestmark = pytest.mark.slow
BUDGET = dict(to="ternary", params={"targets": "ffn", "scale": "channel"}, tokens=2048, batch_tokens=512,
              heldout_paragraphs=48, show_progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "ternary"
    post_training = convert("minilm", steps=0, **BUDGET)
    trained = convert("minilm", steps=40, e2e_steps=0, out=str(out), **BUDGET)
    return post_training, trained, out


def test_distillation_beats_post_training_ternarisation(converted):
    """On held-out text, each distilled FFN is closer to the dense one than plain ternarisation. (At
    this budget, 40 steps on 2048 tokens, the whole model's pooled cosine over ten text domains moves
    by less than its noise: 0.5992 against 0.5996 in one CI run, so it is not what is asserted.)"""
    post_training, trained, _ = converted
    held_out = [(trained["fidelity"]["ffn_rel_error"][k], post_training["fidelity"]["ffn_rel_error"][k])
                for k in trained["fidelity"]["ffn_rel_error"]]
    assert len(held_out) == 6 and all(after < before for after, before in held_out), held_out
    for unit in trained["layers"]:
        assert unit["final_rel_error"] < unit["init_rel_error"], unit["target"]
    assert len(trained["layers"]) == 12  # two FFN linears in each of the six blocks


def test_saved_ternary_model_is_packed_and_reloads_identically(converted):
    _, trained, out = converted
    manifest = json.loads((out / "ccli.json").read_text())
    assert len(manifest["units"]) == 12 and {u["spec"]["variant"] for u in manifest["units"]} == {"ternary"}
    assert trained["weight_bytes"] < trained["weight_bytes_dense"]
    model, tokenizer = ccli.load(str(out))
    state = model.state_dict()
    packed = [k for k in state if k.endswith(".packed")]
    assert len(packed) == 12 and all(state[k].dtype == torch.uint8 for k in packed)
    assert not any(k.endswith("intermediate.dense.weight") for k in state)  # no float copy kept
    again, _ = ccli.load(str(out))
    enc = tokenizer(["Packed weights must reload to the same bits."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).last_hidden_state, again(**enc).last_hidden_state)


def test_profile_and_layer_bench_know_ternary(converted):
    _, _, out = converted
    runner = CliRunner()
    result = runner.invoke(app, ["profile", str(out), "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["adds_by_component"]["ffn"] == 6 * 2 * 384 * 1536
    assert record["flops_by_component"]["ffn"] == 6 * 2 * (1536 + 384)  # only the per-output scaling multiplies
    result = runner.invoke(app, ["bench", str(out), "--layer", "--tokens", "1,8", "--min-time", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["kernel"] == "dense" and any(r["kernel"].startswith("ternary-") for r in rows)
    assert rows[1]["weight_bytes"] * 12 < rows[0]["weight_bytes"]


def test_ternary_options_are_checked():
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--to", "ternary", "--depth", "3"])
    assert result.exit_code == 2 and "--depth does not apply to ternary" in result.stderr
    result = runner.invoke(app, ["convert", "--to", "ternary", "--act-bits", "4"])
    assert result.exit_code == 2 and "ternary: --act-bits must be one of 8, 16 (got 4)" in result.stderr
