"""Memory sizes: the default budget and the user's way of writing one (shared by `index build`,
`probe` and the Python API)."""

from __future__ import annotations

import os
import re

from embedder.errors import EmbedderError


def default_budget() -> int:
    """A quarter of physical RAM (4 GiB where the platform does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def parse_size(text: str, error: type[EmbedderError] = EmbedderError) -> int:
    """'512MB', '2GB', '1.5GiB', '1000000' → bytes (powers of 1024: budgets are memory)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise error(f"cannot read the memory budget {text!r}; write e.g. 512MB or 2GB")
    size = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))
    if size <= 0:
        raise error(f"the memory budget must be more than 0 bytes, got {text!r}; write e.g. 512MB or 2GB")
    return size
