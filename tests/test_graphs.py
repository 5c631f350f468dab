"""Whole-loop graph capture (core.graphs), tested without a GPU in two ways.

1. Plumbing: the ``EagerReplay`` backend re-runs the captured loop on the static buffers. A replay
   after a first, capturing call must equal a plain ``sample`` on the new x, conditions and noise.
   A loop that read the first call's tensors, or drew its noise anywhere but the tape, would fail.
2. Capturability: the loop runs on the meta device under a dispatch mode that refuses what a CUDA
   graph cannot hold. That means a host read of device data (``.item()``, ``bool``, ``int``) and a
   host-to-device copy of any array (0-dim scalars are kernel arguments, not copies). A step with
   either would fail capture, or would replay
   stale host data.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import diffguide as dg
from diffguide.core.graphs import EagerReplay, LoopGraphs, NoiseTape
from diffguide.core.sample import SeededNoise, run_loop, sample

from helpers import sd_schedule, tiny_unet


def net(unet, schedule):
    return dg.NetDenoiser(
        lambda x, tm, c: unet(x, tm, encoder_hidden_states=c).sample, schedule, "eps", module=unet
    )


@pytest.fixture(scope="module")
def world():
    return sd_schedule(), tiny_unet(0)


def conds(seed):
    g = torch.Generator().manual_seed(seed)
    return {"pos": torch.randn(2, 5, 32, generator=g), "neg": torch.randn(2, 5, 32, generator=g)}


def build(den, guidance):
    return lambda c: dg.guide(den, guidance, c["pos"], c["neg"])


@pytest.mark.parametrize(
    "guidance,sampler",
    [
        ("cfg:scale=5", "dpmpp_2m"),
        ("apg:scale=5", "euler_ancestral"),
        ("cfgpp:scale=0.6", "ddim:eta=0.5"),
        ("cfg+pag:scale=3", "unipc"),
        ("cfg:scale=5,sigma_lo=2.0", "heun"),
    ],
)
def test_a_replay_equals_an_eager_run_on_new_inputs(world, guidance, sampler):
    schedule, unet = world
    den = net(unet, schedule)
    g, s = dg.parse_spec("guidance", guidance), dg.parse_spec("sampler", sampler)
    ts = dg.timesteps(schedule, 6)
    graphs = LoopGraphs(EagerReplay())
    with torch.inference_mode():
        for k, seeds in enumerate([(0, 1), (2, 3), (4, 5)]):
            noise = SeededNoise(seeds)
            x = noise.randn((2, 4, 8, 8)) * float(schedule.ve(ts[0]) * schedule.alpha(ts[0]))
            c = conds(k)
            ref_noise = SeededNoise(seeds)
            ref_noise.randn((2, 4, 8, 8))
            ref_den = build(den, g)(c)
            ref = sample(ref_den, s, ts, x, ref_noise)
            got, nfe, forwards = graphs.sample("k", build(den, g), c, s, ts, x, noise)
            assert torch.allclose(got, ref, atol=1e-5, rtol=0), (k, float((got - ref).abs().max()))
            assert (nfe, forwards) == (ref_den.nfe, ref_den.forwards)
    assert graphs.captures == 1 and graphs.replays == 2 and not graphs.notices


def test_a_new_shape_or_key_captures_anew_and_the_cache_is_bounded(world):
    schedule, unet = world
    den, ts = net(unet, schedule), dg.timesteps(schedule, 3)
    graphs = LoopGraphs(EagerReplay(), size=2)
    g = dg.parse_spec("guidance", "cfg:scale=3")
    with torch.inference_mode():
        for key, b in [("a", 2), ("a", 1), ("b", 2), ("a", 2)]:
            c = {k: v[:b] for k, v in conds(0).items()}
            graphs.sample(
                key,
                build(den, g),
                c,
                "dpmpp_2m",
                ts,
                torch.randn(b, 4, 8, 8),
                SeededNoise(range(b)),
            )
    assert graphs.captures == 4 and graphs.replays == 0 and len(graphs.entries) == 2


def test_a_non_finite_replay_raises_naming_the_step(world):
    schedule, unet = world
    den, ts = net(unet, schedule), dg.timesteps(schedule, 4)
    graphs = LoopGraphs(EagerReplay())
    g = dg.parse_spec("guidance", "cfg:scale=3")
    with torch.inference_mode():
        graphs.sample(
            "k", build(den, g), conds(0), "euler", ts, torch.randn(2, 4, 8, 8), SeededNoise([0, 1])
        )
        bad = conds(1)
        bad["pos"][0, 0, 0] = float("nan")
        with pytest.raises(dg.NonFiniteError, match="step 1 of 4"):
            graphs.sample(
                "k", build(den, g), bad, "euler", ts, torch.randn(2, 4, 8, 8), SeededNoise([0, 1])
            )


def test_the_tape_replays_the_sources_draws_in_order():
    tape = NoiseTape(SeededNoise([7, 8]))
    first = [tape.randn((2, 3)), tape(torch.zeros(2, 4))]
    tape.freeze()
    tape.fill(SeededNoise([7, 8]))
    assert all(torch.equal(a, tape.randn(a.shape)) for a in first)
    with pytest.raises(RuntimeError, match="more noise"):
        tape.randn((2, 3))


class HostTraffic(TorchDispatchMode):
    """Refuses, on meta tensors, what a CUDA graph cannot capture: host reads and host-made
    arrays."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in (
            torch.ops.aten._local_scalar_dense.default,
            torch.ops.aten.is_nonzero.default,
        ) and any(t.device.type == "meta" for t in leaves):
            raise AssertionError(f"host read of device data: {func}")
        out = func(*args, **kwargs)
        if any(t.device.type == "meta" for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            # any host array, a one-element one too (only 0-dim CPU tensors are passed as scalar
            # values)
            host = [t for t in leaves if t.device.type == "cpu" and t.ndim > 0]
            if host:
                raise AssertionError(f"host-to-device copy of {tuple(host[0].shape)} in {func}")
        return out


from diffguide.core.registry import names  # noqa: E402

# every registered guidance with a sampler, and every sampler with CFG, that declares itself
# capturable
LOOPS = (
    [(g, "dpmpp_2m") for g in names("guidance")]
    + [("cfg:scale=5", s) for s in names("sampler")]
    + [
        ("cfg:scale=5,rescale=0.7", "dpmpp_3m"),
        ("cfg:scale=5,sigma_lo=2.0", "heun"),
        ("cfg+pag:scale=3", "unipc"),
        ("cfg+seg:scale=3", "deis"),
        ("cfg+slg:scale=3", "dpm2"),
        ("icg:condition=null", "euler"),
    ]
)


@pytest.mark.parametrize("guidance,sampler", LOOPS)
def test_a_capturable_loop_reads_nothing_back_and_copies_nothing_in(world, guidance, sampler):
    schedule, _ = world
    g, s = dg.parse_spec("guidance", guidance), dg.parse_spec("sampler", sampler)
    if not (g.capturable and s.capturable):
        pytest.skip("declared not capturable")
    den = net(tiny_unet(0).to("meta"), schedule)
    models = (
        {"guide": net(tiny_unet(1).to("meta"), schedule)} if guidance == "autoguidance" else None
    )
    ts = dg.timesteps(schedule, 5)
    c = {k: v.to("meta") for k, v in conds(0).items()}

    def loop(noise):
        return run_loop(
            dg.guide(den, g, c["pos"], c["neg"], models=models),
            s,
            ts,
            torch.empty(2, 4, 8, 8, device="meta"),
            noise,
            finite="keep",
        )

    with torch.inference_mode():
        tape = NoiseTape(
            dg.RandomNoise()
        )  # as LoopGraphs does: an eager run records the draws first
        loop(tape)
        tape.freeze()
        with HostTraffic():
            x, first_bad = loop(tape)
    assert x.device.type == "meta" and first_bad.device.type == "meta"


def test_a_thresholded_loop_is_capturable(world):
    schedule, _ = world
    den = net(tiny_unet(0).to("meta"), schedule)
    c = {k: v.to("meta") for k, v in conds(0).items()}
    g, s = dg.parse_spec("guidance", "cfg:scale=5"), dg.parse_spec("sampler", "dpmpp_2m")

    def loop(noise):
        return run_loop(
            dg.guide(den, g, c["pos"], c["neg"], threshold=dg.DynamicThreshold(0.995, 1.5)),
            s,
            dg.timesteps(schedule, 4),
            torch.empty(2, 4, 8, 8, device="meta"),
            noise,
            finite="keep",
        )

    with torch.inference_mode():
        tape = NoiseTape(dg.RandomNoise())
        loop(tape)
        tape.freeze()
        with HostTraffic():
            loop(tape)


@pytest.mark.parametrize(
    "guidance,sampler,why",
    [
        ("ag:scale=5", "dpmpp_2m", "host read|nonzero"),
        ("cfg:scale=5", "dpmpp_sde", "host read|meta tensors"),
    ],
)
def test_the_checker_catches_what_cannot_be_captured(world, guidance, sampler, why):
    schedule, _ = world
    den = net(tiny_unet(0).to("meta"), schedule)
    c = {k: v.to("meta") for k, v in conds(0).items()}
    tape = NoiseTape(dg.RandomNoise())
    tape.draws = [((2, 4, 8, 8), torch.float32, torch.device("meta"))] * 64
    tape.freeze()
    with torch.inference_mode(), pytest.raises(Exception, match=why), HostTraffic():
        run_loop(
            build(den, dg.parse_spec("guidance", guidance))(c),
            dg.parse_spec("sampler", sampler),
            dg.timesteps(schedule, 5),
            torch.empty(2, 4, 8, 8, device="meta"),
            tape,
            finite="keep",
        )


# -- the pipeline option ------------------------------------------------------------------------

from diffguide.pipelines import GuidedPipeline  # noqa: E402
from diffguide.pipelines import tiny as tm  # noqa: E402


def _replayed(gp, calls, **kw):
    """Each call with cuda_graph on the eager-replay backend, against the same call without it."""
    gp.graphs = LoopGraphs(EagerReplay())
    for prompt, seeds in calls:
        want = gp(prompt, seed=seeds, output_type="latent", **kw)
        got = gp(prompt, seed=seeds, output_type="latent", cuda_graph=True, **kw)
        assert torch.allclose(got.images, want.images, atol=1e-5, rtol=0), float(
            (got.images - want.images).abs().max()
        )
        assert (got.nfe, got.forwards) == (want.nfe, want.forwards)
    return gp.graphs


@pytest.mark.parametrize(
    "family,kw",
    [
        ("sd", dict(guidance="cfg:scale=5", sampler="dpmpp_2m")),
        (
            "sd",
            dict(
                guidance="cfg:scale=5+pag:scale=3",
                sampler="euler_ancestral",
                negative_prompt="blur",
            ),
        ),
        ("sdxl", dict(guidance="apg:scale=5", sampler="unipc")),
        ("flux", dict(guidance="cfg:scale=3", negative_prompt="", sampler="euler")),
    ],
)
def test_a_pipeline_replay_equals_its_eager_call(family, kw):
    gp = GuidedPipeline.from_pipe(getattr(tm, family)(), progress=False)
    calls = [
        (["a red circle", "a blue square"], [0, 1]),
        (["a green cat", "two dogs"], [5, 9]),
        (["a red circle", "a blue square"], [0, 1]),
    ]
    graphs = _replayed(gp, calls, steps=4, height=64, width=64, **kw)
    assert (graphs.captures, graphs.replays) == (1, len(calls) - 1) and not graphs.notices


def test_what_cannot_be_captured_runs_eagerly_with_a_notice():
    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    graphs = _replayed(
        gp,
        [("a red circle", [0]), ("a cat", [1])],
        guidance="ag:scale=5,threshold=0.5",
        steps=4,
        height=64,
        width=64,
    )
    assert graphs.captures == 0 and "runs eagerly" in graphs.notices[0]
    out = gp(
        "a dog",
        seed=[2],
        steps=4,
        height=64,
        width=64,
        guidance="ag:scale=5,threshold=0.5",
        cuda_graph=True,
        output_type="latent",
    )
    assert not out.notices or "graph" not in " ".join(
        out.notices
    )  # said once, on the call that tried


def test_new_weight_storage_captures_anew():
    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    gp.graphs = LoopGraphs(EagerReplay())
    run = dict(seed=[0], steps=3, height=64, width=64, output_type="latent", cuda_graph=True)
    gp("a red circle", **run)
    gp("a red circle", **run)
    p = next(gp.pipe.unet.parameters())
    p.data = p.data.clone() + 0.5  # a new storage: the capture's pointers would be stale
    got = gp("a red circle", **run)
    want = gp("a red circle", **{**run, "cuda_graph": False})
    assert gp.graphs.captures == 2 and torch.allclose(got.images, want.images, atol=1e-5)


def test_another_network_on_the_pipe_captures_anew():
    """A wrapper set on the pipe (pipe.unet = torch.compile(unet)) is another network: its own
    capture."""
    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    gp.graphs = LoopGraphs(EagerReplay())
    run = dict(seed=[0], steps=3, height=64, width=64, output_type="latent", cuda_graph=True)
    unet = gp.pipe.unet
    gp("a red circle", **run)

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.dtype, self.device = (
                unet,
                unet.config,
                unet.dtype,
                unet.device,
            )

        def forward(self, *a, **k):
            out = self.inner(*a, **k)
            return (
                (out[0] * 0.5, *out[1:])
                if isinstance(out, tuple)
                else type(out)(sample=out.sample * 0.5)
            )

    gp.pipe.unet = Scaled()
    got = gp("a red circle", **run)
    want = gp("a red circle", **{**run, "cuda_graph": False})
    assert gp.graphs.captures == 2 and torch.allclose(got.images, want.images, atol=1e-5)


def test_the_option_refuses_what_it_cannot_do():
    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    run = dict(seed=[0], steps=3, height=64, width=64, output_type="latent", cuda_graph=True)
    with pytest.raises(ValueError, match="needs the pipeline on a CUDA device; it is on cpu"):
        gp("a red circle", **run)
    gp.graphs = LoopGraphs(EagerReplay())
    with pytest.raises(ValueError, match="no callback"):
        gp("a red circle", callback=lambda st, x: None, **run)


class CheckedCapture(EagerReplay):
    """The eager-replay backend whose capture runs under HostTraffic (for a pipeline on meta)."""

    def capture(self, fn, device):
        with HostTraffic():
            return super().capture(fn, device)


@pytest.mark.parametrize(
    "family,guidance",
    [
        ("sd", "cfg:scale=3+pag:scale=2"),
        ("sdxl", "cfg:scale=3"),
        ("sd3", "cfg:scale=3+slg:scale=2"),
        ("flux", "cfg:scale=3"),
        ("dit", "cfg:scale=3"),
        ("sana", "apg:scale=3"),
    ],
)
def test_each_familys_forward_is_capturable(family, guidance):
    """The families' own forwards (time embeddings, position ids, extra conditions) inside the loop,
    with the whole pipeline on meta: the capture passes the host-traffic check, so no notice."""

    class OnMeta(GuidedPipeline):
        device = property(lambda self: torch.device("meta"))

    pipe = getattr(tm, family)()
    gp = OnMeta.from_pipe(pipe, progress=False)
    pipe.to("meta")
    gp.graphs = LoopGraphs(CheckedCapture())
    kw = {} if family == "dit" else {"negative_prompt": ""}
    out = gp(
        0 if family == "dit" else "a red circle",
        seed=[0],
        steps=3,
        height=64,
        width=64,
        guidance=guidance,
        output_type="latent",
        cuda_graph=True,
        check_finite=False,
        **kw,
    )
    assert out.images.device.type == "meta"
    assert gp.graphs.captures == 1 and not gp.graphs.notices, gp.graphs.notices


@pytest.fixture(scope="module")
def builtin():
    return GuidedPipeline.from_pretrained(
        "builtin", progress=False
    ), GuidedPipeline.from_pretrained("builtin-small", progress=False)


@pytest.mark.parametrize(
    "case", ["img2img", "latents", "stitch", "autoguidance", "images per prompt", "reno"]
)
def test_options_that_prepare_the_loop_replay_too(builtin, case):
    """What comes before the loop (an encoded image, given latents, a noise optimiser) or beside it
    (a stitched small model, a guide model) replays as its eager call, call after call."""
    import numpy as np

    from diffguide.pipelines.pipeline import Stitching

    gp, small = builtin
    kw = {
        "img2img": dict(
            image=np.random.RandomState(0).rand(32, 32, 3).astype(np.float32), strength=0.6
        ),
        "latents": dict(
            latents=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), seed=None
        ),
        "stitch": dict(stitch=Stitching(small, 0.4)),
        "autoguidance": dict(guidance="autoguidance:scale=2", guide_model=small),
        "images per prompt": dict(num_images_per_prompt=2, seed=[1, 2, 3, 4]),
        "reno": dict(noise_optimizer="reno:iterations=2"),
    }[case]
    run = {
        "prompt": ["a red circle", "a blue square"],
        "steps": 6,
        "output_type": "np",
        "seed": [3, 4],
        **kw,
    }
    gp.graphs = LoopGraphs(EagerReplay())
    for _ in range(2):
        want, got = gp(**run), gp(**run, cuda_graph=True)
        assert (
            np.abs(np.asarray(got.images) - np.asarray(want.images)).max() <= 1e-5
            and got.nfe == want.nfe
        )
    assert (gp.graphs.captures, gp.graphs.replays) == (1, 1) and not gp.graphs.notices


