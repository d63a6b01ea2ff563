"""`embedder import`: vectors made elsewhere (Parquet, clip-retrieval output) become a store."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from embedder.cli.common import handle_errors, out


@handle_errors
def import_command(
    sources: Annotated[list[str], typer.Argument(help="Parquet files of vectors, folders or globs of them, or clip-retrieval output (img_emb/img_emb_N.npy with metadata/metadata_N.parquet); local or s3://…")],
    store: Annotated[str, typer.Option("--out", help="The store to write (created, or continued: a rerun goes on where the last one stopped).")],
    vector_column: Annotated[str, typer.Option(help="Parquet: the list or fixed-size-list column of numbers holding each vector.")] = "embedding",
    id_column: Annotated[Optional[str], typer.Option(help="Each row's id (default: 'id', clip-retrieval 'key', if present; else one made from the row's file and number). A repeated id is a recorded failure; the first one is kept.")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Each row's label (default: 'label' if present).")] = None,
    path_column: Annotated[Optional[str], typer.Option(help="Each row's image path or URL (default: 'path', clip-retrieval 'image_path' or 'url', if present; else the row's location in its file).")] = None,
    caption_column: Annotated[Optional[str], typer.Option(help="Each row's caption (default: 'caption' if present).")] = None,
    model: Annotated[str, typer.Option(help="What made the vectors, as recorded in the store's provenance. An OpenCLIP name (open_clip:ARCH:TAG) of the same dimension also records its text tower: text search and zero-shot then work.")] = "external",
    weights: Annotated[Optional[str], typer.Option(help="With an OpenCLIP --model: its weights file, when it is not a registry tag.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Import vectors made elsewhere into a store (index, search, probe and inspect work on it)."""
    from embedder.store.importer import ImportOptions, import_vectors

    s = import_vectors(sources, store, ImportOptions(vector_column=vector_column, id_column=id_column,
                                                     label_column=label_column, path_column=path_column,
                                                     caption_column=caption_column, model=model,
                                                     weights=weights))
    if as_json:
        out.print_json(json.dumps(s.to_dict()))
    else:
        skipped = f" ({s.sources_done_before} imported before)" if s.sources_done_before else ""
        out.print(f"{s.sources} sources{skipped}: {s.rows:,} rows read, {s.imported:,} imported, {s.failed:,} failed "
                  f"(duplicate id {s.duplicates:,}, NaN/inf {s.non_finite:,}, no vector {s.no_vector:,}, no id "
                  f"{s.no_id:,}) in {s.seconds:.1f} s → {s.store} ({s.dim}-d)")
        for i, reason in s.failures[:10]:
            out.print(f"  {i}: {reason}", markup=False)
    if s.failed:
        raise typer.Exit(3)


def register(app: typer.Typer) -> None:
    app.command("import")(import_command)
