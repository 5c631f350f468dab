"""The built-in flow transformer's recipe (``pipelines.toy_mmdit``): its training resumes bit for
bit, its loss is the rectified flow diffusers' scheduler samples, its text is SD3's, and its
export loads in diffusers' own StableDiffusion3Pipeline as well as in GuidedPipeline."""

import json
import os
import subprocess
import sys

import pytest
import torch

from diffguide.pipelines import GuidedPipeline, toy_model, toy_mmdit


def _cfg(out, steps):
    return toy_model.TrainConfig(
        out=str(out),
        arch="mmdit",
        size="tiny",
        steps=steps,
        batch=4,
        lr=5e-4,
        dataset=32,
        checkpoint_every=2,
        log_every=1,
        warmup=2,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmdit")
    straight, resumed = root / "a", root / "b"
    toy_model.train(_cfg(straight, 4), progress=False)
    toy_model.train(_cfg(resumed, 2), progress=False)
    with open(resumed / "loss.jsonl", "a") as f:  # a kill after logging past the checkpoint
        f.write('{"step": 3, "loss": 99.0}\n{"step": 4, "lo')
    folder = toy_model.train(_cfg(resumed, 4), progress=False)  # picks up at step 2
    return straight, resumed, folder


def test_resume_equals_straight_run(runs):
    straight, resumed, _ = runs
    a, b = (torch.load(os.path.join(r, "checkpoint.pt"), weights_only=False) for r in runs[:2])
    assert a["step"] == b["step"] == 4 and a["config"]["arch"] == "mmdit"
    for key in ("unet", "ema_unet", "text", "ema_text"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert any(not torch.equal(a["unet"][k], a["ema_unet"][k]) for k in a["unet"])  # it trained
    log = [json.loads(line) for line in open(resumed / "loss.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(0 < r["loss"] < 99 for r in log)


def test_export_checkpoint_is_the_run_export(runs, tmp_path):
    """``train-toy --export`` (the EMA of the latest checkpoint) writes the folder training ends
    with."""
    from safetensors.torch import load_file

    again = toy_model.export_checkpoint(str(runs[1]), str(tmp_path / "x"))
    for sub in ("transformer", "text_encoder", "text_encoder_2"):
        (name,) = [f for f in os.listdir(os.path.join(again, sub)) if f.endswith(".safetensors")]
        a, b = (load_file(os.path.join(f, sub, name)) for f in (again, runs[2]))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    assert os.path.isfile(os.path.join(again, "diffguide.json"))


def test_resume_refuses_another_arch(runs):
    _, resumed, _ = runs
    cfg = toy_model.TrainConfig(out=str(resumed), arch="unet", size="small", steps=6, dataset=32)
    with pytest.raises(ValueError, match="arch 'mmdit'"):
        toy_model.train(cfg, progress=False)


def test_export_samples_as_diffusers_stable_diffusion_3(runs):
    """diffusers' own pipeline (its components saved as None passed as None; no VAE: height 8x,
    latents out; max_sequence_length 0 as the folder's diffguide.json says) and GuidedPipeline's
    CFG + Euler give the same images."""
    from diffusers import StableDiffusion3Pipeline

    folder = runs[2]
    assert json.load(open(os.path.join(folder, "diffguide.json"))) == {"max_sequence_length": 0}
    none = dict(vae=None, text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, **none)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle on a blue background", "two shapes"]
    kw = dict(num_inference_steps=6, guidance_scale=4.0, latents=x, output_type="latent")
    ref = pipe(prompts, height=256, width=256, max_sequence_length=0, **kw).images
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    assert gp.family.name == "sd3" and gp.info.kind == "flow"
    ours = gp(
        prompts, steps=6, guidance_scale=4.0, sampler="euler", latents=x, output_type="latent"
    )
    ours = getattr(ours, "images", ours)
    assert (ours - ref).abs().max() < 1e-4 * ref.abs().max()
    # diffusers' default window (256 zero T5 tokens) is another model input: the file matters
    other = pipe(prompts, height=256, width=256, **kw).images
    assert (other - ref).abs().max() > 1e-3


def test_condition_is_sd3_encode_prompt():
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(0)
    tok = toy_mmdit.tokenizer()
    te = toy_mmdit.text_encoder(len(tok))
    pipe = StableDiffusion3Pipeline(
        transformer=toy_mmdit.network("tiny"),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=te[0],
        tokenizer=tok,
        text_encoder_2=te[1],
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    prompts = ["a green square", "orange cross, gray backdrop", ""]
    text, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=0
    )
    ids = tok(prompts, padding="max_length", max_length=toy_mmdit.MAX_TOKENS, truncation=True)
    with torch.no_grad():
        got = toy_mmdit.condition(te, torch.tensor(ids.input_ids))
    assert torch.equal(got["encoder_hidden_states"], text)
    assert torch.equal(got["pooled_projections"], pooled)


def test_text_encoders_start_from_the_built_in_unet():
    from transformers import CLIPTextModel

    from diffguide.assets import path

    shipped = CLIPTextModel.from_pretrained(path("toy", "text_encoder"))
    te = toy_mmdit.text_encoder(len(toy_mmdit.tokenizer()))
    want = {k.removeprefix("text_model."): v for k, v in shipped.state_dict().items()}
    for enc in te:
        assert all(torch.equal(v, want[k]) for k, v in enc.text_model.state_dict().items())


def test_loss_noises_as_the_flow_scheduler_and_targets_the_velocity():
    """The noisy input is FlowMatchEulerDiscreteScheduler.scale_noise at the timestep the network
    sees, and a network returning the exact velocity of a one-point data set has zero loss."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=toy_mmdit.SHIFT)
    c = torch.linspace(-1, 1, 3 * 32 * 32).view(1, 3, 32, 32)
    x0 = c.expand(6, -1, -1, -1)
    seen = {}

    class Exact(torch.nn.Module):
        def forward(self, hidden_states, timestep, **cond):
            seen["x"], seen["t"] = hidden_states, timestep
            s = (timestep / 1000).view(-1, 1, 1, 1)
            eps = (hidden_states - (1 - s) * c) / s
            return type("Out", (), {"sample": eps - c})

    err = toy_mmdit.loss(Exact(), x0, {}, torch.Generator().manual_seed(0), None)
    assert err.shape == (6,) and err.max() < 1e-9
    s = seen["t"] / 1000
    assert 0 < s.min() and s.max() < 1 and s.std() > 0.05  # logit-normal times, not one level
    g = torch.Generator().manual_seed(0)
    torch.randn(6, generator=g)
    eps = torch.randn(x0.shape, generator=g)  # the loss's draws, in its order
    sch.set_timesteps(sigmas=s.tolist())  # any sigmas: scale_noise reads the one it is given
    want = sch.scale_noise(x0, seen["t"], eps)
    assert torch.allclose(seen["x"], want, atol=1e-5)
    wrong = toy_mmdit.loss(
        lambda **kw: type("O", (), {"sample": -Exact()(**kw).sample}),
        x0,
        {},
        torch.Generator().manual_seed(0),
        None,
    )
    assert wrong.min() > 0.1


@pytest.fixture(scope="module")
def teacher():
    return toy_mmdit.UNetTeacher("builtin")


def test_teacher_levels_are_the_unet_levels_in_flow_terms(teacher):
    """Flow level s = sigma / (a + sigma) of each VP index (so x_vp = (a + sigma) x_s and the
    two share their signal-to-noise ratio), and snap picks the nearest of them."""
    from diffguide.core.schedule import VPSchedule

    ac = VPSchedule.from_betas(0.0001, 0.02, "linear", 1000).alphas_cumprod.double()
    s = teacher.s.double()
    assert torch.allclose(((1 - s) / s) ** 2, ac / (1 - ac), rtol=1e-4)
    want = torch.rand(500, generator=torch.Generator().manual_seed(0))
    got = teacher.snap(want)
    nearest = teacher.s[(want[:, None] - teacher.s[None]).abs().argmin(1)]
    assert torch.equal(got, nearest)


def test_teacher_target_is_the_velocity_of_its_x0(teacher):
    """With the UNet replaced by the exact v of known (x0, eps), the teacher returns x0 (a wrong
    VP/flow conversion fails); with a teacher off by c, loss() is off by c / s exactly where it
    uses the teacher (s snapped, from TEACHER_FROM up) and exact below."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    ids = torch.ones(6, 24, dtype=torch.long)
    t = teacher.given(ids)
    real = t.unet

    class ExactV(torch.nn.Module):
        def forward(self, x, i, encoder_hidden_states):
            a, sg = (v[i].view(-1, 1, 1, 1) for v in (t.a, t.sigma))
            assert torch.allclose(x, a * x0 + sg * eps, atol=1e-5)  # the VP sample of the pair
            return type("O", (), {"sample": a * eps - sg * x0})

    try:
        t.unet = ExactV()
        s = t.snap(torch.linspace(0.15, 0.95, 6))
        sv = s.view(-1, 1, 1, 1)
        assert torch.allclose(t((1 - sv) * x0 + sv * eps, s), x0, atol=1e-4)

        class Velocity(torch.nn.Module):  # the exact field of the pairs drawn inside loss()
            def forward(self, hidden_states, timestep, **cond):
                s = (timestep / 1000).view(-1, 1, 1, 1)
                return type("O", (), {"sample": (hidden_states - x0) / s})

        # loss(): s snapped, the teacher's target from TEACHER_FROM up and the data's below. A
        # teacher off by c gives a target off by -c / s there, so the loss of the exact network
        # is (c / s)^2 exactly where the teacher is used
        c = 0.01

        def off(x, i, encoder_hidden_states):
            a, sg = (v[i].view(-1, 1, 1, 1) for v in (t.a, t.sigma))
            e = (x - a * x0) / sg  # the pair's noise, read back from the VP sample
            return type("O", (), {"sample": a * e - sg * x0 - c / sg})  # x0_hat = x0 + c

        t.unet = off
        x0 = x0.repeat(8, 1, 1, 1)
        t.states = t.states.repeat(8, 1, 1)
        err = toy_mmdit.loss(Velocity(), x0, {}, torch.Generator().manual_seed(1), None, teacher=t)
        g = torch.Generator().manual_seed(1)  # a seed with a draw below TEACHER_FROM
        s = t.snap(torch.sigmoid(torch.randn(48, generator=g)))  # the loss's draws, in its order
        want = torch.where(s >= toy_mmdit.TEACHER_FROM, (c / s) ** 2, torch.zeros_like(s))
        assert (s < toy_mmdit.TEACHER_FROM).any() and (s >= toy_mmdit.TEACHER_FROM).any()
        assert torch.allclose(err, want, rtol=1e-3, atol=1e-8)
        with pytest.raises(ValueError, match="its own levels"):
            t(x0[:1], torch.tensor([0.5]))
    finally:
        t.unet = real


def test_resume_with_a_teacher_equals_straight_run(tmp_path, capsys):
    import dataclasses

    cfgs = [
        dataclasses.replace(_cfg(tmp_path / r, n), teacher="builtin")
        for r, n in (("a", 3), ("b", 2))
    ]
    toy_model.train(cfgs[0], progress=False)
    toy_model.train(cfgs[1], progress=False)
    toy_model.train(dataclasses.replace(cfgs[1], steps=3), progress=False)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 3 and a["config"]["teacher"] == "builtin"
    assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"])
    # a run may switch to a teacher (or off it) on resume, with a notice
    capsys.readouterr()
    toy_model.train(dataclasses.replace(cfgs[1], steps=4, teacher=None), progress=False)
    assert "trained with teacher 'builtin'; going on with None" in capsys.readouterr().err
    toy_model.train(_cfg(tmp_path / "c", 3), progress=False)  # the data's targets: other weights
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)
    assert any(not torch.equal(a["unet"][k], c["unet"][k]) for k in a["unet"])


@pytest.mark.parametrize(
    "config, words",
    [
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "v-prediction diffusion UNet"),
        ({"_class_name": "LCMScheduler", "prediction_type": "v_prediction"}, "LCMScheduler"),
        (
            {
                "_class_name": "DDPMScheduler",
                "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True,
            },
            "from its betas alone",
        ),
        ({"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"}, "needs"),
    ],
)
def test_teacher_refuses_what_it_cannot_read(tmp_path, config, words):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=words):
        toy_mmdit.UNetTeacher(str(tmp_path))
    with pytest.raises(ValueError, match="LCMScheduler"):
        toy_mmdit.UNetTeacher("builtin-fast")  # a consistency student: samples, not means


def test_a_unet_run_refuses_a_teacher(tmp_path):
    cfg = toy_model.TrainConfig(out=str(tmp_path / "r"), size="small", steps=1, teacher="builtin")
    with pytest.raises(ValueError, match="arch 'unet' takes none"):
        toy_model.train(cfg, progress=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--arch", "vit"], "unknown --arch 'vit'"),
        (["--arch", "mmdit", "--size", "small"], "unknown --size 'small' for --arch mmdit"),
        (["--arch", "mmdit", "--min-snr", "5"], "--min-snr"),
        (["--teacher", "builtin"], "--teacher gives a flow model's targets; it needs --arch mmdit"),
        (["--arch", "mmdit", "--teacher", "builtin", "--export"], "--teacher trains"),
    ],
)
def test_train_toy_bad_input(args, words, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "diffguide", "train-toy", str(tmp_path / "run"), *args],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "run")


