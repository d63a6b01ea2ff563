"""Where a location points: a local path or an object-storage URI (through pyarrow.fs, one filesystem
per bucket and process), and the stable id a location gets."""

from __future__ import annotations

import hashlib
import os

from embedder.errors import SourceError
from embedder.io.location import FAILED, failing, identity, refusal

__all__ = ["FAILED", "failing", "filesystem", "image_id", "is_uri", "refusal"]


def is_uri(path: str | os.PathLike[str]) -> bool:
    """An object-storage location (s3://bucket/key, gs://…), read through pyarrow.fs."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def image_id(path: str | os.PathLike[str]) -> str:
    """A hash of PATH (made absolute unless a URI), without a shard member's ``#@OFFSET:SIZE`` span
    (``location.identity``): the ids of stores written before spans were recorded still match."""
    key = identity(str(path)) if is_uri(path) else os.path.abspath(identity(str(path)))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def filesystem(uri: str) -> tuple[object, str]:
    """(pyarrow FileSystem, path inside it) for URI; credentials and endpoint come from the usual
    environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …), one filesystem per bucket and process."""
    scheme, _, rest = uri.partition("://")
    bucket = rest.split("/", 1)[0]
    fs = _filesystems.get((scheme, bucket))
    if fs is None:
        import pyarrow.fs as pafs

        try:
            fs, _ = pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot open {uri}: {str(e).splitlines()[0][:200]}") from None
        _filesystems[(scheme, bucket)] = fs
    return fs, rest.rstrip("/")


_filesystems: dict[tuple[str, str], object] = {}
