"""Step caches (issue 35): the first-block cache against diffusers' own hook (per branch on Flux's
true CFG, once per batched forward on PixArt), the share of work it skips in closed form, per-row
decisions in a shared forward equal to separate forwards (PAG and SLG rows included), refusals,
and the command line."""

import numpy as np
import pytest
import torch

from diffguide.core import guided
from diffguide.core.registry import parse_spec
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm

TWO = ["a red cube", "a blue ball"]
DEEP_FLUX = {"num_layers": 2, "num_single_layers": 2}
DEEP_SD3 = {"num_layers": 4}


@pytest.fixture
def denoisers(monkeypatch):
    """Every GuidedDenoiser a run resets (its cache state is read after the run)."""
    seen = []
    reset = guided.GuidedDenoiser.reset

    def keep(self, noise=None):
        reset(self, noise)
        seen.append(self)

    monkeypatch.setattr(guided.GuidedDenoiser, "reset", keep)
    return seen


def _decisions(state):
    """{step: {branch condition: computed}} from a run's cache state."""
    out = {}
    for step, key, go in state.decisions:
        branch = key[0]
        label = (
            branch
            if isinstance(branch, str)
            else branch.cond
            + ("" if branch.perturb is None else "+" + type(branch.perturb).__name__)
        )
        out.setdefault(step, {})[label] = go
    return out


def _diffusers_fbc(pipe, threshold, context=None):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=threshold))
    if context is not None:  # one cache context around every forward: the pipeline's batch
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        forward = pipe.transformer.forward

        def within(*args, **kwargs):
            _set_cache_context(pipe.transformer, CacheContext(context))
            return forward(*args, **kwargs)

        pipe.transformer.forward = within
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators():
    return [torch.Generator().manual_seed(s) for s in (0, 1)]


# Flux.1 with true CFG: diffusers' call (two forwards in cache contexts "cond" and "uncond") and
# diffguide's (both branches in one forward)
FLUX_THEIRS = dict(
    prompt=TWO,
    negative_prompt=["", "blurry"],
    true_cfg_scale=4.0,
    guidance_scale=2.0,
    num_inference_steps=10,
    height=16,
    width=16,
    output_type="np",
)
FLUX_OURS = dict(
    prompt=TWO,
    negative_prompt=["", "blurry"],
    guidance="cfg:scale=4",
    embedded_guidance=2.0,
    steps=10,
    height=16,
    width=16,
    sampler="euler",
    seed=[0, 1],
    output_type="np",
)


