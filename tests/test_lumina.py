"""Lumina-mGPT specifics on `tiny-lumina`: image tokens by name, the release's weight layout,
and Chameleon's VQGAN with its decoder (converted from Meta's checkpoint format)."""

import re

import pytest
import torch
from safetensors import safe_open

from proxytune.backends._base import ModelSource
from proxytune.backends._vqgan import ChameleonVQGAN, convert_checkpoint
from proxytune.backends.lumina import image_token_codes, image_token_name
from proxytune.cli import main
from proxytune.core.registry import STUDENTS
from tests.conftest import CPU


@pytest.fixture(scope="module")
def lumina():
    backend = STUDENTS.create("tiny-lumina")
    backend.load(CPU)
    return backend


@pytest.fixture(scope="module")
def release(lumina, tmp_path_factory):
    """tiny-lumina saved in the release's layout (with its VQGAN in vqgan/)."""
    folder = tmp_path_factory.mktemp("release")
    lumina.save(folder)
    return folder


def test_image_tokens_are_read_from_their_names():
    assert image_token_name(0) == "IMGIMGAZ" and image_token_name(8191) == "IMGIMGIBJBZ"
    vocab = {"<s>": 0, "IMGIMGBZ": 7, "IMGIMGAZ": 9, "IMGIMGCZ": 5, "IMGIMGnotacode": 4}
    assert image_token_codes(vocab).tolist() == [9, 7, 5]
    with pytest.raises(ValueError, match=r"do not cover codes 0\.\.1"):
        image_token_codes({"IMGIMGAZ": 4, "IMGIMGCZ": 5})


def test_the_layout_comes_from_the_tokenizer_not_from_fixed_ids(lumina):
    vocab = lumina.tokenizer.get_vocab()
    assert (
        lumina.code_ids[:3].tolist()
        == [vocab["IMGIMGAZ"], vocab["IMGIMGBZ"], vocab["IMGIMGCZ"]]
        == [10, 11, 12]
    )
    (rows, cols), row_end = (lumina.block.rows, lumina.block.cols), vocab["<reserved08799>"]
    assert (rows, cols) == (16, 16)
    assert lumina.block.template.tolist() == [
        *(16 * [-1] + [row_end]) * 16,
        vocab["<eoss>"],
        vocab["<reserved08706>"],
    ]
    size = vocab["<reserved08808>"]  # 256 px = 8 grids of 32 px
    assert lumina.prompt_ids("x", unconditional=True) == [vocab["<racm3:break>"], size, size]
    prompt = lumina.prompt_ids("a sks teapot", unconditional=False)
    text = lumina.tokenizer.decode(prompt[1:-4])
    assert prompt[0] == vocab["<s>"] and prompt[-4] == vocab["<reserved08706>"]
    assert text == "Generate an image of 256x256 according to the following prompt:\na sks teapot"


def test_teacher_forcing_targets_carry_the_row_and_end_tokens(lumina):
    codes = torch.arange(256).view(1, 256)
    block = lumina.block.fill(lumina.code_ids[codes])
    vocab = lumina.tokenizer.get_vocab()
    assert block.shape == (1, 16 * 17 + 2)
    assert (
        block[0, 16].item() == vocab["<reserved08799>"] and block[0, 17].item() == lumina.code_ids[16].item()
    )
    assert block[0, -2:].tolist() == [vocab["<eoss>"], vocab["<reserved08706>"]]


