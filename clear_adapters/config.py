"""`ClearConfig`: the hyper-parameters that define one CLEAR attention pattern (pure stdlib)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, replace

BACKENDS = ("auto", "dense", "tiled", "flex")

#: The sequence length the published adapters were trained at: 64x64 image tokens + 512 text tokens.
TRAIN_SEQ_LEN = 64 * 64 + 512


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
        if isinstance(self.window_size, bool) or not isinstance(self.window_size, numbers.Real):
            raise ValueError(f"window_size must be a number of latent tokens, got {self.window_size!r}")
        if not (self.window_size > 0 and math.isfinite(self.window_size)):
            raise ValueError(f"window_size must be a finite number of tokens > 0, got {self.window_size}")
        if isinstance(self.down_factor, bool) or not isinstance(self.down_factor, numbers.Integral) \
                or self.down_factor < 1:
            raise ValueError(f"down_factor must be an integer >= 1, got {self.down_factor!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.train_seq_len < 2:
            raise ValueError(f"train_seq_len must be >= 2, got {self.train_seq_len}")

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
