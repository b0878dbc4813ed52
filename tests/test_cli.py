import pytest

from proxytune.cli import main
from proxytune.local import local_defaults
from proxytune.registry import REGISTRIES


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
    ],
)
def test_bad_input_fails_before_the_pipeline_starts(tmp_path, capsys, arguments, message):
    workdir = tmp_path / "work"
    arguments = [a.replace("{tmp}", str(tmp_path)) for a in arguments]
    assert main(["run", "--local", "--workdir", str(workdir), *arguments]) == 2
    assert message in capsys.readouterr().out
    assert not workdir.exists()


def test_local_defaults_keep_everything_in_the_workdir(tmp_path, monkeypatch):
    monkeypatch.delenv("PROXYTUNE_S3_ENDPOINT_URL", raising=False)
    assert local_defaults(tmp_path) == {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PROXYTUNE_STORE_DIR": str(tmp_path / "store"),
    }
    monkeypatch.setenv("PROXYTUNE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert "PROXYTUNE_STORE_DIR" not in local_defaults(tmp_path)


def test_presets_prints_what_each_preset_sets_and_what_it_still_needs(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "student.backend" in out and "'lumina-mgpt-7b-768'" in out and "'tiny-janus'" in out
    assert "proxy.shard_size" not in out  # no preset changes it; --all shows it
    assert "paper needs more before it runs" in out and "vq_source" in out
    assert main(["presets", "--all"]) == 0
    assert "proxy.shard_size" in capsys.readouterr().out
