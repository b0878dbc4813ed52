"""How the compiled pipeline's pods are scheduled on Kubernetes: image, GPUs, CPU and memory,
the GPU node pool, the model cache, the hub token. Validated here, applied by
`pipelines.proxy_tuning.build`, chosen with `proxytune compile` options.

`kfp.local` ignores all of it; the compiled YAML carries it (tests check it there).
"""

from __future__ import annotations

import re
from typing import Literal

from kfp import dsl, kubernetes
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from components.base import BASE_IMAGE

CONFIG_MAP = "proxytune-config"
CONFIG_ENV = {
    "s3-endpoint-url": "PROXYTUNE_S3_ENDPOINT_URL",
    "s3-bucket": "PROXYTUNE_S3_BUCKET",
    "mlflow-tracking-uri": "MLFLOW_TRACKING_URI",
}
S3_SECRET = "proxytune-s3"
SECRET_ENV = {"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}
HF_SECRET = "proxytune-hf"  # optional: a hub token for gated models (FLUX.1-dev, SD3)
POD_LABEL = ("proxytune.io/role", "pipeline")  # what the NetworkPolicies admit to MinIO and MLflow
GPU_RESOURCE = "nvidia.com/gpu"
CACHE_MOUNT = "/cache"
GPU_TIMEOUT_S = 24 * 3600
CPU_TIMEOUT_S = 3600
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|[KMGTP]i?)?$")
_SCALE = {"m": 1e-3, "": 1} | {
    unit: base**power
    for power, letter in enumerate("KMGTP", start=1)
    for unit, base in ((letter, 1000), (f"{letter}i", 1024))
}


def quantity(value: str) -> float:
    """A Kubernetes quantity (`500m`, `4`, `96Gi`, `1.5G`) as a number of cores or bytes."""
    match = _QUANTITY.match(value)
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, 500m, 32Gi)")
    number, unit = match.groups()
    return float(number) * _SCALE[unit or ""]


class Resources(BaseModel):
    """Requests and limits of one step's container (Kubernetes quantities)."""

    model_config = ConfigDict(extra="forbid")

    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str
    gpus: int = Field(0, ge=0, le=8)
    shm: str = Field("16Gi", description="memory-backed /dev/shm of GPU steps (part of memory_limit)")

    @field_validator("cpu", "memory", "cpu_limit", "memory_limit", "shm")
    @classmethod
    def _quantity(cls, value: str) -> str:
        quantity(value)
        return value

    @model_validator(mode="after")
    def _requests_within_limits(self) -> Resources:
        """Kubernetes rejects a pod whose request exceeds its limit, hours into a run: refuse it
        at compile time."""
        for field in ("cpu", "memory"):
            request, limit = getattr(self, field), getattr(self, f"{field}_limit")
            if quantity(request) > quantity(limit):
                raise ValueError(
                    f"{field} request {request} is above its limit {limit}: raise {field}_limit too"
                )
        if self.gpus and quantity(self.shm) >= quantity(self.memory_limit):
            raise ValueError(f"shm {self.shm} must stay below memory_limit {self.memory_limit}")
        return self


def _cpu(gb: int, cores: int, gpus: int = 0, shm: str = "16Gi") -> Resources:
    return Resources(
        cpu=str(cores),
        memory=f"{gb}Gi",
        cpu_limit=str(2 * cores),
        memory_limit=f"{gb * 3 // 2}Gi",
        gpus=gpus,
        shm=shm,
    )


_CPU_STEPS = {
    "plan": _cpu(2, 1),
    "plan-bench": _cpu(2, 1),
    "aggregate": _cpu(4, 1),
    "ingest": _cpu(2, 1),
    "proxy-shards": _cpu(1, 1),
    "merge-proxy": _cpu(8, 2),  # DINO scores the proxy images when filtering
    "register": _cpu(4, 1),
}
GPU_STEPS = ("tune-supervisor", "generate-proxy", "tune-student", "tune-direct", "evaluate")
# Per preset (`proxytune compile --profile`). paper: a 7B student or a FLUX/SD3.5 supervisor is
# read into host memory (bf16, 14-24 GB) before it moves to the GPU, and evaluation holds a
# generator and two encoders. small: SDXL (7 GB in fp16) and a 1B student on one 24 GB GPU in
# a node of 8 cores and 32 GB (an AWS g5.2xlarge, a GCP g2-standard-8).
PROFILES = {
    "paper": {
        **_CPU_STEPS,
        **{step: _cpu(64, 8, gpus=1) for step in GPU_STEPS},
        "tune-student": _cpu(96, 8, gpus=1),
        "tune-direct": _cpu(96, 8, gpus=1),
    },
    "small": {**_CPU_STEPS, **{step: _cpu(20, 4, gpus=1, shm="8Gi") for step in GPU_STEPS}},
}
DEFAULT_PROFILE = "paper"
MODEL_STEPS = {"tune-supervisor", "generate-proxy", "tune-student", "tune-direct", "evaluate", "merge-proxy"}


