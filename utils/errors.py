"""The one exception type that means "the user gave us something we cannot use".

Scripts catch it at the top and print its message as a single line (no traceback), exiting with status 2.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder). The message is shown as is, on one line."""


@contextmanager
def exit_on_user_error(prog: str):
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
