"""Training checkpoints on disk: OUT/checkpoints/step-N, finding and resuming them, writing them safely, and the
adapter config a checkpoint or the finished run records.

A checkpoint holds the adapter tensors (safetensors, also a loadable adapter folder), optimizer, LR schedule,
accelerate's RNG/step state, and `trainer_state.json` (the optimizer step and run facts). The 2B frozen base
weights are popped from accelerate's `weights` list in a save hook, as diffusers' LoRA scripts do.
A checkpoint is written to `.tmp-step-N` and renamed when complete; older ones are deleted after that.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdsd3_cli.model.adapter import WEIGHTS_NAME, AdapterConfig, AdapterError, read_adapter_config
from mdsd3_cli.model.transformer import MDSD3Transformer
from mdsd3_cli.model.weights import adapter_state_dict
from mdsd3_cli.recipe.train import TrainRecipe
from mdsd3_cli.train.errors import TrainError
from mdsd3_cli.util.atomic import atomic_write, ensure_folder, fresh_folder
from mdsd3_cli.util.version import __version__

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
STATE_FORMAT = "mdsd3-train-state"
ADAPTER_DIR = "adapter"
_CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    """The folder (and preview) name of optimizer step `step`: step-000042."""
    return f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under OUT/checkpoints, oldest first (a folder counts once its state file exists)."""
    folder = Path(out_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The `trainer_state.json` of a checkpoint folder; errors name the file."""
    path = Path(checkpoint) / STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TrainError(f"{path}: not a readable mdsd3 training checkpoint ({error})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise TrainError(f"{path}: not an mdsd3 training state file")
    return state


def resolve_resume(out_dir: Path, resume: str | os.PathLike | None) -> Path | None:
    """The checkpoint to resume from: None (fresh start), `latest` (newest in OUT/checkpoints, or None when
    there is none yet) or a checkpoint folder. A fresh start into a folder with checkpoints is refused."""
    existing = list_checkpoints(out_dir)
    if resume is None:
        if existing:
            raise TrainError(
                f"{Path(out_dir) / CHECKPOINTS} already holds checkpoints (newest: {existing[-1][1].name}); "
                "pass --resume latest to continue that run, or choose another output.dir"
            )
        return None
    if str(resume) == "latest":
        return existing[-1][1] if existing else None
    path = Path(resume).expanduser().absolute()
    if not path.is_dir():
        raise TrainError(f"--resume {resume}: checkpoint folder not found: {path}")
    read_state(path)
    return path


def check_resume_state(state: dict[str, Any], where: Path, recipe: TrainRecipe) -> None:
    """Refuse a checkpoint (`state`, read from `where`) that `recipe` cannot continue: other classes or set."""
    if state.get("classes") != list(recipe.classes):
        raise TrainError(
            f"{where}: the checkpoint was trained for classes {state.get('classes')}, "
            f"the recipe has {list(recipe.classes)}"
        )
    if state.get("trainable") != recipe.train.trainable:
        raise TrainError(
            f"{where}: the checkpoint trained the {state.get('trainable')!r} set; "
            f"set train.trainable={state.get('trainable')} to resume it"
        )


def export_config(
    adapter_config: AdapterConfig, recipe: TrainRecipe, step: int, first_loss: float | None, last_loss: float | None
) -> AdapterConfig:
    """The adapter config a checkpoint or the exported adapter records: the run's facts and `train.start`."""
    training = {
        "tool": f"mdsd3 {__version__}",
        "steps": step,
        "trainable": recipe.train.trainable,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "recipe": recipe.model_dump(mode="json"),
    }
    return adapter_config.model_copy(update={"training": training, "start": recipe.train.start})


def load_checkpoint_adapter(model: MDSD3Transformer, checkpoint: str | os.PathLike, base_fingerprint: str) -> None:
    """Load a checkpoint's adapter tensors into `model` (exact fp32), after checking they fit it and its base."""
    from safetensors.torch import load_file

    folder = Path(checkpoint) / ADAPTER_DIR
    try:
        config = read_adapter_config(folder)
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except (AdapterError, OSError) as error:
        raise TrainError(f"checkpoint {checkpoint}: {error}") from error
    if config.base_fingerprint != base_fingerprint:
        raise TrainError(
            f"checkpoint {checkpoint} was trained on base {config.base_fingerprint}, "
            f"this recipe's base is {base_fingerprint}"
        )
    expected = set(adapter_state_dict(model))
    if set(tensors) != expected:
        raise TrainError(
            f"checkpoint {checkpoint}: adapter tensors do not fit this model (LoRA rank or trainable "
            f"set changed?): missing {sorted(expected - set(tensors))[:3]}, "
            f"unexpected {sorted(set(tensors) - expected)[:3]}"
        )
    model.load_state_dict(tensors, strict=False)


def write_checkpoint(accelerator: Accelerator, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """OUT/checkpoints/step-N: accelerate state (its save hooks add the adapter) + `state` as trainer_state.json,
    written under a temporary name and renamed when complete; then all but the newest `keep` are deleted.
    Every process calls it."""
    folder = out / CHECKPOINTS
    final = folder / checkpoint_name(step)
    tmp = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        ensure_folder(folder, out)
        fresh_folder(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except RuntimeError as error:  # torch.save reports a full disk as "[enforce fail ...] unexpected pos"
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(folder).free
        raise TrainError(
            f"cannot write checkpoint {final} ({str(error).splitlines()[0]}); {free / 1e6:,.0f} MB "
            "free on that disk: free some space, then rerun with --resume latest"
        ) from None
    if accelerator.is_main_process:
        atomic_write(tmp / STATE_NAME, (json.dumps(state, indent=2) + "\n").encode())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trash = None
        if os.path.lexists(final):  # re-saving a step (resumed from an older checkpoint): swap, then delete
            trash = folder / f".tmp-old-{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for _, old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
