"""Run configs: one YAML file for `run --local --config`, `submit` and `schedule`; a bad file
fails before anything runs, with the file and the key in the message."""

import json
import textwrap

import pytest

from proxytune.cli import main
from proxytune.core.config import RunParams
from proxytune.ops.local import run_local
from proxytune.ops.runconfig import load_run_config
from proxytune.stages.ingest import plan_subjects
from tests.conftest import EXAMPLE, REPO, s3_bucket
from tests.kfp_fake import serve_kubeflow


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def write(folder, text: str, name: str = "rex.yaml"):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_example_config_runs_the_example_subject():
    config = load_run_config(REPO / "examples" / "run-config.yaml")
    arguments = config.pipeline_arguments()
    assert arguments["subject_uri"] == str(EXAMPLE) and arguments["class_noun"] == "dog"
    assert arguments["registered_model_name"] == "proxytune-dog" and arguments["extra_subjects"] == []
    assert RunParams.resolve(arguments["preset"], arguments["overrides"]).proxy.num_images == 16


REX = "subjects: [{uri: s3://photos/rex, class_noun: dog}]\n"


@pytest.mark.parametrize(
    ("text", "messages"),
    [
        (REX + "presett: small\n", ["rex.yaml: unknown key 'presett' (known: subjects, preset,"]),
        (
            "subjects: [{uri: s3://photos/rex, clas_noun: dog}]\n",
            [
                "rex.yaml: subjects[0]: unknown key 'clas_noun'",
                "rex.yaml: subjects[0].class_noun: Field required",
            ],
        ),
        ("subjects: [{uri: s3://photos/rex}]\n", ["rex.yaml: subjects[0].class_noun: Field required"]),
        ("preset: tiny\n", ["rex.yaml: subjects: Field required"]),
        ("subjects: []\n", ["rex.yaml: subjects: List should have at least 1 item"]),
        ("subjects: s3://photos/rex\n", ["rex.yaml: subjects: Input should be a valid list"]),
        (
            "subjects: [{uri: s3://photos/rex, class_noun: 7}]\n",
            ["subjects[0].class_noun: Input should be a valid string"],
        ),
        (REX + "preset: 3\n", ["rex.yaml: preset: Input should be a valid string"]),
        (REX + "overrides: [student.steps=5]\n", ["rex.yaml: overrides: Input should be a valid dictionary"]),
        (REX + "preset: huge\n", ["rex.yaml: preset: unknown preset 'huge'; available: paper, small, tiny"]),
        (
            REX + "overrides: {student.steps: -1}\n",
            ["rex.yaml: overrides: ", "student.steps: Input should be greater than 0"],
        ),
        (REX + "overrides: {student.stepz: 5}\n", ["rex.yaml: overrides: ", "student.stepz: Extra inputs"]),
        (
            "subjects: [{uri: s3://photos/rex, class_noun: dog, identifier: s k s}]\n",
            ["rex.yaml: subjects[0]: invalid subject", "identifier 's k s' must be one word"],
        ),
        (
            "subjects: [{uri: s3://a/rex, class_noun: dog}, {uri: s3://b/rex, class_noun: dog}]\n",
            ["rex.yaml: subjects: subjects must have distinct names; rex is used twice"],
        ),
        ("- s3://photos/rex\n", ["rex.yaml: a run config is a mapping with the keys subjects, preset,"]),
        ("subjects: [\n", ["rex.yaml: not valid YAML (line 2, column 1)"]),
    ],
)
def test_a_bad_config_fails_before_anything_runs_naming_the_file_and_key(tmp_path, capsys, text, messages):
    config = write(tmp_path, text)
    workdir = tmp_path / "work"
    assert main(["run", "--local", "--config", str(config), "--workdir", str(workdir)]) == 2
    out = capsys.readouterr().out
    assert all(m in out for m in messages), out
    assert not workdir.exists()
    with serve_kubeflow() as (host, api):  # submit reads the same file the same way, and sends nothing
        assert main(["submit", "--host", host, "--config", str(config)]) == 2
        out = capsys.readouterr().out
        assert all(m in out for m in messages), out
        assert api.requests == []


def test_a_missing_config_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--local", "--config", str(tmp_path / "rex.yaml")]) == 2
    assert f"run config {tmp_path / 'rex.yaml'} does not exist" in capsys.readouterr().out


def test_relative_folders_are_relative_to_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where the file is
    folder = tmp_path / "subjects" / "rex"
    folder.mkdir(parents=True)
    config = write(
        folder,
        """\
        subjects:
          - {uri: photos, class_noun: dog, proxy_uri: ../renders}
          - {uri: s3://photos/bella, class_noun: dog, proxy_uri: s3://renders/bella}
        """,
        "run.yaml",
    )
    first, second = load_run_config(config).pipeline_subjects()
    assert (first["uri"], first["proxy_uri"]) == (
        str(folder / "photos"),
        str(tmp_path / "subjects" / "renders"),
    )
    assert (second["uri"], second["proxy_uri"]) == ("s3://photos/bella", "s3://renders/bella")


