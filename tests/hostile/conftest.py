"""Fixtures of the hostile-input tests: one tiny pipeline for the whole package, rebuilt only if a test
left it changed (each test asserts it did not), and the adapter files the tests start from."""

from __future__ import annotations

import pytest

import clear_adapters
from clear_adapters.testing import tiny_flux_pipeline, write_reference_checkpoint

from ._helpers import snapshot

BASE = "black-forest-labs/FLUX.1-dev"
WEIGHTS = "clear_adapter.safetensors"


class _Shared:
    pipe = None
    pristine = None


@pytest.fixture
def pipe():
    """The shared tiny FluxPipeline; replaced by a fresh one after a test that left it changed."""
    if _Shared.pipe is None:
        _Shared.pipe = tiny_flux_pipeline(0)
        _Shared.pristine = snapshot(_Shared.pipe)
    yield _Shared.pipe
    after = snapshot(_Shared.pipe)
    if after.keys() != _Shared.pristine.keys() or any(
            (a[:4] != b[:4] or not a[4].equal(b[4])) if k[1] != "module" else a != b
            for k, a, b in ((k, after[k], _Shared.pristine[k]) for k in after)):
        _Shared.pipe = None  # the test failed and left it changed: do not let that cascade


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries 5xx answers with exponential backoff (1+2+4+8+8 s): keep the retries, not the waits."""
    import huggingface_hub.utils._http as http

    slept = []
    monkeypatch.setattr(http.time, "sleep", slept.append)
    return slept


@pytest.fixture(scope="session")
def good(tmp_path_factory):
    """A valid upstream-format checkpoint (window 3, header records it) for the tiny transformer."""
    return write_reference_checkpoint(tmp_path_factory.mktemp("hostile") / "r3.safetensors",
                                      tiny_flux_pipeline(0).transformer, 3)


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory, good):
    """A complete adapter directory (clear_config.json, weights, card) saved from ``good``."""
    model = tiny_flux_pipeline(0).transformer
    handle = clear_adapters.load(good, model, window_size=3)
    directory = clear_adapters.save_adapter(handle, tmp_path_factory.mktemp("hostile") / "adapter", base_model=BASE)
    clear_adapters.unload(model)
    return directory
