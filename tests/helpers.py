"""Shared by tests and bench: SD settings, a tiny UNet with a well-posed output, reference loops,
the convergence measurement, the diffusers parity cases, the mixture as ComfyUI runs it and runs on
several CPU processes."""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import torch

import diffguide as dg

SD = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)


def sd_schedule(**kw) -> dg.VPSchedule:
    return dg.VPSchedule.from_betas(**SD, **kw)


def tiny_unet(seed: int = 0, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
        attention_head_dim=8,
    ).eval()


class WellPosed:
    """Network output = the exact prediction for N(0, I) data + 0.1 * a random UNet.

    A bare random UNet predicts an eps inconsistent with x_t, so x0 = (x - s eps)/a blows up by 1/a
    and samples end far from unit variance; this keeps them near it while the UNet still makes the
    output depend on x, t and the condition. Called exactly like a diffusers UNet (x, timestep,
    emb)."""

    def __init__(self, schedule: dg.VPSchedule, unet, kind: str = "eps"):
        self.schedule, self.unet, self.kind = schedule, unet, kind

    def __call__(self, x, t, emb):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)[0]
        a, s = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        base = {"eps": s * x, "v": 0 * x, "x0": a * x}[self.kind]
        return base + 0.1 * self.unet(x, t.float(), encoder_hidden_states=emb).sample

    def denoiser(self) -> dg.NetDenoiser:
        return dg.NetDenoiser(
            lambda x, tm, c: self(x, tm, c), self.schedule, self.kind, module=self.unet
        )


def diffusers_loop(scheduler, model, z, steps, cond, uncond, scale, generator=None):
    """The StableDiffusionPipeline denoising loop, verbatim in structure: batched CFG on the raw
    output."""
    scheduler.set_timesteps(steps)
    lat = z * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([lat] * 2), t)
            out = model(inp, t, torch.cat([uncond, cond]))
            u, c = out.chunk(2)
            lat = scheduler.step(u + scale * (c - u), t, lat, generator=generator).prev_sample
    return lat


def ode_reference(
    gm: dg.GaussianMixture, y0: torch.Tensor, sigma_hi: float, sigma_lo: float, cond=None
):
    """Probability-flow ODE dy/dlam = D(y, lam) - y in VE coordinates (y = x/a), solved by scipy's
    DOP853 at tolerance 1e-13: an integrator independent of diffguide's samplers."""
    from scipy.integrate import solve_ivp

    shape = y0.shape

    def f(lam, flat):
        y = torch.from_numpy(flat).view(shape)
        ve = math.exp(-lam)
        a = 1 / math.sqrt(1 + ve * ve)
        return (gm.posterior_mean(y * a, a, ve * a, cond) - y).flatten().numpy()

    sol = solve_ivp(
        f,
        (-math.log(sigma_hi), -math.log(sigma_lo)),
        y0.double().flatten().numpy(),
        method="DOP853",
        rtol=1e-13,
        atol=1e-13,
    )
    assert sol.success
    return torch.from_numpy(sol.y[:, -1]).view(shape)


# --- convergence ---------------------------------------------------------------------------------


def convergence_errors(spec, gm, y0, labels, yref, steps, sigma_hi, sigma_lo):
    """Max error at sigma_lo versus NFE on logSNR-uniform grids of the given step counts."""
    sc = gm.schedule
    errs, nfes = [], []
    for n in steps:
        ts = dg.timesteps(
            sc, n, "uniform_lam", final="sigma_min", sigma_min=sigma_lo, sigma_max=sigma_hi
        )
        den = dg.guide(gm, None, labels)
        x = dg.sample(den, spec, ts, y0 * float(sc.alpha(ts[0])))
        errs.append(float((x / float(sc.alpha(ts[-1])) - yref).abs().max()))
        nfes.append(den.nfe)
    return errs, nfes


def fitted_order(errs, nfes) -> float:
    """Minus the least-squares slope of log(error) against log(NFE)."""
    return -float(np.polyfit(np.log(nfes), np.log(errs), 1)[0])


# --- parity with diffusers' scheduler loops
# --------------------------------------------------------

PARITY_SCALE = 5.0
PARITY_SEEDS = [11, 12]


def _dm(name):
    import diffusers

    return getattr(diffusers, name)


