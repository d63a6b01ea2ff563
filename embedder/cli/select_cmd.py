"""`embedder select`: which images to label first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from embedder import choices
from embedder.cli.common import handle_errors, out, setup_logging, stage_progress

SELECT_LABELS_HELP = ("CSV or Parquet of id,label rows (e.g. from the labelling page): joined on the store's 'id', "
                      "put over the store's own labels; labelled images are never picked, ids not in the store are "
                      "ignored and counted.")


@handle_errors
def select_command(
    store: Annotated[str, typer.Argument(help="Store to pick from.")],
    budget: Annotated[int, typer.Option("--budget", "-n", min=1, help="How many images to pick.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Parquet file to write (replaced if it exists): id, path, rank (1 = label first), why.")] = None,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="Repeatable (rounds of labelling: a later file wins for an id). " + SELECT_LABELS_HELP)] = None,
    strategy: Annotated[choices.Strategy, typer.Option(help="auto: typical images while labels are few (none, one class, or under 2 in some class), then where the probe is least sure | typical (TypiClust) | uncertain (probe margin, spread by k-means) | diverse (k-center greedy).")] = choices.Strategy.auto,
    seed: Annotated[int, typer.Option(help="The same seed, store and labels give the same picks.")] = 0,
    label_column: Annotated[str, typer.Option(help="The store's column of class names (rows with one count as labelled).")] = "label",
    ignore_store_labels: Annotated[bool, typer.Option("--ignore-store-labels", help="Treat the store's own labels (class folders) as absent: for folders that are not classes; --labels still counts.")] = False,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="On a labelled store: hide the labels, pick 1, 2, 5, 10 images a class (up to --budget) and print LogisticRegression and kNN accuracy trained on the picks against as many random images (mean ± sd of 5 draws), scored on the labelled images not picked. Writes no selection.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="With --evaluate: the learning curve as a PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Which images to label first: a ranked list of --budget images, typical ones of each group while
    labels are few, then those the current probe is least sure of."""
    from embedder.learn import active

    setup_logging(verbose)
    if evaluate and out_file is not None:
        raise active.SelectError("--evaluate measures picks against random ones and writes no selection: leave out --out")
    if not evaluate and out_file is None:
        raise active.SelectError("--out FILE is needed (the Parquet file of picks to write), unless --evaluate")
    if plot is not None and not evaluate:
        raise active.SelectError("--plot draws --evaluate's learning curve: add --evaluate")
    files = [str(p) for p in labels] if labels else None
    with stage_progress(not as_json) as tick:
        if evaluate:  # the store's labels are the answer key here: never ignored
            ev = active.evaluate(store, budget, str(strategy), files, seed, label_column, tick=tick)
        else:
            sel = active.select(store, budget, str(strategy), files, seed,
                                None if ignore_store_labels else label_column, tick=tick)
    if evaluate:
        if plot is not None:
            active.plot_evaluation(ev, plot)
        if as_json:
            out.print_json(json.dumps(ev.to_dict()))
            return
        out.print(f"{ev.store}: {ev.labelled:,} labelled of {ev.images:,} images, {len(ev.classes)} classes; picks by "
                  f"{ev.strategy} with the labels hidden, against random picks; scored on {ev.test_rows:,} labelled "
                  f"images not picked ({ev.seconds:.1f} s)", markup=False)
        out.print(ev.table(), markup=False)
        if plot is not None:
            out.print(f"learning curve → {plot}", markup=False)
        return
    written = active.write_selection(out_file, sel)  # type: ignore[arg-type]  # checked above
    if as_json:
        out.print_json(json.dumps({**sel.metadata(), "out": written, "picked": sel.table.num_rows,
                                   "reason": sel.reason, "unlabelled": sel.unlabelled, "seconds": round(sel.seconds, 3),
                                   "labels": sel.joined.to_dict() if sel.joined else None}))
        return
    if sel.joined is not None:
        out.print(sel.joined.summary(), markup=False)
    out.print(f"{sel.summary()} → {written}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("select")(select_command)
