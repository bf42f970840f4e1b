"""The offline detector stage: Ultralytics detectors -> sharded Parquet box tables.

- :mod:`detector.model`: ``DetectorSettings``, ``Detector`` / ``get_detector`` (YOLO, RT-DETR,
  YOLO-World, YOLOE from local weights or a model YAML);
- :mod:`detector.pipeline`: ``run_detection`` (and its steps ``prepare_run``, ``run_shard``,
  ``finalize_run`` used by the Prefect flow ``flows.detect``);
- :mod:`detector.inputs`: image keys from LLaVA JSON, image folders, benchmark sets;
- :mod:`detector.train`: ``train_detector`` (``mgllava detector-train``);
- :mod:`detector.schema`: the Arrow schemas; the format is documented in ``detector/SCHEMA.md``.

Importing this package imports nothing heavy (the CLI module relies on that).
"""
