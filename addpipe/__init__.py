"""addpipe: Adversarial Diffusion Distillation, from curated data to evaluated one-step generators.

The subpackages live in the repository's top-level folders (``pipeline/``, ``dataprep/``, ``train/``,
``eval/``); ``pyproject.toml`` maps them under this name.
"""

__version__ = "0.1.0"
