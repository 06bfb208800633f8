"""Malformed input is a one-line error, never a traceback (issue 20, case 7), and the smaller items
of case 8: bench --min-time bounds, --group-size without --scale group, JSON without NaN, recipe
errors that name recipe keys, bench --no-baselines without the base model, an empty model name."""

import json
import shutil

import pytest

from tiny_dirs import TINY_ARGS, one_line_error, run, tiny_workspace



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("malformed"), evaluate_fidelity=False)


def damaged_copy(work, tmp_path, change):
    """A copy of the converted model whose manifest went through `change` (a function of the dict)."""
    target = tmp_path / "damaged"
    shutil.copytree(work["converted"], target)
    manifest = json.loads((target / "ccli.json").read_text())
    (target / "ccli.json").write_text(json.dumps(change(manifest)))
    return target


# -- 7. malformed input ----------------------------------------------------------------------------------


def test_recipe_given_a_directory(tmp_path):
    one_line_error(run("convert", "--recipe", tmp_path), "is a directory")


def test_recipe_not_utf8(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"convert:\n  - to: fff\n# \xff\xfe\n")
    one_line_error(run("convert", "--recipe", recipe), "is not UTF-8 text")


def test_recipe_with_a_list_where_a_family_name_goes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  - to: [fff]\n")
    one_line_error(run("convert", "--recipe", recipe), "convert[0].to must be a variant family name")


def test_recipe_layers_that_are_not_block_indices(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  - to: fff\ndistill:\n  layers: [a]\n")
    one_line_error(run("convert", "--recipe", recipe), "'distill.layers' must be a list of block indices")


@pytest.mark.parametrize("command", ["convert", "eval"])
def test_data_jsonl_not_utf8(work, tmp_path, command):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "caf\xe9"}\n')
    if command == "convert":
        result = run("convert", work["model"], *TINY_ARGS, "--data", data)
    else:
        result = run("eval", work["converted"], "--data", data)
    one_line_error(result, "is not UTF-8 text")


def test_manifest_that_is_json_but_not_an_object(work, tmp_path):
    target = damaged_copy(work, tmp_path, lambda m: [m])
    one_line_error(run("profile", target, "--seq", "8"), "is not a ccli manifest (a JSON object), it holds a JSON list")


def test_manifest_whose_layer_spec_disagrees_with_the_tensors(work, tmp_path):
    def wider(m):
        m["units"][0]["spec"]["leaf_width"] = 16  # the tensors hold leaves of 8
        return m

    target = damaged_copy(work, tmp_path, wider)
    one_line_error(run("profile", target, "--seq", "8"), "does not match its manifest")


def test_manifest_whose_layer_index_is_out_of_range(work, tmp_path):
    def moved(m):
        m["units"][1]["key"] = "7"
        return m

    target = damaged_copy(work, tmp_path, moved)
    one_line_error(run("profile", target, "--seq", "8"), "the manifest names block 7, but the model has blocks 0-1")


def test_manifest_without_base_source(work, tmp_path):
    def orphan(m):
        del m["base_source"]
        return m

    target = damaged_copy(work, tmp_path, orphan)
    for command in (("eval", target), ("bench", target, "--seq", "8", "--min-time", "0.05"), ("profile", target)):
        one_line_error(run(*command), "lacks 'base_source'")


def test_manifest_naming_itself_as_its_base(work, tmp_path):
    target = tmp_path / "damaged"
    target = damaged_copy(work, tmp_path, lambda m: {**m, "base_source": str(target)})
    one_line_error(run("bench", target, "--seq", "8", "--min-time", "0.05"), "names its own directory as its base model")


def test_more_trees_than_neurons(work, no_training):
    one_line_error(run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--trees", "2000"),
                   "2000 trees for an FFN of 64 neurons")


def test_trees_too_large_for_memory_are_refused_naming_the_limit(work, no_training):
    one_line_error(run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--depth", "20"),
                   "more than the limit of 65536")
    one_line_error(run("convert", "--to", "fff", "--depth", "21"), "fff: --depth must be from 0 to 20 (got 21)")
    one_line_error(run("bench", "--layer", "--depth", "17"), "more than the limit of 65536")


