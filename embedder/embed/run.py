"""One entry point for an extraction run, whichever engine runs it (the CLI and the Python API
both call it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from embedder.embed.fill import ExtractSummary
from embedder.embed.options import EmbedOptions, RayOptions, RunOptions
from embedder.models.builder import ModelSpec


def run_extract(sources: Sequence[str], store_path: str, spec: ModelSpec, embed: EmbedOptions = EmbedOptions(),
                run: RunOptions = RunOptions(), ray: RayOptions | None = None,
                progress: Callable[[int, int, int], None] | None = None) -> ExtractSummary:
    """Embed every image under SOURCES not already in the store: locally, or on Ray when ``ray``
    says where (``RayOptions()``: a local Ray instance)."""
    if ray is not None:
        from embedder.embed.ray import extract_ray

        return extract_ray(sources, store_path, spec, embed, run, ray, progress)
    from embedder.embed.fill import extract

    return extract(sources, store_path, spec, embed, run, progress)
