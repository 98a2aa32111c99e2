"""The compatibility matrix: CLEAR vs full attention across FLUX variants and plugins.

Every *case* is one pipeline set up with one plugin or variant (a LoRA, a ControlNet, an IP-Adapter,
Kontext, Fill, ...). :func:`run_matrix` runs each case on the same seed with full attention and with
CLEAR and records, per case: PSNR/SSIM of CLEAR vs full attention, the attention-FLOP fraction, the
wall-time ratio, whether the plugin changes the output (on vs off, with and without CLEAR), whether a
window covering the whole image reproduces full attention (``exact_at_full_window``), whether a small
window changes the output and whether ``unload`` gives the plugin's full-attention output back. It
writes ``matrix.json``, each case's images (its plugin inputs; full | CLEAR | difference) and, through
:mod:`clear_adapters.reports`, ``matrix.md`` (the table a model card embeds) and ``index.html``.

How cases are registered
------------------------
The core never imports plugins. Cases come from two places, collected by :func:`discover_cases`:

* every module of ``clear_adapters.integrations`` that defines ``CASES`` (an iterable of :class:`Case`);
* :func:`register_case`, for code outside this package (call it before ``run_matrix``).

A :class:`Case` has a unique ``name`` (``"<plugin>/<what>"``), the ``plugin`` it exercises and a
``prepare(ctx)`` function that receives a :class:`MatrixContext` and returns a :class:`CaseSetup`:
the pipeline with the plugin installed, the call arguments, and how to run the same call with the
plugin off. ``prepare`` raises :class:`CaseSkipped` when a resource is missing (e.g. a real pipeline
needs ``--lora PATH``); the report lists the case as skipped with that reason.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
import math
import pkgutil
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

logger = logging.getLogger("clear_adapters")

#: Window radius (tokens) that covers any image the matrix generates: CLEAR must then equal full attention.
FULL_WINDOW = 1.0e6
#: Max |difference| (images in [0, 1]) allowed for "equal" outputs, and required for "differs".
EXACT_TOLERANCE = 1e-5
DIFFERS_TOLERANCE = 1e-4
#: In bf16/fp16 full attention (SDPA/flash) and CLEAR at a full window (FlexAttention) are different kernels:
#: equal up to rounding, which sampling amplifies. Used as the default "equal" tolerance below float32.
LOW_PRECISION_EXACT_TOLERANCE = 5e-2
#: Pass thresholds of CLEAR vs full attention. The tiny pipeline has random weights and a random
#: adapter, so its numbers only guard against regressions; real models are held to published-like quality.
TINY_THRESHOLDS = {"min_psnr": 30.0, "min_ssim": 0.95}
REAL_THRESHOLDS = {"min_psnr": 14.0, "min_ssim": 0.45}
#: The trained toy (clear_adapters.toy) separates a good adapter from a bad one, so it is held to what a
#: distilled adapter must do there: PSNR vs full attention, a gain over the zero-shot pattern (same
#: window, no weights), the detector's task score kept, the plugin's effect kept, and plugin cases
#: close to the plugin-free run. Cases may tighten these (``CaseSetup.thresholds``).
#: ``max_task_drop`` 0.125: the toy's cases run 8 prompts each, so this allows one prompt of 8 (the 10-point
#: bound on 32 prompts is tests/test_toy.py's).
TOY_THRESHOLDS = {"min_psnr": 14.0, "min_ssim": 0.5, "min_gain_over_zero_shot_db": 4.0, "max_task_drop": 0.125,
                  "min_effect_ratio": 0.9, "max_psnr_drop_vs_plugin_free_db": 3.0,
                  "max_delta_deficit_vs_replace_db": 0.5}
TINY_WINDOW = 4
TINY_PROMPT = "a photo of a red house by the sea"
TOY_PROMPT = "a red circle in the top left"
REAL_PROMPT = "a photo of a red house on a hill by the sea, a tree on the right, sunny day"


class CaseSkipped(Exception):
    """Raised by ``Case.prepare`` when the case cannot run here; the message says what it needs."""


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One compatibility case.

    Args:
        name: unique id, ``"<plugin>/<what>"`` (e.g. ``"lora/clear-then-lora"``).
        plugin: the integration it exercises (``"lora"``, ``"controlnet"``, ``"ip_adapter"``, ``"variant"``).
        description: one line for the report.
        prepare: ``prepare(ctx) -> CaseSetup``; raise :class:`CaseSkipped` when something is missing.
    """

    name: str
    plugin: str
    description: str
    prepare: Callable[["MatrixContext"], "CaseSetup"]