# case: (diffusers scheduler class, its settings beyond SD's, diffguide sampler spec, step kwargs)
PARITY_CASES = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "dpmpp_2m", {}),
    "dpmpp_2m_heun": (
        "DPMSolverMultistepScheduler",
        {"solver_type": "heun"},
        "dpmpp_2m:solver_type=heun",
        {},
    ),
    "dpmpp_3m_published": (
        "DPMSolverMultistepScheduler",
        {"solver_order": 3},
        "dpmpp_3m_published",
        {},
    ),
    "ddim": (
        "DDIMScheduler",
        {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False},
        "ddim",
        {},
    ),
    "euler": ("EulerDiscreteScheduler", {}, "euler", {}),
    "heun": ("HeunDiscreteScheduler", {}, "heun", {}),
    "lms": ("LMSDiscreteScheduler", {}, "lms", {}),
    "tcd": ("TCDScheduler", {}, "tcd", {"eta": 0.3}),
    "dpmpp_2s_singlestep": ("DPMSolverSinglestepScheduler", {}, "dpmpp_2s_singlestep", {}),
    "deis": ("DEISMultistepScheduler", {}, "deis", {}),
    "deis_3": ("DEISMultistepScheduler", {"solver_order": 3}, "deis:order=3", {}),
    "tcd_gamma_0.6": ("TCDScheduler", {}, "tcd:gamma=0.6", {"eta": 0.6}),
    "plms": (
        "PNDMScheduler",
        {"steps_offset": 1, "skip_prk_steps": True, "set_alpha_to_one": False},
        "plms",
        {},
    ),
    "unipc": ("UniPCMultistepScheduler", {}, "unipc", {}),
    # bh1 onto sigma = 0 gives NaN in diffusers (B(h) = -h is infinite there): compared ending at
    # sigma_min
    "unipc_bh1_sigma_min": (
        "UniPCMultistepScheduler",
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        "unipc:solver_type=bh1",
        {},
    ),
    "unipc_3": ("UniPCMultistepScheduler", {"solver_order": 3}, "unipc:order=3", {}),
    "unipc_no_corrector": (
        "UniPCMultistepScheduler",
        {"disable_corrector": [0, 2]},
        "unipc:disable_corrector=0|2",
        {},
    ),
    # stochastic: per-sample generator lists on both sides
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++"},
        "dpmpp_2m_sde",
        {},
    ),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}, "euler_ancestral", {}),
    "ddim_eta": (
        "DDIMScheduler",
        {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False},
        "ddim:eta=1.0",
        {"eta": 1.0},
    ),
}


def parity_grid(schedule, steps, case):
    """The diffusers scheduler's own grid for SD settings, as a diffguide grid."""
    if case.startswith(("dpm", "unipc", "deis")):
        final = (
            "sigma_min" if case.endswith("sigma_min") or case.startswith("deis") else "zero"
        )  # DEIS ends on sigma(0)
        return dg.timesteps(schedule, steps, "linspace", drop_last=True, final=final)
    if case.startswith("tcd"):
        return dg.timesteps(schedule, steps, "lcm", original_steps=50, final="sigma_min")
    if case.startswith(("ddim", "plms")):
        return dg.timesteps(schedule, steps, "leading", steps_offset=1, final="sigma_min")
    return dg.timesteps(schedule, steps, "linspace", round=False)  # Euler / Heun / Euler ancestral


