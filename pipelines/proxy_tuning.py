"""The Proxy-Tuning pipeline: plan -> per subject (ingest -> tune_supervisor -> generate_proxy
in `proxy.shards` parts -> merge_proxy) -> tune_student on all proxy datasets (and, beside it,
tune_direct: the direct-tuning baseline on the photos, when `evaluation.methods` lists direct)
-> evaluate -> register.

One subject is the usual run (the Kubeflow UI asks for its URI and class noun);
`extra_subjects` adds more, each `{"uri", "class_noun", "name"?, "identifier"?, "proxy_uri"?}`,
for a multi-subject student. `proxy_uri` (a folder or `s3://` prefix of images of the subject
made by any other supervisor) imports the proxy set instead of drawing it: `tune_supervisor`
then only records the black box, and one `generate_proxy` task imports the images.

`plan` validates everything before any GPU step. The per-subject stages are a sub-pipeline
in a ParallelFor over subjects, and inside it proxy generation is a ParallelFor over shards,
each shard on its own GPU pod drawing a disjoint block of image indices (and so of seeds);
the student and the evaluation take the collected datasets.

Scheduling on Kubernetes (`pipelines.cluster.ClusterOptions`, ignored by `kfp.local`,
compiled into the YAML): every step has CPU and memory requests and limits and the label the
NetworkPolicies admit; GPU steps request GPUs on the GPU pool (node selector, toleration),
mount a memory-backed /dev/shm and retry with backoff (stages resume from the object store);
steps that load models mount the model-cache PVC; endpoints come from the ConfigMap
`proxytune-config` and keys from the Secret `proxytune-s3`, by name only; `register` is never
cached: each run registers a version.
"""

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import HTML, Dataset, Metrics, Model

from components import (
    aggregate,
    evaluate,
    generate_proxy,
    ingest,
    merge_proxy,
    plan,
    plan_bench,
    proxy_shards,
    register,
    tune_direct,
    tune_student,
    tune_supervisor,
)
from pipelines.cluster import ClusterOptions, schedule
from proxytune.core.fsutil import replacing
from proxytune.stages.dreambench import BENCH_METHODS

PIPELINE_NAME = "proxy-tuning"
CODE_ENV = "PROXYTUNE_CODE"
BENCH_NAME = "dreambench"


class Outputs(NamedTuple):
    registration: str
    metrics: Metrics
    report: HTML
    student: Model
    samples: Dataset


class SubjectOutputs(NamedTuple):
    subject: Dataset
    supervisor: Model
    proxy: Dataset


class ProtocolOutputs(NamedTuple):
    student: Model
    samples: Dataset
    metrics: Metrics
    report: HTML


class BenchOutputs(NamedTuple):
    bench: Dataset
    metrics: Metrics
    report: HTML


def _placer(
    cluster: ClusterOptions | None, local_code: str
) -> Callable[[dsl.PipelineTask], dsl.PipelineTask]:
    """How each task is placed: `pipelines.cluster.schedule`. For a local run, `local_code` (a
    digest of the installed proxytune) goes into every task's environment, which kfp.local's
    cache keys on, so changed code never reuses old outputs; and no step is retried: on one
    machine a failure repeats, where a cluster's retries ride out preempted pods."""
    cluster = cluster or ClusterOptions()

    def place(task: dsl.PipelineTask) -> dsl.PipelineTask:
        schedule(task, cluster)
        if local_code:
            task.set_env_variable(CODE_ENV, local_code).set_retry(num_retries=0)
        return task

    return place


