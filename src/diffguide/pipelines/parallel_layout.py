"""One image's work laid out on the processes of a ``torch.distributed`` group: guidance branches
and sequence.

A call's ``parallel`` spec names two ways to share one image's forwards, which compose:

- ``branches[=B]``: each forward's rows (cond, uncond, perturbed, ...) split over B processes and
  the predictions gathered each step (``core.parallel_branches``);
- ``sequence[=S]``: each row's tokens split over S processes inside the transformer, through
  diffusers' own context parallelism (Ulysses attention: ``ContextParallelConfig`` and
  ``enable_parallelism``), for transformers that declare a context-parallel plan (``_cp_plan``:
  Flux.1, Qwen-Image, Wan).

"branches=2,sequence=2" runs on 4 processes, laid out as a (branches, ring, ulysses) device mesh of
shape (2, 1, 2): processes 0 and 1 hold the first half of the rows and split their tokens between
them, 2 and 3 the second half. A term without a number takes the processes the others leave
("branches" alone: all of them), a term left out is 1, and the product must be the world size.
Every process runs the same call and ends with the whole images.

Ring attention (``ring_degree``) is not offered: it needs an attention backend that returns the
log-sum-exp (flash, sage), and these families run on PyTorch's SDPA (diffusers' "native"), which
does not.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch

from ..core.guided import Point
from ..core.parallel_branches import BranchParallel
from ..core.registry import to_spec

TERMS = ("branches", "sequence")
SPEC_HINT = "e.g. 'branches', 'sequence' or 'branches=2,sequence=2'"


@dataclass(frozen=True)
class Layout:
    """B processes share each forward's rows, S share each row's tokens (B x S processes)."""

    branches: int
    sequence: int

    @property
    def spec(self) -> str:
        return f"branches={self.branches},sequence={self.sequence}"


def parse(spec) -> dict[str, int | None]:
    """The spec's terms, {name: number or None (the processes left)}; checked, no world needed.
    True is "branches" (as ``guide`` takes it)."""
    if spec is True:
        spec = "branches"
    if not isinstance(spec, str):
        raise ValueError(f"parallel must be None or a spec ({SPEC_HINT}), got {spec!r}")
    terms: dict[str, int | None] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*(?:=\s*(\d+)\s*)?", part)
        if not m or m.group(1) not in TERMS:
            raise ValueError(f"parallel must be None or a spec ({SPEC_HINT}), got {spec!r}")
        name, n = m.group(1), None if m.group(2) is None else int(m.group(2))
        if name in terms:
            raise ValueError(f"parallel {spec!r} names {name} twice")
        if n is not None and n < 1:
            raise ValueError(f"parallel {spec!r}: {name} must be >= 1")
        terms[name] = n
    if list(terms.values()).count(None) > 1:
        raise ValueError(
            f"parallel {spec!r}: give a number to all terms but one (the one without takes the "
            "processes the others leave)"
        )
    return terms


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def layout(spec, world: int) -> Layout:
    """The spec on ``world`` processes."""
    terms = parse(spec)
    fixed = 1
    for n in terms.values():
        fixed *= n or 1
    free = [name for name, n in terms.items() if n is None]
    if free and world % fixed == 0:
        terms[free[0]] = world // fixed
    sizes = {name: terms.get(name) or 1 for name in TERMS}
    if sizes["branches"] * sizes["sequence"] != world:
        raise ValueError(
            f"parallel {spec!r} needs {fixed if not free else f'a multiple of {fixed}'} "
            f"processes; this run has {world} (launch with torchrun --nproc_per_node N)"
        )
    return Layout(sizes["branches"], sizes["sequence"])


# the layout each transformer was made sequence-parallel with, and the branch sharing that goes
# with it: diffusers' enable_parallelism can run once per model, and the mesh's process groups are
# made once (a group per call would pile up)
_ENABLED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resolve(
    pipe, parallel, guidances=(), ts=None, info=None, cache=None, cuda_graph=False, noise=None
) -> BranchParallel | None:
    """What ``guide`` gets for a call's ``parallel`` (None, a spec or a BranchParallel): the
    branch sharing, with the pipeline's transformer made sequence-parallel first where the spec
    asks. The call's guidances (on its grid ``ts``, ``info``), step cache, CUDA graph and noise
    optimiser are checked against what the layout can run."""
    done = _enabled(pipe.family.net)
    if parallel is None or parallel is False or isinstance(parallel, BranchParallel):
        if done is not None:
            _refuse_other(done[0], parallel)
        if parallel:
            check_branches(cache, cuda_graph)
            check_whole_rows(guidances, ts, info, parallel.world()[1])
        return parallel or None
    lay = layout(parallel, world_size())
    check_branches(cache, cuda_graph)
    check_whole_rows(guidances, ts, info, lay.branches)
    if "sequence" in parse(parallel):  # refused alike on one process, where nothing is split
        check_sequence(pipe, guidances, ts, info, noise)
    if done is not None:
        if done[0] != lay:
            _refuse_other(done[0], parallel)
        return done[1]
    if lay.sequence == 1:  # branches only: the default group, as guide(parallel="branches")
        return BranchParallel() if lay.branches > 1 else None
    branch = enable_sequence(pipe, lay)
    _ENABLED[pipe.family.net] = (lay, branch)
    return branch


def _enabled(net):
    """(layout, branch sharing) ``net`` was made sequence-parallel with, or None."""
    try:
        return _ENABLED.get(net)
    except TypeError:  # a network no weak reference can hold was never made sequence-parallel
        return None


def _refuse_other(lay: Layout, parallel) -> None:
    raise ValueError(
        f"this pipeline's transformer runs sequence-parallel ({lay.spec}) since an earlier call: "
        f"every call must give that parallel, got {parallel!r} (load the pipeline again for "
        "another)"
    )


def check_branches(cache, cuda_graph) -> None:
    if cache is not None or cuda_graph:
        raise ValueError(
            "parallel gathers every forward across processes: it runs without a step cache and "
            "outside a captured CUDA graph"
        )


def check_whole_rows(guidances, ts, info, world: int) -> None:
    """Refuse, before sampling, a perturbation whose rows must sit on one process
    (``one_process``: TPG's, whose permutations follow each row's image, which a process holding
    only the later rows cannot tell; NAG's, read in one forward) where ``world`` processes sharing
    a forward's rows would split them for some batch size (b rows a branch, the branches grouped
    into forwards as ``GuidedDenoiser.evaluate`` does)."""
    if world < 2 or ts is None or info is None:
        return
    for g in guidances:
        if g is None:
            continue
        state, n, places = g.init_state(), ts.numel() - 1, {}
        for i, t in enumerate(ts[:-1]):
            unique = dict.fromkeys(g.branches(Point(t, info.schedule, i, n), state).values())
            groups: dict = {}
            for br in unique:
                alone = br.perturb if not getattr(br.perturb, "rowwise", False) else None
                groups.setdefault((br.model, alone, br.grad), []).append(br)
            for brs in groups.values():
                for j, br in enumerate(brs):
                    what = getattr(br.perturb, "one_process", None)
                    if what:
                        places[len(brs), j] = what
        for (m, j), what in sorted(places.items()):
            if any(_splits(j * b, (j + 1) * b, m * b, world) for b in range(1, 257)):
                raise ValueError(
                    f"guidance {to_spec(g)!r}: parallel branches={world} would split {what} "
                    "between processes for some batch sizes; run it on fewer processes (branches=2 "
                    "runs tpg, cfg+tpg and nag:cfg=)"
                )


def _splits(lo: int, hi: int, n: int, world: int) -> bool:
    """Whether rows [lo, hi) of n are shared by more than one of ``world`` processes."""
    starts = [BranchParallel.bounds(n, r, world)[0] for r in range(1, world)]
    return any(lo < s < hi for s in starts)


def check_sequence(pipe, guidances, ts, info, noise_optimizer) -> None:
    """Refuse what sequence parallelism cannot run: a network without diffusers' context-parallel
    plan, work through autograd, and guidance that perturbs the network inside."""
    for net in transformers(pipe):
        if not getattr(type(net), "_cp_plan", None):
            raise ValueError(
                f"parallel sequence needs a transformer with diffusers' context-parallel plan "
                f"(Flux.1, Qwen-Image, Wan); {type(net).__name__} has none: use parallel="
                "'branches'"
            )
    if pipe.device.type == "cpu" and torch.accelerator.device_count() > 0:
        # diffusers exchanges the shares' token counts on the accelerator whenever one exists,
        # while the CPU processes' group is gloo
        raise ValueError(
            "parallel sequence runs on the GPUs of a machine that has them (--device cuda), not on "
            "its CPU"
        )
    if noise_optimizer is not None:
        raise ValueError(
            "parallel sequence cannot run a noise optimiser: its gradients would reach only "
            "each process's own tokens"
        )
    for g in guidances:
        if g is not None and getattr(g, "needs_grad", False):
            raise ValueError(
                f"guidance {to_spec(g)!r} differentiates through the network; with parallel "
                "sequence its gradients would reach only each process's own tokens"
            )
        perturbs = _perturbations(g, ts, info)
        if perturbs:
            raise ValueError(
                f"guidance {to_spec(g)!r} perturbs the network inside ("
                f"{type(perturbs[0]).__name__}), where each process holds only part of the "
                "sequence; use parallel='branches'"
            )


def _perturbations(g, ts, info) -> list:
    """The perturbations the method's branches ask for anywhere on the grid (a fresh state)."""
    if g is None:
        return []
    state, out, n = g.init_state(), [], ts.numel() - 1
    for i, t in enumerate(ts[:-1]):
        for br in g.branches(Point(t, info.schedule, i, n), state).values():
            if br.perturb is not None and br.perturb not in out:
                out.append(br.perturb)
    return out