def test_a_capture_owns_the_cached_tensors_its_replays_read():
    """PAG's row masks come from a bounded cache: after a capture they must outlive an eviction (a
    real graph would replay freed memory otherwise), held by the capture's entry."""
    import gc
    import weakref

    from diffguide.core import guided

    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    gp.graphs = LoopGraphs(EagerReplay())
    run = dict(
        seed=[0],
        steps=3,
        height=64,
        width=64,
        output_type="latent",
        cuda_graph=True,
        guidance="cfg:scale=5+pag:scale=3",
        negative_prompt="",
    )
    gp("a red circle", **run)
    (entry,) = gp.graphs.entries.values()
    masks = [t for t in entry.held if t.dtype == torch.bool]
    assert masks, "the capture holds no row mask"
    refs = [weakref.ref(t) for t in entry.held]
    del masks
    guided._row_mask.cache_clear()  # eviction, forced
    guided._constant.cache_clear()
    gc.collect()
    assert all(r() is not None for r in refs)
    del entry
    got = gp("a red circle", **run)
    want = gp("a red circle", **{**run, "cuda_graph": False})
    assert torch.allclose(got.images, want.images, atol=1e-5) and gp.graphs.replays == 1


def test_cpu_offload_is_refused_in_one_line():
    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    gp.graphs = LoopGraphs(EagerReplay())
    gp.pipe.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="cannot run with CPU offload .*unet"):
        gp(
            "a red circle",
            seed=[0],
            steps=2,
            height=64,
            width=64,
            output_type="latent",
            cuda_graph=True,
        )


