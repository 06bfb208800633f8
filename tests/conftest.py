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
