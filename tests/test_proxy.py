import json

import pytest
from PIL import Image

import proxytune.proxy
from proxytune.backends.stable_diffusion import StableDiffusionSupervisor
from proxytune.config import ProxyParams
from proxytune.contracts import ProxyInfo
from proxytune.proxy import generate_proxy, load_proxy, read_manifest
from proxytune.storage import LocalStore
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

    monkeypatch.setattr(proxytune.proxy, "load_supervisor", no_supervisor)
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
