"""How ``byok-package`` and ``byok`` end: the exit codes both document, and the two endings
that are not errors of the command (Ctrl-C, and a reader that went away: ``| head``).

Exit codes: 0 ok; 1 failed (a retry or a fix of the setup may help); 2 refused, or a usage
error; 130 interrupted (Ctrl-C, 128 + SIGINT); 141 the output's reader went away (128 + SIGPIPE,
as other Unix tools end in ``... | head``). Neither ending ever shows a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

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


class UsageError(Exception):
    """The command line does not parse (raised instead of argparse's exit)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog
        self.message = message


class CliParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised as :class:`UsageError` (so they end like
    every other error: one line, ``--json`` honoured), with a suggestion for a near miss."""

    def error(self, message: str) -> NoReturn:
        """Raises:
        UsageError: always.
        """
        raise UsageError(self.prog, _with_suggestion(self, message))


def _with_suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """argparse's message, with the command or option most like a mistyped one."""
    choice = re.search(r"invalid choice: '?([^'\s]+)'?", message)
    if choice:
        known = [str(c) for a in parser._actions if a.choices for c in a.choices]  # noqa: SLF001  # argparse has no public list
        word = choice.group(1)
    else:
        unknown = re.search(r"unrecognized arguments: (--?[\w-]+)", message)
        if not unknown:
            return message
        known = sorted(_option_strings(parser))
        word = unknown.group(1)
    close = difflib.get_close_matches(word, known, n=1)
    if not close:
        return message
    return f"{message.split(' (choose from ', maxsplit=1)[0]}; did you mean {close[0]!r}?"


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option of ``parser`` and of its subcommands."""
    found: set[str] = set()
    for action in parser._actions:  # noqa: SLF001  # argparse exposes no public walk
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001  # same
            for sub in action.choices.values():
                found |= _option_strings(sub)
    return found


def usage_error(exc: UsageError, *, as_json: bool) -> int:
    """A command line that does not parse: one line on stderr (and, with ``--json``, one JSON
    object on stdout); :data:`EXIT_REFUSED`."""
    text = f"{one_line(exc.message)} (`{exc.prog} --help` shows the usage)"
    print(f"{exc.prog}: usage error: {text}", file=sys.stderr)
    if as_json:
        print(json.dumps({"status": "usage", "reason": "usage", "message": text}))
    return EXIT_REFUSED
