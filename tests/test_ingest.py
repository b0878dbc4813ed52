import shutil

import numpy as np
import pytest
from PIL import Image

from proxytune.core.contracts import Subject
from proxytune.core.fsutil import sha256_file
from proxytune.stages.ingest import IngestError, ingest, load_subject, plan_subjects
from tests.conftest import EXAMPLE


def photo(path, mode="RGB", size=(96, 64), color=(200, 30, 30), **save):
    Image.new(mode, size, color).save(path, **save)
    return path


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "a.jpg", color=(10, 200, 10))
    photo(folder / "b.png", color=(10, 10, 200))
    return folder


def test_example_subject_becomes_a_dataset(tmp_path):
    subject = ingest(str(EXAMPLE), tmp_path / "out", "dog")
    assert (subject.name, subject.class_noun, subject.identifier) == ("dog", "dog", "sks")
    assert [i.file for i in subject.images] == [f"images/{i:02d}.png" for i in range(5)]
    stored = Subject.read(tmp_path / "out" / "subject.json")
    assert stored == subject
    for entry in stored.images:
        path = tmp_path / "out" / entry.file
        assert sha256_file(path) == entry.sha256
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("PNG", "RGB")


@pytest.mark.parametrize(
    ("bad_file", "content", "message"),
    [
        ("notes.txt", b"these are my dog photos", "notes.txt: not an image file"),
        ("broken.jpg", None, "broken.jpg: unreadable or corrupt image"),
        ("empty.png", b"", "empty.png: not an image file"),
    ],
)
def test_bad_file_is_named_and_nothing_is_written(photos, tmp_path, bad_file, content, message):
    if content is None:
        content = (photos / "a.jpg").read_bytes()[:300]
    (photos / bad_file).write_bytes(content)
    with pytest.raises(IngestError, match=message):
        ingest(str(photos), tmp_path / "out", "dog")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(IngestError, match=r"subject folder .*nowhere does not exist"):
        ingest(str(tmp_path / "nowhere"), tmp_path / "out", "dog")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"hidden files are ignored")
    with pytest.raises(IngestError, match="no images in"):
        ingest(str(tmp_path / "empty"), tmp_path / "out", "dog")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("identifier", "two words", "identifier 'two words' must be one word"),
        ("class_noun", "  ", "class noun must not be empty"),
        ("name", "My Dog!", "subject name 'My Dog!' must be lower-case"),
    ],
)
def test_bad_subject_fields_fail_before_reading(photos, tmp_path, field, value, message):
    args = {"class_noun": "dog", "name": None, "identifier": "sks", field: value}
    with pytest.raises(IngestError, match=message):
        ingest(str(photos), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_special_formats_are_normalized(tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(folder / "alpha.png")
    photo(folder / "grey.png", mode="L", color=77)
    photo(folder / "cmyk.jpg", mode="CMYK", color=(255, 0, 0, 0), quality=95)  # pure cyan ink
    stored = np.zeros((64, 128, 3), np.uint8)
    stored[:, :64] = (255, 0, 0)
    stored[:, 64:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif, quality=95)

    subject = ingest(str(folder), tmp_path / "out", "toy", name="formats")
    by_source = dict(zip(sorted(p.name for p in folder.iterdir()), subject.images, strict=True))
    _, images = load_subject(tmp_path / "out")
    loaded = {name: images[subject.images.index(entry)] for name, entry in by_source.items()}
    assert all(image.mode == "RGB" for image in images)

    alpha = np.asarray(loaded["alpha.png"])
    assert tuple(alpha[0, 0]) == (255, 255, 255)  # transparency blended on white
    assert tuple(alpha[5, 5]) == (255, 0, 0)
    assert tuple(np.asarray(loaded["grey.png"])[0, 0]) == (77, 77, 77)
    cyan = np.asarray(loaded["cmyk.jpg"]).astype(int)[10, 10]
    assert cyan[0] < 40 and cyan[1] > 200 and cyan[2] > 200

    rotated = np.asarray(loaded["rotated.jpg"]).astype(int)
    assert rotated.shape == (128, 64, 3)  # width and height swapped
    expected = np.rot90(stored, k=-1).astype(int)  # an independent clockwise rotation
    assert np.abs(rotated - expected).mean() < 8


def test_duplicates_are_dropped_by_content(photos, tmp_path):
    shutil.copy(photos / "a.jpg", photos / "a-copy.jpg")
    subject = ingest(str(photos), tmp_path / "out", "dog")
    assert len(subject.images) == 2


def test_load_subject_detects_a_modified_image(tmp_path):
    ingest(str(EXAMPLE), tmp_path / "out", "dog")
    photo(tmp_path / "out" / "images" / "01.png", color=(1, 2, 3))
    with pytest.raises(ValueError, match=r"01.png is missing or does not match its sha256"):
        load_subject(tmp_path / "out")


def test_existing_output_is_never_overwritten(photos, tmp_path):
    out = tmp_path / "out"
    ingest(str(photos), out, "dog")
    before = (out / "subject.json").read_bytes()
    with pytest.raises(FileExistsError):
        ingest(str(photos), out, "cat")
    assert (out / "subject.json").read_bytes() == before


def test_a_run_plans_every_subject_with_its_own_identifier():
    planned = plan_subjects(
        [
            {"uri": "/photos/dog", "class_noun": "dog"},
            {"uri": "s3://bucket/cat2", "class_noun": "cat", "identifier": "sks"},
            {"uri": "/photos/Red Teapot", "class_noun": "teapot", "name": "teapot"},
        ]
    )
    assert [(p["name"], p["identifier"], p["class_noun"]) for p in planned] == [
        ("dog", "ohwx", "dog"),  # sks is taken by cat2, so the first spare one
        ("cat2", "sks", "cat"),
        ("teapot", "zwx", "teapot"),
    ]
    assert planned[1]["source_uri"] == "s3://bucket/cat2"


@pytest.mark.parametrize(
    ("subjects", "message"),
    [
        ([], "at least one subject"),
        (
            [{"uri": "/a/dog", "class_noun": "dog"}, {"uri": "/b/dog", "class_noun": "dog"}],
            "distinct names; dog",
        ),
        (
            [
                {"uri": "/a", "class_noun": "dog", "identifier": "sks"},
                {"uri": "/b", "class_noun": "dog", "identifier": "sks"},
            ],
            "distinct identifiers; sks",
        ),
        ([{"uri": "/a", "class_noun": "dog", "colour": "red"}], "unknown subject field(s) ['colour']"),
        ([{"uri": "/a"}], "needs a uri and a class_noun"),
        ([{"uri": "/a", "class_noun": "dog", "identifier": "two words"}], "must be one word"),
    ],
)
def test_bad_subject_plans_are_refused(subjects, message):
    with pytest.raises(IngestError) as error:
        plan_subjects(subjects)
    assert message in str(error.value)
