"""The Kubernetes manifests (manifests/), offline: no API server exists in CI, so each overlay is
rendered with `kubectl kustomize` from a temporary copy of the tree that holds test env files
(nothing is written inside the repository), every object is validated strictly against the
Kubernetes schema, and the rendered objects are checked against what the pipeline
(pipelines/cluster.py) and manifests/README.md promise."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from pipelines.cluster import (
    CACHE_MOUNT,
    CONFIG_ENV,
    CONFIG_MAP,
    HF_SECRET,
    POD_LABEL,
    S3_SECRET,
    SECRET_ENV,
    ClusterOptions,
)
from proxytune.cli.kubeflow import RUNNER_ACCOUNT
from tests.conftest import BIN, free_port, s3_bucket, start_server, stop

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
OVERLAYS = {  # overlay -> its namespace
    "standalone": "proxytune",
    "kubeflow": "kubeflow",
    "kubeflow-profile": "kubeflow-user-example-com",  # a multi-user Kubeflow profile (Istio)
}
ENV_OVERLAYS = ("standalone", "kubeflow")  # the overlays whose env files make the Secrets
K8S_VERSION = kubernetes_validate.latest_version()
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
PLACEHOLDER = "CHANGE-ME"
# The git-ignored env files each overlay's secretGenerator reads, with test values.
TEST_ENV = {
    "minio.env": {"root-user": "test-root", "root-password": "test-root-password-0123"},
    "s3.env": {"access-key": "test-pipeline", "secret-key": "test-pipeline-secret-4567"},
    "postgres.env": {"user": "mlflow", "password": "test-postgres-password-89", "database": "mlflow"},
}
SECRET_OF_ENV = {"minio.env": "proxytune-minio", "s3.env": S3_SECRET, "postgres.env": "proxytune-postgres"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
CREDENTIAL_KEY = re.compile(r"password|secret|token|access-key", re.IGNORECASE)
SERVER_IMAGE = "ghcr.io/proxytune/proxytune-server"  # MLflow and the Jobs: images/Dockerfile's `server`
PIPELINE = "pipeline"  # the name this module gives the pipeline's step pods (labelled POD_LABEL)


# -- rendering ---------------------------------------------------------------------------------


def _copy_tree(tmp: Path) -> Path:
    """manifests/ copied under tmp without any real env file of the working tree."""
    target = tmp / "manifests"
    shutil.copytree(MANIFESTS, target, ignore=shutil.ignore_patterns("*.env"))
    return target


def _write_env(overlay_dir: Path, files: dict[str, dict[str, str]]) -> None:
    for name, values in files.items():
        (overlay_dir / name).write_text("".join(f"{key}={value}\n" for key, value in values.items()))


def _tree_with_env(tmp: Path) -> Path:
    """manifests/ copied under tmp, with the test env files in every overlay that reads them."""
    tree = _copy_tree(tmp)
    for overlay in ENV_OVERLAYS:
        _write_env(tree / "overlays" / overlay, TEST_ENV)
    return tree


def _expand(text: str, env: dict[str, str]) -> str:
    """`$(VAR)` references expanded as the kubelet expands them in command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def _kustomize(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)


