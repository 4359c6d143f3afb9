"""Checkpoint files: written atomically, and found again to resume a run (`ckpt_path=last`)."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from aclip.errors import InputError

# What `ckpt_path=last` and `ckpt_path=<run dir>` look for: ModelCheckpoint's last.ckpt (last-v1.ckpt ...)
# and the checkpoint written on Ctrl-C (`aclip.callbacks.failures.InterruptCheckpoint`).
RESUMABLE_PATTERNS = ("last.ckpt", "last-v*.ckpt", "interrupted.ckpt")


def _is_local(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target, syncs it, then renames it into place.

    A crash or error while saving leaves the previous file at the target intact and loadable; the
    rename is atomic on a POSIX file system. (Lightning's own writer truncates the target, or stages the
    file in the system temporary folder, whose move onto another file system is a plain copy.) Remote
    paths (`s3://` ...) go through Lightning's writer, whose object-store uploads are atomic.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(temporary, "xb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        except BaseException as error:
            temporary.unlink(missing_ok=True)
            if isinstance(error, OSError) and error.filename is None:
                error.filename = str(target)  # a failed write (a full disk) names no file of its own
            raise
        _fsync_directory(target.parent)


class CheckpointNotFoundError(InputError, FileNotFoundError):
    """`ckpt_path` names no checkpoint: the message says how to name one."""


def find_resumable(directory: Path) -> Path | None:
    """The newest (by modification time) resumable checkpoint in `directory` or its `checkpoints/`."""
    candidates = [
        path
        for folder in (directory / "checkpoints", directory)
        for pattern in RESUMABLE_PATTERNS
        for path in folder.glob(pattern)
        if path.is_file()
    ]
    return max(candidates, key=lambda path: path.stat().st_mtime, default=None)


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file belongs to (the parent of its `checkpoints/` folder)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def resolve_ckpt_path(ckpt_path: str | os.PathLike | None, run_dir: Path) -> Path | None:
    """The checkpoint file that `ckpt_path` names, checked before anything is built.

    * None: a fresh run.
    * "last": the newest resumable checkpoint of this run's directory `run_dir`, i.e. of the run whose
      directory is given as `hydra.run.dir`.
    * a run directory (or its `checkpoints/` folder): its newest resumable checkpoint.
    * a file: that file.

    Raises CheckpointNotFoundError (a FileNotFoundError), saying how to point at a run, when there is
    nothing to resume from.
    """
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        found = find_resumable(run_dir)
        if found is None:
            raise CheckpointNotFoundError(
                f"ckpt_path=last found no checkpoint to resume from in this run's directory {run_dir} "
                f"(looked for {', '.join(RESUMABLE_PATTERNS)} in it and in its checkpoints/ folder). Every "
                "run gets a new directory: to continue an earlier run, name its directory, either "
                "`ckpt_path=last hydra.run.dir=<run dir>` (continue in that directory) or "
                "`ckpt_path=<run dir>` (continue in a new one), or give a .ckpt file"
            )
        return found
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        found = find_resumable(path)
        if found is None:
            raise CheckpointNotFoundError(
                f"ckpt_path={ckpt_path} is a directory without a checkpoint to resume from (looked for "
                f"{', '.join(RESUMABLE_PATTERNS)} in it and in its checkpoints/ folder)"
            )
        return found
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"ckpt_path={ckpt_path} does not exist; give a .ckpt file, a run directory, or `last` "
            "(with hydra.run.dir=<run dir>)"
        )
    return path


class CheckpointError(InputError, ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, foreign, or holding code."""


# torch's refusal of a pickled object, in both of its wordings: "Trying to load unsupported GLOBAL
# posix.system whose module posix is blocked." and "Unsupported global: GLOBAL mod.Class was not an
# allowed global by default."
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported global:? (?:global )?([\w.]+)", re.IGNORECASE)
# Lines of torch's message that advise loading the file unsafely or point at its documentation.
_ADVICE = re.compile(r"weights[_ ]only|check the documentation|file an issue", re.IGNORECASE)


def load_failure_reason(error: Exception) -> str:
    """Why torch (or safetensors) could not read a file as data, in a line that names a pickled object's
    type and never passes on torch's advice to load the file unsafely."""
    text = str(error)
    found = _UNSUPPORTED_GLOBAL.search(text)
    if found:
        return (
            f"it holds a pickled Python object ({found.group(1)}), which is code, not data: aclip never "
            "loads one"
        )
    lines = (line.strip() for line in text.splitlines())
    return next((line for line in lines if line and not _ADVICE.search(line)), type(error).__name__)


def _siblings(path: Path) -> str:
    """The other checkpoints beside `path`, newest first, for an error message."""
    # A link (last.ckpt) and the file it names are one checkpoint; a link to a deleted file is none.
    others = [p for p in path.parent.glob("*.ckpt") if p.is_file() and not p.samefile(path)]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    if not others:
        return "There is no other checkpoint in its folder."
    return "Other checkpoints in its folder, newest first: " + ", ".join(p.name for p in others[:8])


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The contents of a checkpoint file: tensors and plain containers only (`weights_only=True`, so no
    pickled object is ever rebuilt), memory-mapped so that reading the metadata costs little.

    Raises:
        CheckpointError: the file is truncated, not a checkpoint, or holds pickled objects; the message
            names the file and the other checkpoints beside it.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as error:
        name = f"{path} (a link to {path.resolve().name})" if path.is_symlink() else path
        raise CheckpointError(
            f"{name} is not a checkpoint of aclip's model, or is truncated: {load_failure_reason(error)}. "
            f"{_siblings(path)}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of aclip's model: it holds a {type(checkpoint).__name__}"
        )
    return checkpoint


# The files a ModelCheckpoint state names; Lightning deletes the superseded ones when it saves the next.
_CHECKPOINT_FILE_FIELDS = ("best_model_path", "kth_best_model_path", "last_model_path")


def check_checkpoint_file_paths(checkpoint: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose ModelCheckpoint states name a file through `..`.

    A resumed ModelCheckpoint deletes the files its state names as superseded when they lie under its
    folder as written, which `<folder>/../../<file>` does though the file lies elsewhere. Lightning never
    writes such a path; a file named plainly outside the folder is left alone by Lightning itself.
    """
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not str(key).startswith("ModelCheckpoint"):
            continue
        fields = state if isinstance(state, dict) else {}
        best_k = fields.get("best_k_models") or {}
        named = [(field, fields.get(field)) for field in _CHECKPOINT_FILE_FIELDS]
        named += [("best_k_models", name) for name in (best_k if isinstance(best_k, dict) else [best_k])]
        for field, name in named:
            if name in (None, "") or (isinstance(name, str) and ".." not in Path(name).parts):
                continue
            raise CheckpointError(
                f"{path} cannot be resumed: its {key} state names {field}={name!r}, a file outside its "
                f"checkpoint folder {fields.get('dirpath')!r} that Lightning would delete. Resume from a "
                "checkpoint this project wrote, or start from its weights alone with model.init_from"
            )