@dataclass
class CaseSetup:
    """A prepared case: what to call and how to turn its plugin off.

    Args:
        pipe: the pipeline, plugin installed (CLEAR is installed and removed by the runner).
        call: keyword arguments of the pipeline call (prompt, image, control image, ...); the runner
            adds height, width, steps, seed and the output type.
        off: ``off(generate) -> image``: the same call with the plugin off, where
            ``generate(pipe=None, **overrides)`` runs the call (optionally on another pipeline).
            ``None`` when "off" means nothing for this case.
        off_description: what "off" means, for the report.
        off_with_clear: also run ``off`` with CLEAR installed (the plugin must still act under CLEAR).
        load_kwargs: extra :func:`clear_adapters.load` arguments (``controlnet=False``, ``weight_mode``, ``base``).
        install_clear: ``install_clear(pipe, install) -> handle`` to control the order of installation
            (e.g. remove a LoRA, call ``install()``, load the LoRA again); default: ``install()``.
        extra_checks: ``extra_checks(runner) -> {name: bool | float}`` run last (CLEAR unloaded, plugin
            on); booleans count towards pass/fail, numbers are reported.
        teardown: undo what ``prepare`` did to shared pipelines (real models are loaded once).
        notes: anything the report should say about this case.
        task: ``task(images) -> float`` in [0, 1], a detector's score of the outputs (prompt following,
            ControlNet adherence, the LoRA's attribute); scored on the full-attention, CLEAR, zero-shot
            and plugin-off outputs. The call may hold several prompts: images are then (N, 3, H, W).
        task_name: what ``task`` measures, for the report.
        thresholds: this case's own pass thresholds (override the matrix's, written into the report).
        compare_with: ``{other case: threshold key}``: this case's PSNR may be at most that many dB below
            the other case's (e.g. the delta weight mode vs replace), checked after all cases ran.
    """

    pipe: Any
    call: dict
    off: Callable | None = None
    off_description: str = ""
    off_with_clear: bool = True
    load_kwargs: dict = field(default_factory=dict)
    install_clear: Callable | None = None
    extra_checks: Callable | None = None
    teardown: Callable | None = None
    notes: str = ""
    task: Callable | None = None
    task_name: str = ""
    thresholds: dict = field(default_factory=dict)
    compare_with: dict = field(default_factory=dict)


_EXTRA_CASES: list[Case] = []


def register_case(case: Case) -> Case:
    """Add a case from outside ``clear_adapters.integrations`` (returned, so it can decorate-style chain)."""
    if not isinstance(case, Case):
        raise TypeError(f"register_case expects a clear_adapters.compat.Case, got {type(case).__name__}")
    if any(c.name == case.name for c in _EXTRA_CASES):
        raise ValueError(f"a case named {case.name!r} is already registered")
    _EXTRA_CASES.append(case)
    return case


def discover_cases() -> list[Case]:
    """All cases: ``CASES`` of every ``clear_adapters.integrations`` module, then registered ones."""
    import clear_adapters.integrations as package

    cases: list[Case] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except ImportError as exc:  # an optional dependency of one integration must not hide the others
            logger.warning("integration %s not loaded: %s", info.name, exc)
            continue
        cases.extend(getattr(module, "CASES", ()))
    cases.extend(_EXTRA_CASES)
    names = [c.name for c in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate case names: {', '.join(duplicates)}")
    return cases


TOY_CASE_PREFIX = "toy/"


def default_patterns(pipeline: str) -> list[str] | None:
    """The cases run when none are named: the toy's own cases on the toy, every other case elsewhere."""
    return [TOY_CASE_PREFIX + "*"] if pipeline == "toy" else None


def select_cases(cases: list[Case], patterns: Iterable[str] | None) -> list[Case]:
    """Cases whose name or plugin matches any of ``patterns`` (shell globs; ``None`` = all but the toy's)."""
    if not patterns:
        return [c for c in cases if not c.name.startswith(TOY_CASE_PREFIX)]
    patterns = [p.strip() for p in patterns if p.strip()]
    chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) or fnmatch.fnmatchcase(c.plugin, p)
                                      or c.name.startswith(p.rstrip("/") + "/") for p in patterns)]
    if not chosen:
        raise ValueError(f"no case matches {', '.join(patterns)}; known: {', '.join(c.name for c in cases)}")
    return chosen


