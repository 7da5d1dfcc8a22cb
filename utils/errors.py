"""The one exception type that means "the user gave us something we cannot use".

Scripts catch it at the top and print its message as a single line (no traceback), exiting with status 2. A process
of a multi-process run that gives up on the others (``--ddp_timeout``, or a peer that vanished) also ends with one
line, exiting with status 1.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user (a flag, a file, a folder). The message is shown as is, on one line."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (at most 200 characters), for a one-line error; its type's name
    when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def peer_failure(error: BaseException) -> str | None:
    """One line for a collective that failed because another process is stuck or gone; None for anything else.

    gloo reports these as RuntimeError ("Timed out waiting 4000ms for recv", "Connection closed by peer"), NCCL as
    torch.distributed.DistBackendError; both carry the backend's source location first, which is dropped here."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error).strip()
    backend = type(error).__name__ == "DistBackendError" or re.search(r"gloo|nccl|ProcessGroup", text, re.I)
    if not backend:
        return None
    detail = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")[:200]
    rank = os.environ.get("RANK", "?")
    if re.search(r"timed out|timeout", text, re.I):
        return (f"process {rank} waited longer than --ddp_timeout for the other processes and gave up ({detail}); "
                f"one of them is stuck or dead, see its log. Resume with --resume_from_checkpoint latest")
    if re.search(r"closed by peer|reset by peer|broken pipe|connection refused", text, re.I):
        return (f"process {rank} lost contact with another process ({detail}); it probably crashed or was killed, "
                f"see its log. Resume with --resume_from_checkpoint latest")
    return None


def _close_progress_bars() -> None:
    # A bar left open would have the error line glued to its end.
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


@contextmanager
def exit_on_user_error(prog: str):
    try:
        yield
    except UserError as e:
        _close_progress_bars()
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except RuntimeError as e:
        line = peer_failure(e)
        if line is None:
            raise
        _close_progress_bars()
        print(f"{prog}: error: {line}", file=sys.stderr)
        raise SystemExit(1) from None