def parity_run(case, steps, model_ref, den, schedule, shape, cond, uncond, kind="epsilon"):
    """(diffguide result, diffusers result) for one case on the same model and initial noise."""
    from diffusers.utils.torch_utils import randn_tensor

    cls, extra, spec, step_kw = PARITY_CASES[case]
    sched = _dm(cls)(**SD, **extra, prediction_type=kind)
    takes_generator = "generator" in inspect.signature(sched.step).parameters

    class WithKwargs:  # the shared loop, plus this scheduler's extra step arguments (eta)
        def __getattr__(self, k):
            return getattr(sched, k)

        def step(self, *a, generator=None, **kw):
            return sched.step(
                *a, **kw, **step_kw, **({"generator": generator} if takes_generator else {})
            )

    gens = [torch.Generator().manual_seed(s) for s in PARITY_SEEDS]
    z = randn_tensor(shape, generator=gens)
    ref = diffusers_loop(
        WithKwargs(), model_ref, z, steps, cond, uncond, PARITY_SCALE, generator=gens
    )
    noise = dg.SeededNoise(PARITY_SEEDS)
    z_ours = noise.randn(shape)
    assert torch.equal(z, z_ours)
    ts = parity_grid(schedule, steps, case)
    # diffusers starts VP schedulers (DDIM, DPM) at x_VP = z and VE ones (Euler, Heun) at
    # x~ = init_noise_sigma z, i.e. x_VP = a(t0) init_noise_sigma z
    start = z_ours * (
        float(sched.init_noise_sigma) * float(schedule.alpha(ts[0]))
        if sched.init_noise_sigma != 1.0
        else 1.0
    )
    x = dg.sample(dg.guide(den, dg.CFG(scale=PARITY_SCALE), cond, uncond), spec, ts, start, noise)
    return x, ref


def gmm_eps_model(gm):
    """The mixture's exact eps as a diffusers-style model (x, timestep, labels)."""
    sc = gm.schedule

    def model(x, t, labels):
        t = torch.as_tensor(t, dtype=torch.float64)
        a, s = sc.alpha(t), sc.sigma(t)
        return ((x.double() - a * gm.posterior_mean(x, a, s, labels)) / s).float()

    return model


# --- parity with diffusers' pipelines
# --------------------------------------------------------------

PIPELINE_SEEDS = [3, 4]
_TWO = ["a red circle", "a cross"]
# case: (tiny builder, builder options, diffusers call, diffguide call)
PIPELINE_CASES = {
    **{
        f"sd_{pred}_{sampler}": (
            "sd",
            {"prediction_type": pred, "scheduler": sched},
            dict(
                prompt=["a red circle", "a blue square"],
                negative_prompt=["", "green"],
                num_inference_steps=12,
                guidance_scale=6.0,
            ),
            dict(
                prompt=["a red circle", "a blue square"],
                negative_prompt=["", "green"],
                steps=12,
                guidance_scale=6.0,
                sampler=sampler,
            ),
        )
        for pred in ("epsilon", "v_prediction")
        for sched, sampler in (
            ("DPMSolverMultistepScheduler", "dpmpp_2m"),
            ("DDIMScheduler", "ddim"),
            ("EulerDiscreteScheduler", "euler"),
        )
    },
    "dit_ddim": (
        "dit",
        {},
        dict(class_labels=[1, 2], num_inference_steps=10, guidance_scale=4.0),
        dict(prompt=[1, "2"], steps=10, guidance_scale=4.0, sampler="ddim"),
    ),
    "sd3_euler": (
        "sd3",
        {},
        dict(prompt=_TWO, num_inference_steps=10, guidance_scale=5.0, height=16, width=16),
        dict(prompt=_TWO, steps=10, guidance_scale=5.0, sampler="euler"),
    ),
    "pixart_dpmpp_2m": (
        "pixart",
        {},
        dict(
            prompt=_TWO,
            num_inference_steps=10,
            guidance_scale=4.5,
            height=16,
            width=16,
            use_resolution_binning=False,
        ),
        dict(prompt=_TWO, steps=10, guidance_scale=4.5, sampler="dpmpp_2m"),
    ),
    "sdxl_euler": (
        "sdxl",
        {},
        dict(prompt=_TWO, num_inference_steps=10, guidance_scale=5.0, height=16, width=16),
        dict(prompt=_TWO, steps=10, guidance_scale=5.0, sampler="euler"),
    ),
    "ddpm_ddim_eta1": (
        "ddpm",
        {},
        dict(batch_size=2, num_inference_steps=10),
        dict(steps=10, sampler="ddim:eta=1", guidance="none", num_images_per_prompt=2),
    ),
}


def pipeline_parity(case, folder):
    """(diffguide images, diffusers images) as float arrays in [0, 1] for one case on a saved
    folder."""
    from diffusers import DiffusionPipeline
    from diffguide.pipelines import GuidedPipeline

    _, _, theirs, ours = PIPELINE_CASES[case]
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in PIPELINE_SEEDS]
    ref = pipe(generator=gens, output_type="np", **theirs).images
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    out = gp(**{"guidance": "cfg", **ours}, seed=PIPELINE_SEEDS, output_type="np")
    return out, ref