# ------------------------------------------------------------------------------------------------ context
@dataclass
class MatrixContext:
    """What cases need to know: which pipeline, the sizes, the plugin resources given on the command line.

    ``resources`` maps a resource name (``"lora"``, ``"controlnet"``, ``"controlnet_union"``,
    ``"ip_adapter"``, ``"image_encoder"``, ``"kontext"``, ``"fill"``, ``"variant"``, ``"schnell"``,
    ``"image"``) to a list of values (paths or Hub ids). On the tiny pipeline cases build their own.
    """

    pipeline: str = "tiny"
    height: int = 64
    width: int = 64
    steps: int = 2
    seed: int = 0
    prompt: str = TINY_PROMPT
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    max_sequence_length: int | None = None  # T5 tokens; None: the pipeline's default (512 for FLUX.1-dev)
    resources: dict[str, list[str]] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="clear-matrix-")))
    _base: Any = field(default=None, repr=False)
    _loaded: dict = field(default_factory=dict, repr=False)

    @property
    def tiny(self) -> bool:
        return self.pipeline == "tiny"

    @property
    def toy(self) -> bool:
        return self.pipeline == "toy"

    @property
    def mechanics(self) -> bool:
        """Run the exactness and unload checks (2 more generations per case). The toy skips them: they
        test code paths, which the tiny pipeline covers; the toy is there for the fidelity numbers."""
        return not self.toy

    def resource(self, name: str, hint: str, count: int = 1) -> list[str]:
        """``count`` values of resource ``name`` (the last one repeated if fewer were given), or skip."""
        values = list(self.resources.get(name) or [])
        if not values:
            flag = "--" + name.replace("_", "-")
            raise CaseSkipped(f"needs {flag} {hint}")
        return (values + [values[-1]] * count)[:count]

    def base_pipeline(self):
        """The pipeline under test (tiny: a fresh one per call; real: loaded once and shared)."""
        if self.tiny:
            from .testing import tiny_flux_pipeline

            return tiny_flux_pipeline(seed=0)
        if self._base is None:
            self._base = self.load_pipeline(self.pipeline)
        return self._base

    def load_pipeline(self, source: str, pipeline_class=None, share_components: bool = True, **kwargs):
        """``from_pretrained`` on the context's device and dtype (cached per source and class).

        With ``share_components`` a variant reuses the loaded base pipeline's text encoders, tokenizers
        and VAE (FLUX variants ship the same ones): only its transformer is loaded (~24 GB instead of ~34).
        """
        from .pipelines import is_builtin
        from .pipelines import load_pipeline as load_builtin

        key = (source, getattr(pipeline_class, "__name__", None))
        if key not in self._loaded and pipeline_class is None and is_builtin(source):  # "toy": shipped, offline
            self._loaded[key] = load_builtin(source, device=self.device, dtype=self.dtype)
        if key not in self._loaded:
            if pipeline_class is None:
                from diffusers import DiffusionPipeline as pipeline_class
            if share_components and self._base is not None and source != self.pipeline:
                for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
                    if self._base.components.get(name) is not None:
                        kwargs.setdefault(name, self._base.components[name])
            logger.info("loading %s (%s)", source, pipeline_class.__name__)
            pipe = pipeline_class.from_pretrained(source, torch_dtype=self.dtype, **kwargs).to(self.device)
            pipe.set_progress_bar_config(disable=True)
            self._loaded[key] = pipe
        return self._loaded[key]

    def release(self, pipe) -> None:
        """Forget a pipeline loaded with :meth:`load_pipeline` (frees its memory once unreferenced)."""
        import gc

        for key in [k for k, v in self._loaded.items() if v is pipe]:
            del self._loaded[key]
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def condition_image(self, size: tuple[int, int] | None = None):
        """The image cases condition on: ``--image PATH`` or a drawn test image, at the generation size."""
        from PIL import Image

        from .testing import tiny_test_image

        width, height = size or (self.width, self.height)
        paths = self.resources.get("image")
        if paths:
            image = Image.open(paths[0]).convert("RGB")
        else:
            image = tiny_test_image(max(64, min(width, height)), seed=self.seed)
        return image.resize((width, height), Image.BICUBIC)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class CaseRunner:
    """Runs one case's pipeline calls; handed to ``CaseSetup.extra_checks``."""

    ctx: MatrixContext
    setup: CaseSetup
    adapter: str
    window_size: float | None
    images: dict = field(default_factory=dict)
    last_seconds: float = 0.0

    def generate(self, pipe=None, **overrides) -> torch.Tensor:
        """The case's call (plus ``overrides``) on ``pipe`` (default: the case's), as a (3, H, W) CPU tensor
        ((N, 3, H, W) when the call holds N prompts)."""
        pipe = pipe if pipe is not None else self.setup.pipe
        if self.ctx.tiny and self.ctx.device != "cpu":
            pipe.to(self.ctx.device)  # tiny pipelines are built on the CPU; plugins may have added modules since
        kwargs = {"prompt": self.ctx.prompt, "height": self.ctx.height, "width": self.ctx.width,
                  "num_inference_steps": self.ctx.steps, "output_type": "pt"}
        if self.ctx.max_sequence_length:
            kwargs["max_sequence_length"] = self.ctx.max_sequence_length
        kwargs.update(self.setup.call)
        kwargs.update(overrides)
        kwargs = {k: v for k, v in kwargs.items() if v is not _DROP}
        kwargs["generator"] = torch.Generator(device="cpu").manual_seed(self.ctx.seed)
        start = time.perf_counter()
        images = pipe(**kwargs).images
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.last_seconds = time.perf_counter() - start
        # One prompt: (3, H, W). Several (the call holds a list of prompts): (N, 3, H, W).
        return (images[0] if len(images) == 1 else images).detach().float().cpu()

    def load_clear(self):
        """Install the adapter the way the case wants (order), with the case's load options."""
        from . import api

        def install():
            return api.load(self.adapter, self.setup.pipe, window_size=self.window_size, **self.setup.load_kwargs)

        return self._install(install)

    def attach(self, window_size: float):
        """Install the bare pattern (no weights) with ``window_size``, in the case's order."""
        from . import api

        options = {k: v for k, v in self.setup.load_kwargs.items() if k == "controlnet"}

        def install():
            return api.attach(window_size, self.setup.pipe, **options)

        return self._install(install)

    def unload(self) -> None:
        from . import api

        api.unload(self.setup.pipe)

    def generate_after_removing_plugin(self, remove_plugin, **overrides) -> tuple[torch.Tensor, bool]:
        """With CLEAR loaded, call ``remove_plugin()`` then generate; returns (image, CLEAR still ran).

        CLEAR is unloaded again afterwards, whatever happens.
        """
        handle = self.load_clear()
        try:
            remove_plugin()
            before = handle.kernel_calls
            image = self.generate(**overrides)
            return image, handle.kernel_calls > before
        finally:
            self.unload()

    def _install(self, install):
        if self.setup.install_clear is not None:
            return self.setup.install_clear(self.setup.pipe, install)
        return install()


