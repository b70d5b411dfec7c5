"""Images end to end: `ebm-scale train` of every method on tiny datasets in their real on-disk formats
(evaluation included: random-conv FD, OOD AUROC, the sample grid in MLflow), a 2-worker TorchTrainer run
whose ranks read disjoint shards, an s3:// data.root, and the named image sweeps' smoke versions."""

from __future__ import annotations

from pathlib import Path

import image_runs
import pytest
import torch
from mlflow.tracking import MlflowClient
from s3server import s3_fixture, s3_server_fixture  # noqa: F401

from ebm_scale.cli import main
from ebm_scale.config import compose
from ebm_scale.data import load_dataset
from ebm_scale.data.images import images_of
from ebm_scale.engine import backbones
from ebm_scale.engine.backbones import resolve_backbone
from ebm_scale.engine.run import pretrain_backbone
from ebm_scale.engine.state import load_state
from ebm_scale.engine.tracking import BACKBONE_TAG, CHECKPOINT_TAG, KIND_TAG, OUTCOME_TAG

# A couple of iterations and one evaluation on 8×8 images; every evaluation set a few dozen images.
SHORT = [
    "data.image_size=8",
    "data.n_train=64",
    "data.n_test=32",
    "data.num_workers=0",
    "train.device=cpu",
    "train.threads=1",
    "train.iterations=2",
    "train.eval_every=2",
    "train.log_every=1",
    "train.batch_size=16",
    "eval.fid.extractor=random",
    "eval.fid.n_samples=16",
    "eval.fid.n_reference=32",
    "eval.fid.batch_size=16",
    "eval.ood.n_images=16",
    "eval.grid_samples=4",
    "search.metric=eval/fd_random",
]
UNET = "{arch: unet, channels: 8, channel_mults: [1, 2], blocks_per_level: 1}"
# method → (dataset, overrides): between them every method and every on-disk format but Fashion-MNIST's
# torchvision layout (covered by tests/test_image_data.py).
METHODS = {
    "mle": ("mnist", ["method.energy={arch: mle_conv, channels: 8}", "method.sampler.steps=3"]),
    "ddaebm": (
        "fashion_mnist",
        [f"method.energy={UNET}", f"method.generator={UNET}", f"method.encoder={UNET}", "method.latent_dim=4"],
    ),
    "nt_ebm": (
        "svhn",
        [
            "method.flow={arch: conv, levels: 2, depth: 2, hidden: 8}",
            "method.pretrain.iterations=2",
            "method.energy={arch: nt_ebm, channels: 8}",
            "method.sampler.steps=2",
            "method.sampler.leapfrog_steps=1",
            "method.sampler.sample_steps=2",
        ],
    ),
    "vaebm": (
        "cifar10",
        [
            "method.vae={arch: conv, latent_dim: 8, hidden: 8, layers: 3}",
            "method.pretrain.iterations=2",
            "method.energy={arch: vaebm_resnet, channels: 8}",
            "method.sampler.steps=2",
            "method.sampler.sample_steps=2",
            "method.iw_samples=2",
        ],
    ),
    "diffebm": (
        "celeba",
        [
            "method.sde.steps=4",
            "method.energy={arch: mle_conv, channels: 8}",
            f"method.control={UNET[:-1]}, activation: swish}}",
        ],
    ),
}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One local Ray for this module's TorchTrainer run and sweeps, its workers set up by image_runs and
    caching (FID statistics, backbones) in a folder of their own, never the user's cache."""
    with image_runs.local_ray(num_cpus=2, cache=tmp_path_factory.mktemp("ray_cache")):
        yield


