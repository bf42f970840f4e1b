"""Evaluation: MG-LLaVA as an lmms-eval model, local benchmark tasks, results in DuckDB, and chat.

- :mod:`mgllava.eval.plugin`: the ``lmms_eval.models`` entry point (``--model mgllava``);
- :mod:`mgllava.eval.lmms_model`: the lmms-eval model class (batched greedy generation,
  boxes from the Parquet box tables or the on-the-fly detector);
- :mod:`mgllava.eval.boxes`: where each benchmark image's boxes come from;
- :mod:`mgllava.eval.tasks`: the catalogue of the 13 image benchmarks and the runtime
  task files (stock prompts and metrics, local data);
- :mod:`mgllava.eval.runner`: one benchmark through ``lmms_eval.evaluator.simple_evaluate``
  -> scores and per-sample predictions;
- :mod:`mgllava.eval.chat`: ``mgllava chat``;
- :mod:`mgllava.eval.cli`: the ``evaluate``, ``results`` and ``chat`` subcommands.

This package's ``__init__`` imports nothing heavy: the CLI and the entry point load it.
"""
