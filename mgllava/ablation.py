"""The paper's ablation: does each granularity help? Variants, their configurations, the comparison.

MG-LLaVA reads three granularities (SPEC section 1); ``model.granularities`` selects which:

==================== ======================== ==============================================
variant              granularities            what the model reads
==================== ======================== ==============================================
``low``              low                      CLIP tokens only (LLaVA-1.5): the baseline
``low+high``         low, high                CLIP tokens fused with ConvNeXt by the Conv-Gate
``low+objects``      low, objects             CLIP tokens, then one token per box (RoIAlign
                                              over the ConvNeXt maps); no fusion
``low+high+objects`` low, high, objects       MG-LLaVA
==================== ======================== ==============================================

An ablation (the Prefect flow ``ablate``, ``mgllava ablate``) trains each chosen variant for each
seed from one configuration: the same corpora, the same box table, the same data order and seed
(:func:`variant_overrides` changes nothing else), evaluates each on the same benchmarks, and records
each variant's export in the warehouse (:func:`warehouse.ablation.record_variant`), whose
:data:`warehouse.ablation.ABLATION_SQL` gives variant x benchmark x slice with the delta to the
baseline and its standard error. :func:`comparison_markdown` and :func:`comparison_chart` present
those rows.
"""

from __future__ import annotations

import argparse
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path

from mgllava.config import GRANULARITIES

VARIANTS: dict[str, tuple[str, ...]] = {
    "low": ("low",),
    "low+high": ("low", "high"),
    "low+objects": ("low", "objects"),
    "low+high+objects": GRANULARITIES,
}
"""The paper's ablation variants by name; the name is the granularities joined by ``+``."""

BASELINE = "low"
"""The variant every delta is taken against (LLaVA-1.5: low-resolution tokens only)."""

SLICES: tuple[str, ...] = ("all", "object:small", "object:medium", "object:large", "small text")
"""The question slices of the comparison (see :mod:`warehouse.ablation`)."""


def variant_name(granularities) -> str:
    """``["low", "high"]`` -> ``"low+high"`` (canonical order)."""
    return "+".join(g for g in GRANULARITIES if g in granularities)


