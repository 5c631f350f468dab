"""Whole-loop CUDA graphs: a sampling run captured once and replayed.

What is captured is the whole loop: at every step the branch concatenation, the network forwards,
the guidance combine and the sampler update, and the non-finite flag. A replay is then one launch
per image batch, with no per-step host work at all. torch.compile's "reduce-overhead" graphs the
network alone. Everything the loop allocates (the per-run buffers) lives in the graph's own memory
pool, allocated once at capture.

A replay reads its inputs from static buffers: the initial x, every tensor of the conditions, and
the loop's noise draws. ``NoiseTape`` records the draws' shapes in a first, eager run. Before each
replay it refills them, in the same order, from the run's own noise source. A replay therefore
draws exactly what an eager run would, per-image seeds included.

The loop must not read device data on the host: ``run_loop(finite="keep")``. Guidance that decides
its branches from the data (AG's cosine test, ICG's random prompts) cannot be captured. Neither can
a sampler that builds its noise on the host (DPM++ SDE's Brownian tree). Their capture fails, and
``LoopGraphs`` runs them eagerly from then on and says why once (``notices``).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Callable, Mapping

import torch

from .guided import holding
from .sample import _checked, _raise_if_bad, run_loop


class NoiseTape:
    """A noise source for a captured loop: it passes draws through while ``recording`` (noting their
    shapes); after ``freeze`` it hands out static buffers in draw order, refilled by ``fill``."""

    def __init__(self, source):
        self.source, self.draws, self.buffers, self.k = source, [], None, 0

    def randn(self, shape, dtype=torch.float32, device=None) -> torch.Tensor:
        if self.buffers is None:
            try:
                z = self.source.randn(shape, dtype, device)
            except ValueError:  # draw() falls back to the global generator: the replay must too
                self.draws.append(None)
                raise
            self.draws.append((tuple(shape), dtype, z.device))
            return z
        k, self.k = self.k, self.k + 1
        if k >= len(self.buffers):
            raise RuntimeError("the captured loop drew more noise than its eager run")
        if self.buffers[k] is None:
            raise ValueError("not one row per seed")
        return self.buffers[k]

    def __call__(self, like, t=None, t_next=None) -> torch.Tensor:
        return self.randn(like.shape, like.dtype, like.device)

    def freeze(self) -> None:
        self.buffers = [
            None if d is None else torch.zeros(d[0], dtype=d[1], device=d[2]) for d in self.draws
        ]

    def fill(self, source) -> None:
        """The replay's draws, from its own source, in the eager run's order."""
        for d, buf in zip(self.draws, self.buffers):
            if d is not None:
                buf.copy_(source.randn(*d))
        self.k = 0


def signature(tree) -> Any:
    """A hashable description of a condition tree: structure, and each tensor's shape, dtype and
    device; other leaves by value (they are baked into a capture)."""
    if isinstance(tree, torch.Tensor):
        return ("T", tuple(tree.shape), tree.dtype, str(tree.device))
    if isinstance(tree, Mapping):
        return ("M", tuple((k, signature(v)) for k, v in tree.items()))
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, tuple(signature(v) for v in tree))
    return ("V", repr(tree))


def clone_tree(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, Mapping):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(clone_tree(v) for v in tree)
    return tree


def copy_tree(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, Mapping):
        for k in dst:
            copy_tree(dst[k], src[k])
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            copy_tree(d, s)


CAPTURE_LOCK = (
    threading.Lock()
)  # one capture at a time in the process: two would share a mempool's state


class CudaGraphs:
    """Capture with ``torch.cuda.graph``: ``capture(fn)`` returns (replay, outputs)."""

    name = "cuda"
    device_types = ("cuda",)  # the devices it captures on (None: any)

    def capture(self, fn: Callable[[], tuple], device) -> tuple[Callable[[], None], tuple]:
        with CAPTURE_LOCK, torch.cuda.device(device):
            # one run on a side stream first, as torch's CUDA-graph notes ask: libraries (cuBLAS,
            # cuDNN) set up their per-stream state lazily, which a capture cannot do
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            # thread-local: CUDA calls of other threads (another pipeline's eager run) stay legal
            # while this thread captures; the default global mode makes them fail
            with torch.cuda.graph(g, capture_error_mode="thread_local"):
                outputs = fn()
        return g.replay, outputs


class EagerReplay:
    """A stand-in with the same contract on any device: ``replay`` re-runs fn on the static buffers
    and copies its results into the captured outputs. Used by the tests on the CPU: a replay that
    read anything but the static buffers would give the captured run's result, not the new one."""

    name = "eager"
    device_types = None

    def capture(self, fn, device):
        outputs = fn()

        def replay():
            for out, new in zip(outputs, fn()):
                out.copy_(new)

        return replay, outputs


