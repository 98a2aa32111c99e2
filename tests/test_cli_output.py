"""What the CLI prints: third-party warnings hidden unless -v, ours always; --threads applies per command."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from clear_adapters.cli import main
from clear_adapters.commands.common import third_party_quiet
from clear_adapters.errors import ClearPersistenceWarning


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_diffusers_warnings_hidden_by_default_and_shown_with_verbose(tmp_path, monkeypatch):
    seen = {}

    def set_threads(n):  # what --threads asks torch for, recorded (the real call would slow the suite)
        seen.setdefault("threads", []).append(n)

    records = Records()
    flux_logger = logging.getLogger("diffusers.pipelines.flux.pipeline_flux")
    flux_logger.addHandler(records)
    try:
        # 66 px is not a multiple of the tiny pipeline's 4 px per token: diffusers warns and resizes
        argv = ["generate", "--model", "tiny", "--adapter", "none", "--prompt", "a red house", "--height", "66",
                "--width", "66", "--steps", "1", "--out", str(tmp_path / "x.png")]
        threads = torch.get_num_threads()
        monkeypatch.setattr(torch, "set_num_threads", set_threads)
        assert main(argv + ["--threads", "1"]) == 0
        assert not any("divisible" in m for m in records.messages)
        assert main(["-v"] + argv) == 0
        assert any("divisible" in m for m in records.messages)
    finally:
        flux_logger.removeHandler(records)
    assert seen["threads"] == [1, threads]  # set for the command, restored after it


def test_quiet_filters_third_party_warnings_but_not_ours():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with third_party_quiet(False):
            warnings.warn("a library's future change", FutureWarning)
            warnings.warn("a library's deprecation", DeprecationWarning)
            warnings.warn("CLEAR is installed", ClearPersistenceWarning)
        assert [w.category for w in caught] == [ClearPersistenceWarning]
        with third_party_quiet(True):
            warnings.warn("shown with -v", FutureWarning)
        assert caught[-1].category is FutureWarning
