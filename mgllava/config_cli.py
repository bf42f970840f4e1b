"""``mgllava config``: show the resolved configuration, or check it."""

from __future__ import annotations

import argparse
import sys

MODEL_PATHS = ("model.llm.path", "model.vision.clip_path", "model.vision.convnext_path")


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args

    parser = subparsers.add_parser(
        "config",
        help="print the resolved configuration (preset + file + overrides) as YAML",
        description="Resolve a preset or YAML file with --set overrides, validate it (every field, benchmark "
        "names included), and print it. With --check, also fail if a model path it gives does not exist; "
        "fields still holding a preset's ??? placeholder are listed on stderr as not set, without failing.",
    )
    add_config_args(parser)
    parser.add_argument("--check", action="store_true",
                        help="check that the model's local paths exist and list the fields not set yet")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mgllava.cli import config_from_args

    config = config_from_args(args)
    if args.check:
        unset = config.unset_fields()
        config.check_paths(*(field for field in MODEL_PATHS if field not in unset))
        if unset:
            print(f"not set yet (give each with --set FIELD=VALUE before training): {', '.join(unset)}",
                  file=sys.stderr)
    print(config.to_yaml(), end="")
    return 0