def test_the_weights_key_sees_a_cast_and_lora_scales_without_walking_every_parameter(monkeypatch):
    from diffguide.pipelines.pipeline import _weights_key

    gp = GuidedPipeline.from_pipe(tm.sd(), progress=False)
    d = gp.net_denoiser
    first = _weights_key(d)
    walks = []
    monkeypatch.setattr(
        torch.nn.Module, "parameters", lambda self, recurse=True: walks.append(1) or iter(())
    )
    assert _weights_key(d) == first and not walks  # a second call walks nothing
    monkeypatch.undo()
    gp.pipe.unet.to(torch.float64)
    assert _weights_key(d) != first  # every parameter's storage and dtype changed
    pytest.importorskip("peft")
    from peft import LoraConfig

    unet = gp.pipe.unet.to(torch.float32)
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="a")
    with_lora = _weights_key(d)
    assert with_lora != first
    unet.set_adapters(["a"], weights=[0.5])
    assert _weights_key(d) != with_lora  # a LoRA scale is a Python number in the forward


def test_the_checker_refuses_a_one_element_host_copy(world):
    """A [1]-shaped host tensor sent to the device inside a step is a real copy (a 0-dim one is a
    kernel argument): the check refuses it, where it used to let anything of one element through."""
    schedule, _ = world
    inner = net(tiny_unet(0).to("meta"), schedule)

    class Copying:
        schedule = inner.schedule
        module = inner.module

        def __call__(self, x, t, cond=None):
            p = inner(x, t, cond)
            return dg.Pred(p.x0 + torch.zeros(1).to(x.device), p.eps)

    c = {k: v.to("meta") for k, v in conds(0).items()}
    tape = NoiseTape(dg.RandomNoise())
    tape.freeze()
    with (
        torch.inference_mode(),
        pytest.raises(AssertionError, match=r"host-to-device copy of \(1,\)"),
        HostTraffic(),
    ):
        run_loop(
            dg.guide(Copying(), dg.parse_spec("guidance", "cfg:scale=5"), c["pos"], c["neg"]),
            dg.parse_spec("sampler", "euler"),
            dg.timesteps(schedule, 3),
            torch.empty(2, 4, 8, 8, device="meta"),
            tape,
            finite="keep",
        )


