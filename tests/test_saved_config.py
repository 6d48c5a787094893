"""Saved models keep their behaviour: every SPOT option is saved; old-format configs load with the
defaults of their time (issue 26, item 3)."""

import json

import pytest
import torch
from tiny import TINY, tiny

import spot
from pipelines.storage.checkpoints import CONFIG_FILE, MODEL_FILE, model_from_checkpoint, save_checkpoint
from spot.config import CONFIG_FORMAT, FORMAT_KEY, SPOT_OPTIONS


def _kept(model, x):
    with torch.no_grad():
        logits, info = model.eval()(x, return_info=True)
    return logits, info.kept_indices


def test_saved_config_records_every_option_and_its_format(tmp_path):
    model = tiny("deit_s", rho=0.5)  # every SPOT option left at its default
    saved = model.spot_config
    assert saved[FORMAT_KEY] == CONFIG_FORMAT
    assert set(saved) >= SPOT_OPTIONS
    assert saved["descriptor_scale"] == "none" and saved["mask_grad"] == "bounded"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    save_checkpoint(tmp_path, model, optimizer, scheduler, torch.amp.GradScaler("cpu"), 0, {})
    on_disk = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert on_disk == json.loads(json.dumps(saved))
    # a current-format config is read as written, not completed with the old defaults
    reloaded = model_from_checkpoint(tmp_path)
    assert reloaded.spot_options == model.spot_options
    x = torch.randn(4, 3, 32, 32)
    (a, kept_a), (b, kept_b) = _kept(model, x), _kept(reloaded, x)
    torch.testing.assert_close(a, b)
    assert all(torch.equal(i, j) for i, j in zip(kept_a, kept_b, strict=True))


def test_old_format_checkpoint_reloads_with_the_defaults_of_its_time(tmp_path):
    torch.manual_seed(0)
    # the model as the code before issue 13 built it: count-scaled descriptors, DynamicViT's masked softmax
    original = tiny("deit_s", rho=0.5, descriptor_scale="count", mask_grad="dynamicvit")
    # what that code wrote (spot/models/factory.py before format 2): only the options passed, no format key
    old_config = {"name": "deit_s", "rho": 0.5, "selector": "learned", "num_classes": TINY["num_classes"],
                  **{k: v for k, v in TINY.items() if k != "num_classes"}, "stage_blocks": [1, 2, 3]}
    assert old_config["stage_blocks"] == list(original.spot_options.stage_blocks)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old_config, indent=1))
    torch.save(original.state_dict(), tmp_path / MODEL_FILE)

    reloaded = model_from_checkpoint(tmp_path)
    assert reloaded.spot_options.descriptor_scale == "count"
    assert reloaded.spot_options.mask_grad == "dynamicvit"
    assert all(not blk.attn.bounded_mask_grad for blk in reloaded.blocks)
    assert reloaded.spot_options == original.spot_options
    assert reloaded.spot_config[FORMAT_KEY] == CONFIG_FORMAT  # saved again, it is a format-2 config

    x = torch.randn(16, 3, 32, 32)
    (want, kept_want), (got, kept_got) = _kept(original, x), _kept(reloaded, x)
    torch.testing.assert_close(got, want)
    assert all(torch.equal(i, j) for i, j in zip(kept_got, kept_want, strict=True))
    # the same weights under today's defaults select other tokens: the old options matter
    today = spot.create_model(**{**old_config, "rho": 0.5})
    today.load_state_dict(original.state_dict())
    assert today.spot_options.descriptor_scale == "none"
    _, kept_today = _kept(today, x)
    assert any(not torch.equal(i, j) for i, j in zip(kept_today, kept_want, strict=True))


def test_old_format_keeps_the_options_it_did_record():
    old = {"name": "deit_s", "rho": 0.7, "selector": "learned", "descriptor_scale": "none", **TINY}
    upgraded = spot.upgrade_saved_config(old)
    assert upgraded["descriptor_scale"] == "none" and upgraded["mask_grad"] == "dynamicvit"
    assert spot.create_model(**upgraded).spot_options.descriptor_scale == "none"


def test_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="format 7"):
        spot.upgrade_saved_config({"name": "deit_s", FORMAT_KEY: 7})
    with pytest.raises(ValueError, match="spot_format=1"):
        spot.create_model("deit_s", spot_format=1, **TINY)


def test_model_registered_in_format_1_loads_with_the_defaults_of_its_time(tmp_path):
    """An MLflow model as the registry wrote it before format 2 (project format 1, a format-1 spot_config
    artifact) loads through ``load_model`` and through MLflow's pyfunc with its original options."""
    import mlflow
    import numpy as np

    from pipelines.tracking.registry import PROJECT_KEY, PYFUNC_CODE, SPOT_PACKAGE, load_model

    torch.manual_seed(0)
    original = tiny("deit_s", rho=0.5, descriptor_scale="count", mask_grad="dynamicvit").eval()
    old_config = {"name": "deit_s", "rho": 0.5, "selector": "learned", "num_classes": TINY["num_classes"],
                  **{k: v for k, v in TINY.items() if k != "num_classes"}, "stage_blocks": [1, 2, 3]}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old_config))
    torch.save(original.state_dict(), tmp_path / MODEL_FILE)
    model_dir = tmp_path / "mlflow-model"
    mlflow.pyfunc.save_model(
        str(model_dir), python_model=str(PYFUNC_CODE), code_paths=[str(SPOT_PACKAGE)],
        artifacts={"spot_config": str(tmp_path / CONFIG_FILE), "weights": str(tmp_path / MODEL_FILE)},
        metadata={PROJECT_KEY: {"format": 1}}, pip_requirements=["torch"],
    )
    x = torch.randn(8, 3, 32, 32)
    want, kept_want = _kept(original, x)
    loaded = load_model(model_dir)
    assert loaded.spot_options == original.spot_options
    got, kept_got = _kept(loaded, x)
    torch.testing.assert_close(got, want)
    assert all(torch.equal(i, j) for i, j in zip(kept_got, kept_want, strict=True))
    served = mlflow.pyfunc.load_model(str(model_dir)).predict(x.numpy())
    np.testing.assert_allclose(served, want.numpy(), rtol=1e-5, atol=1e-5)
