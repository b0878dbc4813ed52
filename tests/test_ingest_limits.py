"""Hostile inputs: every ingest limit refuses before a pixel is decoded or a byte written where
it can, naming the file and the limit; 16-bit photos are scaled, not clipped."""

import shutil
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from proxytune.cli import main
from proxytune.core.config import RunParams
from proxytune.core.params import IngestParams
from proxytune.core.storage import MinioStore
from proxytune.stages.ingest import DEFAULT_LIMITS, IngestError, ingest, load_subject
from proxytune.stages.proxy_import import check_proxy_import
from tests.conftest import EXAMPLE, s3_bucket
from tests.test_ingest import photo


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` RGB pixels, its data one compressed row:
    opening it reads the claim, decoding it would allocate the whole image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = zlib.compress(b"\x00" + b"\x80" * 3 * min(width, 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


@pytest.fixture
def photos(tmp_path):
    """Two good photos; each test adds its hostile file."""
    folder = tmp_path / "photos"
    folder.mkdir()
    photo(folder / "a.png", color=(10, 200, 10))
    photo(folder / "b.png", color=(10, 10, 200))
    return folder


@pytest.fixture
def no_huge_decoding(monkeypatch):
    """Fails the test if the pixels of an image over a megapixel are decoded (allocated)."""
    load = ImageFile.ImageFile.load

    def small_load(self):
        assert self.size[0] * self.size[1] <= 1_000_000, f"decoded a {self.size} image"
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", small_load)


def refused(source, tmp_path, limits=DEFAULT_LIMITS) -> str:
    """`ingest` raises IngestError and writes nothing; returns the message."""
    with pytest.raises(IngestError) as error:
        ingest(str(source), tmp_path / "out", "dog", limits=limits)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())  # no temporary left
    return str(error.value)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((15000, 15000), "huge.png: more than 178,956,970 pixels (Pillow's decompression-bomb guard"),
        ((10000, 10000), "huge.png: 10000x10000 = 100,000,000 pixels"),
    ],
)
def test_a_huge_header_is_refused_before_decoding(photos, tmp_path, no_huge_decoding, size, expected):
    (photos / "huge.png").write_bytes(png_claiming(*size))
    message = refused(photos, tmp_path)
    assert message.startswith(expected)
    assert message.endswith("over the limit of 40,000,000 pixels (ingest.max_pixels)")


def test_the_pixel_limit_is_configurable(photos, tmp_path):
    photo(photos / "c.png", size=(100, 100))
    message = refused(photos, tmp_path, IngestParams(max_pixels=9000))
    assert message == "c.png: 100x100 = 10,000 pixels, over the limit of 9,000 pixels (ingest.max_pixels)"
    assert (
        len(ingest(str(photos), tmp_path / "out", "dog", limits=IngestParams(max_pixels=10_000)).images) == 3
    )


def test_a_tiny_photo_is_refused(photos, tmp_path):
    (photos / "thumb.png").write_bytes(png_claiming(16, 16))
    message = refused(photos, tmp_path)
    assert message == "thumb.png: 16x16 pixels, under the minimum side of 64 px (ingest.min_side)"


def test_a_large_file_is_refused_before_it_is_read(photos, tmp_path):
    (photos / "c.png").write_bytes(png_claiming(64, 64) + bytes(5000))
    size = (photos / "c.png").stat().st_size
    message = refused(photos, tmp_path, IngestParams(max_file_bytes=5000))
    assert message == (
        f"c.png: {size:,} bytes according to the file system, over the limit of 5,000 bytes "
        "(ingest.max_file_bytes); not read"
    )


def test_three_copies_of_one_photo_are_not_a_subject(tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(EXAMPLE / "00.jpg", folder / name)
    message = refused(folder, tmp_path)
    assert message == (
        f"{folder}: 3 files, 1 distinct photo after dropping 2 duplicates; "
        "need at least 2 (ingest.min_photos)"
    )
    assert len(ingest(str(folder), tmp_path / "out", "dog", limits=IngestParams(min_photos=1)).images) == 1


def test_a_link_out_of_the_folder_is_refused_and_one_inside_is_read(photos, tmp_path):
    elsewhere = photo(tmp_path / "elsewhere.png", color=(1, 2, 3))
    (photos / "c.png").symlink_to(elsewhere)
    message = refused(photos, tmp_path)
    assert message == (
        f"subject folder {photos}: c.png is a link to {elsewhere.resolve()}, outside the folder; "
        "copy the file in instead"
    )
    (photos / "c.png").unlink()
    (photos / "kept").mkdir()
    photo(photos / "kept" / "c.png", color=(1, 2, 3))
    (photos / "c.png").symlink_to(photos / "kept" / "c.png")
    subject = ingest(str(photos), tmp_path / "out", "dog")
    assert len(subject.images) == 3  # a.png, b.png and the linked c.png (the folder kept/ is not read)


def test_a_full_range_16_bit_photo_is_scaled_not_clipped(photos, tmp_path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
    Image.fromarray(ramp).save(photos / "c.png")
    with Image.open(photos / "c.png") as stored:
        assert stored.mode == "I;16"
    subject = ingest(str(photos), tmp_path / "out", "dog")
    _, images = load_subject(tmp_path / "out")
    (scaled,) = [np.asarray(image) for image in images if image.size == (256, 256)]
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert len(subject.images) == 3
    assert all(np.array_equal(scaled[..., channel], expected) for channel in range(3))
    assert (scaled[0, 0, 0], scaled[-1, -1, 0], scaled[128, 0, 0]) == (0, 255, 128)


def test_a_proxy_import_has_the_same_limits(photos):
    largest = max(p.stat().st_size for p in photos.iterdir())
    (photos / "a.txt").write_text("a sks dog" + " " * largest)
    with pytest.raises(IngestError, match=rf"a.txt: {largest + 9:,} bytes .* \(ingest.max_file_bytes\)"):
        check_proxy_import(str(photos), "sks", IngestParams(max_file_bytes=largest))
    (photos / "thumb.png").write_bytes(png_claiming(16, 16))
    with pytest.raises(IngestError, match=r"thumb.png: 16x16 pixels, under the minimum side of 64 px"):
        check_proxy_import(str(photos), "sks")


@pytest.fixture
def s3_photos(s3_env, photos):
    """The photos uploaded to s3://limits/<prefix>/ (a prefix per test); returns an uploader."""
    client = s3_bucket(s3_env, "limits")

    def upload(prefix: str, extra: dict[str, bytes]) -> str:
        for path in sorted(photos.iterdir()):
            client.fput_object("limits", f"{prefix}/{path.name}", str(path))
        for name, data in extra.items():
            (photos / name).write_bytes(data)
            client.fput_object("limits", f"{prefix}/{name}", str(photos / name))
        return f"s3://limits/{prefix}"

    return upload


def test_an_oversized_object_is_refused_from_the_listing_before_download(s3_photos, tmp_path, monkeypatch):
    big = png_claiming(64, 64) + bytes(5000)
    source = s3_photos("oversized", {"big.png": big})
    fetched = []
    get_bytes = MinioStore.get_bytes
    monkeypatch.setattr(
        MinioStore, "get_bytes", lambda store, key: fetched.append(key) or get_bytes(store, key)
    )
    message = refused(source, tmp_path, IngestParams(max_file_bytes=5000))
    assert message == (
        f"big.png: {len(big):,} bytes according to the S3 listing, over the limit of 5,000 bytes "
        "(ingest.max_file_bytes); not read"
    )
    assert fetched == ["oversized/a.png", "oversized/b.png"]  # the photos before it, not it


def test_an_object_too_small_in_pixels_is_refused(s3_photos, tmp_path):
    source = s3_photos("thumbs", {"thumb.png": png_claiming(16, 200)})
    message = refused(source, tmp_path)
    assert message == "thumb.png: 16x200 pixels, under the minimum side of 64 px (ingest.min_side)"


def test_the_cli_refuses_a_bad_folder_at_once_and_makes_no_workdir(photos, tmp_path, capsys):
    (photos / "thumb.png").write_bytes(png_claiming(16, 16))
    workdir = tmp_path / "work"
    started = time.monotonic()
    code = main(
        ["run", "--local", "--subject", str(photos), "--class-noun", "dog", "--workdir", str(workdir)]
    )
    assert code == 2 and time.monotonic() - started < 30
    out = " ".join(capsys.readouterr().out.split())  # as the console wrapped it
    assert "thumb.png: 16x16 pixels, under the minimum side of 64 px (ingest.min_side)" in out
    assert not workdir.exists()


def test_the_limits_are_run_parameters():
    assert RunParams.resolve("tiny").ingest == IngestParams(
        max_pixels=40_000_000, max_file_bytes=50_000_000, min_side=64, min_photos=2
    )
    assert RunParams.resolve("tiny", {"ingest.max_pixels": 80_000_000}).ingest.max_pixels == 80_000_000
    with pytest.raises(ValueError, match=r"ingest\.min_side: Input should be greater than 0"):
        RunParams.resolve("tiny", {"ingest.min_side": 0})
    with pytest.raises(ValueError, match="ingest: Value error, max_pixels 1000 is below min_side squared"):
        RunParams.resolve("tiny", {"ingest.max_pixels": 1000})
