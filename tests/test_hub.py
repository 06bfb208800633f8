import pytest

from ccli import hub
from ccli.errors import CcliError


def test_default_and_alias_resolution():
    kind, location = hub.resolve(None)
    assert kind == "dir" and location.endswith("model")
    assert hub.resolve("minilm") == (kind, location)
    assert hub.resolve("bert-base") == ("hub", "bert-base-uncased")
    assert hub.resolve("someone/some-model") == ("hub", "someone/some-model")


def test_local_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve(str(tmp_path)) == ("dir", str(tmp_path.resolve()))


def test_directory_without_config(tmp_path):
    with pytest.raises(CcliError, match="holds no config.json"):
        hub.resolve(str(tmp_path))


def test_file_is_not_a_model(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(CcliError, match="is a file"):
        hub.resolve(str(f))


def test_offline_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(CcliError, match="not in the local Hugging Face cache.*--random-init"):
        hub.load("bert-base")


def test_broken_local_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(CcliError, match="cannot load a model from"):
        hub.load(str(tmp_path))


def test_random_init_needs_a_shipped_config():
    with pytest.raises(CcliError, match="--random-init needs one of the aliases"):
        hub.load("someone/some-model", random_init=True)


@pytest.mark.parametrize("alias", sorted(hub.ALIASES))
def test_every_alias_ships_a_config(alias):
    config = hub.shipped_config(alias)
    assert config.model_type in ("bert", "roberta", "distilbert", "gpt2", "llama")


def test_random_init_builds_each_family_offline():
    for alias in ("distilbert", "gpt2", "roberta-base"):
        loaded = hub.load(alias, random_init=True)
        assert loaded.random_init and loaded.source == "random-init"
