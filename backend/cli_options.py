"""Options of a command group that people type before or after the sub-command.

``client --endpoint EP status`` and ``client status --endpoint EP`` both work: the group's
parser holds each option with its real default, and every sub-command's parser holds a copy
with ``default=argparse.SUPPRESS``, so a value given before the sub-command is not
overwritten by the copy's default (the sub-parser sets only what it saw). Given on both
sides, the later one (after the sub-command) wins.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

AddOptions = Callable[[Any], None]  # add_argument calls on a parser or argument group


class _Suppressing:
    """Stands in for a parser in ``add(...)``: every option it gets defaults to SUPPRESS."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self._p = parser

    def add_argument(self, *flags, **kw):
        kw["default"] = argparse.SUPPRESS
        kw.pop("required", None)  # required-ness is the group parser's to check
        return self._p.add_argument(*flags, **kw)

    def add_argument_group(self, *a, **kw):
        return _Suppressing(self._p.add_argument_group(*a, **kw))  # type: ignore[arg-type]


def shared_options(group: argparse.ArgumentParser, add: AddOptions) -> argparse.ArgumentParser:
    """Adds the options to ``group`` (real defaults) and returns a parent parser holding the
    SUPPRESS copies: pass it as ``parents=[...]`` to each ``add_parser`` of the group."""
    add(group)
    parent = argparse.ArgumentParser(add_help=False)
    add(_Suppressing(parent))
    return parent


def sub_parsers(subparsers, parent: argparse.ArgumentParser):
    """``subparsers.add_parser`` with the group's shared options added to every sub-command."""
    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        kw["parents"] = [*kw.get("parents", ()), parent]
        return subparsers.add_parser(name, **kw)
    return add_parser
