"""Tests for ``csm fit-diffusion`` (tiny preset on the embedded digits dataset)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
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
from tests.helpers import launch_two


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
    lrs, losses = _log(trained)  # one row per optimizer step: warm-up (5 steps), then cosine
    peak = fd.PRESETS["tiny"].lr
    assert lrs == pytest.approx([peak * s / 5 for s in range(5)] + [peak])
    assert len(losses) == 6 and all(0 < v < 10 for v in losses)
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

    def crash_at_4(seed, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(seed, step)

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
    assert (out / "training_log.csv").read_text() == (trained / "training_log.csv").read_text()


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
        ({"prediction_type": "sample"}, "--prediction-type 'sample'"),
        ({"snr_gamma": -1.0}, "--snr-gamma -1.0"),
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


def _log(out: Path) -> tuple[list[float], list[float]]:
    rows = list(csv.DictReader((out / "training_log.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows] == list(range(len(rows)))
    return [float(r["lr"]) for r in rows], [float(r["loss"]) for r in rows]


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate launch multi-process on linux")
def test_two_processes_train_one_model_with_the_lr_trace_of_one(tmp_path):
    opts = dict(steps=4, batch_size=8, warmup_steps=1, checkpoint_every=2, grid_per_class=1)
    one = fit_diffusion(_cfg(tmp_path / "one", grid_steps=1, **opts))
    args = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    launch_two(
        "-m", "csm", "fit-diffusion", "--dataset", "digits", "--preset", "tiny",
        "--grid-steps", "1", "--out", str(tmp_path / "two"), *args,
    )  # fmt: skip
    two = tmp_path / "two"
    assert json.loads((two / "training_config.json").read_text())["num_processes"] == 2
    lr1, loss1 = _log(one)
    lr2, loss2 = _log(two)
    # one schedule step per optimizer step: warm-up to the peak, then cosine down (not back up)
    assert lr2 == lr1 and len(lr2) == 4
    assert lr2[0] == 0.0 and lr2[1] == pytest.approx(2e-3) and lr2[1] > lr2[2] > lr2[3] > 0
    # the loss is averaged over both ranks' halves of the global batch: equal to one process's,
    # which neither half alone gives; DDP keeps one model, so the weights agree too
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    w1 = load_file(one / "unet" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(two / "unet" / "diffusion_pytorch_model.safetensors")
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=1e-4)


def test_image_grid_layout():
    imgs = torch.zeros(3, 1, 2, 2)
    imgs[1] = 1.0
    g = image_grid(imgs, nrow=2, pad=1)
    assert g.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert (g[1:3, 4:6] == 255).all() and (g[1:3, 1:3] == 0).all() and (g[4:6, 1:3] == 0).all()
    assert (g[0] == 255).all()  # padding


def test_diffusion_loss_targets_and_min_snr_weights_match_hand_computation():
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 6, 6, generator=g)
    noise = torch.randn(4, 1, 6, 6, generator=g)
    pred = torch.randn(4, 1, 6, 6, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    eps = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    xt = eps.add_noise(x0, noise, t)
    assert fd.diffusion_loss(eps, pred, xt, noise, t) == pytest.approx(
        float(((pred - noise) ** 2).mean()), rel=1e-6
    )
    a = eps.alphas_cumprod[t].double()
    snr = a / (1 - a)
    per = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).double()
    want = float((per * snr.clamp(max=5.0) / snr).mean())
    assert fd.diffusion_loss(eps, pred, xt, noise, t, snr_gamma=5.0) == pytest.approx(
        want, rel=1e-5
    )
    v = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    )
    target = a.sqrt().view(-1, 1, 1, 1) * noise - (1 - a).sqrt().view(-1, 1, 1, 1) * x0
    per_v = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert fd.diffusion_loss(v, pred, xt, noise, t) == pytest.approx(float(per_v.mean()), rel=1e-4)
    want_v = float((per_v * snr.clamp(max=5.0) / (snr + 1)).mean())
    assert fd.diffusion_loss(v, pred, xt, noise, t, snr_gamma=5.0) == pytest.approx(
        want_v, rel=1e-4
    )


def test_v_prediction_model_saves_its_prediction_type_and_samples(tmp_path):
    out = fit_diffusion(_cfg(tmp_path / "v", prediction_type="v_prediction", snr_gamma=5.0))
    pipe = CSMMixingPipeline.from_pretrained(out)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    record = json.loads((out / "training_config.json").read_text())
    assert (record["prediction_type"], record["snr_gamma"]) == ("v_prediction", 5.0)
    images = pipe(
        [0, 1],
        generator=[torch.Generator().manual_seed(i) for i in range(2)],
        num_inference_steps=2,
    ).images
    assert images.shape[0] == 2 and torch.isfinite(images.float()).all()


def test_the_training_split_travels_from_the_generator_to_the_synthetic_data(tmp_path):
    """fit-diffusion trains on exactly a run's training images (split seed, val fraction,
    --train-per-class subset), records them, and csm generate copies the record into the
    dataset, where csm train checks it (csm.training.sampler.check_synthetic_split)."""
    from csm.data.real import load_real
    from csm.generation.generate import GenerateConfig, generate
    from csm.training.sampler import synthetic_splits

    out = tmp_path / "model"
    fit_diffusion(
        _cfg(out, steps=2, split_seed=2, val_fraction=0.3, train_per_class=3, image_size=8)
    )
    split = json.loads((out / "training_config.json").read_text())["train_split"]
    want = load_real("digits", seed=2, val_fraction=0.3, train_per_class=3).split_record()
    assert split == want and want["train_per_class"] == 3
    syn = tmp_path / "syn"
    generate(GenerateConfig(model=str(out), out=str(syn), groups=2, steps=1, device="cpu"))
    assert synthetic_splits(str(syn)) == {"generator": want, "annotation encoder": None}
    with pytest.raises(CSMError, match="train-per-class 0: give at least 1"):
        fit_diffusion(_cfg(tmp_path / "bad", train_per_class=0))
    assert not (tmp_path / "bad").exists()
