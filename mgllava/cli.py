"""The ``mgllava`` command: one CLI, one subcommand per pipeline piece.

Each subcommand is registered by a light module (no torch import at module
level) through a ``register_cli(subparsers)`` function, so ``mgllava --help``
answers at once. Commands that need a configuration take the shared
``--preset`` / ``--config`` / ``--set`` options (see :func:`add_config_args`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mgllava.config import ConfigError, list_presets, load_config

# modules that add subcommands, in the order --help lists them
SUBCOMMAND_MODULES = (
    "mgllava.world",
    "mgllava.zoo",
    "mgllava.reader",
    "detector.cli",
    "mgllava.train.cli",
    "mgllava.eval.cli",
    "mgllava.convert",
    "mgllava.services",
    "mgllava.config_cli",
    "mgllava.show_sample",
)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    source = group.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        metavar="NAME",
        help=f"configuration preset ({', '.join(list_presets())}); default: tiny, the embedded default",
    )
    source.add_argument("--config", metavar="FILE", help="YAML configuration file (instead of a preset)")
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
    parser = argparse.ArgumentParser(
        prog="mgllava",
        description="MG-LLaVA pipeline: generate the shapes world, build models, detect boxes, "
        "train in two stages with DeepSpeed, evaluate with lmms-eval, query results in DuckDB.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
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
