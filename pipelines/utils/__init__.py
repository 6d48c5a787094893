"""Utilities shared by every layer: errors, markdown tables, the command-line convention, stop signals,
free ports."""
