"""The production image, checked without a Docker engine (none runs here): hadolint on the
containerfile, its stages and files, the same Ray/MLflow/Python in every environment (they share
one Ray cluster), and both of its locks resolving on PyPI for the image's platform (linux x86_64,
CPython 3.11; pip's dry run, which installs nothing)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

CONTAINERFILE = ROOT / "containerfile"
REQUIREMENTS = ROOT / "requirements"


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).with_name("hadolint")
    proc = subprocess.run([str(hadolint), "--no-color", str(CONTAINERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stages_and_copied_files_exist():
    text = CONTAINERFILE.read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    assert set(re.findall(r"--from=(\S+)", text)) <= stages
    for name in re.findall(r"requirements/([\w.-]+)", text):
        assert (REQUIREMENTS / name).is_file(), name


def _pins(lock: str) -> dict[str, str]:
    lines = (REQUIREMENTS / lock).read_text().splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_environments_share_ray_and_mlflow_versions():
    locks = {name: _pins(name) for name in ("train.lock", "infer.lock", "infer-gpu.lock")}
    for package in ("ray", "mlflow"):
        assert len({pins[package] for pins in locks.values()}) == 1, {n: p[package] for n, p in locks.items()}
    assert "python:3.11" in CONTAINERFILE.read_text() and sys.version_info[:2] == (3, 11)


IMAGE_LOCKS = {"train.lock": "train.in", "infer-gpu.lock": "infer-gpu.in"}


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict:
    """pip's dry-run resolution of each image's lock against PyPI, all started at once (each waits
    mostly on PyPI): lock -> (the process, its report's path)."""
    platforms = subprocess.run([str(REQUIREMENTS / "gpu-platforms.sh")], capture_output=True, text=True,
                               check=True).stdout.split()
    # PyPI alone: this machine's local wheel folders and pip caps are not what the image sees.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    started = {}
    for lock, requirements in IMAGE_LOCKS.items():
        report = tmp_path_factory.mktemp("resolution") / "report.json"
        started[lock] = (subprocess.Popen(
            [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
             "--report", str(report), "--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
             *platforms, "-c", str(REQUIREMENTS / lock), "-r", str(REQUIREMENTS / requirements)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env), report)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:  # a test that was not run, or failed before waiting
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("lock", IMAGE_LOCKS)
def test_lock_resolves_on_pypi_for_the_image(lock, resolutions):
    proc, report = resolutions[lock]
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    resolved = {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    pinned = {_canonical(name): version for name, version in _pins(lock).items()}
    differing = {name: (version, pinned[name]) for name, version in resolved.items()
                 if name in pinned and version != pinned[name]}
    assert not differing and len(set(resolved) & set(pinned)) > 100, differing


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
