"""The SPOT options of a model, validated once and carried by the model as ``model.spot_options``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from spot.schedule import check_rho

SELECTORS = ("learned", "cls_attn_avg", "random")
SAMPLINGS = ("gumbel", "topk")
DESCRIPTOR_SCALES = ("none", "count")
MASK_GRADS = ("bounded", "dynamicvit")
MODES = ("mask", "prune")
PREDICTOR_PREFIX = "spot_predictors."  # state_dict keys of the relevance modules
FORMAT_KEY = "spot_format"  # the key of a saved config (``model.spot_config``) that names its format
CONFIG_FORMAT = 2  # 2: every SpotConfig option recorded; 1 (no FORMAT_KEY): only the options passed
# The defaults of format-1 configs, which recorded only the options passed explicitly: before commit
# d4afc4d (2026-12-02) the descriptors were always count-scaled, before 91524ce the masked softmax was
# always DynamicViT's; format 2 (this file's defaults since) records both.
FORMAT_1_DEFAULTS = {"descriptor_scale": "count", "mask_grad": "dynamicvit"}


@dataclass(frozen=True)
class SpotConfig:
    """Options of the token relevance stages (paper Sec. 3.2 and the ablations of Sec. 4.3).

    ``rho=None`` means the dense backbone: no stages, no predictors.
    """

    rho: float | None = 0.7
    stage_blocks: tuple[int, ...] = (3, 6, 9)
    selector: str = "learned"
    sampling: str = "gumbel"  # training masks: Gumbel-Softmax, or the deterministic top-k of inference
    tau: float = 1.0  # Gumbel-Softmax temperature
    d_remap: int | None = None  # width of the remapped token features; None = embedding width, 0 = none
    attn_mean: bool = True  # cross-layer D^M: statistics of the running mean of attention maps
    attn_var: bool = True  # cross-layer D^Sigma: statistics of the running variance (both off: Table 2 row 3)
    descriptor_means: bool = True  # the row / column means of every map (mu-hat; off: Table 2 row 1)
    descriptor_variances: bool = True  # the row / column variances of every map (sigma-hat^2; off: row 2)
    head_avg: bool = False  # average the statistics over heads instead of one set per head
    shared_predictor: bool = False  # one relevance module for all stages (Table 8)
    fuse_dropped: bool = False  # soft sparsification: fuse dropped tokens into one extra token
    descriptor_scale: str = "none"  # "none": raw statistics (paper); "count": times n, n^2 (see selectors)
    mask_grad: str = "bounded"  # straight-through gradient of masked attention (spot.masking.policy_softmax)

    def __post_init__(self) -> None:
        if self.rho is not None:
            object.__setattr__(self, "rho", check_rho(self.rho))
        object.__setattr__(self, "stage_blocks", tuple(int(b) for b in self.stage_blocks))
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; choose one of {SELECTORS}")
        if self.descriptor_scale not in DESCRIPTOR_SCALES:
            raise ValueError(
                f"unknown descriptor_scale {self.descriptor_scale!r}; choose one of {DESCRIPTOR_SCALES}"
            )
        if self.mask_grad not in MASK_GRADS:
            raise ValueError(f"unknown mask_grad {self.mask_grad!r}; choose one of {MASK_GRADS}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose one of {SAMPLINGS}")
        if list(self.stage_blocks) != sorted(set(self.stage_blocks)) or min(self.stage_blocks, default=1) < 1:
            raise ValueError(f"stage_blocks must be increasing block indices >= 1, got {self.stage_blocks}")
        if self.d_remap is not None and (self.d_remap < 0 or self.d_remap % 2):
            raise ValueError(f"d_remap must be an even number >= 0, got {self.d_remap}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")

    @property
    def dense(self) -> bool:
        return self.rho is None

    @property
    def num_stages(self) -> int:
        return 0 if self.dense else len(self.stage_blocks)

    @property
    def needs_attention(self) -> bool:
        """Whether stages read attention maps (random selection does not)."""
        return not self.dense and self.selector != "random"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stage_blocks"] = list(self.stage_blocks)
        return d


SPOT_OPTIONS = frozenset(f.name for f in fields(SpotConfig))
# The paper's Table 2 (reduced attention information): the options of each row, and its predictor overhead
# for DeiT-S at rho 0.7 in GMACs (the paper's "GFLOPs"; 0.129 with nothing removed, Sec. 4.2).
TABLE_2_ROWS = {
    "no means": ({"descriptor_means": False}, 0.120),
    "no variances": ({"descriptor_variances": False}, 0.120),
    "no cross-layer": ({"attn_mean": False, "attn_var": False}, 0.111),
}


def upgrade_saved_config(saved: dict) -> dict:
    """A saved ``spot_config`` (checkpoint, registered model) as ``create_model`` keywords of the current
    format: format-1 configs get the defaults of their time (:data:`FORMAT_1_DEFAULTS`) for the options
    they did not record. Raises ValueError for a format this code does not know."""
    config = dict(saved)
    found = config.get(FORMAT_KEY, 1)
    if found == CONFIG_FORMAT:
        return config
    if found != 1:
        raise ValueError(f"saved SPOT config of format {found!r}; this code reads 1 and {CONFIG_FORMAT}")
    return {**FORMAT_1_DEFAULTS, **config, FORMAT_KEY: CONFIG_FORMAT}
