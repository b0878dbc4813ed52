"""DreamBench-wide mode: the dataset layout, the aggregate table, the compiled `dreambench`
pipeline and a whole local bench over the example dataset (cat2 and dog)."""

import json
import re

import pytest
import yaml

from proxytune.analysis.bench import aggregate
from proxytune.cli import main
from proxytune.stages.dreambench import bench_subjects, read_classes
from tests.conftest import REPO

DATASET = REPO / "examples" / "subjects"
QUICK = [
    "--set=supervisor.steps=4",
    "--set=proxy.num_images=4",
    "--set=student.steps=4",
    "--set=evaluation.num_prompts=1",
    "--set=evaluation.images_per_prompt=1",
    "--set=evaluation.variance_samples=0",
    "--set=evaluation.supervisor_inference_steps=2",
]


def test_the_example_folder_is_a_dreambench_dataset_with_two_of_its_subjects():
    subjects = bench_subjects(str(DATASET))
    assert [(s["name"], s["class_noun"], s["identifier"]) for s in subjects] == [
        ("cat2", "cat", "sks"),
        ("dog", "dog", "sks"),
    ]
    assert subjects[1]["source_uri"] == str(DATASET / "dog")
    assert [s["name"] for s in bench_subjects(str(DATASET), ["dog"])] == ["dog"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["poodle"], "poodle: not listed in prompts_and_classes.txt"),
        (["teapot"], "teapot: listed in prompts_and_classes.txt but no photo folder"),
    ],
)
def test_subjects_not_listed_or_without_photos_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        bench_subjects(str(DATASET), names)


def test_a_folder_without_the_class_list_is_refused(tmp_path):
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match=r"has no prompts_and_classes\.txt"):
        bench_subjects(str(tmp_path))
    assert read_classes("Classes\n\nsubject_name,class\nrc_car,toy\nbear_plushie,stuffed animal\n\nx") == {
        "rc_car": "toy",
        "bear_plushie": "stuffed animal",
    }
    with pytest.raises(ValueError, match="'dog' is not a 'subject_name,class' line"):
        read_classes("subject_name,class\ndog\n")


def _evaluation(folder, subject, metrics):
    folder.mkdir()
    evaluation = {
        "subjects": [{"subject": subject, "class_noun": "dog", "metrics": metrics}],
        "reported": [],
        "protocol": "raw cosine",
        "encoders": {
            "clip": {"backend": "tiny-clip", "source": "tiny:clip", "revision": None},
            "dino": {"backend": "tiny-dino", "source": "tiny:dino", "revision": None},
        },
    }
    (folder / "evaluation.json").write_text(json.dumps(evaluation))
    return folder


def test_the_table_averages_each_method_over_the_subjects_it_was_scored_on(tmp_path):
    scores = lambda a, b, c: {"clip_i": a, "clip_t": b, "dino": c}  # noqa: E731
    first = _evaluation(
        tmp_path / "a", "dog", {"student": scores(0.8, 0.3, 0.7), "supervisor": scores(0.6, 0.2, 0.5)}
    )
    second = _evaluation(tmp_path / "b", "cat2", {"student": scores(0.4, 0.1, 0.3)})  # a black box
    table = aggregate([first, second], tmp_path / "out")
    assert table["means"]["student"] == pytest.approx(scores(0.6, 0.2, 0.5))
    assert table["means"]["supervisor"] == pytest.approx(scores(0.6, 0.2, 0.5))
    assert table["counts"] == {"student": 2, "supervisor": 1}
    assert [r["subject"] for r in table["subjects"]] == ["cat2", "dog"]
    assert table["gains"]["supervisor"]["dino"]["gain"] == pytest.approx(0.0)
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert "| dog | dog | supervisor | 0.6000 | 0.2000 | 0.5000 |" in markdown
    assert "| student (proxy-tuned) | 0.6000 | 0.2000 | 0.5000 |" in markdown
    page = (tmp_path / "out" / "bench.html").read_text()
    assert "id=comparison " in page and "id=subjects" in page and "data:image/png;base64," in page
    assert json.loads((tmp_path / "out" / "bench.json").read_text()) == json.loads(json.dumps(table))


