"""Shared test settings: deterministic, single-threaded-friendly torch on the 2-core CI box."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
