"""Branch parallelism (core.parallel_branches) on two real CPU processes (torchrun, gloo): each
process runs its share of every guided forward's rows, and both end with one process's result."""

import pytest
import torch

import diffguide as dg
from diffguide.core.parallel_branches import BranchParallel

from helpers import WellPosed, sd_schedule, tiny_unet, torch_threads, torchrun_script

# CFG (cond + uncond rows), CFG + PAG (a rowwise perturbation on some rows of the shared forward),
# AG (drops the unconditional rows after the third step: the forward shrinks mid-run)
SPECS = ["cfg:scale=5", "cfg:scale=5+pag:scale=3", "ag:scale=5,threshold=0.999"]
STEPS = 4


def run(parallel=None):
    """Each spec sampled on batch 2: {spec: (x, nfe, forwards, rows the network saw)}."""
    schedule, unet = sd_schedule(), tiny_unet(0)
    well, seen = WellPosed(schedule, unet), [0]  # samples near unit variance: 1e-5 is meaningful

    def fn(x, tm, c):
        seen[0] += x.shape[0]
        return well(x, tm, c)

    den = dg.NetDenoiser(fn, schedule, "eps", module=unet)
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
    ts = dg.timesteps(schedule, STEPS)
    x = torch.randn(2, 4, 8, 8, generator=g) * float(schedule.ve(ts[0]) * schedule.alpha(ts[0]))
    out = {}
    for spec in SPECS:
        seen[0] = 0
        gd = dg.guide(den, spec, pos, neg, parallel=parallel)
        with torch.inference_mode():
            y = dg.sample(gd, "dpmpp_2m", ts, x)
        out[spec] = (y, gd.nfe, gd.forwards, seen[0])
    # one row per forward: the second process's share is empty
    seen[0] = 0
    gd = dg.guide(den, None, pos[:1], parallel=parallel)
    with torch.inference_mode():
        out["none, batch 1"] = (dg.sample(gd, "dpmpp_2m", ts, x[:1]), gd.nfe, gd.forwards, seen[0])
    return out


SCRIPT = """
from test_parallel_branches import run
result = run("branches")
"""


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process reference runs with the launched processes' thread count."""
    with torch_threads(1):
        yield


def test_two_processes_share_the_branches_and_equal_one(tmp_path):
    ranks = torchrun_script(tmp_path, SCRIPT, timeout=300)
    ref = run()
    for spec, (y, nfe, forwards, rows) in ref.items():
        for r, got in enumerate(ranks):
            gy, gnfe, gforwards, grows = got[spec]
            err = float((gy - y).abs().max())
            assert err <= 1e-5, (spec, r, err)
            assert (gnfe, gforwards) == (nfe, forwards), (spec, r)
        # each process ran its share of the rows only: together, one process's
        shares = [got[spec][3] for got in ranks]
        assert sum(shares) == rows, (spec, shares, rows)
        assert shares == ([rows, 0] if spec == "none, batch 1" else [rows // 2] * 2), spec
    assert ref["ag:scale=5,threshold=0.999"][1] < 2 * STEPS  # AG did drop rows mid-run


def test_without_a_process_group_it_runs_whole():
    assert BranchParallel().world() == (0, 1)
    assert [BranchParallel.bounds(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert [BranchParallel.bounds(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]  # one empty


def test_a_cache_and_branch_parallelism_are_refused():
    schedule, unet = sd_schedule(), tiny_unet(0)
    den = dg.NetDenoiser(
        lambda x, tm, c: unet(x, tm, encoder_hidden_states=c).sample, schedule, "eps", module=unet
    )
    with pytest.raises(ValueError, match="cache"):
        dg.guide(
            den,
            "cfg:scale=5",
            torch.zeros(1, 5, 32),
            torch.zeros(1, 5, 32),
            cache="first_block:threshold=0.1",
            parallel="branches",
        )
    with pytest.raises(ValueError, match="parallel"):
        dg.guide(den, "cfg:scale=5", torch.zeros(1, 5, 32), parallel="rows")


PIPELINE_SCRIPT = """
from diffguide.pipelines import GuidedPipeline
gp = GuidedPipeline.from_pretrained("builtin", progress=False)
prompts, spec = ["a red circle", "a blue square"], "cfg:scale=5+pag:scale=2"
out = gp(prompts, guidance=spec, steps=4, seed=[0, 1], output_type="latent", parallel="branches")
result = (out.images, out.nfe)
"""


def test_the_pipeline_option_shares_one_call_and_equals_one_process(tmp_path):
    """GuidedPipeline(..., parallel="branches") under torchrun: both processes end with the images
    one process makes alone; the option refuses a cache and a captured loop."""
    from diffguide.pipelines import GuidedPipeline

    ranks = torchrun_script(tmp_path, PIPELINE_SCRIPT, timeout=300)
    gp = GuidedPipeline.from_pretrained("builtin", progress=False)
    ref = gp(
        ["a red circle", "a blue square"],
        guidance="cfg:scale=5+pag:scale=2",
        steps=4,
        seed=[0, 1],
        output_type="latent",
    )
    for images, nfe in ranks:
        # each process runs 3 of the 6 rows: the UNet's kernels block a batch of 3 otherwise than
        # one of 6, float32 rounding that 4 steps grow to about 1.6e-5 (a wrong row is O(1))
        assert float((images - ref.images).abs().max()) <= 5e-5 and nfe == ref.nfe
    with pytest.raises(ValueError, match="without a step cache"):
        gp("a cat", steps=2, parallel="branches", cache="deepcache")
    with pytest.raises(ValueError, match="parallel must be"):
        gp("a cat", steps=2, parallel="rows")
