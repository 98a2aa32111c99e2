"""The exceptions of clear_adapters: one base class, one subclass per kind of failure (and one warning)."""


class ClearAdapterError(Exception):
    """Base class of every error raised by clear_adapters."""


class AdapterNotFoundError(ClearAdapterError, LookupError):
    """The adapter name, path, repository, revision or file does not exist."""


class IncompatibleModelError(ClearAdapterError, ValueError):
    """The pipeline or the checkpoint does not fit (wrong architecture, shapes, missing layers)."""


class IntegrityError(ClearAdapterError):
    """A file is not what it claims to be (hash mismatch, corrupt or unsafe format)."""


class UnsafeFormatError(IntegrityError):
    """A pickle-based checkpoint was offered; clear_adapters reads safetensors only and never unpickles."""


class ClearPersistenceWarning(UserWarning):
    """A model with CLEAR installed is being saved: its projections are CLEAR's, not the model's own."""


class HubError(ClearAdapterError):
    """The Hugging Face Hub (or a mirror) refused or could not serve a request."""


class OfflineError(HubError):
    """Offline mode is on and the file is not in the local cache."""


class HubAuthError(HubError):
    """The Hub rejected the credentials (missing, invalid or lacking permission)."""


class DistillationError(ClearAdapterError, ValueError):
    """Distillation settings or data that cannot work (a window that covers the whole image, an empty
    prompt list, an output directory holding another adapter, a checkpoint from other settings)."""
