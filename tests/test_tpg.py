"""TPG (issue 37) against the authors' make_tpg_block (pipeline_sdxl_tpg.py) written out: the
chosen BasicTransformerBlocks' classes swapped for one that shuffles the perturbed chunk's input
tokens (x[:, permutation], one permutation per call, no unshuffle), the batch [C, P] or
[U, C, P] in one UNet call, then C + s (C - P) or C + (g - 1) (C - U) + s (C - P). The
permutations are the ones diffguide made (recorded), one sample, as the authors draw one for the
whole batch; diffguide makes one per sample from its image's seed, the evaluation and the block,
drawing nothing from the sampler's noise (tested below: an image depends on its seed alone, not on
its batch, max_batch or the processes sharing its rows)."""

import dataclasses
import types

import pytest
import torch

import diffguide as dg
from diffguide.core.sample import SeededNoise
from diffguide.guidance import tpg as tpg_module
from diffguide.pipelines import GuidedPipeline, parallel_layout, tiny

from helpers import torch_threads, torchrun_script

TOL = 1e-5
STEPS = 4


def make_tpg_block(block_class, do_cfg, orders):
    """The authors' make_tpg_block, with torch.randperm replaced by the recorded orders."""

    class ModifiedBasicTransformerBlock(block_class):
        def forward(
            self,
            hidden_states,
            attention_mask=None,
            encoder_hidden_states=None,
            encoder_attention_mask=None,
            timestep=None,
            cross_attention_kwargs=None,
            class_labels=None,
        ):
            if do_cfg:
                uncond, org, tpg = hidden_states.chunk(3)
                org = torch.cat([uncond, org])
            else:
                org, tpg = hidden_states.chunk(2)
            permutation = next(orders)
            hidden_states = torch.cat((org, tpg[:, permutation]), dim=0)
            return super().forward(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask,
                timestep,
                cross_attention_kwargs,
                class_labels,
            )

    return ModifiedBasicTransformerBlock


def _rows(cond, k):
    """A condition repeated k times along the batch."""
    if torch.is_tensor(cond):
        return torch.cat([cond] * k)
    if isinstance(cond, dict):
        return {key: _rows(v, k) for key, v in cond.items()}
    return cond


def _join(a, b):
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {key: _join(v, b[key]) for key, v in a.items()}
    return a


@pytest.mark.parametrize(
    "family,layers,cfg",
    [("sd", "d0;m0;u1", 1.0), ("sd", "auto", 4.0), ("sdxl", "u0;u1", 4.0), ("pixart", "1", 1.0)],
)
def test_tpg_equals_the_authors_shuffled_blocks(family, layers, cfg, monkeypatch):
    gp = GuidedPipeline(tiny.BUILDERS[family](), progress=False)
    fam, den, scale = gp.family, gp.net_denoiser, 3.0
    pos, neg = fam.encode(["a red circle"], ["blurry"], 1, "cpu")
    pos, neg = fam.extra(pos, 16, 16), fam.extra(neg, 16, 16)
    x = torch.randn(1, fam.channels, 8, 8, generator=torch.Generator().manual_seed(4))
    ts = dg.timesteps(den.schedule, STEPS)
    drawn, draw = [], tpg_module.permutations

    def recorded(*args):
        order = draw(*args)
        drawn.append(order[0])
        return order

    monkeypatch.setattr(tpg_module, "permutations", recorded)
    spec = f"tpg:scale={scale},layers={layers}"
    with torch.no_grad():
        guided = dg.guide(den, spec if cfg == 1 else f"cfg:scale={cfg}+{spec}", pos, neg)
        ours = dg.sample(guided, "euler", ts, x)
        plain = dg.sample(
            dg.guide(den, None if cfg == 1 else f"cfg:scale={cfg}", pos, neg), "euler", ts, x
        )
    chosen = tpg_module.tpg_blocks(fam.net, layers)
    assert drawn and len(drawn) == STEPS * len(chosen)

    orders = iter(drawn)
    for block in chosen:  # the authors swap the classes of the chosen blocks
        block.__class__ = make_tpg_block(type(block), cfg != 1, orders)

    def forward(x, tm, c):
        if cfg == 1:  # their "tpg" batch: [C, P]
            o, p = fam.forward(torch.cat([x, x]), torch.cat([tm, tm]), _rows(c, 2)).chunk(2)
            return o + scale * (o - p)
        both = _join(neg, _rows(c, 2))  # "both": [U, C, P]
        u, o, p = fam.forward(torch.cat([x] * 3), torch.cat([tm] * 3), both).chunk(3)
        return o + (cfg - 1) * (o - u) + scale * (o - p)

    try:
        with torch.no_grad():
            reference = dataclasses.replace(den, forward=forward)
            theirs = dg.sample(dg.guide(reference, None, pos), "euler", ts, x)
    finally:
        for block in chosen:
            block.__class__ = type(block).__mro__[1]
    assert next(orders, None) is None  # every recorded permutation used, in order
    size = theirs.abs().max().clamp_min(1)  # the tiny PixArt's samples reach hundreds
    assert (ours - theirs).abs().max() < TOL * size < 20 * TOL * size < (plain - theirs).abs().max()
    rows = 3 if cfg != 1 else 2
    assert guided.nfe == rows * STEPS and guided.forwards == STEPS  # P in C's forward