_DROP = object()


def drop():
    """Marker for ``generate(**overrides)``: remove this argument from the call (e.g. ``image=drop()``)."""
    return _DROP


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute pixel difference of two images in [0, 1] (inf when shapes differ)."""
    if a.shape != b.shape:
        return math.inf
    return float((a.float() - b.float()).abs().max())


class _GeometryProbe:
    """Records the transformer's ``img_ids`` and text length of each call (for the FLOP fraction)."""

    def __init__(self, model):
        import inspect

        self.signature = inspect.signature(model.forward)
        self.img_ids = None
        self.text_len = None
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        if bound.get("img_ids") is not None and bound.get("encoder_hidden_states") is not None:
            self.img_ids = bound["img_ids"].detach().cpu()
            self.text_len = int(bound["encoder_hidden_states"].shape[1])

    def remove(self):
        self.handle.remove()


def _flop_fraction(probe: _GeometryProbe, handle) -> float | None:
    from .geometry import Geometry

    if probe.img_ids is None:
        return None
    geometry = Geometry.from_ids(probe.img_ids, probe.text_len)
    heads, head_dim = handle._head_shape
    full = geometry.attention_flops(head_dim, heads)
    return geometry.attention_flops(head_dim, heads, handle.config) / full


def _per_image(metric, a: torch.Tensor, b: torch.Tensor) -> float:
    """``metric`` of two images, or its mean over a batch of (N, 3, H, W) images."""
    if a.ndim == 4:
        values = [metric(x, y) for x, y in zip(a, b)]
        return sum(values) / len(values)
    return metric(a, b)


def _first(image: torch.Tensor) -> torch.Tensor:
    return image[0] if image.ndim == 4 else image


