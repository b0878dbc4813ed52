import graphlib

import pytest
import yaml

from components.base import BASE_IMAGE
from pipelines.cluster import GPU_STEPS, MODEL_STEPS, PROFILES, ClusterOptions, quantity
from proxytune.cli import main
from tests.conftest import REPO

STAGES = [
    "plan",
    "ingest",
    "tune-supervisor",
    "proxy-shards",
    "generate-proxy",
    "merge-proxy",
    "tune-student",
    "tune-direct",
    "evaluate",
    "register",
]
GPU_STAGES = {"tune-supervisor", "generate-proxy", "tune-student", "tune-direct", "evaluate"}
SECRET_VALUE = "do-not-leak-this-secret-8f3a"
IMAGE = "registry.example/proxytune:abc1234"
CHOICES = [
    f"--image={IMAGE}",
    "--resource=tune-student.memory=128Gi",
    "--resource=evaluate.gpus=2",
    "--gpu-node-selector=cloud.example/pool=a100",
    "--gpu-node-selector=cloud.example/spot=false",
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "AKIA-DO-NOT-LEAK")
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
        env.setenv("MLFLOW_TRACKING_URI", "http://user:pw@mlflow.internal:5000")
        assert main(["compile", "-o", str(path), *CHOICES]) == 0
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return text, spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def dag(spec, component: str) -> dict:
    return spec["components"][component]["dag"]["tasks"]


def scopes(spec) -> dict[str, dict]:
    """The root DAG, the protocol sub-pipeline's DAG, the per-subject sub-pipeline's DAG in its
    loop and the proxy-shard loop's DAG."""
    root = spec["root"]["dag"]["tasks"]
    protocol = dag(spec, root["proxy-tuning-protocol"]["componentRef"]["name"])
    (stages,) = dag(spec, protocol["for-loop-1"]["componentRef"]["name"]).values()
    subject = dag(spec, stages["componentRef"]["name"])
    shards = dag(spec, subject["for-loop-1"]["componentRef"]["name"])
    return {"root": root, "protocol": protocol, "subject": subject, "shards": shards}


def task_spec(spec, task):
    return next(tasks[task] for tasks in scopes(spec).values() if task in tasks)


def executor_of(spec, task):
    return spec["components"][task_spec(spec, task)["componentRef"]["name"]]["executorLabel"]


def order(tasks):
    graph = {name: set(task.get("dependentTasks", [])) for name, task in tasks.items()}
    return list(graphlib.TopologicalSorter(graph).static_order())


