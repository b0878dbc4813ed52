import pytest

from proxytune.cli import main
from proxytune.core.registry import REGISTRIES
from proxytune.ops.local import local_defaults


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_backends_lists_every_registered_backend_by_kind(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    for kind, registry in REGISTRIES.items():
        for name in registry.names():
            assert f"{kind}" in out and name in out
    assert {"tiny-sd", "sd15"} <= set(REGISTRIES["supervisor"].names())
    assert set(REGISTRIES["student"].names()) >= {
        "janus-pro-1b",
        "janus-pro-7b",
        "lumina-mgpt-7b-768",
        "tiny-janus",
        "tiny-lumina",
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--subject", "{tmp}/missing", "--class-noun", "dog"], "does not exist"),
        (["--subject", "{tmp}"], "--class-noun is required with --subject"),
        (["--set", "student.steps=-1"], "student.steps: Input should be greater than 0"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--identifier", "s k s"], "must be one word"),
        (["--proxy-from", "{tmp}", "--proxy-from", "{tmp}"], "give --proxy-from once per --subject"),
        (["--proxy-from", "{tmp}"], "no images in proxy import"),
        (["--model-name", "bad/name%"], "registered model name 'bad/name%': MLflow names cannot contain '/'"),
        (["--experiment", "  "], "experiment name '  ' is blank"),
    ],
)
def test_bad_input_fails_before_the_pipeline_starts(tmp_path, capsys, arguments, message):
    workdir = tmp_path / "work"
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    assert main(["run", "--local", "--workdir", str(workdir), *arguments]) == 2
    assert message in capsys.readouterr().out
    assert not workdir.exists()


def test_without_subject_an_installed_package_asks_for_one(tmp_path, capsys, monkeypatch):
    """In the image proxytune is installed without the checkout's examples/."""
    monkeypatch.setattr(
        "proxytune.ops.local.EXAMPLE_SUBJECT", tmp_path / "site-packages" / "examples" / "dog"
    )
    workdir = tmp_path / "work"
    assert main(["run", "--workdir", str(workdir)]) == 2
    out = capsys.readouterr().out
    assert "no --subject given, and the example subject" in out and "pass --subject FOLDER" in out
    assert not workdir.exists()


def test_local_defaults_keep_everything_in_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("PROXYTUNE_S3_ENDPOINT_URL", raising=False)
    assert local_defaults(tmp_path) == {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PROXYTUNE_STORE_DIR": str(tmp_path / "store"),
    }
    monkeypatch.setenv("PROXYTUNE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert "PROXYTUNE_STORE_DIR" not in local_defaults(tmp_path)


def test_presets_prints_every_parameter_with_its_range_and_what_a_preset_still_needs(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "student.backend" in out and "'lumina-mgpt-7b-768'" in out and "'tiny-janus'" in out
    (row,) = [line for line in out.splitlines() if "proxy.num_images" in line]
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [
        "proxy.num_images", "16", "200", "1000", "> 0, <= 1,000,000"
    ]  # fmt: skip
    assert "proxy.shard_size" in out and "ingest.max_pixels" in out
    assert "paper needs more before it runs" in out and "vq_source" in out
    assert main(["presets", "--changed"]) == 0
    assert "proxy.shard_size" not in capsys.readouterr().out  # no preset changes it


def test_version_and_the_exit_codes_are_in_the_help(capsys):
    from proxytune import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"proxytune {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for line in ("1    a run failed", "2    bad input or arguments", "130  interrupted (Ctrl-C)"):
        assert line in help_text


def test_run_needs_no_local_flag_while_it_is_the_only_mode(tmp_path, capsys):
    assert main(["run", "--subject", str(tmp_path / "missing"), "--class-noun", "dog"]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_an_unwritable_output_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    target = tmp_path / "missing" / "x.yaml"
    assert main(["compile", "-o", str(target)]) == 2
    out = capsys.readouterr().out
    assert out == f"error: cannot write {target}: folder {target.parent} does not exist\n"
    assert not target.parent.exists()
    with pytest.raises(ValueError, match="cannot write"):
        main(["--debug", "compile", "-o", str(target)])


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    import proxytune.cli.tools
    from proxytune.cli.console import INTERRUPTED

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(proxytune.cli.tools, "_backends", interrupted)
    assert main(["backends"]) == INTERRUPTED == 130
    assert capsys.readouterr().out == "interrupted\n"


def test_counts_and_sizes_have_upper_bounds_that_refuse_a_typo_at_once(tmp_path, capsys):
    import time

    began = time.monotonic()
    assert main(["run", "--set", "proxy.num_images=1e9", "--workdir", str(tmp_path / "w")]) == 2
    assert "proxy.num_images: Input should be less than or equal to 1000000" in capsys.readouterr().out
    assert time.monotonic() - began < 2 and not (tmp_path / "w").exists()


def test_an_unreachable_store_or_an_unusable_workdir_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from tests.conftest import free_port

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["run", "--workdir", str(not_a_folder / "work")]) == 2
    assert (
        capsys.readouterr().out
        == f"error: --workdir {not_a_folder / 'work'}: {not_a_folder} is not a folder\n"
    )
    monkeypatch.setenv("PROXYTUNE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert main(["run", "--workdir", str(tmp_path / "work")]) == 2
    out = capsys.readouterr().out
    assert (
        out.startswith("error: S3 at http://127.0.0.1:")
        and "cannot be reached" in out
        and out.count("\n") == 1
    )
    assert not (tmp_path / "work").exists()


def test_a_bad_parameter_is_refused_in_a_fresh_process_before_the_model_libraries_load(tmp_path):
    import subprocess
    import sys
    import time

    probe = (
        "import sys; from proxytune.cli import main; code = main(sys.argv[1:]); "
        "print(code, *(m in sys.modules for m in ('transformers', 'diffusers', 'kfp', 'mlflow')))"
    )
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, pydantic, rich"], check=True)
    bare = time.monotonic() - began  # what any proxytune process pays; seconds on a slow machine
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", probe, "run", "--set", "proxy.num_images=0", "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
    )
    took = time.monotonic() - began
    assert done.stdout.splitlines()[-1] == "2 False False False False", done.stdout + done.stderr
    assert took < bare + 1.0 and not (tmp_path / "w").exists()