def run_case(case: Case, ctx: MatrixContext, adapter: str, window_size: float | None, thresholds: dict,
             small_window: float) -> tuple[dict, dict | None]:
    """Run one case; returns (its report entry, its images or None).

    Images: ``{"full", "clear", "zero_shot", "difference"}`` tensors (the first prompt's when the call
    holds several) and ``"inputs"``, the plugin's own inputs as ``[(label, image)]`` (see
    :func:`plugin_inputs`). ``small_window`` is the adapter's window: the bare pattern there (no
    weights changed) is the zero-shot run.
    """
    from . import api
    from .imaging import difference, psnr, ssim

    entry: dict = {"name": case.name, "plugin": case.plugin, "description": case.description}
    start = time.perf_counter()
    try:
        setup = case.prepare(ctx)
    except CaseSkipped as exc:
        entry.update(status="skipped", reason=str(exc), passed=None)
        return entry, None
    except Exception as exc:  # a case that cannot even be set up is a failure, reported, not a crash
        logger.exception("case %s could not be prepared", case.name)
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", passed=False,
                     seconds=time.perf_counter() - start)
        return entry, None
    thresholds = {**thresholds, **setup.thresholds}
    runner = CaseRunner(ctx, setup, adapter, window_size)
    checks: dict[str, bool] = {}
    exact = restored = None
    try:
        pipe = setup.pipe
        # Full attention. The "off" run goes first: it warms up the pipeline for the timed "on" run.
        off = setup.off(runner.generate) if setup.off is not None else None
        full = runner.generate()
        full_seconds = runner.last_seconds
        plugin_effect = max_difference(full, off) if off is not None else None
        if ctx.mechanics:  # the bare pattern with a window covering every token is full attention
            runner.attach(FULL_WINDOW)
            exact = max_difference(runner.generate(), full)
            runner.unload()
        # The bare pattern at the adapter's window, no weights changed: the zero-shot baseline.
        runner.attach(small_window)
        zero_shot = runner.generate()
        small = max_difference(zero_shot, full)
        runner.unload()
        # The adapter.
        handle = runner.load_clear()
        off_clear = setup.off(runner.generate) if (setup.off is not None and setup.off_with_clear) else None
        probe = _GeometryProbe(api.flux_models(pipe)[0][1])
        try:
            calls_mid = handle.kernel_calls
            clear = runner.generate()
            clear_seconds = runner.last_seconds
        finally:
            probe.remove()
        clear_calls = handle.kernel_calls - calls_mid
        plugin_effect_clear = max_difference(clear, off_clear) if off_clear is not None else None
        entry["targets"] = list(handle.targets)
        entry["flop_fraction"] = _flop_fraction(probe, handle)
        runner.unload()
        if ctx.mechanics:
            restored = max_difference(runner.generate(), full)
        runner.images.update(full=full, clear=clear, off=off, off_clear=off_clear, zero_shot=zero_shot)
        extra = setup.extra_checks(runner) if setup.extra_checks is not None else {}
        task = _task_scores(setup, runner.images) if setup.task is not None else None
    except Exception as exc:  # one broken case must not stop the matrix: it is reported as failed
        logger.exception("case %s failed", case.name)
        entry.update(status="error", error=f"{type(exc).__name__}: {exc}", passed=False,
                     seconds=time.perf_counter() - start)
        _cleanup(setup)
        return entry, None
    _cleanup(setup)
    value_psnr, value_ssim = _per_image(psnr, clear, full), _per_image(ssim, clear, full)
    zero_psnr, zero_ssim = _per_image(psnr, zero_shot, full), _per_image(ssim, zero_shot, full)
    # CLEAR vs full with the plugin off (same prompts and seeds): what the plugin itself costs CLEAR.
    plugin_free_psnr = _per_image(psnr, off_clear, off) if (off is not None and off_clear is not None) else None
    tolerance = thresholds["exact_tolerance"]
    if exact is not None:
        checks["exact_at_full_window"] = exact <= tolerance
    checks["differs_at_small_window"] = small > DIFFERS_TOLERANCE
    checks["clear_active"] = clear_calls > 0
    if restored is not None:
        checks["restored_after_unload"] = restored <= tolerance
    if plugin_effect is not None:
        checks["plugin_changes_output"] = plugin_effect > DIFFERS_TOLERANCE
    if plugin_effect_clear is not None:
        checks["plugin_changes_output_with_clear"] = plugin_effect_clear > DIFFERS_TOLERANCE
    checks["psnr"] = value_psnr >= thresholds["min_psnr"]
    checks["ssim"] = value_ssim >= thresholds["min_ssim"]
    # a threshold set to None by a case is not checked there (its number is still reported)
    if thresholds.get("min_gain_over_zero_shot_db") is not None:
        checks["gain_over_zero_shot"] = value_psnr - zero_psnr >= thresholds["min_gain_over_zero_shot_db"]
    if plugin_free_psnr is not None and thresholds.get("max_psnr_drop_vs_plugin_free_db") is not None:
        checks["psnr_near_plugin_free"] = \
            plugin_free_psnr - value_psnr <= thresholds["max_psnr_drop_vs_plugin_free_db"]
    if task is not None:
        if thresholds.get("max_task_drop") is not None:
            checks["task_kept"] = task["full"] - task["clear"] <= thresholds["max_task_drop"] + 1e-9
        if task.get("effect_ratio") is not None and thresholds.get("min_effect_ratio") is not None:
            checks["plugin_effect_kept"] = task["effect_ratio"] >= thresholds["min_effect_ratio"]
    for key, value in extra.items():
        if isinstance(value, bool):
            checks[key] = value
    entry.update(
        status="ok", psnr=_finite(value_psnr), ssim=value_ssim, zero_shot_psnr=_finite(zero_psnr),
        zero_shot_ssim=zero_ssim, gain_over_zero_shot_db=_finite(value_psnr - zero_psnr),
        plugin_free_psnr=None if plugin_free_psnr is None else _finite(plugin_free_psnr),
        prompts=int(full.shape[0]) if full.ndim == 4 else 1,
        exact_at_full_window=checks.get("exact_at_full_window"),
        exact_max_difference=exact, small_window=small_window, small_window_max_difference=small,
        plugin_changes_output=checks.get("plugin_changes_output"), plugin_max_difference=plugin_effect,
        plugin_changes_output_with_clear=checks.get("plugin_changes_output_with_clear"),
        plugin_max_difference_with_clear=plugin_effect_clear, off=setup.off_description or None,
        clear_kernel_calls=clear_calls, restored_max_difference=restored,
        time_full_s=full_seconds, time_clear_s=clear_seconds, speedup=full_seconds / max(clear_seconds, 1e-9),
        task_name=setup.task_name or None, task=task, compare_with=dict(setup.compare_with) or None,
        thresholds=dict(setup.thresholds) or None,
        extra={k: v for k, v in extra.items()}, checks=checks, notes=setup.notes or None,
        seconds=time.perf_counter() - start)
    entry["failed_checks"] = [k for k, ok in checks.items() if not ok]
    entry["passed"] = not entry["failed_checks"]
    # Small differences are scaled up so the panel shows where they are; the gain is in the report.
    full, clear, zero_shot = _first(full), _first(clear), _first(zero_shot)
    largest = max(float((clear - full).abs().max()), 1e-12)
    gain = float(min(MAX_DIFFERENCE_GAIN, max(MIN_DIFFERENCE_GAIN, 1.0 / largest)))
    entry["difference_gain"] = gain
    images = {"full": full, "clear": clear, "difference": difference(clear, full, gain=gain),
              "inputs": plugin_inputs(case, setup.call)}
    if setup.task is not None:  # trained models: the zero-shot image is worth a look (on random ones it is noise)
        images["zero_shot"] = zero_shot
    return entry, images


