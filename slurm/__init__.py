"""SLURM batch scripts for training and curation, and `addpipe slurm`, which renders and submits them."""
