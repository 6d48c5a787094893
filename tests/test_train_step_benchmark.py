"""benchmarks/train_step.py runs the project's training step for dense and SPOT in turns (a smoke run: the
figures themselves belong in docs/benchmarks.md)."""

import json

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def train_step():
    return load_script("benchmarks/train_step.py")


def test_the_step_benchmark_times_dense_and_spot_in_pairs_and_reports_their_ratio(train_step, capsys):
    assert train_step.main(["--preset", "demo", "--batch-size", "4", "--steps", "2", "--repeats", "3",
                            "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    results = json.loads(out.split("JSON: ", 1)[1])
    dense, spot = results["dense"], results["spot"]
    assert len(dense["wall_ms_per_run"]) == len(spot["wall_ms_per_run"]) == 3
    assert spot["gmacs"] < dense["gmacs"]  # prune mode drops tokens: the SPOT model is the sparse one
    assert spot["params"] > dense["params"]  # with its relevance modules
    for ratio, s, d in zip(results["ratios"]["spot"], spot["wall_ms_per_run"], dense["wall_ms_per_run"],
                           strict=True):
        assert ratio == pytest.approx(s / d, rel=0.02)  # each repeat's SPOT run over the dense run beside it
    assert "SPOT / dense wall time per step:" in out and "| spot |" in out and "| dense |" in out
