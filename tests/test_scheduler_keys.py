"""Every scheduler config key is reproduced or said: the key table (pipelines/scheduler_keys.py)
against the installed diffusers classes, and each key's values against diffusers' own pipelines.

A value in REPRODUCED must give diffusers' images (to TOL) with no notice; a value in NOTICED must
be
named in one notice (and refused with strict_config=True). The parity runs load folders saved with
save_pretrained on both sides, as a user's folder is loaded.
"""

import inspect
import tempfile
import warnings

import numpy as np
import pytest
import torch

from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.pipelines.pipeline import ConfigNotReproduced
from diffguide.pipelines.scheduler_keys import CLASSES, HOW, review

TOL = 1e-5
SEEDS = [3, 4]
TWO = ["a red circle", "a cross"]


def with_scheduler(builder: str, cls_name: str, config: dict, **build) -> str:
    """A tiny folder of ``builder`` whose scheduler is ``cls_name`` with the builder's table and
    ``config``."""
    import diffusers

    pipe = tm.BUILDERS[builder](**build)
    cls = getattr(diffusers, cls_name)
    takes = inspect.signature(cls.__init__).parameters
    base = {k: v for k, v in pipe.scheduler.config.items() if k in takes and v is not None}
    pipe.scheduler = cls(**{**base, **config})
    folder = tempfile.mkdtemp()
    pipe.save_pretrained(folder)
    return folder


def parity(folder: str, theirs: dict, ours: dict):
    """(max |ours - theirs|, max |image 0 - image 1| of theirs, our notices) on one folder."""
    from diffusers import DiffusionPipeline

    ref_pipe = DiffusionPipeline.from_pretrained(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(
        generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np", **theirs
    ).images
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigNotReproduced)  # a reproduced key says nothing
        out = GuidedPipeline.from_pretrained(folder, progress=False)(
            seed=SEEDS, output_type="np", **ours
        )
    return float(np.abs(out.images - ref).max()), float(np.abs(ref[0] - ref[1]).max()), out.notices


def sd_call(steps):
    return dict(prompt=TWO, num_inference_steps=steps, guidance_scale=6.0), dict(
        prompt=TWO, steps=steps, guidance_scale=6.0
    )


def flow_call(steps, **theirs):
    return (
        dict(prompt=TWO, num_inference_steps=steps, height=16, width=16, **theirs),
        dict(prompt=TWO, steps=steps, height=16, width=16),
    )


