import json

import numpy as np
import pytest
from PIL import Image

import proxytune.stages.proxy
from proxytune.backends.stable_diffusion import StableDiffusionSupervisor
from proxytune.core.contracts import ProxyInfo, read_manifest
from proxytune.core.params import ProxyParams
from proxytune.core.storage import LocalStore
from proxytune.stages.proxy import generate_proxy, load_proxy, merge_proxy
from tests.conftest import CPU

SMALL = ProxyParams(num_images=8, batch_size=4, inference_steps=2, shard_size=5)


@pytest.fixture
def interrupt_after(monkeypatch):
    """Make the supervisor fail on its n-th generate call (a preempted pod)."""

    def arm(calls_allowed: int) -> list[int]:
        original = StableDiffusionSupervisor.generate
        calls = []

        def generate(self, prompts, seeds, steps, guidance_scale):
            calls.append(len(prompts))
            if len(calls) > calls_allowed:
                raise KeyboardInterrupt("preempted")
            return original(self, prompts, seeds, steps, guidance_scale)

        monkeypatch.setattr(StableDiffusionSupervisor, "generate", generate)
        return calls

    return arm


def test_proxy_dataset_follows_the_contract(proxy_dir, supervisor_dir):
    info, records = load_proxy(proxy_dir)
    assert info.complete and info.num_images == len(records) == 16
    lines = [json.loads(line) for line in (proxy_dir / "manifest.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"file", "prompt", "seed", "supervisor"}
    assert [r.seed for r in records] == list(range(16))
    assert {r.prompt for r in records} == {"a sks dog"}
    assert records[3].file == "shard-00000/000003.png"
    assert records[0].supervisor.startswith("tiny-sd@")
    with Image.open(proxy_dir / records[0].file) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")


def test_an_interrupted_run_resumes_where_it_stopped(supervisor_dir, tmp_path, interrupt_after):
    calls = interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        generate_proxy(supervisor_dir, tmp_path / "proxy", SMALL, device=CPU)
    assert [r.file for r in read_manifest(tmp_path / "proxy")] == [
        f"shard-00000/{i:06d}.png" for i in range(4)
    ]
    assert not ProxyInfo.read(tmp_path / "proxy" / "proxy.json").complete
    first = (tmp_path / "proxy" / "shard-00000" / "000000.png").read_bytes()

    calls.clear()
    interrupt_after(99)
    info = generate_proxy(supervisor_dir, tmp_path / "proxy", SMALL, device=CPU)
    assert info.complete
    _, records = load_proxy(tmp_path / "proxy")
    assert [r.seed for r in records] == list(range(8))
    assert records[5].file == "shard-00001/000005.png"
    assert (tmp_path / "proxy" / "shard-00000" / "000000.png").read_bytes() == first


def test_the_store_resumes_across_machines_and_reuses_complete_datasets(
    supervisor_dir, tmp_path, interrupt_after, monkeypatch
):
    store = LocalStore(tmp_path / "store")
    calls = interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        generate_proxy(supervisor_dir, tmp_path / "pod-1", SMALL, store=store, device=CPU)
    calls.clear()
    interrupt_after(99)
    generate_proxy(supervisor_dir, tmp_path / "pod-2", SMALL, store=store, device=CPU)
    assert calls == [4]  # only the images pod-1 had not finished

    def no_supervisor(*args, **kwargs):
        raise AssertionError("a complete proxy dataset must be reused without loading the supervisor")

    monkeypatch.setattr(proxytune.stages.proxy, "load_supervisor", no_supervisor)
    generate_proxy(supervisor_dir, tmp_path / "rerun", SMALL, store=store, device=CPU)
    for record in read_manifest(tmp_path / "pod-2"):
        assert (tmp_path / "rerun" / record.file).read_bytes() == (
            tmp_path / "pod-2" / record.file
        ).read_bytes()


def test_a_folder_of_another_recipe_is_refused(supervisor_dir, tmp_path):
    generate_proxy(supervisor_dir, tmp_path / "proxy", SMALL.model_copy(update={"num_images": 2}), device=CPU)
    with pytest.raises(ValueError, match="holds a different proxy dataset"):
        generate_proxy(
            supervisor_dir, tmp_path / "proxy", SMALL.model_copy(update={"guidance_scale": 2.0}), device=CPU
        )


def test_load_proxy_refuses_incomplete_datasets(supervisor_dir, tmp_path, interrupt_after):
    interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        generate_proxy(supervisor_dir, tmp_path / "proxy", SMALL, device=CPU)
    with pytest.raises(ValueError, match="incomplete proxy dataset"):
        load_proxy(tmp_path / "proxy")


def pixels(folder, records):
    return np.stack([np.asarray(Image.open(folder / r.file), dtype=np.int16) for r in records])


def test_shards_draw_disjoint_blocks_and_merge_into_the_unsharded_dataset(supervisor_dir, tmp_path):
    whole = generate_proxy(supervisor_dir, tmp_path / "whole", SMALL, device=CPU)
    sharded = SMALL.model_copy(update={"shards": 3})
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    infos = [
        generate_proxy(supervisor_dir, part, sharded, device=CPU, shard=k) for k, part in enumerate(parts)
    ]
    assert [info.part for info in infos] == [[0, 3], [1, 3], [2, 3]]
    assert [[r.seed for r in read_manifest(p)] for p in parts] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    with pytest.raises(ValueError, match="part 1 of 3 of a proxy dataset: merge the parts"):
        load_proxy(parts[1])
    merged = merge_proxy(list(reversed(parts)), tmp_path / "merged")
    assert merged == whole
    assert (tmp_path / "merged" / "manifest.jsonl").read_text() == (
        tmp_path / "whole" / "manifest.jsonl"
    ).read_text()
    _, records = load_proxy(tmp_path / "merged")
    # equal up to the float rounding of batched kernels (other batch neighbours)
    assert np.abs(pixels(tmp_path / "merged", records) - pixels(tmp_path / "whole", records)).max() <= 2


def test_merging_refuses_missing_repeated_or_foreign_parts(supervisor_dir, tmp_path):
    sharded = SMALL.model_copy(update={"shards": 2, "num_images": 4})
    parts = [
        generate_proxy(supervisor_dir, tmp_path / f"p{k}", sharded, device=CPU, shard=k) for k in range(2)
    ]
    assert all(p.complete for p in parts)
    with pytest.raises(ValueError, match=r"cover shards \[0\]"):
        merge_proxy([tmp_path / "p0"], tmp_path / "m1")
    with pytest.raises(ValueError, match=r"cover shards \[0, 0\]"):
        merge_proxy([tmp_path / "p0", tmp_path / "p0"], tmp_path / "m2")
    other = sharded.model_copy(update={"guidance_scale": 2.0})
    generate_proxy(supervisor_dir, tmp_path / "q1", other, device=CPU, shard=1)
    with pytest.raises(ValueError, match="parts of different datasets"):
        merge_proxy([tmp_path / "p0", tmp_path / "q1"], tmp_path / "m3")
    assert not any((tmp_path / m).exists() for m in ("m1", "m2", "m3"))


def test_a_shard_killed_midway_resumes_from_the_store_with_no_duplicates(
    supervisor_dir, tmp_path, interrupt_after
):
    store = LocalStore(tmp_path / "store")
    sharded = SMALL.model_copy(update={"shards": 2, "batch_size": 2})
    calls = interrupt_after(1)
    with pytest.raises(KeyboardInterrupt):
        generate_proxy(supervisor_dir, tmp_path / "pod-1", sharded, store=store, device=CPU, shard=1)
    calls.clear()
    interrupt_after(99)
    info = generate_proxy(supervisor_dir, tmp_path / "pod-2", sharded, store=store, device=CPU, shard=1)
    assert calls == [2]  # the second half of shard 1 only
    records = read_manifest(tmp_path / "pod-2")
    assert [r.seed for r in records] == [4, 5, 6, 7] and info.complete
    on_disk = sorted(
        p.relative_to(tmp_path / "pod-2").as_posix() for p in (tmp_path / "pod-2").rglob("*.png")
    )
    assert on_disk == [r.file for r in records]


def test_shards_beyond_the_image_count_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="shards: 9 shards for 8 images"):
        ProxyParams(num_images=8, shards=9)


def test_a_prompt_bank_cycles_and_evaluation_prompts_are_marked(supervisor_dir, tmp_path, caplog):
    bank = ["a {identifier} {class_noun} on a sofa", "a {identifier} {class_noun} in the snow"]
    params = SMALL.model_copy(update={"num_images": 6, "prompt_bank": bank})
    generate_proxy(supervisor_dir, tmp_path / "proxy", params, device=CPU)
    records = read_manifest(tmp_path / "proxy")
    assert [r.prompt for r in records[:3]] == ["a sks dog", "a sks dog on a sofa", "a sks dog in the snow"]
    assert [r.evaluation_prompt for r in records] == [None, None, True] * 2
    assert "'a sks dog in the snow' is a DreamBench evaluation prompt" in caplog.text
    with pytest.raises(ValueError, match=r"prompt_bank\[0\] must contain \{identifier\}"):
        ProxyParams(prompt_bank=["a dog"])


def test_an_optional_filter_keeps_the_images_most_like_the_subject(supervisor_dir, subject_dir, tmp_path):
    from proxytune.core.registry import ENCODERS
    from proxytune.stages.ingest import load_subject
    from proxytune.stages.proxy import Selection

    generate_proxy(supervisor_dir, tmp_path / "drawn", SMALL, device=CPU)
    encoder = ENCODERS.create("tiny-dino")
    encoder.load(CPU)
    _, photos = load_subject(subject_dir)
    info = merge_proxy([tmp_path / "drawn"], tmp_path / "kept", selection=Selection(photos, encoder, 0.5))
    _, drawn = load_proxy(tmp_path / "drawn")
    references = encoder.embed_images(photos)
    expected = {
        r.file: (encoder.embed_images([Image.open(tmp_path / "drawn" / r.file)]) @ references.T).mean().item()
        for r in drawn
    }
    best = sorted(expected, key=expected.get, reverse=True)[:4]
    loaded, kept = load_proxy(tmp_path / "kept")
    assert [r.file for r in kept] == sorted(best) and loaded == info
    assert all(r.scores["dino"] == pytest.approx(expected[r.file], abs=1e-5) for r in kept)
    assert info.selection == {"encoder": "tiny-dino", "keep_fraction": 0.5, "drawn": 8}
    assert info.key != ProxyInfo.read(tmp_path / "drawn" / "proxy.json").key
    unfiltered = merge_proxy([tmp_path / "drawn"], tmp_path / "all")
    assert unfiltered == ProxyInfo.read(tmp_path / "drawn" / "proxy.json")
