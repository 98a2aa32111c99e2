"""clear-adapters: CLEAR linear attention for FLUX-family diffusion transformers.

    import clear_adapters
    handle = clear_adapters.load("flux-dev", pipe)     # registry name, Hub repo id, or local path
    image = pipe(prompt, height=4096, width=4096).images[0]
    clear_adapters.unload(pipe)                        # original model back, bit-exact

The public names are imported on first use (PEP 562): ``import clear_adapters`` and the
``clear-adapters`` CLI do not import torch, diffusers or peft until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS = {
    "load": "api", "unload": "api", "attach": "api", "resolve": "api", "describe": "api", "get_handle": "api",
    "AdapterSpec": "api", "ClearHandle": "api",
    "save_adapter": "artifact",
    "ClearConfig": "config",
    "Geometry": "geometry",
    "clear_attention": "kernels",
    "push": "publish", "PushResult": "publish",
    "list_adapters": "registry", "RegistryEntry": "registry",
    **{name: "errors" for name in ("ClearAdapterError", "AdapterNotFoundError", "IncompatibleModelError",
                                   "IntegrityError", "UnsafeFormatError", "HubError", "HubAuthError",
                                   "OfflineError", "ClearPersistenceWarning", "HubNotFoundError", "HubServerError",
                                   "InvalidAdapterError", "InvalidArgumentError", "MalformedResponseError")},
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clear_adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from .api import AdapterSpec, ClearHandle, attach, describe, get_handle, load, resolve, unload
    from .artifact import save_adapter
    from .config import ClearConfig
    from .errors import (AdapterNotFoundError, ClearAdapterError, ClearPersistenceWarning, HubAuthError, HubError,
                         HubNotFoundError, HubServerError, IncompatibleModelError, IntegrityError, InvalidAdapterError,
                         InvalidArgumentError, MalformedResponseError, OfflineError, UnsafeFormatError)
    from .geometry import Geometry
    from .kernels import clear_attention
    from .publish import PushResult, push
    from .registry import RegistryEntry, list_adapters
