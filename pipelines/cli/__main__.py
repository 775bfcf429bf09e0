"""`python -m pipelines.cli ...` runs the `xsam` command (for environments without the script)."""

from pipelines.cli import main

main()