@pytest.fixture(scope="module")
def sd():
    return GuidedPipeline(tiny.sd(), progress=False)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_an_image_depends_on_its_seed_not_on_its_batch(sd, sampler):
    kw = dict(steps=3, guidance="tpg:layers=d0;u0", output_type="latent", sampler=sampler)
    both = sd(["a red circle", "a red circle"], seed=[0, 1], **kw)
    alone = sd("a red circle", seed=1, **kw)
    torch.testing.assert_close(both.images[1:], alone.images, rtol=1e-5, atol=1e-5)  # batch kernels
    assert (both.images[0] - both.images[1]).abs().max() > 1e-3
    assert both.nfe == 6 and both.forwards == 3


def test_layers_are_found_as_the_authors_name_them(sd):
    net = sd.family.net
    unet = tpg_module._unet_blocks(net)
    assert [len(unet[p]) for p in "dmu"] == [1, 1, 2]
    assert tpg_module.tpg_blocks(net, "auto") == unet["d"]  # d6-d23 where there are more than 6
    assert tpg_module.tpg_blocks(net, "u0-u1;m0") == unet["u"] + unet["m"]
    pixart = GuidedPipeline(tiny.pixart(), progress=False).family.net
    assert tpg_module.tpg_blocks(pixart, "auto") == [pixart.transformer_blocks[1]]  # the middle


def test_max_batch_and_a_second_run_give_the_same_image(sd):
    """A chunk of max_batch rows may hold some of the perturbed rows (C0, C1, P0 | P1): their
    permutations are still their images'. They fell back to torch's own generator, so that the
    same seeds gave other images."""
    kw = dict(
        prompt=["a red circle"] * 2,
        steps=3,
        seed=[0, 1],
        guidance="tpg:layers=d0;u0",
        sampler="euler_ancestral",
        output_type="latent",
    )
    whole = sd(**kw).images
    for max_batch in (3, 1):
        runs = []
        for g in (1, 2):
            torch.manual_seed(g)  # torch's own generator: TPG must not read it
            runs.append(sd(**kw, max_batch=max_batch).images)
        assert torch.equal(runs[0], runs[1]), max_batch
        torch.testing.assert_close(runs[0], whole, rtol=1e-5, atol=1e-5)  # batch kernels