def test_plan_then_per_subject_stages_with_sharded_proxies_then_one_student(compiled):
    _, spec, _ = compiled
    tasks = scopes(spec)
    assert order(tasks["root"]) == ["plan", "proxy-tuning-protocol", "register"]
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks["protocol"].items()} == {
        "for-loop-1": set(),
        "tune-student": {"for-loop-1"},
        "tune-direct": {"for-loop-1", "tune-student"},  # after it on a ReadWriteOnce cache (the default)
        "evaluate": {"for-loop-1", "tune-student", "tune-direct"},
    }
    protocol_inputs = tasks["root"]["proxy-tuning-protocol"]["inputs"]["parameters"]
    assert protocol_inputs["subjects"]["taskOutputParameter"]["producerTask"] == "plan"
    assert (
        tasks["protocol"]["for-loop-1"]["parameterIterator"]["items"]["inputParameter"]
        == "pipelinechannel--subjects"
    )
    assert {name: set(task.get("dependentTasks", [])) for name, task in tasks["subject"].items()} == {
        "ingest": set(),
        "tune-supervisor": {"ingest"},
        "proxy-shards": set(),
        "for-loop-1": {"proxy-shards", "tune-supervisor"},
        "merge-proxy": {"for-loop-1", "ingest"},
    }
    loop = tasks["subject"]["for-loop-1"]["parameterIterator"]["items"]["inputParameter"]
    assert loop == "pipelinechannel--proxy-shards-Output" and list(tasks["shards"]) == ["generate-proxy"]
    collected = {
        task: {
            name: a["taskOutputArtifact"]
            for name, a in tasks["protocol"][task]["inputs"]["artifacts"].items()
        }
        for task in ("tune-student", "tune-direct", "evaluate")
    }
    assert collected["tune-student"]["proxies"]["producerTask"] == "for-loop-1"
    assert collected["tune-direct"]["subjects"]["producerTask"] == "for-loop-1"
    merged = tasks["subject"]["merge-proxy"]["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]
    assert merged["producerTask"] == "for-loop-1"
    assert set(collected["evaluate"]) == {"subjects", "supervisors", "student", "direct"}
    assert collected["evaluate"]["direct"]["producerTask"] == "tune-direct"


def test_gpu_requests_pool_and_shm_on_exactly_the_gpu_steps(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for task in STAGES:
        label = executor_of(spec, task)
        accelerator = executors[label]["container"]["resources"].get("accelerator")
        tolerations = platform[label].get("tolerations", [])
        if task in GPU_STAGES:
            count = "2" if task == "evaluate" else "1"  # --resource evaluate.gpus=2
            assert accelerator == {
                "count": count,
                "resourceCount": count,
                "resourceType": "nvidia.com/gpu",
                "type": "nvidia.com/gpu",
            }
            assert tolerations == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
            assert platform[label]["nodeSelector"]["labels"] == {
                "cloud.example/pool": "a100",
                "cloud.example/spot": "false",
            }
            assert platform[label]["emptyDirMounts"] == [
                {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm", "sizeLimit": "16Gi"}
            ]
            assert task_spec(spec, task)["retryPolicy"]["maxRetryCount"] == 2
        else:
            assert accelerator is None and tolerations == []
            assert "nodeSelector" not in platform[label] and "emptyDirMounts" not in platform[label]


def test_every_step_has_requests_limits_and_the_label_the_network_policies_admit(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for task in STAGES:
        label = executor_of(spec, task)
        resources = executors[label]["container"]["resources"]
        default = PROFILES["paper"][task]
        memory = "128Gi" if task == "tune-student" else default.memory  # --resource tune-student.memory
        assert resources["resourceCpuRequest"] == default.cpu
        assert resources["resourceCpuLimit"] == default.cpu_limit
        assert resources["resourceMemoryRequest"] == memory
        assert resources["resourceMemoryLimit"] == default.memory_limit
        assert platform[label]["podMetadata"]["labels"] == {"proxytune.io/role": "pipeline"}


def test_steps_that_load_models_mount_the_model_cache_and_stay_offline(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    for task in STAGES:
        label = executor_of(spec, task)
        env = {e["name"]: e["value"] for e in executors[label]["container"].get("env", [])}
        mounts = platform[label].get("pvcMount", [])
        if task in MODEL_STEPS:
            assert [(m["constant"], m["mountPath"]) for m in mounts] == [("proxytune-model-cache", "/cache")]
            assert env == {
                "HF_HOME": "/cache/huggingface",
                "PROXYTUNE_MODEL_CACHE": "/cache/models",
                "HF_HUB_OFFLINE": "1",
            }
            hub = [s for s in platform[label]["secretAsEnv"] if s["secretName"] == "proxytune-hf"]
            assert hub == [
                {
                    "keyToEnv": [{"envVar": "HF_TOKEN", "secretKey": "token"}],
                    "optional": True,
                    "secretName": "proxytune-hf",
                    "secretNameParameter": {"runtimeValue": {"constant": "proxytune-hf"}},
                }
            ]
        else:
            assert mounts == [] and env == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--resource=tune-student.memroy=1Gi"], "unknown resource field 'memroy'"),
        (["--resource=train.cpu=1"], "unknown step 'train'"),
        (["--resource=evaluate.memory=lots"], "'lots' is not a Kubernetes quantity"),
        (["--resource=evaluate"], "--resource expects STEP.FIELD=VALUE"),
        (["--resource=evaluate.memory=128Gi"], "evaluate: memory request 128Gi is above its limit 96Gi"),
        (["--resource=plan.cpu=1500m", "--resource=plan.cpu_limit=1.2"], "plan: cpu request 1500m is above"),
        (["--resource=evaluate.shm=96Gi"], "evaluate: shm 96Gi must stay below memory_limit 96Gi"),
        (["--gpu-node-selector=pool"], "expected KEY=VALUE, got 'pool'"),
    ],
)
def test_bad_cluster_options_are_refused_naming_the_option(tmp_path, capsys, arguments, message):
    assert main(["compile", "-o", str(tmp_path / "p.yaml"), *arguments]) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", 0.5), ("4", 4), ("1.5", 1.5), ("96Gi", 96 * 2**30), ("1G", 1e9), ("512Mi", 2**29), ("2K", 2e3)],
)
def test_kubernetes_quantities_are_read_as_the_api_server_reads_them(text, value):
    assert quantity(text) == pytest.approx(value)


def test_a_request_equal_to_its_limit_compiles(tmp_path):
    options = ["--resource=evaluate.memory=96Gi", "--resource=evaluate.cpu=16"]
    assert main(["compile", "-o", str(tmp_path / "p.yaml"), *options]) == 0


def test_no_credentials_in_the_yaml_only_secret_names(compiled):
    text, _, platform = compiled
    for leaked in (SECRET_VALUE, "AKIA-DO-NOT-LEAK", "user:pw", "mlflow.internal"):
        assert leaked not in text
    for executor in platform.values():
        assert executor["secretAsEnv"][0]["secretName"] == "proxytune-s3"
    for local in ("/tmp/", "/home/", "/work/", "/root/", str(REPO)):
        assert local not in text  # nothing of the machine that compiled it


def test_components_run_the_image_given_and_install_nothing(compiled):
    text, spec, _ = compiled
    for executor in spec["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == IMAGE
    assert "pip install" not in text
    assert ClusterOptions().image == BASE_IMAGE  # without --image: $PROXYTUNE_IMAGE or the default


def test_the_evaluation_publishes_its_table_as_a_markdown_artifact(compiled):
    _, spec, _ = compiled
    component = spec["components"][task_spec(spec, "evaluate")["componentRef"]["name"]]
    outputs = component["outputDefinitions"]["artifacts"]
    assert outputs["table"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"


@pytest.mark.parametrize(("access", "serial"), [([], True), (["--model-cache-access=ReadWriteMany"], False)])
def test_a_read_write_once_cache_runs_gpu_steps_one_at_a_time(tmp_path, access, serial):
    """On ReadWriteOnce (the default: what every cluster's default class offers) the volume is on
    one node at a time, so subjects, proxy shards and the student/baseline pair take turns."""
    path = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(path), *access]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    found = scopes(spec)
    loops = [found["protocol"]["for-loop-1"], found["subject"]["for-loop-1"]]
    assert [loop.get("iteratorPolicy") for loop in loops] == [{"parallelismLimit": 1} if serial else None] * 2
    assert ("tune-student" in found["protocol"]["tune-direct"]["dependentTasks"]) == serial


def test_the_small_profile_fits_gpu_steps_on_a_32_gb_node_and_resources_override_it(tmp_path):
    path = tmp_path / "p.yaml"
    options = ["--profile=small", "--resource=evaluate.memory=24Gi"]
    assert main(["compile", "-o", str(path), *options]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    executors = spec["deploymentSpec"]["executors"]
    for task in GPU_STEPS:
        resources = executors[executor_of(spec, task)]["container"]["resources"]
        memory = "24Gi" if task == "evaluate" else "20Gi"
        assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == (memory, "30Gi")
        assert quantity(resources["resourceMemoryLimit"]) < 32 * 2**30
        assert resources["resourceCpuRequest"] == "4"
    assert ClusterOptions().profile == "paper"
