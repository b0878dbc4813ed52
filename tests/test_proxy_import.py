"""Black-box proxy import: images of the subject made by any supervisor become a proxy Dataset."""

import json

import pytest
from PIL import Image, ImageOps

import proxytune.stages.supervisor
from proxytune.backends._tuned import load_supervisor
from proxytune.core.contracts import SubjectRef, read_adapter_card
from proxytune.core.params import ProxyParams
from proxytune.stages.evaluate import evaluate
from proxytune.stages.ingest import IngestError, decode_photo, ingest
from proxytune.stages.proxy import generate_proxy, load_proxy
from proxytune.stages.proxy_import import check_proxy_import, import_proxy
from proxytune.stages.supervisor import tune_supervisor
from tests.conftest import CPU, EXAMPLE, s3_bucket

DOG = SubjectRef(name="dog", identifier="sks", class_noun="dog")
PARAMS = ProxyParams(prompt_bank=["a {identifier} {class_noun} on the moon"])


@pytest.fixture
def outputs(tmp_path):
    """A folder another supervisor wrote: mixed formats, a duplicate, captions for two images
    (one of them a DreamBench evaluation prompt)."""
    folder = tmp_path / "attn-dreambooth"
    folder.mkdir()
    sources = sorted(EXAMPLE.glob("*.jpg"))
    for i, source in enumerate(sources[:4]):
        image = ImageOps.mirror(Image.open(source))
        image.save(folder / f"img_{i}.{'png' if i % 2 else 'webp'}")
    (folder / "img_4.png").write_bytes((folder / "img_1.png").read_bytes())
    (folder / "img_1.txt").write_text("a  sks dog wearing\na crown\n")
    (folder / "img_2.txt").write_text("a sks dog in the jungle")
    return folder


def test_an_import_becomes_a_proxy_dataset_with_captions_and_fallback_prompts(outputs, tmp_path, caplog):
    info = import_proxy(str(outputs), tmp_path / "proxy", DOG, PARAMS)
    loaded, records = load_proxy(tmp_path / "proxy")
    assert loaded == info and info.complete and info.num_images == 4  # the duplicate dropped
    assert info.supervisor == f"imported:{outputs}" and info.params["source_uri"] == str(outputs)
    assert [r.source for r in records] == ["img_0.webp", "img_1.png", "img_2.webp", "img_3.png"]
    assert [r.prompt for r in records] == [
        "a sks dog",  # no caption: the proxy prompts cycle as for drawn images
        "a sks dog wearing a crown",  # the caption, whitespace normalised
        "a sks dog in the jungle",
        "a sks dog on the moon",
    ]
    assert [r.evaluation_prompt for r in records] == [None, None, True, None]
    assert all(r.seed is None and r.supervisor == "imported" for r in records)
    assert "duplicates img_1.png" in caplog.text and "DreamBench evaluation prompt" in caplog.text
    for record in records:
        stored = Image.open(tmp_path / "proxy" / record.file)
        assert stored.format == "PNG" and stored.mode == "RGB"
        source = decode_photo(record.source, (outputs / record.source).read_bytes()).image
        assert stored.tobytes() == source.tobytes()
    again = import_proxy(str(outputs), tmp_path / "again", DOG, PARAMS)
    assert again.key == info.key  # the same images and prompts: the same content key
    (outputs / "img_3.txt").write_text("a sks dog asleep")
    assert import_proxy(str(outputs), tmp_path / "captioned", DOG, PARAMS).key != info.key
    assert check_proxy_import(str(outputs), "sks") == 5


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda f: None, "no images in proxy import"),
        (lambda f: (f / "notes.txt").write_text("a sks dog"), "no images in proxy import"),
        (lambda f: (f / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken"), "x.png: "),
        (lambda f: (f / "a.txt").write_text("a sks dog"), "a.txt captions no image"),
        (lambda f: (f / "00.txt").write_text("a dog on a beach"), "does not name the subject's identifier"),
        (lambda f: (f / "00.txt").write_bytes(b"\xff\xfe"), "00.txt: a caption must be UTF-8 text"),
    ],
)
def test_a_bad_import_is_refused_naming_the_problem_and_writes_nothing(tmp_path, setup, message):
    folder = tmp_path / "import"
    folder.mkdir()
    if "no images" not in message:
        (folder / "00.jpg").write_bytes((EXAMPLE / "00.jpg").read_bytes())
    setup(folder)
    with pytest.raises(IngestError, match=message):
        check_proxy_import(str(folder), "sks")
    with pytest.raises(IngestError, match=message):
        import_proxy(str(folder), tmp_path / "proxy", DOG, PARAMS)
    assert not (tmp_path / "proxy").exists()


def test_a_missing_import_folder_is_named(tmp_path):
    with pytest.raises(IngestError, match=r"proxy import folder .*nowhere does not exist"):
        check_proxy_import(str(tmp_path / "nowhere"), "sks")


def test_an_import_from_an_s3_prefix(s3_env, outputs, tmp_path):
    client = s3_bucket(s3_env, "renders")
    for path in sorted(outputs.iterdir()):
        client.fput_object("renders", f"dog/v1/{path.name}", str(path))
    client.fput_object("renders", "dog/v1/nested/ignored.png", str(outputs / "img_1.png"))
    info = import_proxy("s3://renders/dog/v1", tmp_path / "proxy", DOG, PARAMS)
    local = import_proxy(str(outputs), tmp_path / "local", DOG, PARAMS)
    assert info.num_images == 4 and info.key != local.key  # the source is part of the recipe
    assert [r.prompt for r in load_proxy(tmp_path / "proxy")[1]] == [
        r.prompt for r in load_proxy(tmp_path / "local")[1]
    ]


def test_a_black_box_supervisor_is_recorded_not_trained_and_its_images_imported(
    outputs, tmp_path, params, student_dir, monkeypatch
):
    """tune_supervisor loads nothing for an imported subject; generate_proxy imports; the
    evaluation scores the student alone and the report says why."""
    subject_dir = tmp_path / "subject"
    ingest(str(EXAMPLE), subject_dir, "dog", proxy_uri=str(outputs))

    def no_model(*args, **kwargs):
        raise AssertionError("a black-box supervisor must not load a model")

    monkeypatch.setattr(proxytune.stages.supervisor.SUPERVISORS, "create", no_model)
    card = tune_supervisor(subject_dir, tmp_path / "supervisor", params.supervisor, device=CPU)
    assert card.imported and card.base_model.id == str(outputs) and card.adapter_files == []
    assert read_adapter_card(tmp_path / "supervisor", "supervisor") == card
    with pytest.raises(ValueError, match=r"is a black box .* it cannot draw"):
        load_supervisor(tmp_path / "supervisor")

    info = generate_proxy(tmp_path / "supervisor", tmp_path / "proxy", PARAMS, device=CPU)
    assert info.num_images == 4 and info.supervisor == f"imported:{outputs}"

    monkeypatch.undo()
    evaluation = evaluate(
        subject_dir, tmp_path / "supervisor", student_dir, tmp_path / "eval", params.evaluation, device=CPU
    )
    assert set(evaluation["metrics"]) == {"student"}
    assert set(evaluation["subjects"][0]["per_prompt"]) == {"student"}
    assert {s["model"] for s in evaluation["subjects"][0]["samples"]} == {"student"}
    report = (tmp_path / "eval" / "report.html").read_text()
    assert f"a black box (images imported from {outputs})" in report
    assert "student − supervisor" not in report
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["metrics"] == evaluation["metrics"]
