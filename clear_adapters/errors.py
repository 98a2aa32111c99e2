"""The exceptions of clear_adapters: one base class, one subclass per kind of failure.

Every error is raised before the pipeline is changed (or after it was rolled back), so catching
:class:`ClearAdapterError` is enough to know the model is as it was.
"""


class ClearAdapterError(Exception):
    """Base class of every error raised by clear_adapters."""


class InvalidArgumentError(ClearAdapterError, ValueError):
    """A value passed by the caller (or on the command line) is out of range or of the wrong type."""


class AdapterNotFoundError(ClearAdapterError, LookupError):
    """The adapter name, path, repository, revision or file does not exist."""


class IncompatibleModelError(ClearAdapterError, ValueError):
    """The pipeline or the checkpoint does not fit (wrong architecture, shapes, missing layers)."""


class IntegrityError(ClearAdapterError):
    """A file is not what it claims to be (hash mismatch, corrupt or unsafe format)."""


class InvalidAdapterError(IntegrityError):
    """An adapter file or config is readable but its content is invalid (non-finite or non-float tensors,
    duplicate keys, values out of range, config and weights that contradict each other)."""


class UnsafeFormatError(IntegrityError):
    """A pickle-based checkpoint was offered; clear_adapters reads safetensors only and never unpickles."""


class ClearPersistenceWarning(UserWarning):
    """A model with CLEAR installed is being saved: its projections are CLEAR's, not the model's own."""


class HubError(ClearAdapterError):
    """The Hugging Face Hub (or a mirror) refused or could not serve a request.

    ``status`` is the HTTP status of the answer that caused it, when there was one.
    """

    def __init__(self, message: str = "", *, status: int | None = None):
        super().__init__(message)
        self.status = status


class OfflineError(HubError):
    """The Hub cannot be reached (offline mode, or no connection) and the file is not in the local cache."""


class HubNotFoundError(AdapterNotFoundError, HubError):
    """The Hub has no such repository, revision or file (HTTP 404), or hides it from these credentials."""


class HubAuthError(HubError):
    """The Hub rejected the credentials (missing, invalid or lacking permission)."""


class HubServerError(HubError):
    """The Hub (or the server ``HF_ENDPOINT`` names) answered with a server error (HTTP 5xx)."""


class MalformedResponseError(HubError):
    """The server's answer is not what a Hub serves: missing or unsafe headers, an incomplete body."""


class DistillationError(InvalidArgumentError):
    """Distillation settings or data that cannot work (a window that covers the whole image, an empty
    prompt list, an output directory holding another adapter, a checkpoint from other settings)."""
