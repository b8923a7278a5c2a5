"""The trained classifier as an MLflow model (CONTRACT §4): a ``mlflow.pyfunc`` wrapper of cleanloop's model folder.

``mlflow.pyfunc.load_model(uri).predict(images)`` takes a uint8 array of RGB images, (N, S, S, 3)
at the model's ``image_size`` (padded and resized as cleanloop's cache does), and returns one
probability column per class (softmax, or per-class sigmoid scores for a sigmoid head).
Loading needs cleanloop installed (``Classifier.load``); the weights stay a plain folder
(safetensors + ``save_pretrained``), and the wrapper is logged as code
(``mlflow_pyfunc_entry.py``), never a pickle.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import mlflow
import numpy as np

log = logging.getLogger(__name__)

ARTIFACT = "model"  # the name of the cleanloop model folder inside the MLflow model
ENTRY = Path(__file__).with_name("mlflow_pyfunc_entry.py")  # model from code: nothing pickled

with warnings.catch_warnings():  # MLflow's notes at import on its own type hints ("Any type hint is inferred...")
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc


class ClassifierModel(mlflow.pyfunc.PythonModel):
    """Loads ``train/<role>/model`` with :meth:`cleanloop.model.Classifier.load`; predicts class probabilities."""

    def load_context(self, context) -> None:
        from cleanloop.model import Classifier

        self.model = Classifier.load(context.artifacts[ARTIFACT]).eval()

    def predict(self, context, model_input: np.ndarray, params=None):  # np.ndarray: no MLflow type-hint checks
        import pandas as pd
        import torch

        x = np.asarray(model_input)
        if x.ndim == 3:  # one image
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, S, S, 3), got {x.shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8))).permute(0, 3, 1, 2)
        with torch.no_grad():
            probs = self.model.probs(self.model(pixels)).cpu().numpy()
        return pd.DataFrame(probs.astype(np.float32), columns=self.model.classes)


def signature(classes: list[str], image_size: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype("uint8"), (-1, image_size, image_size, 3))]),
                          outputs=Schema([ColSpec("float", c) for c in classes]))


def requirements() -> list[str]:
    """Pinned explicitly: MLflow's own inference would load the model in a subprocess (seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("cleanloop", "mlflow", "torch", "transformers", "lightning", "safetensors", "numpy", "pandas"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_classifier(model_dir: str | Path, *, classes: list[str], image_size: int,
                   register_as: str | None = None) -> str | None:
    """Log the model folder to the active run as MLflow model ``model``; the model URI, None on failure."""
    try:
        with warnings.catch_warnings():  # no type hints / input example: the signature above says it all
            warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(ENTRY), artifacts={ARTIFACT: str(model_dir)},
                signature=signature(list(classes), int(image_size)), pip_requirements=requirements(),
                registered_model_name=register_as or None,
            )
    except Exception as e:  # the model is still in train/<role>/model; never fail the training over it
        log.warning("mlflow: cannot log the model (%s: %s); it stays in %s", type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "", model_dir)
        return None
    return info.model_uri
