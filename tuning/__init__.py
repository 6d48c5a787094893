"""Ray Tune sweeps over the SPOT loss weights, learning rates and retention rate (``sweep_lambdas.py``)."""
