"""Domain exceptions. The library raises these; only the CLI (and later the HTTP layer) turns
them into one-line messages and exit codes."""

from __future__ import annotations

from collections.abc import Iterable


class EmbedderError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class UnknownBackbone(EmbedderError):
    pass


class UnknownLayer(EmbedderError):
    pass


class WeightsUnavailable(EmbedderError):
    pass


class WeightsMismatch(EmbedderError):
    pass


class SourceError(EmbedderError):
    pass


class StoreError(EmbedderError):
    pass


class ProvenanceMismatch(StoreError):
    pass


class TextQueryError(EmbedderError):
    """A text query the model cannot take: empty, over its context length, or a model with no text tower."""


class DecodeError(EmbedderError):
    """One image could not be turned into pixels; recorded and skipped, never fatal."""


class DeviceError(EmbedderError):
    pass


class ProbeError(EmbedderError):
    pass


class IndexError_(EmbedderError):
    """Index problems (named with a trailing underscore to avoid shadowing the builtin)."""


class FinetuneError(EmbedderError):
    pass


class InspectError(EmbedderError):
    pass


class ExportError(EmbedderError):
    """``embedder export``: a file that is no checkpoint or probe, an operator the format cannot
    express, an exported model that does not compute what the source does."""


class RayError(EmbedderError):
    """The Ray engine: Ray missing, the cluster unreachable, or a worker that cannot run the model."""


def shown(value: object, limit: int = 80) -> str:
    """VALUE as it may be echoed in an error message: its repr, cut to LIMIT characters (input that
    arrives over HTTP is echoed back in the error body, never at whatever length it came in)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def closest(given: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """The candidates an error message suggests for GIVEN: a case-insensitive exact match first (``vit-b-32``
    → ``ViT-B-32``), then those that begin with it (``laion2b`` → ``laion2b_s34b_b79k``), then the
    closest by spelling (difflib), case ignored; at most N."""
    import difflib

    pool = list(dict.fromkeys(candidates))
    low = given.lower()
    lowered: dict[str, list[str]] = {}
    for c in pool:
        lowered.setdefault(c.lower(), []).append(c)
    out = list(lowered.get(low, []))
    out += [c for c in pool if c.lower().startswith(low) and c not in out] if low else []
    out += [c for m in difflib.get_close_matches(low, list(lowered), n=n, cutoff=cutoff) for c in lowered[m]
            if c not in out]
    return out[:n]
