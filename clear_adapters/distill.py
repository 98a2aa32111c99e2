"""Distillation: make a CLEAR adapter for any FLUX-family pipeline by training its attention projections.

CLEAR's recipe (arXiv 2412.16112, §3 of the project's CLEAR reference): the teacher is the base model with
full attention, the student the same model with the CLEAR pattern; only ``to_q``, ``to_k``, ``to_v`` and
``to_out.0`` of every attention layer (+ the pooling weights when ``down_factor > 1``) train, on latents
the teacher generated itself, with ``L_fm + 0.5 L_pred + 0.5 L_attn``:

* ``L_fm``: flow matching on the data (``x_t = (1 - t) x_0 + t eps``, target ``eps - x_0``, t uniform);
* ``L_pred``: MSE between student and teacher predictions at the same ``x_t``;
* ``L_attn``: MSE between student and teacher attention outputs of the single-stream blocks whose index
  is a multiple of ``attn_loss_every`` (4).

Teacher and student share one copy of every frozen weight (:class:`~clear_adapters.student.TeacherStudent`).
The output directory is an ordinary adapter (``clear_config.json`` + safetensors + card, so
:func:`clear_adapters.load` and :func:`clear_adapters.push` take it as it is) plus ``report.json``,
``loss.png``, ``checkpoint/`` (for ``resume``) and ``cache/`` (the generated data).

``accelerate`` places the model; under ``accelerate launch`` with several processes the model is
wrapped in DistributedDataParallel and each process draws its own batches. CPU training runs the
``tiled`` kernel's differentiable path (FlexAttention has no CPU backward); CUDA runs ``flex`` under
bf16 autocast.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import distill_data as data_mod
from .distill_report import PLOT_NAME, REPORT_NAME, draw_loss_plot, write_report
from .distill_state import CHECKPOINT_DIR, find_checkpoint, load_checkpoint, read_state, save_checkpoint
from .errors import DistillationError, IncompatibleModelError

logger = logging.getLogger("clear_adapters")

OPTIMIZERS = ("adamw", "prodigy")
DEFAULT_LR = {"adamw": 1e-4, "prodigy": 1.0}
LOSS_TERMS = ("fm", "pred", "attn")
CACHE_DIR = "cache"
#: settings that do not change the trained weights, so a resumed run may change them
_RESUMABLE_CHANGES = ("steps", "checkpoint_every", "gradient_checkpointing")


# ---------------------------------------------------------------------------------------------- settings
def _resolutions(value) -> tuple[tuple[int, int], ...]:
    """``1024``, ``(768, 1024)`` or a list of those -> ((height, width), ...) in pixels."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value, value),)
    items = list(value)
    if len(items) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return ((items[0], items[1]),)
    out = []
    for item in items:
        pair = (item, item) if isinstance(item, int) else tuple(item)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise DistillationError(f"resolution must be pixels (height, width), got {item!r}")
        out.append((int(pair[0]), int(pair[1])))
    if not out:
        raise DistillationError("resolution: give at least one (height, width)")
    return tuple(out)


