"""Attention backends, looked up by name.

Each backend is one file; this registry maps names to classes and says which can run where.
"""

from __future__ import annotations

import torch

from ..config import ConfigError
from .base import AttentionBackend, Capabilities
from .naive import NaiveAttention
from .sdpa import SDPAAttention

_REGISTRY: dict[str, type[AttentionBackend]] = {
    "naive": NaiveAttention,
    "sdpa": SDPAAttention,
}


def register(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _REGISTRY[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str, device: torch.device | str | None = None, **options) -> AttentionBackend:
    """The backend called `name`, checked against `device`. Raises ConfigError for a user mistake."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of: "
                          f"{', '.join(_REGISTRY)}")
    backend = _REGISTRY[name](**options)
    if device is not None:
        reason = backend.unavailable_reason(torch.device(device))
        if reason:
            raise ConfigError(f"backend {name!r} cannot run here: {reason}")
    return backend


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on `device` right now."""
    out = []
    for name in backend_names():
        if _REGISTRY[name]().unavailable_reason(torch.device(device)) is None:
            out.append(name)
    return out


# The backends in their own files register themselves when imported, so they come after
# `register`. Both always import: triton itself is imported only when a Triton kernel is
# first needed (triton_backend.py says why it cannot run without it).
from . import flash, triton_backend  # noqa: E402,F401

__all__ = ["AttentionBackend", "Capabilities", "register", "get_backend", "backend_names",
           "available_backends"]