def _task_scores(setup: CaseSetup, images: dict) -> dict:
    """The case's task score on every run, and the plugin's effect (on - off) with full attention and CLEAR."""
    scores = {name: float(setup.task(images[name])) for name in ("full", "clear", "zero_shot", "off", "off_clear")
              if images.get(name) is not None}
    if "off" in scores:
        scores["effect_full"] = scores["full"] - scores["off"]
        scores["effect_clear"] = scores["clear"] - scores.get("off_clear", scores["off"])
        scores["effect_ratio"] = (scores["effect_clear"] / scores["effect_full"]) if scores["effect_full"] > 0 \
            else None
    return scores


def _compare_cases(entries: list[dict], thresholds: dict) -> list[dict]:
    """Cross-case checks (``CaseSetup.compare_with``): a case's PSNR at most N dB below another case's.

    Returns the entries that failed one."""
    by_name = {e["name"]: e for e in entries}
    failed = []
    for e in entries:
        if e.get("status") != "ok":
            continue
        for other, key in (e.get("compare_with") or {}).items():
            ref = by_name.get(other)
            limit = {**thresholds, **(e.get("thresholds") or {})}.get(key)
            if ref is None or ref.get("status") != "ok" or limit is None:
                e["extra"][f"psnr_vs_{other}"] = "not run"
                continue
            below = (math.inf if ref["psnr"] is None else ref["psnr"]) - \
                (math.inf if e["psnr"] is None else e["psnr"])
            below = 0.0 if math.isnan(below) else below
            e.setdefault("psnr_below", {})[other] = below
            name = f"psnr_within_{limit:g}db_of_{other}"
            e["checks"][name] = below <= limit
            if below > limit:
                e["failed_checks"].append(name)
                e["passed"] = False
                failed.append(e)
    return failed


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _cleanup(setup: CaseSetup) -> None:
    from . import api

    try:
        if api.get_handle(setup.pipe) is not None:
            api.unload(setup.pipe)
    except Exception:  # noqa: BLE001 - best effort after a failure; the failure itself is reported
        logger.debug("unload after a failed case failed too", exc_info=True)
    if setup.teardown is not None:
        try:
            setup.teardown()
        except Exception:  # noqa: BLE001 - the next case starts from its own set-up; say so and go on
            logger.warning("teardown of a case failed; later cases on a shared pipeline may be affected",
                           exc_info=True)


