"""The registry of named CLEAR adapters, read from the packaged ``data/registry.toml``.

An entry's weights live either on the Hub (``repo_id`` + ``filename``) or inside the installed package
(``path``, relative to the ``clear_adapters`` package: an adapter directory or file shipped as package
data, e.g. the toy's distilled adapters).
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .errors import AdapterNotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


@dataclass(frozen=True)
class RegistryEntry:
    """One named adapter: where its weights live and the attention pattern they were trained with."""

    name: str
    base_model: str
    window_size: float
    repo_id: str | None = None
    filename: str | None = None
    path: str | None = None
    down_factor: int = 1
    revision: str | None = None
    sha256: str | None = None
    provenance: str = ""
    paper_quality: str = ""
    zero_shot: bool = False
    alias_of: str | None = None
    note: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def describe(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, "", {}, False) or k == "zero_shot"}

    @property
    def source(self) -> str:
        """Where the weights are, for listings: ``owner/repo/file`` or ``package:path``."""
        return f"package:{self.path}" if self.path else f"{self.repo_id}/{self.filename}"

    def local_path(self):
        """The installed file or directory of a package entry (``None`` for Hub entries)."""
        if not self.path:
            return None
        from pathlib import Path

        return Path(str(resources.files("clear_adapters").joinpath(self.path)))


@lru_cache(maxsize=1)
def _load() -> dict[str, RegistryEntry]:
    # lru_cache on an immutable packaged file: read once, never mutated.
    text = resources.files("clear_adapters").joinpath("data/registry.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    entries: dict[str, RegistryEntry] = {}
    for name, raw in data.get("adapters", {}).items():
        entry = RegistryEntry(name=name, **raw)
        if bool(entry.path) == bool(entry.repo_id and entry.filename):  # a packaging mistake, caught by the tests
            raise ValueError(f"registry entry {name!r} needs either path or repo_id + filename")
        entries[name] = entry
    for name, raw in data.get("aliases", {}).items():
        raw = dict(raw)
        target = entries[raw.pop("target")]
        fields = {**target.__dict__, **raw, "name": name, "alias_of": target.name}
        entries[name] = RegistryEntry(**fields)
    return entries


def list_adapters() -> list[RegistryEntry]:
    """Every registry entry (adapters and aliases), sorted by name."""
    return [entry for _, entry in sorted(_load().items())]


def lookup(name: str) -> RegistryEntry:
    """The entry called ``name``; an unknown name raises an error naming the closest entries."""
    entries = _load()
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise AdapterNotFoundError(f"no CLEAR adapter named {name!r} in the registry.{hint} "
                               f"Known: {', '.join(sorted(entries))}. A local path or a Hub repo id "
                               "('owner/name') works too.")


def is_registry_name(name: str) -> bool:
    return name in _load()
