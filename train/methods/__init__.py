"""Training methods behind one interface (base.py), each a plug-in in its own folder: its config sections (a
subclass of train/config.py's TrainConfig), its networks, its losses' wiring and its memory plan.

ADD (add/) and Diffusion2GAN (diffusion2gan/) are built in. Another method registers itself with `register`, from
its own module or from an installed package's `addpipe.methods` entry point, and is chosen with `method: <name>` in
the config, without an edit to the loop, the backends or any file here.
"""

from __future__ import annotations

import importlib

from addpipe.plugins import load_entry_points
from addpipe.train.methods.base import Method, Phase


BUILT_IN = ("addpipe.train.methods.add", "addpipe.train.methods.diffusion2gan")
"""Packages whose import registers the built-in methods."""

_METHODS: dict[str, type[Method]] = {}
_discovered = False


def register(method: type[Method]) -> type[Method]:
    """Make `method` available as `method: <method.name>` (usable as a class decorator)."""
    if not method.name:
        raise ValueError(f"{method.__qualname__} has no name: set the class attribute `name` to what `method:` says")
    _METHODS[method.name] = method
    return method


def _discover() -> None:
    """Import the built-in methods and the `addpipe.methods` entry points of installed packages, once."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in BUILT_IN:
        importlib.import_module(module)
    load_entry_points("addpipe.methods", Method, _METHODS, register, "method")


def method_class(name: str) -> type[Method]:
    _discover()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}: one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names() -> list[str]:
    _discover()
    return sorted(_METHODS)


__all__ = ["Method", "Phase", "method_class", "method_names", "register"]
