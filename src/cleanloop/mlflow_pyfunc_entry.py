"""The MLflow model-from-code entry of a logged cleanloop classifier (``cleanloop.mlflow_model``).

MLflow copies this file into the model and runs it when the model loads: no pickled Python object.
"""

from mlflow.models import set_model

from cleanloop.mlflow_model import ClassifierModel

set_model(ClassifierModel())