# ------------------------------------------------------------------------------------------------ matrix
def run_matrix(pipeline: str = "tiny", adapter: str | None = None, *, out: str | Path,
               cases: Iterable[str] | None = None, window_size: float | None = None, height: int | None = None,
               width: int | None = None, steps: int | None = None, seed: int = 0, prompt: str | None = None,
               max_sequence_length: int | None = None, resources: dict[str, list[str]] | None = None,
               thresholds: dict | None = None,
               device: str | None = None, dtype: str | torch.dtype | None = None,
               printer: Callable[[str], None] | None = print, threads: int | None = None) -> dict:
    """Run the compatibility matrix and write ``matrix.json``, ``matrix.md`` and ``index.html`` to ``out``.

    Args:
        pipeline: ``"tiny"`` (offline random-weight test pipeline), ``"toy"`` (the trained miniature FLUX
            shipped in :mod:`clear_adapters.toy`, with its trained plugins) or a diffusers FLUX pipeline
            (Hub id or directory).
        adapter: CLEAR adapter (registry name, path, Hub id); tiny default: a reference-format checkpoint
            written for the tiny pipeline into ``out``; toy default: ``"toy"`` (distilled, r=4); otherwise
            ``"flux-dev"``.
        cases: name/plugin globs to run (default: the ``toy/*`` cases on the toy, every other case elsewhere).
        window_size: override the adapter's window (tiny default: 4 tokens).
        height, width, steps: generation size (tiny: 64 px, 2 steps; toy: 32 px, 8 steps; real: 1024 px,
            28 steps).
        max_sequence_length: T5 tokens (tiny default 32: the tiny T5 has no use for 512 padding tokens).
        resources: plugin weights for real pipelines (see :class:`MatrixContext`).
        thresholds: ``{"min_psnr": dB, "min_ssim": x, "exact_tolerance": max |difference|}``, written into
            the report (``exact_tolerance``: 1e-5 in float32, 5e-2 in bf16/fp16 where the kernels differ).
        threads: torch CPU threads while cases run (default: 1 for the tiny pipeline, else torch's).
    Each case's images (its inputs, full | CLEAR | difference) go to ``out/images``; the reports are
    rendered by :mod:`clear_adapters.reports`. A progress bar shows on a terminal.
    Returns the report (also in ``matrix.json``); ``report["passed"]`` is False when a case failed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tiny, toy = pipeline == "tiny", pipeline == "toy"
    small = tiny or toy  # built-in CPU-sized pipelines: float32 on the CPU
    if device is None:
        device = "cuda" if (torch.cuda.is_available() and not small) else "cpu"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if (device.startswith("cuda") and not small) else torch.float32
    if toy:
        from .toy import pipeline as toy_defaults

        size, default_steps, default_tokens = toy_defaults.HEIGHT, toy_defaults.STEPS, toy_defaults.MAX_SEQUENCE_LENGTH
        default_prompt = TOY_PROMPT
    else:
        size, default_steps = (64, 2) if tiny else (1024, 28)
        default_tokens, default_prompt = (32 if tiny else None), (TINY_PROMPT if tiny else REAL_PROMPT)
    ctx = MatrixContext(pipeline=pipeline, height=height or size, width=width or size, steps=steps or default_steps,
                        seed=seed, prompt=prompt or default_prompt, device=device, dtype=dtype,
                        max_sequence_length=max_sequence_length or default_tokens,
                        resources={k: list(v) for k, v in (resources or {}).items() if v},
                        workdir=out / "work")
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    if tiny and adapter is None:
        from .testing import tiny_flux_transformer, write_reference_checkpoint

        window_size = window_size or TINY_WINDOW
        adapter = str(write_reference_checkpoint(ctx.workdir / f"tiny_clear_r{window_size:g}.safetensors",
                                                 tiny_flux_transformer(0), window_size))
    adapter = adapter or ("toy" if toy else "flux-dev")
    exact = EXACT_TOLERANCE if dtype == torch.float32 else LOW_PRECISION_EXACT_TOLERANCE
    defaults = TINY_THRESHOLDS if tiny else TOY_THRESHOLDS if toy else REAL_THRESHOLDS
    thresholds = {**defaults, "exact_tolerance": exact, **(thresholds or {})}
    window = window_size if window_size is not None else _adapter_window(adapter)
    small_window = float(window if window is not None else TINY_WINDOW)
    selected = select_cases(discover_cases(), cases or default_patterns(pipeline))
    say = printer or (lambda _msg: None)
    say(f"compatibility matrix: pipeline {pipeline}, adapter {adapter} (window {window}), "
        f"{ctx.width}x{ctx.height} px, {ctx.steps} steps, seed {seed}, {len(selected)} cases")
    started = time.perf_counter()
    from . import reports
    from .progress import progress

    entries = []
    before = torch.get_num_threads()
    if threads is None and tiny:  # tiny models are overhead-bound: extra threads only add synchronisation
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        bar = progress(selected, desc="matrix", unit="case")
        for case in bar:
            bar.set_postfix_str(case.name)
            entry, images = run_case(case, ctx, adapter, window_size, thresholds, small_window)
            if images is not None:
                entry["images"] = reports.write_case_images(out, case.name, images)
            entries.append(entry)
            if printer is print:
                bar.write(_one_line(entry))  # printed above the bar, which stays at the bottom
            else:
                say(_one_line(entry))
        bar.close()
    finally:
        torch.set_num_threads(before)
    for e in _compare_cases(entries, thresholds):
        say(f"  FAIL {e['name']}: PSNR further below {', '.join(e['psnr_below'])} than allowed")
    report = {
        "pipeline": pipeline, "adapter": adapter, "window_size": window, "height": ctx.height, "width": ctx.width,
        "steps": ctx.steps, "seed": seed, "prompt": ctx.prompt, "max_sequence_length": ctx.max_sequence_length,
        "device": device, "dtype": str(dtype).replace("torch.", ""),
        "thresholds": {**thresholds, "differs_tolerance": DIFFERS_TOLERANCE,
                       "small_window": small_window, "full_window": FULL_WINDOW},
        "hardware": hardware(device), "versions": _versions(), "seconds": None, "cases": entries,
        "mechanics": ctx.mechanics,
    }
    run_ones = [e for e in entries if e["status"] != "skipped"]
    report["passed"] = all(e["passed"] for e in run_ones)
    report["summary"] = {"cases": len(entries), "passed": sum(1 for e in run_ones if e["passed"]),
                         "failed": sum(1 for e in run_ones if not e["passed"]),
                         "skipped": sum(1 for e in entries if e["status"] == "skipped")}
    report["seconds"] = time.perf_counter() - started
    (out / "matrix.json").write_text(json.dumps(report, indent=2, default=_json_default))
    reports.write_reports(out, report)
    summary = report["summary"]
    say(f"{summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped in "
        f"{report['seconds']:.1f} s; wrote {out / 'matrix.json'}, {out / 'matrix.md'}, {out / 'index.html'}")
    for e in entries:
        if e["status"] == "skipped":
            say(f"  skipped {e['name']}: {e['reason']}")
    return report


def _adapter_window(adapter: str):
    from .api import resolve

    try:
        return resolve(adapter, download=False).config.window_size
    except Exception:  # noqa: BLE001 - only for the report header; load() raises the real error later
        return None


def _one_line(entry: dict) -> str:
    if entry["status"] == "skipped":
        return f"  SKIP {entry['name']}: {entry['reason']}"
    if entry["status"] == "error":
        return f"  FAIL {entry['name']}: {entry['error']}"
    flag = "ok  " if entry["passed"] else "FAIL"
    failed = f" failed: {', '.join(entry['failed_checks'])}" if entry["failed_checks"] else ""
    task = entry.get("task")
    task_text = ""
    if task:  # full / CLEAR / zero-shot
        task_text = f"  {entry['task_name'] or 'task'} {task['full']:.2f}/{task['clear']:.2f}/{task['zero_shot']:.2f}"
        if task.get("effect_ratio") is not None:
            task_text += f" (effect x{task['effect_ratio']:.2f})"
    return (f"  {flag} {entry['name']:<34} PSNR {_fmt(entry['psnr'], '.2f')} dB  SSIM {entry['ssim']:.3f}  "
            f"zero-shot {_fmt(entry['zero_shot_psnr'], '.2f')} dB{task_text}  "
            f"FLOPs {_fmt(entry['flop_fraction'], '.1%')}  speedup {entry['speedup']:.2f}x{failed}")


def _fmt(value, spec: str) -> str:
    if value is None:
        return "inf" if spec == ".2f" else "-"
    return format(value, spec)


def _versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("clear-adapters", "torch", "diffusers", "transformers", "peft", "huggingface_hub"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return versions


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj)


#: The difference panel is |CLEAR - full| x gain, the gain chosen per case so the largest difference
#: is visible (at least 4x, at most 256x); each report prints the gain it used.
MIN_DIFFERENCE_GAIN, MAX_DIFFERENCE_GAIN = 4.0, 256.0

#: What the plugin inputs of a case's pipeline call are called in the reports.
INPUT_LABELS = {"control_image": "ControlNet condition (Canny edges)", "ip_adapter_image": "IP-Adapter image",
                "mask_image": "Fill mask (white: repainted)"}


def plugin_inputs(case: Case, call: dict) -> list[tuple[str, Any]]:
    """The images a case hands its pipeline (Canny map, IP image, Kontext reference, Fill mask, ...),
    labelled for the reports. Found in the call itself, so no case has to declare them."""
    from PIL import Image

    found = []
    batch = isinstance(call.get("prompt"), (list, tuple))  # one input per prompt: show the first prompt's
    for key, value in call.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        images = [v for v in values if isinstance(v, Image.Image)][:1 if batch else None]
        label = _image_label(case) if key == "image" else INPUT_LABELS.get(key, key)
        for i, image in enumerate(images):
            found.append((f"{label} {i + 1}" if len(images) > 1 else label, image))
    return found


def _image_label(case: Case) -> str:
    name = case.name.lower()
    for word, label in (("kontext", "Kontext reference image"), ("fill", "image to fill"),
                        ("img2img", "Img2Img input image")):
        if word in name:
            return label
    return "input image"


def hardware(device: str | None = None) -> str:
    """What ran the matrix, in words: the GPU's name, or the CPU's model and core count."""
    import os

    if device and str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return f"{torch.cuda.get_device_name(index)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores"


def known_case_names() -> list[str]:
    """Names of every discoverable case (for ``--list`` and error messages)."""
    return [c.name for c in discover_cases()]


__all__ = ["Case", "CaseSetup", "CaseSkipped", "CaseRunner", "MatrixContext", "register_case", "discover_cases",
           "select_cases", "default_patterns", "run_matrix", "run_case", "plugin_inputs", "hardware", "drop", "max_difference",
           "known_case_names"]
