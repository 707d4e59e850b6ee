"""Tests for CSMMixingPipeline with tiny random backbones built and saved inside the tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from csm.errors import CSMError
from csm.generation.mixing import lambdas
from csm.generation.pipeline import SCHEDULERS, CSMMixingPipeline, build_unet

NAMES = ["cat", "dog", "frog"]


def _unet_pipe(seed: int = 0) -> CSMMixingPipeline:
    torch.manual_seed(seed)
    unet = build_unet(3, image_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    # a random init has a zero-initialised output conv; perturb all weights so outputs depend on
    # the class condition
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sched = DDIMScheduler(num_train_timesteps=100, beta_schedule="linear", clip_sample=False)
    pipe = CSMMixingPipeline(unet=unet.eval(), scheduler=sched, class_names=NAMES)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return _unet_pipe()


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _reference_ddim(pipe, cond_emb, seed, steps, guidance=1.0):
    """Independent DDIM loop: the class embedding is replaced by a fixed tensor."""
    unet = pipe.unet
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    table = unet.class_embedding.weight.detach()
    orig = unet.class_embedding

    class Fixed(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e = e

        def forward(self, labels):
            return self.e

    try:
        for t in sched.timesteps:
            with torch.no_grad():
                unet.class_embedding = Fixed(cond_emb[None])
                eps = unet(x, t, class_labels=torch.zeros(1, dtype=torch.long)).sample
                if guidance > 1:
                    unet.class_embedding = Fixed(table[-1][None])
                    eps_u = unet(x, t, class_labels=torch.zeros(1, dtype=torch.long)).sample
                    eps = eps_u + guidance * (eps - eps_u)
            x = sched.step(eps, t, x).prev_sample
    finally:
        unet.class_embedding = orig
    return (x / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_lambda_endpoints_reproduce_pure_class_samples_exactly(pipe, guidance):
    kw = dict(num_inference_steps=4, guidance_scale=guidance)
    mixed = pipe([0, 0], [2, 2], [1.0, 0.0], generator=gens([5, 5]), **kw).images
    pure = pipe([0, 2], generator=gens([5, 5]), **kw).images  # plain labels, same batch shape
    assert torch.equal(mixed, pure)
    assert not torch.equal(pure[0], pure[1])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_mixed_condition_matches_independent_reference(pipe, guidance):
    lam = 0.3
    table = pipe.unet.class_embedding.weight.detach()
    cond = lam * table[1] + (1 - lam) * table[2]  # λ·E[a] + (1-λ)·E[b]
    ref = _reference_ddim(pipe, cond, seed=11, steps=5, guidance=guidance)
    out = pipe(
        ["dog"],
        ["frog"],
        [lam],
        generator=gens([11]),
        num_inference_steps=5,
        guidance_scale=guidance,
    ).images
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    pure = pipe([1], generator=gens([11]), num_inference_steps=5, guidance_scale=guidance).images
    assert (out - pure).abs().max() > 1e-4  # the mixture is not the pure class


def test_same_seed_same_pixels_and_group_shares_noise(pipe):
    lam = lambdas(4)
    o1 = pipe([0] * 4, [1] * 4, lam, generator=gens([7] * 4), num_inference_steps=3).images
    o2 = pipe([0] * 4, [1] * 4, lam, generator=gens([7] * 4), num_inference_steps=3).images
    assert torch.equal(o1, o2)
    assert o1.shape == (4, 1, 8, 8) and o1.dtype == torch.float32
    assert 0 <= o1.min() and o1.max() <= 1
    # a sample's pixels do not depend on its neighbours in the batch (per-sample generators)
    single = pipe([0], [1], [lam[2]], generator=gens([7]), num_inference_steps=3).images
    torch.testing.assert_close(single[0], o1[2], atol=1e-5, rtol=0)
    other = pipe([0], [1], [lam[2]], generator=gens([8]), num_inference_steps=3).images
    assert not torch.allclose(other, single)


def test_latents_argument_equals_generator(pipe):
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    a = pipe([0, 1], [2, 2], 0.5, latents=x, num_inference_steps=3).images
    b = pipe([0, 1], [2, 2], 0.5, generator=g, num_inference_steps=3).images
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    assert index["class_names"] == NAMES
    loaded = CSMMixingPipeline.from_pretrained(tmp_path / "m")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.class_names == NAMES and loaded.num_classes == 3
    assert isinstance(loaded.scheduler, DDIMScheduler)
    kw = dict(generator=gens([1, 1]), num_inference_steps=3, guidance_scale=2.0)
    a = pipe(["cat", "dog"], ["frog", "cat"], [0.2, 0.9], **kw).images
    kw["generator"] = gens([1, 1])
    b = loaded(["cat", "dog"], ["frog", "cat"], [0.2, 0.9], **kw).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_swap_and_keep_endpoint_exactness(name):
    pipe = _unet_pipe()
    pipe.set_scheduler(name)
    assert isinstance(pipe.scheduler, SCHEDULERS[name])
    mixed = pipe([1, 1], [0, 0], [1.0, 0.5], generator=gens([2, 2]), num_inference_steps=4).images
    pure = pipe([1, 1], generator=gens([2, 2]), num_inference_steps=4).images
    assert torch.isfinite(mixed).all()
    assert torch.equal(mixed[0], pure[0])
    assert not torch.equal(mixed[1], pure[1])
    # diffusers idiom works too
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)
    again = pipe([1, 1], generator=gens([2, 2]), num_inference_steps=4).images
    assert torch.equal(again, pure)


def test_eps_mode_mixes_noise_predictions(pipe):
    kw = dict(num_inference_steps=3)
    e1 = pipe([0, 0], [2, 2], [1.0, 0.0], generator=gens([4, 4]), mix_mode="eps", **kw).images
    pure = pipe([0, 2], generator=gens([4, 4]), **kw).images
    torch.testing.assert_close(e1, pure, atol=1e-5, rtol=0)
    half_e = pipe([0], [2], [0.5], generator=gens([4]), mix_mode="eps", **kw).images
    half_m = pipe([0], [2], [0.5], generator=gens([4]), **kw).images
    assert (half_e - half_m).abs().max() > 1e-5  # the two mixing modes differ in between


def test_output_types(pipe):
    kw = dict(generator=gens([0, 1]), num_inference_steps=2)
    arr = pipe([0, 1], [1, 2], 0.5, output_type="np", **kw).images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 8, 8, 1)
    kw["generator"] = gens([0, 1])
    pil = pipe([0, 1], [1, 2], 0.5, output_type="pil", **kw).images
    assert len(pil) == 2 and pil[0].size == (8, 8)


def test_bad_inputs_name_the_problem(pipe, tmp_path):
    kw = dict(num_inference_steps=1)
    with pytest.raises(CSMError, match="class_a='horse'"):
        pipe(["horse"], ["cat"], [0.5], **kw)
    with pytest.raises(CSMError, match="class_b=3"):
        pipe([0], [3], [0.5], **kw)
    with pytest.raises(CSMError, match="lam=1.2"):
        pipe([0], [1], [1.2], **kw)
    with pytest.raises(CSMError, match="lam=-0.1"):
        pipe([0], [1], [-0.1], **kw)
    with pytest.raises(CSMError, match="generator: 1 generators for 2"):
        pipe([0, 1], [1, 2], 0.5, generator=gens([0]), **kw)
    with pytest.raises(CSMError, match="scheduler='plms'"):
        pipe.set_scheduler("plms")
    with pytest.raises(CSMError, match="dataset has 10"):
        pipe.check_classes([str(i) for i in range(10)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CSMError, match="no model_index.json"):
        CSMMixingPipeline.from_pretrained(tmp_path / "empty")
    plain = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=4,
    )
    with pytest.raises(CSMError, match="not class-conditional"):
        CSMMixingPipeline(unet=plain, scheduler=DDIMScheduler())
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=plain, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "uncond")
    with pytest.raises(CSMError, match="not class-conditional"):
        CSMMixingPipeline.from_pretrained(tmp_path / "uncond")
    with pytest.raises(CSMError, match="class_names: 2 names"):
        CSMMixingPipeline(unet=pipe.unet, scheduler=pipe.scheduler, class_names=["a", "b"])


# ---------------------------------------------------------------- DiT backbone
def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    )


@pytest.fixture(scope="module")
def dit_pipe():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(2)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned sigma, as in the released DiT checkpoints
        num_layers=2,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=5,  # 5 classes; null row = 5, not 1000
    )
    with torch.no_grad():  # adaLN-zero starts at zero; make every block's table matter
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    pipe = CSMMixingPipeline(
        transformer=dit.eval(),
        vae=_tiny_vae().eval(),
        scheduler=DDIMScheduler(num_train_timesteps=100),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dit_each_block_has_its_own_table(dit_pipe):
    tables = [
        b.norm1.emb.class_embedder.embedding_table.weight
        for b in dit_pipe.transformer.transformer_blocks
    ]
    assert len(tables) == 2 and tables[0].shape == (6, 16)
    assert not torch.equal(tables[0], tables[1])
    assert dit_pipe.backbone == "dit" and dit_pipe.num_classes == 5
    assert dit_pipe.class_names == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_one_hot_injection_equals_integer_labels(dit_pipe, guidance):
    kw = dict(num_inference_steps=3, guidance_scale=guidance)
    mixed = dit_pipe([1, 4, 2], [3, 0, 2], [1.0, 1.0, 0.0], generator=gens([0, 1, 2]), **kw).images
    plain = dit_pipe([1, 4, 2], generator=gens([0, 1, 2]), **kw).images
    assert mixed.shape == (3, 1, 8, 8)
    assert torch.equal(mixed, plain)


def test_dit_mixture_uses_every_blocks_own_table(dit_pipe):
    """Mixed sampling equals plain sampling of a copy whose row 0 holds each block's mixture."""
    import copy

    lam, a, b = 0.3, 2, 4
    ref = copy.deepcopy(dit_pipe)
    with torch.no_grad():
        for blk in ref.transformer.transformer_blocks:
            t = blk.norm1.emb.class_embedder.embedding_table.weight
            t[0] = lam * t[a] + (1 - lam) * t[b]
    kw = dict(num_inference_steps=3, guidance_scale=3.0)
    out = dit_pipe([a], [b], [lam], generator=gens([9]), **kw).images
    want = ref([0], generator=gens([9]), **kw).images
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def test_dit_without_null_row_rejects_guidance():
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=3,
    )
    for blk in dit.transformer_blocks:  # a model trained without label dropout: K rows only
        blk.norm1.emb.class_embedder.embedding_table = torch.nn.Embedding(3, 16)
    pipe = CSMMixingPipeline(
        transformer=dit.eval(), vae=_tiny_vae().eval(), scheduler=DDIMScheduler()
    )
    with pytest.raises(CSMError, match="guidance_scale"):
        pipe([0], [1], [0.5], num_inference_steps=1, guidance_scale=2.0)
    out = pipe([0], [1], [0.5], num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 8, 8, 1)


