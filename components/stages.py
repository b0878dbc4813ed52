"""The KFP components: one thin adapter per stage, from artifacts and parameters to one
call of `proxytune.stages.steps`, the only module they import. No ML logic lives here;
dependencies come from the image.

Every component takes the MLflow location and the KFP run id/name, so each stage logs a
child run under the pipeline run's parent run.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from components.base import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan(
    subject_uri: str,
    class_noun: str,
    subject_name: str,
    identifier: str,
    proxy_uri: str,
    extra_subjects: list,
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
) -> list:
    """Validate the run's parameters and subjects before any GPU step; returns the subjects."""
    from proxytune.stages.steps import TrackingContext, plan_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    first = {
        "uri": subject_uri,
        "class_noun": class_noun,
        "name": subject_name,
        "identifier": identifier,
        "proxy_uri": proxy_uri,
    }
    return plan_step([first, *extra_subjects], preset, overrides, tracking)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def plan_bench(
    dataset_uri: str,
    subjects: str,
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
) -> list:
    """Validate a DreamBench-wide run; returns one single-subject group per subject."""
    from proxytune.stages.steps import TrackingContext, plan_bench_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    return plan_bench_step(dataset_uri, subjects, preset, overrides, tracking)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def ingest(
    planned: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    subject: Output[Dataset],
):
    """One planned subject's photos (s3://bucket/prefix or a folder) -> subject Dataset."""
    from proxytune.stages.steps import TrackingContext, ingest_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    subject.metadata.update(ingest_step(planned, subject.path, tracking))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def tune_supervisor(
    subject: Input[Dataset],
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    supervisor: Output[Model],
):
    """DreamBooth-LoRA of the diffusion supervisor on the subject photos."""
    from proxytune.stages.steps import TrackingContext, tune_supervisor_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    supervisor.metadata.update(
        tune_supervisor_step(subject.path, supervisor.path, preset, overrides, tracking)
    )


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def proxy_shards(planned: dict, preset: str, overrides: dict) -> list:
    """The proxy generation shards to fan out over: [0, ..., proxy.shards - 1] ([0]: an import)."""
    from proxytune.stages.steps import proxy_shards_step

    return proxy_shards_step(planned, preset, overrides)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def generate_proxy(
    supervisor: Input[Model],
    shard: int,
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    proxy: Output[Dataset],
):
    """The tuned supervisor draws one shard of the proxy Dataset (resumable, reused by content key)."""
    from proxytune.stages.steps import TrackingContext, generate_proxy_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    proxy.metadata.update(
        generate_proxy_step(supervisor.path, proxy.path, shard, preset, overrides, tracking)
    )


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def merge_proxy(
    parts: Input[list[Dataset]],
    subject: Input[Dataset],
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    proxy: Output[Dataset],
):
    """The shards of a proxy Dataset joined into one, as an unsharded run draws it (optionally
    only the images most like the subject's photos)."""
    from proxytune.stages.steps import TrackingContext, merge_proxy_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    paths = [part.path for part in parts]
    proxy.metadata.update(merge_proxy_step(paths, proxy.path, subject.path, preset, overrides, tracking))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def tune_student(
    proxies: Input[list[Dataset]],
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    student: Output[Model],
):
    """LoRA of the AR student on the proxy Datasets only (one per subject: a joint student)."""
    from proxytune.stages.steps import TrackingContext, tune_student_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    paths = [proxy.path for proxy in proxies]
    student.metadata.update(tune_student_step(paths, student.path, preset, overrides, tracking))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def tune_direct(
    subjects: Input[list[Dataset]],
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    direct: Output[Model],
):
    """The direct-tuning baseline (the student's LoRA on the real photos) when
    evaluation.methods lists direct; returns at once otherwise."""
    from proxytune.stages.steps import TrackingContext, tune_direct_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    paths = [subject.path for subject in subjects]
    direct.metadata.update(tune_direct_step(paths, direct.path, preset, overrides, tracking))


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def evaluate(
    subjects: Input[list[Dataset]],
    supervisors: Input[list[Model]],
    student: Input[Model],
    direct: Input[Model],
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    table: Output[Markdown],
    samples: Output[Dataset],
):
    """CLIP-I / CLIP-T / DINO of the student and the other methods of evaluation.methods on
    DreamBench prompts, with an HTML report and the comparison table as Markdown."""
    from proxytune.stages.steps import TrackingContext, evaluate_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    scores = evaluate_step(
        [s.path for s in subjects],
        [s.path for s in supervisors],
        student.path,
        direct.path,
        samples.path,
        report.path,
        table.path,
        metrics.path,
        preset,
        overrides,
        tracking,
    )
    for name, value in scores.items():
        metrics.log_metric(name, value)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register(
    student: Input[Model],
    samples: Input[Dataset],
    registered_model_name: str,
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
) -> str:
    """Register the student in MLflow (alias challenger; champion if the gate passes); returns JSON."""
    from proxytune.stages.steps import TrackingContext, register_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    return register_step(student.path, samples.path, registered_model_name, preset, overrides, tracking)


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def aggregate(
    evaluations: Input[list[Dataset]],
    preset: str,
    overrides: dict,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
    kfp_run_id: str,
    kfp_run_name: str,
    metrics: Output[Metrics],
    report: Output[HTML],
    table: Output[Markdown],
    bench: Output[Dataset],
):
    """The DreamBench-wide table: per-method means over subjects and per-subject rows."""
    from proxytune.stages.steps import TrackingContext, aggregate_step

    tracking = TrackingContext(mlflow_tracking_uri, mlflow_experiment, kfp_run_id, kfp_run_name)
    paths = [evaluation.path for evaluation in evaluations]
    for name, value in aggregate_step(
        paths, bench.path, report.path, table.path, metrics.path, tracking
    ).items():
        metrics.log_metric(name, value)
