"""Workflows and the `xsam` command line.

`pipelines.cli` is the one `xsam` entry point (typer sub-commands grouped by noun); the
prepare -> stage 1 -> stage 2 -> stage 3 -> evaluate workflows land here as well.
"""