def test_dit_round_trip(dit_pipe, tmp_path):
    dit_pipe.save_pretrained(tmp_path / "dit")
    loaded = CSMMixingPipeline.from_pretrained(tmp_path / "dit")
    loaded.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, guidance_scale=2.0)
    a = dit_pipe([0], [1], [0.4], generator=gens([3]), **kw).images
    b = loaded([0], [1], [0.4], generator=gens([3]), **kw).images
    assert torch.equal(a, b)


# ---------------------------------------------------------------- text-to-image backbone
@pytest.fixture(scope="module")
def text_pipe():
    import string

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    torch.manual_seed(3)
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipe = CSMMixingPipeline(
        unet=unet.eval(),
        vae=_tiny_vae().eval(),
        text_encoder=te.eval(),
        tokenizer=tok,
        scheduler=DDIMScheduler(num_train_timesteps=100),
        class_names=["cat", "dog", "golden_retriever"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_backbone_mixes_prompt_embeddings(text_pipe):
    assert text_pipe.backbone == "text" and text_pipe.num_classes == 3
    emb = text_pipe._prompt_embeddings()
    assert emb.shape == (4, 24, 16)
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    mixed = text_pipe(
        ["cat", "dog"], ["golden_retriever", "cat"], [1.0, 0.0], generator=gens([1, 1]), **kw
    ).images
    plain = text_pipe(["cat", "cat"], generator=gens([1, 1]), **kw).images
    assert torch.equal(mixed, plain)  # λ=1 -> pure cat prompt, λ=0 -> pure cat prompt
    # an independent reference: the UNet conditioned on the hand-mixed prompt embedding
    half = text_pipe(["dog"], ["cat"], [0.5], generator=gens([4]), num_inference_steps=2).images
    sched = DDIMScheduler.from_config(text_pipe.scheduler.config)
    sched.set_timesteps(2)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(4))
    cond = (0.5 * emb[1] + 0.5 * emb[0])[None]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(
                text_pipe.unet(x, t, encoder_hidden_states=cond).sample, t, x
            ).prev_sample
        ref = text_pipe.vae.decode(x / text_pipe.vae.config.scaling_factor).sample / 2 + 0.5
    torch.testing.assert_close(half, ref.clamp(0, 1), atol=1e-5, rtol=0)


def test_text_backbone_round_trip_and_missing_parts(text_pipe, tmp_path):
    text_pipe.save_pretrained(tmp_path / "sd")
    loaded = CSMMixingPipeline.from_pretrained(tmp_path / "sd")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.class_names == ["cat", "dog", "golden_retriever"]
    a = text_pipe(["dog"], ["cat"], [0.3], generator=gens([2]), num_inference_steps=2).images
    b = loaded(["dog"], ["cat"], [0.3], generator=gens([2]), num_inference_steps=2).images
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # attention kernels may differ on reload
    with pytest.raises(CSMError, match="text_encoder, tokenizer and vae"):
        CSMMixingPipeline(unet=text_pipe.unet, scheduler=DDIMScheduler(), class_names=["a", "b"])


def test_dense_class_weights_for_multi_class_mixing(pipe):
    from csm.generation.mixing import dirichlet_weights

    w = np.array([[0.3, 0.0, 0.7], [0.0, 1.0, 0.0]])
    kw = dict(num_inference_steps=2, guidance_scale=2.0)
    dense = pipe(class_weights=w, generator=gens([6, 6]), **kw).images
    pair = pipe([0, 1], [2, 1], [0.3, 1.0], generator=gens([6, 6]), **kw).images
    assert torch.equal(dense, pair)
    classes, weights = dirichlet_weights(0, 3, 0, num_mix=3)
    w3 = np.zeros((1, 3))
    w3[0, classes] = weights
    table = pipe.unet.class_embedding.weight.detach()
    ref = _reference_ddim(pipe, torch.from_numpy(w3[0]).float() @ table[:3], 6, 2, guidance=2.0)
    got = pipe(class_weights=w3, generator=gens([6]), **kw).images
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(CSMError, match="class_weights: rows"):
        pipe(class_weights=np.array([[0.5, 0.6, 0.0]]), **kw)
    with pytest.raises(CSMError, match="class_weights: shape"):
        pipe(class_weights=np.ones((1, 4)) / 4, **kw)


# ------------------------------------------------------------------ without csm (diffusers only)
_NO_CSM_CHILD = r"""
import json, sys
import numpy as np, torch
try:
    import csm
except ImportError:
    pass
else:
    raise SystemExit("csm is importable in the clean environment")
from diffusers import DiffusionPipeline

folder, out = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_csm",
                                         trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
g = lambda: [torch.Generator().manual_seed(s) for s in (3, 3, 3)]
mixed = pipe(class_a=["dog"] * 3, class_b=["frog"] * 3, lam=[0.0, 0.5, 1.0], generator=g(),
             num_inference_steps=3, guidance_scale=2.0).images
plain = pipe(class_a=["cat", "dog", "frog"], generator=g(), num_inference_steps=3).images
np.savez(out, mixed=mixed.numpy(), plain=plain.numpy())
print(json.dumps({"cls": type(pipe).__name__, "module": type(pipe).__module__,
                  "sys_modules_csm": any(m.split(".")[0] == "csm" for m in sys.modules)}))
"""


def test_exported_folder_loads_and_samples_with_diffusers_only(pipe, tmp_path):
    """The folder as pushed loads with plain diffusers in a process that cannot import csm."""
    import subprocess
    import sys
    import sysconfig

    from huggingface_hub import ModelCard

    from csm.generation import mixing
    from csm.generation import pipeline as pipeline_module
    from csm.generation.card import PIPELINE_FILE, export_pipeline_files, generator_sha256

    folder = tmp_path / "gen"
    pipe.save_pretrained(folder)
    train = {"dataset": "digits", "dataset_spec": "digits", "class_names": NAMES, "steps": 30}
    (folder / "training_config.json").write_text(json.dumps({**train, "label_dropout": 0.1}))
    sha = generator_sha256(folder)
    written = export_pipeline_files(folder, repo_id="alice/csm-gen")
    assert [p.name for p in written] == [PIPELINE_FILE, "README.md"]
    assert generator_sha256(folder) == sha  # the card and pipeline file are not the model
    assert "from csm" not in (folder / PIPELINE_FILE).read_text()
    assert mixing.lambdas is pipeline_module.lambdas  # one source of the mixing math

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "cc-by-4.0"
    assert "row `K = 3` is the classifier-free-guidance null class" in card.text
    assert "| steps | `30` |" in card.text and "| label_dropout | `0.1` |" in card.text
    assert 'custom_pipeline="pipeline_csm"' in card.text and "CSMMixingPipeline" in card.text

    child = tmp_path / "child.py"
    child.write_text(_NO_CSM_CHILD)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": sysconfig.get_paths()["purelib"],  # site-packages without its .pth hooks
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-S", "-s", str(child), str(folder), str(tmp_path / "out.npz")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    assert meta["cls"] == "CSMMixingPipeline" and not meta["module"].startswith("csm")
    assert meta["sys_modules_csm"] is False
    got = np.load(tmp_path / "out.npz")
    want_mixed = pipe(
        class_a=["dog"] * 3,
        class_b=["frog"] * 3,
        lam=[0.0, 0.5, 1.0],
        generator=gens((3, 3, 3)),
        num_inference_steps=3,
        guidance_scale=2.0,
    ).images
    want_plain = pipe(class_a=NAMES, generator=gens((3, 3, 3)), num_inference_steps=3).images
    np.testing.assert_array_equal(got["mixed"], want_mixed.numpy())
    np.testing.assert_array_equal(got["plain"], want_plain.numpy())
    assert not np.array_equal(got["plain"][0], got["plain"][1])  # class-conditional


def test_export_refuses_a_folder_without_model_index(tmp_path):
    from csm.generation.card import export_pipeline_files

    with pytest.raises(CSMError, match="no model_index.json"):
        export_pipeline_files(tmp_path)
