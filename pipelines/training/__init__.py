"""Training: the typed run configuration, the recipe, the Ray Train worker, trainer and job."""
