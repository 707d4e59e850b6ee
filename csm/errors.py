"""Errors that a user can fix.

A :class:`CSMError` carries one line that names the offending input and says how to fix it. The
command line turns it into ``csm: error: <message>`` on stderr and exit code 2, without a traceback.
Python callers (notebooks) catch it like any other exception.
"""

from __future__ import annotations


class CSMError(Exception):
    """A user-fixable problem with an input, an option or a file.

    The message must be a single line of the form ``"<input>: <what is wrong>; <how to fix>"``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
