"""One rule for every parser of untrusted input: a typed value or the domain refusal.

A parser of attacker-controlled input (package bytes, a blob name, upload metadata, a kid)
either returns a typed value or raises a :class:`~offline_packager.errors.ByokError` with a
stable reason. :func:`refuses` enforces that structurally: any *other* exception escaping the
parser (a ``ValueError`` of Python's int-string limit, a ``RecursionError``, a bug) is itself
that parser's refusal, logged once, so it never reaches a caller's retry path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from .errors import ByokError

LOGGER = "byok.untrusted"  # logging is imported on the first refusal: not at start-up

P = ParamSpec("P")
R = TypeVar("R")


def refuses(make_error: Callable[[str], ByokError]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a parser of untrusted input: an unexpected exception becomes ``make_error``.

    ``make_error`` gets a sentence naming the parser and the exception's type (never its text,
    which may quote the input) and returns the refusal to raise.
    """

    def decorate(parser: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(parser)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return parser(*args, **kwargs)
            except ByokError:
                raise
            except Exception as exc:  # noqa: BLE001  # the rule: untrusted input never escapes untyped
                error = make_error(
                    f"the input could not be parsed ({parser.__name__}: {type(exc).__name__})"
                )
                import logging

                logging.getLogger(LOGGER).warning(
                    "byok: refused an input %s could not parse (%s): %s",
                    parser.__qualname__,
                    type(exc).__name__,
                    error.reason,
                )
                raise error from None

        return guarded

    return decorate
