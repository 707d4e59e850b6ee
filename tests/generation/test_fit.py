"""Tests for ``csm fit-diffusion`` (tiny preset on the embedded digits dataset)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import csm.generation.fit as fd
from csm.cli import main
from csm.config import resolve_config
from csm.errors import CSMError
from csm.generation.fit import FitDiffusionConfig, fit_diffusion, image_grid
from csm.generation.pipeline import CSMMixingPipeline


def _cfg(out, **kw) -> FitDiffusionConfig:
    base = dict(
        dataset="digits",
        out=str(out),
        preset="tiny",
        steps=6,
        batch_size=8,
        checkpoint_every=3,
        grid_per_class=2,
        grid_steps=2,
    )
    base.update(kw)
    return resolve_config(FitDiffusionConfig, overrides=base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("fd") / "model"
    fit_diffusion(_cfg(out))
    return out


def test_output_is_a_loadable_pipeline_with_class_names_and_config(trained):
    pipe = CSMMixingPipeline.from_pretrained(trained)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.class_names == [str(i) for i in range(10)]
    assert pipe.unet.config.num_class_embeds == 11  # 10 classes + null row
    rec = json.loads((trained / "training_config.json").read_text())
    assert rec["dataset_spec"] == "digits" and rec["steps_done"] == 6
    assert rec["preset"] == "tiny" and rec["ema_decay"] == fd.PRESETS["tiny"].ema_decay
    assert (trained / "config.yaml").is_file()
    assert pipe.training_config()["class_names"] == pipe.class_names
    assert not (trained / "checkpoints").exists()
    grid = Image.open(trained / "samples.png")
    scale = 64 // 8
    assert grid.size == ((2 * 9 + 1) * scale, (10 * 9 + 1) * scale)  # 2 per class, 10 rows
    out = pipe(
        [3, 3],
        [5, 5],
        [1.0, 0.5],
        generator=[torch.Generator().manual_seed(0)] * 2,
        num_inference_steps=2,
        guidance_scale=2.0,
    ).images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_training_is_deterministic_and_resume_is_exact(trained, tmp_path, monkeypatch):
    ref = load_file(trained / "unet" / "diffusion_pytorch_model.safetensors")
    out = tmp_path / "interrupted"
    real = fd._step_generator

    def crash_at_4(seed, step, rank):
        if step == 4:
            raise KeyboardInterrupt
        return real(seed, step, rank)

    monkeypatch.setattr(fd, "_step_generator", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        fit_diffusion(_cfg(out))
    monkeypatch.setattr(fd, "_step_generator", real)
    assert [p.name for p in fd._checkpoints(out)] == ["step-0000003"]
    assert not (out / "model_index.json").exists()  # no half-written model
    with pytest.raises(CSMError, match="--resume"):
        fit_diffusion(_cfg(out))  # unfinished run in the way
    with pytest.raises(CSMError, match="steps=6"):
        fit_diffusion(_cfg(out, resume=True, steps=7))  # options differ from the checkpoint
    fit_diffusion(_cfg(out, resume=True))
    got = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    assert json.loads((out / "training_config.json").read_text())["resumed_from_step"] == 3


def test_existing_model_needs_overwrite(trained):
    with pytest.raises(CSMError, match="already holds a trained model"):
        fit_diffusion(_cfg(trained))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"preset": "huge"}, "--preset 'huge'"),
        ({"dataset": ""}, "--dataset"),
        ({"label_dropout": 1.0}, "--label-dropout 1.0"),
        ({"steps": 0}, "--steps 0"),
        ({"image_size": 9}, "--image-size 9"),
    ],
)
def test_bad_options_fail_before_writing(tmp_path, overrides, needle):
    out = tmp_path / "m"
    with pytest.raises(CSMError, match=needle.replace("(", r"\(")):
        fit_diffusion(_cfg(out, **overrides))
    assert not out.exists()


def test_cli_reports_error_and_exit_code(tmp_path, capsys):
    code = main(
        ["fit-diffusion", "--dataset", "digits", "--preset", "huge", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("csm: error: --preset 'huge'") and len(err.strip().splitlines()) == 1


def test_image_grid_layout():
    imgs = torch.zeros(3, 1, 2, 2)
    imgs[1] = 1.0
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert (g[1:3, 4:6] == 255).all() and (g[1:3, 1:3] == 0).all() and (g[4:6, 1:3] == 0).all()
    assert (g[0] == 255).all()  # padding
