import json
import shutil

import numpy as np
import pytest
from PIL import Image

from proxytune.backends._tuned import load_student
from proxytune.cli import main
from proxytune.core.contracts import CARD_FILE
from proxytune.core.fsutil import read_json
from proxytune.core.tracking import TrackingContext, stage_run
from proxytune.stages.registration import register
from tests.conftest import CPU


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def pixels(folder, files):
    return np.stack([np.asarray(Image.open(folder / f)) for f in files])


def test_generate_from_a_folder_writes_images_a_grid_and_a_record(student_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["generate", "--student", str(student_dir), "--prompt", "a sks dog", "-n", "3", "--seed", "5"]
    assert main([*argv, "--out", str(out), "--guidance-scale", "2", "--top-k", "10"]) == 0
    record = read_json(out / "generation.json")
    assert sorted(p.name for p in out.iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
        "generation.json",
        "grid.png",
    ]
    card = read_json(student_dir / CARD_FILE)
    assert (record["prompt"], record["seeds"], record["backend"]) == ("a sks dog", [5, 6, 7], "tiny-janus")
    assert record["adapter_sha256"] == card["adapter_sha256"]
    assert record["sampling"] == {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 10, "top_p": 1.0}
    assert Image.open(out / "grid.png").size == (64, 64)  # 2 x 2 cells of 32 px
    student, _ = load_student(student_dir, CPU)
    expected = student.generate(
        ["a sks dog"] * 3, [5, 6, 7], student.sampling.override(guidance_scale=2, top_k=10)
    )
    assert np.array_equal(pixels(out, record["files"]), np.stack([np.asarray(im) for im in expected]))
    assert str(out / "grid.png") in capsys.readouterr().out


def test_generate_from_the_registry_by_alias(student_dir, tmp_path, sqlite_tracking):
    context = TrackingContext(experiment="generate", kfp_run_id="gen")
    with stage_run(context, "register") as tracker:
        evaluation = {
            "subjects": [{"subject": "dog", "class_noun": "dog", "identifier": "sks"}],
            "metrics": {m: {"clip_i": 0.5, "clip_t": 0.3, "dino": 0.5} for m in ("student", "supervisor")},
        }
        register(student_dir, evaluation, "proxytune-gen", context, tracker)
    out = tmp_path / "out"
    uri = "models:/proxytune-gen@challenger"
    assert main(["generate", "--student", uri, "--prompt", "a sks dog", "-n", "2", "--out", str(out)]) == 0
    from_folder = tmp_path / "folder"
    assert (
        main(
            [
                "generate",
                "--student",
                str(student_dir),
                "--prompt",
                "a sks dog",
                "-n",
                "2",
                "--out",
                str(from_folder),
            ]
        )
        == 0
    )
    assert np.array_equal(pixels(out, ["000.png", "001.png"]), pixels(from_folder, ["000.png", "001.png"]))
    assert (
        read_json(out / "generation.json")["adapter_sha256"]
        == read_json(student_dir / CARD_FILE)["adapter_sha256"]
    )


def broken_adapters(root, student_dir, supervisor_dir):
    no_card = root / "no-card"
    shutil.copytree(student_dir, no_card)
    (no_card / CARD_FILE).unlink()
    unknown = root / "unknown-backend"
    shutil.copytree(student_dir, unknown)
    card = json.loads((unknown / CARD_FILE).read_text())
    (unknown / CARD_FILE).write_text(json.dumps({**card, "backend": "tiny-llamagen"}))
    changed = root / "changed-weights"
    shutil.copytree(student_dir, changed)
    (changed / "adapter_model.safetensors").write_bytes(b"not weights")
    return {
        str(supervisor_dir): "holds a supervisor adapter, expected a student adapter",
        str(root / "empty"): "proxytune.json is missing",
        str(no_card): "proxytune.json is missing",
        str(unknown): "unknown student backend 'tiny-llamagen'",
        str(changed): "does not match the sha256",
        str(root / "absent"): "no such folder",
    }


def test_bad_adapters_get_a_clear_error_and_write_nothing(student_dir, supervisor_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for student, message in broken_adapters(tmp_path, student_dir, supervisor_dir).items():
        out = tmp_path / "out"
        assert main(["generate", "--student", student, "--prompt", "a sks dog", "--out", str(out)]) == 2
        assert message in capsys.readouterr().out, student
        assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["-n", "0"], "-n must be at least 1"),
        (["--guidance-scale", "0.5"], "guidance_scale"),
        (["--top-p", "1.5"], "top_p"),
        (["--out", "{student}"], "already exists and is not empty"),
        (["--student", "models:/proxytune-nothing@champion"], "MLFLOW_TRACKING_URI"),
    ],
)
def test_bad_requests_fail_before_any_model_loads(
    student_dir, tmp_path, capsys, monkeypatch, arguments, message
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = {"--student": str(student_dir), "--prompt": "a sks dog", "--out": str(tmp_path / "out")}
    for flag, value in zip(arguments[::2], arguments[1::2], strict=True):
        argv[flag] = value.replace("{student}", str(student_dir))
    assert main(["generate", *[x for pair in argv.items() for x in pair]]) == 2
    assert message in capsys.readouterr().out


def test_an_unknown_registered_model_is_a_clear_error(tmp_path, capsys, sqlite_tracking):
    argv = [
        "generate",
        "--student",
        "models:/proxytune-nothing@champion",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    assert "proxytune-nothing" in capsys.readouterr().out