def transformers(pipe) -> list:
    """The networks a call runs: the main one and a two-expert model's second (Wan 2.2)."""
    expert = pipe.family.expert()
    return [pipe.family.net] + ([expert[0]] if expert is not None else [])


def enable_sequence(pipe, lay: Layout) -> BranchParallel | None:
    """Make the pipeline's transformers sequence-parallel on a (branches, ring, ulysses) mesh of
    shape (B, 1, S); the branch sharing over the mesh's branches dimension (None when B is 1)."""
    import dataclasses

    import diffusers
    from torch.distributed.device_mesh import init_device_mesh

    cls = getattr(diffusers, "ContextParallelConfig", None)
    if cls is None or "ulysses_anything" not in {f.name for f in dataclasses.fields(cls)}:
        raise ValueError(
            "parallel sequence needs diffusers' any-size Ulysses attention "
            f"(ContextParallelConfig.ulysses_anything); diffusers {diffusers.__version__} has "
            "none: upgrade diffusers"
        )
    device = pipe.device
    mesh = init_device_mesh(
        device.type, (lay.branches, 1, lay.sequence), mesh_dim_names=("branches", "ring", "ulysses")
    )
    for net in transformers(pipe):
        # "anything": any token count and head count (Qwen-Image's text length follows the
        # prompt); it costs a small exchange of the shares' sizes at each attention
        cp = cls(ulysses_degree=lay.sequence, ulysses_anything=True, mesh=mesh)
        _enable(net, cp, device)
    return BranchParallel(mesh["branches"].get_group()) if lay.branches > 1 else None


def _enable(net, cp, device) -> None:
    """``net.enable_parallelism(config=cp)``. diffusers 0.42 picks the model's device as rank %
    torch.accelerator.device_count(), a division by zero on a machine without an accelerator,
    although the rest of its context parallelism runs on gloo; there the same resolution is made
    with the CPU as the device (``_resolve_parallel_config``, this model only, for this call)."""
    if device.type != "cpu":
        net.enable_parallelism(config=cp)
        return
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ParallelConfig

    def resolve(config):
        config = ParallelConfig(context_parallel_config=config)
        config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=cp.mesh)
        net._parallel_config = config
        return config

    net._resolve_parallel_config = resolve
    try:
        net.enable_parallelism(config=cp)
    finally:
        del net._resolve_parallel_config
