"""The ``mgllava`` command: one CLI, one subcommand per pipeline piece.

Each subcommand is registered by a light module (no torch import at module
level) through a ``register_cli(subparsers)`` function, so ``mgllava --help``
answers at once. Commands that need a configuration take the shared
``--preset`` / ``--config`` / ``--set`` options (see :func:`add_config_args`).

One language: ``--quiet`` (no progress bars), ``--fresh`` (start over),
``--warehouse FILE``, ``--benchmarks a,b``, ``--classes a,b``; ``-v/--verbose``
before or after the subcommand. A user error is one line naming the argument,
exit code 2, before any heavy work starts (argparse errors, argument types such
as :func:`existing_path`, :class:`UsageError`, configuration errors). Prefect
keeps its state under ``$MGLLAVA_HOME/prefect`` for every command.

This module is the top floor: the one module of the library allowed to import
``flows`` (Prefect), for ``mgllava run`` (the full-train flow called in this
process), ``mgllava ablate`` (the ablate flow, likewise) and ``mgllava detect
--dask-address`` (the detect flow on a Dask cluster). Every other command runs
the library directly.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from mgllava.config import ConfigError, list_presets, load_config, mgllava_home

# modules that add subcommands, in the order --help lists them
SUBCOMMAND_MODULES = (
    "mgllava.shapes.world",
    "mgllava.shapes.zoo",
    "detector.cli",
    "mgllava.train.cli",
    "mgllava.eval.cli",
    "mgllava.convert",
    "mgllava.services",
    "mgllava.config_cli",
    "mgllava.show_sample",
    "mgllava.ablation",
)

OWN_LOGGERS = ("mgllava", "detector", "warehouse", "flows")


class UsageError(Exception):
    """A command-line mistake found by a command: one line naming ``argument``, exit code 2."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit code 2, and whose every
    (sub)command accepts ``-v/--verbose``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand without -v leaves the top level's value alone
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def existing_path(text: str) -> str:
    """Argument type: a file or directory that exists."""
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text} not found")
    return str(Path(text).expanduser())


def positive_int(text: str) -> int:
    """Argument type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def comma_list(choices=None):
    """Argument type: ``a,b`` -> ``["a", "b"]``, each one of ``choices`` when given."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give one or more names, comma-separated")
        unknown = [item for item in items if choices is not None and item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)} (choose from {', '.join(choices)})")
        return items

    return parse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        metavar="NAME",
        help=f"configuration preset ({', '.join(list_presets())}); default: tiny, the embedded default",
    )
    source.add_argument("--config", metavar="FILE", type=existing_path,
                        help="YAML configuration file (instead of a preset)")
    group.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one field, e.g. --set train.pretrain.lr=2e-4 (repeatable)",
    )


def config_from_args(args: argparse.Namespace):
    return load_config(preset=args.preset, path=args.config, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mgllava",
        description="MG-LLaVA pipeline: generate the shapes world, build models, detect boxes, "
        "train in two stages with DeepSpeed, evaluate with lmms-eval, query results in DuckDB.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _register_run(subparsers)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    subparsers.choices["detect"].set_defaults(on_dask=_detect_on_dask)
    subparsers.choices["ablate"].set_defaults(run_flow=_ablate_flow)
    return parser


def _register_run(subparsers) -> None:
    from mgllava.eval.tasks import BENCHMARKS

    parser = subparsers.add_parser(
        "run",
        help="the whole pipeline in this process, without `mgllava up` (the full-train flow, called directly)",
        description="Run the Prefect flow of the deployment full-train in this process: (world and tiny models) "
        "-> (detector training) -> detect -> pretrain -> finetune -> evaluate, then print the score table. "
        "No server or worker is needed: with `mgllava up` running the run shows in its UI, otherwise Prefect "
        "records it in a temporary local API under $MGLLAVA_HOME/prefect. Stages whose inputs did not change "
        "are reused from earlier runs (--fresh recomputes them).",
    )
    add_config_args(parser)
    parser.add_argument("--benchmarks", type=comma_list(BENCHMARKS), metavar="A,B",
                        help="comma-separated benchmarks (default: config eval.tasks)")
    parser.add_argument("--work-dir", metavar="DIR", help="put every output under DIR (default: config work_dir)")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage instead of reusing results")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mgllava.eval.cli import format_table

    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    # a bad configuration or a missing input fails here, at once, before any Prefect server starts
    load_config(preset=args.preset, path=args.config, overrides=overrides).check_run_inputs()
    _use_running_server()
    from flows.full_train import full_train

    preset = {"preset": args.preset} if args.preset else {}  # else the flow's default, the embedded one
    try:
        rows = full_train(**preset, config_file=args.config, overrides=args.overrides, benchmarks=args.benchmarks,
                          work_dir=args.work_dir, fresh=args.fresh)
    except Exception as exc:  # a stage failed: Prefect has logged it in full above (-v: the traceback too)
        if getattr(args, "verbose", False):
            raise
        print(f"mgllava run: failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    columns = ["task", "status", "metric", "value", "n", "reason"]
    print(format_table(columns, [tuple(r.get(c) for c in columns) for r in rows]))
    return 1 if any(r.get("status") == "failed" for r in rows) else 0


def _use_running_server() -> None:
    """Record the flow runs of this process in the Prefect server of `mgllava up`, when one runs; else
    Prefect's temporary local API, given time to create its database on a busy machine."""
    from mgllava.services import running_api_url

    api_url = running_api_url()
    if api_url and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = api_url
        print(f"recording the run in the Prefect server of `mgllava up`: {api_url.removesuffix('/api')}/runs")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _ablate_flow(**parameters) -> list[dict]:
    """``mgllava ablate``: the ablate flow (deployment mgllava/ablate) in this process."""
    _use_running_server()
    from flows.ablate import ablate

    return ablate(**parameters)


def _detect_on_dask(sources, out, settings, image_root, shard_size: int, fresh: bool, address: str):
    """``mgllava detect --dask-address``: the detect flow with its shards on that Dask scheduler."""
    from detector.pipeline import DetectResult
    from flows.detect import detect

    manifest = detect(sources=[str(s) for s in sources], out=str(out), settings=settings.to_json(),
                      image_root=image_root, shard_size=shard_size, fresh=fresh, dask_address=address)
    return DetectResult(out, manifest, skipped=manifest.get("_skipped", False),
                        computed_shards=manifest.get("runs", [{}])[-1].get("computed_shards", []))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_HOME", str(mgllava_home() / "prefect"))  # never ~/.prefect
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    # the project's own lines at INFO (DEBUG with -v); other libraries' only from WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"mgllava {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"mgllava {args.command}: configuration error: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        from warehouse.db import WarehouseBusy

        if not isinstance(exc, WarehouseBusy):
            raise
        print(f"mgllava {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