@pytest.fixture
def stores(tmp_path, monkeypatch):
    """This test's MLflow store, checkpoints and node cache (FID reference statistics, s3:// copies)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EBM_SCALE_CACHE", str(tmp_path / "cache"))
    # engine/backbones.py reads EBM_SCALE_CACHE once, at import: point its copy at this test's cache too.
    monkeypatch.setattr(backbones, "CACHE", tmp_path / "cache" / "backbones")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, [f"tracking.uri={uri}", f"storage.path={tmp_path}/runs"]


def _runs(uri: str):
    client = MlflowClient(uri)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def _check_evaluated(client, run, steps: list[int]) -> None:
    """Finished, with eval/fd_random and AUROCs logged at each of `steps` and a sample grid of each."""
    assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == "finished"
    fd = client.get_metric_history(run.info.run_id, "eval/fd_random")
    assert sorted(m.step for m in fd) == steps and all(m.value > 0 for m in fd)
    aurocs = [k for k in run.data.metrics if k.startswith("eval/auroc/")]
    assert aurocs and all(0 <= run.data.metrics[k] <= 1 for k in aurocs), run.data.metrics
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {f"plots/samples_{step:06d}.png" for step in steps} <= plots, plots


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=[] if m == "mle" else pytest.mark.slow) for m in sorted(METHODS)]
)
def test_every_method_trains_and_evaluates_on_images_in_process(method, tmp_path, stores, monkeypatch):
    dataset, overrides = METHODS[method]
    if dataset in image_runs.MD5_CHECKED:
        image_runs.skip_md5_checks(monkeypatch)
    root = image_runs.write_dataset(dataset, tmp_path / "data", n_train=48 if dataset == "celeba" else 64, n_test=24)
    uri, store_args = stores
    args = [f"method={method}", f"data={dataset}", f"data.root={root}", *SHORT, *overrides, *store_args]
    backbone = []
    if method in ("nt_ebm", "vaebm"):
        # The stage-1 run the engine starts for an empty method.backbone, handed over as a local file (the
        # runs:/ reference an empty backbone becomes is the test below).
        ref = pretrain_backbone(compose(None, args, single_run=True))
        backbone = [f"method.backbone={resolve_backbone(ref, uri)}"]
    assert main(["train", *args, *backbone]) == 0
    client, runs = _runs(uri)
    (run,) = [r for r in runs if r.data.params["method.name"] == method]
    assert run.data.tags[KIND_TAG] == "run" and run.data.params["data.name"] == dataset
    _check_evaluated(client, run, [2])
    if backbone:
        (stage1,) = [r for r in runs if r.info.run_id != run.info.run_id]
        assert stage1.info.status == "FINISHED" and run.data.params["method.backbone"] == backbone[0].split("=")[1]


@pytest.mark.slow
def test_an_in_process_two_stage_run_pretrains_its_backbone(tmp_path, stores, monkeypatch, capsys):
    image_runs.skip_md5_checks(monkeypatch)
    dataset, overrides = METHODS["vaebm"]
    root = image_runs.write_dataset(dataset, tmp_path / "data", n_train=64, n_test=24)
    uri, store_args = stores
    code = main(["train", "method=vaebm", f"data={dataset}", f"data.root={root}", *SHORT, *overrides, *store_args])
    assert "no backbone file at 'runs:/" not in capsys.readouterr().out  # the reference reached the loop unresolved
    assert code == 0
    client, runs = _runs(uri)
    (run,) = [r for r in runs if r.data.params["method.name"] == "vaebm"]
    (stage1,) = [r for r in runs if r.info.run_id != run.info.run_id]
    assert run.data.tags[BACKBONE_TAG] == f"runs:/{stage1.info.run_id}/backbone"
    _check_evaluated(client, run, [2])


@pytest.mark.slow  # a minute or more: Ray, then a 2-worker TorchTrainer (the default suite has one in test_sweep_e2e)
def test_two_torch_trainer_ranks_read_disjoint_shards(tmp_path, stores, ray_cluster):
    """shard_probe (tests/image_runs.py) is mle keeping every training image's fingerprint in its per-rank
    state: over one epoch the two ranks' lists are disjoint and together are the training set."""
    root = image_runs.write_dataset("mnist", tmp_path / "data", n_train=64, n_test=16)
    uri, store_args = stores
    args = [
        "method=mle",
        "method.name=shard_probe",
        "data=mnist",
        f"data.root={root}",
        *SHORT,
        "method.energy={arch: mle_conv, channels: 4}",
        "method.sampler.steps=2",
        "train.batch_size=8",
        "train.iterations=4",  # 4 batches of 8 on each rank = one epoch of 64 images
        "train.eval_every=4",
        "scaling=cpu2",
    ]
    assert main(["train", *args, *store_args]) == 0
    client, (run,) = _runs(uri)
    assert run.data.params["scaling.num_workers"] == "2"
    _check_evaluated(client, run, [4])
    per_rank = load_state(run.data.tags[CHECKPOINT_TAG])["per_rank"]
    seen = [set(rank["extra"]["seen"]) for rank in per_rank]
    assert len(seen) == 2 and all(len(s) == 32 for s in seen)
    assert not seen[0] & seen[1]
    data = load_dataset(compose(None, args).data, 0)
    everything = set(image_runs.fingerprint(torch.stack(images_of(data.train_set, list(range(64))))))
    assert seen[0] | seen[1] == everything


