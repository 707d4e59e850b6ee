"""Tests for the reannotation encoders, with tiny random models saved inside the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from csm.annotation.encoders import ClassifierEncoder, load_encoder
from csm.errors import CSMError
from tests.helpers import make_run, tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(n=5, c=3, s=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)


def test_clip_encoder_matches_transformers_processor(clip_dir):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    enc = load_encoder(f"clip:{clip_dir}", "cpu")
    imgs = _images()
    feats = enc.encode(imgs)
    model = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_dir)
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in imgs]
    with torch.no_grad():
        ref = model(**proc(images=pil, return_tensors="pt")).image_embeds
    assert feats.shape == (5, 16)
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)
    # grayscale 16 px images are upsampled to 32 and repeated to 3 channels
    small = enc.encode(_images(2, 1, 16))
    assert small.shape == (2, 16) and torch.isfinite(small).all()
    assert enc.fingerprint() == load_encoder(f"clip:{clip_dir}", "cpu").fingerprint()


def test_hf_encoder_pools_features(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    ViTModel(cfg).save_pretrained(tmp_path / "vit")
    enc = load_encoder(f"hf:{tmp_path / 'vit'}", "cpu")
    imgs = _images(3, 3, 16)
    model = ViTModel.from_pretrained(tmp_path / "vit").eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(pixel_values=(imgs.float() / 255 - mean) / std).pooler_output
    torch.testing.assert_close(enc.encode(imgs), ref, atol=1e-5, rtol=1e-5)


def test_classifier_encoder_uses_penultimate_features(tmp_path):
    from csm.training.runs import load_run

    run = make_run(tmp_path / "run", [str(i) for i in range(4)])
    enc = load_encoder(f"classifier:{run}", "cpu")
    assert isinstance(enc, ClassifierEncoder) and enc.can_classify
    assert enc.class_names == ["0", "1", "2", "3"]
    imgs = _images(6, 1, 8)
    model = load_run(run).model
    with torch.no_grad():
        x = imgs.float() / 255
        torch.testing.assert_close(enc.encode(imgs), model.forward_features(x))
        torch.testing.assert_close(enc.logits(imgs), model(x))
    # other sizes and RGB input are adapted to the run's 8 px grayscale input
    assert enc.encode(_images(2, 3, 16)).shape == (2, model.num_features)


@pytest.mark.parametrize("spec", ["clip", "nope:thing", "hf:", "sift:x"])
def test_unknown_encoder_spec(spec):
    with pytest.raises(CSMError, match="unknown encoder spec"):
        load_encoder(spec)


def test_missing_models_are_clear_errors(tmp_path):
    with pytest.raises(CSMError, match="cannot load"):
        load_encoder(f"clip:{tmp_path / 'missing'}", "cpu")
    with pytest.raises(CSMError, match="not a directory"):
        load_encoder(f"classifier:{tmp_path / 'missing'}", "cpu")
    (tmp_path / "half").mkdir()
    with pytest.raises(CSMError, match="missing"):
        load_encoder(f"classifier:{tmp_path / 'half'}", "cpu")
    with pytest.raises(CSMError, match="device='gpu0'"):
        load_encoder(f"classifier:{tmp_path / 'half'}", "gpu0")


def test_classifier_encoder_knows_its_split_and_annotate_warns_on_another(tmp_path, caplog):
    import csm.annotation.annotate as annotate_module
    from csm.annotation.annotate import AnnotateConfig
    from csm.data.real import load_real
    from csm.training.config import TrainConfig

    cfg = TrainConfig(dataset="digits", seed=100, out=str(tmp_path / "run"))  # data_seed: seed
    names = [str(i) for i in range(10)]
    run = make_run(tmp_path / "run", names, cfg=cfg)
    enc = load_encoder(f"classifier:{run}", "cpu")
    assert enc.split == {
        "dataset": "digits",
        "seed": 100,
        "val_fraction": 0.1,
        "test_fraction": 0.2,
        "train_per_class": None,
    }
    ann = AnnotateConfig(dataset="syn", real="digits", real_seed=0, encoder=f"classifier:{run}")
    with caplog.at_level("WARNING"):
        annotate_module._warn_other_split(enc, load_real("digits", seed=0), ann)
    assert "trained on another split of digits than --real's: seed 100 (--real: 0)" in caplog.text
    caplog.clear()
    # a larger --real-train-per-class than the encoder's subset: it saw only --real's images
    sub = TrainConfig(dataset="digits", seed=100, train_per_class=15, out=str(tmp_path / "sub"))
    enc_sub = load_encoder(f"classifier:{make_run(tmp_path / 'sub', names, cfg=sub)}", "cpu")
    with caplog.at_level("WARNING"):
        annotate_module._warn_other_split(enc_sub, load_real("digits", seed=100), ann)
    assert "train_per_class" not in caplog.text and caplog.text == ""
    with caplog.at_level("WARNING"):
        real_sub = load_real("digits", seed=100, val_fraction=0.3)
        annotate_module._warn_other_split(enc_sub, real_sub, ann)
    assert "val_fraction 0.1 (--real: 0.3)" in caplog.text
    caplog.clear()
    same = AnnotateConfig(dataset="syn", real="digits", real_seed=100, encoder=f"classifier:{run}")
    with caplog.at_level("WARNING"):
        annotate_module._warn_other_split(enc, load_real("digits", seed=100), same)
    assert caplog.text == ""
