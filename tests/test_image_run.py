"""The images as a cluster runs them (`make image-test` builds them and runs this module; it
needs a Docker engine). Skipped unless PROXYTUNE_TEST_IMAGE names the pipeline image and
PROXYTUNE_TEST_SERVER_IMAGE the server image.

- a component runs exactly as the compiled YAML's command and args say, with the executor
  input the KFP launcher would pass, as an arbitrary UID in group 0 (OpenShift), writing its
  outputs under the image's own /minio;
- the server image serves MLflow, and a pipeline container logs to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest
import yaml

from proxytune.cli import main
from proxytune.core.tracking import TrackingContext
from proxytune.stages.ingest import load_subject
from proxytune.stages.steps import plan_step
from tests.conftest import EXAMPLE, S3_KEYS, free_port, s3_bucket

IMAGE = os.environ.get("PROXYTUNE_TEST_IMAGE", "")
SERVER_IMAGE = os.environ.get("PROXYTUNE_TEST_SERVER_IMAGE", "")
pytestmark = pytest.mark.skipif(
    not (IMAGE and SERVER_IMAGE), reason="make image-test sets PROXYTUNE_TEST_IMAGE and _SERVER_IMAGE"
)
ARBITRARY_USER = "54321:0"  # no passwd entry, group 0: how OpenShift runs pods


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def compiled_container(tmp_path, component: str) -> dict:
    path = tmp_path / "pipeline.yaml"
    assert main(["compile", "-o", str(path), f"--image={IMAGE}"]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    return spec["deploymentSpec"]["executors"][f"exec-{component}"]["container"]


def test_a_component_runs_as_the_compiled_yaml_says_as_an_arbitrary_uid_writing_under_minio(
    tmp_path, s3_endpoint
):
    photos = s3_bucket(s3_endpoint, "image-test")
    for path in sorted(EXAMPLE.iterdir()):
        photos.fput_object("image-test", f"dog/{path.name}", str(path))
    (planned,) = plan_step(
        [{"uri": "s3://image-test/dog", "class_noun": "dog"}], "tiny", {}, TrackingContext()
    )
    container = compiled_container(tmp_path, "ingest")
    assert container["image"] == IMAGE
    output_uri = "minio://proxytune/run-1/ingest/subject"  # the launcher's local mount: /minio/...
    executor_input = {
        "inputs": {
            "parameterValues": {
                "planned": planned,
                "mlflow_tracking_uri": "",
                "mlflow_experiment": "proxytune",
                "kfp_run_id": "run-1",
                "kfp_run_name": "image-test",
            }
        },
        "outputs": {
            "artifacts": {
                "subject": {
                    "artifacts": [
                        {"name": "subject", "type": {"schemaTitle": "system.Dataset"}, "uri": output_uri}
                    ]
                }
            },
            "outputFile": "/tmp/kfp_outputs/output_metadata.json",
        },
    }
    args = [arg.replace("{{$}}", json.dumps(executor_input)) for arg in container["args"]]
    entrypoint, *command = container["command"]
    name = f"proxytune-image-test-{uuid.uuid4().hex[:8]}"
    env = {"PROXYTUNE_S3_ENDPOINT_URL": s3_endpoint, **S3_KEYS}
    flags = [f"--env={key}={value}" for key, value in env.items()]
    run = docker(
        "run", f"--name={name}", f"--user={ARBITRARY_USER}", "--network=host", *flags,
        f"--entrypoint={entrypoint}", IMAGE, *command, *args,
    )  # fmt: skip
    try:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        copied = docker("cp", f"{name}:/minio/proxytune/run-1/ingest/subject", str(tmp_path / "subject"))
        assert copied.returncode == 0, copied.stderr
        metadata = docker("cp", f"{name}:/tmp/kfp_outputs/output_metadata.json", str(tmp_path / "out.json"))
        assert metadata.returncode == 0, metadata.stderr
    finally:
        docker("rm", "-f", name)
    subject, photos = load_subject(tmp_path / "subject")  # every photo there, matching its hash
    assert subject.class_noun == "dog" and len(photos) == len(list(EXAMPLE.iterdir()))
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["artifacts"]["subject"]["artifacts"][0]["metadata"]["photos"] == len(photos)


def test_the_server_image_serves_mlflow_and_the_pipeline_image_logs_to_it(tmp_path):
    port = free_port()
    name = f"proxytune-mlflow-{uuid.uuid4().hex[:8]}"
    server = docker(
        "run", "-d", f"--name={name}", f"--user={ARBITRARY_USER}", "--network=host", "--workdir=/tmp",
        SERVER_IMAGE, "mlflow", "server", "--host=127.0.0.1", f"--port={port}", "--workers=1",
        "--backend-store-uri=sqlite:////tmp/mlflow.db", "--artifacts-destination=/tmp/artifacts",
    )  # fmt: skip
    assert server.returncode == 0, server.stderr
    url = f"http://127.0.0.1:{port}"
    script = (
        "import time, urllib.request, mlflow\n"
        "for _ in range(120):\n"
        "    try:\n"
        f"        urllib.request.urlopen('{url}/health', timeout=2); break\n"
        "    except OSError: time.sleep(1)\n"
        f"mlflow.set_tracking_uri('{url}')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('clip_i', 0.5)\n"
        "print(mlflow.get_run(run.info.run_id).data.metrics['clip_i'])\n"
    )
    try:
        client = docker(
            "run", "--rm", f"--user={ARBITRARY_USER}", "--network=host", IMAGE, "python", "-c", script
        )
        logs = docker("logs", name)
    finally:
        docker("rm", "-f", name)
    assert client.returncode == 0, client.stderr[-3000:] + logs.stderr[-3000:]
    assert client.stdout.strip().splitlines()[-1] == "0.5"
    assert "Bad git executable" not in client.stderr + client.stdout


def test_the_pipeline_image_imports_the_installed_package_and_works_in_a_writable_home():
    script = (
        "set -e; touch probe; test ! -e /tmp/src; "
        'python -c "import proxytune, components; print(proxytune.__file__, components.__file__)"; '
        "proxytune run || echo exit=$?"
    )
    result = docker("run", "--rm", f"--user={ARBITRARY_USER}", IMAGE, "sh", "-c", script)
    assert result.returncode == 0, result.stderr[-3000:]
    imported, *rest = result.stdout.splitlines()
    assert all("-packages/" in path for path in imported.split())  # not a source tree left behind
    assert "pass --subject FOLDER" in "\n".join(rest) and rest[-1] == "exit=2"