def test_the_permutations_draw_nothing_from_the_samplers_noise(sd):
    """The sampler's noise streams advance as without TPG (TPG drew its permutations from them,
    only where a forward held the perturbed rows: the processes sharing a forward's rows then
    drifted apart with an ancestral sampler)."""
    fam, den = sd.family, sd.net_denoiser
    pos, neg = fam.encode(["a red circle"] * 2, ["blurry"] * 2, 1, "cpu")
    x = torch.randn(2, fam.channels, 8, 8, generator=torch.Generator().manual_seed(4))
    ts = dg.timesteps(den.schedule, 3)
    states = {}
    for spec in ("cfg:scale=4", "cfg:scale=4+tpg:layers=d0;u0"):
        noise = SeededNoise([0, 1])
        with torch.no_grad():
            dg.sample(dg.guide(den, spec, pos, neg), "euler_ancestral", ts, x, noise=noise)
        states[spec] = [g.get_state() for g in noise.generators]
    assert all(torch.equal(a, b) for a, b in zip(*states.values()))


def branches_run(parallel=None):
    """CFG + TPG with an ancestral sampler on a batch of 2, the rows of each forward shared by the
    processes of ``parallel`` (the perturbed ones on the second of two)."""
    gp = GuidedPipeline(tiny.sd(), progress=False)
    return gp(
        ["a red circle", "a blue square"],
        negative_prompt=["blurry"] * 2,
        steps=4,
        seed=[0, 1],
        sampler="euler_ancestral",
        guidance="cfg:scale=4+tpg:layers=d0;u0",
        output_type="latent",
        parallel=parallel,
    ).images


BRANCHES_SCRIPT = """
from test_tpg import branches_run
result = branches_run("branches")
"""


def test_two_processes_sharing_the_branches_equal_one(tmp_path):
    ranks = torchrun_script(tmp_path, BRANCHES_SCRIPT, timeout=300)
    with torch_threads(1):
        one = branches_run()
    size = float(one.abs().max())  # latents reach about 45: each process batches 3 rows of 6
    for got in ranks:
        assert float((got - one).abs().max()) <= 1e-5 * size


def test_parallel_branches_that_could_split_tpgs_rows_are_refused(sd):
    """A process holding only the later perturbed rows cannot tell their images: refused before
    sampling where some batch size puts a process boundary inside TPG's rows (NAG's too: it reads
    them in one forward)."""
    info = types.SimpleNamespace(schedule=sd.net_denoiser.schedule)
    ts = dg.timesteps(info.schedule, 3)
    check = parallel_layout.check_whole_rows
    for spec in ("tpg", "cfg:scale=4+tpg", "cfg:scale=4+pag", "nag:cfg=3"):
        check((dg.parse_spec("guidance", spec), None), ts, info, 2)
    check((dg.parse_spec("guidance", "cfg:scale=4+tpg"),), ts, info, 3)  # rows b, b, b
    refused = [
        ("cfg:scale=4+tpg", 4, "TPG's perturbed rows"),
        ("tpg", 3, "TPG's perturbed rows"),
        ("tpg+pag", 2, "TPG's perturbed rows"),  # [C, P_tpg, P_pag]
        ("nag", 2, "NAG's conditional rows"),
    ]
    for spec, world, what in refused:
        with pytest.raises(ValueError, match=f"would split {what} between processes") as err:
            check((dg.parse_spec("guidance", spec),), ts, info, world)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tpg:layers=d3", r"TPG layer 'd3' is not among the UNet's 1 d-path transformer blocks"),
        ("tpg:layers=0", r"TPG layer '0' matches no transformer block of UNet2DConditionModel"),
        ("tpg:layers=;", r"names no layer"),
        ("tpg:scale=inf", r"scale must be a finite number"),
    ],
)
def test_bad_options_are_refused_in_one_line(sd, spec, message):
    with pytest.raises(ValueError, match=message) as err:
        sd("a red circle", steps=2, guidance=spec, output_type="latent")
    assert "\n" not in str(err.value)