def _protocol(parallelism: int | None, place: Callable[[dsl.PipelineTask], dsl.PipelineTask]):
    """The Proxy-Tuning protocol on a list of planned subjects, as a sub-pipeline: each subject's
    stages in a ParallelFor (inside it, proxy generation in a ParallelFor over shards), then one
    student on all proxy datasets, the direct baseline beside it, and the evaluation. The
    `proxy-tuning` pipeline runs it once on all subjects (one multi-subject student);
    `dreambench` runs it once per subject."""

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
        for task in (subject, supervisor, shards, part, proxy):
            place(task)
        return SubjectOutputs(
            subject=subject.outputs["subject"],
            supervisor=supervisor.outputs["supervisor"],
            proxy=proxy.outputs["proxy"],
        )

    @dsl.pipeline(
        name=f"{PIPELINE_NAME}-protocol", description="Subjects -> one student, its baseline, the evaluation."
    )
    def protocol(
        subjects: list, preset: str, overrides: dict, mlflow_tracking_uri: str, mlflow_experiment: str
    ) -> ProtocolOutputs:
        run = {"preset": preset, "overrides": overrides, **_tracking(mlflow_tracking_uri, mlflow_experiment)}
        with dsl.ParallelFor(subjects, parallelism=parallelism) as planned:
            stages = subject_stages(
                planned=planned,
                preset=preset,
                overrides=overrides,
                mlflow_tracking_uri=mlflow_tracking_uri,
                mlflow_experiment=mlflow_experiment,
            )
        student = tune_student(proxies=dsl.Collected(stages.outputs["proxy"]), **run)
        direct = tune_direct(subjects=dsl.Collected(stages.outputs["subject"]), **run)
        if parallelism == 1:
            direct.after(student)  # one model step at a time: a ReadWriteOnce cache is on one node
        scores = evaluate(
            subjects=dsl.Collected(stages.outputs["subject"]),
            supervisors=dsl.Collected(stages.outputs["supervisor"]),
            student=student.outputs["student"],
            direct=direct.outputs["direct"],
            **run,
        )
        for task in (student, direct, scores):
            place(task)
        return ProtocolOutputs(
            student=student.outputs["student"],
            samples=scores.outputs["samples"],
            metrics=scores.outputs["metrics"],
            report=scores.outputs["report"],
        )

    return protocol


def build(parallelism: int | None = None, cluster: ClusterOptions | None = None, local_code: str = ""):
    """The pipeline. `parallelism` caps how many subjects, and proxy shards per subject, run at
    once: None lets the cluster schedule them all; `run_local` builds it with 1, so one box
    runs them in turn (KFP fixes loop parallelism and pod specs when the pipeline is defined).
    `cluster`: how the pods are scheduled (defaults: `ClusterOptions()`); `local_code`: see `_placer`."""
    place = _placer(cluster, local_code)
    protocol = _protocol(parallelism, place)

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
        """Proxy-Tuning of one subject (or several, for one multi-subject student).

        Args:
            subject_uri: s3://bucket/prefix holding 3-6 photos of the subject.
            class_noun: What the subject is, e.g. dog, backpack, teapot.
            subject_name: Name of the subject in datasets, reports and the registry
                (default: the prefix's last part).
            identifier: Rare token that calls the subject up in prompts, e.g. sks.
            proxy_uri: Optional s3:// prefix of ready-made images of the subject (any
                supervisor): imported instead of tuning one.
            extra_subjects: More subjects for one student: a list of {"uri", "class_noun",
                "name"?, "identifier"?, "proxy_uri"?}.
            preset: tiny (CPU smoke test), small (one 24 GB GPU) or paper (the paper's setting).
            overrides: Parameter overrides, e.g. {"student.steps": 500, "proxy.shards": 4}.
            mlflow_tracking_uri: MLflow server (default: the proxytune-config ConfigMap's).
            mlflow_experiment: MLflow experiment of the run.
            registered_model_name: Registered model of the student (default: proxytune-<subject>).
        """
        tracking = _tracking(mlflow_tracking_uri, mlflow_experiment)
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
        evaluated = protocol(
            subjects=subjects.output,
            preset=preset,
            overrides=overrides,
            mlflow_tracking_uri=mlflow_tracking_uri,
            mlflow_experiment=mlflow_experiment,
        )
        registration = register(
            student=evaluated.outputs["student"],
            samples=evaluated.outputs["samples"],
            registered_model_name=registered_model_name,
            preset=preset,
            overrides=overrides,
            **tracking,
        ).set_caching_options(False)
        for task in (subjects, registration):
            place(task)
        return Outputs(
            registration=registration.output,
            metrics=evaluated.outputs["metrics"],
            report=evaluated.outputs["report"],
            student=evaluated.outputs["student"],
            samples=evaluated.outputs["samples"],
        )

    return proxy_tuning