def test_folder_text_window_is_checked(tmp_path):
    from diffguide.pipelines.pipeline import read_defaults

    for bad in (-1, "0", 1.5, True):
        (tmp_path / "diffguide.json").write_text(json.dumps({"max_sequence_length": bad}))
        with pytest.raises(ValueError, match="max_sequence_length"):
            read_defaults(str(tmp_path))
    (tmp_path / "diffguide.json").write_text(json.dumps({"max_sequence_length": 0}))
    assert read_defaults(str(tmp_path)) == {"max_sequence_length": 0}


def test_guidance_bench_runs_the_transformer_set(tmp_path):
    """bench/guidance_methods.py --methods transformer on an (untrained) MMDiT folder: every
    method of the set makes a row, PAG and SEG on joint attention included."""
    torch.manual_seed(0)
    tok = toy_mmdit.tokenizer()
    folder = toy_mmdit.export(
        toy_mmdit.network("tiny"), toy_mmdit.text_encoder(len(tok)), tok, str(tmp_path / "m")
    )
    out = tmp_path / "r.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["--quick", "--methods", "transformer", "--model", folder, "--sampler", "euler"]
    r = subprocess.run(
        [sys.executable, os.path.join(root, "bench", "guidance_methods.py"), *args, "--out", out],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["spec"] for row in json.loads(out.read_text())["rows"]}
    assert {"cfg+slg", "cfg+pag", "cfg+seg", "cfg_zero_star", "tcfg", "fdg"} <= rows, rows
