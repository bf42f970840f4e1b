"""``mgllava config``: show the resolved configuration, or check its paths."""

from __future__ import annotations

import argparse


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args

    parser = subparsers.add_parser(
        "config",
        help="print the resolved configuration (preset + file + overrides) as YAML",
        description="Resolve a preset or YAML file with --set overrides, validate it, and print it. "
        "With --check, also fail if a model path it names does not exist.",
    )
    add_config_args(parser)
    parser.add_argument("--check", action="store_true", help="check that the model's local paths exist")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mgllava.cli import config_from_args

    config = config_from_args(args)
    if args.check:
        config.check_paths("model.llm.path", "model.vision.clip_path", "model.vision.convnext_path")
    print(config.to_yaml(), end="")
    return 0
