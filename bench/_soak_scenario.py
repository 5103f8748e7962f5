"""The soak's scenario (bench/soak.py): the jobs, the cancel and the rollback,
sent through the API with httpx while the load runs."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _soak_parts import Replica, make_task

from kronlink.data.io import save_task

__all__ = ["FINISHED", "LINEAGE", "Api", "Scenario"]

LINEAGE = "main"
FINISHED = ("succeeded", "failed", "cancelled")


class Api:
    """One replica's API with the admin token (httpx, a connection kept open)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120
        )

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        """Status and JSON body (problem documents included) of one request."""
        r = self.http.request(method, path, **kwargs)
        try:
            return r.status_code, r.json()
        except ValueError:
            return r.status_code, {"detail": r.text[:500]}

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {self.base}{path}: HTTP {status}: {body}")
        return body

    def close(self) -> None:
        self.http.close()


class Scenario:
    """The jobs, the cancel and the rollback, run in a thread beside the load."""

    def __init__(self, args: argparse.Namespace, apis: list[Api], work: Path) -> None:
        self.args, self.apis, self.work = args, apis, work
        self.t0 = time.perf_counter()
        self.events: list[tuple[float, str]] = []
        self.jobs: dict[str, dict[str, Any]] = {}  # role -> last seen job
        self.roles: dict[str, str] = {}  # role -> task name
        self.cancelled_in: str | None = None
        self.replicas: list[Replica] = []  # the load's, set when it starts

    def say(self, msg: str) -> None:
        t = round(time.perf_counter() - self.t0, 1)
        self.events.append((t, msg))
        print(f"  [{t:6.1f} s] {msg}", file=sys.stderr, flush=True)

    def submit(self, api: Api, role: str, name: str, seed: int, fields: dict[str, str]) -> dict:
        a = self.args
        folder = save_task(make_task(name, seed, a.sizes, a.k), self.work / "tasks" / name)
        files = {
            part: (f"{part}.jsonl", (folder / f"{part}.jsonl").read_bytes())
            for part in ("queries", "ontology")
        }
        status, job = api.call(
            "POST", "/v1/jobs", data={"task": name, "lineage": LINEAGE, **fields}, files=files
        )
        if status != 202:
            raise RuntimeError(f"POST /v1/jobs ({name}): HTTP {status}: {job}")
        self.jobs[role], self.roles[role] = job, name
        self.say(f"job {job['id']} ({role}, task {name}) submitted via {api.base}")
        return job

    def get(self, path: str) -> Any:
        """From the first replica that answers: the report outlives a dead one."""
        for api in self.apis[:-1]:
            try:
                return api.get(path)
            except httpx.TransportError as exc:
                self.say(f"GET {api.base}{path}: {exc}; asking the next replica")
        return self.apis[-1].get(path)

    def refresh(self, role: str) -> dict:
        self.jobs[role] = self.get(f"/v1/jobs/{self.jobs[role]['id']}")
        return self.jobs[role]

    def wait_job(self, role: str, until=lambda j: j["state"] in FINISHED) -> dict:
        deadline = time.monotonic() + self.args.job_timeout
        while not until(job := self.refresh(role)):
            if job["state"] in FINISHED or time.monotonic() > deadline:
                raise RuntimeError(f"{role} job {job['id']}: {job['state']} ({job.get('error')})")
            time.sleep(0.2)
        return job

    def wait_served(self, version_id: int, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for api in self.apis:
            while not api.get(f"/v1/versions/{version_id}")["served_here"]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{api.base} not serving version {version_id}")
                time.sleep(0.1)
        self.say(f"both replicas serve version id {version_id}")

    def wait_answered(self, version_id: int, answers: int = 20, timeout_s: float = 60.0) -> None:
        """Until the load has had ``answers`` answers from ``version_id`` on each
        replica: a version that is active is also seen serving, not only listed."""
        deadline = time.monotonic() + timeout_s
        while not all(
            r.runs and r.runs[-1][1] == version_id and r.runs[-1][4] >= answers
            for r in self.replicas
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the load saw no {answers} answers of version id {version_id}")
            time.sleep(0.05)

    def bootstrap(self) -> int:
        a = self.args
        fields = {"method": "none", "ranker": json.dumps(a.ranker), "train": json.dumps(a.train)}
        job = self.submit(self.apis[0], "bootstrap", "alpha", 0, fields)
        job = self.wait_job("bootstrap")
        if job["state"] != "succeeded":
            raise RuntimeError(f"bootstrap job {job['state']}: {job.get('error')}")
        self.wait_served(job["version_id"], timeout_s=120)
        return job["version_id"]

    def run(self) -> None:
        a = self.args
        upd = {"method": "kfc", "lambda": "10", "train": json.dumps(a.train)}
        # the cancelled job trains for (nearly) ever: it is surely running when cancelled
        long = {**upd, "train": json.dumps({**a.train, "epochs": 10_000})}
        self.submit(self.apis[0], "update-1", "beta", 1, upd)
        self.submit(self.apis[1], "cancelled", "gamma", 2, long)
        if a.cancel_when == "running":
            self.wait_job("cancelled", lambda j: j["phase"] == "train")
        self.cancelled_in = (
            f"{self.refresh('cancelled')['state']} ({self.jobs['cancelled']['phase']})"
        )
        status, body = self.apis[1].call("DELETE", f"/v1/jobs/{self.jobs['cancelled']['id']}")
        self.say(
            f"DELETE /v1/jobs/{self.jobs['cancelled']['id']} while {self.cancelled_in}: {status}"
        )
        if status != 202:
            raise RuntimeError(f"DELETE /v1/jobs/{self.jobs['cancelled']['id']}: {status} {body}")
        self.submit(self.apis[0], "update-2", "delta", 3, upd)
        for role in ("update-1", "cancelled", "update-2"):
            job = self.wait_job(role)
            self.say(f"job {job['id']} ({role}) {job['state']}, version id {job['version_id']}")
        newest = self.jobs["update-2"]["version_id"]
        if newest is None:
            raise RuntimeError("the last update job made no version")
        self.wait_served(newest)
        self.wait_answered(newest)
        parent = self.apis[1].get(f"/v1/versions/{newest}")["parent_id"]
        status, body = self.apis[1].call(
            "POST", f"/v1/versions/{parent}/activate", json={"reason": "soak: rollback under load"}
        )
        if status != 200:
            raise RuntimeError(f"rollback to {parent}: HTTP {status}: {body}")
        self.say(
            f"rolled back to version id {parent} (number {body['number']}) via {self.apis[1].base}"
        )
        self.wait_served(parent)
        self.wait_answered(parent)
