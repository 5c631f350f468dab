"""LoRA students (``--lora-rank``): only the adapters train (the base stays the teacher's) and a run
resumes bit-identically; the exported LoRA file, loaded by diffusers onto the teacher's pipeline
(fused or not) and by diffguide's ``loras=``, gives the merged student's network output, for
consistency distillation and iCT / ECT from the teacher's weights; a bad rank and a teacher peft
cannot adapt are refused in one line (two processes: test_distill_lora_processes.py)."""

import os

import numpy as np
import pytest
import torch

from diffguide.distill import checkpoint
from diffguide.distill import run as run_module
from diffguide.distill.trainer import DistillConfig, train
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.pipelines.pipeline import read_defaults
from helpers import caption_folder, states_equal

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("teacher") / "t"), "pixel_sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_folder(tmp_path_factory.mktemp("data"), 8)


def _cfg(out, teacher, data, **kw):
    # a large learning rate and a short EMA: two steps move the exported adapters well off zero
    base = dict(
        out=str(out),
        teacher=teacher,
        data=data,
        method="consistency",
        lora_rank=4,
        batch=2,
        max_steps=3,
        checkpoint_every=2,
        log_every=1,
        skip=100,
        lr=1e-2,
        ema=0.5,
        validate_n=1,
        validate_prompts=1,
    )
    return DistillConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def whole(tmp_path_factory, teacher, data):
    """A 3-step LoRA run, and the student and its EMA as the run ended (caught at the export)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    nets = {}
    real = run_module.export

    def catch(method, net, folder):
        nets.update(student=method.student, ema=net)
        return real(method, net, folder)

    run_module.export = catch
    try:
        train(_cfg(out, teacher, data), progress=False)
    finally:
        run_module.export = real
    return str(out), nets


def _base_equals_teacher(net, teacher_state) -> bool:
    """Every weight of ``net`` but its adapters equals the teacher's, bit for bit."""
    base = {
        k.replace(".base_layer", ""): v for k, v in net.state_dict().items() if ".lora_" not in k
    }
    return base.keys() == teacher_state.keys() and all(
        torch.equal(v, teacher_state[k]) for k, v in base.items()
    )


def test_lora_run_trains_only_adapters_and_resumes_bit_identically(tmp_path, teacher, data, whole):
    out, nets = whole
    t = GuidedPipeline.from_pretrained(teacher, progress=False).family.net.state_dict()
    assert _base_equals_teacher(nets["student"], t) and _base_equals_teacher(nets["ema"], t)
    a = checkpoint.load(os.path.join(out, "checkpoint.pt"))
    # the checkpoint keeps the adapters alone, and the optimiser moved those only
    assert a["student"] and all(".lora_" in k for k in [*a["student"], *a["ema"]])
    assert len(a["opt"]["state"]) == len(a["student"])
    assert any(v.abs().max() > 0 for k, v in a["ema"].items() if "lora_B" in k)  # B starts at 0
    part = tmp_path / "part"
    train(_cfg(part, teacher, data, max_steps=2), progress=False)  # "interrupted" at step 2
    with pytest.raises(ValueError, match="lora_rank=4, not 8"):  # the rank is the run's own
        train(_cfg(part, teacher, data, lora_rank=8, resume=True), progress=False)
    train(_cfg(part, teacher, data, resume=True), progress=False)
    b = checkpoint.load(str(part / "checkpoint.pt"))
    assert a["step"] == b["step"] == 3 and states_equal(a, b)


def _forward(unet, seed=0):
    """The UNet's output on fixed inputs (noisy image, timestep, text states)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([499, 899]), encoder_hidden_states=text).sample


def _diffusers_teacher(teacher):
    """The teacher as diffusers' own StableDiffusionPipeline (a pixel-space one: no VAE)."""
    from diffusers import StableDiffusionPipeline

    none = dict(vae=None, safety_checker=None, feature_extractor=None)
    return StableDiffusionPipeline.from_pretrained(teacher, **none)