def parse_variants(names) -> list[str]:
    """Variant names (a list, or ``"a,b"``) checked against :data:`VARIANTS`, in the table's order; the
    baseline is always included (every delta needs it). Raises ``ValueError`` naming an unknown one."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from: {', '.join(VARIANTS)}")
    return [v for v in VARIANTS if v in names or v == BASELINE]


def variant_overrides(config, variant: str, seed: int) -> list[str]:
    """``--set`` overrides that make ``config`` one variant and seed: ``model.granularities``, ``train.seed``
    and the training output under ``<train.output_dir>/ablation/<variant>/seed-<seed>``; nothing else
    changes (corpora, boxes, recipe, benchmarks), so the variants see the same data in the same order."""
    out = Path(config.train.output_dir) / "ablation" / variant / f"seed-{seed}"
    return [f"model.granularities=[{','.join(VARIANTS[variant])}]", f"train.seed={seed}", f"train.output_dir={out}"]


def new_ablation_id() -> str:
    return datetime.now(timezone.utc).strftime("ablation-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _cell(row: dict) -> str:
    """``"0.812 ± 0.03 (+0.051 ± 0.04)"``: accuracy and its standard error, then the delta to the baseline."""
    text = f"{row['accuracy']:.3f} ± {row['accuracy_se']:.3f}"
    if row.get("delta") is not None:
        text += f" ({row['delta']:+.3f} ± {row['delta_se']:.3f})"
    return text


def comparison_markdown(rows: list[dict]) -> str:
    """The ablation table as Markdown: one line per benchmark and slice, one column per variant, each
    cell the accuracy ± its standard error and (delta to the baseline ± its standard error); n per slice
    is the baseline's number of answered questions (over its seeds)."""
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["benchmark"], row["slice"]), {})[row["variant"]] = row
    lines = ["| benchmark | slice | n | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for (benchmark, slice_), by_variant in cells.items():
        n = (by_variant.get(BASELINE) or next(iter(by_variant.values())))["n"]
        lines.append(f"| {benchmark} | {slice_} | {n} | "
                     + " | ".join(_cell(by_variant[v]) if v in by_variant else "" for v in variants) + " |")
    return "\n".join(lines)


def comparison_chart(rows: list[dict], out: str | Path, benchmark: str = "(all)") -> Path:
    """A PNG bar chart of ``benchmark``'s rows: accuracy per slice (groups) and variant (bars), with
    one-standard-error bars."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r["benchmark"] == benchmark]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    slices = [s for s in SLICES if any(r["slice"] == s for r in rows)]
    by_key = {(r["variant"], r["slice"]): r for r in rows}
    fig = Figure(figsize=(1.6 + 1.3 * max(1, len(slices)), 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(slices))]
        found = [by_key.get((variant, s)) for s in slices]
        ax.bar(xs, [r["accuracy"] if r else math.nan for r in found], width,
               yerr=[r["accuracy_se"] if r else 0.0 for r in found], capsize=2, label=variant)
    ax.set_xticks(range(len(slices)), [f"{s}\n(n={by_key.get((BASELINE, s), {}).get('n', '?')})" for s in slices])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Ablation: {benchmark} benchmark questions by slice (bars: ±1 s.e.)")
    ax.legend(fontsize=8, loc="lower right")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


# ------------------------------------------------------------------ command line


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``mgllava ablate``: the Prefect flow ``ablate`` in this process (``mgllava.cli`` runs it)."""
    from mgllava.cli import add_config_args, comma_list
    from mgllava.eval.tasks import BENCHMARKS

    parser = subparsers.add_parser(
        "ablate",
        help="the paper's ablation: train and evaluate each granularity variant, compare them by slice",
        description="Run the Prefect flow of the deployment mgllava/ablate in this process: for each variant "
        "and seed the full-train flow, whose shared stages (world and tiny models, detector, boxes) are "
        "computed once and reused, then pretrain -> finetune -> "
        "evaluate with the same data, order and seed, and print the ablation table (variant x benchmark x "
        "slice, delta to the low-res-only baseline with its standard error; also in the warehouse, "
        "see docs/warehouse.md). Variants: " + ", ".join(VARIANTS) + ".",
    )
    add_config_args(parser)
    parser.add_argument("--variants", type=comma_list(VARIANTS), metavar="A,B",
                        help=f"variants to train (default: all four; {BASELINE} is always included)")
    parser.add_argument("--seeds", type=_seeds, metavar="S,T",
                        help="training seeds, each variant trained once per seed (default: config train.seed)")
    parser.add_argument("--benchmarks", type=comma_list(BENCHMARKS), metavar="A,B",
                        help="comma-separated benchmarks (default: config eval.tasks)")
    parser.add_argument("--work-dir", metavar="DIR", help="put every output under DIR (default: config work_dir)")
    parser.add_argument("--fresh", action="store_true", help="recompute every stage instead of reusing results")
    parser.set_defaults(func=_run_cli)


def _seeds(text: str) -> list[int]:
    """Argument type: ``0,1,2`` -> ``[0, 1, 2]``."""
    try:
        return [int(item) for item in text.split(",") if item.strip()] or [int(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _run_cli(args: argparse.Namespace) -> int:
    from mgllava.config import load_config

    overrides = list(args.overrides) + ([f"work_dir={args.work_dir}"] if args.work_dir else [])
    # a bad configuration or a missing input fails here, at once, before any Prefect server starts
    load_config(preset=args.preset, path=args.config, overrides=overrides).check_run_inputs()
    rows = args.run_flow(preset=args.preset, config_file=args.config, overrides=args.overrides,
                         variants=args.variants, seeds=args.seeds, benchmarks=args.benchmarks,
                         work_dir=args.work_dir, fresh=args.fresh)
    print(comparison_markdown(rows))
    return 0 if rows else 1
