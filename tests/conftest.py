import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_report_header(config):
    from ccli.kernels.native import REQUIRE_ENV, native_required

    if native_required():
        return f"{REQUIRE_ENV}=1: a native kernel that does not build fails its tests (no fallback, no skip)"
    return f"{REQUIRE_ENV} unset: without a compiler the native kernel tests skip and the ops use the reference"


@pytest.fixture(scope="session")
def minilm():
    """The embedded default model, loaded once per test session."""
    from ccli.hub import load

    return load("minilm")


# Tiny random models saved with save_pretrained next to the embedded model's WordPiece tokenizer
# (vocabulary 30522), so that convert, profile, bench and compare run on them as on any checkpoint.
EMBEDDED_VOCAB = 30522


def _save_tiny(model, path) -> str:
    from transformers import AutoTokenizer

    from ccli.hub import embedded_model_dir

    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(embedded_model_dir())).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    """A tiny random BERT directory (2 blocks, hidden 32, FFN 64) with a real tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=EMBEDDED_VOCAB)
    return _save_tiny(BertModel(cfg).eval(), tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random LLaMA directory (2 blocks, gated FFN of 64) with a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=EMBEDDED_VOCAB, pad_token_id=0)
    return _save_tiny(LlamaForCausalLM(cfg).eval(), tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any layer starts training: the check under test must come first."""
    from ccli import distill as distill_module

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the check")

    monkeypatch.setattr(distill_module, "fit_layer", refuse)
