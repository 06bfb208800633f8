"""Conversion of the default model with a tiny budget: it improves on the un-distilled
initialisation, saves, reloads to bit-identical outputs, resumes after an interruption, and the
saved directory works with profile, bench and eval."""

import json

import pytest
import torch
from typer.testing import CliRunner

import ccli
from ccli import distill as distill_module
from ccli.cli import app
from ccli.conversion import convert
from ccli.data import DOMAINS
from ccli.errors import CcliError

pytestmark = pytest.mark.slow


def _domain(name):
    return next((d for d in DOMAINS if d.name == name), None)
# leaves of 96 neurons, 16 of them linear: the save / reload / profile / bench path of both neuron kinds
BUDGET = dict(to="fff", params={"trees": 1, "depth": 2, "leaf_width": 96, "leaf_linear": 16}, tokens=2048, batch_tokens=512,
              heldout_paragraphs=48, show_progress=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "fff"
    init_only = convert("minilm", steps=0, **BUDGET)
    trained = convert("minilm", steps=60, e2e_steps=0, out=str(out), **BUDGET)
    return init_only, trained, out


def test_distillation_improves_on_the_initialisation(converted):
    init_only, trained, _ = converted
    assert trained["fidelity"]["embedding_cosine"] > init_only["fidelity"]["embedding_cosine"]
    for layer in trained["layers"]:
        assert layer["final_rel_error"] < layer["init_rel_error"]
    assert trained["ffn_flops_reduction"] == pytest.approx(1536 / (2 + 96), rel=0.01)


def test_saved_model_reloads_to_identical_outputs(converted):
    _, trained, out = converted
    manifest = json.loads((out / "ccli.json").read_text())
    assert manifest["base_model"] == "minilm" and manifest["format"] == 2
    assert [(u["key"], u["spec"]["variant"]) for u in manifest["units"]] == [(str(i), "fff") for i in range(6)]
    model, tokenizer = ccli.load(str(out))
    again, _ = ccli.load(str(out))
    enc = tokenizer(["Saving must not change a single bit."], return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**enc).last_hidden_state, again(**enc).last_hidden_state)


def test_the_saved_directory_works_with_every_command(converted):
    _, _, out = converted
    runner = CliRunner()
    result = runner.invoke(app, ["profile", str(out), "--seq", "32", "--json"])
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["flops_by_component"]["ffn"] == 6 * 2 * 2 * 384 * (2 + 96)
    assert record["active_neurons"][0]["computed"] == 98
    result = runner.invoke(app, ["bench", str(out), "--seq", "16", "--min-time", "0.05", "--json"])
    assert result.exit_code == 0, result.output
    variants = [r["variant"] for r in json.loads(result.stdout)]
    assert variants[0] == "dense" and variants[1].startswith("fff") and "ffn-removed" in variants
    notes = out.parent / "notes.txt"
    notes.write_text("\n".join(f"Entry {i}: the river rose again overnight and the ferry to the island did not run." for i in range(300)))
    result = runner.invoke(app, ["eval", str(out), "--data", str(notes), "--paragraphs", "8", "--json"])
    assert result.exit_code == 0, result.output
    fidelity = json.loads(result.stdout)[0]["fidelity"]
    assert 0 < fidelity["embedding_cosine"] <= 1
    domains = {d["domain"]: d for d in fidelity["domains"]}
    assert set(domains) == {d.name for d in DOMAINS} | {"notes.txt"}  # the user's file is a domain of its own
    assert not domains["notes.txt"]["seen"] and all(d["paragraphs"] <= 8 for d in domains.values())
    assert [d["seen"] for d in fidelity["domains"]] == [not getattr(_domain(n), "left_out", True) for n in domains]
    assert fidelity["unseen"]["paragraphs"] == sum(d["paragraphs"] for d in domains.values() if not d["seen"])


def test_existing_output_is_never_overwritten_silently(converted):
    _, _, out = converted
    with pytest.raises(CcliError, match="already exists"):
        convert("minilm", steps=0, out=str(out), **BUDGET)


