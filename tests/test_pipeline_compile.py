import graphlib

import pytest
import yaml

from components.base import BASE_IMAGE
from proxytune.cli import main

STAGES = ["plan", "ingest", "tune-supervisor", "generate-proxy", "tune-student", "evaluate", "register"]
PER_SUBJECT = ["ingest", "tune-supervisor", "generate-proxy"]
GPU_STAGES = {"tune-supervisor", "generate-proxy", "tune-student", "evaluate"}
SECRET_VALUE = "do-not-leak-this-secret-8f3a"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "AKIA-DO-NOT-LEAK")
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
        env.setenv("MLFLOW_TRACKING_URI", "http://user:pw@mlflow.internal:5000")
        assert main(["compile", "-o", str(path)]) == 0
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def task_spec(spec, task):
    """A task of the root DAG, or of the per-subject loop's DAG."""
    root = spec["root"]["dag"]["tasks"]
    if task in root:
        return root[task]
    return spec["components"][root["for-loop-1"]["componentRef"]["name"]]["dag"]["tasks"][task]


def executor_of(spec, task):
    return spec["components"][task_spec(spec, task)["componentRef"]["name"]]["executorLabel"]


def order(tasks):
    graph = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    return list(graphlib.TopologicalSorter(graph).static_order())


def test_plan_then_a_loop_over_subjects_then_one_student(compiled):
    _, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert order(root) == ["plan", "for-loop-1", "tune-student", "evaluate", "register"]
    loop = root["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-Output"
    assert order({t: task_spec(spec, t) for t in PER_SUBJECT}) == PER_SUBJECT
    collected = {
        task: {name: a["taskOutputArtifact"] for name, a in root[task]["inputs"]["artifacts"].items()}
        for task in ("tune-student", "evaluate")
    }
    assert collected["tune-student"]["proxies"]["producerTask"] == "for-loop-1"
    assert collected["evaluate"]["subjects"]["outputArtifactKey"] == "pipelinechannel--ingest-subject"
    assert (
        collected["evaluate"]["supervisors"]["outputArtifactKey"]
        == "pipelinechannel--tune-supervisor-supervisor"
    )


def test_gpu_requests_on_exactly_the_gpu_steps(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for task in STAGES:
        label = executor_of(spec, task)
        accelerator = executors[label]["container"].get("resources", {}).get("accelerator")
        tolerations = platform[label].get("tolerations", [])
        if task in GPU_STAGES:
            assert accelerator == {
                "count": "1",
                "resourceCount": "1",
                "resourceType": "nvidia.com/gpu",
                "type": "nvidia.com/gpu",
            }
            assert tolerations == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
            assert platform[label]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
        else:
            assert accelerator is None and tolerations == []


def test_no_credentials_in_the_yaml_only_secret_names(compiled):
    text, _, platform = compiled
    for leaked in (SECRET_VALUE, "AKIA-DO-NOT-LEAK", "user:pw", "mlflow.internal"):
        assert leaked not in text
    for executor in platform.values():
        assert executor["secretAsEnv"][0]["secretName"] == "proxytune-s3"


def test_components_run_the_image_and_install_nothing(compiled):
    text, spec, _ = compiled
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == BASE_IMAGE
    assert "pip install" not in text
