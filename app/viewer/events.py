"""Plain-Python events for the viewer models (the napari pattern, no Qt)."""
from __future__ import annotations

from typing import Callable


class Event:
    """A list of callbacks; ``emit`` calls them in order."""

    def __init__(self, name: str):
        self.name = name
        self._callbacks: list[Callable] = []

    def connect(self, callback: Callable) -> None:
        if callback not in self._callbacks:
            self._callbacks.append(callback)

    def disconnect(self, callback: Callable) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def emit(self, *args) -> None:
        for cb in list(self._callbacks):
            cb(*args)


class EventGroup:
    """Named :class:`Event` attributes: ``EventGroup("changed", "added")`` has ``.changed`` and
    ``.added``."""

    def __init__(self, *names: str):
        for n in names:
            setattr(self, n, Event(n))
