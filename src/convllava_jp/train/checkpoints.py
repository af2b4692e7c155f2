"""A stage's directories on disk: `checkpoints/checkpoint-N` and the final `model`, published whole.

Every directory a later run reads is written beside its final name and renamed into place only
when complete (`io.publish_dir`), so a run killed at any moment leaves the previous checkpoint or
model loadable. `checkpoint-N` holds the Trainer's files (`trainer_state.json` marks it complete)
plus the skipped-record counts (`skip_tracker.json`).

Deleting is the same in reverse: a directory is first renamed to a hidden name (one atomic step),
then removed, so a kill midway never leaves a half-deleted `checkpoint-N` that still looks complete.
A kill between `publish_dir`'s two renames (old moved aside, new not yet in place) is undone at the
next start: `restore_moved_aside` puts the old directory back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from ..errors import CheckpointError
from ..io import publish_dir

log = logging.getLogger(__name__)

SKIP_STATE_NAME = "skip_tracker.json"
TRAINER_STATE_NAME = "trainer_state.json"

# Called with a checkpoint's staged directory once it is fully written, right before it is published.
BeforePublish = Callable[[Path], None]


def _step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-N` dirs (only renamed-into-place, i.e. complete, ones), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p
        for p in run_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-")[-1].isdigit() and (p / TRAINER_STATE_NAME).is_file()
    ]
    return sorted(found, key=_step)


def delete_dir(path: Path) -> None:
    """Remove a directory: renamed to a hidden `.NAME.deleting-*` first, then deleted.

    The rename is atomic, so a kill at any moment leaves the directory whole under its name, or
    gone from it; `clean_run_dir` removes a hidden leftover at the next start.
    """
    hidden = path.parent / f".{path.name}.deleting-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, hidden)
    except FileNotFoundError:
        return
    shutil.rmtree(hidden, ignore_errors=True)


def restore_moved_aside(path: Path) -> bool:
    """Put back the old `path` that `io.publish_dir` moved aside (`.NAME.old-*`) if a kill came
    before the new one was renamed into place; True if it did. The aside copy is whole: it is only
    deleted after the new directory is in place.
    """
    if path.exists():
        return False
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    os.replace(aside[-1], path)
    log.warning("restored %s, moved aside by a publish that was interrupted", path)
    return True


def rotate_checkpoints(run_dir: Path, limit: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `limit` (None or 0: keep all)."""
    if not limit:
        return
    ckpts = complete_checkpoints(run_dir)
    for old in ckpts[: max(len(ckpts) - limit, 0)]:
        delete_dir(old)


def resolve_resume(run_dir: Path, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from: newest complete one (`True`), a given path, or none."""
    if resume is True:
        done = complete_checkpoints(run_dir)
        return done[-1] if done else None
    if not resume:
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(
            f"--resume {path}: not a complete checkpoint (no {TRAINER_STATE_NAME}); complete ones in "
            f"{run_dir}: {', '.join(p.name for p in complete_checkpoints(run_dir)) or 'none'}"
        )
    return path


def clean_run_dir(run_dir: Path, start_over: bool, stage_name: str) -> None:
    """Remove what a killed run left half-written; with `start_over`, the old checkpoints too.

    A checkpoint that an interrupted publish had moved aside is put back first.
    """
    for aside in run_dir.glob(".checkpoint-*.old-*"):
        restore_moved_aside(run_dir / aside.name[1:].split(".old-")[0])
    for stale in [*run_dir.glob(".staging-*"), *run_dir.glob(".checkpoint-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if start_over:
        old = complete_checkpoints(run_dir)
        if old:
            log.warning("stage %s: starting over; removing %d old checkpoints", stage_name, len(old))
            for path in old:
                delete_dir(path)


def checkpoint_staging(run_dir: Path, step: int) -> Path:
    """Where the Trainer writes checkpoint-`step` (as `<staging>/checkpoint-<step>`) before it is published."""
    return run_dir / f".staging-{step}"


def _move_into(src: Path, dst: Path) -> None:
    """Move the entries of directory `src` into directory `dst` (renames: same file system)."""
    for entry in src.iterdir():
        os.replace(entry, dst / entry.name)


def publish_checkpoint(
    run_dir: Path,
    step: int,
    skip_state: dict,
    save_total_limit: int | None,
    before_publish: BeforePublish | None = None,
) -> Path:
    """Publish the staged checkpoint-`step` as `run_dir/checkpoint-<step>`; main process only.

    Adds the skip counts, calls `before_publish` (if any) on the complete staged directory,
    fsyncs and renames it into place, and rotates old checkpoints.
    """
    staging = checkpoint_staging(run_dir, step)
    staged = staging / f"checkpoint-{step}"
    (staged / SKIP_STATE_NAME).write_text(json.dumps(skip_state), encoding="utf-8")
    if before_publish is not None:
        before_publish(staged)
    final = publish_dir(run_dir / staged.name, lambda tmp: _move_into(staged, tmp), replace_if=lambda _: True)
    shutil.rmtree(staging, ignore_errors=True)
    rotate_checkpoints(run_dir, save_total_limit)
    log.info("checkpoint %s saved", final)
    return final


def model_staging(model_dir: Path) -> Path:
    """Where every process writes the final model before `publish_model_dir` renames it into place."""
    return model_dir.parent / f".{model_dir.name}.staging"


def publish_model_dir(model_dir: Path, extra: Callable[[Path], None]) -> None:
    """Publish the model written into `model_staging(model_dir)` as `model_dir`; main process only.

    `extra(tmp)` adds what the model save does not write (the processor). An existing model dir
    of an earlier run of the stage is replaced.
    """
    staging = model_staging(model_dir)

    def write(tmp: Path) -> None:
        _move_into(staging, tmp)
        (tmp / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle; not model data
        extra(tmp)

    restore_moved_aside(model_dir)  # an earlier publish killed between its renames
    publish_dir(model_dir, write, replace_if=lambda _: True)
    shutil.rmtree(staging, ignore_errors=True)
    for leftover in model_dir.parent.glob(f".{model_dir.name}.*-*"):  # of a publish killed midway
        shutil.rmtree(leftover, ignore_errors=True)
    log.info("saved model and processor to %s", model_dir)
