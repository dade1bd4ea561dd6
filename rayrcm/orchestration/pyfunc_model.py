"""MLflow "model from code" for rayrcm models: the logged artifact is rayrcm's ``model.pt``.

``predict`` takes float32 pixels in [0, 1] shaped ``(B, 3, H, W)`` and returns class labels for a
classifier (features for an encoder).
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class RayrcmModel(PythonModel):
    def load_context(self, context):
        from rayrcm.models.export import build_from_file, predicts_classes

        self.model, self.meta = build_from_file(context.artifacts["model"])
        self.classes = predicts_classes(self.meta)
        self.model.eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            out = self.model(x)
        return out.argmax(1).numpy() if self.classes else out.numpy()


mlflow.models.set_model(RayrcmModel())