def test_the_depth_cap_is_one_constant():
    import inspect

    import ccli.kernels.fff
    import ccli.variants.fff
    from ccli.kernels.fff import MAX_DEPTH
    from ccli.variants.fff import FFFConfig

    for module in (ccli.kernels.fff, ccli.variants.fff):
        source = inspect.getsource(module)
        assert "depth > 20" not in source and "depth > 30" not in source and "<= 30" not in source
    assert MAX_DEPTH == 20
    assert next(f for f in FFFConfig.options() if f.name == "depth").metadata["high"] is MAX_DEPTH


# -- 8. smaller items ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "1e9"])
def test_bench_min_time_must_be_finite_and_sane(value):
    one_line_error(run("bench", "--min-time", value), "--min-time must be a number of seconds")
    one_line_error(run("bench", "--layer", "--min-time", value), "--min-time must be a number of seconds")


def test_bench_min_time_nan():
    from ccli.api import bench, bench_layer
    from ccli.errors import CcliError

    result = run("bench", "--min-time", "nan")  # refused by the option's own range check (a usage error)
    assert result.exit_code == 2 and "Traceback" not in result.output and "--min-time" in result.stderr
    for call in (bench, bench_layer):  # and by the API
        with pytest.raises(CcliError, match="--min-time must be a number of seconds"):
            call(min_run_time=float("nan"))


def test_group_size_without_scale_group(work, tmp_path, no_training):
    for scale in ((), ("--scale", "channel")):
        one_line_error(run("convert", work["model"], "--to", "ternary", "--group-size", "32", *scale),
                       "--group-size applies only with --scale group")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  - to: ternary\n    group_size: 32\n")
    one_line_error(run("convert", "--recipe", recipe), "--group-size applies only with --scale group")


def test_json_output_never_holds_nan(capsys):
    from ccli import report

    report.print_json([{"fidelity": {"kl": float("nan"), "cos": 0.5, "per_layer": [float("inf"), 1.0]}}])

    def refuse(token):
        raise AssertionError(f"not JSON: {token}")

    (record,) = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert record == {"fidelity": {"kl": None, "cos": 0.5, "per_layer": [None, 1.0]}}


def test_eval_json_is_valid_json(work, tmp_path, monkeypatch):
    """eval --json on a model whose fidelity measure gives NaN prints null, not NaN."""
    import ccli.conversion

    original = ccli.conversion.compare_domains

    def with_nan(*args, **kwargs):
        return {**original(*args, **kwargs), "embedding_cosine_min": float("nan")}

    monkeypatch.setattr(ccli.conversion, "compare_domains", with_nan)
    result = run("eval", work["converted"], "--data", work["text"], "--json")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout, parse_constant=lambda token: pytest.fail(f"not JSON: {token}"))
    assert record["fidelity"]["embedding_cosine_min"] is None


def test_recipe_errors_name_recipe_keys_not_missing_options(work, tmp_path, no_training):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  - to: fff\n    depth: 1\n    layers: [5]\n")
    result = run("convert", work["model"], "--recipe", recipe, "--data", work["text"])
    one_line_error(result, "block 5 is out of range")
    assert "--layers" not in result.stderr and "'layers'" in result.stderr
    recipe.write_text("convert:\n  - to: fff\ndistill:\n  batch_tokens: 0\n")
    result = run("convert", "--recipe", recipe)
    one_line_error(result, "distill.batch_tokens (recipe key) must be a positive integer")
    assert "--batch-tokens" not in result.stderr
    one_line_error(run("convert", "--to", "fff", "--steps", "-1"), "--steps must be a non-negative integer")


def test_bench_no_baselines_does_not_need_the_base_model(work, tmp_path):
    moved = tmp_path / "converted"
    shutil.copytree(work["converted"], moved)
    manifest = json.loads((moved / "ccli.json").read_text())
    manifest["base_source"] = str(tmp_path / "gone")  # the base model is not there any more
    (moved / "ccli.json").write_text(json.dumps(manifest))
    result = run("bench", moved, "--no-baselines", "--seq", "8", "--min-time", "0.05", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["variant"].startswith("fff") and row["speedup"] is None
    result = run("bench", moved, "--no-baselines", "--seq", "8", "--min-time", "0.05", "--threads", "1")
    assert result.exit_code == 0 and "fff" in result.stdout, result.output


@pytest.mark.parametrize("command", ["profile", "bench", "convert"])
def test_an_empty_model_name_is_not_the_default_model(command):
    extra = ("--to", "fff") if command == "convert" else ()
    one_line_error(run(command, "", *extra), "the model name is empty")
