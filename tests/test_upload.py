"""`proxytune upload` through the real kfp client, against a fake of the Kubeflow Pipelines
REST API on 127.0.0.1 (no API server can run here): the boundary is HTTP, so the client's
own request building, multipart upload and response parsing all run."""

import pytest

from proxytune.cli import main
from tests.kfp_fake import serve_kubeflow

IMAGE = "registry.example/proxytune:abc1234"


@pytest.fixture
def kubeflow(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no kfp context file of the user's
    with serve_kubeflow() as served:
        yield served


def test_the_first_upload_creates_the_pipeline_then_versions_follow(kubeflow, capsys):
    host, api = kubeflow
    assert main(["upload", "--host", host, f"--image={IMAGE}"]) == 0
    assert "uploaded pipeline proxy-tuning (id pipeline-1)" in capsys.readouterr().out
    again = ["--version", "v2", "--resource=evaluate.gpus=2"]
    assert main(["upload", "--host", host, f"--image={IMAGE}", *again]) == 0
    out = capsys.readouterr().out
    assert "uploaded version v2 of proxy-tuning (pipeline pipeline-1, version version-2)" in out

    first, second = api.uploads
    assert first["path"] == "/apis/v2beta1/pipelines/upload" and first["query"]["name"] == "proxy-tuning"
    assert second["path"] == "/apis/v2beta1/pipelines/upload_version"
    assert second["query"] == {
        "name": "v2",
        "pipelineid": "pipeline-1",
        "description": f"Proxy-Tuning, image {IMAGE}",
    }
    spec = second["spec"]
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {IMAGE}
    evaluate = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]
    assert evaluate["resources"]["accelerator"]["count"] == "2"
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["class_noun"]["description"] == "What the subject is, e.g. dog, backpack, teapot."
    assert all(p.get("description") for p in parameters.values())  # the Kubeflow UI shows them


def test_a_default_version_name_says_which_image_it_runs(kubeflow, capsys):
    host, api = kubeflow
    api.pipelines["proxy-tuning"] = "existing"
    assert main(["upload", "--host", host, f"--image={IMAGE}"]) == 0
    (upload,) = api.uploads
    assert upload["query"]["pipelineid"] == "existing"
    assert upload["query"]["name"].startswith("abc1234-") and upload["query"]["name"].endswith("Z")


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("ml-pipeline:8888", "--host must be the Kubeflow Pipelines URL"),
        ("http://127.0.0.1:9", "cannot reach Kubeflow Pipelines at http://127.0.0.1:9"),
    ],
)
def test_a_bad_host_is_a_clear_error(host, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["upload", "--host", host]) == 2
    assert message in capsys.readouterr().out


def test_a_refusal_names_the_status_and_the_reason(kubeflow, capsys):
    host, api = kubeflow
    api.refuse = True
    assert main(["upload", "--host", host]) == 2
    out = capsys.readouterr().out
    assert "refused the upload: 403" in out and "user is not authorized" in out
