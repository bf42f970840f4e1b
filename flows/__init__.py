"""Prefect flows of the pipeline (thin wiring over the stage packages).

Import a flow from its module (``from flows.detect import detect_flow``):
importing this package alone does not import Prefect.
"""
