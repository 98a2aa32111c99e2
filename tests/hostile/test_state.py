"""Interrupted and failing installs: ``load`` and ``attach`` are all-or-nothing, even for Ctrl-C, and
``unload`` restores the bits that were there, whatever they were (NaN included)."""

from __future__ import annotations

import pytest
import torch

import clear_adapters
from clear_adapters import processors, weights
from clear_adapters.testing import tiny_flux_pipeline

from ._helpers import assert_unchanged, snapshot


@pytest.fixture(scope="module")
def controlnet_pipe():
    return tiny_flux_pipeline(0, controlnet=True)


def failing_on_call(monkeypatch, module, name, n, exc):
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("simulated")])
@pytest.mark.parametrize("where", [(processors, "attach", 2), (weights, "apply", 2), (weights, "_fingerprint", 32)])
def test_interrupted_load_leaves_every_model_unchanged(controlnet_pipe, good, monkeypatch, exc, where):
    before = snapshot(controlnet_pipe)
    calls = failing_on_call(monkeypatch, *where, exc)
    with pytest.raises(type(exc)):
        clear_adapters.load(good, controlnet_pipe)
    assert len(calls) >= where[2]  # the failure happened after the transformer was converted
    monkeypatch.undo()
    assert_unchanged(controlnet_pipe, before)
    clear_adapters.load(good, controlnet_pipe)  # and a retry works
    clear_adapters.unload(controlnet_pipe)
    assert_unchanged(controlnet_pipe, before)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), RuntimeError("simulated")])
def test_attach_failing_on_the_second_model_leaves_every_model_unchanged(controlnet_pipe, monkeypatch, exc):
    before = snapshot(controlnet_pipe)
    failing_on_call(monkeypatch, processors, "attach", 2, exc)
    with pytest.raises(type(exc)):
        clear_adapters.attach(3, controlnet_pipe, down_factor=2)
    monkeypatch.undo()
    assert_unchanged(controlnet_pipe, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.0])
def test_restore_is_bit_exact_whatever_was_written(value):
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight[1, 2] = float("nan")  # the original itself may hold anything
    original = layer.weight.detach().clone()
    written = torch.zeros(4, 4)
    written[0, 0] = value
    applied = weights.apply(weights.WeightPlan(writes=[("w", layer.weight, written)]))
    assert weights.restore(applied) == 0  # unchanged since writing: the original comes back
    assert torch.equal(layer.weight.detach().view(torch.int32), original.view(torch.int32))


def test_restore_keeps_a_later_change_and_detects_it_by_bits():
    layer = torch.nn.Linear(4, 4)
    original = layer.weight.detach().clone()
    applied = weights.apply(weights.WeightPlan(writes=[("w", layer.weight, torch.zeros(4, 4))]))
    with torch.no_grad():
        layer.weight[0, 0] = -0.0  # same value, other bits: a change all the same
    assert weights.restore(applied) == 1


def test_unload_after_load_is_bit_exact_for_every_model(controlnet_pipe, good):
    before = snapshot(controlnet_pipe)
    clear_adapters.load(good, controlnet_pipe)
    clear_adapters.unload(controlnet_pipe)
    assert_unchanged(controlnet_pipe, before)
