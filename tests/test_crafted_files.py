"""A checkpoint, an export folder and a weights file are data: a crafted one, sent by someone else, is
refused or read for its weights alone through every entry point that takes one, and nothing in it chooses
code to run (Hydra's `instantiate`, `getattr`, an unpickled object) or a file to read, write or delete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import aclip
from aclip import export
from aclip.callbacks.resume import RUN_CONFIG_KEY, RUN_OVERRIDES_KEY
from aclip.checkpointing import CheckpointError
from aclip.cli import run_training
from aclip.open_clip_format import CONFIG_FILE
from aclip.tasks import evaluate_checkpoint, train
from tests.helpers import SYNTHETIC_EVAL_OVERRIDES, TINY_SYNTHETIC_OVERRIDES, compose_config

WRITTEN = "written by the crafted file"
# ViT's patch projection, so that every entry point, aclip.export included, reaches the crafted contents.
QUICK = ["evaluation.at_end=false", "evaluation.every_n_steps=null", "model.vision.stem=patch"]


class WritesOnUnpickle:
    """An object whose unpickling writes `path`: what a pickle payload does instead of holding data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:  # what pickle calls to rebuild it
        return Path.write_text, (self.path, WRITTEN)


def writes(victim: Path) -> dict[str, Any]:
    """A Hydra node that writes `victim` when instantiated (`Path(victim).write_text(...)`)."""
    return {
        "_target_": "pathlib.Path.write_text",
        "_args_": [{"_target_": "pathlib.Path", "_args_": [str(victim)]}, WRITTEN],
    }


