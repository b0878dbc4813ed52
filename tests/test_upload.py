"""`proxytune upload` through the real kfp client, against a fake of the Kubeflow Pipelines
REST API on 127.0.0.1 (no API server can run here): the boundary is HTTP, so the client's
own request building, multipart upload and response parsing all run."""

import email.parser
import email.policy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from proxytune.cli import main

IMAGE = "registry.example/proxytune:abc1234"


class FakeKubeflow(BaseHTTPRequestHandler):
    """The endpoints `kfp.Client` calls to upload: healthz, list pipelines, upload, upload_version."""

    pipelines: dict[str, str]  # display name -> id
    uploads: list[dict]
    refuse: bool = False

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/apis/v2beta1/healthz":
            return self._reply(200, {"multi_user": False})
        if url.path == "/apis/v2beta1/pipelines":
            (predicate,) = json.loads(parse_qs(url.query)["filter"][0])["predicates"]
            name = predicate.get("string_value", predicate.get("stringValue"))
            known = {name: self.pipelines[name]} if name in self.pipelines else {}
            found = [{"pipeline_id": i, "display_name": n} for n, i in known.items()]
            return self._reply(200, {"pipelines": found, "total_size": len(found)})
        return self._reply(404, {"error": "not found"})

    def do_POST(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if self.refuse:
            return self._reply(403, {"error": "user is not authorized", "code": 7})
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
        )
        (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition")]
        upload = {"path": url.path, "query": query, "package": yaml.safe_load_all(part.get_content())}
        upload["spec"] = next(upload.pop("package"))
        self.uploads.append(upload)
        if url.path == "/apis/v2beta1/pipelines/upload":
            self.pipelines[query["name"]] = "pipeline-1"
            return self._reply(200, {"pipeline_id": "pipeline-1", "display_name": query["name"]})
        if url.path == "/apis/v2beta1/pipelines/upload_version":
            version = f"version-{len(self.uploads)}"
            return self._reply(200, {"pipeline_id": query["pipelineid"], "pipeline_version_id": version})
        return self._reply(404, {"error": "not found"})


@pytest.fixture
def kubeflow(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no kfp context file of the user's
    handler = type("Handler", (FakeKubeflow,), {"pipelines": {}, "uploads": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()


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
