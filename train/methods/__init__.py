"""Training methods behind one interface (base.py). ADD (add.py) and Diffusion2GAN (diffusion2gan.py) are built in; another method registers itself
with `register` and is chosen with `method: <name>` in the config, without touching the loop."""

from __future__ import annotations

from addpipe.train.methods.base import Method, Phase

_METHODS: dict[str, type[Method]] = {}


def register(method: type[Method]) -> type[Method]:
    """Make `method` available as `method: <method.name>` (usable as a class decorator)."""
    _METHODS[method.name] = method
    return method


def method_class(name: str) -> type[Method]:
    if "add" not in _METHODS:
        from addpipe.train.methods.add import ADD
        from addpipe.train.methods.diffusion2gan import Diffusion2GAN

        register(ADD)
        register(Diffusion2GAN)
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


__all__ = ["Method", "Phase", "method_class", "register"]
