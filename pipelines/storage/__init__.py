"""Storage: checkpoints and the run records kept beside them."""
