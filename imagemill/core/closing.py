"""`with obj:` for objects whose only clean-up is `close()`, in one mixin.

Sinks, which must tell success from failure, use `core.sinks.base.SinkContext` instead.
"""

from types import TracebackType
from typing import Self


class Closing:
    """Entering returns the object; leaving, however it happens, calls `close()`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
