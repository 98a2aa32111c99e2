"""argparse ``type=`` functions: a bad value is argparse's own one-line usage error (exit status 2),
never a traceback from deep inside a command. Stdlib only (the CLI imports nothing heavy up front)."""

from __future__ import annotations

import argparse
import math
import re

from ..config import MAX_DOWN_FACTOR, MAX_WINDOW_SIZE


def _number(text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def window(text: str) -> float:
    """A window radius in tokens: finite, > 0, at most ``MAX_WINDOW_SIZE``."""
    value = _number(text)
    if not 0 < value <= MAX_WINDOW_SIZE:
        raise argparse.ArgumentTypeError(f"the window radius must be in (0, {MAX_WINDOW_SIZE}] tokens, got {text!r}")
    return value


def finite(text: str) -> float:
    return _number(text)


def non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def down_factor(text: str) -> int:
    value = _number(text, int)
    if not 1 <= value <= MAX_DOWN_FACTOR:
        raise argparse.ArgumentTypeError(f"the down factor must be an integer from 1 to {MAX_DOWN_FACTOR}, "
                                         f"got {text!r}")
    return value


def device(text: str) -> str:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...), checked by its form only."""
    if not re.fullmatch(r"(cpu|cuda|mps|xpu|hpu|npu|mtia|meta)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected a device like cpu, cuda or cuda:1, got {text!r}")
    return text


def grid(text: str) -> str:
    """A token grid ``HxW`` (or ``N`` for square), positive integers; returned as given."""
    parts = text.lower().replace("*", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise argparse.ArgumentTypeError(f"expected a token grid like 160x160 (positive integers), got {text!r}")
    return text


def grids(text: str) -> str:
    """A comma-separated list of :func:`grid` values."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected grids like 64x64,96x96, got {text!r}")
    for item in items:
        grid(item.strip())
    return text


def sizes(text: str) -> str:
    """A comma-separated list of positive pixel sizes."""
    items = [item.strip() for item in text.split(",")]
    if not items or not all(item.isdigit() and int(item) >= 1 for item in items):
        raise argparse.ArgumentTypeError(f"expected sizes in pixels like 128,256 (positive integers), got {text!r}")
    return text
