"""Consistency-model sampling: LCM's timesteps, boundary condition and multistep sampler, against
diffusers' LCMScheduler and LatentConsistencyModelPipeline on a tiny guidance-embedded UNet."""

import numpy as np
import pytest
import torch

import diffguide as dg
from diffguide.core.denoiser import Boundary


@pytest.mark.parametrize("original", [50, 20])
def test_lcm_spacing_matches_lcm_scheduler(original):
    from diffusers import LCMScheduler

    sch = LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=original,
    )
    sd = dg.VPSchedule.from_betas()
    for steps in range(1, 9):
        sch.set_timesteps(steps)
        ts = dg.timesteps(sd, steps, "lcm", original_steps=original)
        assert ts[:-1].tolist() == sch.timesteps.tolist() and ts[-1] == -1
    assert dg.timesteps(sd, 4, "lcm")[:-1].tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="steps <= original_steps"):
        dg.timesteps(sd, 60, "lcm")


def test_boundary_scalings_match_diffusers():
    from diffusers import LCMScheduler

    sch = LCMScheduler()
    b = Boundary(dg.GaussianMixture.ring(dg.VPSchedule.from_betas()))
    for t in (0, 1, 19, 259, 999):
        ours = [float(v) for v in b.scalings(torch.tensor(float(t)))]
        theirs = [float(v) for v in sch.get_scalings_for_boundary_condition_discrete(t)]
        assert np.allclose(ours, theirs, rtol=1e-12)
    c_skip, c_out = b.scalings(torch.tensor(0.0))
    assert float(c_skip) == 1 and float(c_out) == 0  # f(x, 0) = x


def _lcm_pipe():
    import diffusers

    from diffguide.pipelines import tiny as tm

    sch = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return diffusers.LatentConsistencyModelPipeline(
        vae=tm.vae(),
        text_encoder=tm.clip_text(1),
        tokenizer=tm.clip_tokenizer(),
        unet=tm.unet(2, time_cond_proj_dim=8),
        scheduler=sch,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_student_matches_diffusers_pipeline(steps, tmp_path):
    from diffguide.pipelines import GuidedPipeline

    pipe = _lcm_pipe()
    pipe.save_pretrained(tmp_path)
    gp = GuidedPipeline.from_pretrained(str(tmp_path), progress=False)
    assert (
        gp.info.sampler == "consistency" and gp.embedded_guidance == 8.5
    )  # LatentConsistencyModelPipeline's default
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    ref = pipe(
        ["a red circle"] * 2,
        num_inference_steps=steps,
        guidance_scale=6.0,
        generator=gens,
        output_type="np",
    ).images
    out = gp(
        "a red circle",
        num_images_per_prompt=2,
        steps=steps,
        embedded_guidance=6.0,
        seed=[3, 4],
        output_type="np",
    )
    assert out.nfe == steps  # one forward per step: the guidance is an input of the network
    assert np.abs(out.images - ref).max() < 1e-4
    assert np.abs(ref[0] - ref[1]).max() > 1e-2