# "DPM++ 2M Karras": diffusers evaluates the network at rounded timesteps beside exact Karras sigmas
for _pred in ("epsilon", "v_prediction"):
    for _steps in (10, 30):
        PIPELINE_CASES[f"sd_{_pred}_dpmpp_2m_karras_{_steps}"] = (
            "sd",
            {
                "prediction_type": _pred,
                "scheduler": "DPMSolverMultistepScheduler",
                "use_karras_sigmas": True,
            },
            dict(prompt=_TWO, num_inference_steps=_steps, guidance_scale=6.0),
            dict(prompt=_TWO, steps=_steps, guidance_scale=6.0, sampler="dpmpp_2m"),
        )
    for _sig in ("exponential", "beta"):
        for _sched, _sampler in (
            ("DPMSolverMultistepScheduler", "dpmpp_2m"),
            ("EulerDiscreteScheduler", "euler"),
        ):
            PIPELINE_CASES[f"sd_{_pred}_{_sampler}_{_sig}"] = (
                "sd",
                {"prediction_type": _pred, "scheduler": _sched, f"use_{_sig}_sigmas": True},
                dict(prompt=_TWO, num_inference_steps=12, guidance_scale=6.0),
                dict(prompt=_TWO, steps=12, guidance_scale=6.0, sampler=_sampler),
            )
    PIPELINE_CASES[f"sd_{_pred}_euler_karras"] = (
        "sd",
        {
            "prediction_type": _pred,
            "scheduler": "EulerDiscreteScheduler",
            "use_karras_sigmas": True,
        },
        dict(prompt=_TWO, num_inference_steps=12, guidance_scale=6.0),
        dict(prompt=_TWO, steps=12, guidance_scale=6.0, sampler="euler"),
    )

# Flux.1: embedded guidance (dev), true CFG with a negative prompt, a resolution-dependent shift,
# schnell
for _hw in (16, 32):
    PIPELINE_CASES[f"flux_embedded_{_hw}"] = (
        "flux",
        {},
        dict(prompt=_TWO, num_inference_steps=6, guidance_scale=3.5, height=_hw, width=_hw),
        dict(prompt=_TWO, steps=6, height=_hw, width=_hw, guidance="none"),
    )
PIPELINE_CASES["flux_true_cfg"] = (
    "flux",
    {},
    dict(
        prompt=_TWO,
        negative_prompt=["", "blurry"],
        true_cfg_scale=4.0,
        guidance_scale=2.0,
        num_inference_steps=6,
        height=16,
        width=16,
    ),
    dict(
        prompt=_TWO,
        negative_prompt=["", "blurry"],
        guidance_scale=4.0,
        embedded_guidance=2.0,
        steps=6,
        height=16,
        width=16,
    ),
)
PIPELINE_CASES["flux_schnell"] = (
    "flux",
    {"guidance_embeds": False, "dynamic": False},
    dict(prompt=_TWO, num_inference_steps=4, guidance_scale=0.0, height=16, width=16),
    dict(prompt=_TWO, steps=4, height=16, width=16, guidance="none"),
)

# Qwen-Image: no guidance without a negative prompt (as diffusers); with one, true CFG renormalised
# per token
for _hw in (16, 32):
    PIPELINE_CASES[f"qwenimage_true_cfg_{_hw}"] = (
        "qwenimage",
        {},
        dict(
            prompt=_TWO,
            negative_prompt=["", "blurry"],
            true_cfg_scale=4.0,
            num_inference_steps=5,
            height=_hw,
            width=_hw,
        ),
        dict(
            prompt=_TWO,
            negative_prompt=["", "blurry"],
            guidance="cfg:scale=4,renorm=2,rescale_space=flow",
            steps=5,
            height=_hw,
            width=_hw,
        ),
    )
PIPELINE_CASES["qwenimage_plain"] = (
    "qwenimage",
    {},
    dict(prompt=_TWO, num_inference_steps=5, height=16, width=16),
    dict(prompt=_TWO, steps=5, height=16, width=16, guidance="none"),
)

