"""What a training config will do, told before anything is built (`addpipe train --dry-run`)."""

from __future__ import annotations

from typing import Optional

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


def dry_run(config, world_size: int, gpu_memory: Optional[float] = None) -> str:
    """`addpipe train --dry-run`: the resolved config with its documentation, the plan, and the memory per rank (with
    `model.gradient_checkpointing: auto` decided as the run would on a GPU of `gpu_memory` GiB)."""
    from addpipe.config import to_yaml
    from addpipe.train.memory import plan_memory, resolve_checkpointing
    from addpipe.train.models import ModelLoadError, looks_local

    plan = describe_plan(config)
    if world_size < 1:
        raise ValueError(f"--world-size must be at least 1, got {world_size}")
    try:
        why = resolve_checkpointing(config, world_size, gpu_memory, unknown_gpu=True)
        note = f"# model.gradient_checkpointing auto: {why}\n" if why else ""
        memory = note + plan_memory(config, world_size).describe(gpu_memory)
    except (OSError, ValueError, ModelLoadError) as error:
        if isinstance(error, ModelLoadError) and looks_local(config.model.teacher):
            raise  # a local teacher that is missing or no model we can train: the run would fail, so the plan does
        # model configs not reachable (a hub id offline): the rest of the plan still helps
        memory = f"# memory plan: not available: {str(error).strip().splitlines()[0]}\n"
    return to_yaml(config, with_docs=True) + "\n" + plan + memory
