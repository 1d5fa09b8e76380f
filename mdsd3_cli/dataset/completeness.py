"""Whether a generate output is finished: each shard records its plan when it starts and a finished marker last.

`manifest/<shard>.plan.json` holds the shard's plan (its sample count, the whole plan's count and a fingerprint of
its keys and variant folders); `manifest/<shard>.finished.json` is written after the shard's last manifest line,
when every planned sample is written or belongs to an input that failed (listed in it). A shard starting removes
its own marker first, and the plans and markers of any other shard count (the sharding lock says none of those
runs). A dataset is complete when every shard of the recorded count has a marker matching its plan, all shards
planned the same whole plan, and no generate holds a shard lock. `verify` and `export` read this.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mdsd3_cli.dataset.manifest import open_regular
from mdsd3_cli.dataset.names import (
    FINISHED_SUFFIX,
    LOCK_SUFFIX,
    LOCKS_FOLDER,
    MANIFEST_FOLDER,
    MANIFEST_SUFFIX,
    PLAN_SUFFIX,
    own_logs,
    parse_shard,
    shard_file,
    shard_name,
)
from mdsd3_cli.dataset.ownership import locked_by_another
from mdsd3_cli.util.atomic import atomic_write

_MAX_RECORD_BYTES = 16 << 20
"""Largest plan or finished marker read (a marker lists the failed inputs' keys)."""


@dataclass(frozen=True)
class ShardPlan:
    """What one shard set out to write."""

    shard: str
    samples: int
    """This shard's planned samples (its inputs x variant folders)."""
    per_input: int
    """Samples per input (variant folders)."""
    plan_samples: int
    """The whole plan's samples (every shard's), as this shard counted them."""
    fingerprint: str
    """SHA-256 of this shard's keys and the variant folders (`plan_fingerprint`)."""

    def payload(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "samples": self.samples,
            "per_input": self.per_input,
            "plan_samples": self.plan_samples,
            "fingerprint": self.fingerprint,
        }


def plan_fingerprint(keys: Iterable[str], folders: Sequence[str]) -> str:
    """SHA-256 of the folders (a JSON list) and then each key, one UTF-8 line each (output keys hold no control
    character); streamed, nothing built."""
    digest = hashlib.sha256(json.dumps(list(folders), ensure_ascii=True).encode("ascii") + b"\n")
    for key in keys:
        digest.update(key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _record_path(root: Path, shard: str, suffix: str) -> Path:
    return shard_file(root, MANIFEST_FOLDER, shard, suffix)


def _shard_of(path: Path, suffix: str) -> tuple[int, int]:
    """(index, count) of an `own_logs` file."""
    return parse_shard(path.name[: -len(suffix)])


def _write(root: Path, path: Path, payload: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode("ascii"), root=Path(root))


def begin_shard(root: Path, plan: ShardPlan) -> None:
    """A shard starts (its shard and sharding locks held): drop its finished marker and every other shard count's
    plans and markers, then record its plan."""
    count = parse_shard(plan.shard)[1]
    _record_path(root, plan.shard, FINISHED_SUFFIX).unlink(missing_ok=True)
    for suffix in (PLAN_SUFFIX, FINISHED_SUFFIX):
        for path in own_logs(root, MANIFEST_FOLDER, suffix):
            if _shard_of(path, suffix)[1] != count:
                path.unlink(missing_ok=True)
    _write(root, _record_path(root, plan.shard, PLAN_SUFFIX), plan.payload())


def finish_shard(root: Path, plan: ShardPlan, failed_keys: Iterable[str]) -> None:
    """The shard wrote every sample of `plan` except those of `failed_keys` (inputs that failed): its last file."""
    payload = {**plan.payload(), "failed_keys": sorted(failed_keys)}
    _write(root, _record_path(root, plan.shard, FINISHED_SUFFIX), payload)


@dataclass
class ShardState:
    """One shard of the recorded shard count, as found."""

    shard: str
    planned: int | None = None
    """None: no plan recorded (the shard never ran)."""
    recorded: int = 0
    """Distinct samples its manifest lists."""
    finished: bool = False
    failed_inputs: int = 0
    writer: str | None = None
    """The PID holding its lock (a live generate), else None."""

    def describe(self) -> str:
        if self.writer is not None:
            return f"{_writing(self.shard, self.writer)}, {self.recorded} of {self.planned} samples so far"
        if self.planned is None:
            return f"{self.shard}: never ran (no plan recorded)"
        if self.finished:
            failed = f", {self.failed_inputs} inputs failed (errors/)" if self.failed_inputs else ""
            return f"{self.shard}: finished{failed}"
        return f"{self.shard}: unfinished, {self.recorded} of {self.planned} samples recorded (rerun generate)"


@dataclass
class Completeness:
    """Whether a dataset is finished, and why not."""

    recorded: bool
    """False: no shard recorded a plan (an output of an mdsd3 before plans were recorded): not known."""
    shards: list[ShardState] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Problems not tied to one shard (plans of different inputs, shards that never ran in an older output)."""

    @property
    def unfinished(self) -> list[str]:
        """Why the dataset is not complete (empty: complete, or not known)."""
        return [
            state.describe() for state in self.shards if not state.finished or state.writer is not None
        ] + self.notes


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open_regular(path) as file:
            value = json.loads(file.read(_MAX_RECORD_BYTES + 1)[:_MAX_RECORD_BYTES])
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _plan_of(payload: dict[str, Any] | None, shard: str) -> ShardPlan | None:
    if payload is None or payload.get("shard") != shard:
        return None
    numbers = [payload.get("samples"), payload.get("per_input"), payload.get("plan_samples")]
    if not all(type(number) is int and number >= 0 for number in numbers) or not isinstance(
        payload.get("fingerprint"), str
    ):
        return None
    return ShardPlan(shard, *numbers, payload["fingerprint"])


def live_writers(root: Path) -> dict[str, str]:
    """Shard name -> PID (as its lock file says) of every shard lock under OUT/.locks a live process holds."""
    writers = {}
    for path in own_logs(root, LOCKS_FOLDER, LOCK_SUFFIX):
        if locked_by_another(path):
            shard = path.name[: -len(LOCK_SUFFIX)]
            try:
                with open_regular(path) as file:
                    writers[shard] = file.read(32).decode("ascii", "replace").strip()
            except OSError:
                writers[shard] = ""
    return writers


def _writing(shard: str, pid: str) -> str:
    return f"{shard}: a generate is writing it now (PID {pid or 'unknown'})"


def completeness(root: Path, recorded: Mapping[str, int], listed: int) -> Completeness:
    """The state of every shard of the dataset at `root`. The caller counted, reading the manifests, `recorded`:
    distinct samples per shard manifest (by shard name), and `listed`: distinct samples of all manifests (fewer
    than the finished shards planned, less their failed inputs', means records were lost)."""
    root = Path(root)
    names = [_shard_of(path, PLAN_SUFFIX) for path in own_logs(root, MANIFEST_FOLDER, PLAN_SUFFIX)]
    counts = sorted({count for index, count in names if index < count})
    writers = live_writers(root)
    if not counts:
        return Completeness(
            False, notes=_legacy_missing_shards(root) + [_writing(shard, pid) for shard, pid in writers.items()]
        )
    count = counts[-1]  # a shard starting removes other counts' plans: several mean an interrupted start
    result = Completeness(True)
    if len(counts) > 1:
        result.notes.append(f"plans of shard counts {counts} (a run of {count} shards took over): rerun generate")
    whole: set[int] = set()
    expected = 0
    for index in range(count):
        name = shard_name(index, count)
        state = ShardState(name, recorded=recorded.get(name, 0), writer=writers.pop(name, None))
        plan = _plan_of(_read_json(_record_path(root, name, PLAN_SUFFIX)), name)
        if plan is not None:
            state.planned = plan.samples
            whole.add(plan.plan_samples)
            marker = _read_json(_record_path(root, name, FINISHED_SUFFIX))
            failed = marker.get("failed_keys") if marker is not None else None
            state.finished = _plan_of(marker, name) == plan and isinstance(failed, list)
            state.failed_inputs = len(failed) if state.finished else 0
            expected += plan.samples - plan.per_input * state.failed_inputs
        result.shards.append(state)
    result.notes += [_writing(shard, pid) for shard, pid in writers.items()]
    planned = [state.planned for state in result.shards]
    if len(whole) > 1 or (None not in planned and whole and sum(planned) != whole.pop()):
        result.notes.append(
            "the shards planned from different inputs (inputs or --limit changed between shards): "
            "rerun every shard with the same inputs"
        )
    if all(state.finished for state in result.shards) and listed < expected:
        result.notes.append(
            f"the manifests list {listed} samples, the finished shards planned {expected} "
            "(records were lost: rerun generate)"
        )
    return result


def _legacy_missing_shards(root: Path) -> list[str]:
    """An output without plans: a note when no shard count has every shard's manifest (every shard writes one
    when it starts)."""
    present: dict[int, set[int]] = {}
    for path in own_logs(root, MANIFEST_FOLDER, MANIFEST_SUFFIX):
        index, count = _shard_of(path, MANIFEST_SUFFIX)
        if index < count:
            present.setdefault(count, set()).add(index)
    if not present or any(len(indices) == count for count, indices in present.items()):
        return []
    count, indices = max(present.items(), key=lambda item: len(item[1]) / item[0])
    missing = [index for index in range(count) if index not in indices]
    shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
    return [f"shards {shown} of {count} never ran (no manifest)"]
