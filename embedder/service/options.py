"""What the service is told, every default in one place (light: the CLI reads it at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, field

from embedder.decode.common import DEFAULT_MAX_PIXELS
from embedder.io.limits import MAX_IMAGE_BYTES


@dataclass(frozen=True)
class ServeOptions:
    home: str | None = None
    device: str = "auto"
    batch_window_ms: float = 5.0
    max_batch: int = 32
    micro_batching: bool = True
    max_upload_bytes: int = MAX_IMAGE_BYTES  # the largest image a tar shard may hold, too
    max_pixels: int = DEFAULT_MAX_PIXELS
    poll_seconds: float = 2.0  # how often each index's CURRENT pointer is checked; 0: never
    max_k: int = 1000
    max_queries: int = 1000  # queries in one request
    max_results: int = 100_000  # k × queries in one request (the size of the answer)
    # a JSON body is parsed whole before its queries can be counted (measured: 0.1 s and 40 MB of
    # Python objects per MiB of tiny id queries, the GIL held throughout), so its cap is far below
    # the upload's; 2 MiB holds 1,000 id queries or about 200 vectors of 512 floats
    max_json_bytes: int = 2 * 2**20
    max_text_queries: int = 32  # texts in one request: each is a forward pass of the text tower
    thumbnail_px: int = 256
    decode_threads: int | None = None  # None: the core count
    weights: dict[str, str] = field(default_factory=dict)  # index name → weights file (file-made stores)
    weight_files: tuple[str, ...] = ()  # weights files matched to indexes by the SHA-256 their stores record
