"""Test-suite set-up. Runs before any test module imports huggingface_hub (directly or via diffusers).

The local Hub-compatible server (tests/hub_server.py) is started here on 127.0.0.1 with a random port and
the Hub client is pointed at it through the environment, because huggingface_hub reads HF_ENDPOINT,
HF_HOME and friends once, at import time. Nothing in the suite reaches the network.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from hub_server import HubServer  # noqa: E402

HUB_TOKEN = "hf_TESTtoken_do_not_leak_123"
HUB = HubServer(token=HUB_TOKEN)
HUB.start()
_HF_HOME = tempfile.mkdtemp(prefix="clear-adapters-hf-home-")
os.environ.update({
    "HF_ENDPOINT": HUB.url,
    "HF_HOME": _HF_HOME,
    "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
    "HF_TOKEN": HUB_TOKEN,
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def hub_server():
    """The running local Hub server (shared by the whole session)."""
    return HUB


@pytest.fixture(scope="session")
def hub_token():
    return HUB_TOKEN


@pytest.fixture
def single_thread():
    """Run a test on one torch thread (tiny models are overhead-bound; two threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