# Sana (DPM-Solver on a flow, CFG 4.5) and SANA-Sprint (TrigFlow, embedded guidance, its own 2-step
# grid)
PIPELINE_CASES["sana_dpmpp_2m"] = (
    "sana",
    {},
    dict(
        prompt=_TWO,
        num_inference_steps=6,
        guidance_scale=4.5,
        height=32,
        width=32,
        use_resolution_binning=False,
    ),
    dict(prompt=_TWO, steps=6, guidance_scale=4.5, height=32, width=32),
)
PIPELINE_CASES["sana_sprint_2"] = (
    "sana_sprint",
    {},
    dict(prompt=_TWO, num_inference_steps=2, height=32, width=32, use_resolution_binning=False),
    dict(prompt=_TWO, steps=2, height=32, width=32, guidance="none"),
)
PIPELINE_CASES["sana_sprint_4"] = (
    "sana_sprint",
    {},
    dict(
        prompt=_TWO,
        num_inference_steps=4,
        intermediate_timesteps=None,
        guidance_scale=3.0,
        height=32,
        width=32,
        use_resolution_binning=False,
    ),
    dict(prompt=_TWO, steps=4, embedded_guidance=3.0, height=32, width=32, guidance="none"),
)

for _verdict in ("flag_all", "flag_none"):
    PIPELINE_CASES[f"sd_safety_{_verdict}"] = (
        "sd",
        {"safety": _verdict},
        dict(prompt=_TWO, num_inference_steps=6, guidance_scale=5.0),
        dict(prompt=_TWO, steps=6, guidance_scale=5.0, sampler="dpmpp_2m"),
    )


def states_equal(a: dict, b: dict, skip=("config",)) -> bool:
    """Two training states equal bit for bit (tensors with torch.equal), ignoring the keys in
    ``skip`` (the run's own settings: output folder, max_steps, process count)."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if k in skip:
            continue
        if isinstance(x, dict):
            if not states_equal(x, y, ()):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif isinstance(x, (list, tuple)) and x and isinstance(x[0], dict):
            if not all(states_equal(p, q, ()) for p, q in zip(x, y)):
                return False
        elif x != y:
            return False
    return True


def caption_folder(folder, n: int, size: int = 8, texts=("a red circle", "a blue square")) -> str:
    """n random size x size images with alternating captions, in the imagefolder layout
    (metadata.jsonl) the distillation trainer reads."""
    import json
    import os

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i}.png")
            )
            f.write(json.dumps({"file_name": f"{i}.png", "text": texts[i % len(texts)]}) + "\n")
    return str(folder)


# a folder's scheduler decides the default sampler (issue 24): no sampler given on our side
PIPELINE_CASES["sd_epsilon_TCDScheduler_eta"] = (  # TCD with the authors' gamma, as diffusers' eta
    "sd",
    {"scheduler": "TCDScheduler"},
    dict(prompt=_TWO, num_inference_steps=4, guidance_scale=6.0, eta=0.3),
    dict(prompt=_TWO, steps=4, guidance_scale=6.0, eta=0.3),
)
for _pred in ("epsilon", "v_prediction"):
    for _sched in (
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "LMSDiscreteScheduler",
        "UniPCMultistepScheduler",
        "PNDMScheduler",
        "TCDScheduler",
        "DEISMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DDPMScheduler",
    ):
        PIPELINE_CASES[f"sd_{_pred}_default_{_sched}"] = (
            "sd",
            {
                "prediction_type": _pred,
                "scheduler": _sched,
                **(
                    {"skip_prk_steps": True, "set_alpha_to_one": False}
                    if _sched == "PNDMScheduler"
                    else {}
                ),
            },
            dict(prompt=_TWO, num_inference_steps=8, guidance_scale=6.0),
            dict(prompt=_TWO, steps=8, guidance_scale=6.0),
        )


# --- the mixture as ComfyUI runs a model (references transcribed from comfy/k_diffusion) ----------


def flow_mixture(gmm, shift: float = 3.0) -> dg.GaussianMixture:
    """gmm's components on a flow schedule (CONST in ComfyUI) of the given shift."""
    return dg.GaussianMixture(
        gmm.means, gmm.stds, gmm.weights, gmm.labels, dg.FlowSchedule(shift=shift)
    )


