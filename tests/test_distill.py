"""Consistency distillation's pieces on a tiny SD model: the student starts as the teacher, the
boundary holds, and the loss falls on a fixed batch."""

import copy

import pytest
import torch

import diffguide as dg
from diffguide.core.denoiser import Boundary
from diffguide.distill import ConsistencyLoss, pseudo_huber, student_unet
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.pipelines.pipeline import guidance_embedding


@pytest.fixture(scope="module")
def setup():
    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    with torch.no_grad():
        pos, neg = gp.family.encode(["a red circle", "a blue square"], ["", ""], 1, "cpu")
    net = student_unet(gp.pipe.unet, embed_dim=8)

    def student_of(module):
        return dg.NetDenoiser(
            lambda x, t, c: (
                module(
                    x, t, encoder_hidden_states=c["text"], timestep_cond=c.get("timestep_cond")
                ).sample
            ),
            gp.info.schedule,
            gp.info.kind,
            module=module,
        )

    return gp, pos, neg, net, student_of


def test_student_starts_as_the_teacher(setup):
    gp, pos, _, net, student_of = setup
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t = gp.net_denoiser(x, torch.tensor(500.0), pos)
        s = student_of(net)(
            x,
            torch.tensor(500.0),
            {**pos, "timestep_cond": guidance_embedding(torch.tensor([4.0, 7.0]), 8)},
        )
    assert torch.equal(t.x0, s.x0)


def test_boundary_is_the_identity_at_the_data_end(setup):
    gp, pos, _, net, student_of = setup
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        f = Boundary(student_of(net))(x, torch.tensor(0.0), pos)
    assert torch.allclose(f.x0, x)


def test_pseudo_huber():
    a, b = torch.zeros(4), torch.tensor([0.0, 3.0, 4.0, 0.0])
    assert torch.allclose(
        pseudo_huber(a, b, 1.0), torch.tensor((0 + (10**0.5 - 1) + (17**0.5 - 1) + 0) / 4)
    )


def test_loss_falls_on_a_fixed_batch(setup):
    gp, pos, neg, net, student_of = setup
    student = copy.deepcopy(net).train()
    target = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = ConsistencyLoss(
        gp.net_denoiser,
        student_of(student),
        student_of(target),
        "cfg",
        "ddim",
        skip=100,
        huber_c=0.001,
        embed=lambda w: guidance_embedding(w, 8),
    )
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(student.parameters(), lr=2e-4)
    losses = []
    for _ in range(20):
        loss = loss_fn(
            x0, pos, neg, torch.Generator().manual_seed(5)
        )  # the same t and noise each time
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_arguments(setup):
    gp, *_ = setup
    with pytest.raises(ValueError, match="skip must be in"):
        ConsistencyLoss(gp.net_denoiser, gp.net_denoiser, gp.net_denoiser, skip=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        ConsistencyLoss(gp.net_denoiser, gp.net_denoiser, gp.net_denoiser, solver="nope")


def test_checkpoints_are_atomic_and_verified(tmp_path, monkeypatch):
    import os

    from diffguide.distill import checkpoint

    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save(path, {"step": 1, "w": torch.arange(5.0)})
    assert checkpoint.load(path)["step"] == 1
    # a crash while writing the next one leaves this one intact
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoint.save(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1 and os.listdir(tmp_path) == ["checkpoint.pt"]
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-10])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load(path)
    open(path, "wb").write(data[:20])
    with pytest.raises(ValueError, match="truncated"):
        checkpoint.load(path)
    flipped = bytearray(data)
    flipped[-3] ^= 1
    open(path, "wb").write(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        checkpoint.load(path)
