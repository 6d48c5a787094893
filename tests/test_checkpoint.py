"""Pretrained weights from local files: wrappers, prefixes, strict LV-ViT keys, clear errors."""

import pytest
import timm
import torch
from tiny import TINY, tiny

import spot

# key names of the original TokenLabeling LV-ViT checkpoints (first block shown)
LVVIT_KEYS = {
    "cls_token", "pos_embed",
    "patch_embed.conv1.weight", "patch_embed.bn1.weight", "patch_embed.bn1.bias",
    "patch_embed.bn1.running_mean", "patch_embed.bn1.running_var", "patch_embed.bn1.num_batches_tracked",
    "patch_embed.conv2.weight", "patch_embed.conv3.weight",
    "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "norm.weight", "norm.bias", "head.weight", "head.bias", "aux_head.weight", "aux_head.bias",
}


@pytest.mark.parametrize("name, params", [("lvvit_t", 8.53), ("lvvit_s", 26.15)])
def test_lvvit_parameter_counts_and_original_key_names(name, params):
    model = spot.create_model(name, rho=None)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params, abs=0.01)
    keys = set(model.state_dict())
    assert keys >= LVVIT_KEYS
    assert "blocks.0.attn.qkv.bias" not in keys  # LV-ViT's qkv has no bias
    depth = 12 if name == "lvvit_t" else 16
    assert len([k for k in keys if k.endswith("attn.qkv.weight")]) == depth
    sparse = spot.create_model(name, rho=0.7)
    assert {k for k in sparse.state_dict() if not k.startswith("spot_predictors.")} == keys


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "state_dict_ema"])
def test_lvvit_checkpoint_round_trip_loads_strictly(tmp_path, wrapper):
    source = tiny("lvvit_s", rho=None)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "lvvit.pth"
    torch.save(state if wrapper is None else {wrapper: state, "epoch": 3}, path)
    dense = tiny("lvvit_s", rho=None)
    assert spot.load_pretrained(dense, path) == []
    sparse = tiny("lvvit_s", rho=0.7, pretrained=path)
    for key, value in source.state_dict().items():
        assert torch.equal(sparse.state_dict()[key], value), key
        assert torch.equal(dense.state_dict()[key], value), key


def test_timm_deit_checkpoint_loads_into_spot_with_fresh_predictors(tmp_path):
    reference = timm.create_model("deit_small_patch16_224", **TINY)
    path = tmp_path / "deit.pth"
    torch.save({"model": reference.state_dict()}, path)
    model = tiny("deit_s", rho=0.7)
    untouched = spot.load_pretrained(model, path)
    assert untouched and all(k.startswith("spot_predictors.") for k in untouched)
    x = torch.randn(2, 3, 32, 32)
    dense = tiny("deit_s", rho=None, pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(x), reference.eval()(x))


def test_spot_checkpoint_loads_into_a_dense_teacher(tmp_path):
    trained = tiny("deit_s", rho=0.7)
    path = tmp_path / "spot.pth"
    torch.save(trained.state_dict(), path)
    teacher = tiny("deit_s", rho=None, pretrained=path)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(teacher.state_dict()[key], trained.state_dict()[key])


def test_another_class_count_reinitialises_the_head_only(tmp_path):
    path = tmp_path / "in1k.pth"
    torch.save(tiny("lvvit_t", rho=None, num_classes=1000).state_dict(), path)
    model = tiny("lvvit_t", rho=None, num_classes=10)
    untouched = spot.load_pretrained(model, path)
    assert set(untouched) == {"head.weight", "head.bias", "aux_head.weight", "aux_head.bias"}


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        tiny(pretrained=tmp_path / "nothing.pth")


def test_corrupt_checkpoint_file_is_reported(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint .*broken.pth"):
        tiny(pretrained=path)


def test_checkpoint_of_another_architecture_is_refused_with_key_names(tmp_path):
    path = tmp_path / "lvvit.pth"
    torch.save(tiny("lvvit_t", rho=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"does not fit deit_s: .*unexpected keys .*patch_embed\.conv1"):
        tiny("deit_s", pretrained=path)
    wide = tmp_path / "wide.pth"
    torch.save(tiny("deit_s", rho=None, embed_dim=64).state_dict(), wide)
    with pytest.raises(ValueError, match=r"shape mismatches .*checkpoint \(.*64"):
        tiny("deit_s", pretrained=wide)


def test_non_state_dict_file_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="holds no state_dict"):
        tiny(pretrained=path)
