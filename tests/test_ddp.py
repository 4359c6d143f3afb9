"""Distributed data parallel: two CPU processes (gloo) train exactly like one process on their union batch.

Why it holds. Split a global batch of N = W * B samples into W local batches of B and let L be the loss
of the whole batch computed by one process. Rank r computes l_r, its B rows scored against the columns of
every rank (ClipLoss and SimCLRLoss all-gather the features with gradient), so that mean_r l_r = L; the
loss modules shift the value they return (without gradient) to mean_r l_r, so every rank reports L. The
all-gather backward sums the columns' gradients over ranks, so the gradient reaching rank r's own features
is W * dL/df_r, and DDP averages the parameter gradients:

    mean_r  W * sum_{rows i of r} dL/df_i * df_i/dθ  =  sum_i dL/df_i * df_i/dθ  =  dL/dθ.

Per-sample losses (BYOL) are local means whose average over ranks is the global mean. So after the
all-reduce every rank holds the gradient of the global batch, AdamW takes the single process's step, and
the EMA teacher, moved from the same online weights, stays identical on every rank (and equal to the
single process's). The tests below check this through Lightning itself, not a re-implementation:

- `ddp_world` starts two processes that rendezvous like `torchrun` workers (environment ranks, a gloo
  process group) and run `Trainer.fit` with the `trainer=ddp_cpu` config: Lightning's DDPStrategy wraps
  the module in DistributedDataParallel, gives each rank its half of the data (DistributedSampler),
  averages gradients, steps AdamW and runs the EMA callback.
  The reference is `trainer=cpu` (one process) on the same samples with batch 2B. Masking is
  deterministic (none, or attentive `low`, a top-k of the EMA scores) and the views are precomputed, so
  both runs see exactly the same inputs. Float64 (`64-true`) keeps rounding far below the tolerances, so
  even AdamW's first step, lr * g / (|g| + eps), cannot flip sign on a tiny gradient.
- `train_py_run` launches `python train.py trainer=ddp_cpu` in a subprocess, the way a user runs it
  (Lightning starts the second process), and checks what must be identical or different across ranks.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins import TorchSyncBatchNorm
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from aclip.config import resolved_job_config, validate_config
from aclip.distributed import per_device_batch_size, world_size
from aclip.errors import ConfigError
from aclip.tasks import train
from tests.helpers import TINY_OVERRIDES, compose_config, run_train_py

WORLD = 2
GLOBAL_BATCH = 8  # TINY_OVERRIDES' data.batch_size: 4 samples per rank
STEPS = 2
NUM_SAMPLES = GLOBAL_BATCH * STEPS

# What the equivalence runs share, on top of the tiny config: float64, a large constant learning rate and
# a fast EMA so that two steps move every weight well beyond the tolerances.
EQUIVALENCE_OVERRIDES = [
    "trainer.precision=64-true",
    "model.optimizer.lr=1e-2",
    "model.scheduler.warmup_epochs=0",
    "model.scheduler.min_lr=1e-2",
    "callbacks.ema.base_momentum=0.5",
    "evaluation.at_end=false",
]
# Plain CLIP (one full view); A-CLIP: 2 attentive views of 50 %, SimCLR between them (negatives gathered
# from every rank) and BYOL to the EMA teacher; and A-CLIP with SimSiam in place of SimCLR.
# Attentive masks from the first step: the teacher's choice is the same on any rank (the random cells
# of the tiny model's teacher warm-up are drawn per rank, so a rank's batch would see other masks).
_ATTENTIVE_AT_ONCE = ["model.teacher_warmup_steps=0", "model.teacher_warmup_until_loss=null"]
METHODS = {
    "clip": ["method=clip"],
    "aclip": ["method=aclip", *_ATTENTIVE_AT_ONCE],
    "aclip_simsiam": ["method=aclip", "model.self_supervision.view_loss=simsiam", *_ATTENTIVE_AT_ONCE],
}
LOSS_TERMS = {
    "clip": {"train/loss", "train/clip_loss"},
    "aclip": {"train/loss", "train/clip_loss", "train/simclr_loss", "train/byol_loss"},
    "aclip_simsiam": {"train/loss", "train/clip_loss", "train/simsiam_loss", "train/byol_loss"},
}


# --------------------------------------------------------------------------------------------------
# What each process records
# --------------------------------------------------------------------------------------------------


def clone_state(module: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def batch_norm_types(module: nn.Module) -> list[str]:
    return sorted(
        {type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)}
    )


class RankRecorder(pl.Callback):
    """Records on every rank what the tests compare, and writes it to `<path>/rank<global rank>.pt`.

    Place it after `EMAUpdate`, so that at the end of a batch it sees the EMA already moved.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict[str, Any] = {"losses": [], "metrics": [], "grads": [], "batches": [], "keep": []}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before the strategy wraps the module in DDP (which broadcasts rank 0's weights).
        self.record["init"] = clone_state(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["start"] = clone_state(pl_module)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx
    ) -> None:
        keys = [key for key in ("index", "text", "boxes") if key in batch]
        self.record["batches"].append({key: batch[key].detach().cpu().clone() for key in keys})

    def on_before_optimizer_step(self, trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # After backward, i.e. after DDP's all-reduce: the gradients the optimizer will use.
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.record["grads"].append(grads)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self.record["losses"].append(outputs["loss"].detach().clone())
        self.record["metrics"].append(
            {k: v.detach().clone() for k, v in trainer.callback_metrics.items() if k.endswith("loss")}
        )
        self.record["keep"].append(outputs["keep"].detach().cpu())  # the step's kept indices

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.record |= {
            "end": clone_state(pl_module),
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
        }
        self.path.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.path / f"rank{trainer.global_rank}.pt")


def read_records(path: Path, ranks: int = WORLD) -> list[dict[str, Any]]:
    return [torch.load(path / f"rank{rank}.pt", weights_only=False) for rank in range(ranks)]


# --------------------------------------------------------------------------------------------------
# Fixed samples, and one fit
# --------------------------------------------------------------------------------------------------


class FixedSamples(Dataset):
    """Precomputed training samples (views, EMA crop, boxes, tokens), all or `indices` in that order.

    Each sample also carries its `index`, which the module ignores and the tests read."""

    def __init__(self, path: str, indices: list[int] | None = None) -> None:
        self.samples: dict[str, Tensor] = torch.load(path)
        self.indices = indices if indices is not None else list(range(len(self.samples["text"])))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.indices[index]
        return {"index": torch.tensor(sample), **{key: value[sample] for key, value in self.samples.items()}}


def make_samples(cfg: DictConfig, path: Path) -> None:
    """`NUM_SAMPLES` training samples of the configured data pipeline, drawn once with a fixed seed."""
    datamodule = instantiate(cfg.data)
    torch.manual_seed(0)
    samples = [datamodule.prepare_pair(*datamodule.train_source[i]) for i in range(NUM_SAMPLES)]
    torch.save({key: torch.stack([s[key] for s in samples]) for key in samples[0]}, path)


@dataclass
class FitJob:
    """One `Trainer.fit` of the configured module on fixed samples, recorded by `RankRecorder`."""

    config: dict[str, Any]  # resolved job config
    samples: str
    out: str
    indices: list[int] | None = None  # the samples in the order a single process reads them
    max_steps: int = -1

    def run(self) -> None:
        cfg = OmegaConf.create(self.config)
        pl.seed_everything(cfg.seed, verbose=False)  # the same initial weights in every run
        module = instantiate(cfg.model)
        callbacks = [instantiate(cfg.callbacks.ema), RankRecorder(self.out)]
        trainer = instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            max_steps=self.max_steps,
        )
        batch_size = per_device_batch_size(cfg.data.batch_size, world_size(cfg.trainer))
        loader = DataLoader(FixedSamples(self.samples, self.indices), batch_size=batch_size)
        trainer.fit(module, train_dataloaders=loader)


