"""What several commands share: ``--threads`` and quiet third-party output.

Light on purpose (standard library only at import): the CLI imports this before argparse runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

#: Loggers of libraries whose warnings a CLI user cannot act on ("No LoRA keys ...", resize notices).
THIRD_PARTY_LOGGERS = ("diffusers", "transformers", "peft", "accelerate", "torch")
#: Read by diffusers / transformers when they configure their loggers (at their first use).
VERBOSITY_VARIABLES = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY")
_THIRD_PARTY_MODULES = r"(diffusers|transformers|torch|peft|accelerate|huggingface_hub|safetensors|timm)(\.|$)"


def add_threads_argument(parser) -> None:
    """``--threads N``: torch CPU threads for this command."""
    from .argtypes import positive_int

    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads torch may use (default: torch's choice; tiny pipelines run best on 1)")


@contextlib.contextmanager
def torch_threads(count: int | None):
    """Run the block with ``count`` torch threads (nothing changes when ``count`` is None)."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def third_party_quiet(verbose: bool):
    """Hide third-party warnings a CLI user cannot act on, for the duration of one command.

    Deprecation/future warnings and the diffusers/transformers logger chatter are hidden; ``-v``
    shows them. clear_adapters' own warnings (e.g. ``ClearPersistenceWarning``) always show.
    Everything is restored afterwards, so calling ``cli.main`` in-process leaves no trace.
    """
    if verbose:
        yield
        return
    saved_env = {name: os.environ.get(name) for name in VERBOSITY_VARIABLES}
    for name in VERBOSITY_VARIABLES:  # for libraries first imported during the command
        os.environ.setdefault(name, "error")
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    saved_levels = [logger.level for logger in loggers]
    for logger in loggers:  # for libraries already imported
        logger.setLevel(max(logger.level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=_THIRD_PARTY_MODULES)
            from ..errors import ClearPersistenceWarning

            warnings.filterwarnings("always", category=ClearPersistenceWarning)
            yield
    finally:
        for logger, level in zip(loggers, saved_levels):
            logger.setLevel(level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

