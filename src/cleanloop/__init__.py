"""cleanloop: find mislabelled training rows, prune them, retrain, and compare in MLflow."""

__version__ = "0.1.0"
