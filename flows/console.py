"""What the ``herl`` commands print for a person: errors, live progress, one short summary per stage, a closing block.

Everything goes to stderr (``CONSOLE``); stdout is left for ``--json`` summaries that scripts read.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

CONSOLE = Console(stderr=True)


def error(message: object, console: Console = CONSOLE) -> None:
    """``error: <message>`` in red, never re-wrapped (a path or a ``file:line`` stays whole and copy-pasteable) and
    never read as rich markup (messages quote ``[...]`` lists)."""
    console.print(f"[red]error:[/red] {escape(str(message))}", soft_wrap=True)
