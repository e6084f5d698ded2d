"""Plotting for the stages' reports (curation, training, evaluation, the demo): matplotlib without a display."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (files only: runs on cluster nodes and in CI without a display).
    Imported on first use, so modules that plot stay light to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
