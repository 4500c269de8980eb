"""How ``byok-package`` and ``byok`` end: the exit codes both document, and the two endings
that are not errors of the command (Ctrl-C, and a reader that went away: ``| head``).

Exit codes: 0 ok; 1 failed (a retry or a fix of the setup may help); 2 refused, or a usage
error; 130 interrupted (Ctrl-C, 128 + SIGINT); 141 the output's reader went away (128 + SIGPIPE,
as other Unix tools end in ``... | head``). Neither ending ever shows a traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


def one_line(text: str) -> str:
    """``text`` on one line (an error is one line on stderr, whatever its source said)."""
    return " ".join(text.split())


def detach_stdout() -> None:
    """After ``BrokenPipeError``: point stdout at /dev/null, so that the interpreter's final
    flush at exit cannot fail again (and print "Exception ignored ..." on stderr)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def interrupted(tool: str, what: str) -> int:
    """Ctrl-C: one line on stderr; :data:`EXIT_INTERRUPTED`."""
    with contextlib.suppress(OSError, ValueError):
        print(f"{tool}: interrupted (Ctrl-C): {what}", file=sys.stderr)
    return EXIT_INTERRUPTED


def ending(tool: str, what_stopped: str, command: Callable[[], int]) -> int:
    """Run ``command`` and flush its output; Ctrl-C ends with one line and
    :data:`EXIT_INTERRUPTED` (``what_stopped`` says what it left), a reader that went away
    silently with :data:`EXIT_BROKEN_PIPE`."""
    try:
        code = command()
        sys.stdout.flush()  # a reader that went away is noticed here, not at exit
    except KeyboardInterrupt:
        return interrupted(tool, what_stopped)
    except BrokenPipeError:
        detach_stdout()
        return EXIT_BROKEN_PIPE
    return code