class _Entry:
    """A capture and everything its replays read: static inputs, noise buffers, and the cached
    device tensors (row masks, kernels) the loop used, held here so that no cache can free them."""

    def __init__(self, inputs, x, tape, replay, outputs, nfe, forwards, ts, held=()):
        self.inputs, self.x, self.tape, self.replay, self.outputs = inputs, x, tape, replay, outputs
        self.nfe, self.forwards, self.ts = nfe, forwards, ts
        self.held = list({id(t): t for t in held}.values())


class LoopGraphs:
    """Captured sampling loops by key, at most ``size`` (least recently used dropped first).

    ``sample(key, build, inputs, sampler, ts, x, noise)``: ``build(inputs)`` makes the run's guided
    denoiser from a condition tree; ``key`` names everything else the loop depends on (guidance,
    sampler, grid, models). The first call with a key runs eagerly, recording the noise draws, then
    captures the loop on static copies; later calls copy their x, conditions and noise in and
    replay. Returns (x, nfe, forwards). A loop that cannot be captured runs eagerly, with a notice.
    """

    def __init__(self, backend=None, size: int = 4):
        self.backend = backend if backend is not None else CudaGraphs()
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.refused: dict = {}
        self.notices: list[str] = []
        self.captures = self.replays = 0
        self.capture_seconds: list[float] = []  # each capture's own time (warm-up run and capture)
        self._lock = threading.Lock()  # one run at a time: a replay owns the static buffers

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.refused.clear()

    def sample(
        self,
        key,
        build: Callable[[Any], Any],
        inputs,
        sampler,
        ts,
        x: torch.Tensor,
        noise,
        check_finite: bool = True,
        stride=None,
    ):
        with self._lock:
            return self._sample(key, build, inputs, sampler, ts, x, noise, check_finite, stride)

    def _sample(self, key, build, inputs, sampler, ts, x, noise, check_finite, stride):
        ts = torch.as_tensor(ts, dtype=torch.float64)
        key = (
            key,
            repr(sampler),
            tuple(ts.tolist()),
            stride,
            signature(inputs),
            tuple(x.shape),
            x.dtype,
            str(x.device),
        )
        entry = self.entries.get(key)
        if entry is None:
            return self._first(key, build, inputs, sampler, ts, x, noise, check_finite, stride)
        self.entries.move_to_end(key)
        copy_tree(entry.inputs, inputs)
        entry.x.copy_(x)
        entry.tape.fill(noise)
        entry.replay()
        self.replays += 1
        out, first_bad = entry.outputs
        if check_finite:
            _raise_if_bad(int(first_bad), entry.ts.numel() - 1, entry.ts)
        return out.clone(), entry.nfe, entry.forwards

    def _refuse(self, key, why: str) -> None:
        self.refused[key] = why
        self.notices.append(
            f"the sampling loop could not be captured in a CUDA graph and runs eagerly ({why})"
        )

    def _first(self, key, build, inputs, sampler, ts, x, noise, check_finite, stride):
        tape = NoiseTape(noise)
        denoise = build(inputs)
        ts, x, sampler = _checked(denoise, sampler, ts, x)
        out, first_bad = run_loop(denoise, sampler, ts, x, tape, finite="keep", stride=stride)
        if check_finite:
            _raise_if_bad(int(first_bad), ts.numel() - 1, ts)
        if key not in self.refused:
            held = [
                type(o).__name__
                for o in (sampler, denoise.guidance)
                if not getattr(o, "capturable", True)
            ]
            if held:
                self._refuse(
                    key, f"{' and '.join(held)} reads data back on the host during the loop"
                )
        if key in self.refused:
            return out, denoise.nfe, denoise.forwards
        static_in, static_x = clone_tree(inputs), x.clone()
        tape.freeze()
        captured = build(static_in)

        def loop():
            tape.k = 0
            return run_loop(captured, sampler, ts, static_x, tape, finite="keep", stride=stride)

        held: list = []
        started = time.perf_counter()
        try:
            with holding(held):  # what the loop reads from caches, owned by the entry
                replay, outputs = self.backend.capture(loop, x.device)
            self.capture_seconds.append(time.perf_counter() - started)
        except Exception as e:  # a host read or host-made noise inside the loop: stay eager
            self._refuse(key, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            return out, denoise.nfe, denoise.forwards
        self.captures += 1
        self.entries[key] = _Entry(
            static_in, static_x, tape, replay, outputs, denoise.nfe, denoise.forwards, ts, held
        )
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return out, denoise.nfe, denoise.forwards
