"""Registries: name -> constructor, for encoders, tokenizers and generators (like timm's ``register_model``).

Model modules register their named variants when imported; ``create_*`` imports the model package on first use
(never at ``import pae_fast``), so there are no import-time side effects beyond filling these tables.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = [
    "Registry",
    "GENERATORS",
    "TOKENIZERS",
    "ENCODERS",
    "register_generator",
    "register_tokenizer",
    "register_encoder",
    "create_generator",
    "create_tokenizer",
    "create_encoder",
    "list_generators",
    "list_tokenizers",
    "list_encoders",
]

T = TypeVar("T", bound=Callable[..., Any])


class Registry(Generic[T]):
    """A named table of constructors with helpful errors.

    Args:
        kind: what the entries are ("generator", "tokenizer", ...), used in error messages.
        modules: modules imported before the first lookup; importing them registers their entries.
    """

    def __init__(self, kind: str, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._modules = modules
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, fn: T | None = None) -> Any:
        """Register ``fn`` under ``name``; usable as ``@registry.register("Name")``."""

        def deco(f: T) -> T:
            if name in self._entries and self._entries[name] is not f:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = f
            return f

        return deco(fn) if fn is not None else deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for m in self._modules:
                importlib.import_module(m)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            valid = ", ".join(self.names()) or "(none registered)"
            raise KeyError(f"unknown {self.kind} {name!r}.{hint} Valid names: {valid}")
        return self._entries[name]

    def create(self, name: str, **overrides: Any) -> Any:
        return self.get(name)(**overrides)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


GENERATORS: Registry = Registry("generator", ("pae_fast.models",))
TOKENIZERS: Registry = Registry("tokenizer", ("pae_fast.models",))
ENCODERS: Registry = Registry("encoder", ("pae_fast.models",))

register_generator = GENERATORS.register
register_tokenizer = TOKENIZERS.register
register_encoder = ENCODERS.register


def create_generator(name: str, **overrides: Any) -> Any:
    """Build a registered generator, e.g. ``create_generator("LightningDiT-XL/1", in_channels=32)``."""
    return GENERATORS.create(name, **overrides)


def create_tokenizer(name: str, **overrides: Any) -> Any:
    """Build a registered tokenizer, e.g. ``create_tokenizer("PAE-DINOv2-L-d32")``."""
    return TOKENIZERS.create(name, **overrides)


def create_encoder(name: str, **overrides: Any) -> Any:
    """Build a registered frozen vision encoder (VFM)."""
    return ENCODERS.create(name, **overrides)


def list_generators() -> list[str]:
    return GENERATORS.names()


def list_tokenizers() -> list[str]:
    return TOKENIZERS.names()


def list_encoders() -> list[str]:
    return ENCODERS.names()
