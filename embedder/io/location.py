"""Where an image inside a container is: the one module that writes and parses location strings.

An image that is not a file of its own is located inside its container as ``CONTAINER#FRAGMENT``:

- a tar shard's member: ``SHARD#MEMBER`` (``/data/00003.tar#000031234.jpg``), and, as discovery
  writes it, with where the member's bytes lie in the (decompressed) tar appended:
  ``SHARD#MEMBER#@OFFSET:SIZE``. Decoding reads exactly those bytes (one ranged read; no header walk);
  a location without them (one written before they were recorded) is found by walking the headers;
- a table's row: ``FILE#COLUMN/GROUP/ROW``;
- what cannot be embedded, with the reason: ``CONTAINER#!KEY!reason`` (a sample with no image, a
  repeated key, a shard cut short): decoding records it in the store's errors table. A real
  member's or row's fragment that starts with ``!`` (or a backslash) is written with a backslash
  before it, so it is never read as one of these.

The container is found by its suffix (``.tar``, ``.tar.gz``, ``.tgz``, ``.parquet``, ``.arrow``,
``.feather``, ``.ipc``): the first ``#`` that follows one ends it, so a ``#`` in a member's or a
column's name is part of that name (a ``.tar#`` inside a *folder's* name is not supported). A string
with no such ``#`` is a plain path or URI.

An image's id is a hash of its location without the ``#@OFFSET:SIZE`` span (``identity``): the span
never changes an id, so stores written before spans were recorded keep their ids and a rerun skips
what they hold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = (".parquet", ".arrow", ".feather", ".ipc")
CONTAINER_SUFFIXES = TAR_SUFFIXES + TABLE_SUFFIXES
FAILED = "!"  # CONTAINER#!KEY!reason
ESCAPE = "\\"  # before a real fragment that starts with FAILED (or ESCAPE)
_SPAN = re.compile(r"#@(\d+):(\d+)$")

MEMBER = "member"  # a tar shard's member
ROW = "row"  # a table's row (COLUMN/GROUP/ROW)
FAILING = "failing"  # what cannot be embedded; ``member`` is its key, ``reason`` why


@dataclass(frozen=True)
class Location:
    """An image inside a container. ``member``: the tar member's name, the table's
    ``COLUMN/GROUP/ROW``, or a failing location's key; ``offset``/``size``: where a member's bytes
    lie in the (decompressed) tar, when discovery recorded it."""

    container: str
    kind: str
    member: str
    offset: int | None = None
    size: int | None = None
    reason: str | None = None  # FAILING only


def container_end(s: str) -> int | None:
    """The index of the ``#`` that ends the container in S, or None (a plain path)."""
    low = s.lower()
    i = s.find("#")
    while i >= 0:
        if low[:i].endswith(CONTAINER_SUFFIXES):
            return i
        i = s.find("#", i + 1)
    return None


def parse(s: str) -> Location | None:
    """S's location inside a container, or None for a plain path or URI."""
    end = container_end(s)
    if end is None:
        return None
    container, fragment = s[:end], s[end + 1:]
    if fragment.startswith(ESCAPE):  # a real fragment that starts with FAILED or ESCAPE
        fragment = fragment[1:]
    elif fragment.startswith(FAILED) and fragment.count(FAILED) >= 2:
        _, key, reason = fragment.split(FAILED, 2)
        return Location(container, FAILING, key, reason=reason)
    if not container.lower().endswith(TAR_SUFFIXES):
        return Location(container, ROW, fragment)
    m = _SPAN.search(fragment)
    if m is None or m.start() == 0:
        return Location(container, MEMBER, fragment)
    return Location(container, MEMBER, fragment[:m.start()], int(m.group(1)), int(m.group(2)))


def format(loc: Location) -> str:  # noqa: A001 - the inverse of ``parse``
    """The string ``parse`` reads back as LOC."""
    if loc.kind == FAILING:
        return f"{loc.container}#{FAILED}{loc.member}{FAILED}{loc.reason or ''}"
    fragment = ESCAPE + loc.member if loc.member.startswith((FAILED, ESCAPE)) else loc.member
    out = f"{loc.container}#{fragment}"
    if loc.kind == MEMBER and loc.offset is not None and loc.size is not None:
        out += f"#@{loc.offset}:{loc.size}"
    return out


def identity(s: str) -> str:
    """S without a member's ``#@OFFSET:SIZE`` span: what an image's id is a hash of."""
    m = _SPAN.search(s)
    if m is None:
        return s
    loc = parse(s)
    return s[:m.start()] if loc is not None and loc.kind == MEMBER and loc.offset is not None else s


def member(container: str, name: str, offset: int | None = None, size: int | None = None) -> str:
    return format(Location(container, MEMBER, name, offset, size))


def row(container: str, column: str, group: int, index: int) -> str:
    return format(Location(container, ROW, f"{column}/{group}/{index}"))


def failing(container: str, key: str, reason: str) -> str:
    return format(Location(container, FAILING, key, reason=reason))


def refusal(fragment: str) -> str | None:
    """The reason a location's fragment carries (``!KEY!reason``), or None for a real one."""
    return fragment.split(FAILED, 2)[2] if fragment.startswith(FAILED) and fragment.count(FAILED) >= 2 else None
