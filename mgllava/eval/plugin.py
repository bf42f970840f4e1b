"""The ``lmms_eval.models`` entry point: registers the model ``mgllava`` with lmms-eval 0.7.3.

lmms-eval loads every entry point of the group when ``lmms_eval.models`` is imported
(``ModelRegistryV2.load_entrypoint_manifests``); a payload may be a callable returning a
``ModelManifest``. The class itself (:class:`mgllava.eval.lmms_model.MGLLaVALmms`) is only
imported when a run asks for ``--model mgllava``, so this module stays cheap.
"""

from __future__ import annotations

MODEL_ID = "mgllava"
CLASS_PATH = "mgllava.eval.lmms_model.MGLLaVALmms"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
