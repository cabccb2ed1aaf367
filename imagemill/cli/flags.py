"""How boolean flags read in `--help`: as switches (`--wait`), never with a `<bool>` value they do not take.

Typer's rich help prints a type beside every option, flags included, though its plain help leaves
flags without one; imported by the CLI package before any command is built.
"""

from typing import Any

from typer.core import TyperOption

_display_type = TyperOption.display_type_rich


def _display_type_of_value(self: TyperOption, ctx: Any) -> str | None:
    if self.is_flag and self.metavar is None:
        return None
    return _display_type(self, ctx)


TyperOption.display_type_rich = _display_type_of_value  # type: ignore[method-assign]