def comfy_setup(gmm, steps: int, flow: bool, spacing: str = "karras", **grid):
    """gmm (labels 0 and 2) as ComfyUI sees it: on its VP schedule in VE coordinates (sigma the VE
    level, x / a) or, with ``flow``, on ``flow_mixture(gmm)`` with sigma the flow time.

    (bound denoiser, grid, ComfyUI's sigmas, D(x, sigma) the model's denoised counting its calls
    in ``D.calls``, c0 with x = c0 x_comfy, lam, sig): lam and sig are ComfyUI's
    sigma_to_half_log_snr and half_log_snr_to_sigma."""
    gm = flow_mixture(gmm) if flow else gmm
    sc, labels = gm.schedule, torch.tensor([0, 2])
    ts = dg.timesteps(sc, steps, spacing, **grid)
    sigmas = [float(sc.sigma(t) if flow else sc.ve(t)) for t in ts]

    def D(x, sigma):  # ComfyUI's denoised at its sigma
        D.calls += 1
        if sigma == 0:
            return x
        t = sc.t_of_ve(torch.tensor(sigma / (1 - sigma) if flow else sigma, dtype=torch.float64))
        return gm(x if flow else float(sc.alpha(t)) * x, t, labels).x0

    def lam(sigma):  # ComfyUI's sigma_to_half_log_snr
        if sigma == 0:
            return math.inf
        return math.log((1 - sigma) / sigma) if flow else -math.log(sigma)

    def sig(lam):  # ComfyUI's half_log_snr_to_sigma
        return 1 / (1 + math.exp(lam)) if flow else math.exp(-lam)

    D.calls = 0
    bound = dg.guide(gm, dg.parse_spec("guidance", "none"), labels)
    return bound, ts, sigmas, D, 1.0 if flow else float(sc.alpha(ts[0])), lam, sig


class Tape:
    """A noise source that replays a fixed list of 2 x 2 float64 draws (and counts them)."""

    def __init__(self, seed: int = 11, n: int = 400):
        g = torch.Generator().manual_seed(seed)
        self.draws = [torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(n)]
        self.used = 0

    def randn(self, shape=(2, 2), dtype=torch.float64, device=None):
        z = self.draws[self.used]
        assert tuple(shape) == tuple(z.shape)
        self.used += 1
        return z.to(dtype)

    def __call__(self, like, t=None, t_next=None):
        return self.randn(like.shape, like.dtype)


def k_ancestral_step(s: float, s1: float, eta: float):
    """k-diffusion's get_ancestral_step: (sigma_down, sigma_up) from s to s1."""
    if not eta:
        return s1, 0.0
    up = min(s1, eta * math.sqrt(s1**2 * (s**2 - s1**2) / s**2))
    return math.sqrt(s1**2 - up**2), up


# --- several CPU processes (torchrun, gloo) ------------------------------------------------------


def torchrun(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node NPROC ARGS`` on CPU
    (accelerate told so, one OpenMP thread a process), its output captured; it must exit 0 (the end
    of its stderr otherwise)."""
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node", str(nproc), *args],
        env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


_PROCESS_HEAD = """import sys
import torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[2])
dist.init_process_group("gloo")
torch.set_num_threads(1)
"""
_PROCESS_TAIL = """
torch.save(result, f"{sys.argv[1]}.{dist.get_rank()}")
dist.barrier()
from diffguide.parallel import exit_launched
exit_launched(0)  # gloo's teardown at interpreter exit sometimes aborts ("terminate called ...")
"""


def torchrun_script(tmp_path, body: str, args=(), nproc: int = 2, timeout: float = 600) -> list:
    """``body`` run under ``torchrun`` on nproc processes, each with argv [OUT, the tests folder,
    *args]: it runs in a gloo process group, on one thread, with sys, torch and torch.distributed
    (dist) imported and the tests folder importable, and sets ``result``, which each process saves
    to f"{OUT}.{rank}". The results, by rank."""
    script, out = tmp_path / "launched.py", tmp_path / "out"
    script.write_text(_PROCESS_HEAD + body + _PROCESS_TAIL)
    tests = os.path.dirname(os.path.abspath(__file__))
    torchrun([str(script), str(out), tests, *args], nproc, timeout)
    return [torch.load(f"{out}.{r}") for r in range(nproc)]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n for the block (a one-process reference runs with the
    launched processes' count: CPU kernels sum in another order on another number of threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
