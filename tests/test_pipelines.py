"""The one pipeline resolver every command uses."""

import pytest

from clear_adapters.errors import AdapterNotFoundError
from clear_adapters.pipelines import builtin_names, load_pipeline


def test_tiny_is_builtin_and_loads():
    pipe = load_pipeline("tiny")
    assert "tiny" in builtin_names()
    assert type(pipe).__name__ == "FluxPipeline"


def test_saved_directory_round_trips(tmp_path):
    import torch

    load_pipeline("tiny").save_pretrained(tmp_path / "p")
    pipe = load_pipeline(tmp_path / "p", dtype="float32")
    assert pipe.transformer.dtype == torch.float32


@pytest.mark.parametrize("bad", ["./does/not/exist", "no-such-builtin", "a/b/c"])
def test_unknown_sources_are_clear_errors(bad):
    with pytest.raises(AdapterNotFoundError, match="neither a built-in"):
        load_pipeline(bad)