def test_the_dreambench_pipeline_runs_the_protocol_per_subject_and_registers_nothing(tmp_path):
    path = tmp_path / "dreambench.yaml"
    assert main(["compile", "--pipeline", "dreambench", "-o", str(path)]) == 0
    spec, _ = yaml.safe_load_all(path.read_text())
    root = spec["root"]["dag"]["tasks"]
    assert {name: set(t.get("dependentTasks", [])) for name, t in root.items()} == {
        "plan-bench": set(),
        "for-loop-1": {"plan-bench"},
        "aggregate": {"for-loop-1"},
    }
    assert root["for-loop-1"]["parameterIterator"]["items"]["inputParameter"] == (
        "pipelinechannel--plan-bench-Output"
    )
    (protocol,) = spec["components"][root["for-loop-1"]["componentRef"]["name"]]["dag"]["tasks"].values()
    tasks = spec["components"][protocol["componentRef"]["name"]]["dag"]["tasks"]
    assert set(tasks) == {"for-loop-1", "tune-student", "tune-direct", "evaluate"}
    assert "register" not in path.read_text().replace("registered", "")
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {
        "dataset_uri",
        "subjects",
        "preset",
        "overrides",
        "mlflow_tracking_uri",
        "mlflow_experiment",
    }


@pytest.mark.pipeline
def test_bench_runs_every_subject_and_writes_the_mean_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["bench", "--dataset", str(DATASET), "--workdir", str(tmp_path), *QUICK])
    assert code == 0
    table = json.loads((tmp_path / "bench.json").read_text())
    assert [r["subject"] for r in table["subjects"]] == ["cat2", "dog"]
    for method in ("student", "supervisor", "direct"):  # the bench's default methods
        for key in ("clip_i", "clip_t", "dino"):
            mean = sum(r["metrics"][method][key] for r in table["subjects"]) / 2
            assert table["means"][method][key] == pytest.approx(mean)
    assert "base" not in table["means"]
    out = capsys.readouterr().out
    assert "Means over 2 subject(s)" in out and str(tmp_path / "bench.html") in out
    page = (tmp_path / "bench.html").read_text()
    assert len(re.findall(r"<td>cat2</td>", page)) == 3  # one row per method

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("proxytune-dreambench")
    runs = client.search_runs([experiment.experiment_id])
    stages = sorted(r.data.tags.get("proxytune.stage", "") for r in runs)
    assert stages.count("tune_student") == 2 and stages.count("tune_direct") == 2
    assert stages.count("aggregate") == 1 and "register" not in stages
    (aggregated,) = [r for r in runs if r.data.tags.get("proxytune.stage") == "aggregate"]
    assert aggregated.data.metrics["student_dino"] == pytest.approx(table["means"]["student"]["dino"])
    assert client.list_artifacts(aggregated.info.run_id)


def test_bench_refuses_a_bad_dataset_before_running_anything(tmp_path, capsys):
    assert main(["bench", "--dataset", str(DATASET), "--subjects", "teapot", "--workdir", str(tmp_path)]) == 2
    assert "teapot: listed in prompts_and_classes.txt but no photo folder" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_the_bench_page_opens_in_a_browser_with_both_tables(tmp_path, open_page):
    from browser import screenshot

    scores = {"clip_i": 0.8, "clip_t": 0.3, "dino": 0.7}
    first = _evaluation(tmp_path / "a", "dog", {"student": scores, "direct": {**scores, "dino": 0.5}})
    aggregate([first], tmp_path / "out")
    opened = open_page(tmp_path / "out" / "bench.html")
    cells = opened.page.eval_on_selector_all(
        "#subjects td:nth-child(3)", "cells => cells.map(c => c.textContent)"
    )
    assert cells == ["student", "direct"]
    assert opened.page.inner_text("#comparison-gains").count("+0.2000 (+40.00%)") == 1
    assert opened.page.eval_on_selector("img", "i => i.naturalWidth") > 0
    opened.assert_no_errors()
    assert screenshot(opened.page, tmp_path, "bench").stat().st_size > 10_000
