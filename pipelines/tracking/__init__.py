"""Tracking: the MLflow store, run handle, per-epoch reports, the model registry and its pyfunc model."""
