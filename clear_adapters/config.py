"""`ClearConfig`: the hyper-parameters that define one CLEAR attention pattern (pure stdlib).

Invalid values raise :class:`~clear_adapters.errors.InvalidArgumentError` (a ``ValueError``)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace

from .errors import InvalidArgumentError

BACKENDS = ("auto", "dense", "tiled", "flex")

#: The sequence length the published adapters were trained at: 64x64 image tokens + 512 text tokens.
TRAIN_SEQ_LEN = 64 * 64 + 512

#: Largest accepted window radius, in tokens. A window wider than the image is full attention, and FLUX
#: at 16K px has 1024 tokens a side; beyond this r**2 and the tile plans only risk overflow.
MAX_WINDOW_SIZE = 1_000_000
#: Largest accepted down factor: pooling weights hold d**2 values per layer and the grid must divide by d.
MAX_DOWN_FACTOR = 64


def window_size_problem(value) -> str | None:
    """Why ``value`` is not a valid window radius (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number of latent tokens, got {value!r}"
    if not (math.isfinite(value) and 0 < value <= MAX_WINDOW_SIZE):
        return f"must be a finite number of tokens in (0, {MAX_WINDOW_SIZE}], got {value!r}"
    return None


def down_factor_problem(value) -> str | None:
    """Why ``value`` is not a valid down factor (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= MAX_DOWN_FACTOR:
        return f"must be an integer from 1 to {MAX_DOWN_FACTOR}, got {value!r}"
    return None


@dataclass(frozen=True)
class ClearConfig:
    """One CLEAR attention pattern.

    Args:
        window_size: radius ``r`` in latent tokens; an image query at (y, x) sees image keys with
            ``(y - y')**2 + (x - x')**2 < r**2`` (strict, Euclidean).
        down_factor: ``d``; when > 1 the image K/V grids are also pooled by ``d x d`` blocks with a
            learned ``spatial_weight`` and appended as keys that only image queries attend.
        proportional_attention: scale logits by ``sqrt(log_{train_seq_len}(N_kv) / head_dim)`` (the
            authors' high-resolution recipe) instead of ``1/sqrt(head_dim)``.
        train_seq_len: the training sequence length used by proportional attention.
        backend: ``"auto"``, ``"dense"``, ``"tiled"`` or ``"flex"``.
    """

    window_size: float
    down_factor: int = 1
    proportional_attention: bool = False
    train_seq_len: int = TRAIN_SEQ_LEN
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name, problem in (("window_size", window_size_problem(self.window_size)),
                              ("down_factor", down_factor_problem(self.down_factor))):
            if problem:
                raise InvalidArgumentError(f"{name} {problem}")
        if not isinstance(self.proportional_attention, bool):
            raise InvalidArgumentError(f"proportional_attention must be True or False, got "
                                       f"{self.proportional_attention!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if isinstance(self.train_seq_len, bool) or not isinstance(self.train_seq_len, numbers.Integral) \
                or self.train_seq_len < 2:
            raise InvalidArgumentError(f"train_seq_len must be an integer >= 2, got {self.train_seq_len!r}")

    @property
    def halo(self) -> int:
        """Largest |dy| (or |dx|) inside the window: the integer part of the radius, minus one if exact."""
        return math.ceil(self.window_size) - 1

    def softmax_scale(self, head_dim: int, num_keys: int) -> float:
        """The logit scale for ``head_dim`` channels and ``num_keys`` keys in the full joint sequence.

        ``num_keys`` counts text + image keys (not pooled ones); the pooled variant uses
        ``log(10 * N)`` exactly as the reference processor for d > 1 does.
        """
        if not self.proportional_attention:
            return 1.0 / math.sqrt(head_dim)
        n = num_keys * 10 if self.down_factor > 1 else num_keys
        return math.sqrt(math.log(n, self.train_seq_len) / head_dim)

    def with_backend(self, backend: str) -> "ClearConfig":
        return replace(self, backend=backend)

    def to_dict(self) -> dict:
        return asdict(self)
