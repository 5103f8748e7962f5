"""The artifact folder full or read-only while a job writes its version: real
file-system faults (a 2 MiB tmpfs filled to the last byte; a read-only bind
mount over the folder), a real worker on PostgreSQL and Redis."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from fault_procs import Child, Deployment, Mounts, fill, start_worker, wait_worker_ready
from worker_procs import bootstrap_v1

from kronlink.registry import AuditAction, JobState, list_audit


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_artifact_folder_fault_fails_the_job_cleanly(
    tmp_path: Path, dep: Deployment, children: list[Child], mounts: Mounts, fault: str
) -> None:
    """The job fails with an error naming the artifact folder and the errno;
    no version row, no partial artifact, version 1 stays active and served
    from intact files, the staged data is deleted (every ending deletes it).
    Once the fault is fixed, the next job succeeds."""
    root = Path(dep.settings.artifact_url)
    if fault == "full":
        mounts.tmpfs(
            root, "8m"
        )  # room for v1 and one job: a state holds expand, split and exact blocks
    bootstrap_v1(dep.ctx)
    if fault == "full":
        filled = fill(root)
        assert shutil.disk_usage(root).free == 0
    else:
        mounts.read_only(root)
        with pytest.raises(OSError) as probe:
            (root / "probe").write_bytes(b"x")
        assert probe.value.errno == errno.EROFS
    before = dep.versions()
    worker = start_worker(dep, tmp_path / "worker.log")
    children.append(worker)
    wait_worker_ready(worker)

    job = dep.submit("beta", 2)
    done = dep.wait_finished(job, [worker.log])
    code, name = (errno.ENOSPC, "ENOSPC") if fault == "full" else (errno.EROFS, "EROFS")
    assert done.state == JobState.FAILED and done.attempts == 1
    assert f"to the artifact folder {root}: [Errno {code}] {name}" in done.error, done.error
    assert "nothing was committed" in done.error
    assert dep.versions() == before  # no version row; version 1 still active
    dep.assert_consistent()  # no partial artifact or .tmp debris, nothing staged
    with dep.ctx.factory.begin() as s:
        deleted = [
            a.details for a in list_audit(s, subject=f"job:{job}", action=AuditAction.DATA_DELETED)
        ]
    assert len(deleted) == 1 and deleted[0]["ending"] == "failed" and deleted[0]["files"] > 0
    assert worker.alive(), worker.tail()

    if fault == "full":  # fixed: space freed; else: the volume writable again
        (root / "filler").unlink()
    else:
        mounts.undo()
    again = dep.submit("beta", 3)
    ok = dep.wait_finished(again, [worker.log])
    assert (ok.state, ok.error) == (JobState.SUCCEEDED, None), worker.tail()
    assert [(n, st) for _, n, st, _, _ in dep.versions()] == [(1, "retired"), (2, "active")]
    dep.assert_consistent()
    detail = f"filled {filled} bytes; " if fault == "full" else ""
    print(f"\nartifact folder {fault}: {detail}job error: {done.error}")