@pytest.fixture
def one_thread():
    """Bit-identical runs need one thread. With two, every conversion differs from the next in the last
    bits, in one process or in fresh ones (three runs, three different weight hashes; with one thread,
    all the same): torch's multithreaded CPU reductions are not reproducible run to run. The test is
    about what resuming keeps, so it removes that noise rather than loosening its comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resume_after_an_interruption_gives_the_same_model(tmp_path, monkeypatch, one_thread):
    options = dict(BUDGET, steps=5, layers=[0, 1, 2], evaluate_fidelity=False)
    straight = convert("minilm", out=str(tmp_path / "a"), **options)
    original_fit = distill_module.fit_layer
    calls = {"n": 0}

    def interrupted_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original_fit(*args, **kwargs)

    monkeypatch.setattr(distill_module, "fit_layer", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        convert("minilm", out=str(tmp_path / "b"), **options)
    assert not (tmp_path / "b").exists()  # nothing half-written
    monkeypatch.setattr(distill_module, "fit_layer", original_fit)
    convert("minilm", out=str(tmp_path / "b"), resume=True, **options)
    a, _ = ccli.load(str(tmp_path / "a"))
    b, _ = ccli.load(str(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert straight["layers"][0]["final_rel_error"] > 0


@pytest.mark.parametrize("family", [
    dict(to="fff", params={"trees": 1, "depth": 1, "leaf_width": 64}),
    # ternary: the restored latent weights must reach the packed weights the forward pass uses
    dict(to="ternary", params={"targets": "ffn", "scale": "group", "group_size": 32}),
], ids=["fff", "ternary"])
def test_resume_inside_end_to_end_training_continues_where_it_stopped(tmp_path, monkeypatch, one_thread, family):
    options = dict(BUDGET, **family, steps=3, e2e_steps=6, e2e_batch=4, layers=[0, 1], evaluate_fidelity=False)
    straight = convert("minilm", out=str(tmp_path / "a"), **options)
    monkeypatch.setattr(distill_module, "E2E_CHECKPOINT_SECONDS", 0.0)  # save after every step
    original_error = distill_module.hidden_state_error
    calls = {"n": 0}

    def counted_error(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # call 1 scores the probe, calls 2-4 are steps 0-2: stop inside step 3
            raise KeyboardInterrupt
        return original_error(*args, **kwargs)

    monkeypatch.setattr(distill_module, "hidden_state_error", counted_error)
    with pytest.raises(KeyboardInterrupt):
        convert("minilm", out=str(tmp_path / "b"), **options)
    assert not (tmp_path / "b").exists()
    calls["n"] = -100  # no more interruptions; count what the resumed run computes
    resumed = convert("minilm", out=str(tmp_path / "b"), resume=True, **options)
    assert calls["n"] + 100 == 3 + 1  # steps 3-5 and the final probe: nothing done twice
    assert resumed["e2e_loss_first"] == straight["e2e_loss_first"] and resumed["e2e_loss_last"] == straight["e2e_loss_last"]
    a, _ = ccli.load(str(tmp_path / "a"))
    b, _ = ccli.load(str(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not list(tmp_path.glob(".b.ccli-progress*"))  # the finished run leaves no progress behind


COMPOSED = """
convert:
  - to: ternary
    targets: ffn
    layers: [1]
  - to: fff
    depth: 1
    leaf_width: 32
    layers: [0]
distill:
  steps: 3
  tokens: 2048
  batch_tokens: 512
  e2e_batch: 4
"""


def test_a_recipes_end_to_end_stage_trains_every_steps_modules(tmp_path, one_thread):
    """End-to-end training runs after a recipe's last step and trains what every step converted. Here
    the first step's ternary linears (block 1) sit between the second step's tree (block 0) and the
    loss: finalized before that stage, their ternary weights were frozen (and, before the op had a
    gradient formula, no gradient passed through them at all)."""
    recipe = tmp_path / "composed.yaml"
    recipe.write_text(COMPOSED)
    options = dict(recipe=str(recipe), heldout_paragraphs=16, show_progress=False, evaluate_fidelity=False)
    layerwise = convert("minilm", e2e_steps=0, out=str(tmp_path / "a"), **options)
    trained = convert("minilm", e2e_steps=6, out=str(tmp_path / "b"), **options)
    assert trained["e2e_kept"] and trained["e2e_loss_last"] < trained["e2e_loss_first"]
    a, _ = ccli.load(str(tmp_path / "a"))
    b, _ = ccli.load(str(tmp_path / "b"))
    tree = "encoder.layer.0.output.dense"
    assert not torch.equal(a.get_submodule(tree).linear_in.weight, b.get_submodule(tree).linear_in.weight)
    for path in ("encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"):
        # the ternary weights themselves (their scales follow the latent weights), not only the bias
        assert not torch.equal(a.get_submodule(path).scale, b.get_submodule(path).scale), f"{path} was not trained"
    manifest = json.loads((tmp_path / "b" / "ccli.json").read_text())
    # in conversion order: the recipe's first step (ternary, block 1) before its second (fff, block 0)
    assert [(u["key"], u["spec"]["variant"]) for u in manifest["units"]] == [
        ("encoder.layer.1.intermediate.dense", "ternary"), ("encoder.layer.1.output.dense", "ternary"), ("0", "fff")]
    assert layerwise["layers"][0]["final_rel_error"] == trained["layers"][0]["final_rel_error"]


def test_convert_cli_errors():
    runner = CliRunner()
    result = runner.invoke(app, ["convert", "--to", "fff", "--resume"])
    assert result.exit_code == 2 and "--resume needs --out" in result.stderr
    result = runner.invoke(app, ["convert", "--to", "fff", "--depth", "-1"])
    assert result.exit_code == 2 and "--depth must be from 0 to 20" in result.stderr
    result = runner.invoke(app, ["convert", "--to", "fff", "--short-spans", "-1"])
    assert result.exit_code == 2 and "--short-spans must be a number from 0 to 4" in result.stderr
    result = runner.invoke(app, ["convert", "--to", "fff", "--e2e-target", "first"])
    assert result.exit_code == 2 and "--e2e-target must be one of last, all" in result.stderr
    result = runner.invoke(app, ["eval", "minilm"])
    assert result.exit_code == 2 and "not a converted ccli model" in result.stderr
