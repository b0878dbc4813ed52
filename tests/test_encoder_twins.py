"""Real-shape twins of the evaluation encoders: each published configuration (kept as data in
`proxytune/backends/configs/`) with one layer and random weights, saved in the hub's folder
layout and loaded back through the registered backend, run at the real resolution."""

import pytest
import torch
from PIL import Image

from proxytune.backends._base import ModelSource
from proxytune.backends._checkpoints import published_config
from proxytune.backends._tokenizers import tiny_clip_tokenizer
from proxytune.core.registry import ENCODERS
from tests.conftest import CPU, EXAMPLE


def one_layer_clip(spec):
    from transformers import CLIPConfig, CLIPModel

    config = dict(spec["config"])
    for tower in ("text_config", "vision_config"):
        config[tower] = {**config[tower], "num_hidden_layers": 1}
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(**config)), tiny_clip_tokenizer(max_length=77)


def one_layer_dino(spec):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    return ViTModel(ViTConfig(**{**spec["config"], "num_hidden_layers": 1}), add_pooling_layer=False)


@pytest.fixture(scope="module")
def photos():
    return [Image.open(p).convert("RGB") for p in sorted(EXAMPLE.glob("*.jpg"))[:2]]


def test_the_clip_twin_loads_from_the_hub_layout_and_embeds_at_224_px(tmp_path, photos):
    spec = published_config("clip-vit-b32")
    model, tokenizer = one_layer_clip(spec)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    layout = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= layout

    encoder = ENCODERS.create("clip-vit-b32")
    assert encoder.source.id == spec["hub_id"]
    encoder.load(CPU, ModelSource(str(tmp_path)))
    vision, text = encoder.model.config.vision_config, encoder.model.config.text_config
    assert (encoder.size, vision.patch_size, vision.hidden_size) == (224, 32, 768)
    assert (text.vocab_size, text.hidden_size, text.max_position_embeddings) == (49408, 512, 77)
    assert encoder.describe() == {"backend": "clip-vit-b32", "source": str(tmp_path), "revision": "local"}

    images = encoder.embed_images(photos)
    texts = encoder.embed_texts(["a dog in the jungle", "a dog"])
    assert images.shape == texts.shape == (2, spec["config"]["projection_dim"])
    for features in (images, texts):
        assert torch.allclose(features.norm(dim=-1), torch.ones(2))
    with torch.no_grad():  # the reloaded weights are the saved ones
        pixels = torch.randn(1, 3, 224, 224)
        before = model.get_image_features(pixel_values=pixels).pooler_output
        after = encoder.model.get_image_features(pixel_values=pixels).pooler_output
    assert torch.allclose(before, after, atol=1e-6)


def test_the_dino_twin_loads_from_the_hub_layout_and_embeds_the_cls_token_at_224_px(tmp_path, photos):
    spec = published_config("dino-vits16")
    model = one_layer_dino(spec)
    model.save_pretrained(tmp_path)
    encoder = ENCODERS.create("dino-vits16")
    assert encoder.source.id == spec["hub_id"]
    encoder.load(CPU, ModelSource(str(tmp_path)))
    config = encoder.model.config
    assert (encoder.size, config.patch_size, config.hidden_size, config.qkv_bias) == (224, 16, 384, True)

    features = encoder.embed_images(photos)
    assert features.shape == (2, 384) and torch.allclose(features.norm(dim=-1), torch.ones(2))
    with torch.no_grad():  # 14 x 14 patches + CLS at 224 px: the real token count
        hidden = encoder.model(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert hidden.shape == (1, 1 + 14 * 14, 384)
