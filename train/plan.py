"""What a training config will do, told before anything is built (`addpipe train --dry-run`)."""

from __future__ import annotations

from addpipe.train.backends import backend_class
from addpipe.train.methods import method_class


def describe_plan(config) -> str:
    """The method and its phases, the backend, and where each model lives, as YAML-style comment lines."""
    lines = [f"# method: {config.method}", f"# backend: {config.engine.backend}"]
    for key, value in method_class(config.method).describe_plan(config).items():
        lines.append(f"#   {key}: {value}")
    lines.append("# placement:")
    method = method_class(config.method)
    placement = method.describe_placement(config, backend_class(config.engine.backend).describe_plan(config))
    for key, value in placement.items():
        lines.append(f"#   {key}: {value}")
    return "\n".join(lines) + "\n"
