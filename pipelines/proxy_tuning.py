"""The Proxy-Tuning pipeline: plan -> per subject (ingest -> tune_supervisor -> generate_proxy
in `proxy.shards` parts -> merge_proxy) -> tune_student on all proxy datasets -> evaluate ->
register.

One subject is the usual run (the Kubeflow UI asks for its URI and class noun);
`extra_subjects` adds more, each `{"uri", "class_noun", "name"?, "identifier"?, "proxy_uri"?}`,
for a multi-subject student. `proxy_uri` (a folder or `s3://` prefix of images of the subject
made by any other supervisor) imports the proxy set instead of drawing it: `tune_supervisor`
then only records the black box, and one `generate_proxy` task imports the images.

`plan` validates everything before any GPU step. The per-subject stages are a sub-pipeline
in a ParallelFor over subjects, and inside it proxy generation is a ParallelFor over shards,
each shard on its own GPU pod drawing a disjoint block of image indices (and so of seeds);
the student and the evaluation take the collected datasets.

Scheduling on Kubernetes (ignored by `kfp.local`, compiled into the YAML):
- GPU steps request one `nvidia.com/gpu`, tolerate the GPU node pool's taint, mount a
  memory-backed /dev/shm for data loaders, retry twice (stages resume from the object
  store) and time out after a day. CPU steps carry no toleration, so they stay off
  tainted GPU nodes.
- Endpoints come from the ConfigMap `proxytune-config`, keys from the Secret
  `proxytune-s3`; the compiled YAML names them and holds no value of either.
- `register` is never cached: each run registers a version.
"""

from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Dataset, Metrics, Model

from components import (
    evaluate,
    generate_proxy,
    ingest,
    merge_proxy,
    plan,
    proxy_shards,
    register,
    tune_student,
    tune_supervisor,
)

PIPELINE_NAME = "proxy-tuning"
CONFIG_MAP = "proxytune-config"
CONFIG_ENV = {
    "s3-endpoint-url": "PROXYTUNE_S3_ENDPOINT_URL",
    "s3-bucket": "PROXYTUNE_S3_BUCKET",
    "mlflow-tracking-uri": "MLFLOW_TRACKING_URI",
}
S3_SECRET = "proxytune-s3"
SECRET_ENV = {"access-key": "AWS_ACCESS_KEY_ID", "secret-key": "AWS_SECRET_ACCESS_KEY"}
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TIMEOUT_S = 24 * 3600
CPU_TIMEOUT_S = 3600


class Outputs(NamedTuple):
    registration: str
    metrics: Metrics
    report: HTML


def _platform(task: dsl.PipelineTask, gpu: bool) -> dsl.PipelineTask:
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, CONFIG_ENV)
    kubernetes.use_secret_as_env(task, S3_SECRET, SECRET_ENV)
    if gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
        task.set_retry(num_retries=2, backoff_duration="60s")
    kubernetes.set_timeout(task, GPU_TIMEOUT_S if gpu else CPU_TIMEOUT_S)
    return task


class SubjectOutputs(NamedTuple):
    subject: Dataset
    supervisor: Model
    proxy: Dataset


def build(parallelism: int | None = None):
    """The pipeline. `parallelism` caps how many subjects, and proxy shards per subject, run at
    once: None lets the cluster schedule them all; `run_local` builds it with 1, so one box
    runs them in turn (KFP fixes loop parallelism when the pipeline is defined)."""

    @dsl.pipeline(name=f"{PIPELINE_NAME}-subject", description="One subject: photos, supervisor, proxy data.")
    def subject_stages(
        planned: dict, preset: str, overrides: dict, mlflow_tracking_uri: str, mlflow_experiment: str
    ) -> SubjectOutputs:
        tracking = _tracking(mlflow_tracking_uri, mlflow_experiment)
        run = {"preset": preset, "overrides": overrides, **tracking}
        subject = ingest(planned=planned, **tracking)
        supervisor = tune_supervisor(subject=subject.outputs["subject"], **run)
        shards = proxy_shards(planned=planned, preset=preset, overrides=overrides)
        with dsl.ParallelFor(shards.output, parallelism=parallelism) as shard:
            part = generate_proxy(supervisor=supervisor.outputs["supervisor"], shard=shard, **run)
        proxy = merge_proxy(
            parts=dsl.Collected(part.outputs["proxy"]), subject=subject.outputs["subject"], **run
        )
        for task in (subject, shards, proxy):
            _platform(task, gpu=False)
        for task in (supervisor, part):
            _platform(task, gpu=True)
        return SubjectOutputs(
            subject=subject.outputs["subject"],
            supervisor=supervisor.outputs["supervisor"],
            proxy=proxy.outputs["proxy"],
        )

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Proxy-Tuning: DreamBooth-LoRA a diffusion supervisor on a subject, generate proxy "
        "images, LoRA-tune an AR student on them, evaluate both and register the student in MLflow.",
    )
    def proxy_tuning(
        subject_uri: str,
        class_noun: str,
        subject_name: str = "",
        identifier: str = "sks",
        proxy_uri: str = "",
        extra_subjects: list = [],  # noqa: B006 (KFP needs a literal default)
        preset: str = "tiny",
        overrides: dict = {},  # noqa: B006 (KFP needs a literal default)
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "proxytune",
        registered_model_name: str = "",
    ) -> Outputs:
        tracking = _tracking(mlflow_tracking_uri, mlflow_experiment)
        run = {"preset": preset, "overrides": overrides, **tracking}
        subjects = plan(
            subject_uri=subject_uri,
            class_noun=class_noun,
            subject_name=subject_name,
            identifier=identifier,
            proxy_uri=proxy_uri,
            extra_subjects=extra_subjects,
            preset=preset,
            overrides=overrides,
            **tracking,
        )
        with dsl.ParallelFor(subjects.output, parallelism=parallelism) as planned:
            stages = subject_stages(
                planned=planned,
                preset=preset,
                overrides=overrides,
                mlflow_tracking_uri=mlflow_tracking_uri,
                mlflow_experiment=mlflow_experiment,
            )
        student = tune_student(proxies=dsl.Collected(stages.outputs["proxy"]), **run)
        scores = evaluate(
            subjects=dsl.Collected(stages.outputs["subject"]),
            supervisors=dsl.Collected(stages.outputs["supervisor"]),
            student=student.outputs["student"],
            **run,
        )
        registration = register(
            student=student.outputs["student"],
            samples=scores.outputs["samples"],
            registered_model_name=registered_model_name,
            **tracking,
        ).set_caching_options(False)
        for task in (subjects, registration):
            _platform(task, gpu=False)
        for task in (student, scores):
            _platform(task, gpu=True)
        return Outputs(
            registration=registration.output,
            metrics=scores.outputs["metrics"],
            report=scores.outputs["report"],
        )

    return proxy_tuning


def _tracking(mlflow_tracking_uri: str, mlflow_experiment: str) -> dict:
    return {
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "mlflow_experiment": mlflow_experiment,
        "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "kfp_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    }


proxy_tuning = build()


def compile_pipeline(path: str) -> str:
    compiler.Compiler().compile(proxy_tuning, package_path=path)
    return path