@dataclass
class TrainJob:
    """`aclip.tasks.train` itself (what `train.py` runs), recorded by `RankRecorder`."""

    config: dict[str, Any]

    def run(self) -> None:
        train(OmegaConf.create(self.config))


def _rank_main(rank: int, rendezvous: str, jobs: list[FitJob | TrainJob]) -> None:
    """One of `WORLD` processes started like `torchrun` workers: Lightning finds its rank in the environment
    (LOCAL_RANK set means "launched externally", so it starts no processes) and uses the gloo group."""
    os.environ |= {
        "WORLD_SIZE": str(WORLD),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
    }
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=rendezvous, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        for job in jobs:
            job.run()
            dist.barrier()
    finally:
        dist.destroy_process_group()


def sampler_order(rank: int, world: int, seed: int) -> list[int]:
    """The samples that Lightning's DistributedSampler (shuffled, `seed`, epoch 0) gives `rank` of `world`."""
    return list(
        DistributedSampler(range(NUM_SAMPLES), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    )


# The tiny default's convolutional stem has batch norms: trainer=ddp_cpu cannot synchronise them (each
# process normalises over its own batch), which would part the ranks from the single process.
# These tests run the DDP code path with ViT's patch projection.
PATCH_STEM = "model.vision.stem=patch"


def compose(tmp: Path, *overrides: str) -> DictConfig:
    return compose_config("train", [*TINY_OVERRIDES, PATCH_STEM, *overrides], tmp / "run")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_ddp_cpu_trainer_is_two_gloo_processes_with_their_own_batch_statistics(tmp_path):
    """The tiny global batch of 8 splits into 4 per process; the strategy is Lightning's DDP over gloo;
    batch norms keep each process's statistics (torch's SyncBatchNorm runs only on GPU)."""
    cfg = compose(tmp_path, "trainer=ddp_cpu")
    validate_config(cfg)
    assert world_size(cfg.trainer) == WORLD
    assert per_device_batch_size(cfg.data.batch_size, WORLD) == GLOBAL_BATCH // WORLD
    trainer = instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.strategy.process_group_backend == "gloo"
    assert trainer.num_devices == WORLD and trainer.num_nodes == 1
    assert [device.type for device in trainer.strategy.parallel_devices] == ["cpu", "cpu"]
    assert not cfg.trainer.sync_batchnorm and cfg.trainer.precision == "32-true"


def test_ddp_gpu_trainer(tmp_path):
    """The GPU preset: DDP (NCCL), bf16 autocast, SyncBatchNorm; data.batch_size stays the global batch."""
    cfg = compose(tmp_path, "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "data.batch_size=64")
    validate_config(cfg)
    trainer = cfg.trainer
    assert (trainer.accelerator, trainer.strategy, trainer.precision) == ("gpu", "ddp", "bf16-mixed")
    assert trainer.sync_batchnorm and trainer.use_distributed_sampler
    assert world_size(trainer) == 8 and per_device_batch_size(cfg.data.batch_size, 8) == 8
    with pytest.raises(ConfigError, match="world size 8"):
        validate_config(
            compose(tmp_path, "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "data.batch_size=12")
        )


def test_ddp_cpu_trainer_turns_batch_norm_heads_into_sync_batch_norm(tmp_path):
    """`sync_batchnorm: true` (trainer=ddp's): the layer sync that DDPStrategy.setup applies before wrapping
    the module in DDP converts the heads' BatchNorm1d. (A CPU fit cannot show it: DDP rejects SyncBatchNorm
    on CPU.)"""
    overrides = ["method=aclip", "model.self_supervision.norm=batch", "trainer.sync_batchnorm=true"]
    cfg = compose(tmp_path, "trainer=ddp_cpu", *overrides)
    module = instantiate(cfg.model)
    assert batch_norm_types(module) == ["BatchNorm1d"]
    layer_sync = instantiate(cfg.trainer, logger=False).strategy._layer_sync
    assert isinstance(layer_sync, TorchSyncBatchNorm)
    assert batch_norm_types(layer_sync.apply(module)) == ["SyncBatchNorm"]


@pytest.mark.parametrize("norm", ["batch", "sync_batch"])
def test_batch_statistics_across_cpu_processes_are_rejected_at_start_up(tmp_path, norm):
    """torch's SyncBatchNorm runs only on GPU: a CPU DDP run with batch-norm heads would fail at step 1."""
    overrides = ["method=aclip", f"model.self_supervision.norm={norm}"]
    synchronised = [*overrides, "trainer.sync_batchnorm=true"] if norm == "batch" else overrides
    with pytest.raises(ConfigError, match="SyncBatchNorm"):
        validate_config(compose(tmp_path, "trainer=ddp_cpu", *synchronised))
    validate_config(compose(tmp_path, "trainer=ddp", *overrides))
    validate_config(compose(tmp_path, "trainer=ddp_cpu", "method=aclip", "model.self_supervision.norm=layer"))
    if norm == "batch":  # trainer=ddp_cpu's own: each process's statistics
        validate_config(compose(tmp_path, "trainer=ddp_cpu", *overrides))


def test_a_convolutional_stem_across_cpu_processes_is_rejected_at_start_up(tmp_path):
    """Its batch norms would be SyncBatchNorm, which torch runs only on GPU: the run would fail at step 1."""
    conv = ["model.vision.stem=conv", "trainer.sync_batchnorm=true"]
    with pytest.raises(ConfigError, match="stem's batch norms SyncBatchNorm"):
        validate_config(compose(tmp_path, "trainer=ddp_cpu", *conv))
    validate_config(compose(tmp_path, "trainer=ddp", *conv))
    validate_config(compose(tmp_path, "trainer=ddp_cpu", "model.vision.stem=conv"))  # per-process statistics


# --------------------------------------------------------------------------------------------------
# Two processes against one: the fixture
# --------------------------------------------------------------------------------------------------


@dataclass
class World:
    ranks: dict[str, list[dict[str, Any]]]  # job -> the records of rank 0 and rank 1
    single: dict[str, dict[str, Any]]  # job -> the record of the one-process reference
    half: dict[str, dict[str, Any]]  # job -> one process on rank 0's first local batch alone


@pytest.fixture(scope="module")
def ddp_world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("ddp")
    jobs: list[FitJob | TrainJob] = []
    single_jobs: dict[str, list[FitJob]] = {}
    for name, method in METHODS.items():
        ddp_cfg = compose(tmp, "trainer=ddp_cpu", *method, *EQUIVALENCE_OVERRIDES)
        single_cfg = compose(tmp, "trainer=cpu", *method, *EQUIVALENCE_OVERRIDES)
        samples = str(tmp / f"{name}.samples.pt")
        make_samples(ddp_cfg, Path(samples))
        jobs.append(FitJob(resolved_job_config(ddp_cfg), samples, str(tmp / name / "ddp")))
        # Lightning shuffles the training set with a DistributedSampler (seed `seed`): the single process
        # reads the same permutation, so that its step k holds the samples of the ranks' steps k.
        seed = single_cfg.seed
        single_jobs[name] = [
            FitJob(
                resolved_job_config(single_cfg),
                samples,
                str(tmp / name / "single"),
                sampler_order(0, 1, seed),
            ),
            FitJob(
                resolved_job_config(single_cfg),
                samples,
                str(tmp / name / "half"),
                sampler_order(0, WORLD, seed)[: GLOBAL_BATCH // WORLD],
                max_steps=1,
            ),
        ]
    # The training entry point: A-CLIP with random masking (seeded per rank), 2 views (their boxes in the
    # enclosing crop depend only on the random crop parameters), the dataloader in the main process.
    train_cfg = compose(
        tmp,
        "trainer=ddp_cpu",
        "method=aclip",
        "masking=random",
        "trainer.limit_train_batches=1",
        "evaluation.at_end=false",
        "callbacks.mask_pictures=null",  # it would take the masks the recorder reads
    )
    train_job = TrainJob(resolved_job_config(train_cfg))
    recorder = {"_target_": f"{RankRecorder.__module__}.RankRecorder", "path": str(tmp / "train" / "ddp")}
    train_job.config["callbacks"]["recorder"] = recorder
    jobs.append(train_job)

    rendezvous = f"file://{tmp / 'rendezvous'}"
    # fork: the processes start with everything imported (spawn re-imports torch, Lightning and timm in
    # each, ~10 s on 2 cores); each uses one thread, as dataloader workers do after a fork. Not after
    # CUDA was initialised in this process, which a forked child could not use.
    start_method = "spawn" if torch.cuda.is_initialized() else "fork"
    mp.start_processes(_rank_main, args=(rendezvous, jobs), nprocs=WORLD, start_method=start_method)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the ranks; a tiny model gains nothing from more
    try:
        for job in (job for pair in single_jobs.values() for job in pair):
            job.run()
    finally:
        torch.set_num_threads(threads)
    world = World(
        ranks={name: read_records(tmp / name / "ddp") for name in [*METHODS, "train"]},
        single={name: read_records(tmp / name / "single", 1)[0] for name in METHODS},
        half={name: read_records(tmp / name / "half", 1)[0] for name in METHODS},
    )
    # What the tests compare is in memory now; the records on disk (2.4 GB, measured) would otherwise stay
    # there until the whole suite ends.
    shutil.rmtree(tmp)
    return world


def assert_close(actual: Tensor, expected: Tensor, context: str) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda default: f"{context}: {default}")


def online_and_ema(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a module state into the online weights and the EMA teacher's (model and BYOL projector)."""
    ema = {k: v for k, v in state.items() if k.startswith(("ema_model.", "self_supervision.ema_projector."))}
    return {k: v for k, v in state.items() if k not in ema}, ema


# --------------------------------------------------------------------------------------------------
# Two processes against one: the tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_ranks_split_the_single_process_batches(ddp_world, method):
    """Each rank trains on B = 4 samples per step; together they are the single process's 2B = 8."""
    ranks, single = ddp_world.ranks[method], ddp_world.single[method]
    assert [r["strategy"] for r in ranks] == ["DDPStrategy"] * WORLD
    assert [r["world_size"] for r in ranks] == [WORLD] * WORLD and single["world_size"] == 1
    for step in range(STEPS):
        local = [set(r["batches"][step]["index"].tolist()) for r in ranks]
        assert [len(samples) for samples in local] == [GLOBAL_BATCH // WORLD] * WORLD
        assert not local[0] & local[1]
        assert local[0] | local[1] == set(single["batches"][step]["index"].tolist())
        assert len(single["batches"][step]["index"]) == GLOBAL_BATCH


@pytest.mark.parametrize("method", list(METHODS))
def test_every_rank_reports_the_global_batch_loss(ddp_world, method):
    """The total loss and each term equal the single process's on 2B, on every rank: the gathered ones
    (CLIP, SimCLR) and the per-sample ones (SimSiam, BYOL), whose local means the losses shift to the
    global mean."""
    ranks, single = ddp_world.ranks[method], ddp_world.single[method]
    assert set(single["metrics"][0]) == LOSS_TERMS[method]
    for step in range(STEPS):
        for rank, record in enumerate(ranks):
            message = f"{method} step {step} rank {rank}"
            assert record["metrics"][step].keys() == single["metrics"][step].keys()
            for key, value in sorted(single["metrics"][step].items()):
                assert_close(record["metrics"][step][key], value, f"{message} {key}")
            assert_close(record["losses"][step], single["losses"][step], message)
    # Not vacuous: rank 0's local batch alone has another loss (a different set of negatives).
    assert not torch.allclose(ddp_world.half[method]["losses"][0], single["losses"][0], rtol=1e-3)


@pytest.mark.parametrize("method", list(METHODS))
def test_averaged_gradients_are_the_global_batch_gradients(ddp_world, method):
    """After DDP's all-reduce every rank holds dL/dθ of the global batch, for every trained parameter.

    Every online parameter gets a gradient, so DDP needs no `find_unused_parameters` for these methods."""
    ranks, single = ddp_world.ranks[method], ddp_world.single[method]
    for step in range(STEPS):
        expected = single["grads"][step]
        trained = {n for n in single["end"] if not n.startswith(("ema_model.", "self_supervision.ema_"))}
        assert set(expected) == trained  # every online parameter gets a gradient, no EMA one does
        assert sum(g.abs().sum() for g in expected.values()) > 0
        for rank, record in enumerate(ranks):
            assert record["grads"][step].keys() == expected.keys()
            for name, grad in expected.items():
                assert_close(record["grads"][step][name], grad, f"{method} step {step} rank {rank} {name}")
        for name, grad in ranks[0]["grads"][step].items():
            assert torch.equal(grad, ranks[1]["grads"][step][name]), name


@pytest.mark.parametrize("method", list(METHODS))
def test_parameter_updates_equal_the_single_process(ddp_world, method):
    """Two AdamW steps (and the logit-scale clamp) give the single process's online weights."""
    ranks, single = ddp_world.ranks[method], ddp_world.single[method]
    start, _ = online_and_ema(single["start"])
    expected, _ = online_and_ema(single["end"])
    moved = sum(not torch.allclose(expected[n], start[n], rtol=0, atol=1e-4) for n in expected)
    assert moved > 0.9 * len(expected)  # well beyond the tolerance: the comparison below is not vacuous
    for rank, record in enumerate(ranks):
        online, _ = online_and_ema(record["end"])
        assert online.keys() == expected.keys()
        for name, value in expected.items():
            assert_close(online[name], value, f"{method} rank {rank} {name}")


@pytest.mark.parametrize("method", list(METHODS))
def test_ema_is_identical_on_every_rank_and_equals_the_single_process(ddp_world, method):
    """The EMA teacher (model and BYOL projector) after two updates: bitwise the same on both ranks, since
    both moved it towards the same online weights, and the single process's within tolerance."""
    ranks, single = ddp_world.ranks[method], ddp_world.single[method]
    _, ema_start = online_and_ema(single["start"])
    _, expected = online_and_ema(single["end"])
    assert sum(not torch.allclose(expected[n], ema_start[n], rtol=0, atol=1e-4) for n in expected) > 0
    (_, ema0), (_, ema1) = (online_and_ema(record["end"]) for record in ranks)
    assert ema0.keys() == ema1.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(ema0[name], ema1[name]), f"{method}: EMA {name} differs between the ranks"
        assert_close(ema0[name], value, f"{method} EMA {name}")


# --------------------------------------------------------------------------------------------------
# Randomness: what must be identical across ranks, and what must differ
# --------------------------------------------------------------------------------------------------


def check_seeding_across_ranks(records: list[dict[str, Any]]) -> None:
    """The model and its EMA copy start identical on every rank (before DDP's broadcast: same seed), and
    the masking generator, seeded with the rank, draws different masks on each rank."""
    init0, init1 = (record["init"] for record in records)
    assert init0.keys() == init1.keys()
    for name, value in init0.items():
        assert torch.equal(value, init1[name]), f"{name} is initialised differently on the two ranks"
    for record in records:
        online, ema = online_and_ema(record["start"])
        for name, value in ema.items():
            online_name = name.replace("ema_model.", "model.", 1).replace("ema_projector", "byol_projector")
            assert torch.equal(value, online[online_name]), name
    for step, (keep0, keep1) in enumerate(zip(records[0]["keep"], records[1]["keep"], strict=True)):
        assert keep0.shape == keep1.shape
        assert not torch.equal(keep0, keep1), f"step {step}: both ranks drew the same random masks"


def test_train_seeds_model_alike_and_masks_per_rank(ddp_world):
    """`aclip.tasks.train` on two ranks: identical initial weights, different random masks."""
    check_seeding_across_ranks(ddp_world.ranks["train"])


def test_augmentation_differs_per_rank_when_loading_in_the_main_process(ddp_world):
    """With data.num_workers=0 the crops are drawn from the global RNG of each rank's main process. The
    boxes of 2 views in their enclosing crop depend on the crop parameters alone, not on the image."""
    boxes0, boxes1 = (record["batches"][0]["boxes"] for record in ddp_world.ranks["train"])
    assert not torch.equal(boxes0, boxes1)


# --------------------------------------------------------------------------------------------------
# `python train.py trainer=ddp_cpu`: Lightning launches the second process itself
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_py_run(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("train_py")
    run_train_py(
        *TINY_OVERRIDES,
        PATCH_STEM,
        "trainer=ddp_cpu",
        "method=aclip",
        "masking=random",  # seeded per rank: the masks must differ between the ranks
        "data.num_workers=1",  # Lightning seeds dataloader workers per rank
        "trainer.limit_train_batches=2",
        "callbacks.mask_pictures=null",  # it would take the masks the recorder reads
        "+callbacks.recorder._target_=tests.test_ddp.RankRecorder",
        f"+callbacks.recorder.path={tmp / 'records'}",
        cwd=tmp,
        env={"OMP_NUM_THREADS": "1"},
    )
    (run_dir,) = (tmp / "logs" / "train" / "runs").iterdir()
    return {"records": read_records(tmp / "records"), "run_dir": run_dir}


def test_train_py_ddp_cpu_trains_two_steps_on_two_ranks(train_py_run):
    """Both processes run the whole entry point: two steps of half the global batch, then evaluation."""
    records = train_py_run["records"]
    assert [r["strategy"] for r in records] == ["DDPStrategy"] * WORLD
    assert [r["world_size"] for r in records] == [WORLD] * WORLD
    assert [r["global_step"] for r in records] == [2, 2]
    assert all(len(batch["text"]) == GLOBAL_BATCH // WORLD for r in records for batch in r["batches"])
    assert (train_py_run["run_dir"] / "metrics.json").is_file()  # rank 0 evaluated and reported


def test_train_py_ddp_cpu_ema_and_weights_identical_on_both_ranks(train_py_run):
    """After two steps the online weights and the EMA teacher (moved each step) are bitwise equal."""
    end0, end1 = (record["end"] for record in train_py_run["records"])
    assert end0.keys() == end1.keys()
    for name, value in end0.items():
        assert torch.equal(value, end1[name]), f"{name} differs between the ranks"
    _, ema = online_and_ema(end0)
    _, ema_start = online_and_ema(train_py_run["records"][0]["start"])
    moved = sum(not torch.equal(value, ema_start[name]) for name, value in ema.items())
    assert moved > len(ema) // 2  # the teacher moved during the two steps


def test_train_py_ddp_cpu_seeds_model_alike_and_masks_and_views_per_rank(train_py_run):
    """Identical initial weights; masks and (with dataloader workers, seeded per rank) crops differ."""
    records = train_py_run["records"]
    check_seeding_across_ranks(records)
    for step in range(2):
        boxes0, boxes1 = (record["batches"][step]["boxes"] for record in records)
        assert not torch.equal(boxes0, boxes1), f"step {step}: both ranks cropped their views alike"