@pytest.mark.slow  # ~14 s; the default suite reads an s3:// root through the data layer (test_image_data.py)
def test_an_s3_data_root_trains_from_the_node_cache(tmp_path, stores, s3):
    uri, store_args = stores  # after s3: EBM_SCALE_CACHE is this test's
    local = image_runs.write_dataset("mnist", tmp_path / "upload", n_train=64, n_test=16)
    prefix = s3.upload_dir(local, "datasets/mnist")
    dataset, overrides = METHODS["mle"]
    assert main(["train", "method=mle", "data=mnist", f"data.root={prefix}", *SHORT, *overrides, *store_args]) == 0
    client, (run,) = _runs(uri)
    assert run.data.params["data.root"] == prefix
    _check_evaluated(client, run, [2])
    cached = list(Path(tmp_path / "cache").rglob("train-images-idx3-ubyte"))
    assert cached, "the dataset was not copied into the node cache"


SMOKES = ["mle_fashion_mnist", "mle_cifar10", "ddaebm_cifar10", "vaebm_cifar10", "nt_ebm_svhn", "diffebm_mnist"]


# Each a minute or more on 2 busy cores (Ray, Tune, two trials, the sweep's summary): all slow.
@pytest.mark.slow
@pytest.mark.parametrize("sweep", SMOKES)
def test_smoke_sweep_runs_two_trials_end_to_end(sweep, tmp_path, stores, monkeypatch, ray_cluster):
    dataset = image_runs.SWEEP_DATA[sweep]
    if dataset in image_runs.MD5_CHECKED:
        image_runs.skip_md5_checks(monkeypatch)  # in this process; the workers' is Ray's setup hook
    root = image_runs.write_dataset(dataset, tmp_path / "data")
    uri, store_args = stores
    assert main(["sweep", f"{sweep}_smoke", f"data.root={root}", *store_args]) == 0
    client, runs = _runs(uri)
    trials = [r for r in runs if r.data.tags.get(KIND_TAG) == "trial"]
    assert len(trials) == 2
    # ASHA may stop one trial at its grace period (5 iterations); the other trains to the end.
    outcomes = sorted(r.data.tags[OUTCOME_TAG] for r in trials)
    assert outcomes in (["finished", "finished"], ["finished", "pruned"]), outcomes
    for run in trials:
        if run.data.tags[OUTCOME_TAG] == "finished":
            _check_evaluated(client, run, [5, 10])
    (parent,) = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    assert "best/eval/fd_random" in parent.data.metrics


@pytest.mark.slow  # inductor compiles the conv energy's forward and backward: about a minute on 2 cores
def test_train_compile_compiles_the_energy_in_place_and_trains(tmp_path, stores):
    root = image_runs.write_dataset("mnist", tmp_path / "data", n_train=64, n_test=24)
    uri, store_args = stores
    args = ["method=mle", "data=mnist", f"data.root={root}", *SHORT, *METHODS["mle"][1], *store_args]
    # noise-free chains without the generator loss: compiled graphs support no double backward
    overrides = ["train.compile=true", "method.sampler.noise_scale=0", "method.loss.generator_weight=0"]
    assert main(["train", *args, *overrides]) == 0
    client, runs = _runs(uri)
    (run,) = runs
    assert run.data.params["train.compile"] == "True"
    _check_evaluated(client, run, [2])