def build_dreambench(
    parallelism: int | None = None, cluster: ClusterOptions | None = None, local_code: str = ""
):
    """The DreamBench-wide pipeline: the protocol once per subject of a DreamBench-layout
    dataset (a ParallelFor over subjects, each its own student and baseline), then one table of
    the paper's means with per-subject rows. Nothing is registered: it measures the method."""
    place = _placer(cluster, local_code)
    protocol = _protocol(parallelism, place)

    @dsl.pipeline(
        name=BENCH_NAME,
        description="Proxy-Tuning over every subject of a DreamBench-layout dataset: student, supervisor "
        "and direct baseline per subject, and the mean table.",
    )
    def dreambench(
        dataset_uri: str,
        subjects: str = "",
        preset: str = "tiny",
        overrides: dict = {"evaluation.methods": BENCH_METHODS},  # noqa: B006 (KFP needs a literal default)
        mlflow_tracking_uri: str = "",
        mlflow_experiment: str = "proxytune-dreambench",
    ) -> BenchOutputs:
        """DreamBench-wide evaluation.

        Args:
            dataset_uri: s3://bucket/prefix (or folder) with one folder of photos per subject and
                prompts_and_classes.txt ("subject_name,class" lines).
            subjects: Comma-separated subjects to run (default: every subject with a folder).
            preset: tiny (CPU smoke test), small (one 24 GB GPU) or paper (the paper's setting).
            overrides: Parameter overrides (default: the methods student, supervisor, direct).
            mlflow_tracking_uri: MLflow server (default: the proxytune-config ConfigMap's).
            mlflow_experiment: MLflow experiment of the run.
        """
        tracking = _tracking(mlflow_tracking_uri, mlflow_experiment)
        groups = plan_bench(
            dataset_uri=dataset_uri, subjects=subjects, preset=preset, overrides=overrides, **tracking
        )
        with dsl.ParallelFor(groups.output, parallelism=parallelism) as group:
            evaluated = protocol(
                subjects=group,
                preset=preset,
                overrides=overrides,
                mlflow_tracking_uri=mlflow_tracking_uri,
                mlflow_experiment=mlflow_experiment,
            )
        table = aggregate(
            evaluations=dsl.Collected(evaluated.outputs["samples"]),
            preset=preset,
            overrides=overrides,
            **tracking,
        )
        for task in (groups, table):
            place(task)
        return BenchOutputs(
            bench=table.outputs["bench"], metrics=table.outputs["metrics"], report=table.outputs["report"]
        )

    return dreambench


def _tracking(mlflow_tracking_uri: str, mlflow_experiment: str) -> dict:
    return {
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "mlflow_experiment": mlflow_experiment,
        "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "kfp_run_name": dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
    }


proxy_tuning = build()


def compile_pipeline(path: str, cluster: ClusterOptions | None = None, name: str = PIPELINE_NAME) -> str:
    """Compile `name` (proxy-tuning or dreambench) to KFP YAML at `path`."""
    builders = {PIPELINE_NAME: build, BENCH_NAME: build_dreambench}
    if name not in builders:
        raise ValueError(f"unknown pipeline {name!r}; choose from {', '.join(builders)}")
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {path}: folder {folder} does not exist")
    cluster = cluster or ClusterOptions()
    with replacing(path, suffix=Path(path).suffix) as tmp:  # a half-written file never replaces a good one
        pipeline = builders[name](parallelism=cluster.loop_parallelism, cluster=cluster)
        compiler.Compiler().compile(pipeline, package_path=str(tmp))
    return path
