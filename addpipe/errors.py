"""The one base of every error caused by what a user gave (a config, a path, a table, a checkpoint, a request):
the command line prints it as `error: ...` without a traceback and exits 2. Each stage's error subclasses it beside
the built-in class its callers already catch (ValueError, FileNotFoundError, ...)."""

from __future__ import annotations


class UserError(Exception):
    """Caused by input: printed without a traceback."""
