"""One FLUX transformer that is both the distillation teacher and the CLEAR student.

The student differs from the teacher only in the attention projections (``to_q``, ``to_k``, ``to_v`` and,
in double blocks, ``to_out.0``; plus the pooling weights when ``down_factor > 1``) and in the attention
processors. So :class:`TeacherStudent` keeps ONE copy of every other weight: it installs CLEAR with
:func:`clear_adapters.attach`, gives each of those projections a trainable copy of its weight and bias,
and swaps Parameter objects rather than models:

* student mode (the resting state, what the optimizer and ``accelerate`` see): the trainable copies sit
  in the projections and the CLEAR processors run;
* :meth:`TeacherStudent.teacher` (a context): the original Parameters are back and the stock processors
  run (:func:`clear_adapters.processors.suspended`), i.e. exactly the base model.

:meth:`TeacherStudent.close` puts the original Parameters, processors, ``requires_grad`` flags and
gradient-checkpointing setting back: the model is then bit for bit what it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import api, processors
from .errors import ClearAdapterError, IncompatibleModelError
from .weights import PROJECTIONS, attention_layers


@dataclass(eq=False)
class _Projection:
    """One projection parameter: where it lives, the frozen original and its trainable copy."""

    key: str  # published key, e.g. "transformer_blocks.0.attn.to_q.weight"
    module: torch.nn.Module
    name: str  # "weight" or "bias"
    original: torch.nn.Parameter
    trainable: torch.nn.Parameter


def check_distillable(model, name: str = "transformer") -> None:
    """Raise unless ``model``'s attention layers can be distilled as they are (nothing is changed)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    layers = attention_layers(model)
    if not layers:
        raise IncompatibleModelError(f"{name} ({type(model).__name__}) has no FLUX attention layers")
    processors.check_attachable(model, name)
    for layer, attn in layers:
        if type(attn.processor) is not FluxAttnProcessor:
            raise ClearAdapterError(f"{name}.{layer} runs {type(attn.processor).__name__}; distil the base model "
                                    "alone (unload IP-Adapters and other attention plugins first)")
        for proj in _projections(attn):
            if hasattr(attn.get_submodule(proj), "base_layer"):
                raise ClearAdapterError(f"{name}.{layer}.{proj} carries a LoRA; unload it "
                                        "(pipe.unload_lora_weights()) before distilling")


def _projections(attn) -> list[str]:
    # single blocks project after attention, outside the attention module: no to_out there
    return [p for p in PROJECTIONS if p != "to_out.0" or hasattr(attn, "to_out")]


class TeacherStudent:
    """A FLUX transformer serving as full-attention teacher and CLEAR student with shared frozen weights.

    Args:
        model: the FLUX transformer (``pipe.transformer``); changed in place until :meth:`close`.
        window_size, down_factor, backend: the CLEAR pattern the student runs.
        master_dtype: dtype of the trainable copies (float32 keeps exact updates under bf16 autocast).
    """

    def __init__(self, model: torch.nn.Module, window_size: float, *, down_factor: int = 1, backend: str = "auto",
                 master_dtype: torch.dtype = torch.float32):
        check_distillable(model)
        self.model = model
        self._requires_grad = {id(p): p.requires_grad for p in model.parameters()}
        self._checkpointing = bool(getattr(model, "gradient_checkpointing", False))
        self.handle = api.attach(window_size, model, down_factor=down_factor, backend=backend)
        self._install = self.handle._installs[0]
        self.projections: list[_Projection] = []
        self.spatial_weights: dict[str, torch.nn.Parameter] = {}
        try:  # e.g. out of memory for the copies: nothing may stay half-installed
            for layer, attn in attention_layers(model):
                for proj in _projections(attn):
                    module = attn.get_submodule(proj)
                    for pname, param in list(module.named_parameters(recurse=False)):
                        copy = torch.nn.Parameter(param.detach().to(dtype=master_dtype, copy=True))
                        self.projections.append(_Projection(f"{layer}.{proj}.{pname}", module, pname, param, copy))
                if down_factor > 1:
                    self.spatial_weights[f"{layer}.processor.spatial_weight"] = attn._clear_state.spatial_weight
        except BaseException:
            api.unload(model)
            raise
        for param in model.parameters():
            param.requires_grad_(False)
        self._mode = "teacher"
        self._closed = False
        self._use("student")

    # ------------------------------------------------------------------------------------------ modes
    def _use(self, mode: str) -> None:
        for p in self.projections:
            setattr(p.module, p.name, p.trainable if mode == "student" else p.original)
        self._mode = mode

    @contextmanager
    def teacher(self):
        """Within this context the model is the base model: original projections, stock attention."""
        if self._mode != "student":
            raise ClearAdapterError("teacher() does not nest")
        self._use("teacher")
        try:
            with processors.suspended(self._install):
                yield self.model
        finally:
            self._use("student")

    @contextmanager
    def exported(self, dtype: torch.dtype | None = None):
        """The student with its trainable weights cast to ``dtype`` (default: the originals' dtype), for saving."""
        swapped = []
        for p in self.projections:
            target = dtype or p.original.dtype
            if p.trainable.dtype != target:
                setattr(p.module, p.name, torch.nn.Parameter(p.trainable.detach().to(target), requires_grad=False))
                swapped.append(p)
        try:
            yield self.handle
        finally:
            for p in swapped:
                setattr(p.module, p.name, p.trainable)

    # ------------------------------------------------------------------------------------------ weights
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: projection copies, then pooling weights (a fixed order)."""
        return [p.trainable for p in self.projections] + list(self.spatial_weights.values())

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under their published keys (detached, on their device)."""
        state = {p.key: p.trainable.detach() for p in self.projections}
        state.update({key: w.detach() for key, w in self.spatial_weights.items()})
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (keys as :meth:`trainable_state`) into the trainable tensors; all keys required."""
        targets = {p.key: p.trainable for p in self.projections}
        targets.update(self.spatial_weights)
        missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
        if missing or extra:
            raise ClearAdapterError(f"checkpoint does not match the student (missing {missing[:2]}, extra {extra[:2]})")
        for key, target in targets.items():
            if tuple(state[key].shape) != tuple(target.shape):
                raise ClearAdapterError(f"checkpoint tensor {key} has shape {tuple(state[key].shape)}, "
                                        f"the student {tuple(target.shape)}")
            target.copy_(state[key].to(device=target.device, dtype=target.dtype))

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' block-level checkpointing (non-reentrant: the attention-output loss keeps its gradient)."""
        if not self.model.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        """Give the model back exactly as it was (original Parameters, processors, flags); idempotent."""
        if self._closed:
            return
        self._use("teacher")
        api.unload(self.model)
        for param in self.model.parameters():
            param.requires_grad_(self._requires_grad.get(id(param), True))
        if self.model.gradient_checkpointing and not self._checkpointing:
            self.model.disable_gradient_checkpointing()
        self._closed = True