def test_the_release_stores_one_qk_norm_per_shard_and_loading_repeats_it(lumina, release):
    with safe_open(release / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_norm.weight").get_shape() == [1, 16]
        assert not any(key.startswith("model.vqmodel.") for key in f.keys())  # noqa: SIM118 (no __iter__)
    with torch.no_grad():
        lumina.model.model.layers[0].self_attn.q_norm.weight.mul_(2.0)  # visible after the round trip
    try:
        lumina.save(release.parent / "scaled")
        loaded = STUDENTS.create("tiny-lumina")
        loaded.load(CPU, ModelSource(str(release.parent / "scaled")))
    finally:
        with torch.no_grad():
            lumina.model.model.layers[0].self_attn.q_norm.weight.div_(2.0)
    norm = loaded.model.model.layers[0].self_attn.q_norm.weight
    assert norm.shape == (4, 16) and torch.equal(norm, torch.full((4, 16), 2.0))
    assert loaded.revision is None and not hasattr(loaded.model.model, "vqmodel")


def test_saving_refuses_norms_that_differ_between_heads(lumina, tmp_path):
    with torch.no_grad():
        lumina.model.model.layers[1].self_attn.k_norm.bias[2] += 1.0
    try:
        with pytest.raises(ValueError, match=r"k_norm\.bias differs between heads"):
            lumina.save(tmp_path)
    finally:
        with torch.no_grad():
            lumina.model.model.layers[1].self_attn.k_norm.bias[2] -= 1.0


def test_a_release_without_its_vqgan_is_refused_with_what_to_do(release, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in release.iterdir():
        if path.name != "vqgan":
            (bare / path.name).symlink_to(path)
    with pytest.raises(
        ValueError, match=re.escape("set student.vq_source to a folder made by `proxytune convert-vqgan`")
    ):
        STUDENTS.create("tiny-lumina").load(CPU, ModelSource(str(bare)))
    loaded = STUDENTS.create("tiny-lumina")
    loaded.load(CPU, ModelSource(str(bare), vq=str(release / "vqgan")))
    assert loaded.loaded_source.vq == str(release / "vqgan")


def meta_checkpoint(vqgan: ChameleonVQGAN, folder):
    """Write `vqgan` the way Meta's release ships it: a Lightning-style vqgan.ckpt and vqgan.yaml."""
    import yaml

    config = vqgan.config
    state = {**vqgan.state_dict(), "loss.discriminator.main.0.weight": torch.zeros(2)}
    torch.save({"state_dict": state, "global_step": 7}, folder / "vqgan.ckpt")
    ddconfig = {
        "double_z": config.double_latent,
        "z_channels": config.latent_channels,
        "resolution": config.resolution,
        "in_channels": 3,
        "out_ch": 3,
        "ch": config.base_channels,
        "ch_mult": list(config.channel_multiplier),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    params = {"embed_dim": config.embed_dim, "n_embed": config.num_embeddings, "ddconfig": ddconfig}
    (folder / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))


def test_meta_checkpoints_convert_to_the_vqgan_folder(lumina, tmp_path, capsys):
    meta_checkpoint(lumina.vqgan, tmp_path)
    out = tmp_path / "converted"
    argv = ["--checkpoint", str(tmp_path / "vqgan.ckpt"), "--config", str(tmp_path / "vqgan.yaml")]
    assert main(["convert-vqgan", *argv, "--out", str(out)]) == 0
    assert f"--set student.vq_source={out}" in capsys.readouterr().out.replace("\n", "")
    converted = ChameleonVQGAN.load(out)
    for (name, a), (_, b) in zip(
        lumina.vqgan.state_dict().items(), converted.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_checkpoints_that_need_unpickling_code_are_refused(lumina, tmp_path):
    meta_checkpoint(lumina.vqgan, tmp_path)
    torch.save({"state_dict": {}, "callbacks": ModelSource("x")}, tmp_path / "vqgan.ckpt")
    with pytest.raises(ValueError, match="cannot be read as plain weights"):
        convert_checkpoint(tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml", tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


def test_the_decoder_has_the_names_and_shapes_of_meta_s_checkpoint():
    from proxytune.backends._checkpoints import published_config

    with torch.device("meta"):
        vqgan = ChameleonVQGAN.from_config_dict(published_config("lumina-mgpt-7b-768")["vq_config"])
    shapes = {k: tuple(v.shape) for k, v in vqgan.state_dict().items()}
    assert shapes["decoder.conv_in.weight"] == (512, 256, 3, 3)
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == (256, 512, 1, 1)
    assert shapes["decoder.up.1.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert shapes["decoder.up.4.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert shapes["quantize.embedding.weight"] == (8192, 256)
    assert shapes["post_quant_conv.weight"] == (256, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert {k.split(".")[4] for k in shapes if k.startswith("decoder.up.") and ".block." in k} == {
        "0",
        "1",
        "2",
    }
    assert not any(".attn." in k for k in shapes if k.startswith("decoder.up."))


def test_decoding_upsamples_sixteen_times(lumina):
    codes = torch.randint(0, 256, (2, 256))
    with torch.no_grad():
        pixels = lumina.decode_codes(codes)
    assert pixels.shape == (2, 3, 256, 256) and pixels.dtype == torch.float32


def test_sampling_sees_a_head_changed_in_place(lumina):
    hidden = torch.randn(1, 64)
    before = lumina.code_logits(hidden)
    head = lumina.model.lm_head.weight
    with torch.no_grad():
        head[lumina.code_ids[0]] += 1.0
    try:
        after = lumina.code_logits(hidden)
        assert torch.allclose(after[0, 1:], before[0, 1:]) and not torch.allclose(after[0, 0], before[0, 0])
    finally:
        with torch.no_grad():
            head[lumina.code_ids[0]] -= 1.0