def _flux_reference(pipe) -> np.ndarray:
    """diffusers' FluxPipeline ``pipe`` (a hook applied) on FLUX_THEIRS."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(**FLUX_THEIRS, generator=_generators()).images


def test_first_block_per_branch_matches_diffusers_hook_on_flux_true_cfg(denoisers):
    """FluxPipeline runs true CFG as two forwards in cache contexts "cond" and "uncond"; diffguide
    batches both branches in one forward and decides per branch: the same decisions, the same
    images, including steps where one branch runs and the other reuses."""
    threshold = 0.35
    ref = _flux_reference(_diffusers_fbc(tm.flux(net=DEEP_FLUX), threshold))
    gp = GuidedPipeline(tm.flux(net=DEEP_FLUX), progress=False)
    plain = gp(**FLUX_OURS).images
    out = gp(**FLUX_OURS, cache=f"first_block:threshold={threshold}")
    np.testing.assert_allclose(out.images, ref, atol=1e-5)
    assert np.abs(out.images - plain).max() > 1e-4  # the cache changed the images
    steps = _decisions(denoisers[-1].cache_state)
    assert any(d["pos"] != d["neg"] for d in steps.values())  # one branch ran, one reused
    assert any(not d["pos"] and not d["neg"] for d in steps.values())  # a step with no rest
    assert 0 < out.computed < 1


def test_first_block_per_batch_matches_diffusers_hook_on_batched_cfg():
    """per=batch: one decision for the whole batched forward, as diffusers' hook makes it on a
    pipeline that batches CFG (PixArt; the hook under one cache context)."""
    threshold = 0.2
    ref = _diffusers_fbc(tm.pixart(net=DEEP_SD3), threshold, context="batch")(
        prompt=TWO,
        negative_prompt=["", "blurry"],
        guidance_scale=4.5,
        num_inference_steps=10,
        height=16,
        width=16,
        use_resolution_binning=False,
        generator=_generators(),
        output_type="np",
    ).images
    gp = GuidedPipeline(tm.pixart(net=DEEP_SD3), progress=False)
    out = gp(
        prompt=TWO,
        negative_prompt=["", "blurry"],
        guidance_scale=4.5,
        steps=10,
        height=16,
        width=16,
        sampler="dpmpp_2m",
        seed=[0, 1],
        output_type="np",
        cache=f"first_block:threshold={threshold},per=batch",
    )
    np.testing.assert_allclose(out.images, ref, atol=1e-5)
    assert 0 < out.computed < 1


def test_work_skipped_in_closed_form_and_threshold_zero_is_exact():
    """SD3 (whose last block returns no text stream: diffusers' hook fails there): threshold 0
    changes nothing; an unreachable threshold runs all 4 blocks at the first step and only the
    first block after it, (steps + 3) / (4 steps) of the work."""
    gp = GuidedPipeline(tm.sd3(net=DEEP_SD3), progress=False)
    kw = dict(prompt=TWO, guidance="cfg:scale=5", sampler="euler", steps=6, seed=[0, 1])
    kw.update(output_type="latent")
    plain = gp(**kw)
    assert plain.computed is None
    exact = gp(**kw, cache="first_block:threshold=0")
    torch.testing.assert_close(exact.images, plain.images, rtol=0, atol=0)
    assert exact.computed == 1.0
    lazy = gp(**kw, cache="first_block:threshold=1e9")
    assert lazy.computed == pytest.approx((6 + 3) / (4 * 6))
    assert (lazy.images - plain.images).abs().max() > 0


@pytest.mark.parametrize("method", ["cfg:scale=5+pag:scale=3", "cfg:scale=5+slg:scale=3"])
def test_rows_of_a_shared_forward_decide_as_separate_forwards(method, denoisers):
    """Branches batched in one forward (the later blocks running on some rows only, PAG's and
    SLG's perturbed rows following them) give what one forward per branch gives (max_batch = the
    rows of one branch), with the same decisions; some steps mix them."""
    gp = GuidedPipeline(tm.sd3(net=DEEP_SD3), progress=False)
    kw = dict(prompt=TWO, guidance=method, sampler="euler", steps=10, seed=[0, 1])
    kw.update(output_type="latent", negative_prompt=["", "blurry"])
    found = None
    for threshold in (0.02, 0.05, 0.1, 0.2):  # the first with a step that mixes decisions
        shared = gp(**kw, cache=f"first_block:threshold={threshold}")
        steps = _decisions(denoisers[-1].cache_state)
        if any(len(set(d.values())) > 1 for d in steps.values()):
            found = threshold
            break
    assert found is not None, "no threshold made the branches decide differently"
    apart = gp(**kw, cache=f"first_block:threshold={found}", max_batch=2)
    assert _decisions(denoisers[-1].cache_state) == steps
    torch.testing.assert_close(shared.images, apart.images, rtol=1e-5, atol=1e-5)
    assert shared.computed == pytest.approx(apart.computed)


def test_cache_refusals():
    with pytest.raises(ValueError, match="needs a transformer"):
        GuidedPipeline(tm.sd(), progress=False)(
            "a cat", steps=2, output_type="latent", cache="first_block"
        )
    gp = GuidedPipeline(tm.sd3(), progress=False)
    for spec, message in (
        ("first_block:threshold=-1", "threshold must be >= 0"),
        ("first_block:per=row", "per must be one of"),
        ("teacup", "unknown cache"),
    ):
        with pytest.raises(ValueError, match=message):
            gp("a cat", steps=2, output_type="latent", cache=spec)
    with pytest.raises(ValueError, match="cache must be a spec"):
        gp("a cat", steps=2, output_type="latent", cache=3)
    assert parse_spec("cache", "first_block:threshold=0.1,per=batch").per == "batch"


def test_cli_cache_recorded_and_replayed(tmp_path, capsys):
    from diffguide.cli.main import main
    from diffguide.images import read_settings

    folder = tmp_path / "sd3"
    tm.sd3(net=DEEP_SD3).save_pretrained(folder)
    out = tmp_path / "a.png"
    args = ["a red cube", "--model", str(folder), "--steps", "6", "--quiet"]
    cache = "first_block:threshold=0.2"
    assert main(["generate", *args, "--cache", cache, "-o", str(out)]) == 0
    meta, _ = read_settings(str(out))
    assert meta["cache"] == cache
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "-o", str(again), "--quiet"]) == 0
    assert out.read_bytes() == again.read_bytes()
    capsys.readouterr()
    for bad in ("teacup", "first_block:threshold=x"):
        assert main(["generate", *args, "--cache", bad, "-o", str(tmp_path / "b.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cache" in err
    assert not (tmp_path / "b.png").exists()


RATIOS = [1.0, 1.05, 1.01, 0.99, 1.02, 1.0, 0.98, 1.03, 0.97, 0.9]


@pytest.mark.parametrize("threshold", [0.03, 0.06])
def test_magcache_matches_diffusers_hook_on_flux_true_cfg(threshold):
    """MagCache per branch against diffusers' MagCacheConfig (per cache context) on Flux's true
    CFG: the same images; the share of work run is what its step-only rule gives in closed form."""
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    from diffguide.cache.magcache import share

    ref_pipe = tm.flux(net=DEEP_FLUX)
    apply_mag_cache(
        ref_pipe.transformer,
        MagCacheConfig(threshold=threshold, num_inference_steps=10, mag_ratios=RATIOS),
    )
    ref = _flux_reference(ref_pipe)
    out = GuidedPipeline(tm.flux(net=DEEP_FLUX), progress=False)(
        **FLUX_OURS, cache=f"magcache:threshold={threshold},ratios={';'.join(map(str, RATIOS))}"
    )
    np.testing.assert_allclose(out.images, ref, atol=1e-5)
    assert out.computed == pytest.approx(share(tuple(RATIOS), 10, threshold, 3, 0.2))
    assert out.computed < 1


def test_magcache_ratios_resampled_and_refusals():
    from diffguide.cache.magcache import nearest

    # index round(i * 2 / 4), halves to even as numpy.round in the authors' code and torch.round
    # in diffusers': 0, 0, 1, 2, 2
    assert nearest((1.0, 2.0, 3.0), 5) == (1.0, 1.0, 2.0, 3.0, 3.0)
    assert nearest((1.0, 2.0, 3.0), 1) == (3.0,)
    for spec, message in (
        ("magcache", "needs its model's ratios"),
        ("magcache:ratios=1;x", "ratios must be"),
        ("magcache:ratios=1;-1", "positive"),
        ("magcache:ratios=1,retention=2", "retention"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_spec("cache", spec)
    assert parse_spec("cache", "magcache:ratios=flux").capturable


def test_teacache_first_and_last_steps_run_and_zero_threshold_is_exact():
    gp = GuidedPipeline(tm.sd3(net=DEEP_SD3), progress=False)
    kw = dict(prompt=TWO, guidance="cfg:scale=5", sampler="euler", steps=8, seed=[0, 1])
    kw.update(output_type="latent")
    plain = gp(**kw).images
    exact = gp(**kw, cache="teacache:threshold=0")
    torch.testing.assert_close(exact.images, plain, rtol=0, atol=0)
    lazy = gp(**kw, cache="teacache:threshold=1e9")  # only the first and the last step run
    assert lazy.computed == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="coefficients must be"):
        parse_spec("cache", "teacache:coefficients=a;b")


@pytest.mark.parametrize("method", ["cfg:scale=5+pag:scale=3", "cfg:scale=5+slg:scale=3"])
def test_teacache_rows_decide_apart_in_a_shared_forward(method, denoisers):
    """TeaCache decides before the first block, so the rows that run go through every block as a
    smaller batch: the same images and decisions as one forward per branch."""
    gp = GuidedPipeline(tm.sd3(net=DEEP_SD3), progress=False)
    kw = dict(prompt=TWO, guidance=method, sampler="euler", steps=10, seed=[0, 1])
    kw.update(output_type="latent", negative_prompt=["", "blurry"])
    found = None
    for threshold in (0.05, 0.1, 0.15, 0.2, 0.3):
        shared = gp(**kw, cache=f"teacache:threshold={threshold}")
        steps = _decisions(denoisers[-1].cache_state)
        if any(len(set(d.values())) > 1 for d in steps.values()):
            found = threshold
            break
    assert found is not None, "no threshold made the branches decide differently"
    apart = gp(**kw, cache=f"teacache:threshold={found}", max_batch=2)
    assert _decisions(denoisers[-1].cache_state) == steps
    torch.testing.assert_close(shared.images, apart.images, rtol=1e-5, atol=1e-5)


def test_tune_cache_writes_a_spec_that_meets_its_target(tmp_path, capsys):
    """diffguide tune cache: MagCache's ratios from calibration runs and the lowest threshold
    that runs at most the target share of forwards; --cache @FILE loads it and runs that share."""
    import json

    from diffguide.cli.main import main

    folder = tmp_path / "sd3"
    tm.sd3(net=DEEP_SD3).save_pretrained(folder)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    spec = tmp_path / "cache.json"
    argv = ["tune", "cache", "--model", str(folder), "--steps", "10", "--n", "1"]
    argv += ["--prompts", str(prompts), "--target-nfe", "0.6", "-o", str(spec), "--quiet"]
    assert main(argv) == 0
    data = json.loads(spec.read_text())
    assert data["cache"].startswith("magcache:ratios=1;")
    assert set(data["probe"]["ratios_per_branch"]) == {"pos", "neg"}
    assert data["probe"]["computed"] <= 0.6
    out = GuidedPipeline.from_pretrained(str(folder), progress=False)(
        "a red cube", steps=10, output_type="latent", cache=f"@{spec}", seed=0
    )
    assert out.computed == pytest.approx(data["probe"]["computed"])
    capsys.readouterr()
    assert main([*argv[:2], "--model", str(folder), "--target-nfe", "2", "-o", str(spec)]) == 2
    assert "--target-nfe must be in (0, 1]" in capsys.readouterr().err


def _authors_deepcache(pipe, interval, branch):
    """DeepCacheSDHelper's rule written out (horseee/DeepCache, DeepCache/extension): every layer
    of the UNet past the branch point returns its output of the last step whose index is a
    multiple of ``interval``; the step index is the timestep's place in the scheduler's list."""
    unet, cached, step = pipe.unet, {}, [0]
    block_id, layer_id = branch // 3, branch % 3

    def skip(kind, b, i):
        if step[0] % interval == 0:
            return False
        if b > block_id or kind == "mid":
            return True
        if b < block_id:
            return False
        return i >= layer_id if kind == "down" else i > layer_id

    def wrapped(module, key):
        forward = module.forward

        def run(*args, **kwargs):
            if skip(*key[1:]):
                return cached[key]
            cached[key] = forward(*args, **kwargs)
            return cached[key]

        module.forward = run

    for b, block in enumerate(unet.down_blocks):
        for name in ("attentions", "resnets"):
            for i, m in enumerate(getattr(block, name, None) or []):
                wrapped(m, (id(m), "down", b, i))
        for m in block.downsamplers or []:
            wrapped(m, (id(m), "down", b, len(block.resnets)))
        wrapped(block, (id(block), "down", b, 0))
    wrapped(unet.mid_block, (id(unet.mid_block), "mid", 0, 0))
    n = len(unet.up_blocks)
    for j, block in enumerate(unet.up_blocks):
        k = len(block.resnets)
        for name in ("attentions", "resnets"):
            for i, m in enumerate(getattr(block, name, None) or []):
                wrapped(m, (id(m), "up", n - j - 1, k - i - 1))
        for m in block.upsamplers or []:
            wrapped(m, (id(m), "up", n - j - 1, 0))
        wrapped(block, (id(block), "up", n - j - 1, 0))
    forward = unet.forward

    def counted(*args, **kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        step[0] = [float(v) for v in pipe.scheduler.timesteps].index(float(t))
        return forward(*args, **kwargs)

    unet.forward = counted
    return pipe


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_deepcache_matches_the_authors_rule_on_batched_cfg(branch):
    """per=batch (diffusers' SD pipeline batches CFG in one forward): the same images as the
    authors' helper rule, at their branch numbering."""
    theirs = dict(prompt=TWO, negative_prompt=["", "green"], num_inference_steps=10)
    theirs.update(guidance_scale=6.0, generator=_generators(), output_type="np")
    ref = _authors_deepcache(tm.sd(), 3, branch)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**theirs).images
    gp = GuidedPipeline(tm.sd(), progress=False)
    kw = dict(prompt=TWO, negative_prompt=["", "green"], steps=10, guidance_scale=6.0)
    kw.update(sampler="dpmpp_2m", seed=[0, 1], output_type="np")
    plain = gp(**kw).images
    out = gp(**kw, cache=f"deepcache:interval=3,branch={branch},per=batch")
    np.testing.assert_allclose(out.images, expected, atol=1e-5)
    assert np.abs(out.images - plain).max() > 1e-4
    assert 0 < out.computed < 1


def test_deepcache_rows_of_a_shared_forward_decide_apart(denoisers):
    """other_interval: the unconditional and PAG rows reuse their deep features longer than the
    conditional rows; in one forward the deep layers run on the conditional rows alone at those
    steps, with the same images and decisions as one forward per branch."""
    gp = GuidedPipeline(tm.sd(), progress=False)
    kw = dict(prompt=TWO, negative_prompt=["", "green"], steps=10, seed=[0, 1])
    kw.update(guidance="cfg:scale=6+pag:scale=2", sampler="euler", output_type="latent")
    spec = "deepcache:interval=2,other_interval=3"
    shared = gp(**kw, cache=spec)
    steps = _decisions(denoisers[-1].cache_state)
    assert any(len(set(d.values())) > 1 for d in steps.values())
    apart = gp(**kw, cache=spec, max_batch=2)
    assert _decisions(denoisers[-1].cache_state) == steps
    torch.testing.assert_close(shared.images, apart.images, rtol=1e-5, atol=1e-5)
    exact = gp(**kw, cache="deepcache:interval=1")
    torch.testing.assert_close(exact.images, gp(**kw).images, rtol=0, atol=0)
    assert exact.computed == 1.0


def test_deepcache_refusals():
    with pytest.raises(ValueError, match="needs a UNet"):
        GuidedPipeline(tm.sd3(), progress=False)("a", steps=2, cache="deepcache")
    with pytest.raises(ValueError, match="past this UNet"):
        GuidedPipeline(tm.sd(), progress=False)("a", steps=2, cache="deepcache:branch=6")
    with pytest.raises(ValueError, match="interval >= 1"):
        parse_spec("cache", "deepcache:interval=0")


@pytest.mark.parametrize(
    "interval,warmup,order,lite", [(2, 2, 1, False), (3, 2, 2, False), (3, 3, 1, True)]
)
def test_taylorseer_matches_diffusers_hook_on_flux_true_cfg(interval, warmup, order, lite):
    """TaylorSeer per branch against diffusers' TaylorSeerCacheConfig (float32 factors, per cache
    context): the attention layers forecast, or in lite mode the output projection forecast and
    the blocks skipped."""
    from diffusers import TaylorSeerCacheConfig

    ref_pipe = tm.flux(net=DEEP_FLUX)
    ref_pipe.transformer.enable_cache(
        TaylorSeerCacheConfig(
            cache_interval=interval,
            disable_cache_before_step=warmup,
            max_order=order,
            taylor_factors_dtype=torch.float32,
            use_lite_mode=lite,
        )
    )
    ref = _flux_reference(ref_pipe)
    spec = f"taylorseer:interval={interval},warmup={warmup},order={order}"
    out = GuidedPipeline(tm.flux(net=DEEP_FLUX), progress=False)(
        **FLUX_OURS, cache=spec + (",modules=lite" if lite else "")
    )
    np.testing.assert_allclose(out.images, ref, atol=1e-5)
    # forecast steps: those past the warm-up that are not one in `interval`
    ran = sum(i < warmup or (i - warmup - 1) % interval == 0 for i in range(10))
    assert out.computed == pytest.approx(ran / 10)


def test_taylorseer_with_pag_rows_shared_equals_separate():
    gp = GuidedPipeline(tm.sd3(net=DEEP_SD3), progress=False)
    kw = dict(prompt=TWO, negative_prompt=["", "blurry"], steps=10, seed=[0, 1])
    kw.update(guidance="cfg:scale=5+pag:scale=3", sampler="euler", output_type="latent")
    spec = "taylorseer:interval=2,warmup=2,order=2"
    shared = gp(**kw, cache=spec)
    apart = gp(**kw, cache=spec, max_batch=2)
    torch.testing.assert_close(shared.images, apart.images, rtol=1e-5, atol=1e-5)
    assert (shared.images - gp(**kw).images).abs().max() > 0
    with pytest.raises(ValueError, match="no attention layer"):
        GuidedPipeline(tm.sd(), progress=False)("a", steps=2, cache="taylorseer")
    with pytest.raises(ValueError, match="modules must be one of"):
        parse_spec("cache", "taylorseer:modules=mlp")
