"""Evaluation: accuracy and throughput of a model, selectors compared, ONNX export and its parity check,
and the options shared by the commands that evaluate models."""
