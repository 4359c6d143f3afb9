"""Start-up checks of a composed configuration, before any data or model is built."""

from __future__ import annotations

import warnings
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from aclip.callbacks.ema import EMAUpdate
from aclip.distributed import per_device_batch_size, world_size
from aclip.errors import ConfigError
from aclip.evaluation.masked import masked_views
from aclip.modules.schedule import check_recipe
from aclip.modules.self_supervision import heads_built, views_needed
from aclip.modules.stages import build_phases
from aclip.modules.vision import check_patch_grid, resolve_layers
from aclip.renamed import check_config
from aclip.specs import SpecError, is_number


def resolved_job_config(cfg: DictConfig) -> dict[str, Any]:
    """The job's config as plain containers with every interpolation resolved (Hydra's own node left out)."""
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    return OmegaConf.to_container(job, resolve=True)


def validate_config(cfg: DictConfig) -> None:
    """Reject values that would fail later (or silently misbehave), naming the key and the fix."""
    check_config(cfg)
    check_required(cfg)
    masked_views(cfg.get("evaluation"))
    data, trainer = cfg.data, cfg.trainer
    world = world_size(trainer)
    batch_size = data.get("batch_size")
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        per_device_batch_size(batch_size, world)
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if accumulate < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1, got {accumulate}")
    if "model" not in cfg:
        return
    model = cfg.model
    try:
        check_patch_grid(model.vision.image_size, model.vision.patch_size, prefix="model.vision.")
        check_recipe(
            OmegaConf.to_container(model.optimizer, resolve=True),
            OmegaConf.to_container(model.scheduler, resolve=True),
            prefix="model.",
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    ssl = model.get("self_supervision") or {}
    num_views = cfg.data.get("num_views", 1)
    if num_views < views_needed(ssl.get("view_loss"), ssl.get("view_weight", 1.0)):
        raise ConfigError(
            f"model.self_supervision.view_loss={ssl.view_loss} compares different views of an image but "
            f"data.num_views={num_views}; set data.num_views>=2 or model.self_supervision.view_weight=0"
        )
    policy = _check_masking(cfg)
    _check_phases(cfg)
    _check_budget(cfg)
    _check_ema_callback(cfg, policy)
    _check_batch_norm_sync(cfg, world)
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if not trainer.get("fast_dev_run") and (max_epochs in (None, -1, 0)) and max_steps in (None, -1):
        raise ConfigError(
            "set trainer.max_epochs (>= 1) or trainer.max_steps: training needs an end for its schedule"
        )


def check_optimized_metric(cfg: DictConfig) -> None:
    """For a sweeper that maximises `optimized_metric`: the run must report it, i.e. evaluate, and the
    metric must be one of a set of `evaluation.sets` (`<kind>/<set>/<metric>`, e.g.
    zeroshot/imagenet/top1)."""
    key = cfg.get("optimized_metric")
    sets = [
        f"{kind}/{node.get('name', name)}"
        for name, node in (cfg.evaluation.get("sets") or {}).items()
        if node and "_target_" in node and (kind := getattr(get_class(node._target_), "kind", None))
    ]
    if sum(name.startswith("zeroshot/") for name in sets) >= 2:
        sets.append("zeroshot/average")  # the mean of the zero-shot sets' reported figures
    choose = (
        f"set optimized_metric=<set>/<metric> for one of this run's sets {sets}"
        if sets
        else "give the run an evaluation set (eval=...)"
    )
    if not key:
        raise ConfigError(f"the sweeper maximises optimized_metric, which is null: {choose}")
    if not cfg.evaluation.get("at_end"):
        raise ConfigError(
            f"the sweeper maximises optimized_metric={key}, but evaluation.at_end=false reports no metric: "
            "set evaluation.at_end=true"
        )
    if not any(key.startswith(f"{name}/") for name in sets):
        raise ConfigError(
            f"the sweeper maximises optimized_metric={key}, which no eval set reports: {choose}"
        )


def check_required(cfg: DictConfig) -> None:
    """Name a value a preset leaves to the command line (`${aclip.required:...}`) before anything starts."""

    def required(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict):
            return [key for name, value in node.items() for key in required(value, f"{prefix}{name}.")]
        is_required = isinstance(node, str) and node.startswith("${aclip.required:")
        return [prefix[:-1]] if is_required else []

    for key in required(OmegaConf.to_container(cfg, resolve=False), ""):
        try:
            OmegaConf.select(cfg, key)
        except InterpolationResolutionError as error:
            cause: BaseException | None = error
            while cause is not None and not isinstance(cause, ConfigError):
                cause = cause.__cause__ or cause.__context__  # OmegaConf wraps the resolver's error twice
            raise cause or error from None


def _check_masking(cfg: DictConfig) -> Any:
    """Build the masking policy (importing its class, as the config names it) and check that it works on
    the tower's patch grid and blocks, before any tower is built; the policy (None without masking)."""
    if not cfg.get("masking"):
        return None
    try:
        policy = instantiate(cfg.masking)
    except Exception as error:  # Hydra wraps the constructor's error; its message names the parameter
        cause = error.__cause__ or error
        raise ConfigError(f"masking.{cause}") from None
    vision = cfg.model.vision
    side = policy.view_size(vision.image_size, vision.patch_size)
    grid = (side // vision.patch_size, side // vision.patch_size)
    try:
        policy.num_keep(grid)
    except ValueError as error:
        raise ConfigError(
            f"masking.unit={policy.unit} does not fit model.vision.image_size="
            f"{vision.image_size} at patch_size={vision.patch_size}: {error}"
        ) from None
    if policy.needs_scores:
        try:
            resolve_layers(policy.layers, vision.depth)
        except ValueError as error:
            raise ConfigError(f"masking.layers: {error} (model.vision.depth={vision.depth})") from None
    return policy


def _check_phases(cfg: DictConfig) -> None:
    """Build the phases of `model.phases` (`stages` group) from the masking registry, as the model will,
    and check each on the tower and the batch's views, naming the key of what cannot work."""
    model = cfg.model
    phases = OmegaConf.to_container(model.get("phases"), resolve=True) if model.get("phases") else None
    if not phases:
        return
    masking = OmegaConf.to_container(cfg.masking, resolve=True) if cfg.get("masking") else None
    try:
        built = build_phases(phases, masking)
    except SpecError as error:
        raise ConfigError(f"model.{error} (the `stages` group writes model.phases)") from None
    vision, views = model.vision, cfg.data.get("num_views", 1)
    for index, phase in enumerate(built):
        key, policy = f"model.phases[{index}]", phase.masking
        if phase.views is not None and phase.views > views:
            raise ConfigError(
                f"{key}.views={phase.views}, but the batches have data.num_views={views} views: give the "
                f"phase at most {views}, or raise data.num_views"
            )
        side = policy.view_size(vision.image_size, vision.patch_size)
        try:
            policy.num_keep((side // vision.patch_size, side // vision.patch_size))
            if policy.needs_scores:
                resolve_layers(policy.layers, vision.depth)
        except ValueError as error:
            raise ConfigError(f"{key}.masking ({policy!r}) does not fit model.vision: {error}") from None


def _check_budget(cfg: DictConfig) -> None:
    """`budget.flops` and `budget.seconds`: null or a number > 0."""
    for name, value in (cfg.get("budget") or {}).items():
        if value is not None and (not is_number(value) or value <= 0):
            raise ConfigError(f"budget.{name} must be null or a number > 0, got {value!r}")


def _check_ema_callback(cfg: DictConfig, policy: Any) -> None:
    """The EMA teacher moves only with an `EMAUpdate` callback: required when the masking reads its scores
    or BYOL its features, otherwise a warning."""
    callbacks = [node for node in (cfg.get("callbacks") or {}).values() if node and "_target_" in node]
    if any(issubclass(get_class(node._target_), EMAUpdate) for node in callbacks):
        return
    message = "no EMAUpdate callback (callbacks.ema): the EMA model will not move during training"
    _, byol = _heads(cfg)
    if (policy is not None and policy.needs_scores) or byol:
        raise ConfigError(f"{message}, but the masking or BYOL needs the EMA model; add callbacks.ema")
    warnings.warn(message, stacklevel=2)


def _check_batch_norm_sync(cfg: DictConfig, world: int) -> None:
    """Batch norms (the heads' or the convolutional stem's) synchronised across CPU processes: torch's
    SyncBatchNorm runs only on GPU tensors, so such a run would fail at its first training step."""
    trainer = cfg.trainer
    if world < 2 or trainer.get("accelerator") != "cpu":
        return  # GPUs run SyncBatchNorm, and a single process has nothing to synchronise
    sync_batchnorm = trainer.get("sync_batchnorm", False)
    if cfg.model.vision.get("stem") == "conv" and sync_batchnorm:
        raise ConfigError(
            f"model.vision.stem=conv with {world} CPU processes: trainer.sync_batchnorm would make the "
            "stem's batch norms SyncBatchNorm, which torch runs only on GPU; set "
            "trainer.sync_batchnorm=false (each process's own statistics) or model.vision.stem=patch"
        )
    norm = (cfg.model.get("self_supervision") or {}).get("norm", "layer")
    view_loss, byol = _heads(cfg)
    synchronised = norm == "sync_batch" or (norm == "batch" and sync_batchnorm)
    if (view_loss is not None or byol) and synchronised:
        raise ConfigError(
            f"model.self_supervision.norm={norm} with {world} CPU processes: the heads' batch norms would "
            "be SyncBatchNorm, which torch runs only on GPU; use model.self_supervision.norm=layer, or "
            "norm=batch with trainer.sync_batchnorm=false for per-process statistics"
        )


def _heads(cfg: DictConfig) -> tuple[str | None, bool]:
    """The auxiliary heads the model will build (`heads_built`) from its `model.self_supervision` node."""
    ssl = cfg.model.get("self_supervision") or {}
    return heads_built(ssl.get("view_loss"), ssl.get("view_weight", 1.0), ssl.get("byol_weight", 0.0))
