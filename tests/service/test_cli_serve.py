"""``kronlink up``: the service and a worker as child processes on the embedded
default; Ctrl-C (SIGINT) stops both."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
from service_factories import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent has not reaped it yet)
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_up_starts_service_and_worker_and_ctrl_c_stops_both(tmp_path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONLINK_")} | {
        "KRONLINK_DATA_DIR": str(tmp_path / "data"),
        "KRONLINK_PORT": str(port),
        "KRONLINK_QUEUE": f"q{uuid.uuid4().hex[:8]}",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "up.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kronlink.cli", "up", "--log-level", "warning"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # stop waiting if it died

        wait_until(healthy, timeout_s=60, interval_s=0.3)
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        token_file = Path(re.search(r"the admin token is in (\S+)", text).group(1))
        token = token_file.read_text().strip()
        assert token not in text  # only the file's path reaches the log
        assert token_file.stat().st_mode & 0o777 == 0o600
        pids = [int(p) for p in re.findall(r"started \(pid (\d+)\)", text)]
        assert len(pids) == 2
        # the generated token opens the admin routes; nothing else does
        assert (
            httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {token}"}).json() == []
        )
        assert httpx.get(f"{url}/v1/jobs").status_code == 401
        assert (tmp_path / "data" / "kronlink.db").exists()  # migrated by `up`
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["registry"]["ok"] and not ready["ready"]  # no version yet

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        wait_until(lambda: not any(_alive(p) for p in pids), timeout_s=5)
        assert "stopping" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in re.findall(r"started \(pid (\d+)\)", log.read_text()):
            if _alive(int(p)):
                os.kill(int(p), signal.SIGKILL)