@pytest.fixture
def requests(monkeypatch):
    """The requests `run` hands the supervised runner (`run_local`'s arguments), instead of
    running the pipeline; the photos and servers are not checked."""
    sent = []
    monkeypatch.setattr("proxytune.ops.local.check_run", lambda config: None)
    monkeypatch.setattr("proxytune.ops.runner.check_servers", lambda tracking_uri: None)

    def supervised(request, workdir, tracking_uri, console, verbose=False):
        sent.append(request)
        return "succeeded", {}

    monkeypatch.setattr("proxytune.ops.runner.run_supervised", supervised)
    monkeypatch.setattr("proxytune.cli.runs._print_summary", lambda summary: None)
    return sent


def settings(request: dict) -> tuple[list[dict], dict]:
    """A request's subjects, and the run's settings."""
    keys = ("preset", "overrides", "experiment", "registered_model_name")
    return request["subjects"], {k: request[k] for k in keys}


def test_flags_override_the_file(tmp_path, requests):
    config = write(
        tmp_path,
        """\
        subjects: [{uri: s3://photos/rex, class_noun: dog}]
        preset: small
        overrides: {student.steps: 5, proxy.num_images: 8}
        registered_model_name: rex-model
        experiment: rex
        """,
    )
    run = ["run", "--local", "--config", str(config)]
    assert main(run) == 0
    assert settings(requests.pop()) == (
        [{"uri": "s3://photos/rex", "class_noun": "dog"}],
        {
            "preset": "small",
            "overrides": {"student.steps": 5, "proxy.num_images": 8},
            "experiment": "rex",
            "registered_model_name": "rex-model",
        },
    )
    flags = ["--preset", "tiny", "--set", "student.steps=7", "--model-name", "m", "--experiment", "e"]
    flags += ["--subject", "s3://photos/bella", "--class-noun", "cat", "--identifier", "ohwx"]
    assert main([*run, *flags]) == 0
    assert settings(requests.pop()) == (
        [{"uri": "s3://photos/bella", "class_noun": "cat", "identifier": "ohwx"}],
        {
            "preset": "tiny",
            "overrides": {"student.steps": 7, "proxy.num_images": 8},  # merged, the flag's value wins
            "experiment": "e",
            "registered_model_name": "m",
        },
    )


def test_a_flag_that_breaks_the_config_names_both(tmp_path, requests, capsys):
    config = write(tmp_path, REX)
    assert main(["run", "--local", "--config", str(config), "--set", "student.steps=-1"]) == 2
    out = capsys.readouterr().out
    assert "rex.yaml with the command-line flags: overrides: " in out and "student.steps: Input should" in out
    assert main(["run", "--local", "--config", str(config), "--class-noun", "cat"]) == 2
    assert (
        "--class-noun describe --subject: with --config, give the subjects in full" in capsys.readouterr().out
    )
    assert requests == []


@pytest.mark.servers
def test_one_file_gives_the_same_run_locally_and_on_a_cluster(tmp_path, s3_env, monkeypatch, requests):
    """`run --local` (stopped where it would start the pipeline) and `submit` (the run-create
    request the fake Kubeflow receives) pass the same arguments, so the same parameters and
    subjects."""
    photos = s3_bucket(s3_env, "photos")
    for subject in ("rex", "bella"):
        for image in sorted(EXAMPLE.glob("*.jpg"))[:3]:
            photos.fput_object("photos", f"{subject}/{image.name}", str(image))
    config = write(
        tmp_path,
        """\
        subjects:
          - {uri: s3://photos/rex, class_noun: dog}
          - {uri: s3://photos/bella, class_noun: dog, identifier: ohwx}
        preset: small
        overrides: {student.steps: 3, proxy: {shards: 2}, evaluation.student_sampling: {top_k: 0}}
        experiment: same-both-ways
        """,
    )
    sent_locally = {}

    def build(parallelism=None, cluster=None, local_code=""):
        def pipeline(**arguments):
            sent_locally.update(arguments)
            raise RuntimeError("stopped before the first task")

        return pipeline

    monkeypatch.setenv("HOME", str(tmp_path))  # no kfp context file of the user's
    with monkeypatch.context() as patched:
        patched.setattr("pipelines.proxy_tuning.build", build)
        assert main(["run", "--local", "--config", str(config), "--workdir", str(tmp_path / "work")]) == 0
        (request,) = requests  # what the runner's child process hands run_local
        with pytest.raises(RuntimeError, match="stopped before the first task"):
            run_local(**request)
    with serve_kubeflow() as (host, api):
        assert main(["submit", "--host", host, "--config", str(config)]) == 0
    (run,) = api.runs
    sent = run["runtime_config"]["parameters"]
    assert sent == json.loads(json.dumps(sent_locally))
    assert RunParams.resolve(sent["preset"], sent["overrides"]) == RunParams.resolve(
        sent_locally["preset"], sent_locally["overrides"]
    )
    assert RunParams.resolve(sent["preset"], sent["overrides"]).proxy.shards == 2

    def planned(arguments):
        first = {
            "uri": arguments["subject_uri"],
            "class_noun": arguments["class_noun"],
            "name": arguments["subject_name"],
            "identifier": arguments["identifier"],
            "proxy_uri": arguments["proxy_uri"],
        }
        return plan_subjects([first, *arguments["extra_subjects"]])

    assert planned(sent) == planned(sent_locally)
    assert [(p["name"], p["identifier"]) for p in planned(sent)] == [("rex", "sks"), ("bella", "ohwx")]
