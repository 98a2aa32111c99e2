"""Up-front checks of what callers and files hand to ``load``/``attach``: every bad value becomes a specific
:class:`~clear_adapters.errors.ClearAdapterError` that names it, before anything is changed.

Value rules live with the values (``config.window_size_problem`` ...); this module applies them to the
caller's arguments, to a safetensors header's recorded pattern and to Hub repo ids.
"""

from __future__ import annotations

from pathlib import Path

from .config import BACKENDS, down_factor_problem, window_size_problem
from .errors import InvalidAdapterError, InvalidArgumentError

WEIGHT_MODES = ("replace", "delta")


def shown(text) -> str:
    """``text`` cut to a readable length: a hostile name must not flood a message."""
    text = str(text)
    return text if len(text) <= 160 else f"{text[:80]}...{text[-60:]}"


def check_arguments(*, window_size=None, down_factor=None, proportional_attention=None, backend=None,
                    weight_mode=None, controlnet=None, revision=None) -> None:
    """Raise :class:`InvalidArgumentError` naming the first argument that is given but invalid."""
    for name, problem in (("window_size", window_size is not None and window_size_problem(window_size)),
                          ("down_factor", down_factor is not None and down_factor_problem(down_factor))):
        if problem:
            raise InvalidArgumentError(f"{name} {problem}")
    if proportional_attention is not None and not isinstance(proportional_attention, bool):
        raise InvalidArgumentError(f"proportional_attention must be True, False or None (the adapter's own "
                                   f"setting), got {proportional_attention!r}")
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if weight_mode is not None and (not isinstance(weight_mode, str) or weight_mode not in WEIGHT_MODES):
        raise InvalidArgumentError(f"weight_mode must be one of {WEIGHT_MODES} (or None: the adapter's own), "
                                   f"got {weight_mode!r}")
    if controlnet is not None and not isinstance(controlnet, bool):
        raise InvalidArgumentError(f"controlnet must be True or False, got {controlnet!r}")
    if revision is not None:
        check_revision(revision)


def check_revision(revision) -> None:
    """A branch, tag or commit as git allows them: a revision is also a path in the Hub cache
    (``refs/<revision>``), so ``..``, absolute paths and control characters are refused."""
    if not isinstance(revision, str) or not 0 < len(revision) <= 255 or ".." in revision or "//" in revision \
            or revision.startswith("/") or revision.endswith("/") or "\\" in revision \
            or any(ord(c) < 32 or c in "~^:?*[" for c in revision):
        raise InvalidArgumentError(f"revision must be a branch, tag or commit id, got {shown(revision)!r}")


def check_source(source) -> str:
    """The adapter source as a string: a non-empty str or path (``None`` and ``""`` are not sources)."""
    if isinstance(source, (str, Path)) or hasattr(source, "__fspath__"):
        text = str(source.__fspath__() if hasattr(source, "__fspath__") else source)
        if text.strip():
            return text
    raise InvalidArgumentError(f"source must name an adapter (registry name, local path or Hub repo id), "
                               f"got {shown(repr(source))}")


def header_pattern(header: dict, where: str, *, window_size=None, down_factor=None) -> tuple:
    """(window, down factor) a safetensors header records, each None when absent.

    A value the caller gives explicitly wins, so an unreadable header value is then ignored; one that
    is needed but unreadable is an :class:`InvalidAdapterError` naming the header field.
    """
    def read(key, parse, problem, explicit):
        if key not in header:
            return None
        try:
            value = parse(header[key])
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is not None and not problem(value):
            return value
        if explicit is None:
            raise InvalidAdapterError(f"{where}: its header says {key}={header[key]!r}, which is not a valid "
                                      f"{key.replace('_', ' ')}; pass {key}= to override it")
        return None  # the caller's value wins over an unreadable one

    window = read("window_size", float, window_size_problem, window_size)
    if window is not None and window.is_integer():
        window = int(window)
    return window, read("down_factor", int, down_factor_problem, down_factor)


def path_exists(path: Path) -> bool:
    """``path.exists()`` that treats unusable names (too long, embedded NUL) as absent instead of raising."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def check_repo_id(repo_id: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``repo_id`` is a valid Hub repo id (``owner/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidArgumentError(f"{shown(repo_id)!r} is not a valid Hub repo id ({shown(exc)})") from None
    if repo_id.count("/") != 1:
        raise InvalidArgumentError(f"{shown(repo_id)!r} is not a valid Hub repo id (expected owner/name)")
