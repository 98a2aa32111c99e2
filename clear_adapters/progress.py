"""Progress bars for long work (matrix cases, benchmark sweeps): tqdm on stderr, only on a terminal."""

from __future__ import annotations


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "it", enabled: bool | None = None):
    """A tqdm bar on stderr. ``enabled=None`` shows it only when stderr is a terminal (not in logs or CI)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=None if enabled is None else not enabled,
                leave=False, dynamic_ncols=True)
