"""CPUHeapReuse: the CPU speed path of CSM's large synthetic forward changes where memory comes
from, never a number; ``csm train`` enters it on the CPU; it stays off where asked."""

from __future__ import annotations

import copy

import pytest
import torch

import csm.training.trainer as trainer_module
from csm.config import resolve_config
from csm.training.config import TrainConfig
from csm.training.methods import Batch, StepState, build_method
from csm.training.models import build_model
from csm.training.trainer import CPUHeapReuse, StepModule, train, training_step

ACTIVE = CPUHeapReuse()._glibc() is not None  # glibc here and not opted out by the environment
needs_glibc = pytest.mark.skipif(not ACTIVE, reason="glibc allocator only")


_PROBE = """
import resource, torch
from csm.training.trainer import CPUHeapReuse

def faults(nbytes):
    for _ in range(2):  # the second time: the first may grow the heap
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del buf
    return n

nbytes = 40 * 2**20  # above glibc's largest mmap threshold (32 MiB): 10240 pages
with CPUHeapReuse() as heap:
    active = heap.active
    inside = faults(nbytes)
after = faults(nbytes)
print(active, inside, after, heap.active)
"""


@needs_glibc
def test_large_blocks_are_reused_inside_and_mmapped_again_after():
    import subprocess
    import sys

    # a fresh process: the allocator state of the test session (arenas, earlier tensors) must
    # not decide where the block comes from. Whether glibc can hand the block back from the heap
    # differs between fresh processes (address-space layout: 2-3 of 8 bare probes here could
    # not), so up to 8 processes are tried; every one must restore the defaults, one must reuse.
    reused = []
    for _ in range(8):
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=120
        ).stdout.split()
        active, inside, after, still = out[0] == "True", int(out[1]), int(out[2]), out[3] == "True"
        assert active and not still
        assert after > 5000  # defaults back: a fresh mmap, every page faults again
        reused.append(inside < 1000)  # the freed block is handed out again, already mapped
        if reused[-1]:
            break
    assert any(reused), reused


def test_off_when_disabled_opted_out_user_tuned_or_nested(monkeypatch):
    with CPUHeapReuse(enabled=False) as heap:
        assert not heap.active
    monkeypatch.setenv(CPUHeapReuse.ENV, "0")
    with CPUHeapReuse() as heap:
        assert not heap.active
    monkeypatch.delenv(CPUHeapReuse.ENV)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    with CPUHeapReuse() as heap:
        assert not heap.active
    monkeypatch.delenv("GLIBC_TUNABLES")
    with CPUHeapReuse() as outer, CPUHeapReuse() as inner:
        assert outer.active == ACTIVE
        assert not inner.active  # only the outermost block sets and restores
    assert not outer.active


def _csm_step(heap: bool, model: torch.nn.Module) -> tuple[torch.Tensor, torch.nn.Module]:
    """One CSM step at the paper's synthetic batch (256 images: 32 MiB activations)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    syn_x = torch.rand(256, 3, 32, 32, generator=g)
    syn_y = torch.softmax(torch.randn(256, 10, generator=g), 1)
    method = build_method("csm", {})
    step = StepModule(model, method.all_modules(model))
    step.loss_fn = method.stages(1)[0].loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with CPUHeapReuse(heap):
        loss = training_step(
            step, optimizer, list(model.parameters()), Batch(x, y, None, syn_x, syn_y), StepState()
        )
    return loss, model


def test_csm_step_is_bit_identical_with_and_without_heap_reuse():
    torch.manual_seed(0)
    model = build_model("cnn", 10, 3, 32, [0.5] * 3, [0.25] * 3)
    loss_a, a = _csm_step(False, copy.deepcopy(model))
    loss_b, b = _csm_step(True, copy.deepcopy(model))
    assert torch.equal(loss_a, loss_b)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_train_on_the_cpu_runs_its_steps_inside_heap_reuse(tmp_path, monkeypatch):
    seen = []

    class Spy(CPUHeapReuse):
        def __enter__(self) -> CPUHeapReuse:
            seen.append(("enter", self.enabled))
            return super().__enter__()

    def step(*args, **kwargs):
        seen.append(("step", trainer_module.CPUHeapReuse._depth))  # the Spy's count
        return real_step(*args, **kwargs)

    real_step = trainer_module.training_step
    monkeypatch.setattr(trainer_module, "CPUHeapReuse", Spy)
    monkeypatch.setattr(trainer_module, "training_step", step)
    values = {"dataset": "digits", "image_size": 8, "model": "cnn", "model_options": ["width=8"]}
    values |= {"epochs": 1, "batch_size": 256, "max_steps": 1, "out": str(tmp_path / "r")}
    train(resolve_config(TrainConfig, overrides=values))
    assert seen[0] == ("enter", True)
    assert ("step", int(ACTIVE)) in seen
    assert Spy._depth == 0 and CPUHeapReuse._depth == 0