def test_exported_lora_loads_onto_the_teacher_as_the_merged_student(teacher, whole):
    from diffusers import LCMScheduler, UNet2DConditionModel

    out, _ = whole
    lora = os.path.join(out, "lora")
    assert os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors"))
    student = _forward(UNet2DConditionModel.from_pretrained(os.path.join(out, "student", "unet")))
    pipe = _diffusers_teacher(teacher)
    bare = _forward(pipe.unet)
    # the adapters moved the network: a zero LoRA would pass the comparisons below trivially
    assert (student - bare).abs().max() > 100 * 1e-5 * bare.abs().max()
    pipe.load_lora_weights(lora)
    torch.testing.assert_close(_forward(pipe.unet), student, rtol=0, atol=1e-5)
    pipe.fuse_lora()
    torch.testing.assert_close(_forward(pipe.unet), student, rtol=0, atol=1e-5)
    # diffguide: the teacher with the LoRA (and the student's scheduler and defaults, as
    # docs/distillation.md shows) samples the student folder's images
    folder = os.path.join(out, "student")
    sched = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    gp = GuidedPipeline.from_pretrained(
        teacher, loras=[(lora, 1.0)], scheduler=sched, progress=False
    )
    torch.testing.assert_close(_forward(gp.family.net), student, rtol=0, atol=1e-5)
    gp.set_defaults(read_defaults(folder))
    kw = dict(seed=0, output_type="np", progress=False)
    ours = gp("a red circle", **kw)
    theirs = GuidedPipeline.from_pretrained(folder, progress=False)("a red circle", **kw)
    assert ours.nfe == theirs.nfe == 4
    np.testing.assert_allclose(ours.images, theirs.images, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "method,extra",
    [
        ("dmd2", {"student_steps": 2, "fake_ratio": 1}),
        ("scm", {"student_steps": 2, "scm_derivative": "finite_difference", "scm_fit_steps": 0}),
    ],
)
def test_other_methods_export_a_lora(tmp_path, teacher, data, method, extra):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    train(_cfg(out, teacher, data, method=method, max_steps=1, **extra), progress=False)
    assert all(".lora_" in k for k in checkpoint.load(str(out / "checkpoint.pt"))["student"])
    pipe = _diffusers_teacher(teacher)
    pipe.load_lora_weights(str(out / "lora"))
    student = UNet2DConditionModel.from_pretrained(str(out / "student" / "unet"))
    torch.testing.assert_close(_forward(pipe.unet), _forward(student), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["consistency", "--lora-rank", "-1"], "--lora-rank must be an integer >= 0, got -1"),
        (["consistency", "--lora-rank", "two"], "argument --lora-rank: invalid int value: 'two'"),
        (["ict", "--lora-rank", "4", "--init", "random"], "--lora-rank must be 0 with init=random"),
        (["consistency", "--lora-rank", "4", "--teacher", "DDPM"], "peft cannot adapt the "),
    ],
)
def test_cli_bad_lora_rank_is_one_line(tmp_path, capsys, data, argv, message):
    from diffguide.cli.main import main

    if "DDPM" in argv:  # an unconditional UNet2DModel: diffusers gives it no LoRA adapters
        argv = [a if a != "DDPM" else tm.save(str(tmp_path / "ddpm"), "ddpm") for a in argv]
        message += "teacher's UNet2DModel"
    code = main(["distill", *argv, "--data", data, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("schedule", ["ict", "ect"])
def test_ict_lora_from_the_teachers_weights_exports_a_lora_of_the_merged_student(
    tmp_path, teacher, data, schedule
):
    """iCT (and ECT, its schedule for a start from a diffusion model) with ``--lora-rank`` through
    the CLI: only adapters train, and the exported LoRA on the teacher's pipeline is the merged
    student (diffusers' loader and diffguide's ``loras=``, sampling the student folder's images)."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    from diffguide.cli.main import main

    out = tmp_path / "run"
    args = ["--teacher", teacher, "--data", data, "--out", str(out), "--quiet"]
    args += ["--lora-rank", "4", "--ict-schedule", schedule, "--batch", "2", "--max-steps", "3"]
    args += ["--lr", "1e-2", "--ema", "0.5", "--validate-n", "1", "--validate-prompts", "1"]
    assert main(["distill", "ict", *args]) == 0
    a = checkpoint.load(str(out / "checkpoint.pt"))
    assert a["config"]["method"] == "ict" and a["config"]["lora_rank"] == 4
    assert a["student"] and all(".lora_" in k for k in [*a["student"], *a["ema"]])
    folder, lora = str(out / "student"), str(out / "lora")
    student = _forward(UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")))
    pipe = _diffusers_teacher(teacher)
    bare = _forward(pipe.unet)
    assert (student - bare).abs().max() > 100 * 1e-5 * bare.abs().max()  # the adapters moved
    pipe.load_lora_weights(lora)
    torch.testing.assert_close(_forward(pipe.unet), student, rtol=0, atol=1e-5)
    sched = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    gp = GuidedPipeline.from_pretrained(
        teacher, loras=[(lora, 1.0)], scheduler=sched, progress=False
    )
    gp.set_defaults(read_defaults(folder))
    kw = dict(seed=0, output_type="np", progress=False)
    ours = gp("a red circle", **kw)
    theirs = GuidedPipeline.from_pretrained(folder, progress=False)("a red circle", **kw)
    assert ours.nfe == theirs.nfe == 4
    np.testing.assert_allclose(ours.images, theirs.images, rtol=0, atol=1e-5)
