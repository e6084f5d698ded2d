"""`python -m addpipe.pipeline ...` (what torchrun launches) is the `addpipe` command."""

from addpipe.pipeline.cli import main

main()