@dataclass(frozen=True)
class DistillSettings:
    """What a distillation run does. Everything but ``steps``/``checkpoint_every``/``gradient_checkpointing``
    must match when resuming.

    Args:
        window_size, down_factor, backend: the CLEAR pattern of the student.
        resolution: training size(s) in pixels: ``1024``, ``(h, w)`` or a list (mixed sizes and aspect
            ratios: samples and batches of each size).
        steps: optimizer steps (the run continues to this total when resuming).
        batch_size, grad_accum: samples per micro-batch and micro-batches per step (per process).
        lr: learning rate (default 1e-4 for AdamW, 1.0 for Prodigy); constant.
        optimizer: ``"adamw"`` or ``"prodigy"`` (needs ``pip install prodigyopt``).
        weight_decay, grad_clip: AdamW/Prodigy weight decay; gradient-norm clip (0 disables).
        loss_weights: ``(fm, pred, attn)``; the paper's ``(1, 0.5, 0.5)``.
        attn_loss_every: ``L_attn`` on single-stream blocks ``0, k, 2k, ...``.
        guidance, max_sequence_length, generation_steps: default to the pipeline's own ``__call__``
            defaults (FLUX.1-dev: 3.5, 512 tokens, 28 steps); used for data generation and training.
        samples: self-generated training samples (default: one per prompt and resolution).
        eval_samples: held-out items (prompt, seed, timestep) for ``error_before``/``error_after``.
        seed: data order, noise, timesteps and generation seeds all derive from it.
        checkpoint_every: steps between checkpoints (default 500; one is always written at the end).
        gradient_checkpointing: diffusers' block-level activation checkpointing.
    """

    window_size: float
    down_factor: int = 1
    resolution: tuple = ((1024, 1024),)
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float | None = None
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_weights: tuple = (1.0, 0.5, 0.5)
    attn_loss_every: int = 4
    guidance: float | None = None
    max_sequence_length: int | None = None
    generation_steps: int | None = None
    samples: int | None = None
    eval_samples: int = 8
    seed: int = 0
    checkpoint_every: int | None = None
    gradient_checkpointing: bool = True
    backend: str = "auto"

    def __post_init__(self):
        from .config import BACKENDS, ClearConfig

        try:
            ClearConfig(self.window_size, self.down_factor)
        except ValueError as exc:
            raise DistillationError(str(exc)) from None
        object.__setattr__(self, "resolution", _resolutions(self.resolution))
        weights = tuple(float(w) for w in self.loss_weights)
        if len(weights) != 3 or any(w < 0 or not math.isfinite(w) for w in weights) or not any(weights):
            raise DistillationError(f"loss_weights must be three numbers >= 0 (fm, pred, attn), not all zero; "
                                    f"got {self.loss_weights!r}")
        object.__setattr__(self, "loss_weights", weights)
        for name in ("steps", "batch_size", "grad_accum", "eval_samples", "attn_loss_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DistillationError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("samples", "checkpoint_every", "generation_steps", "max_sequence_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise DistillationError(f"{name} must be an integer >= 1 (or None for the default), got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise DistillationError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise DistillationError(f"lr must be a positive number, got {self.lr!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise DistillationError("weight_decay and grad_clip must be >= 0")
        if self.backend not in BACKENDS:
            raise DistillationError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        make_optimizer(self.optimizer, [torch.nn.Parameter(torch.zeros(1))], 1.0, 0.0)  # is it installed?

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["resolution"] = [list(r) for r in self.resolution]
        out["loss_weights"] = dict(zip(LOSS_TERMS, self.loss_weights))
        out["lr"] = self.learning_rate
        return out


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    """AdamW, or Prodigy when ``prodigyopt`` is importable (a clear error otherwise)."""
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise DistillationError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt "
                                    "(or choose optimizer 'adamw')") from None
        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _call_default(pipe, name: str, fallback):
    """A default of the pipeline's ``__call__`` (what a user gets from ``pipe(prompt)``)."""
    try:
        parameter = inspect.signature(pipe.__call__).parameters.get(name)
    except (TypeError, ValueError):
        parameter = None
    if parameter is None or parameter.default is inspect.Parameter.empty or parameter.default is None:
        return fallback
    return parameter.default


def pipeline_fingerprint(pipe) -> str:
    """A cheap identity of a pipeline's weights (class, shapes, and weighted sums of a few tensors per model):
    the data cache and resume checks use it to tell one base model from another."""
    import hashlib

    parts = []
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        model = getattr(pipe, name, None)
        if not isinstance(model, torch.nn.Module):
            continue
        params = list(model.parameters())
        sample = [params[0], params[len(params) // 2], params[-1]] if params else []
        sums = []
        for p in sample:
            flat = p.detach().flatten().double()
            ramp = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
            sums.append([float(flat.sum()), float((flat * ramp).sum()), list(p.shape), str(p.dtype)])
        parts.append([name, type(model).__name__, len(params), sum(p.numel() for p in params), sums])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """FLUX ``img_ids`` (N, 3) of a ``height x width`` token grid, built as FLUX pipelines build them."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, height, width, device, dtype)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None \
        and not Path(name).exists()


# ---------------------------------------------------------------------------------------------- trainer
@dataclass
class _Run:
    """Mutable state of one training run (what a checkpoint stores)."""

    step: int = 0
    history: list = field(default_factory=list)
    error_before: float | None = None
    train_time: float = 0.0
    resumed_from: int | None = None


class Distiller:
    """A distillation run on ``pipe``, step by step (:func:`distill` runs it whole).

    Construction validates everything and changes nothing. :meth:`setup` builds (or reads) the data,
    installs the student and measures ``error_before``; :meth:`train` runs to ``settings.steps``;
    :meth:`finish` writes the adapter, ``report.json`` and ``loss.png``; :meth:`close` (or leaving the
    ``with`` block) gives the pipeline back bit for bit. Between :meth:`setup` and :meth:`close` the
    pipeline's transformer IS the student (``teacher_student.teacher()`` turns it into the teacher).

    Args:
        pipe: a diffusers FLUX pipeline (text encoders, VAE and transformer; e.g. ``FluxPipeline``).
        settings: a :class:`DistillSettings`.
        out: the output directory (an adapter directory when done).
        prompts: training prompts (default: a built-in list of 48 varied prompts); ``eval_prompts``
            the held-out ones (default: every 10th of ``prompts``, or a built-in held-out list).
        data_dir: train on these images (+ ``.txt`` captions) instead of self-generated latents.
        cache_dir: where generated data is cached (default ``out/cache``).
        resume: a checkpoint (or an output directory holding one) to continue from.
        overwrite: allow ``out`` to hold another adapter or checkpoint (they are replaced).
        device: where to train (default: where the transformer is; under ``accelerate launch`` with
            several processes, each process's device); a pipeline moved there is moved back on close.
        progress: tqdm progress bars (default: only on a terminal).
        base_name, base_revision: how the base model is named in the provenance (e.g. the Hub id);
            a Hub id becomes the adapter's ``base_model``.
    """

    def __init__(self, pipe, settings: DistillSettings, *, out, prompts=None, eval_prompts=None, data_dir=None,
                 cache_dir=None, resume=None, overwrite: bool = False, device=None, progress: bool | None = None,
                 base_name: str | None = None, base_revision: str | None = None):
        from .api import flux_models
        from .student import check_distillable

        self.started = time.perf_counter()
        self.pipe = pipe
        self.settings = settings
        self.out = Path(out)
        self.quiet = None if progress is None else not progress
        if isinstance(pipe, torch.nn.Module):
            raise IncompatibleModelError(f"distillation needs the whole FLUX pipeline (text encoders, VAE, "
                                         f"transformer) to make its data, not a bare {type(pipe).__name__}")
        self.transformer = flux_models(pipe, controlnet=False)[0][1]
        if not callable(getattr(pipe, "encode_prompt", None)) or getattr(pipe, "vae", None) is None:
            raise IncompatibleModelError(f"{type(pipe).__name__} has a FLUX transformer but not FLUX's text encoders "
                                         "and VAE (encode_prompt, vae); distillation makes its data with them")
        check_distillable(self.transformer)
        forward = inspect.signature(self.transformer.forward).parameters
        if not {"pooled_projections", "txt_ids", "img_ids", "guidance"} <= set(forward):
            raise IncompatibleModelError(f"{type(self.transformer).__name__} does not take FLUX's inputs "
                                         "(pooled_projections, txt_ids, img_ids, guidance)")
        self.pixels_per_token = 2 * int(pipe.vae_scale_factor)
        self.grids = self._check_resolutions()
        self.guidance = settings.guidance if settings.guidance is not None else \
            float(_call_default(pipe, "guidance_scale", 3.5))
        self.max_sequence_length = settings.max_sequence_length or int(_call_default(pipe, "max_sequence_length", 512))
        self.generation_steps = settings.generation_steps or int(_call_default(pipe, "num_inference_steps", 28))
        self.uses_guidance = bool(getattr(self.transformer.config, "guidance_embeds", False))
        singles = len(getattr(self.transformer, "single_transformer_blocks", []))
        self.attn_layers = [f"single_transformer_blocks.{i}.attn" for i in range(singles)
                            if i % settings.attn_loss_every == 0]
        if settings.loss_weights[2] > 0 and not self.attn_layers:
            raise DistillationError(f"{type(self.transformer).__name__} has no single-stream blocks for the "
                                    "attention loss; set its weight to 0")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is not None:
            if prompts is not None or settings.samples is not None:
                raise DistillationError("prompts and samples are for self-generated data; with data_dir (images) "
                                        "give neither")
            split = data_mod.split_held_out(data_mod.list_images(self.data_dir), settings.eval_samples)
            self.train_images, self.eval_images, self.eval_disjoint = split
        else:
            if prompts is None:
                train_prompts, held = list(data_mod.BUILTIN_PROMPTS), list(data_mod.BUILTIN_EVAL_PROMPTS)
                self.eval_disjoint = True
            else:
                if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
                    raise DistillationError("prompts must be a list of strings")
                prompts = [p.strip() for p in prompts if p.strip()]
                if not prompts:
                    raise DistillationError("the prompt list is empty")
                train_prompts, held, self.eval_disjoint = data_mod.split_held_out(prompts, settings.eval_samples)
            if eval_prompts is not None:
                held = [p.strip() for p in eval_prompts if p.strip()]
                if not held:
                    raise DistillationError("the held-out prompt list is empty")
                self.eval_disjoint = not set(held) & set(train_prompts)
            self.train_prompts, self.eval_prompts = train_prompts, held
        self.fingerprint = pipeline_fingerprint(pipe)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.out / CACHE_DIR
        self.train_key, self.eval_key = self._data_keys()
        self.checkpoint = find_checkpoint(resume) if resume is not None else None
        if self.checkpoint is not None:
            self._check_resumable(read_state(self.checkpoint))
        self._check_out(overwrite)
        self.overwrite = overwrite
        self.device = torch.device(device) if device is not None else None
        if base_name is None:  # a Hub id the pipeline was loaded from; never a local path (it would be published)
            loaded_from = getattr(getattr(pipe, "config", None), "_name_or_path", None)
            base_name = loaded_from if _is_hub_id(loaded_from) else None
        elif not _is_hub_id(base_name) and Path(base_name).exists():
            base_name = Path(base_name).resolve().name
        if base_revision is None and _is_hub_id(base_name):  # the commit the Hub cache loaded it from
            from .hub import commit_of

            loaded = getattr(self.transformer.config, "_name_or_path", None)
            base_revision = commit_of(loaded, "transformer") if loaded and Path(loaded).is_dir() else None
        self.base_name = base_name
        self.base_revision = base_revision
        self.run = _Run()
        self.teacher_student = None
        self._hooks = []
        self._captured: dict[str, torch.Tensor] | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------ validation
    def _check_resolutions(self) -> list[tuple[int, int]]:
        ppt, d, r = self.pixels_per_token, self.settings.down_factor, self.settings.window_size
        grids = []
        for height, width in self.settings.resolution:
            if height % (ppt * d) or width % (ppt * d):
                unit = ppt * d
                raise DistillationError(f"resolution {height}x{width} px: height and width must be multiples of "
                                        f"{unit} px for this pipeline ({ppt} px per token"
                                        + (f", down factor {d}" if d > 1 else "") + ")")
            gh, gw = height // ppt, width // ppt
            if (gh - 1) ** 2 + (gw - 1) ** 2 < r * r:
                raise DistillationError(
                    f"window {r:g} does not fit resolution {height}x{width} px: its {gh}x{gw} token grid lies "
                    f"entirely inside the window, so CLEAR equals full attention there and there is nothing to "
                    f"distil; use a window below {math.hypot(gh - 1, gw - 1):.1f} tokens or a larger resolution")
            grids.append((gh, gw))
        return grids

    def _data_keys(self) -> tuple[dict, dict]:
        s = self.settings
        dtype = str(self.transformer.dtype)
        common = {"base": self.fingerprint, "grids": [list(g) for g in self.grids], "dtype": dtype,
                  "max_sequence_length": self.max_sequence_length}
        if self.data_dir is not None:
            def files(items):
                return [[p.name, p.stat().st_size, p.stat().st_mtime_ns, caption] for p, caption in items]

            return ({"kind": "images", **common, "files": files(self.train_images)},
                    {"kind": "images", **common, "files": files(self.eval_images)})
        gen = {"steps": self.generation_steps, "guidance": self.guidance, "seed": s.seed}
        count = s.samples or len(self.train_prompts) * len(self.grids)
        return ({"kind": "self-generate", **common, **gen, "prompts": self.train_prompts, "count": count},
                {"kind": "self-generate-eval", **common, **gen, "prompts": self.eval_prompts,
                 "count": s.eval_samples})

    def signature(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        settings = {k: v for k, v in self.settings.to_dict().items() if k not in _RESUMABLE_CHANGES}
        return {"settings": settings, "base": self.fingerprint,
                "data": data_mod.cache_path("", "d", self.train_key).name,
                "eval": data_mod.cache_path("", "e", self.eval_key).name}

    def _check_resumable(self, state: dict) -> None:
        mine, theirs = self.signature(), state.get("signature", {})
        if mine == theirs:
            if state.get("step", 0) > self.settings.steps:
                raise DistillationError(f"checkpoint {self.checkpoint} is at step {state['step']}, beyond steps="
                                        f"{self.settings.steps}; ask for at least {state['step']} steps")
            return
        diffs = []
        for key in ("base", "data", "eval"):
            if mine.get(key) != theirs.get(key):
                diffs.append({"base": "another base model", "data": "other training data",
                              "eval": "other evaluation data"}[key])
        for key, value in mine["settings"].items():
            if theirs.get("settings", {}).get(key) != value:
                diffs.append(f"{key} {theirs.get('settings', {}).get(key)!r} -> {value!r}")
        raise DistillationError(f"checkpoint {self.checkpoint} was made with other settings ({'; '.join(diffs)}); "
                                "resume with the settings it was made with (only steps, checkpoint_every and "
                                "gradient_checkpointing may change)")

    def _check_out(self, overwrite: bool) -> None:
        from .artifact import CONFIG_NAME

        if self.out.exists() and not self.out.is_dir():
            raise DistillationError(f"output {self.out} exists and is not a directory")
        held = [name for name in (CONFIG_NAME, CHECKPOINT_DIR, REPORT_NAME) if (self.out / name).exists()]
        own = self.checkpoint is not None and self.checkpoint.resolve() == (self.out / CHECKPOINT_DIR).resolve()
        if held and not own and not overwrite:
            raise DistillationError(f"{self.out} already holds {'another adapter' if CONFIG_NAME in held else 'a run'} "
                                    f"({', '.join(held)}); choose another output directory, resume from it, or pass "
                                    "overwrite=True (--overwrite) to replace it")

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> "Distiller":
        """Data (generated or cached), student installed, evaluation set and ``error_before`` (or the
        checkpoint's state when resuming)."""
        from accelerate import Accelerator

        from .student import TeacherStudent

        s = self.settings
        # on a CPU-only machine accelerate recognises a multi-process launch (torchrun) only with cpu=True
        on_cpu = (self.device is not None and self.device.type == "cpu") or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=on_cpu)
        distributed = self.accelerator.num_processes > 1
        if distributed:
            self.device = self.accelerator.device
        elif self.device is None:
            self.device = next(self.transformer.parameters()).device
        self._moved_from = None
        if next(self.transformer.parameters()).device != self.device:
            self._moved_from = next(self.transformer.parameters()).device
            self.pipe.to(self.device)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.autocast_dtype = torch.bfloat16 if (self.device.type == "cuda"
                                                 or self.transformer.dtype in (torch.bfloat16, torch.float16)
                                                 or self.accelerator.mixed_precision == "bf16") else None
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.overwrite and self.checkpoint is None and (self.out / CHECKPOINT_DIR).exists():
                shutil.rmtree(self.out / CHECKPOINT_DIR)
        data_start = time.perf_counter()
        with self.accelerator.main_process_first():  # the main process builds the cache, the others read it
            self.train_data = self._dataset(self.train_key, "train")
            self.eval_data = self._dataset(self.eval_key, "eval")
        self.data_time = time.perf_counter() - data_start
        self._release_encoders()

        self.teacher_student = TeacherStudent(self.transformer, s.window_size, down_factor=s.down_factor,
                                              backend=s.backend)
        if s.gradient_checkpointing:
            self.teacher_student.enable_gradient_checkpointing()
        self.params = self.teacher_student.trainable_parameters()
        self.optimizer = make_optimizer(s.optimizer, self.params, s.learning_rate, s.weight_decay)
        self.model = self.accelerator.prepare_model(self.transformer) if distributed else self.transformer
        self._install_capture()
        eval_start = time.perf_counter()
        self.eval_batches = data_mod.eval_batches(self.eval_data, s.eval_samples, s.batch_size, s.seed)
        with torch.no_grad(), self.teacher_student.teacher():
            self.eval_targets = [self._predict(b, self.eval_data).float().cpu() for b in self.eval_batches]
        if self.checkpoint is not None:
            trainable, state = load_checkpoint(self.checkpoint, optimizer=self.optimizer, rank=self.rank)
            self.teacher_student.load_trainable_state(trainable)
            self.run = _Run(step=state["step"], history=state["history"], error_before=state["error_before"],
                            train_time=state["train_time_s"], resumed_from=state["step"])
        else:
            self.run.error_before = self.evaluate()
        self.eval_time = time.perf_counter() - eval_start
        return self

    def _dataset(self, key: dict, tag: str) -> data_mod.DataSet:
        path = data_mod.cache_path(self.cache_dir, tag, key)
        cached = data_mod.load_cached(path)
        if cached is not None:
            logger.info("distill: %s data from cache %s", tag, path)
            return cached
        s = self.settings
        if self.data_dir is not None:
            images = self.train_images if tag == "train" else self.eval_images
            built = data_mod.encode_images(self.pipe, images, self.grids, max_sequence_length=self.max_sequence_length,
                                           device=self.device, batch_size=s.batch_size, quiet=self.quiet)
            built.description = {"source": "images", "images": len(images), "captions": len(built.prompts)}
        else:
            built = data_mod.self_generate(self.pipe, key["prompts"], key["count"], self.grids, seed=s.seed,
                                           steps=self.generation_steps, guidance=self.guidance,
                                           max_sequence_length=self.max_sequence_length, device=self.device,
                                           batch_size=s.batch_size, quiet=self.quiet, tag=tag)
            built.description = {"source": "self-generated", "prompts": len(built.prompts),
                                 "samples": key["count"], "generation_steps": self.generation_steps,
                                 "guidance": self.guidance}
        built.description.update(resolutions=[[h * self.pixels_per_token, w * self.pixels_per_token]
                                              for h, w in self.grids], max_sequence_length=self.max_sequence_length)
        if not self.accelerator.is_main_process:
            return built
        data_mod.save_cached(path, built)
        # train on what the cache holds, so a first run and a resumed one see identical tensors
        reread = data_mod.load_cached(path) or built
        reread.from_cache = False
        return reread

    def _release_encoders(self) -> None:
        """On a GPU, the text encoders and the VAE are not needed once the data exists: park them on the CPU."""
        self._parked = []
        if self.device.type != "cuda":
            return
        for name in ("text_encoder", "text_encoder_2", "vae"):
            model = getattr(self.pipe, name, None)
            if isinstance(model, torch.nn.Module):
                self._parked.append((model, next(model.parameters()).device))
                model.to("cpu")
        torch.cuda.empty_cache()

    def _install_capture(self) -> None:
        for name in self.attn_layers:
            module = self.transformer.get_submodule(name)
            self._hooks.append(module.register_forward_hook(self._capture_hook(name)))

    def _capture_hook(self, name):
        def hook(module, args, output):
            if self._captured is not None:  # only during the forward passes of the loss (not recomputation)
                self._captured[name] = torch.cat(output, 1) if isinstance(output, tuple) else output
        return hook

    # ------------------------------------------------------------------------------------------ forward
    def _predict(self, batch: data_mod.Batch, dataset: data_mod.DataSet, *, model=None, clean=None):
        """The model's velocity prediction for a batch (its ``x_t`` built from the batch's noise and t)."""
        bucket = dataset.buckets[batch.bucket]
        dtype = self.transformer.dtype
        rows = bucket.prompt_index[batch.index]
        embeds = dataset.prompt_embeds[rows].to(self.device)
        x0 = bucket.latents[batch.index].to(self.device, torch.float32) if clean is None else clean
        t = batch.timesteps.to(self.device)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * batch.noise.to(self.device)
        guidance = torch.full((len(rows),), self.guidance, device=self.device) if self.uses_guidance else None
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with autocast:
            out = (model or self.transformer)(
                hidden_states=x_t.to(dtype), timestep=t.to(dtype), guidance=guidance,
                pooled_projections=dataset.pooled_embeds[rows].to(self.device),
                encoder_hidden_states=embeds, txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device,
                                                                  dtype=embeds.dtype),
                img_ids=_image_ids(bucket.height, bucket.width, self.device, embeds.dtype), return_dict=False)[0]
        return out

    def loss(self, batch: data_mod.Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """``w_fm L_fm + w_pred L_pred + w_attn L_attn`` of one micro-batch (student graph attached)."""
        w_fm, w_pred, w_attn = self.settings.loss_weights
        bucket = self.train_data.buckets[batch.bucket]
        x0 = bucket.latents[batch.index].to(self.device, torch.float32)
        want_attn = w_attn > 0
        with torch.no_grad(), self.teacher_student.teacher():
            self._captured = {} if want_attn else None
            teacher = self._predict(batch, self.train_data, clean=x0).float()
            teacher_attn, self._captured = self._captured, None
        self._captured = {} if want_attn else None
        try:
            student = self._predict(batch, self.train_data, model=self.model, clean=x0).float()
            student_attn = self._captured
        finally:
            self._captured = None
        target = batch.noise.to(self.device) - x0
        terms = {"fm": torch.nn.functional.mse_loss(student, target),
                 "pred": torch.nn.functional.mse_loss(student, teacher)}
        if want_attn:
            terms["attn"] = torch.stack([torch.nn.functional.mse_loss(student_attn[k].float(), teacher_attn[k].float())
                                         for k in self.attn_layers]).mean()
        total = sum(w * terms[name] for name, w in zip(LOSS_TERMS, (w_fm, w_pred, w_attn)) if w > 0)
        return total, {"total": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean squared difference of student and teacher predictions over the held-out items."""
        total, count = 0.0, 0
        for batch, target in zip(self.eval_batches, self.eval_targets):
            student = self._predict(batch, self.eval_data).float().cpu()
            total += float((student - target).square().mean(dim=tuple(range(1, target.ndim))).sum())
            count += target.shape[0]
        return total / count

    # ------------------------------------------------------------------------------------------ train
    def train(self, until: int | None = None) -> "Distiller":
        """Optimizer steps up to ``until`` (default ``settings.steps``), with a checkpoint every
        ``checkpoint_every`` steps."""
        from tqdm.auto import tqdm

        s = self.settings
        until = s.steps if until is None else min(until, s.steps)
        every = s.checkpoint_every or 500
        distributed = self.world > 1
        bar = tqdm(total=s.steps, initial=self.run.step, desc="distill", disable=self.quiet, dynamic_ncols=True)
        try:
            while self.run.step < until:
                start = time.perf_counter()
                logged: dict[str, float] = {}  # terms not computed (attn with weight 0) stay None
                for micro in range(s.grad_accum):
                    position = (self.run.step * s.grad_accum + micro) * self.world + self.rank
                    batch = data_mod.batch_for(self.train_data, s.batch_size, s.seed, position)
                    last = micro == s.grad_accum - 1
                    with self.model.no_sync() if distributed and not last else nullcontext():
                        loss, terms = self.loss(batch)
                        (loss / s.grad_accum).backward()
                    for k, v in terms.items():
                        logged[k] = logged.get(k, 0.0) + v / s.grad_accum
                if distributed:  # pooling weights are not module parameters, so DDP does not average them
                    for w in self.teacher_student.spatial_weights.values():
                        if w.grad is not None:
                            w.grad.copy_(self.accelerator.reduce(w.grad, "mean"))
                if s.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.run.step += 1
                self.run.train_time += time.perf_counter() - start
                self.run.history.append({"step": self.run.step, **{k: logged.get(k) for k in ("total", *LOSS_TERMS)}})
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in logged.items() if v}, refresh=False)
                if self.run.step % every == 0 and self.run.step < s.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self

    def save_checkpoint(self) -> Path:
        """Write ``out/checkpoint`` (trainable weights, optimizer, RNG states, step/data position, history)."""
        state = {"step": self.run.step, "data_position": self.run.step * self.settings.grad_accum * self.world,
                 "history": self.run.history, "error_before": self.run.error_before,
                 "train_time_s": self.run.train_time, "signature": self.signature()}
        path = self.out / CHECKPOINT_DIR
        if self.accelerator.is_main_process:
            path = save_checkpoint(self.out, trainable=self.teacher_student.trainable_state(),
                                   optimizer=self.optimizer, state=state, rank=self.rank)
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            save_checkpoint(self.out, trainable={}, optimizer=None, state=state, rank=self.rank, write_shared=False)
        self.accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------------------ finish
    def finish(self) -> dict:
        """Final checkpoint, ``error_after``, then the adapter, ``report.json`` and ``loss.png``; returns the report."""
        from . import __version__
        from .artifact import save_adapter

        s = self.settings
        self.save_checkpoint()
        eval_start = time.perf_counter()
        error_after = self.evaluate()
        self.eval_time += time.perf_counter() - eval_start
        before = self.run.error_before
        last = self.run.history[-1] if self.run.history else {}
        tail = self.run.history[-10:]
        report = {
            "format": "clear-distill-report", "format_version": 1,
            "error_before": before, "error_after": error_after,
            "error_reduction": (1 - error_after / before) if before else None,
            "steps": self.run.step, "resumed_from_step": self.run.resumed_from,
            "wall_time_s": time.perf_counter() - self.started, "train_time_s": self.run.train_time,
            "seconds_per_step": self.run.train_time / self.run.step if self.run.step else None,
            "data_time_s": self.data_time, "eval_time_s": self.eval_time,
            "final_loss": {k: last.get(k) for k in ("total", *LOSS_TERMS)},
            "final_loss_mean_last_10": {k: _mean([h.get(k) for h in tail]) for k in ("total", *LOSS_TERMS)},
            "settings": s.to_dict(),
            "resolved": {"guidance": self.guidance if self.uses_guidance else None,
                         "max_sequence_length": self.max_sequence_length,
                         "generation_steps": self.generation_steps, "pixels_per_token": self.pixels_per_token,
                         "attn_loss_layers": self.attn_layers},
            "data": {**self.train_data.description, "from_cache": self.train_data.from_cache,
                     "samples": len(self.train_data)},
            "eval": {**self.eval_data.description, "items": s.eval_samples, "held_out_inputs": self.eval_disjoint,
                     "timesteps": "(k + 0.5) / items", "measure": "mean over items of mean((student - teacher)^2)"},
            "base": {"name": self.base_name, "revision": self.base_revision, "fingerprint": self.fingerprint},
            "device": str(self.device), "autocast": str(self.autocast_dtype) if self.autocast_dtype else None,
            "processes": self.world,
            "versions": {"clear-adapters": __version__, "torch": torch.__version__, **_versions()},
            "loss_history": self.run.history,
        }
        if self.accelerator.is_main_process:
            grids = sorted(self.grids, key=lambda g: g[0] * g[1])
            biggest = [grids[-1][0] * self.pixels_per_token, grids[-1][1] * self.pixels_per_token]
            provenance = {
                "method": "clear-adapters distill (CLEAR recipe, arXiv 2412.16112)",
                "base": self.base_name or "unnamed pipeline", "steps": self.run.step,
                "loss_weights": report["settings"]["loss_weights"], "optimizer": s.optimizer,
                "lr": s.learning_rate, "batch": f"{s.batch_size} x {s.grad_accum} accumulation x {self.world} processes",
                "data": report["data"], "error_before": before, "error_after": error_after,
                "saved_by": f"clear-adapters {__version__}"}
            with self.teacher_student.exported():
                save_adapter(self.teacher_student.handle, self.out,
                             base_model=self.base_name if _is_hub_id(self.base_name) else None,
                             base_revision=self.base_revision, trained_resolution=biggest,
                             provenance=provenance, overwrite=True)
            write_report(self.out, report)
            reduction = report["error_reduction"]
            draw_loss_plot(self.run.history, self.out / PLOT_NAME,
                           labels={k: f"{k} (x{w:g})" for k, w in zip(LOSS_TERMS, s.loss_weights)},
                           title=f"CLEAR r={s.window_size:g} distillation: error vs teacher {before:.3g} -> "
                                 f"{error_after:.3g}" + (f" ({reduction:.0%} lower)" if reduction is not None else ""))
        self.accelerator.wait_for_everyone()
        return report

    # ------------------------------------------------------------------------------------------ close
    def close(self) -> None:
        """Give the pipeline back as it was: original weights, processors, flags and device placement."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        if getattr(self, "model", None) is not None and self.model is not self.transformer:
            self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
        if self.teacher_student is not None:
            self.teacher_student.close()
        for model, device in getattr(self, "_parked", []):
            model.to(device)
        if getattr(self, "_moved_from", None) is not None:
            self.pipe.to(self._moved_from)

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_all(self) -> dict:
        """setup, train, finish (the whole run); returns the report."""
        self.setup()
        self.train()
        return self.finish()


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _versions() -> dict:
    import diffusers

    out = {"diffusers": diffusers.__version__}
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def distill(pipe, window_size: float, *, out, prompts=None, eval_prompts=None, data_dir=None, cache_dir=None,
            resume=None, overwrite: bool = False, device=None, progress: bool | None = None,
            base_name: str | None = None, base_revision: str | None = None, **settings) -> dict:
    """Distil a CLEAR adapter for ``pipe`` into ``out``; returns the report (also written to ``out/report.json``).

    ``pipe`` is any diffusers FLUX pipeline object (built in code, loaded from a directory or the Hub);
    it is given back unchanged. Pixels per token and the text length come from the pipeline and the
    prompts, never from constants. Example (a small model, a few minutes on a CPU)::

        report = clear_adapters.distill(pipe, window_size=4, prompts=["a red circle", ...], out="r4",
                                        resolution=[(32, 32)], steps=300, batch_size=8, lr=1e-3)
        print(report["error_before"], "->", report["error_after"])
        clear_adapters.load("r4", pipe)                         # the distilled adapter
        clear_adapters.push("r4", "me/clear-my-model-r4")     # publish it

    Keyword arguments other than those of :class:`Distiller` are :class:`DistillSettings` fields
    (``resolution``, ``steps``, ``batch_size``, ``grad_accum``, ``lr``, ``optimizer``, ``down_factor``,
    ``loss_weights``, ``seed``, ...). The output directory then holds the adapter (``clear_config.json``,
    weights, ``README.md``), ``report.json`` (``error_before``/``error_after``: mean squared difference of
    student and teacher predictions on held-out prompts, seeds and timesteps, measured the same way
    before and after training; steps, times, final loss terms), ``loss.png``, ``checkpoint/`` and
    ``cache/``.
    """
    unknown = set(settings) - {f.name for f in fields(DistillSettings)}
    if unknown:
        raise TypeError(f"distill() got unknown arguments: {', '.join(sorted(unknown))}")
    run = Distiller(pipe, DistillSettings(window_size, **settings), out=out, prompts=prompts,
                    eval_prompts=eval_prompts, data_dir=data_dir, cache_dir=cache_dir, resume=resume,
                    overwrite=overwrite, device=device, progress=progress, base_name=base_name,
                    base_revision=base_revision)
    with run:
        return run.run_all()
