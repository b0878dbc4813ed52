"""The component image's recipe: the lock it installs and the user it runs as (no Docker
engine runs here, so the image itself is built only where one does: `make image`)."""

import re
import subprocess
import sys
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

DOCKERFILE = (REPO / "images" / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def lock() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "images" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def instructions(keyword: str) -> list[str]:
    """The arguments of every `keyword` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{keyword} ")]


def test_the_lock_pins_the_torch_the_makefile_installs():
    (torch,) = re.findall(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert lock()["torch"] == Version(torch)


def test_the_lock_pins_every_runtime_dependency_within_its_range():
    pins = lock()
    project = PYPROJECT["project"]
    required = [*project["dependencies"], *project["optional-dependencies"]["server"]]
    for requirement in map(Requirement, required):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but not in the lock: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])


def test_the_tests_run_the_locked_versions():
    """`make install` installs with the lock as constraints: what CI tests is what the image runs."""
    mismatched = {}
    for name, pinned in lock().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            continue  # CUDA-only packages (nvidia-*, triton) are not in the CPU test environment
        if Version(installed.public) != pinned:  # 2.13.0+cpu is 2.13.0
            mismatched[name] = (str(installed), str(pinned))
    assert mismatched == {}


def stage(name: str) -> str:
    """The text of one build stage of the Dockerfile."""
    (found,) = re.findall(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.MULTILINE | re.DOTALL)
    return found


def test_dependencies_install_before_the_source_is_copied_and_the_copy_is_removed():
    pipeline = stage("pipeline")
    lock_step = pipeline.index("pip install --no-deps -r /tmp/requirements.lock")
    copies = [line for line in pipeline.splitlines() if line.startswith("COPY ")]
    assert copies[0] == "COPY images/requirements.lock /tmp/requirements.lock"
    assert all(pipeline.index(copy) > lock_step for copy in copies[1:])
    assert all(copy.endswith(("/tmp/src/", f"/tmp/src/{copy.split()[1]}")) for copy in copies[1:])
    assert re.search(r"pip install --no-deps /tmp/src \\\n\s+&& rm -rf /tmp/src", pipeline)


def test_the_server_image_installs_the_locked_mlflow_without_torch():
    server = stage("server")
    (install,) = [line for line in server.splitlines() if "pip install" in line]
    assert "-c /tmp/requirements.lock" in install and "--no-deps" not in install
    assert "torch" not in server and "COPY proxytune" not in server


def test_the_image_runs_as_a_non_root_user_that_the_launcher_can_write_for():
    user = instructions("USER")[-1]
    assert user not in {"0", "root"} and not user.startswith(("0:", "root:"))
    assert "mkdir -p /cache/huggingface /cache/models /minio /s3 /gcs" in DOCKERFILE
    assert "chown -R 1000:0 /cache /minio /s3 /gcs" in DOCKERFILE


def test_the_image_is_offline_by_default_and_carries_no_credentials():
    environment = " ".join(instructions("ENV"))
    assert "HF_HUB_OFFLINE=1" in environment and "HF_HOME=/cache/huggingface" in environment
    assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD)\w*=", environment, re.IGNORECASE)
    assert instructions("ARG") == ["BASE_IMAGE=python:3.11.14-slim-bookworm"]  # nothing secret passes in


def test_the_image_environment_turns_mlflow_telemetry_off_and_gitpython_quiet_without_git(tmp_path):
    """A Python started with only the Dockerfile's ENV and a PATH without git, as in the image."""
    environment = dict(item.split("=", 1) for item in " ".join(instructions("ENV")).split())
    check = (
        "import git, sys\n"
        "from mlflow.telemetry.utils import is_telemetry_disabled\n"
        "sys.exit(0 if is_telemetry_disabled() else 3)"
    )
    for env, expected in (({}, False), (environment, True)):
        env = {**env, "PATH": str(tmp_path), "HOME": str(tmp_path)}
        result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True)
        assert (result.returncode == 0 and not result.stderr) == expected, result.stderr[-500:]
