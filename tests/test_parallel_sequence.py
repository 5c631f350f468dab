"""Sequence parallelism (pipelines.parallel_layout) on real CPU processes (torchrun, gloo): the
transformer's tokens split by diffusers' own context parallelism (Ulysses), alone and composed with
branch parallelism, give one process's latents; and what it cannot run is refused in one line."""

import pytest
import torch

from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.pipelines.parallel_layout import Layout, layout
from helpers import torch_threads, torchrun_script

# families whose transformer declares diffusers' _cp_plan, at a small size: (builder, size, extra)
CASES = {
    "flux": (tm.flux, 32, {}),
    "qwenimage": (tm.qwenimage, 32, {}),
    "wan": (tm.wan, 32, {"num_frames": 5}),
    # Wan 2.2: two transformers (the second below the boundary), both made sequence-parallel
    "wan22": (lambda: tm.wan(boundary_ratio=0.875), 32, {"num_frames": 5}),
}


def run(family: str, parallel=None):
    """(latents, nfe, tokens the first attention saw per call) of two prompts with CFG."""
    build, size, extra = CASES[family]
    gp = GuidedPipeline(build(), progress=False)
    net = gp.family.net
    blocks = getattr(net, "transformer_blocks", None) or net.blocks
    attn = getattr(blocks[0], "attn", None) or blocks[0].attn1
    seen = []
    attn.register_forward_pre_hook(
        lambda m, a, k: seen.append((k.get("hidden_states", a[0] if a else None)).shape[1]),
        with_kwargs=True,
    )
    torch.manual_seed(0)
    out = gp(
        ["a red circle", "a blue square"],
        guidance="cfg:scale=4",
        steps=3,
        seed=[0, 1],
        height=size,
        width=size,
        output_type="latent",
        parallel=parallel,
        **extra,
    )
    return out.images, out.nfe, seen[0]


SCRIPT = """
from test_parallel_sequence import run
result = {f: run(f, sys.argv[3]) for f in sys.argv[4].split(",")}
"""


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def launch(tmp_path, processes: int, parallel: str, families: list[str]) -> list[dict]:
    return torchrun_script(tmp_path, SCRIPT, [parallel, ",".join(families)], processes)


def test_two_processes_split_the_sequence_and_equal_one(tmp_path):
    """Flux.1, Qwen-Image, Wan 2.1 and 2.2 on 2 processes, each holding half of every row's tokens
    in the attention: both end with one process's latents (1e-5) and NFE."""
    ranks = launch(tmp_path, 2, "sequence", list(CASES))
    for family in CASES:
        ref, nfe, tokens = run(family)
        for r, got in enumerate(ranks):
            y, gnfe, seen = got[family]
            err = float((y - ref).abs().max())
            assert err <= 1e-5 and gnfe == nfe, (family, r, err)
            assert seen == tokens // 2, (family, r, seen, tokens)  # the sequence was split


def test_branches_and_sequence_composed_on_four_processes(tmp_path):
    """branches=2,sequence=2: two groups of two, each group half of CFG's rows, each process half
    of its rows' tokens; all four end with one process's latents."""
    ranks = launch(tmp_path, 4, "branches=2,sequence=2", ["flux"])
    ref, nfe, tokens = run("flux")
    for r, got in enumerate(ranks):
        y, gnfe, seen = got["flux"]
        assert float((y - ref).abs().max()) <= 1e-5 and gnfe == nfe, r
        assert seen == tokens // 2, (r, seen, tokens)


def test_layouts():
    assert layout("sequence", 2) == Layout(1, 2)
    assert layout("branches,sequence=2", 4) == layout("branches=2,sequence=2", 4) == Layout(2, 2)
    assert layout("branches", 3) == layout(True, 3) == Layout(3, 1)
    for spec, world, match in [
        ("sequence=2", 4, "needs 2 processes; this run has 4"),
        ("branches=3,sequence", 4, "a multiple of 3"),
        ("branches,sequence", 4, "all terms but one"),
        ("sequence=2,sequence=2", 4, "twice"),
        ("rows", 2, "parallel must be None or a spec"),
    ]:
        with pytest.raises(ValueError, match=match):
            layout(spec, world)


@pytest.fixture(scope="module")
def flux():
    return GuidedPipeline(tm.flux(), progress=False)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(guidance="cfg+pag:scale=2"), "perturbs the network inside"),
        (dict(noise_optimizer="initno"), "noise optimiser"),
        (dict(cache="first_block:threshold=0.1"), "without a step cache"),
    ],
)
def test_what_sequence_parallelism_cannot_run_is_refused(flux, kw, match):
    with pytest.raises(ValueError, match=match):
        flux("a cat", steps=2, height=32, width=32, parallel="sequence", **kw)


def test_a_network_without_a_context_parallel_plan_is_refused():
    gp = GuidedPipeline.from_pretrained("builtin", progress=False)  # a UNet
    with pytest.raises(ValueError, match="context-parallel plan"):
        gp("a cat", steps=2, parallel="sequence")
    with pytest.raises(ValueError, match="give one"):
        gp("a cat", steps=2, seed=0, parallel="branches", process_state=object())
