"""Shared fixtures: the example subject, stage outputs built once per session on tiny
models, and real local servers (moto's S3 server, an MLflow tracking server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from browser import chromium, open_page  # noqa: F401 (headless Chromium fixtures)

from proxytune.core.config import RunParams
from proxytune.core.params import EVAL_METHODS

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "subjects" / "dog"
BIN = Path(sys.executable).parent
CPU = torch.device("cpu")
S3_KEYS = {"AWS_ACCESS_KEY_ID": "proxytune-test", "AWS_SECRET_ACCESS_KEY": "proxytune-test-secret-value"}


@pytest.fixture(scope="session")
def params() -> RunParams:
    return RunParams.resolve("tiny")


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stages")


@pytest.fixture(scope="session")
def subject_dir(session_dir) -> Path:
    from proxytune.stages.ingest import ingest

    ingest(str(EXAMPLE), session_dir / "subject", "dog")
    return session_dir / "subject"


@pytest.fixture(scope="session")
def supervisor_dir(session_dir, subject_dir, params) -> Path:
    from proxytune.stages.supervisor import tune_supervisor

    tune_supervisor(subject_dir, session_dir / "supervisor", params.supervisor, device=CPU)
    return session_dir / "supervisor"


@pytest.fixture(scope="session")
def proxy_dir(session_dir, supervisor_dir, params) -> Path:
    from proxytune.stages.proxy import generate_proxy

    generate_proxy(supervisor_dir, session_dir / "proxy", params.proxy, device=CPU)
    return session_dir / "proxy"


@pytest.fixture(scope="session")
def student_dir(session_dir, proxy_dir, params) -> Path:
    from proxytune.stages.student import tune_student

    tune_student(proxy_dir, session_dir / "student", params.student, device=CPU)
    return session_dir / "student"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError(f"server at {url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def start_server(command: list[str], url: str, env: dict[str, str], log: Path, timeout: float):
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    wait_until_up(url, process, timeout, log)
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """moto's S3-protocol server on 127.0.0.1."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process = start_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], url, {}, log, 30)
    yield url
    stop(process)


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> str:
    """The platform's S3 store configuration pointing at the test server."""
    monkeypatch.setenv("PROXYTUNE_S3_ENDPOINT_URL", s3_endpoint)
    for key, value in S3_KEYS.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


def s3_bucket(endpoint: str, bucket: str):
    """A plain S3 client on the test server, with `bucket` created (independent of proxytune)."""
    from minio import Minio

    client = Minio(
        endpoint.removeprefix("http://"),
        S3_KEYS["AWS_ACCESS_KEY_ID"],
        S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    return client


@pytest.fixture(scope="session")
def mlflow_server(s3_endpoint, tmp_path_factory) -> str:
    """`mlflow server` with a SQLite backend and artifacts proxied to the S3 server."""
    s3_bucket(s3_endpoint, "mlflow")
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination",
        "s3://mlflow/artifacts",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **S3_KEYS}
    process = start_server(command, f"{url}/health", env, home / "server.log", 120)
    yield url
    stop(process)


@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def direct_dir(session_dir, subject_dir, params) -> Path:
    from proxytune.stages.baseline import tune_direct

    tune_direct([subject_dir], session_dir / "direct", params.student, device=CPU)
    return session_dir / "direct"


@pytest.fixture(scope="session")
def evaluation_dir(session_dir, subject_dir, supervisor_dir, student_dir, direct_dir) -> Path:
    """An evaluation of every method: student, supervisor, direct baseline, untuned base."""
    from proxytune.stages.evaluate import evaluate

    methods = RunParams.resolve("tiny", {"evaluation.methods": list(EVAL_METHODS)}).evaluation
    evaluate(
        subject_dir,
        supervisor_dir,
        student_dir,
        session_dir / "evaluation",
        methods,
        device=CPU,
        direct_dir=direct_dir,
    )
    return session_dir / "evaluation"


def _postgres_bin() -> Path | None:
    """Debian's PostgreSQL server binaries (package `postgresql`), newest version first."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on 127.0.0.1 with password authentication; returns a function
    that creates a role (superuser) and its database and gives back (host, port). Skipped where
    PostgreSQL is not installed, unless PROXYTUNE_REQUIRE_POSTGRES=1 (`.ci/run` installs it)."""
    import shutil
    import tempfile

    bin_dir = _postgres_bin()
    if bin_dir is None:
        if os.environ.get("PROXYTUNE_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required here: apt-get install postgresql")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    # initdb refuses root: run the server as Debian's `postgres` user in a folder it owns.
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="proxytune-pg-"))
    superuser, password = "proxytune", "proxytune-test-postgres"
    (home / "pw").write_text(password)
    if as_owner:
        shutil.chown(home, "postgres")
        shutil.chown(home / "pw", "postgres")
    data, port = home / "data", free_port()

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_owner, str(bin_dir / tool), *args], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(data), "-U", superuser, "--auth=scram-sha-256", f"--pwfile={home / 'pw'}")
    pg("pg_ctl", "-D", str(data), "-l", str(home / "server.log"), "-w", "start",
       "-o", f"-h 127.0.0.1 -p {port} -k {home}")  # fmt: skip
    admin = {"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": superuser, "PGPASSWORD": password}

    def create(user: str, user_password: str, database: str) -> tuple[str, int]:
        role = f"CREATE ROLE \"{user}\" LOGIN SUPERUSER PASSWORD '{user_password}'"
        env = {**os.environ, **admin}
        subprocess.run([bin_dir / "psql", "-dpostgres", "-c", role], env=env, check=True, capture_output=True)
        subprocess.run([bin_dir / "createdb", "-O", user, database], env=env, check=True, capture_output=True)
        return "127.0.0.1", port

    yield create
    pg("pg_ctl", "-D", str(data), "-m", "fast", "stop")
    shutil.rmtree(home, ignore_errors=True)