class ClusterOptions(BaseModel):
    """Compile-time scheduling of the pipeline's pods."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(BASE_IMAGE, min_length=1)
    profile: Literal["paper", "small"] = Field(
        DEFAULT_PROFILE, description="resources sized for a preset; `resources` override single steps"
    )
    resources: dict[str, Resources] = Field(default_factory=dict)
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="node labels of the GPU pool (NVIDIA's GPU feature discovery sets this one)",
    )
    gpu_tolerations: list[str] = Field(
        default_factory=lambda: [GPU_RESOURCE], description="taint keys of the GPU pool (operator Exists)"
    )
    model_cache_pvc: str = Field(
        "proxytune-model-cache", description="PVC mounted at /cache by every step that loads a model"
    )
    model_cache_access: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        "ReadWriteOnce",
        description="the cache PVC's access mode: ReadWriteOnce (any cluster's default storage class) "
        "runs one subject, one proxy shard and one model step at a time, so GPU pods take the volume "
        "in turn; ReadWriteMany lets them all run at once",
    )
    hub_online: bool = Field(False, description="let steps download from the Hugging Face hub")

    @model_validator(mode="after")
    def _every_step(self) -> ClusterOptions:
        steps = PROFILES[self.profile]
        unknown = set(self.resources) - set(steps)
        if unknown:
            raise ValueError(f"unknown step(s) {sorted(unknown)}; steps are {', '.join(steps)}")
        self.resources = {**steps, **self.resources}
        return self

    @property
    def loop_parallelism(self) -> int | None:
        """How many subjects, and proxy shards per subject, run at once (None: all)."""
        return 1 if self.model_cache_access == "ReadWriteOnce" else None

    def with_overrides(self, assignments: list[str]) -> ClusterOptions:
        """`STEP.FIELD=VALUE` assignments (`tune-student.memory=128Gi`, `evaluate.gpus=2`)."""
        resources = {step: r.model_dump() for step, r in self.resources.items()}
        for assignment in assignments:
            key, sep, value = assignment.partition("=")
            step, dot, field = key.partition(".")
            if not sep or not dot:
                raise ValueError(f"--resource expects STEP.FIELD=VALUE, got {assignment!r}")
            if step not in resources:
                raise ValueError(f"unknown step {step!r}; steps are {', '.join(resources)}")
            if field not in Resources.model_fields:
                fields = ", ".join(Resources.model_fields)
                raise ValueError(f"unknown resource field {field!r}; fields are {fields}")
            resources[step][field] = value
        try:
            return ClusterOptions.model_validate({**self.model_dump(), "resources": resources})
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg'].removeprefix('Value error, ')}"
                for e in error.errors(include_url=False)
            )
            raise ValueError(f"invalid --resource: {problems}") from None


def schedule(task: dsl.PipelineTask, options: ClusterOptions) -> dsl.PipelineTask:
    """Image, resources, endpoints and credentials (by name only), and for GPU steps the GPU
    pool, `/dev/shm` in memory and retries; steps that load models mount the model cache."""
    step = task.name
    resources = options.resources[step]
    task.set_container_image(options.image)
    task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory).set_memory_limit(resources.memory_limit)
    kubernetes.add_pod_label(task, *POD_LABEL)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, CONFIG_ENV)
    kubernetes.use_secret_as_env(task, S3_SECRET, SECRET_ENV)
    if step in MODEL_STEPS:
        kubernetes.mount_pvc(task, options.model_cache_pvc, CACHE_MOUNT)
        task.set_env_variable("HF_HOME", f"{CACHE_MOUNT}/huggingface")
        task.set_env_variable("PROXYTUNE_MODEL_CACHE", f"{CACHE_MOUNT}/models")
        task.set_env_variable("HF_HUB_OFFLINE", "0" if options.hub_online else "1")
        kubernetes.use_secret_as_env(task, HF_SECRET, {"token": "HF_TOKEN"}, optional=True)
    if resources.gpus:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(resources.gpus)
        for key, value in options.gpu_node_selector.items():
            kubernetes.add_node_selector(task, key, value)
        for key in options.gpu_tolerations:
            kubernetes.add_toleration(task, key=key, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=resources.shm
        )
        task.set_retry(num_retries=2, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.set_timeout(task, GPU_TIMEOUT_S if resources.gpus else CPU_TIMEOUT_S)
    return task
