"""fit-diffusion checkpoints hold nothing that needs unpickling to resume (EMA as safetensors)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import csm.generation.fit as fd
from csm.config import resolve_config
from csm.generation.fit import FitDiffusionConfig, fit_diffusion


def test_checkpoint_keeps_ema_as_safetensors_and_no_pickled_objects(tmp_path, monkeypatch):
    cfg = dict(dataset="digits", out=str(tmp_path / "m"), preset="tiny", steps=4, batch_size=4)
    cfg |= dict(checkpoint_every=2, grid_per_class=1, grid_steps=1)
    real = fd._step_generator

    def crash_at_3(seed, step, *a, **k):  # an interruption after the step-2 checkpoint
        if step == 3:
            raise KeyboardInterrupt
        return real(seed, step, *a, **k)

    monkeypatch.setattr(fd, "_step_generator", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        fit_diffusion(resolve_config(FitDiffusionConfig, overrides=cfg))
    (ckpt,) = sorted((tmp_path / "m" / "checkpoints").glob("step-*"))
    names = {p.name for p in ckpt.iterdir()}
    # accelerate reloads register_for_checkpointing objects with weights_only=False: none here
    assert not [n for n in names if n.startswith("custom_checkpoint")]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2 and state["ema"]["optimization_step"] == 2
    shadow = load_file(str(ckpt / "ema.safetensors"))
    assert len(shadow) > 0 and all(t.dtype.is_floating_point for t in shadow.values())


def test_finished_folder_carries_its_pipeline_file_and_model_card(tmp_path):
    cfg = dict(dataset="digits", out=str(tmp_path / "m"), preset="tiny", steps=1, batch_size=4)
    out = fit_diffusion(resolve_config(FitDiffusionConfig, overrides=cfg | {"grid_steps": 1}))
    from csm.generation.card import PIPELINE_FILE

    assert "import csm" not in (out / PIPELINE_FILE).read_text()  # loads without csm
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and not (out / "checkpoints").exists()
