"""The exception types of the data package.

Everything a user can get wrong about data (a missing directory, a split that is not
there, a corpus directory that would be overwritten, a stream too short for the window)
raises ``DataError`` with a one-line message naming what was wrong and what was
expected.  It subclasses ``UserError`` (a ``ValueError``) so generic callers still catch it; the CLI maps
it to exit code 2 instead of printing a traceback.  Image data raises the subclass
``ImageDataError``.
"""

from __future__ import annotations

from msmoe_dist.errors import UserError


class DataError(UserError):
    """A user-facing data problem; the message is one line and says what was expected."""


class ImageDataError(DataError):
    """A user-facing image-data problem; one line naming the path and what was expected.

    A ``DataError`` (hence a ``ValueError``), so the CLI's existing mapping to exit code 2 applies.
    """
