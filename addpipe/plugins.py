"""Plug-ins from installed packages' entry points: how the method and model-family registries find third-party ones."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Callable, Container

logger = logging.getLogger(__name__)


def load_entry_points(group: str, base: type, known: Container[str], register: Callable[[type], object],
                      what: str) -> None:
    """Register each class the `group` entry points name that subclasses `base` and whose `name` is not `known`. A
    plug-in that fails to import is logged and skipped: a broken third-party package must not take the built-in ones
    down with it."""
    for entry in entry_points(group=group):
        try:
            loaded = entry.load()
        except Exception as error:  # noqa: BLE001 - any import-time failure of someone else's package
            logger.warning("%s plug-in %s (%s) failed to load: %s", what, entry.name, entry.value, error)
            continue
        if isinstance(loaded, type) and issubclass(loaded, base) and loaded.name not in known:
            register(loaded)
