"""Checkpoints and resume of the LoRA training loop (supervisor and student share it)."""

import pytest
import torch
from mlflow import MlflowClient

from proxytune.core.contracts import read_adapter_card
from proxytune.core.storage import LocalStore
from proxytune.core.tracking import TrackingContext, stage_run
from proxytune.stages.supervisor import tune_supervisor
from proxytune.stages.training import Checkpoints, train_lora
from tests.conftest import CPU

STEPS = 20


class Failure(RuntimeError):
    """What the injected failure raises (a pre-empted node, an OOM...)."""


def toy_problem(fail_at: int | None = None):
    """A small regression whose batches come from the training generator; raises at `fail_at`."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    target = torch.nn.Linear(6, 3)
    calls = []

    def batch_loss(generator):
        calls.append(1)
        if len(calls) == fail_at:
            raise Failure(f"injected at call {fail_at}")
        x = torch.randn(8, 6, generator=generator)
        with torch.no_grad():
            y = target(x)
        yield torch.nn.functional.mse_loss(layer(x), y), 1.0

    return list(layer.parameters()), batch_loss


class Recorder:
    """A tracker that remembers every logged loss by step."""

    def __init__(self):
        self.losses = []

    def log_metric(self, key, value, step=None):
        if key == "train_loss":
            self.losses.append((step, value))


def train(parameters, batch_loss, checkpoints=None, tracker=None):
    return train_lora(
        parameters,
        batch_loss,
        steps=STEPS,
        learning_rate=0.05,
        warmup_steps=4,
        max_grad_norm=1.0,
        seed=3,
        tracker=tracker or Recorder(),
        desc="toy",
        checkpoints=checkpoints,
    )


def test_a_killed_run_resumes_from_its_last_checkpoint_and_ends_where_an_uninterrupted_one_does(tmp_path):
    parameters, batch_loss = toy_problem()
    expected = train(parameters, batch_loss)
    final = [p.detach().clone() for p in parameters]

    checkpoints = Checkpoints(LocalStore(tmp_path), "run", every=5, keep=2)
    parameters, batch_loss = toy_problem(fail_at=13)
    with pytest.raises(Failure):
        train(parameters, batch_loss, checkpoints)
    assert checkpoints.latest()[1]["step"] == 10

    parameters, batch_loss = toy_problem()  # a new pod: fresh weights and optimizer
    recorder = Recorder()
    resumed = train(parameters, batch_loss, checkpoints, recorder)
    assert resumed == pytest.approx(expected, rel=1e-6)
    for a, b in zip(parameters, final, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert [step for step, _ in recorder.losses] == list(range(STEPS))  # one whole curve
    folders = sorted({k.split("/")[2] for k in LocalStore(tmp_path).list("checkpoints/run/") if "step-" in k})
    assert folders == ["step-0000010", "step-0000015"]  # the newest two


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    store = LocalStore(tmp_path)
    checkpoints = Checkpoints(store, "run", every=5, keep=2)
    parameters, batch_loss = toy_problem(fail_at=8)
    with pytest.raises(Failure):
        train(parameters, batch_loss, checkpoints)
    store.put_bytes("checkpoints/run/step-0000010/state.safetensors", b"partial upload")  # no pointer yet
    assert checkpoints.latest()[1]["step"] == 5


def test_the_supervisor_step_resumes_with_one_loss_curve_in_mlflow(
    subject_dir, params, tmp_path, sqlite_tracking, monkeypatch
):
    """A KFP retry: same inputs, new pod, new MLflow child run under the same pipeline run."""
    from proxytune.backends.stable_diffusion import StableDiffusionSupervisor

    settings = params.supervisor.model_copy(update={"steps": 12, "checkpoint_every": 4})
    store = LocalStore(tmp_path / "store")
    context = TrackingContext(experiment="resume", kfp_run_id="retried-run")
    original = StableDiffusionSupervisor.training_loss
    calls = []

    def preempted(self, *args):
        calls.append(1)
        if len(calls) == 8 + 10:  # 8 evaluation draws before training, then the 10th step
            raise Failure("node pre-empted")
        return original(self, *args)

    monkeypatch.setattr(StableDiffusionSupervisor, "training_loss", preempted)
    with pytest.raises(Failure), stage_run(context, "tune_supervisor") as tracker:
        tune_supervisor(subject_dir, tmp_path / "first", settings, tracker, CPU, store)
    monkeypatch.setattr(StableDiffusionSupervisor, "training_loss", original)
    with stage_run(context, "tune_supervisor") as tracker:
        card = tune_supervisor(subject_dir, tmp_path / "retry", settings, tracker, CPU, store)
        run_id = tracker.run_id
    assert card.steps_done == len(card.losses) == 12
    history = MlflowClient(sqlite_tracking).get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(12))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(card.losses)
    assert read_adapter_card(tmp_path / "retry", "supervisor").steps_done == 12
