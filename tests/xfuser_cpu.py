"""Let xfuser 0.7 run on a CPU-only torch (gloo): the test harness, never part of the library.

xfuser assumes an accelerator at import time. Three probes are patched here, nothing else:

1. ``xfuser.core.sparge_attention.block_mask`` imports ``triton`` at module level (CUDA-only sparse
   kernels). It is replaced by a stub whose one public function raises; CLEAR never calls it. (A fake
   ``triton`` module would confuse ``torch._dynamo``, which probes for triton too.)
2. ``xfuser.envs.CUDA_VERSION`` raises ``NotImplementedError`` without an accelerator and is read at
   import by ``xfuser.config``; it reads as version 0.0 instead.
3. ``PACKAGES_CHECKER.packages_info["has_long_ctx_attn"]`` (yunchang usable) is False without CUDA,
   so xfuser would create no Ulysses/ring process groups and ``usp.PROCESS_GROUP`` would be None. It is
   set True right after ``xfuser.envs`` runs (before the modules that copy it import), and
   ``usp.PROCESS_GROUP`` is pointed at yunchang's process-group holder.

Call :func:`install` before anything imports xfuser. ``examples/xdit_flux.py`` does so on machines
without CUDA.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_BLOCK_MASK = "xfuser.core.sparge_attention.block_mask"


class _EnvsPatcher(importlib.abc.MetaPathFinder):
    """Patches ``xfuser.envs`` right after it executes (probes 2 and 3)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "xfuser.envs":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            from packaging import version

            module.variables["CUDA_VERSION"] = lambda: version.parse("0.0")
            module.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True

        spec.loader.exec_module = exec_module
        return spec


def _needs_triton(*args, **kwargs):
    raise RuntimeError("xfuser's sparge attention needs triton and CUDA; not available in the CPU test harness")


def install() -> None:
    """Apply the patches (idempotent) and import xfuser."""
    if "xfuser.envs" in sys.modules and not getattr(sys.modules["xfuser.envs"], "_clear_cpu_patched", False):
        if not sys.modules["xfuser.envs"].PACKAGES_CHECKER.packages_info.get("has_long_ctx_attn"):
            raise RuntimeError("xfuser was imported before tests/xfuser_cpu.install(); call install() first")
    if _BLOCK_MASK not in sys.modules:
        stub = types.ModuleType(_BLOCK_MASK)
        stub.get_block_map_meansim = _needs_triton
        sys.modules[_BLOCK_MASK] = stub
    if not any(isinstance(f, _EnvsPatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _EnvsPatcher())
    import xfuser  # noqa: F401
    import yunchang.globals
    from xfuser.model_executor.layers import usp

    usp.PROCESS_GROUP = yunchang.globals.PROCESS_GROUP
    sys.modules["xfuser.envs"]._clear_cpu_patched = True
