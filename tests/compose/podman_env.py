"""Podman on this machine, for the compose test (docs/operations.md, "The
compose stack, built and run here").

No image registry is reachable, so every image starts from Debian packages:
``debootstrap --variant=minbase bookworm`` makes a root file system that
``podman import`` turns into the base image; the project's Dockerfile builds
the kronlink image on it (``--build-arg PYTHON_IMAGE``), and
Containerfile.services adds PostgreSQL and Redis from apt.

Podman runs with runc (crun fails on this machine's hybrid cgroups), the
cgroupfs manager, host networking and no default ulimits, from config files
of its own (``CONTAINERS_CONF``, ``CONTAINERS_STORAGE_CONF``) and storage of
its own under the cache folder: nothing of the host's podman is touched.

Cached under ``$KRONLINK_CI_CACHE`` (default ``~/.cache/kronlink-ci``): the
base root file system as a tarball named by the hash of its recipe (a new
recipe makes a new one), podman's layer store, and pip's download cache.
Every cached thing is rebuilt when missing, so a run from nothing works too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
# The base image's recipe: a change here names a new tarball and image tag.
BASE_RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "mirror": "http://deb.debian.org/debian",
    "include": ["python3", "python3-venv", "python-is-python3", "ca-certificates"],
}
# podman-compose is not among them: the test runs this environment's
# (python -m podman_compose, from requirements/test.txt), which is not on PATH
# when make test runs .venv/bin/pytest without activating the venv.
TOOLS = ("podman", "debootstrap", "runc")

CONTAINERS_CONF = """\
[containers]
netns = "host"
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]


def cache_root() -> Path:
    return Path(os.environ.get("KRONLINK_CI_CACHE") or Path.home() / ".cache" / "kronlink-ci")


@dataclass
class Podman:
    """podman and podman-compose with this test's own configuration and storage."""

    root: Path  # cache folder: storage, base tarballs, pip cache
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        conf = self.root / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "containers.conf").write_text(CONTAINERS_CONF)
        driver = os.environ.get("KRONLINK_PODMAN_DRIVER", "overlay")
        (conf / "storage.conf").write_text(
            f'[storage]\ndriver = "{driver}"\n'
            f'graphroot = "{self.root / "storage"}"\nrunroot = "{self.root / "run"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(conf / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
        }

    def run(
        self, *args: str, check: bool = True, timeout: float = 1800, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command with this podman's environment; its output goes to ``log``
        (appended) when given, and is returned otherwise."""
        if log is not None:
            with log.open("a") as f:
                f.write(f"\n$ {' '.join(args)}\n")
                f.flush()
                proc = subprocess.run(
                    args, env=self.env, stdout=f, stderr=subprocess.STDOUT, text=True,
                    timeout=timeout,
                )  # fmt: skip
        else:
            proc = subprocess.run(
                args, env=self.env, capture_output=True, text=True, timeout=timeout
            )
        if check and proc.returncode != 0:
            tail = log.read_text(errors="replace")[-4000:] if log else proc.stderr[-4000:]
            raise RuntimeError(f"{' '.join(args[:3])} ... exited {proc.returncode}:\n{tail}")
        return proc

    def image_exists(self, ref: str) -> bool:
        return self.run("podman", "image", "exists", ref, check=False).returncode == 0

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 1)

    # -- images ----------------------------------------------------------------
    def base_image(self, log: Path) -> str:
        """The debootstrapped Debian image with Python, imported once per recipe."""
        digest = hashlib.sha256(json.dumps(BASE_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
        ref = f"localhost/kronlink-base:{digest}"
        t0 = time.monotonic()
        if not self.image_exists(ref):
            tarball = self.root / f"base-{digest}.tar"
            if not tarball.exists():
                rootfs = self.root / f"rootfs-{digest}.part"
                shutil.rmtree(rootfs, ignore_errors=True)
                r = BASE_RECIPE
                self.run(
                    "debootstrap", f"--variant={r['variant']}",
                    f"--include={','.join(r['include'])}", r["suite"], str(rootfs), r["mirror"],
                    log=log,
                )  # fmt: skip
                part = tarball.with_suffix(".part")
                self.run("tar", "-C", str(rootfs), "-cf", str(part), ".", log=log)
                part.rename(tarball)  # whole or absent: a killed run leaves a .part
                shutil.rmtree(rootfs, ignore_errors=True)
            self.run("podman", "import", str(tarball), ref, log=log)
        self._timed("base image", t0)
        return ref

    def build_kronlink(self, repo: Path, base: str, tag: str, log: Path) -> None:
        """The project's Dockerfile, CPU variant, on ``base``. pip takes what the
        host's pip is configured with (a local torch wheel, local indexes, a CA
        bundle for a TLS proxy), mounted read-only into the build."""
        args = [
            "podman", "build", "--network", "host", "--layers=true",
            "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", "VARIANT=cpu",
            "--build-arg", "PIP_NO_CACHE_DIR=0",
            "-v", f"{self.root / 'pip-cache'}:/root/.cache/pip",
        ]  # fmt: skip
        (self.root / "pip-cache").mkdir(exist_ok=True)
        pip = _host_pip_config()
        links = [p for p in pip.get("find-links", "").split() if Path(p).is_dir()]
        if links:
            args += ["--build-arg", f"PIP_FIND_LINKS={' '.join(links)}"]
            # the torch wheel is in a local folder: PyPI serves its dependencies
            args += ["--build-arg", "TORCH_CPU_INDEX=https://pypi.org/simple"]
        extra = [u for u in pip.get("extra-index-url", "").split() if u.startswith("file://")]
        extra = [u for u in extra if Path(u.removeprefix("file://")).is_dir()]
        if extra:
            args += ["--build-arg", f"PIP_EXTRA_INDEX_URL={' '.join(extra)}"]
        mounts = {*links, *(str(Path(u.removeprefix("file://")).parent) for u in extra)}
        cert = pip.get("cert")
        if cert and Path(cert).is_file():
            args += ["--build-arg", "PIP_CERT=/etc/kronlink-build-ca.crt"]
            args += ["-v", f"{cert}:/etc/kronlink-build-ca.crt:ro"]
        for m in sorted(mounts):
            args += ["-v", f"{m}:{m}:ro"]
        t0 = time.monotonic()
        dockerfile = ["-f", str(repo / "Dockerfile"), str(repo)]
        # The build stage tagged too: its layers (torch, the dependencies) are then
        # not dangling, and survive prune() as the next build's cache.
        self.run(*args, "--target", "build", "-t", f"{tag}-build", *dockerfile, log=log)
        self.run(*args, "-t", tag, *dockerfile, log=log)
        self._timed("kronlink image", t0)

    def build_services(self, base: str, tag: str, log: Path) -> None:
        t0 = time.monotonic()
        self.run(
            "podman", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
            "-t", tag, "-f", str(HERE / "Containerfile.services"), str(HERE), log=log,
        )  # fmt: skip
        self._timed("services image", t0)

    def prune(self, log: Path) -> None:
        """Drop dangling images (earlier builds' layers): the store stays one build's size."""
        self.run("podman", "image", "prune", "-f", check=False, log=log)


def _host_pip_config() -> dict[str, str]:
    """``pip config list`` of the interpreter running the tests, and PIP_* variables."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    conf: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        name = key.split(".", 1)[-1]
        conf.setdefault(name, value.strip().strip("'\""))
    return conf
