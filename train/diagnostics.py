"""What each loss term does to the model it trains, measured where a user can compare the terms.

A loss is a weighted sum of terms with different units (a hinge over heads, a per-element squared error, a
penalty on a gradient): their values do not say which one drives training. The gradient each weighted term sends
to the same tensor does. The methods call this on the last step of each log window (log.term_norms) and log the
norms as grad_norm/<term>, so an inert or a dominant term shows in the first log lines.
"""

from __future__ import annotations

import torch


def gradient_norms(weighted_terms: dict[str, torch.Tensor], at: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: ||d term / d at||} for each weighted term (the L2 norm over the whole batch), the graph kept for the
    backward that follows. A term that does not depend on `at` gets 0."""
    found = {}
    for name, term in weighted_terms.items():
        gradient = None
        if term.requires_grad:
            (gradient,) = torch.autograd.grad(term, at, retain_graph=True, allow_unused=True)
        found[name] = gradient.detach().float().norm() if gradient is not None else at.new_zeros((), dtype=torch.float32)
    return found


def log_window_ends(step: int, every: int, steps: int) -> bool:
    """Whether step `step` (counted from 0) is the last of a log window: the loop flushes after it."""
    return (step + 1) % every == 0 or step + 1 == steps
