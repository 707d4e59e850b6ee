"""Classifier zoo: shapes, penultimate features, normalisation inside, rebuild from model.json."""

from __future__ import annotations

import json

import pytest
import torch

from csm.errors import CSMError
from csm.training.models import MODELS, Normalize, build_model, build_model_from_spec, model_spec


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


FEATURE_DIMS = {
    "cnn": 64,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "wrn28_10": 640,
    "densenet121": 1024,
}


def test_registry_lists_every_architecture_of_the_issue():
    assert set(MODELS) == set(FEATURE_DIMS)


@pytest.mark.parametrize("arch", sorted(FEATURE_DIMS))
def test_forward_features_and_head_compose_to_logits(arch):
    torch.manual_seed(0)
    model = build_model(arch, 7, 3, 8, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]).eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (2, FEATURE_DIMS[arch])
    assert logits.shape == (2, 7)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 7
    torch.testing.assert_close(model.head(feats), logits)


def test_cifar_resnet_has_3x3_stem_and_no_max_pool():
    model = build_model("resnet18", 10, 3, 32, [0.5] * 3, [0.25] * 3)
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # 11.17M parameters for a CIFAR ResNet-18 with 10 classes (the usual figure)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_cifar_resnet_width_scales_every_stage_and_round_trips():
    from csm.training.models import build_model_from_spec, model_spec

    model = build_model("resnet18", 10, 1, 16, [0.5], [0.25], width=32)
    assert model.stem[0].out_channels == 32 and model.head.in_features == 256
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(set(convs)) == [32, 64, 128, 256]
    full = build_model("resnet18", 10, 1, 16, [0.5], [0.25])
    n = sum(p.numel() for p in model.parameters())
    assert 0.24 < n / sum(p.numel() for p in full.parameters()) < 0.26  # a quarter (conv c^2)
    spec = model_spec("resnet18", 10, 1, 16, [0.5], [0.25], width=32)
    again = build_model_from_spec(spec)
    assert again.head.in_features == 256
    with pytest.raises(CSMError, match="width=0: give at least 1"):
        build_model("resnet18", 10, 1, 16, [0.5], [0.25], width=0)


def test_normalisation_is_inside_the_model_and_saved_with_the_weights():
    torch.manual_seed(0)
    mean, std = [0.3], [0.2]
    model = build_model("cnn", 4, 1, 8, mean, std).eval()
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        expected = model.head(model._features((x - 0.3) / 0.2))
        torch.testing.assert_close(model(x), expected)
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor([0.3]))
    assert torch.equal(state["normalize.std"].flatten(), torch.tensor([0.2]))


def test_spec_round_trip_rebuilds_the_same_network(tmp_path):
    torch.manual_seed(1)
    spec = model_spec("cnn", 3, 1, 8, [0.5], [0.25], width=8, norm="group", dropout=0.1)
    spec = json.loads(json.dumps(spec))  # what model.json stores
    a = build_model_from_spec(spec).eval()
    b = build_model_from_spec(spec).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in a.modules())


def test_hf_config_model_exposes_features_and_rebuilds_offline(tmp_path):
    from transformers import ViTConfig

    ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=4,
    ).save_pretrained(tmp_path / "vit")
    torch.manual_seed(0)
    spec = model_spec(f"hf:{tmp_path / 'vit'}", 5, 1, 16, [0.5], [0.25])
    assert spec["options"]["hf_config"]["image_size"] == 16  # adapted to the data
    assert spec["options"]["hf_config"]["num_channels"] == 1
    model = build_model_from_spec(json.loads(json.dumps(spec))).eval()
    (tmp_path / "vit" / "config.json").unlink()  # the run must not need the original config
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (3, 16) and logits.shape == (3, 5)
    torch.testing.assert_close(model.head(feats), logits)
    again = build_model_from_spec(spec).eval()
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again(x), logits)


def test_hf_config_json_file_and_conv_architecture(tmp_path):
    from transformers import ResNetConfig

    ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]).save_pretrained(tmp_path)
    model = build_model(f"hf:{tmp_path / 'config.json'}", 4, 3, 16, [0.5] * 3, [0.2] * 3).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.head(model.forward_features(x)), model(x))


def test_unknown_architecture_names_the_input():
    with pytest.raises(CSMError, match="model 'vgg11': unknown architecture"):
        build_model("vgg11", 10, 3, 32, [0.5] * 3, [0.2] * 3)


def test_missing_hf_config_names_the_input(tmp_path):
    with pytest.raises(CSMError, match="hf:.*nowhere"):
        build_model(f"hf:{tmp_path / 'nowhere'}", 10, 3, 32, [0.5] * 3, [0.2] * 3)


def test_bad_statistics_are_rejected():
    with pytest.raises(CSMError, match="std"):
        Normalize([0.5], [0.0])
    with pytest.raises(CSMError, match="normalisation"):
        build_model("cnn", 10, 3, 32, [0.5], [0.2])
    with pytest.raises(CSMError, match="norm 'layer'"):
        build_model("cnn", 10, 1, 8, [0.5], [0.2], norm="layer")


def test_hf_model_starts_from_pretrained_weights_offline(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(1)
    cfg = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=4,
        num_channels=1,
        num_labels=3,  # another label count: the head is initialised afresh
    )
    saved = ViTForImageClassification(cfg)
    saved.save_pretrained(tmp_path / "vit")
    torch.manual_seed(0)
    spec = model_spec(f"hf:{tmp_path / 'vit'}", 5, 1, 16, [0.5], [0.25], pretrained=True)
    model = build_model_from_spec(json.loads(json.dumps(spec)))
    want = saved.vit.embeddings.patch_embeddings.projection.weight
    got = model.net.vit.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(got, want)  # the backbone is the pretrained one
    assert model.head.out_features == 5
    body = {k: v for k, v in saved.state_dict().items() if not k.startswith("classifier")}
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in body.items())  # every backbone tensor
    fresh = build_model_from_spec(spec, load_pretrained=False)  # a saved run: no download
    assert not torch.equal(fresh.net.vit.embeddings.patch_embeddings.projection.weight, want)
    with pytest.raises(CSMError, match="pretrained=1"):
        build_model_from_spec({**spec, "options": {**spec["options"], "pretrained": 1}})
    with pytest.raises(CSMError, match="cannot load pretrained"):
        build_model_from_spec({**spec, "arch": f"hf:{tmp_path / 'gone'}"})


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    import sys

    from csm.annotation.encoders import load_encoder

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(CSMError, match=r"pip install 'csm\[hf\]'"):
        model_spec(f"hf:{tmp_path}", 5, 1, 16, [0.5], [0.25])
    with pytest.raises(CSMError, match=r"encoder 'clip:x'.*csm\[hf\]"):
        load_encoder("clip:x", device="cpu")
