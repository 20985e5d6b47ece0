"""Errors raised by the data readers: one bad input file is a `BadInputError` naming the file."""

from __future__ import annotations

import os


class BadInputError(Exception):
    """An input file (or folder) cannot be used; `.path` says which and `.reason` says why.

    Picklable, so it survives the trip back from DataLoader worker processes.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path) if not isinstance(path, str) else path
        if isinstance(self.path, bytes):
            self.path = os.fsdecode(self.path)
        self.reason = str(reason)
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class VideoWriteError(RuntimeError):
    """A video or image that was just written does not read back as expected."""
