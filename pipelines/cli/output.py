"""Where every `xsam` verb prints: results on stdout, progress and errors on stderr."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.text import Text

err_console = Console(stderr=True)
out_console = Console()


def fail(message: str, code: int = 2) -> None:
    """Print `error: MESSAGE` on stderr and exit with `code` (2: bad input, 1: bad data)."""
    # soft_wrap: never cut a path in the middle; Text: a path with [brackets] is not markup
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)
