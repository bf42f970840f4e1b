"""``mgllava evaluate``, ``mgllava results`` and ``mgllava chat`` (registered by :func:`register_cli`).

- ``evaluate --model DIR [--benchmarks pope,mmbench] [--max-workers N]``: the benchmarks in this
  process (:func:`mgllava.eval.evaluate.evaluate`, what the Prefect flow ``evaluate`` runs as
  tasks); prints the score table.
- ``results [--checkpoint DIR] [--benchmark NAME]``: the score table from the warehouse (``stale``
  marks a score that a later failed or skipped evaluation left standing);
  ``results --sql "SELECT ..."``: one read-only query, sandboxed (:func:`warehouse.db.sandboxed_query`):
  anything else is refused with one line and exit code 2; ``--plot FILE.png`` also draws the score
  history (:func:`mgllava.plots.score_history`).

A warehouse held by another process gives one line naming the file and the process, exit code 1.
- ``chat --model DIR --image PATH "question"``: detect, print the boxes, answer;
  ``--interactive``: a multi-turn chat, questions from stdin until EOF or ``exit``; ``--save FILE.png``:
  the image with those boxes drawn (:func:`mgllava.plots.boxed_image`).

Module import is light (no torch); the work is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from datetime import datetime


def _cell(value, width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    else:
        text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    cells = [[_cell(v, max_width) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args, comma_list, existing_path, positive_int
    from mgllava.eval.tasks import BENCHMARKS

    ev = subparsers.add_parser(
        "evaluate",
        help="evaluate an exported model on the benchmarks (lmms-eval), scores into the warehouse",
        description="Evaluate in this process (no Prefect server; the deployment `evaluate` runs the same "
        "as Prefect tasks): the benchmarks concurrently, with the stock lmms-eval prompts and metrics on "
        "local data (config eval.data_dirs). "
        "Scores and per-sample predictions go into the DuckDB warehouse; re-evaluating a checkpoint on a "
        "task replaces its rows. Benchmarks: " + ", ".join(BENCHMARKS) + ".",
    )
    add_config_args(ev)
    ev.add_argument("--model", required=True, type=existing_path, help="exported MG-LLaVA directory")
    ev.add_argument("--benchmarks", type=comma_list(BENCHMARKS), metavar="A,B",
                    help="comma-separated benchmarks (default: config eval.tasks)")
    ev.add_argument("--max-workers", type=positive_int, default=2, help="benchmarks evaluated at once (default 2)")
    ev.add_argument("--run-id", help="id of this evaluation run (default: new)")
    ev.add_argument("--warehouse", metavar="FILE", help="DuckDB warehouse (default $MGLLAVA_HOME/warehouse.duckdb)")
    ev.set_defaults(func=_evaluate)

    res = subparsers.add_parser(
        "results",
        help="print the score table, or run a read-only SQL query on the warehouse",
        description="Print the warehouse's score table (one row per checkpoint, task and metric; failed and "
        "skipped benchmarks with their reason; stale = the score is from an earlier run, score_run, because "
        "a later evaluation failed or was skipped), or with --sql run one read-only query (SELECT, WITH, "
        "DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) with file access limited to the box tables; anything else is "
        "refused (exit code 2). Tables: eval_runs, eval_tasks, scores, predictions, train_stages, "
        "train_steps, box_runs; views: boxes, box_rejects, box_detections, box_images.",
    )
    res.add_argument("--sql", help='one read-only query, e.g. "SELECT task, avg(score) FROM predictions GROUP BY 1"')
    res.add_argument("--checkpoint", help="only this checkpoint (export directory)")
    res.add_argument("--benchmark", metavar="NAME", help="only this benchmark")
    res.add_argument("--warehouse", metavar="FILE", help="DuckDB warehouse (default $MGLLAVA_HOME/warehouse.duckdb)")
    res.add_argument("--max-width", type=int, default=60, help="truncate cells to this many characters")
    res.add_argument("--wait", type=float, default=5.0,
                     help="seconds to wait for a warehouse another process is writing (default 5)")
    res.add_argument("--plot", metavar="FILE.png", type=png_path,
                     help="also draw the score history (each benchmark's headline score per evaluation, chance "
                     "dotted) into this PNG")
    res.set_defaults(func=_results)

    chat = subparsers.add_parser(
        "chat",
        help="ask an exported model about an image (boxes from the detector are shown)",
        description="Run the detector on the image, print the boxes it found, and answer the question with "
        "MG-LLaVA. --interactive reads one question per line from stdin until EOF or `exit`, a multi-turn "
        "chat: each question is asked after the earlier questions and answers (a question given on the "
        "command line opens it).",
    )
    add_config_args(chat)
    chat.add_argument("--model", required=True, type=existing_path, help="exported MG-LLaVA directory")
    chat.add_argument("--image", required=True, type=existing_path, help="image file")
    chat.add_argument("question", nargs="?", help="the question (omit with --interactive)")
    chat.add_argument("--interactive", action="store_true", help="read questions from stdin")
    chat.add_argument("--detector", help="Ultralytics weights or model YAML (default: config detector.model)")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--save", metavar="FILE.png", type=png_path,
                      help="save the image with the detector's boxes drawn (the boxes the model sees) to this PNG")
    chat.set_defaults(func=_chat)


def _evaluate(args: argparse.Namespace) -> int:
    from mgllava.cli import config_from_args
    from mgllava.eval.evaluate import evaluate, on_threads

    config = config_from_args(args)
    try:
        rows = evaluate(config, args.model, args.benchmarks, args.run_id, args.warehouse,
                        run_ready=on_threads(args.max_workers))
    except FileNotFoundError as exc:  # not an export directory
        print(f"mgllava evaluate: error: argument --model: {exc}", file=sys.stderr)
        return 2
    columns = ["task", "status", "metric", "value", "stale", "n", "reason"]
    print(format_table(columns, [tuple(r[c] for c in columns) for r in rows]))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _results(args: argparse.Namespace) -> int:
    import duckdb

    from warehouse.db import WarehouseBusy, first_line
    from warehouse.eval import read_only_query, score_table

    try:
        if args.sql:
            columns, rows = read_only_query(args.sql, db_path=args.warehouse, timeout=args.wait)
        else:
            columns, rows = score_table(args.checkpoint, args.benchmark, db_path=args.warehouse, timeout=args.wait)
    except duckdb.PermissionException as exc:  # not one read-only statement, or a file it may not touch
        print(f"mgllava results: refused: {first_line(exc)}", file=sys.stderr)
        return 2
    except (duckdb.Error, FileNotFoundError, WarehouseBusy) as exc:
        print(f"mgllava results: {first_line(exc)}", file=sys.stderr)
        return 1
    print(format_table(columns, rows, args.max_width))
    if args.plot:
        from mgllava.plots import score_history
        from warehouse.eval import score_history as history

        rows = history(db_path=args.warehouse, timeout=args.wait)
        if not rows:
            print("mgllava results: no scores to plot yet: evaluate a checkpoint first", file=sys.stderr)
            return 1
        print(f"score history ({len(rows)} scores) drawn in {score_history(rows, args.plot)}")
    return 0


def png_path(value: str) -> str:
    """An argument naming a PNG file to write (``.png``)."""
    if not value.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{value!r} does not end in .png")
    return value


def _stdin_questions() -> Iterator[str]:
    while True:
        if sys.stdin.isatty():
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def _chat(args: argparse.Namespace) -> int:
    from mgllava.cli import UsageError, config_from_args

    if not args.interactive and not args.question:
        raise UsageError("question", "give a question, or --interactive")
    from detector.errors import DetectorError
    from detector.model import DetectorSettings
    from mgllava.eval.chat import ChatSession

    config = config_from_args(args)
    settings = DetectorSettings.from_config(config.detector, model=args.detector)
    try:
        session = ChatSession(args.model, args.image, settings, max_new_tokens=args.max_new_tokens, stream=True)
    except (DetectorError, FileNotFoundError) as exc:
        print(f"mgllava chat: {exc}", file=sys.stderr)
        return 2
    print(session.describe_boxes())
    if args.save:
        from mgllava.plots import boxed_image

        print(f"boxes drawn in {boxed_image(session.image, session.detections, args.save)}")
    if args.question:
        print(f"Q: {args.question}", flush=True)
        session.ask(args.question)  # prints "A: " and the answer as it is generated
    if args.interactive:
        for _ in session.interact(_stdin_questions()):  # each answer printed as it is generated
            pass
    return 0
