"""The sweep's search space: YAML + overrides, validation errors, teacher rule, budget clipping."""

import pytest

import spot
from pipelines.training.config import RunConfig
from spot.flops import macs
from tuning import space
from tuning.space import SpaceError
from tuning.sweep_lambdas import main

TINY_CONFIG = RunConfig(backbone="deit_s", img_size=32, num_classes=10,
                        model_args={"patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2})


def write(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_default_space_searches_all_six_log_uniform_where_it_belongs():
    dims = space.load_space()
    assert set(dims) == set(space.SEARCHABLE)
    for key in ("lambda_rate", "lambda_kl", "lr", "predictor_lr"):
        assert dims[key].distribution == "loguniform", key
    assert dims["rho"].distribution == "uniform"
    assert 0 < dims["rho"].low < dims["rho"].high <= 1


def test_file_entries_numbers_and_yaml_exponents(tmp_path):
    path = write(tmp_path, "lr: {distribution: loguniform, low: 1e-4, high: 1e-2}\nlambda_token: 0\n")
    dims = space.read_space_file(path)
    assert (dims["lr"].low, dims["lr"].high, dims["lr"].distribution) == (1e-4, 1e-2, "loguniform")
    assert dims["lambda_token"].fixed and dims["lambda_token"].low == 0
    searched, fixed = space.split(dims, str(path))
    assert set(searched) == {"lr"} and fixed == {"lambda_token": 0.0}


def test_overrides_keep_the_file_distribution_or_take_a_new_one(tmp_path):
    path = write(tmp_path, "lr: {distribution: loguniform, low: 1e-4, high: 1e-2}\n")
    dims = space.load_space(path, {"lr": "2e-4:3e-3", "rho": "0.4:0.8", "lambda_rate": "uniform:1:3"})
    assert (dims["lr"].distribution, dims["lr"].low, dims["lr"].high) == ("loguniform", 2e-4, 3e-3)
    assert dims["rho"].distribution == space.SEARCHABLE["rho"]  # not in the file: the key's default
    assert (dims["lambda_rate"].distribution, dims["lambda_rate"].high) == ("uniform", 3.0)
    fixed = space.load_space(path, {"lr": "5e-4"})["lr"]
    assert fixed.fixed and fixed.low == 5e-4


@pytest.mark.parametrize(
    "text, message",
    [
        ("lamda_rate: 1.0\n", "unknown key 'lamda_rate'"),
        ("lr: {distribution: uniform, low: 0.01, high: 0.001}\n", "lr: low 0.01 > high 0.001"),
        ("rho: {distribution: uniform, low: 0.5, high: 1.5}\n", "must be in (0, 1], got low 0.5, high 1.5"),
        ("rho: 0\n", "rho must be in (0, 1], got 0"),
        ("rho: {distribution: uniform, low: 0.5, high: 0.5}\n", "low == high == 0.5"),
        ("lambda_kl: {distribution: loguniform, low: 0, high: 1}\n", "loguniform needs low > 0"),
        ("lambda_rate: -1\n", "lambda_rate must be >= 0"),
        ("lr: 0\n", "lr must be > 0"),
        ("lr: {distribution: normal, low: 0.1, high: 1}\n", "distribution 'normal'"),
        ("lr: {distribution: uniform, low: 0.1}\n", "missing high"),
        ("lr: {distribution: uniform, low: 0.1, high: 1, step: 2}\n", "unknown step"),
        ("lr: fast\n", "'fast' is not a number"),
        ("- lr\n", "expected a mapping of options, got list"),
        ("lr: [\n", "search space"),
    ],
)
def test_bad_files_name_file_key_and_value(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as err:
        space.read_space_file(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "key, spec, message",
    [
        ("rho", "0.2:1.2", "--rho 0.2:1.2: rho must be in (0, 1]"),
        ("lr", "1e-2:1e-3", "--lr 1e-2:1e-3: low 0.01 > high 0.001"),
        ("lr", "1:2:3:4", "expected VALUE, LOW:HIGH or DISTRIBUTION:LOW:HIGH"),
        ("lambda_rate", "gauss:1:2", "distribution 'gauss'"),
    ],
)
def test_bad_overrides_name_the_flag(key, spec, message):
    with pytest.raises(SpaceError) as err:
        space.load_space(overrides={key: spec})
    assert message in str(err.value)


def test_missing_file_is_a_space_error(tmp_path):
    with pytest.raises(SpaceError, match="nope.yaml"):
        space.read_space_file(tmp_path / "nope.yaml")


def test_nothing_to_search(tmp_path):
    path = write(tmp_path, "lr: 0.001\nrho: 0.7\n")
    with pytest.raises(SpaceError, match="nothing to search"):
        space.split(space.read_space_file(path), str(path))


def test_without_teacher_fixes_file_distillation_weights_and_refuses_flags():
    dims, notes = space.without_teacher(space.load_space())
    assert dims["lambda_kl"].fixed and dims["lambda_kl"].low == 0
    assert dims["lambda_token"].fixed and dims["lambda_token"].low == 0
    assert len(notes) == 2 and "needs --pretrained" in notes[0]
    assert not dims["lambda_rate"].fixed
    with pytest.raises(SpaceError, match="--lambda-kl 0.1:1: lambda_kl weighs a distillation loss"):
        space.without_teacher(space.load_space(overrides={"lambda_kl": "0.1:1"}))


def test_rho_limit_is_the_largest_rho_within_budget():
    model = spot.create_model("deit_s", rho=0.5, img_size=32, num_classes=10, **TINY_CONFIG.model_args)
    budget = macs(model, 32, rho=0.6) / 1e9
    rho_max = space.rho_limit(TINY_CONFIG, budget)
    assert macs(model, 32, rho=rho_max) <= budget * 1e9
    assert macs(model, 32, rho=min(1.0, rho_max + 0.05)) > budget * 1e9
    with pytest.raises(SpaceError, match="--gmacs-budget 1e-09: a budget of 1e-09 GMACs is below"):
        space.rho_limit(TINY_CONFIG, 1e-9)


def test_clip_rho_cuts_the_range_and_checks_fixed_values():
    dims = space.load_space(overrides={"rho": "0.3:0.9"})
    clipped = space.clip_rho(dims, 0.62, 0.01, default_rho=0.7)["rho"]
    assert (clipped.low, clipped.high, clipped.distribution) == (0.3, 0.62, "uniform")
    assert "clipped to 0.01 GMACs" in clipped.source
    assert space.clip_rho(dims, 0.95, 0.01, default_rho=0.7)["rho"] == dims["rho"]  # fits already
    with pytest.raises(SpaceError, match="--rho 0.3:0.9: a 0.01 GMACs budget allows rho <= 0.2500"):
        space.clip_rho(dims, 0.25, 0.01, default_rho=0.7)
    no_rho = {k: d for k, d in dims.items() if k != "rho"}
    with pytest.raises(SpaceError, match="fine-tuning default rho 0.7: a 0.01 GMACs budget"):
        space.clip_rho(no_rho, 0.5, 0.01, default_rho=0.7)
    assert space.clip_rho(no_rho, 0.8, 0.01, default_rho=0.7)["rho"].low == 0.7


def test_is_feasible():
    assert space.is_feasible(5.0, None)
    assert space.is_feasible(1.0, 1.0) and not space.is_feasible(1.01, 1.0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("rho: 0.5\nbatch: 3\n", "unknown key 'batch'"),
        ("lr: {distribution: loguniform, low: 0.1, high: 0.01}\n", "lr: low 0.1 > high 0.01"),
        ("rho: {distribution: uniform, low: 0.0, high: 0.5}\n", "rho must be in (0, 1], got low 0, high 0.5"),
    ],
)
def test_cli_rejects_a_bad_space_before_anything_starts(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, text)
    assert main(["--space", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sweep_lambdas: error: search space {path}: ") and message in err
    assert len(err.splitlines()) == 1
    # nothing started: no data made, no Ray runs, no MLflow store (Ray itself may be up from other tests)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