def _render(path: Path) -> list[dict]:
    result = _kustomize(path)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay rendered with the test env files."""
    tree = _tree_with_env(tmp_path_factory.mktemp("rendered"))
    out = {}
    for overlay in OVERLAYS:
        out[overlay] = _render(tree / "overlays" / overlay)
    return out


@pytest.fixture(scope="module")
def rendered_from_examples(tmp_path_factory) -> list[dict]:
    """The standalone overlay rendered after `cp X.env.example X.env`, as the README says."""
    tree = _copy_tree(tmp_path_factory.mktemp("examples"))
    overlay = tree / "overlays" / "standalone"
    for example in overlay.glob("*.env.example"):
        shutil.copy(example, overlay / example.name.removesuffix(".example"))
    return _render(overlay)


def _tools() -> list[dict]:
    docs = []
    for path in sorted((MANIFESTS / "tools").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


# -- helpers over rendered objects ---------------------------------------------------------------


def _name(obj: dict) -> str:
    meta = obj["metadata"]
    return meta.get("name") or meta["generateName"]


def _find(objs: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"].get("name") == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _template(obj: dict) -> dict:
    """The pod template (metadata + spec) of a workload, or the Pod itself."""
    if obj["kind"] == "Pod":
        return obj
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return obj["spec"]["template"]


def _workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in WORKLOAD_KINDS]


def _pod_labels(obj: dict) -> dict[str, str]:
    return _template(obj).get("metadata", {}).get("labels", {})


def _containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def _all_containers(objs: list[dict]):
    for obj in _workloads(objs):
        spec = _template(obj)["spec"]
        for container in _containers(spec):
            yield f"{obj['kind']}/{_name(obj)}/{container['name']}", spec, container


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions; {} selects all)."""
    selector = selector or {}
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        ok = {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return True


def _secret_values(objs: list[dict], name: str) -> dict[str, str]:
    secret = _find(objs, "Secret", name)
    values = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    return values | secret.get("stringData", {})


def _env(container: dict, objs: list[dict], namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it from the rendered objects."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = _secret_values(objs, ref["name"])[ref["key"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = _find(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
    return env


def _container(objs: list[dict], kind: str, name: str, container: str) -> dict:
    spec = _template(_find(objs, kind, name))["spec"]
    return next(c for c in _containers(spec) if c["name"] == container)


def _shell_script(container: dict) -> str:
    assert container["command"][:2] == ["sh", "-c"], container["command"]
    return container["command"][2]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# -- schema ------------------------------------------------------------------------------------


def _schema_errors(objs: list[dict]) -> list[str]:
    errors = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{obj['kind']}/{_name(obj)}: {error.message} at {list(error.path)}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{obj['kind']}/{_name(obj)}: no schema ({error})")
    return errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_passes_strict_schema_validation(rendered, overlay):
    objs = rendered[overlay]
    kinds = {o["kind"] for o in objs}
    assert {"StatefulSet", "Deployment", "Job", "Service", "Secret", "ConfigMap", "NetworkPolicy"} <= kinds
    assert _schema_errors(objs) == [], f"Kubernetes {K8S_VERSION} schema"


def test_tool_manifests_pass_strict_schema_validation():
    tools = _tools()
    assert any(_name(o).startswith("stage-weights") for o in tools)
    assert _schema_errors(tools) == [], f"Kubernetes {K8S_VERSION} schema"


# -- pod policies ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_cpu_and_memory_requests_and_limits(rendered, overlay):
    missing = []
    for where, _, container in _all_containers(rendered[overlay] + _tools()):
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    missing.append(f"{where}: {kind}.{resource}")
    assert missing == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_non_root_read_only_without_privilege_escalation_or_capabilities(
    rendered, overlay
):
    problems = []
    for where, pod, container in _all_containers(rendered[overlay] + _tools()):
        pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
        effective = pod_sc | sc  # container fields override the pod's

        def problem(what: str, where=where) -> None:
            problems.append(f"{where}: {what}")

        if effective.get("runAsNonRoot") is not True:
            problem("runAsNonRoot is not true")
        if not isinstance(effective.get("runAsUser"), int) or effective["runAsUser"] == 0:
            problem("no non-zero runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem("allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problem("privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc["capabilities"].get("add"):
            problem("capabilities: not drop [ALL] / something added")
        if effective.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problem("seccompProfile is not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problem("readOnlyRootFilesystem is not true")
        if any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC")):
            problem("shares a host namespace")
    assert problems == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_to_a_release_tag_not_latest(rendered, overlay):
    loose = []
    for where, _, container in _all_containers(rendered[overlay] + _tools()):
        image = container["image"]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and (not tag or tag == "latest"):
            loose.append(f"{where}: {image}")
    assert loose == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_images_entry_repoints_every_proxytune_container_to_the_slim_server_image(tmp_path, overlay):
    """What `kustomize edit set image` (printed by `make image`) changes: the overlay's `images:`."""
    folder = _tree_with_env(tmp_path) / "overlays" / overlay
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    (entry,) = [i for i in kustomization["images"] if i["name"] == SERVER_IMAGE]
    entry.update(newName="registry.example/proxytune-server", newTag="abc123")
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objs = _render(folder)
    ours = {c["image"] for _, _, c in _all_containers(objs) if "proxytune" in c["image"]}
    assert ours == {"registry.example/proxytune-server:abc123"}
    # A Job's pod template is immutable: nothing a new build or script changes may be in one, or
    # the next `kubectl apply` fails while the old Job exists.
    for job in (o for o in objs if o["kind"] == "Job"):
        spec = _template(job)["spec"]
        assert not any("proxytune" in c["image"] for c in _containers(spec)), _name(job)
        assert not any("configMap" in v for v in spec.get("volumes", [])), _name(job)
    assert {c["image"] for _, _, c in _all_containers(_tools())} == {f"{SERVER_IMAGE}:0.2.0"}  # set by hand


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_volume_and_variable_references_resolve_within_the_rendered_objects(rendered, overlay):
    objs = rendered[overlay] + _tools()
    secrets = {_name(o): set(o.get("data", {})) for o in objs if o["kind"] == "Secret"}
    config_maps = {_name(o): set(o.get("data", {})) for o in objs if o["kind"] == "ConfigMap"}
    claims = {_name(o) for o in objs if o["kind"] == "PersistentVolumeClaim"}
    broken = []
    for obj in _workloads(objs):
        spec = _template(obj)["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for volume in volumes.values():
            if "configMap" in volume and volume["configMap"]["name"] not in config_maps:
                broken.append(f"{_name(obj)}: ConfigMap {volume['configMap']['name']}")
            if (
                "persistentVolumeClaim" in volume
                and volume["persistentVolumeClaim"]["claimName"] not in claims
            ):
                broken.append(f"{_name(obj)}: PVC {volume['persistentVolumeClaim']['claimName']}")
        for container in _containers(spec):
            where = f"{_name(obj)}/{container['name']}"
            for mount in container.get("volumeMounts", []):
                if mount["name"] not in volumes and mount["name"] not in templates:
                    broken.append(f"{where}: volume {mount['name']}")
            names = [var["name"] for var in container.get("env", [])]
            for var in container.get("env", []):
                source = var.get("valueFrom", {})
                for ref_kind, known in (("secretKeyRef", secrets), ("configMapKeyRef", config_maps)):
                    ref = source.get(ref_kind)
                    if ref and not ref.get("optional") and ref["key"] not in known.get(ref["name"], ()):
                        broken.append(f"{where}: {ref_kind} {ref['name']}/{ref['key']}")
            # $(VAR) in command and args is expanded by Kubernetes only for the container's env.
            for text in container.get("command", []) + container.get("args", []):
                for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
                    if var not in names:
                        broken.append(f"{where}: $({var}) is not in env")
    assert broken == []


# -- the pipeline's ConfigMap and Secrets ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_configmap_has_exactly_the_keys_the_pipeline_reads_pointing_at_rendered_services(
    rendered, overlay
):
    objs = rendered[overlay]
    data = _find(objs, "ConfigMap", CONFIG_MAP)["data"]
    assert CONFIG_MAP == "proxytune-config"
    assert set(data) == set(CONFIG_ENV) == {"s3-endpoint-url", "s3-bucket", "mlflow-tracking-uri"}
    services = {_name(o): {p["port"] for p in o["spec"]["ports"]} for o in objs if o["kind"] == "Service"}
    for key in ("s3-endpoint-url", "mlflow-tracking-uri"):
        url = urlparse(data[key])
        assert url.hostname in services and url.port in services[url.hostname], f"{key}={data[key]}"
    assert data["s3-bucket"] == "proxytune"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_generated_secrets_have_fixed_names_and_the_keys_of_their_env_files(rendered, overlay):
    objs = rendered[overlay]
    assert S3_SECRET == "proxytune-s3"
    assert set(_secret_values(objs, S3_SECRET)) == set(SECRET_ENV) == {"access-key", "secret-key"}
    for env_file, secret in SECRET_OF_ENV.items():
        assert _secret_values(objs, secret) == TEST_ENV[env_file]
    assert sorted(_name(o) for o in objs if o["kind"] == "Secret") == sorted(SECRET_OF_ENV.values())


def test_no_committed_manifest_holds_a_secret_value_or_a_generator_literal():
    offenders = []
    for path in sorted(MANIFESTS.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "Secret" and (doc.get("data") or doc.get("stringData")):
                offenders.append(f"{path.relative_to(REPO)}: Secret {doc['metadata']['name']} with values")
            for generator in doc.get("secretGenerator", []):
                if generator.get("literals") or generator.get("files"):
                    offenders.append(
                        f"{path.relative_to(REPO)}: secretGenerator {generator['name']} literals"
                    )
                if any(not env.endswith(".env") for env in generator.get("envs", [])):
                    offenders.append(
                        f"{path.relative_to(REPO)}: secretGenerator {generator['name']} env name"
                    )
    assert offenders == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_configmap_carries_a_credential_like_key(rendered, overlay):
    keys = [
        f"{_name(o)}/{key}"
        for o in rendered[overlay]
        if o["kind"] == "ConfigMap"
        for key in list(o.get("data", {})) + list(o.get("binaryData", {}))
    ]
    assert keys and [key for key in keys if CREDENTIAL_KEY.search(key.split("/", 1)[1])] == []


@pytest.mark.parametrize("overlay", ENV_OVERLAYS)
def test_real_env_files_are_git_ignored_and_their_committable_examples_are_not(overlay):
    directory = MANIFESTS / "overlays" / overlay
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    env_files = sorted(env for g in kustomization["secretGenerator"] for env in g["envs"])
    assert env_files == sorted(TEST_ENV)

    def ignored(path: Path) -> bool:
        check = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True)
        assert check.returncode in (0, 1), check.stderr
        return check.returncode == 0

    for env_file in env_files:
        assert ignored(directory / env_file), f"{overlay}/{env_file} would be committed"
        assert (directory / f"{env_file}.example").is_file()
        assert not ignored(directory / f"{env_file}.example")


@pytest.mark.parametrize("overlay", ENV_OVERLAYS)
def test_env_examples_have_every_key_and_only_placeholder_credentials(overlay):
    directory = MANIFESTS / "overlays" / overlay
    for env_file, test_values in TEST_ENV.items():
        lines = (directory / f"{env_file}.example").read_text().splitlines()
        values = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
        assert set(values) == set(test_values), env_file
        for key, value in values.items():
            if key not in ("user", "database"):
                assert PLACEHOLDER in value, f"{env_file}: {key} is not a placeholder"


@pytest.mark.parametrize("overlay", ENV_OVERLAYS)
@pytest.mark.parametrize("missing", sorted(TEST_ENV))
def test_kustomize_fails_when_an_env_file_is_missing(tmp_path, overlay, missing):
    tree = _copy_tree(tmp_path)
    _write_env(tree / "overlays" / overlay, {k: v for k, v in TEST_ENV.items() if k != missing})
    result = _kustomize(tree / "overlays" / overlay)
    assert result.returncode != 0
    assert missing in result.stderr


# -- placeholders are refused, the bucket Job's script ----------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "container", "program"),
    [
        ("StatefulSet", "minio", "minio", "minio"),
        ("StatefulSet", "mlflow-postgres", "postgres", "docker-entrypoint.sh"),
    ],
)
def test_minio_and_postgres_refuse_to_start_on_the_example_placeholders(
    tmp_path, rendered, rendered_from_examples, kind, name, container, program
):
    _stub(tmp_path, program, 'echo "started $*"')
    path = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    for objs, starts in ((rendered_from_examples, False), (rendered["standalone"], True)):
        spec = _container(objs, kind, name, container)
        env = {"PATH": path, **_env(spec, objs, "proxytune")}
        result = subprocess.run(["sh", "-c", _shell_script(spec)], env=env, capture_output=True, text=True)
        assert (result.returncode == 0) == starts, result.stderr
        assert ("started" in result.stdout) == starts
        if not starts:
            assert "placeholder" in result.stderr


def _run_bucket_job(
    tmp_path: Path, objs: list[dict], attach_reply: str
) -> tuple[subprocess.CompletedProcess, str]:
    """The bucket script as MLflow's init container runs it, against a stand-in `mc`."""
    mlflow = _find(objs, "Deployment", "mlflow")
    container = _container(objs, "Deployment", "mlflow", "minio-buckets")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/scripts"]
    (volume,) = [v for v in _template(mlflow)["spec"]["volumes"] if v["name"] == mount["name"]]
    script = tmp_path / "minio-buckets.sh"
    (script_name,) = _find(objs, "ConfigMap", volume["configMap"]["name"])["data"].items()
    script.write_text(script_name[1])
    assert container["command"] == ["sh", f"/scripts/{script_name[0]}"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "mc.log"
    # A stand-in for `mc`: logs its arguments, keeps the policy document, and answers the
    # second `policy attach` of a re-run as MinIO does.
    _stub(
        bin_dir,
        "mc",
        f'echo "$*" >> "{log}"\n'
        f'case "$*" in "admin policy create"*) cp "$6" "{tmp_path}/policy.json" ;; esac\n'
        f'case "$*" in "admin policy attach"*) {attach_reply} ;; esac',
    )
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        **_env(container, objs, "proxytune"),
    }
    result = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
    return result, log.read_text() if log.exists() else ""


def test_bucket_job_creates_buckets_and_a_pipeline_user_limited_to_the_pipeline_bucket(tmp_path, rendered):
    objs = rendered["standalone"]
    result, log = _run_bucket_job(tmp_path, objs, "exit 0")
    assert result.returncode == 0, result.stderr
    s3 = TEST_ENV["s3.env"]
    bucket = _find(objs, "ConfigMap", CONFIG_MAP)["data"]["s3-bucket"]
    assert f"mb --ignore-existing local/{bucket} local/mlflow" in log
    assert f"admin user add local {s3['access-key']} {s3['secret-key']}" in log
    assert f"admin policy attach local proxytune-pipeline --user {s3['access-key']}" in log
    policy = json.loads((tmp_path / "policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}


def test_bucket_job_rerun_accepts_an_already_attached_policy(tmp_path, rendered):
    reply = 'echo "mc: <ERROR> The specified policy change is already in effect." >&2; exit 1'
    result, _ = _run_bucket_job(tmp_path, rendered["standalone"], reply)
    assert result.returncode == 0, result.stderr


def test_bucket_job_refuses_placeholder_credentials_before_calling_mc(tmp_path, rendered_from_examples):
    result, log = _run_bucket_job(tmp_path, rendered_from_examples, "exit 0")
    assert result.returncode == 1
    assert "placeholder" in result.stderr
    assert log == ""


# -- services and network policies -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workload_and_service_selectors_match_their_pod_templates_and_ports(rendered, overlay):
    objs = rendered[overlay]
    for obj in _workloads(objs):
        if "selector" in obj["spec"]:
            assert _selects(obj["spec"]["selector"], _pod_labels(obj)), _name(obj)
    for service in (o for o in objs if o["kind"] == "Service"):
        selector = {"matchLabels": service["spec"]["selector"]}
        backends = [o for o in _workloads(objs) if _selects(selector, _pod_labels(o))]
        assert [_name(b) for b in backends] == [_name(service)], f"Service {_name(service)}"
        ports = [p for c in _containers(_template(backends[0])["spec"]) for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), (
                f"{_name(service)} {target}"
            )


def _admitted(objs: list[dict], target: dict, port: int) -> set[str]:
    """Names of the client pods that the NetworkPolicies let reach `target` on `port`: the
    pipeline's step pods (labelled POD_LABEL) and every rendered pod template."""
    clients = {PIPELINE: dict([POD_LABEL])} | {_name(o): _pod_labels(o) for o in _workloads(objs)}
    container_ports = {
        p["name"]: p["containerPort"]
        for c in _containers(_template(target)["spec"])
        for p in c.get("ports", [])
        if "name" in p
    }
    policies = [
        p
        for p in objs
        if p["kind"] == "NetworkPolicy"
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _selects(p["spec"]["podSelector"], _pod_labels(target))
    ]
    assert policies, f"no NetworkPolicy isolates {_name(target)}"
    admitted = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            rule_ports = [container_ports.get(p.get("port"), p.get("port")) for p in rule.get("ports", [])]
            if rule_ports and port not in rule_ports:
                continue
            for peer in rule.get("from", []):
                assert set(peer) == {"podSelector"}, f"{_name(policy)}: only same-namespace pod peers"
                admitted |= {
                    name for name, labels in clients.items() if _selects(peer["podSelector"], labels)
                }
            if not rule.get("from"):
                admitted.add("anyone")
    return admitted


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_admit_only_the_intended_pods(rendered, overlay):
    objs = rendered[overlay]
    minio = _find(objs, "StatefulSet", "minio")
    mlflow = _find(objs, "Deployment", "mlflow")
    postgres = _find(objs, "StatefulSet", "mlflow-postgres")
    assert POD_LABEL == ("proxytune.io/role", "pipeline")
    assert _admitted(objs, minio, 9000) == {PIPELINE, "mlflow"}  # MLflow runs the bucket script too
    assert _admitted(objs, minio, 9001) == set()  # the console: `kubectl port-forward` only
    assert _admitted(objs, mlflow, 5000) == {PIPELINE}
    assert _admitted(objs, postgres, 5432) == {"mlflow"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_allowed_hosts_admit_the_in_cluster_names_and_refuse_others(rendered, overlay):
    from mlflow.server.security_utils import is_allowed_host_header

    namespace = OVERLAYS[overlay]
    objs = rendered[overlay]
    container = _container(objs, "Deployment", "mlflow", "mlflow")
    env = _env(container, objs, namespace)
    (flag,) = [a for a in container["args"] if a.startswith("--allowed-hosts=")]
    allowed = _expand(flag.partition("=")[2], env).split(",")
    tracking = urlparse(_find(objs, "ConfigMap", CONFIG_MAP)["data"]["mlflow-tracking-uri"]).netloc
    for host in (
        tracking,
        f"mlflow.{namespace}:5000",
        f"mlflow.{namespace}.svc:5000",
        f"mlflow.{namespace}.svc.cluster.local:5000",
        "localhost:5000",
        "127.0.0.1:5000",
    ):
        assert is_allowed_host_header(allowed, host), host
    for host in ("attacker.example:5000", "mlflow.elsewhere:5000", "10.0.0.1:5000"):
        assert not is_allowed_host_header(allowed, host), host


# -- model cache, namespaces, labels, RBAC -----------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_cache_pvc_has_the_compiled_access_mode_and_is_mounted_where_the_pipeline_expects(
    rendered, overlay
):
    objs = rendered[overlay] + _tools()
    name = ClusterOptions().model_cache_pvc
    access = ClusterOptions().model_cache_access
    assert _find(objs, "PersistentVolumeClaim", name)["spec"]["accessModes"] == [access] == ["ReadWriteOnce"]
    users = [
        o for o in _workloads(objs) if "model-cache" in _pod_labels(o).get("app.kubernetes.io/component", "")
    ]
    assert {_name(o) for o in users} >= {"model-cache-init", "stage-weights-"}
    for obj in users:
        spec = _template(obj)["spec"]
        (volume,) = [
            v["name"] for v in spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == name
        ]
        mounts = [
            m["mountPath"] for c in spec["containers"] for m in c["volumeMounts"] if m["name"] == volume
        ]
        assert mounts == [CACHE_MOUNT], _name(obj)
    stage = next(o for o in users if _name(o) == "stage-weights-")
    env = {v["name"]: v for v in _template(stage)["spec"]["containers"][0]["env"]}
    assert env["HF_HOME"]["value"] == f"{CACHE_MOUNT}/huggingface"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": HF_SECRET,
        "key": "token",
        "optional": True,
    }


def test_in_a_profile_namespace_proxytune_workloads_run_without_a_sidecar_behind_the_network_policies(
    rendered,
):
    """KFP runs pipeline pods without the Istio sidecar, so a STRICT-mTLS service with one would
    refuse them: MinIO, PostgreSQL, MLflow and the Jobs run without it too, and the same
    NetworkPolicies as elsewhere do the admitting."""
    objs = rendered["kubeflow-profile"]
    for workload in _workloads(objs):
        assert _pod_labels(workload).get("sidecar.istio.io/inject") == "false", _name(workload)
    assert _find(objs, "ServiceAccount", RUNNER_ACCOUNT)

    def policies(overlay: str) -> list[str]:
        return sorted(_name(o) for o in rendered[overlay] if o["kind"] == "NetworkPolicy")

    assert policies("kubeflow-profile") == policies("kubeflow") != []
    assert not any("sidecar.istio.io/inject" in _pod_labels(w) for w in _workloads(rendered["kubeflow"]))


def test_the_rwx_component_makes_the_model_cache_read_write_many(tmp_path):
    overlay = _tree_with_env(tmp_path) / "overlays" / "kubeflow"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    kustomization["components"] = ["../../components/rwx-model-cache"]
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objs = _render(overlay)
    pvc = _find(objs, "PersistentVolumeClaim", ClusterOptions().model_cache_pvc)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _schema_errors(objs) == []
    assert ClusterOptions(model_cache_access="ReadWriteMany").loop_parallelism is None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_in_the_overlay_namespace_and_labelled_part_of_proxytune(rendered, overlay):
    namespace = OVERLAYS[overlay]
    objs = rendered[overlay]
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "proxytune", _name(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, _name(obj)
    for obj in _workloads(objs):
        assert _pod_labels(obj)["app.kubernetes.io/part-of"] == "proxytune", _name(obj)
    namespaces = [_name(o) for o in objs if o["kind"] == "Namespace"]
    # standalone creates its namespace; kubeflow's belongs to the Kubeflow installation.
    assert namespaces == (["proxytune"] if overlay == "standalone" else [])


def test_kubeflow_overlay_binds_the_runner_service_account_to_a_role_with_what_kfp_steps_need(rendered):
    objs = rendered["kubeflow"]
    account = _find(objs, "ServiceAccount", RUNNER_ACCOUNT)  # what submit and schedule run as
    bindings = [
        b
        for b in objs
        if b["kind"] == "RoleBinding"
        and {"kind": "ServiceAccount", "name": _name(account), "namespace": "kubeflow"} in b["subjects"]
    ]
    assert len(bindings) == 1
    role_ref = bindings[0]["roleRef"]
    assert role_ref["kind"] == "Role"
    role = _find(objs, "Role", role_ref["name"])

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(
            group in rule.get("apiGroups", [])
            and resource in rule.get("resources", [])
            and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", []))
            for rule in role["rules"]
        )

    needed = [("", "configmaps", verb) for verb in ("get", "list", "watch")] + [("", "secrets", "get")]
    needed += [("", "pods", "get"), ("", "pods", "list"), ("", "pods/log", "get")]
    needed += [("argoproj.io", "workflowtaskresults", verb) for verb in ("create", "patch")]
    assert [n for n in needed if not allowed(*n)] == []
    # least privilege: no Secret listing, no volumes created or deleted (the cache PVC exists)
    unused = [("", "secrets", "list"), ("", "secrets", "watch")]
    unused += [("", "persistentvolumeclaims", verb) for verb in ("create", "delete")]
    assert [u for u in unused if allowed(*u)] == []
    assert not any("*" in rule.get("resources", []) for rule in role["rules"])
    assert not [o for o in rendered["standalone"] if o["kind"] in ("ServiceAccount", "Role", "RoleBinding")]


# -- the MLflow server as the manifest starts it -------------------------------------------------


def _as_started_here(text: str, addresses: dict[str, str]) -> str:
    for cluster_address, local_address in addresses.items():
        text = text.replace(cluster_address, local_address)
    return text


def test_mlflow_server_started_as_the_manifest_says_stores_runs_in_postgresql_and_artifacts_in_s3(
    rendered, postgres_server, s3_endpoint, tmp_path
):
    """The Deployment's command, args and env, expanded as the kubelet expands them, run against
    a real PostgreSQL and the S3 test server; only the Services' addresses (and the pod's /tmp)
    are mapped to their local counterparts. A run with an artifact goes in and comes back."""
    from mlflow import MlflowClient

    objs = rendered["kubeflow"]
    container = _container(objs, "Deployment", "mlflow", "mlflow")
    env = _env(container, objs, "kubeflow")
    db = TEST_ENV["postgres.env"]
    pg_host, pg_port = postgres_server(db["user"], db["password"], db["database"])
    s3_bucket(s3_endpoint, "mlflow")
    port = free_port()
    addresses = {
        "mlflow-postgres:5432": f"{pg_host}:{pg_port}",
        "http://minio:9000": s3_endpoint,
        "--host=0.0.0.0": "--host=127.0.0.1",
        "--port=5000": f"--port={port}",
        "/tmp": str(tmp_path),
    }
    env = {name: _as_started_here(value, addresses) for name, value in env.items()}
    args = [_expand(arg, env) for arg in container["args"]]
    executable, *rest = container["command"]
    command = [str(BIN / executable), *rest, *(_as_started_here(arg, addresses) for arg in args)]
    assert _as_started_here(container["workingDir"], addresses) == str(tmp_path)
    url = f"http://127.0.0.1:{port}"
    server = start_server(command, f"{url}/health", env, tmp_path / "server.log", 120)
    try:
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("manifest-check"))
        client.log_metric(run.info.run_id, "clip_i", 0.81)
        (tmp_path / "scores.json").write_text('{"clip_i": 0.81}')
        client.log_artifact(run.info.run_id, str(tmp_path / "scores.json"))
        stored = client.get_run(run.info.run_id)
        fetched = client.download_artifacts(run.info.run_id, "scores.json", str(tmp_path / "back"))
    finally:
        stop(server)
    assert stored.data.metrics == {"clip_i": 0.81}
    assert Path(fetched).read_text() == '{"clip_i": 0.81}'
    in_s3 = s3_bucket(s3_endpoint, "mlflow").list_objects("mlflow", prefix="artifacts/", recursive=True)
    assert any(obj.object_name.endswith(f"{run.info.run_id}/artifacts/scores.json") for obj in in_s3)
