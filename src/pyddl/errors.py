"""Exceptions raised by pyddl.

Every collective failure is a `CollectiveError` whose message names the operation, its
sequence number, the group and the ranks involved, so a user knows where to look.
"""

from __future__ import annotations

__all__ = [
    "PyddlError",
    "NotInitializedError",
    "NotMemberError",
    "CollectiveError",
    "CollectiveTimeoutError",
    "CollectiveMismatchError",
]


class PyddlError(RuntimeError):
    """Base class of pyddl's runtime errors."""


class NotInitializedError(PyddlError):
    """A collective or a rank query was called before `pyddl.init()`."""


class NotMemberError(PyddlError, ValueError):
    """A rank called a collective of a communicator it is not a member of."""


class CollectiveError(PyddlError):
    """A collective failed; `missing_ranks` lists the ranks that never arrived (if known)."""

    def __init__(self, message: str, missing_ranks: tuple[int, ...] = ()):
        super().__init__(message)
        self.missing_ranks = tuple(missing_ranks)


class CollectiveTimeoutError(CollectiveError):
    """A collective waited longer than the configured timeout."""


class CollectiveMismatchError(CollectiveError):
    """Ranks called a collective with different shapes, dtypes, operations or order."""
