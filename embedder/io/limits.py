"""How many bytes one image, or one small metadata member, may take: checked before it is read
(light: the CLI and the service read these at start-up)."""

from __future__ import annotations

# An image's encoded bytes: a tar shard's image member (a bigger one is that sample's recorded
# failure, never read) and the service's upload body (``ServeOptions.max_upload_bytes``).
MAX_IMAGE_BYTES = 20 * 2**20
# (``extract --max-image-mb`` / ``EmbedOptions.max_image_bytes`` raise it for a collection of larger
# files; every source checks it before reading: a file, an object, a tar member, a table row.)
# A sample's label, caption or JSON member (``.cls``, ``.txt``, ``.json``): a bigger one fails the
# sample before it is read, so a caption stored is at most this long.
MAX_METADATA_BYTES = 2**20


def too_big(name: str, size: int | None, limit: int) -> str:
    """The reason an image of SIZE bytes (None: unknown, more than LIMIT) is not read: one wording
    for every source."""
    over = f"is {size:,} bytes, over" if size is not None else "has more bytes than"
    return f"{name} {over} the {limit:,}-byte image limit (extract --max-image-mb raises it)"
