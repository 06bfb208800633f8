"""Users' data and models are safe (issue 20, cases 1-6): --overwrite replaces only what ccli wrote,
loading checks what it loads, warnings that matter reach the user, progress checkpoints run no code,
write failures are found before training and are one line, and a diverged model is never saved."""

import json
import os
import stat

import pytest
import torch

import ccli
from ccli import distill as distill_module
from ccli import safety
from ccli.conversion import convert
from ccli.errors import CcliError
from tiny_dirs import TINY, TINY_ARGS, one_line_error, run, tiny_bert_dir, tiny_workspace



@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.mktemp("safety"))


def user_files(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.md").write_text("my notes\n")
    (directory / "src").mkdir(exist_ok=True)
    (directory / "src" / "main.py").write_text("print('hello')\n")
    return sorted(p.relative_to(directory) for p in directory.rglob("*"))


def still_there(directory, listing):
    assert sorted(p.relative_to(directory) for p in directory.rglob("*")) == listing
    assert (directory / "notes.md").read_text() == "my notes\n"


# -- 1. --overwrite deletes only what ccli wrote ------------------------------------------------------


def test_overwrite_refuses_a_directory_of_notes(work, tmp_path, no_training):
    notes = tmp_path / "notes"
    listing = user_files(notes)
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", notes, "--overwrite")
    one_line_error(result, "was not written by ccli")
    still_there(notes, listing)


def test_overwrite_refuses_the_working_directory_and_its_parents(work, tmp_path, monkeypatch, no_training):
    project = tmp_path / "project"
    listing = user_files(project)
    (project / "ccli.json").write_text('{"format": 1}')  # even one that looks like ccli's
    listing = sorted(p.relative_to(project) for p in project.rglob("*"))
    monkeypatch.chdir(project)
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", ".", "--overwrite")
    one_line_error(result, "is the working directory or one of its parents")
    (project / "src" / "sub").mkdir()
    monkeypatch.chdir(project / "src" / "sub")
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", "../..", "--overwrite")
    one_line_error(result, "is the working directory or one of its parents")
    (project / "src" / "sub").rmdir()
    still_there(project, listing)


def test_an_empty_out_is_refused(work, tmp_path, monkeypatch, no_training):
    listing = user_files(tmp_path / "cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    for extra in ((), ("--overwrite",)):
        result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", "", *extra)
        one_line_error(result, "--out is empty")
    still_there(tmp_path / "cwd", listing)


def test_overwrite_refuses_the_base_model(work, tmp_path, no_training):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(work["model"], model)
    listing = sorted(p.relative_to(model) for p in model.rglob("*"))
    result = run("convert", model, *TINY_ARGS, "--data", work["text"], "--out", model, "--overwrite")
    one_line_error(result, "holds the base model being converted")
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == listing
    # the base-model rule on its own, for a directory that does hold a ccli manifest
    (tmp_path / "conv" / "base").mkdir(parents=True)
    (tmp_path / "conv" / "ccli.json").write_text('{"format": 1}')
    with pytest.raises(CcliError, match="holds the base model"):
        safety.check_replaceable(tmp_path / "conv", base=tmp_path / "conv" / "base")


def test_overwrite_refuses_a_regular_file_and_leaves_nothing_behind(work, tmp_path, no_training):
    target = tmp_path / "result.txt"
    target.write_text("keep me\n")
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", target, "--overwrite")
    one_line_error(result, "is a file, not a directory")
    assert target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_overwrite_replaces_a_ccli_directory_atomically_keeping_its_mode(work, tmp_path):
    out = tmp_path / "out"
    convert(str(work["model"]), data=str(work["text"]), out=str(out), evaluate_fidelity=False, **TINY)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # what mkdir gives, not mkdtemp's 0700
    os.chmod(out, 0o750)
    before = json.loads((out / "ccli.json").read_text())
    convert(str(work["model"]), data=str(work["text"]), out=str(out), overwrite=True, seed=1,
            evaluate_fidelity=False, **TINY)
    assert json.loads((out / "ccli.json").read_text())["distill"]["seed"] == 1 != before["distill"]["seed"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # the replaced directory's own mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.oldPID, no temporary directory
    ccli.load(str(out))


# -- 2. loading checks what it loads -----------------------------------------------------------------


def test_a_converted_directory_without_its_manifest_is_refused(work, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(work["converted"], broken)
    (broken / "ccli.json").unlink()
    for command in (("profile", broken, "--seq", "8"), ("bench", broken, "--seq", "8", "--min-time", "0.05")):
        one_line_error(run(*command), "manifest ccli.json is missing")
    with pytest.raises(CcliError, match="manifest ccli.json is missing"):
        ccli.load(str(broken))


def test_a_checkpoint_missing_tensors_is_a_visible_warning(work, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(work["model"], partial)
    state = load_file(str(partial / "model.safetensors"))
    save_file({k: v for k, v in state.items() if ".layer.1." not in k}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    result = run("profile", partial, "--seq", "8", "--json")
    assert result.exit_code == 0, result.output
    warning_lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning_lines) == 1 and "lacks 16 tensors" in warning_lines[0] and "random" in warning_lines[0]
    # the complete checkpoint loads without a word
    result = run("profile", work["model"], "--seq", "8", "--json")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr


def test_a_tokenizer_that_is_not_the_models_own_is_refused(work, tmp_path, no_training):
    bare = tiny_bert_dir(tmp_path / "bare", tokenizer=False)  # transformers makes a 5-token tokenizer here
    result = run("convert", bare, *TINY_ARGS, "--data", work["text"])
    one_line_error(result, "its tokenizer has 5 tokens but the model has 100 token embeddings")


# -- 3. warnings that matter reach the user -------------------------------------------------------------


def test_the_native_kernel_fallback_is_shown_once(monkeypatch):
    from ccli.kernels import fff as F
    from ccli.kernels import native

    def failing_build():
        raise OSError("no C++ compiler (simulated)")

    monkeypatch.delenv("CCLI_REQUIRE_NATIVE", raising=False)  # CI forbids the fallback this test is about
    monkeypatch.setattr(native.FFF, "compile", failing_build)
    native.reset()
    F.set_backend("auto")
    try:
        result = run("bench", "--layer", "--to", "fff", "--hidden", "16", "--width", "32", "--depth", "2",
                     "--tokens", "1,2", "--min-time", "0.05", "--threads", "1")
        assert result.exit_code == 0, result.output
        shown = [line for line in result.stderr.splitlines() if "could not build the native FFF CPU kernel" in line]
        assert len(shown) == 1 and shown[0].startswith("warning:") and "reference" in shown[0], result.stderr
    finally:
        monkeypatch.undo()
        native.reset()
        F.set_backend("auto")


def test_the_cli_no_longer_hides_every_warning():
    import warnings

    from ccli import cli

    with warnings.catch_warnings():
        cli._quiet_libraries()
        actions = {f[2]: f[0] for f in warnings.filters if f[2] in (UserWarning, RuntimeWarning, Warning)}
        assert "ignore" not in actions.values()
        assert warnings.showwarning is cli._show_warning


# -- 4. progress checkpoints run no code -------------------------------------------------------------------

def _payload(path):
    with open(path, "w") as f:
        f.write("code ran\n")
    return {}


class Payload:
    """Unpickling this object calls _payload(path): code a crafted checkpoint would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_payload, (self.path,))


def test_resume_refuses_a_checkpoint_that_would_run_code(work, tmp_path, no_training):
    out = tmp_path / "out"
    marker = tmp_path / "payload-ran"
    planted = tmp_path / ".out.ccli-progress.0.pt"
    torch.save({"key": None, "modules": {}, "specs": {}, "reports": {}, "evil": Payload(marker)}, planted)
    # the payload is real: full unpickling runs it
    torch.load(planted, weights_only=False)
    assert marker.read_text() == "code ran\n"
    marker.unlink()
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", out, "--resume")
    one_line_error(result, "refusing the progress checkpoint")
    assert not marker.exists()
    with pytest.raises(CcliError, match="holds more than tensors and plain data"):
        convert(str(work["model"]), data=str(work["text"]), out=str(out), resume=True, **TINY)
    assert not marker.exists()


def test_progress_checkpoints_hold_plain_data_and_resume(work, tmp_path, monkeypatch):
    """A checkpoint taken in end-to-end training loads with weights_only=True, and resuming from it
    gives the uninterrupted run's model bit for bit."""
    options = dict(TINY, e2e_steps=4, e2e_batch=4, evaluate_fidelity=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = convert(str(work["model"]), data=str(work["text"]), out=str(tmp_path / "a"), **options)
        monkeypatch.setattr(distill_module, "E2E_CHECKPOINT_SECONDS", 0.0)
        original = distill_module.hidden_state_error
        calls = {"n": 0}

        def interrupted(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 4:  # probe, steps 0-1, then stop inside step 2
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(distill_module, "hidden_state_error", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert(str(work["model"]), data=str(work["text"]), out=str(tmp_path / "b"), **options)
        (checkpoint,) = tmp_path.glob(".b.ccli-progress.*.pt")
        state = torch.load(checkpoint, weights_only=True)
        assert isinstance(state["reports"]["0"], dict) and isinstance(state["e2e"]["sampler"][1], list)
        calls["n"] = -100
        resumed = convert(str(work["model"]), data=str(work["text"]), out=str(tmp_path / "b"), resume=True, **options)
    finally:
        torch.set_num_threads(threads)
    assert resumed["e2e_loss_last"] == straight["e2e_loss_last"]
    a, _ = ccli.load(str(tmp_path / "a"))
    b, _ = ccli.load(str(tmp_path / "b"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


# -- 5. write failures are found before training, as one line ------------------------------------------------


def test_out_under_a_regular_file_is_refused_before_training(work, tmp_path, no_training):
    (tmp_path / "file").write_text("x")
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "file" / "sub" / "out")
    one_line_error(result, "is a file, not a directory")


def test_out_under_a_read_only_parent_is_refused_before_training(work, tmp_path, monkeypatch, no_training):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safety.tempfile, "mkstemp", denied)  # as root a chmod 555 directory is still writable
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "ro" / "out")
    one_line_error(result, "cannot write in")
    assert "Permission denied" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_under_a_real_read_only_parent(work, tmp_path, no_training):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "ro" / "out")
        one_line_error(result, "cannot write in")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_a_full_disk_is_found_before_training(work, tmp_path, monkeypatch, no_training):
    import shutil

    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "out")
    one_line_error(result, "MiB free on its disk")


def test_a_write_error_while_saving_is_one_line_and_leaves_nothing(work, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "out")
    one_line_error(result, "No space left on device", alone=False)
    # no output and no temporary directory; the progress is kept, so --resume saves without training again
    assert [p.name for p in tmp_path.iterdir()] == [".out.ccli-progress.0.pt"]
    monkeypatch.undo()
    monkeypatch.setattr(distill_module, "fit_layer", lambda *a, **k: pytest.fail("trained again"))
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "out", "--resume")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_write_error_in_a_progress_checkpoint_is_one_line(work, tmp_path, monkeypatch):
    def full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--out", tmp_path / "out")
    one_line_error(result, "cannot write", alone=False)
    assert list(tmp_path.iterdir()) == []  # no half-written .tmpPID


def test_leftovers_of_an_interrupted_save_are_removed_by_the_next_run(work, tmp_path):
    out = tmp_path / "out"
    dead = 99999999  # no process has this id
    (tmp_path / f".out.ccli-tmp{dead}.k2j4").mkdir()
    (tmp_path / f".out.ccli-tmp{dead}.k2j4" / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".out.ab12cd_3").mkdir()  # an older ccli's temporary directory
    (tmp_path / ".out.ab12cd_3" / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / f".out.ccli-progress.0.pt.tmp{dead}").write_bytes(b"partial")
    (tmp_path / f".out.ccli-tmp{os.getpid()}.live").mkdir()  # a save in progress in a live process
    (tmp_path / ".out.notes").write_text("mine")  # not ccli's
    convert(str(work["model"]), data=str(work["text"]), out=str(out), evaluate_fidelity=False, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.ccli-tmp{os.getpid()}.live", ".out.notes", "out"]


def test_a_replacement_cut_between_its_renames_is_undone(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.old99999999"
    old.mkdir()
    (old / "ccli.json").write_text('{"format": 1}')
    safety.remove_leftovers(out)
    assert (out / "ccli.json").is_file() and not old.exists()


# -- 6. a diverged model is never saved silently --------------------------------------------------------------


def test_a_nan_model_is_an_error_and_not_saved(work, tmp_path):
    result = run("convert", work["model"], *TINY_ARGS[:-1], "1", "--data", work["text"], "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite weights" in errors[0] and "encoder.layer.0" in errors[0]
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_exploding_stage_is_a_warning(work, tmp_path, monkeypatch):
    original = distill_module.fit_layer

    def exploding(*args, **kwargs):
        before, _ = original(*args, **kwargs)
        return before, before * 50

    monkeypatch.setattr(distill_module, "fit_layer", exploding)
    result = run("convert", work["model"], *TINY_ARGS, "--data", work["text"], "--json")
    assert result.exit_code == 0, result.output
    shown = [line for line in result.stderr.splitlines() if "explode" in line]
    assert len(shown) == 2 and all(line.startswith("warning: layer ") for line in shown), result.stderr
    with pytest.warns(safety.CcliWarning, match="end-to-end training made its error explode"):
        safety.warn_if_exploded({"e2e_loss_first": 0.5, "e2e_loss_last": 4.5e8})


def test_a_non_finite_fidelity_is_an_error():
    with pytest.raises(CcliError, match="fidelity is not finite"):
        safety.check_finite(torch.nn.Linear(2, 2), {"embedding_cosine": float("nan")})


def test_a_converted_directory_checks_its_tokenizer_too(work, tmp_path):
    import shutil

    foreign = tmp_path / "foreign"
    shutil.copytree(work["converted"], foreign)
    for name in ("tokenizer.json", "vocab.txt"):  # the vocabulary is gone, its config stays
        (foreign / name).unlink(missing_ok=True)
    with pytest.raises(CcliError, match="its tokenizer has .* tokens but the model has 100 token embeddings"):
        ccli.load(str(foreign))
    # a model saved without a tokenizer (the Python API allows it) reloads without one, not with a stand-in
    for name in safety.TOKENIZER_FILES + ("special_tokens_map.json",):
        (foreign / name).unlink(missing_ok=True)
    from ccli.hub import load

    assert load(str(foreign)).tokenizer is None
