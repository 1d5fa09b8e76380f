"""Smoke tests for the private SLURM cluster harness (tests/slurm_cluster.py).

They submit real array jobs through sbatch to a one-node slurmctld/slurmd started for this
test session; they skip (with the daemon's reason) only when the cluster cannot start here.
"""

from __future__ import annotations

import textwrap

import pytest

pytestmark = pytest.mark.slow


def _script(path, body: str):
    path.write_text("#!/bin/bash\nset -euo pipefail\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def test_array_job_runs_every_task(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    script = _script(
        tmp_path / "write_task.sh",
        """\
        echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT (min $SLURM_ARRAY_TASK_MIN) in $PWD"
        mkdir -p "$OUT_DIR"
        echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT $1" > "$OUT_DIR/task_$SLURM_ARRAY_TASK_ID.txt"
        """,
    )
    work = tmp_path / "work"
    work.mkdir()

    result = slurm_cluster.submit_array(script, array="0-2", args=["hello"], env={"OUT_DIR": str(out)}, cwd=work)

    assert result.ok, result.report()
    assert result.task_ids == [0, 1, 2]
    assert result.exit_codes == [0, 0, 0], result.report()
    for t in range(3):
        assert (out / f"task_{t}.txt").read_text() == f"{t} 3 hello\n"
        assert f"task {t} of 3 (min 0) in {work}" in result.outputs[t]


def test_failed_task_is_reported_and_resubmitted_array_completes(slurm_cluster, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    # Task 1 fails on its first run only (like a preempted/crashed shard); the others succeed.
    script = _script(
        tmp_path / "flaky.sh",
        """\
        if [ "$SLURM_ARRAY_TASK_ID" = 1 ] && [ ! -e "$DONE/.task1_failed_once" ]; then
            touch "$DONE/.task1_failed_once"
            echo "simulated failure in task 1" >&2
            exit 3
        fi
        if [ -e "$DONE/task_$SLURM_ARRAY_TASK_ID" ]; then
            echo "task $SLURM_ARRAY_TASK_ID already done, skipping"
        else
            echo "$SLURM_ARRAY_JOB_ID" > "$DONE/task_$SLURM_ARRAY_TASK_ID"
        fi
        """,
    )
    env = {"DONE": str(done)}

    first = slurm_cluster.submit_array(script, array="0-2", env=env, cwd=tmp_path)
    assert not first.ok
    assert first.exit_codes == [0, 3, 0], first.report()
    assert first.states[1] == "FAILED"
    assert list(first.failures) == [1]
    assert "simulated failure in task 1" in first.failures[1]
    assert "simulated failure in task 1" in first.report()
    assert sorted(p.name for p in done.glob("task_*")) == ["task_0", "task_2"]

    # Resubmitting the very same array finishes what the failed task left.
    second = slurm_cluster.submit_array(script, array="0-2", env=env, cwd=tmp_path)
    assert second.ok, second.report()
    assert second.job_id != first.job_id
    assert sorted(p.name for p in done.glob("task_*")) == ["task_0", "task_1", "task_2"]
    assert (done / "task_1").read_text().strip() == second.job_id
    assert "already done, skipping" in second.outputs[0]
