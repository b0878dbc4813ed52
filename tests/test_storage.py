import pytest

from proxytune.core.storage import LocalStore, MinioStore, open_s3_uri, store_from_env
from proxytune.stages.ingest import ingest
from tests.conftest import EXAMPLE, s3_bucket


def exercise(store):
    """The same round trips against any implementation."""
    store.put_bytes("a/b/one.bin", b"\x00\x01")
    store.put_bytes("a/two.txt", b"two")
    store.put_bytes("other/three.txt", b"3")
    assert store.get_bytes("a/b/one.bin") == b"\x00\x01"
    assert store.exists("a/two.txt") and not store.exists("a/nothing")
    assert store.list("a/") == ["a/b/one.bin", "a/two.txt"]
    with pytest.raises(FileNotFoundError, match="no object 'a/nothing'"):
        store.get_bytes("a/nothing")
    store.put_bytes("a/two.txt", b"2")
    assert store.get_bytes("a/two.txt") == b"2"


def test_local_store_round_trips(tmp_path):
    exercise(LocalStore(tmp_path / "store"))


def test_local_store_refuses_keys_outside_its_root(tmp_path):
    with pytest.raises(ValueError, match="escapes the store root"):
        LocalStore(tmp_path / "store").put_bytes("../outside", b"x")


def test_minio_store_round_trips_on_a_real_s3_server(s3_env):
    store = store_from_env()
    assert isinstance(store, MinioStore) and store.uri == "s3://proxytune"
    exercise(store)


def test_directories_round_trip_through_s3(s3_env, tmp_path):
    source = tmp_path / "source"
    (source / "deep").mkdir(parents=True)
    (source / "x.txt").write_text("x")
    (source / "deep" / "y.txt").write_text("y")
    store = MinioStore(s3_env, "dirs")
    store.upload_dir(source, "copy")
    assert store.download_dir("copy", tmp_path / "back") == ["deep/y.txt", "x.txt"]
    assert (tmp_path / "back" / "deep" / "y.txt").read_text() == "y"


def test_ingest_from_s3_and_publish_to_the_store(s3_env, tmp_path):
    client = s3_bucket(s3_env, "uploads")
    for path in sorted(EXAMPLE.iterdir()):
        client.fput_object("uploads", f"subjects/dog/{path.name}", str(path))
    client.fput_object("uploads", "subjects/dog/nested/ignored.jpg", str(EXAMPLE / "00.jpg"))

    store = store_from_env()
    subject = ingest("s3://uploads/subjects/dog", tmp_path / "out", "dog", store=store)
    assert subject.name == "dog" and len(subject.images) == 5
    assert subject.source_uri == "s3://uploads/subjects/dog"
    published = [k for k in store.list("subjects/") if k.endswith("subject.json")]
    assert len(published) == 1
    prefix = published[0].rsplit("/", 1)[0]
    assert store.get_bytes(f"{prefix}/images/00.png") == (tmp_path / "out" / "images" / "00.png").read_bytes()


def test_s3_uri_needs_an_endpoint(monkeypatch):
    monkeypatch.delenv("PROXYTUNE_S3_ENDPOINT_URL", raising=False)
    with pytest.raises(ValueError, match="PROXYTUNE_S3_ENDPOINT_URL is not set"):
        open_s3_uri("s3://bucket/prefix")


def test_store_keys_come_only_from_the_environment(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        store_from_env()


def test_listings_give_sizes_and_dates_recursively_or_one_level(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes("a/x.bin", b"12345")
    store.put_bytes("a/b/y.bin", b"1")
    assert {k: v.size for k, v in store.listing("a/").items()} == {"a/b/y.bin": 1, "a/x.bin": 5}
    assert list(store.listing("a/", recursive=False)) == ["a/x.bin"]
    assert list(store.listing("", recursive=False)) == []
    assert abs(store.listing("a/")["a/x.bin"].modified - (tmp_path / "a" / "x.bin").stat().st_mtime) < 1e-6
