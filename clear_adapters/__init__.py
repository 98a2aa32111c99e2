"""clear-adapters: CLEAR linear attention for FLUX-family diffusion transformers.

    import clear_adapters
    handle = clear_adapters.load("flux-dev", pipe)     # registry name, Hub repo id, or local path
    image = pipe(prompt, height=4096, width=4096).images[0]
    clear_adapters.unload(pipe)                        # original model back, bit-exact
"""

from .api import AdapterSpec, ClearHandle, attach, describe, get_handle, load, resolve, unload
from .artifact import save_adapter
from .config import ClearConfig
from .errors import (AdapterNotFoundError, ClearAdapterError, HubAuthError, HubError, HubNotFoundError, HubServerError,
                     IncompatibleModelError, IntegrityError, InvalidAdapterError, InvalidArgumentError,
                     MalformedResponseError, OfflineError, UnsafeFormatError)
from .geometry import Geometry
from .kernels import clear_attention
from .publish import PushResult, push
from .registry import RegistryEntry, list_adapters

__version__ = "0.1.0"

__all__ = [
    "load", "unload", "attach", "resolve", "describe", "get_handle", "list_adapters", "clear_attention",
    "save_adapter", "push", "PushResult", "AdapterSpec", "ClearHandle", "ClearConfig", "Geometry", "RegistryEntry",
    "ClearAdapterError", "AdapterNotFoundError", "IncompatibleModelError", "IntegrityError", "UnsafeFormatError",
    "InvalidAdapterError", "InvalidArgumentError", "HubError", "HubAuthError", "HubNotFoundError", "HubServerError",
    "MalformedResponseError", "OfflineError", "__version__",
]
