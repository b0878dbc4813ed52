"""A fake of the Kubeflow Pipelines v2beta1 REST API on 127.0.0.1, for tests that drive the
real `kfp.Client` (no API server can run here): the boundary is HTTP, so the client's own
request building, multipart upload and response parsing all run.

It serves what proxytune calls: healthz; pipelines (list, upload, upload_version);
experiments (list by name, create); runs (create, get: each get answers the next of
`states`, the last one repeated); recurring runs (list by name, create, delete).
Every request is logged in `requests` as (method, path).
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"


class FakeKubeflow(BaseHTTPRequestHandler):
    pipelines: dict[str, str]  # display name -> id
    uploads: list[dict]
    experiments: dict[str, str]  # display name -> id
    runs: list[dict]  # create-run request bodies, with the run_id given
    run_ids: list[str]  # ids for the next runs created (then run-1, run-2, ...)
    states: list[str]  # what each get-run answers, in turn; the last one repeats
    recurring_runs: dict[str, dict]  # id -> create request body
    requests: list[tuple[str, str]]
    version: str = "2.15.0"  # the backend release healthz reports (`tag_name`)
    refuse: bool = False  # answer every POST with 403
    fail_gets: int = 0  # answer this many get-run requests with 503 first

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _named(self, query: str) -> str:
        (predicate,) = json.loads(parse_qs(query)["filter"][0])["predicates"]
        return predicate.get("string_value", predicate.get("stringValue"))

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        url = urlparse(self.path)
        self.requests.append(("GET", url.path))
        if url.path == f"{API}/healthz":
            return self._reply(200, {"commit_sha": "0" * 40, "tag_name": self.version, "multi_user": False})
        if url.path == f"{API}/pipelines":
            name = self._named(url.query)
            found = (
                [{"pipeline_id": self.pipelines[name], "display_name": name}]
                if name in self.pipelines
                else []
            )
            return self._reply(200, {"pipelines": found, "total_size": len(found)})
        if url.path == f"{API}/experiments":
            name = self._named(url.query)
            found = (
                [{"experiment_id": self.experiments[name], "display_name": name}]
                if name in self.experiments
                else []
            )
            return self._reply(200, {"experiments": found, "total_size": len(found)})
        if url.path.startswith(f"{API}/runs/"):
            run_id = url.path.rsplit("/", 1)[-1]
            if not any(r["run_id"] == run_id for r in self.runs):
                return self._reply(404, {"error": f"run {run_id} not found"})
            if type(self).fail_gets:
                type(self).fail_gets -= 1
                return self._reply(503, {"error": "the API server is restarting"})
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return self._reply(200, {"run_id": run_id, "state": state})
        if url.path == f"{API}/recurringruns":
            name = self._named(url.query)
            found = [
                {"recurring_run_id": i, "display_name": r["display_name"]}
                for i, r in self.recurring_runs.items()
                if r["display_name"] == name
            ]
            return self._reply(200, {"recurringRuns": found, "total_size": len(found)})
        return self._reply(404, {"error": "not found"})

    def do_POST(self):
        url = urlparse(self.path)
        self.requests.append(("POST", url.path))
        if self.refuse:
            return self._reply(403, {"error": "user is not authorized", "code": 7})
        if url.path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
            return self._upload(url)
        body = json.loads(self._body())
        if url.path == f"{API}/experiments":
            experiment_id = f"experiment-{len(self.experiments) + 1}"
            self.experiments[body["display_name"]] = experiment_id
            return self._reply(200, {**body, "experiment_id": experiment_id})
        if url.path == f"{API}/runs":
            run = {**body, "run_id": self.run_ids.pop(0) if self.run_ids else f"run-{len(self.runs) + 1}"}
            self.runs.append(run)
            return self._reply(200, {"run_id": run["run_id"], "display_name": body["display_name"]})
        if url.path == f"{API}/recurringruns":
            recurring_run_id = f"recurring-{len(self.requests)}"
            self.recurring_runs[recurring_run_id] = body
            return self._reply(
                200, {"recurring_run_id": recurring_run_id, "display_name": body["display_name"]}
            )
        return self._reply(404, {"error": "not found"})

    def do_DELETE(self):
        url = urlparse(self.path)
        self.requests.append(("DELETE", url.path))
        recurring_run_id = url.path.rsplit("/", 1)[-1]
        if url.path.startswith(f"{API}/recurringruns/") and recurring_run_id in self.recurring_runs:
            del self.recurring_runs[recurring_run_id]
            return self._reply(200, {})
        return self._reply(404, {"error": "not found"})

    def _upload(self, url):
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self._body()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
        )
        (part,) = [p for p in message.iter_parts() if p.get_param("name", header="content-disposition")]
        upload = {"path": url.path, "query": query, "package": yaml.safe_load_all(part.get_content())}
        upload["spec"] = next(upload.pop("package"))
        self.uploads.append(upload)
        if url.path == f"{API}/pipelines/upload":
            self.pipelines[query["name"]] = "pipeline-1"
            return self._reply(200, {"pipeline_id": "pipeline-1", "display_name": query["name"]})
        version = f"version-{len(self.uploads)}"
        return self._reply(200, {"pipeline_id": query["pipelineid"], "pipeline_version_id": version})


@contextlib.contextmanager
def serve_kubeflow() -> Iterator[tuple[str, type[FakeKubeflow]]]:
    """The fake on a free port: (its URL, its handler class, whose attributes hold the state)."""
    state = {
        "pipelines": {},
        "uploads": [],
        "experiments": {},
        "runs": [],
        "run_ids": [],
        "states": ["SUCCEEDED"],
        "recurring_runs": {},
        "requests": [],
    }
    handler = type("Handler", (FakeKubeflow,), state)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