# Each payload alters a trained checkpoint's contents (to be saved in `run_dir`) so as to act on `victim`,
# and returns the key that a refusal must name.
def run_config_interpolation(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint[RUN_CONFIG_KEY]["evaluation"]["loader"]["interpolation"] = writes(victim)
    return "evaluation.loader.interpolation"


def run_config_callback(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint[RUN_CONFIG_KEY]["callbacks"]["payload"] = writes(victim)
    return "callbacks.payload"


def masking_target(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    """A masking node that unpickles a payload file with `torch.load(weights_only=False)`."""
    pickled = victim.with_name("payload.pkl")
    torch.save(WritesOnUnpickle(victim), pickled)
    node = {"_target_": "torch.load", "f": str(pickled), "weights_only": False}
    checkpoint["hyper_parameters"]["masking"] = node
    return "masking._target_"


def optimizer_target(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    node = {"_target_": "builtins.open", "_partial_": True, "file": str(victim), "mode": "w"}
    checkpoint["hyper_parameters"]["optimizer"] = node
    return "optimizer._target_"


def scheduler_target(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint["hyper_parameters"]["scheduler"] = {"_target_": "pathlib.Path.unlink", "self": str(victim)}
    return "scheduler._target_"


def vision_init_from(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint["hyper_parameters"]["vision"]["init_from"] = str(victim)
    return "vision.init_from"


def model_init_from(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint["hyper_parameters"]["init_from"] = str(victim)
    return "init_from"


def pickled_object(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint["callbacks"]["payload"] = WritesOnUnpickle(victim)
    return "pickled Python object"


def stale_checkpoint_paths(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    """ModelCheckpoint states naming another file as the last and best checkpoints, which Lightning
    replaces, deleting the old file, when it writes the next ones (a run resumed in the checkpoint's own
    directory restores them)."""
    for key, state in checkpoint["callbacks"].items():
        if key.startswith("ModelCheckpoint"):
            paths = {"last_model_path": str(victim), "best_model_path": str(victim)}
            state.update(dirpath=str(run_dir / "checkpoints"), best_k_models={str(victim): 0}, **paths)
    return "last_model_path"


def traversing_checkpoint_paths(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    """ModelCheckpoint states naming the victim through their own folder (`<folder>/../../victim.txt`),
    which passes Lightning's check that a superseded file lies under the folder before it deletes it."""
    folder = run_dir / "checkpoints"
    through = str(folder / os.path.relpath(victim, folder))
    for key, state in checkpoint["callbacks"].items():
        if key.startswith("ModelCheckpoint"):
            # The worst of two kept checkpoints: the next save replaces it (`kth_best_model_path`).
            best_k = {through: torch.tensor(0), str(folder / "step0000002.ckpt"): torch.tensor(2)}
            paths = {"best_model_path": through, "kth_best_model_path": through, "kth_value": torch.tensor(0)}
            state.update(dirpath=str(folder), best_k_models=best_k, **paths)
    return "a file outside its checkpoint folder"


def resume(crafted: Path, tmp_path: Path) -> None:
    """`train.py ckpt_path=last hydra.run.dir=<the crafted run>`: resumed in the checkpoint's directory, its
    config composed again from the overrides the checkpoint records (`aclip.recompose`), to the end of the
    epoch (step 4 of 4), where the checkpoint callbacks save and delete the files they supersede."""
    overrides = [*TINY_SYNTHETIC_OVERRIDES, *QUICK, "trainer.max_steps=4", "ckpt_path=last"]
    run_training(compose_config("train", overrides, crafted))


def evaluate(crafted: Path, tmp_path: Path) -> None:
    evaluate_checkpoint(compose_config("eval", [*SYNTHETIC_EVAL_OVERRIDES, f"ckpt_path={crafted}"], tmp_path))


def load(crafted: Path, tmp_path: Path) -> None:
    aclip.load(crafted)


def export_main(crafted: Path, tmp_path: Path) -> None:
    export.main([str(crafted), str(tmp_path / "exported")])


def init_from(crafted: Path, tmp_path: Path) -> None:
    """`train.py model.init_from=<crafted>`: only the weights are read; the run trains."""
    train(
        compose_config("train", [*TINY_SYNTHETIC_OVERRIDES, *QUICK, f"model.init_from={crafted}"], tmp_path)
    )


def recorded_overrides(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    """Command-line overrides recorded for a resume to compose again, naming code: a callback that writes
    the file, a masking policy that opens it."""
    checkpoint[RUN_OVERRIDES_KEY] = [
        "+callbacks.payload._target_=pathlib.Path.write_text",
        f"+callbacks.payload._args_=[{victim},'{WRITTEN}']",
        "masking._target_=builtins.open",
        f"+masking.file={victim}",
    ]
    return "never refused"


def malformed_overrides(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    checkpoint[RUN_OVERRIDES_KEY] = [{"_target_": "builtins.open", "file": str(victim), "mode": "w"}]
    return "not a list of strings"


def inert_records(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    """The payloads in what a resume only compares (the run config), composes again only where a user could
    have typed it (the recorded overrides) or Lightning keeps for itself (the checkpoint callbacks' paths),
    at once: a resume must go on without acting on any of them."""
    for payload in (
        run_config_interpolation,
        run_config_callback,
        stale_checkpoint_paths,
        recorded_overrides,
    ):
        payload(checkpoint, victim, run_dir)
    return "never refused"


def every_description(checkpoint: dict[str, Any], victim: Path, run_dir: Path) -> str:
    """Every payload of the description and the run config at once: `model.init_from` reads weights only."""
    for payload in DESCRIPTION_PAYLOADS:
        payload(checkpoint, victim, run_dir)
    return "never refused"


DESCRIPTION_PAYLOADS = (
    run_config_interpolation,
    run_config_callback,
    masking_target,
    optimizer_target,
    scheduler_target,
    vision_init_from,
    model_init_from,
)
REFUSED_PAYLOADS = (*DESCRIPTION_PAYLOADS[2:], pickled_object)  # what the model's description names
ENTRIES = {
    "evaluate.py": evaluate,
    "aclip.load": load,
    "aclip.export": export_main,
    "resume": resume,
    "model.init_from": init_from,
}
CASES = [
    *(
        (entry, payload)
        for entry in ("evaluate.py", "aclip.load", "aclip.export")
        for payload in (*DESCRIPTION_PAYLOADS, pickled_object)
    ),
    *(
        ("resume", payload)
        for payload in (*REFUSED_PAYLOADS, malformed_overrides, inert_records, traversing_checkpoint_paths)
    ),
    *(("model.init_from", payload) for payload in (pickled_object, every_description)),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Any]:
    """The contents of a tiny run's checkpoint after two steps."""
    run = tmp_path_factory.mktemp("trained")
    train(compose_config("train", [*TINY_SYNTHETIC_OVERRIDES, *QUICK, "trainer.max_steps=2"], run))
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture
def read_files(monkeypatch) -> list[str]:
    """Every path `torch.load` and safetensors' `load_file` are asked to read, recorded as they read it."""
    import safetensors.torch

    paths: list[str] = []
    for owner, name in ((torch, "load"), (safetensors.torch, "load_file")):
        original = getattr(owner, name)

        def recording(path: Any, *args: Any, original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            paths.append(str(path))
            return original(path, *args, **kwargs)

        monkeypatch.setattr(owner, name, recording)
    return paths


@pytest.mark.parametrize(("entry", "payload"), CASES, ids=[f"{e}-{p.__name__}" for e, p in CASES])
def test_a_crafted_checkpoint_is_refused_or_read_as_weights_alone(
    entry, payload, trained, tmp_path, read_files
):
    """Each entry point either refuses the file, naming what it holds, or uses it without acting on the
    payload (a resume compares the stored run config, `model.init_from` reads the weights alone)."""
    victim, crafted = tmp_path / "victim.txt", tmp_path / "crafted"
    victim.write_text("intact")
    checkpoint = torch.load(_saved(trained, tmp_path / "copy.ckpt"), weights_only=True)  # a deep copy
    key = payload(checkpoint, victim, crafted)
    _saved(checkpoint, crafted / "checkpoints" / "last.ckpt")
    try:
        ENTRIES[entry](crafted, tmp_path / "out")
    except Exception as error:  # Hydra wraps what `model.init_from`'s constructor raises
        refusal = error if isinstance(error, CheckpointError) else error.__cause__
        assert isinstance(refusal, CheckpointError), error
        assert key in str(refusal) and "weights_only" not in str(refusal)
    assert victim.read_text() == "intact"
    assert str(victim) not in read_files


def _saved(contents: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(contents, path)
    return path


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_a_pickle_payload_given_as_tower_weights_is_refused_without_running(tower, tmp_path, train_config):
    victim = tmp_path / "victim.txt"
    weights = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(1), "payload": WritesOnUnpickle(victim)}, weights)
    with pytest.raises(Exception, match="getattr"):  # the global pickle names `Path.write_text` by
        train(train_config(*QUICK, f"model.{tower}.init_from={weights}"))
    assert not victim.exists()


def test_an_export_folder_naming_what_open_clip_would_fetch_is_refused(trained, tmp_path, monkeypatch):
    folder = tmp_path / "exported"
    checkpoint = _saved(trained, tmp_path / "run" / "checkpoints" / "last.ckpt")
    export.main([str(checkpoint), str(folder)])
    aclip.load(folder)  # as written, it loads
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "someone/any-model"
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    import open_clip

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("open_clip was handed the crafted config")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", unreachable)
    with pytest.raises(
        CheckpointError, match=r"model_cfg\.text_cfg\.hf_model_name, which aclip's exports never"
    ):
        aclip.load(folder)
    shutil.rmtree(folder)
