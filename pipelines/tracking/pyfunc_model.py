"""MLflow "models from code" file of a registered SPOT model (logged by :mod:`pipelines.tracking.registry`).

MLflow runs this file to load the model: ``load_context`` rebuilds the architecture with
``spot.create_model`` from ``spot_config`` (any saved format: ``spot.upgrade_saved_config``) and loads the
state_dict with ``weights_only=True``, so no pickled code is ever executed. ``predict`` takes images
``(B, 3, S, S)`` normalised with the model's own mean / std
(``spot.input_normalization``, recorded in ``spot_config``) and returns logits (prune mode).
"""

import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel

import spot


class SpotModel(PythonModel):
    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts["spot_config"]).read_text())
        self.model = spot.create_model(**spot.upgrade_saved_config(config))
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(images).numpy()


mlflow.models.set_model(SpotModel())