PLMS = {"skip_prk_steps": True}
# name: (builder, build options, scheduler class, config, (diffusers call, diffguide call),
# tolerance)
REPRODUCED = {
    **{
        f"{cls[:4]}_{sp}_{n}_{pred}": (
            "sd",
            {},
            cls,
            {
                "timestep_spacing": sp,
                "prediction_type": pred,
                **(PLMS if cls == "PNDMScheduler" else {}),
            },
            sd_call(n),
            TOL,
        )
        for cls in ("DDIMScheduler", "PNDMScheduler")
        for sp in ("linspace", "trailing")
        for n in (7, 10)
        for pred in ("epsilon", "v_prediction")
        if n == 7 or pred == "epsilon"
    },
    **{
        f"{cls[:4]}_{sp}_alpha_bar_0": (
            "sd",
            {},
            cls,
            {
                "timestep_spacing": sp,
                "set_alpha_to_one": False,
                **(PLMS if cls == "PNDMScheduler" else {}),
            },
            sd_call(7),
            TOL,
        )
        for cls in ("DDIMScheduler", "PNDMScheduler")
        for sp in ("linspace", "trailing", "leading")
    },
    # zero terminal SNR (v-prediction, trailing); Euler's float32 steps from sigma 4096 round at
    # ~1.5e-5
    **{
        f"zero_snr_{cls}": (
            "sd",
            {},
            cls,
            {
                "rescale_betas_zero_snr": True,
                "timestep_spacing": "trailing",
                "prediction_type": "v_prediction",
            },
            sd_call(6),
            3e-5 if cls == "EulerDiscreteScheduler" else TOL,
        )
        for cls in (
            "DDIMScheduler",
            "EulerDiscreteScheduler",
            "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler",
            "UniPCMultistepScheduler",
            "DDPMScheduler",
            "LCMScheduler",
            "TCDScheduler",
        )
    },
    **{
        f"spacing_{cls}_{sp}": (
            "sd",
            {},
            cls,
            {"timestep_spacing": sp, "steps_offset": 1},
            sd_call(6),
            TOL,
        )
        for cls, sp in (
            ("DPMSolverMultistepScheduler", "leading"),
            ("DPMSolverMultistepScheduler", "trailing"),
            ("EulerDiscreteScheduler", "leading"),
            ("EulerAncestralDiscreteScheduler", "trailing"),
            ("UniPCMultistepScheduler", "leading"),
            ("HeunDiscreteScheduler", "trailing"),
            ("LMSDiscreteScheduler", "leading"),
            ("KDPM2DiscreteScheduler", "trailing"),
            ("DEISMultistepScheduler", "trailing"),
            ("DDPMScheduler", "trailing"),
        )
    },
    "dpm_lu_lambdas": (
        "sd",
        {},
        "DPMSolverMultistepScheduler",
        {"use_lu_lambdas": True},
        sd_call(8),
        TOL,
    ),
    "dpm_lu_lambdas_v": (
        "sd",
        {},
        "DPMSolverMultistepScheduler",
        {"use_lu_lambdas": True, "prediction_type": "v_prediction"},
        sd_call(8),
        TOL,
    ),
    "dpm_euler_at_final": (
        "sd",
        {},
        "DPMSolverMultistepScheduler",
        {"euler_at_final": True, "lower_order_final": False},
        sd_call(8),
        TOL,
    ),
    "dpm_final_sigma_min": (
        "sd",
        {},
        "DPMSolverMultistepScheduler",
        {"final_sigmas_type": "sigma_min"},
        sd_call(8),
        TOL,
    ),
    "dpm_threshold_below_1": (
        "sd",
        {},
        "DPMSolverMultistepScheduler",
        {"thresholding": True, "sample_max_value": 0.5},
        sd_call(8),
        TOL,
    ),
    "ddim_threshold": (
        "sd",
        {},
        "DDIMScheduler",
        {"thresholding": True, "sample_max_value": 1.5},
        sd_call(8),
        TOL,
    ),
    "euler_continuous_v": (
        "sd",
        {},
        "EulerDiscreteScheduler",
        {"timestep_type": "continuous", "prediction_type": "v_prediction"},
        sd_call(8),
        TOL,
    ),
    "euler_karras_bounds": (
        "sd",
        {},
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        sd_call(8),
        TOL,
    ),
    "euler_exponential_bounds": (
        "sd",
        {},
        "EulerDiscreteScheduler",
        {"use_exponential_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
        sd_call(8),
        TOL,
    ),
    "ddpm_fixed_small_log": (
        "sd",
        {},
        "DDPMScheduler",
        {"variance_type": "fixed_small_log"},
        sd_call(6),
        TOL,
    ),
    "heun_clip": (
        "sd",
        {},
        "HeunDiscreteScheduler",
        {"clip_sample": True, "clip_sample_range": 0.5},
        sd_call(6),
        TOL,
    ),
    "lcm_options": (
        "sd",
        {},
        "LCMScheduler",
        {
            "thresholding": True,
            "original_inference_steps": 30,
            "timestep_scaling": 5.0,
            "set_alpha_to_one": False,
        },
        sd_call(4),
        TOL,
    ),
    "tcd_options": (
        "sd",
        {},
        "TCDScheduler",
        {"set_alpha_to_one": False, "clip_sample": True},
        sd_call(4),
        TOL,
    ),
    "cogvideox_ddim": (
        "sd",
        {},
        "CogVideoXDDIMScheduler",
        {
            "timestep_spacing": "trailing",
            "snr_shift_scale": 3.0,
            "clip_sample": False,
            "prediction_type": "v_prediction",
        },
        sd_call(7),
        TOL,
    ),
    "cogvideox_2b_published": (  # the keys convert_cogvideox_to_diffusers.py writes: the SNR
        "sd",  # shift comes before the zero-SNR rescale
        {},
        "CogVideoXDDIMScheduler",
        {
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "set_alpha_to_one": True,
            "snr_shift_scale": 3.0,
            "timestep_spacing": "trailing",
        },
        sd_call(7),
        TOL,
    ),
    "ddim_trained_betas_zero_snr": (  # trained betas are rescaled as the built ones are
        "sd",
        {},
        "DDIMScheduler",
        {
            "trained_betas": (torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2).tolist(),
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        sd_call(7),
        TOL,
    ),
    **{
        f"edm_{cls[3:7]}_{pred}_{sch}": (
            "sd",
            {},
            cls,
            {"sigma_schedule": sch, "prediction_type": pred},
            sd_call(8),
            TOL,
        )
        for cls in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
        for pred in ("epsilon", "v_prediction")
        for sch in ("karras", "exponential")
    },
    "edm_sdxl_playground_like": (
        "sdxl",
        {},
        "EDMDPMSolverMultistepScheduler",
        {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0},
        tuple({**c, "height": 16, "width": 16} for c in sd_call(8)),
        TOL,
    ),
    "flow_shift_terminal": (
        "sd3",
        {},
        "FlowMatchEulerDiscreteScheduler",
        {"shift": 3.0, "shift_terminal": 0.1},
        flow_call(6, guidance_scale=5.0),
        TOL,
    ),
    **{
        f"flow_{k}_sigmas": (
            "sd3",
            {},
            "FlowMatchEulerDiscreteScheduler",
            {"shift": 3.0, f"use_{k}_sigmas": True},
            flow_call(6, guidance_scale=5.0),
            TOL,
        )
        for k in ("karras", "exponential", "beta")
    },
    "flow_heun": (
        "sd3",
        {},
        "FlowMatchHeunDiscreteScheduler",
        {"shift": 3.0},
        flow_call(6, guidance_scale=5.0),
        TOL,
    ),
    "flux_shift_terminal": (
        "flux",
        {},
        "FlowMatchEulerDiscreteScheduler",
        {"shift_terminal": 0.05},
        flow_call(6, guidance_scale=3.5),
        TOL,
    ),
    "flux_karras": (
        "flux",
        {},
        "FlowMatchEulerDiscreteScheduler",
        {"use_karras_sigmas": True},
        flow_call(6, guidance_scale=3.5),
        TOL,
    ),
}

# name: (scheduler class, config, the key the notice must name)
NOTICED = {
    "invert_sigmas": ("FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True}, "invert_sigmas"),
    "lambda_min_clipped": (
        "DPMSolverMultistepScheduler",
        {"lambda_min_clipped": -5.1},
        "lambda_min_clipped",
    ),
    "dpm_dynamic_shift": (
        "DPMSolverMultistepScheduler",
        {"use_dynamic_shifting": True},
        "use_dynamic_shifting",
    ),
    "unipc_sigma_max": ("UniPCMultistepScheduler", {"sigma_max": 10.0}, "sigma_max"),
    "euler_log_linear": (
        "EulerDiscreteScheduler",
        {"interpolation_type": "log_linear"},
        "interpolation_type",
    ),
    "euler_final_sigma_min": (
        "EulerDiscreteScheduler",
        {"final_sigmas_type": "sigma_min"},
        "final_sigmas_type",
    ),
    "edm_final_sigma_min": (
        "EDMEulerScheduler",
        {"final_sigmas_type": "sigma_min"},
        "final_sigmas_type",
    ),
}


def test_the_table_lists_exactly_each_classes_keys():
    """A key diffusers adds to a class (or drops) fails here until the table says how it is read."""
    import diffusers

    for name, keys in CLASSES.items():
        assert len(keys) == len(set(keys)), f"{name}: a key listed twice"
        assert set(keys) <= set(HOW), f"{name}: keys with no 'how': {sorted(set(keys) - set(HOW))}"
        params = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {
            "self",
            "args",
            "kwargs",
        }
        if params:  # DPMSolverSDEScheduler is a dummy without torchsde
            assert params == set(keys), (
                f"{name}: not in the table {sorted(params - set(keys))}, gone "
                f"{sorted(set(keys) - params)}"
            )


@pytest.mark.parametrize("case", list(REPRODUCED))
def test_reproduced_values_give_diffusers_images(case):
    builder, build, cls, config, (theirs, ours), tol = REPRODUCED[case]
    folder = with_scheduler(builder, cls, config, **build)
    diff, between, notices = parity(folder, theirs, ours)
    assert between > 50 * tol, f"images hardly depend on the noise ({between})"
    assert diff < tol, f"{case}: {diff:.2e} from diffusers"
    assert not any("config keys" in n for n in notices)


@pytest.mark.parametrize("case", list(NOTICED))
def test_values_not_reproduced_are_said_in_one_notice_or_refused(case):
    cls, config, key = NOTICED[case]
    builder = "sd3" if cls.startswith("FlowMatch") else "sd"
    folder = with_scheduler(builder, cls, config)
    with pytest.warns(ConfigNotReproduced, match=key):
        gp = GuidedPipeline.from_pretrained(folder, progress=False)
    out = gp(
        "a",
        steps=2,
        output_type="latent",
        **({"height": 16, "width": 16} if builder == "sd3" else {}),
    )
    said = [n for n in out.notices if key in n]
    assert len(said) == 1 and f"{key}=" in said[0]
    with pytest.raises(ValueError, match=key):
        GuidedPipeline.from_pretrained(folder, progress=False, strict_config=True)


def test_a_key_outside_the_table_is_said_unless_at_its_default():
    import diffusers

    cls = diffusers.DDIMScheduler

    class Newer(cls):  # a diffusers release whose DDIM takes an argument the table does not list
        def __init__(self, new_key: int = 0, **kw):
            super().__init__(**kw)

    assert review("DDIMScheduler", {**cls().config, "new_key": 1}, Newer) == [
        "new_key=1 (not read by diffguide)"
    ]
    assert review("DDIMScheduler", {**cls().config, "new_key": 0}, Newer) == []
    assert review("DDIMScheduler", dict(cls().config), cls) == []
    assert (
        review("DDIMScheduler", {**cls().config, "skip_prk_steps": True}, cls) == []
    )  # not a DDIM argument


def test_stochastic_flow_sampling_maps_to_the_consistency_sampler_with_a_notice():
    folder = with_scheduler("sd3", "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True})
    gp = GuidedPipeline.from_pretrained(folder, progress=False)
    assert gp.info.sampler == "consistency"
    out = gp("a", steps=3, height=16, width=16, output_type="latent")
    assert any("global generator" in n for n in out.notices)


def test_cli_prints_the_config_notice_once_and_strict_config_exits_2(tmp_path):
    import subprocess
    import sys

    folder = with_scheduler("sd", "DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1})
    cmd = [
        sys.executable,
        "-m",
        "diffguide",
        "generate",
        "a",
        "--model",
        folder,
        "--steps",
        "2",
        "--quiet",
        "-o",
        str(tmp_path / "a.png"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("lambda_min_clipped=-5.1") == 1, run.stderr
    run = subprocess.run(
        cmd[:-2] + ["--strict-config", "-o", str(tmp_path / "b.png")],
        capture_output=True,
        text=True,
    )
    assert (
        run.returncode == 2 and "lambda_min_clipped" in run.stderr and "Traceback" not in run.stderr
    )
    assert not (tmp_path / "b.png").exists()


# model-side keys: each family reads the VAE keys its diffusers pipeline reads, and no others
VAE_CASES = {
    "sd_ignores_shift_and_stats": (
        "sd",
        {
            "shift_factor": 0.3,
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 0.8, 1.2, 1.0],
        },
        sd_call(6),
    ),
    "sdxl_reads_stats": (
        "sdxl",
        {
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 0.8, 1.2, 1.0],
            "shift_factor": 0.3,
        },
        tuple({**c, "height": 16, "width": 16} for c in sd_call(6)),
    ),
    "sd3_reads_shift": (
        "sd3",
        {
            "shift_factor": 0.3,
            "latents_mean": [0.1, -0.2, 0.3, 0.0],
            "latents_std": [1.5, 0.8, 1.2, 1.0],
        },
        flow_call(6, guidance_scale=5.0),
    ),
}


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_vae_keys_are_read_as_the_familys_pipeline_reads_them(case):
    builder, keys, (theirs, ours) = VAE_CASES[case]
    pipe = tm.BUILDERS[builder]()
    pipe.vae.register_to_config(**keys)
    folder = tempfile.mkdtemp()
    pipe.save_pretrained(folder)
    diff, between, _ = parity(folder, theirs, ours)
    assert between > 50 * TOL and diff < TOL, f"{case}: {diff:.2e}"


@pytest.mark.parametrize("builder,upcasts", [("sd", False), ("sdxl", True)])
def test_force_upcast_only_where_the_familys_pipeline_upcasts(builder, upcasts):
    """SDXL's pipeline decodes a float16 VAE with force_upcast in float32; SD's decodes it as it
    is."""
    gp = GuidedPipeline.from_pipe(tm.BUILDERS[builder](), progress=False)
    vae = gp.pipe.vae.to(torch.float16)
    vae.register_to_config(force_upcast=True)
    seen = []
    decode = vae.decode
    vae.decode = lambda z, **kw: (seen.append(z.dtype), decode(z, **kw))[1]
    gp.family.decode(torch.zeros(1, 4, 2, 2))
    assert seen == [torch.float32 if upcasts else torch.float16]
    assert vae.dtype == torch.float16  # cast back after an upcast


def test_the_docs_table_lists_every_key_and_class():
    import pathlib

    text = (pathlib.Path(__file__).parents[1] / "docs" / "models.md").read_text()
    missing = [k for k in HOW if f"`{k}`" not in text] + [c for c in CLASSES if c not in text]
    assert not missing, f"docs/models.md does not list {missing}"