@pytest.mark.parametrize(
    "family,guidance,cache",
    [
        ("sd", "cfg:scale=3+pag:scale=2", "deepcache:interval=2,other_interval=3"),
        ("sd3", "cfg:scale=3", "magcache:ratios=1;0.99;1.01;0.98,threshold=0.1,retention=0"),
        ("flux", "cfg:scale=3", "taylorseer:interval=2,warmup=1,order=2"),
    ],
)
def test_step_only_caches_are_capturable(family, guidance, cache):
    """A cache whose decisions depend on the step alone (DeepCache, MagCache, TaylorSeer) reads
    nothing back and copies nothing in, rows cut by branch included; its replays equal eager
    calls."""

    class OnMeta(GuidedPipeline):
        device = property(lambda self: torch.device("meta"))

    pipe = getattr(tm, family)()
    gp = OnMeta.from_pipe(pipe, progress=False)
    pipe.to("meta")
    gp.graphs = LoopGraphs(CheckedCapture())
    out = gp(
        "a red circle",
        negative_prompt="",
        seed=[0],
        steps=4,
        height=64,
        width=64,
        guidance=guidance,
        output_type="latent",
        cuda_graph=True,
        check_finite=False,
        cache=cache,
    )
    assert out.images.device.type == "meta"
    assert gp.graphs.captures == 1 and not gp.graphs.notices, gp.graphs.notices
    gp = GuidedPipeline.from_pipe(getattr(tm, family)(), progress=False)
    gp.graphs = LoopGraphs(EagerReplay())
    run = dict(prompt="a red circle", negative_prompt="", steps=4, guidance=guidance, cache=cache)
    run.update(output_type="latent", height=64, width=64)
    for seed in (0, 1):
        want, got = gp(**run, seed=[seed]), gp(**run, seed=[seed], cuda_graph=True)
        torch.testing.assert_close(got.images, want.images, rtol=1e-5, atol=1e-5)
