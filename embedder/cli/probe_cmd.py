"""`embedder probe` and `embedder predict`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional, cast

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from embedder import choices
from embedder.cli.common import console, handle_errors, image_progress, out, setup_logging
from embedder.cli.extract_cmd import EXIT_SOME_FAILED
from embedder.learn.options import ProbeOptions

LABELS_HELP = ("CSV or Parquet of id,label rows (e.g. from the labelling page): joined on the stores' 'id' "
               "(TRAIN_STORE and --test), its labels put over the stores' own; rows it does not name keep theirs, "
               "ids in neither store are ignored and counted.")


@handle_errors
def probe_command(
    train_store: Annotated[str, typer.Argument(help="Store with labelled training vectors.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Probe file to write (safetensors + JSON); not needed with --zero-shot-only.")] = None,
    test: Annotated[Optional[str], typer.Option(help="Store with labelled test vectors.")] = None,
    label_column: Annotated[str, typer.Option(help="Column holding the class name.")] = ProbeOptions.label_column,
    labels: Annotated[Optional[list[Path]], typer.Option("--labels", help="Repeatable (rounds of labelling: a later file wins for an id). " + LABELS_HELP + " Then the probe is also retrained on 1, 2, 5, 10, … of the file's labels per class: accuracy against the number of labels (--no-curve: not).")] = None,
    curve: Annotated[bool, typer.Option("--curve/--no-curve", help="With --labels: the learning curve (seconds, capped; on --test, else the store's own labels the file does not touch, else K-fold).")] = True,
    val_fraction: Annotated[float, typer.Option(help="Held out from train to choose C.")] = ProbeOptions.val_fraction,
    seed: Annotated[int, typer.Option()] = ProbeOptions.seed,
    standardize: Annotated[choices.Standardize, typer.Option(help="Standardise features (auto: chosen with C on held-out predictions).")] = choices.Standardize(ProbeOptions.standardize),
    knn_k: Annotated[int, typer.Option(help="k of the kNN baseline.")] = ProbeOptions.knn_k,
    backend: Annotated[choices.ProbeBackend, typer.Option(help="The solver: embedder's float32 L-BFGS, every fold and C batched (auto: on CUDA when present, else the CPU).")] = choices.ProbeBackend(ProbeOptions.backend),
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory the vectors may take, e.g. 512MB, 8GB (default: a quarter of RAM); larger stores are streamed from disk on every pass of the solver.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Directory for confusion-matrix PNG + metrics.json.")] = None,
    zero_shot: Annotated[bool, typer.Option("--zero-shot/--no-zero-shot", help="On a store whose backbone has a text tower (open_clip:…), also report zero-shot accuracy: the class names through prompt templates, no training.")] = True,
    zero_shot_only: Annotated[bool, typer.Option("--zero-shot-only", help="Only the zero-shot accuracy (on --test, else on TRAIN_STORE's labelled images, which it never trains on); no probe is trained or written.")] = False,
    prompts: Annotated[Optional[list[str]], typer.Option("--prompt", help="Zero-shot prompt template with {} for the class name (repeatable; default: OpenCLIP's 7-prompt ensemble, e.g. 'a bad photo of the {}.').")] = None,
    class_names: Annotated[Optional[Path], typer.Option("--class-names", help="Zero-shot: words for labels that are not (numbers: a WebDataset's .cls): label,name rows, or one name per line in the order of the labels 0, 1, …")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Weights file, if the store was made from one (only zero-shot needs it: the probe runs without).")] = None,
    device: Annotated[str, typer.Option(help="Device for the zero-shot text tower.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a linear probe (logistic regression, C chosen on validation) and a kNN baseline; with a
    CLIP-family backbone, zero-shot accuracy beside them."""
    from embedder.learn import probe as pr

    setup_logging(verbose)
    if out_file is None and not zero_shot_only:
        raise pr.ProbeError("--out PROBE is needed (the probe file to write), unless --zero-shot-only")
    from embedder.sizes import parse_size

    budget = parse_size(memory_budget, pr.ProbeError) if memory_budget is not None else None
    opts = ProbeOptions(label_column=label_column, val_fraction=val_fraction, seed=seed,
                        standardize=str(standardize), knn_k=knn_k, backend=str(backend), memory_budget=budget)
    from embedder.store.labels import LabelJoin, read_labels

    join = LabelJoin(read_labels(labels)) if labels else None
    train = pr.load_dataset(str(train_store), label_column, memory_budget=budget, labels=join)
    test_ds = pr.load_test(str(test), train, label_column, budget, join) if test else None
    joined = join.require_some(str(train_store) + (f" or {test}" if test else "")) if join else None
    if joined is not None and not as_json:
        out.print(joined.summary(), markup=False)
    if test_ds is not None and test_ds.unseen:
        console.print(f"[yellow]warning:[/yellow] test classes not in train are dropped: {', '.join(test_ds.unseen)}")
    if train.dropped_unlabelled and joined is not None:
        if not as_json:  # expected with a labels file over an unlabelled pool: a note, not a warning
            console.print(f"note: {train.dropped_unlabelled:,} rows labelled neither by {join.file.path if join else labels} nor by the store "
                          "take no part", markup=False)
    elif train.dropped_unlabelled:
        console.print(f"[yellow]warning:[/yellow] {train.dropped_unlabelled} unlabelled rows ignored")

    from embedder.learn.zeroshot import read_class_names, zero_shot_metrics

    names = read_class_names(class_names, train.classes) if class_names is not None else None
    zs = zero_shot_metrics(train, test_ds, prompts, weights, device, wanted=zero_shot or zero_shot_only,
                           required=zero_shot_only, class_names=names)
    if zero_shot_only:
        if as_json:
            out.print_json(json.dumps({"zero_shot": zs}))
        elif zs is not None:  # --zero-shot-only without a text tower has raised
            _print_zero_shot(zs)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, disable=as_json)
    with progress:
        task = progress.add_task("C sweep", total=None)

        def tick(done: int, total: int, desc: str) -> None:
            progress.update(task, completed=done, total=total, description=desc)

        result = pr.train_probe(train, opts, tick)
    t_metrics = time.perf_counter()
    metrics: dict[str, Any] = (pr.test_metrics(result, train, test_ds, opts) if test_ds is not None
                               else {"knn_k": opts.knn_k})
    if zs is not None:
        metrics["zero_shot"] = zs
    result.metrics = metrics
    result.seconds += time.perf_counter() - t_metrics  # the whole probe: choice of C, refit, test, kNN
    if joined is not None:
        result.labels = joined.to_dict()
        if curve:
            from embedder.learn.curve import learning_curve

            with progress:
                result.curve = learning_curve(train, test_ds, opts, progress=tick, full=result)
    out_file = cast(Path, out_file)  # given: checked above unless --zero-shot-only, which has returned
    pr.save_probe(out_file, result)
    if report:
        pr.write_report(report, result)
    data = pr.result_json(result)
    if as_json:
        out.print_json(json.dumps({k: v for k, v in data.items() if k != "sweep"}))
        return
    out.print(f"probe → {out_file}  ({result.backend}, {result.seconds:.1f} s: choosing C "
              f"{result.select_seconds:.1f} s, refit {result.refit_seconds:.1f} s)")
    out.print(f"{result.selection}; refit on {result.n_train} train images, {len(train.classes)} classes",
              markup=False)
    if isinstance(train.x, pr.StoreRows):
        out.print(f"vectors streamed from the store on every pass ({result.n_train} x {train.dim} float32 "
                  f"over --memory-budget)", markup=False)
    if "test" in metrics:
        t = metrics["test"]
        line = f"test accuracy {t['accuracy']:.4f}  balanced {t['balanced_accuracy']:.4f}"
        if "top5_accuracy" in t:
            line += f"  top-5 {t['top5_accuracy']:.4f}"
        out.print(line + f"  kNN (k={knn_k}) {metrics['knn_test_accuracy']:.4f}  on {metrics['n_test']} images")
        table = Table("class", "precision", "recall", "F1", "support")
        for c, r in t["per_class"].items():
            table.add_row(c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
        out.print(table)
    else:
        out.print("no --test store: only validation accuracy is reported")
    if zs is not None:
        _print_zero_shot(zs)
    if result.curve is not None:
        print_curve(result.curve)
    if report:
        out.print(f"report → {report}/confusion_matrix.png, {report}/metrics.json")


def print_curve(c: dict[str, Any]) -> None:
    """The learning curve: labels → accuracy."""
    if c.get("skipped"):
        out.print(f"learning curve skipped: {c['skipped']}", markup=False)
        return
    spread = any(p["sd"] is not None for p in c["points"])
    table = Table("per class", "labels", "accuracy", *(["± sd (draws)"] if spread else []),
                  title=f"labels → accuracy: scored on {c['on']}, {c['n_eval']:,} images "
                        f"({c['classes']} classes, {c['seconds']:.1f} s)")
    for p in c["points"]:
        row = [str(p["per_class"]), f"{p['labels']:,}", f"{p['accuracy']:.4f}"]
        if spread:
            row.append(f"{p['sd']:.4f} ({p['draws']})" if p["sd"] is not None else "")
        table.add_row(*row)
    out.print(table)
    for note in c.get("notes", []):
        out.print(f"  note: {note}", markup=False)


def _print_zero_shot(zs: dict[str, Any]) -> None:
    if zs.get("skipped"):
        out.print(f"zero-shot skipped: {zs['skipped']}", markup=False)
        return
    line = f"zero-shot accuracy {zs['accuracy']:.4f}  balanced {zs['balanced_accuracy']:.4f}"
    if "top5_accuracy" in zs:
        line += f"  top-5 {zs['top5_accuracy']:.4f}"
    n = len(zs["templates"])
    out.print(line + f"  on {zs['n']} {zs['on']} images, {n} prompt{'s' if n != 1 else ''} per class", markup=False)


@handle_errors
def predict_command(
    probe: Annotated[Path, typer.Argument(help="Probe file or finetune checkpoint.")],
    sources: Annotated[list[str], typer.Argument(help="Images, folders, globs or lists.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", "-o", help="Parquet predictions.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1)] = 5,
    weights: Annotated[Optional[str], typer.Option(help="Weights file, if the probe's store was made from one.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Classify images with a probe; embeds them exactly as the probe's training store was."""
    from embedder.learn.predict import predict, write

    with image_progress("predicting", enabled=not as_json and out_file is not None) as progress:
        pred = predict(probe, sources, top_k, device, weights, progress=progress)
    if out_file:
        write(pred, out_file)
        console.print(f"{pred.table.num_rows} predictions → {out_file}")
    elif as_json:
        for row in pred.table.to_pylist():
            out.print(json.dumps(row), soft_wrap=True, markup=False)
    else:
        table = Table("path", "predicted", "probability", f"top-{top_k}")
        for row in pred.table.to_pylist():
            top = ", ".join(f"{lab} {p:.2f}" for lab, p in zip(row["top_k_labels"], row["top_k_probs"]))
            table.add_row(row["path"], row["predicted"], f"{row['probability']:.3f}", top)
        out.print(table)
    for path, reason in pred.failures[:10]:
        console.print(f"  [red]failed[/red] {path}: {reason}")
    if pred.failures:
        raise typer.Exit(EXIT_SOME_FAILED)


def register(app: typer.Typer) -> None:
    app.command("probe")(probe_command)
    app.command("predict")(predict_command)
