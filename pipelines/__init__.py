"""Workflows and the `xsam` command line.

`pipelines.cli` is the one `xsam` entry point (typer sub-commands grouped by noun); `workflow.py`,
`cache.py` and `runner.py` run workflow files (`quickstart.yaml`, `paper.yaml`: convert -> lint ->
stage 1 -> stage 2 -> stage 3 -> evaluate, each step an `xsam` command) with a content cache;
`recipes/` holds the training recipes.
"""
