"""The Dockerfile, checked without Docker (none runs here): it must agree with the lock file,
ship every package, run as non-root and warm up at build time. `docker build .` tests the rest."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import yaml

from tests.conftest import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def locked_version(package: str) -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return str(next(p["version"] for p in lock["package"] if p["name"] == package))


def test_the_base_image_is_official_prefect_for_python_3_12_at_the_locked_version() -> None:
    prefect = locked_version("prefect")
    bases = re.findall(r"^FROM (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert bases and set(bases) == {f"prefecthq/prefect:{prefect}-python3.12"}
    assert yaml.safe_load((REPO / "prefect.yaml").read_text())["prefect-version"] == prefect


def test_the_locked_environment_without_dev_dependencies_and_every_package_is_copied() -> None:
    assert "uv sync --frozen --no-dev" in DOCKERFILE and "--no-dev --no-install-project" in DOCKERFILE
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    for package in packages["packages"]:
        assert f"COPY {package}/ {package}/" in DOCKERFILE, package
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "data", "tests"} <= set(ignored)


def test_it_runs_as_non_root_and_warms_up_at_build_time() -> None:
    users = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0") and users[-1].isdigit()
    assert "python -m flows.warmup" in DOCKERFILE and "NUMBA_CACHE_DIR=" in DOCKERFILE
    warmed = subprocess.run(
        [sys.executable, "-m", "flows.warmup"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert warmed.returncode == 0 and warmed.stdout.startswith("warmed up in"), warmed.stderr
