"""The one base class of user-facing errors.

A ``UserError`` is a problem the user can fix (a bad value, a missing file, an unusable
checkpoint). Its message is one line naming what was wrong and what was expected; the command
line prints it without a traceback and exits with code 2. Internal invariants use ``assert`` or
plain ``RuntimeError``/``ValueError``, which the command line does not catch.
"""

from __future__ import annotations


class UserError(ValueError):
    """A user-facing problem, reported in one line (exit code 2)."""
