"""``mgllava train`` (and ``python -m mgllava.train``, the launcher's entry point)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys


def _add_stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage", required=True, choices=("pretrain", "finetune"), help="which stage to run")
    parser.add_argument("--run-id", help="id that groups the stages' metrics in the warehouse (default: new)")
    parser.add_argument(
        "--fresh", action="store_true", help="discard this stage's checkpoints instead of resuming from them"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar (logs only)")


def fail_on_sigterm() -> None:
    """Make SIGTERM (a launcher stopping its ranks, a cancelled flow) raise :class:`SystemExit` in the
    main thread, so the stage is marked failed, with the signal as its reason, before the process ends."""

    def stop(signum, frame):
        raise SystemExit(f"terminated by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)


def register_cli(subparsers) -> None:
    from mgllava.cli import add_config_args

    parser = subparsers.add_parser(
        "train",
        help="run one training stage (pretrain or finetune) on a DeepSpeed engine",
        description="Train MG-LLaVA for one stage of the recipe: pretrain (fusion, projector and box "
        "projector) or finetune (those and the LLM, starting from the pretrain weights). Resumes from the "
        "stage's last checkpoint. Runs in this process (a world of one), or with --launcher under the "
        "`deepspeed` launcher (--num-gpus, or --hostfile for several nodes). Set DS_ACCELERATOR=cpu on a "
        "machine without a GPU.",
    )
    add_config_args(parser)
    _add_stage_args(parser)
    parser.add_argument("--launcher", action="store_true", help="run under the `deepspeed` launcher")
    parser.add_argument("--num-gpus", type=int, help="with --launcher: GPUs (processes) on this node")
    parser.add_argument("--hostfile", help="with --launcher: DeepSpeed hostfile for multi-node training")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from mgllava.cli import config_from_args
    from mgllava.train.job import StageBusy, new_run_id, train

    config = config_from_args(args)
    run_id = args.run_id or new_run_id()
    fail_on_sigterm()
    try:
        if args.launcher:
            from mgllava.train.launch import run_stage_job

            summary = run_stage_job(config, args.stage, run_id, print, args.num_gpus, args.hostfile, args.fresh)
        else:
            summary = train(config, args.stage, run_id=run_id, fresh=args.fresh, progress=not args.quiet)
    except StageBusy as exc:
        print(f"mgllava train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mgllava.train`` (what the ``deepspeed`` launcher runs per rank)."""
    from mgllava.cli import add_config_args, config_from_args
    from mgllava.train.job import train
    from mgllava.train.launch import RESULT_PREFIX

    parser = argparse.ArgumentParser(prog="python -m mgllava.train", description=__doc__)
    add_config_args(parser)
    _add_stage_args(parser)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    fail_on_sigterm()
    summary = train(config, args.stage, run_id=args.run_id, fresh=args.fresh, progress=not args.quiet)
    if summary:
        print(RESULT_PREFIX + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
