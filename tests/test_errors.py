"""Bad input to the library fails with a message that names the problem."""

import pytest
import torch
from tiny import tiny

import spot


def test_wrong_image_size_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        tiny()(torch.randn(1, 3, 64, 64))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'; choose one of deit_t, deit_s"):
        spot.create_model("vit_huge")


@pytest.mark.parametrize("rho", [0.0, -0.3, 1.5])
def test_rho_outside_the_unit_interval_is_refused(rho):
    with pytest.raises(ValueError, match=r"rho must be in \(0, 1\]"):
        tiny(rho=rho)


def test_unknown_selector_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown selector 'best'"):
        tiny(selector="best")
    with pytest.raises(ValueError, match="bad option for backbone 'deit_s'"):
        tiny(embed_dims=12)
    with pytest.raises(ValueError, match="do not fit a 4-block model"):
        tiny(stage_blocks=(1, 2, 4))
    with pytest.raises(ValueError, match="unknown SPOT mode 'fast'"):
        spot.set_mode(tiny(), "fast")
