"""Prefect flow ``ablate`` (deployment ``mgllava/ablate``): the paper's ablation, one command.

For each variant (:data:`mgllava.ablation.VARIANTS`) and seed, the ``mgllava`` flow (full-train) runs
as a subflow on the same configuration with :func:`mgllava.ablation.variant_overrides`: its upstream
stages (world and tiny models, detector, boxes) are the same cached tasks and box table for every
variant, so each variant trains on the same detections, in the same data order, from the same seed,
and is evaluated on the same benchmarks. Each export is recorded in the warehouse
(``ablation_variants``); :data:`warehouse.ablation.ABLATION_SQL` then gives the ablation table, which
the run shows as a table artifact and a chart (accuracy by slice, every benchmark together).

Wiring only: the variants and the comparison are :mod:`mgllava.ablation`'s.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows import reports
from flows.full_train import full_train
from mgllava.ablation import (
    BASELINE,
    VARIANTS,
    comparison_chart,
    comparison_markdown,
    new_ablation_id,
    parse_variants,
    variant_overrides,
)
from mgllava.config import load_config


# the flow is named "mgllava", as full-train's: the deployment is mgllava/ablate beside mgllava/full-train
@flow(name="mgllava", flow_run_name="ablate-{preset}", log_prints=False)
def ablate(
    preset: str | None = "tiny",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    benchmarks: list[str] | None = None,
    work_dir: str | None = None,
    fresh: bool = False,
) -> list[dict]:
    """Train and evaluate each variant (default: all four; the baseline ``low`` always) for each seed
    (default: ``train.seed``); returns the ablation table's rows (:data:`warehouse.ablation.COLUMNS`).

    ``preset``/``config_file``/``overrides``/``benchmarks``/``work_dir``/``fresh`` as the full-train flow's.
    """
    from warehouse.ablation import ablation_table, record_variant

    reports.project_logs()
    logger = get_run_logger()
    extra = list(overrides or []) + ([f"work_dir={work_dir}"] if work_dir else [])
    config = load_config(preset=None if config_file else preset, path=config_file, overrides=extra)
    chosen, seeds = parse_variants(variants or list(VARIANTS)), list(seeds or [config.train.seed])
    ablation_id = new_ablation_id()
    logger.info("ablation %s: variants %s, seeds %s, work dir %s", ablation_id, ", ".join(chosen), seeds,
                config.work_dir)
    for seed in seeds:
        for variant in chosen:
            scores = full_train.with_options(flow_run_name=f"{variant}-seed-{seed}")(
                preset=preset, config_file=config_file, overrides=list(overrides or []) + variant_overrides(
                    config, variant, seed), benchmarks=benchmarks, work_dir=work_dir, fresh=fresh)
            checkpoints = {row["checkpoint"] for row in scores}
            if len(checkpoints) != 1:
                raise RuntimeError(f"variant {variant} (seed {seed}): expected one evaluated export, got {checkpoints}")
            variant_config = load_config(preset=None if config_file else preset, path=config_file,
                                         overrides=extra + variant_overrides(config, variant, seed))
            record_variant(ablation_id, variant, list(VARIANTS[variant]), seed, BASELINE, checkpoints.pop(),
                           variant_config)
    rows = ablation_table(ablation_id)
    _publish(ablation_id, rows, Path(config.work_dir) / "ablation" / ablation_id)
    logger.info("ablation %s done: %d rows (SELECT ... see docs/warehouse.md, 'The ablation table')", ablation_id,
                len(rows))
    return rows


def _publish(ablation_id: str, rows: list[dict], out_dir: Path) -> None:
    """The ablation table as a table artifact, and the chart with the Markdown table under it."""
    create_table_artifact(
        key="ablation-table",
        table=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows],
        description=f"Ablation {ablation_id}: variant x benchmark x slice, delta to {BASELINE} and its standard error",
    )
    if rows:
        chart = comparison_chart(rows, out_dir / "ablation.png")
        reports.publish_picture("ablation-chart", "Ablation: accuracy by slice", chart,
                                f"Ablation {ablation_id}", comparison_markdown(rows))
