"""The prepared device check: a smoke run of the whole loop's CUDA graph on every family, then GPU
speed, fair: stock diffusers against diffguide at equal settings (bench/device_check.sh runs it).

Random weights from the published configs (speed does not depend on the weights; no downloads): an
SD 1.5 UNet at 512 px, SDXL's UNet at 1024 px, Flux.1-dev's transformer (512 px, to fit the time
budget) and DiT-XL/2 at 256 px, each with its published VAE architecture, built in the run's dtype.
Text encoders are small stand-ins with the right output widths (the same cost on both sides).

Stages, each result saved (device.json, device.md) the moment it is measured:
1. **smoke** (``--smoke-budget-s``, under 2 minutes): the versions seen (and whether torch runs
below
   the tested floor), then per family an eager call and ``cuda_graph=True`` calls: the first
   captures
   (its capture time and the graph's memory), a second replays it, a third replays with a new seed
   and prompt; each equals its eager call within the dtype's tolerance.
2. **plan** (``--budget-s``): every model eager and with the loop graph before any compile variant,
   then the compiled variants on both sides. An exception (an OOM, a NonFiniteError, an API
   difference) is recorded for its case and the next case runs; SIGTERM (``timeout``) saves and
   stops (exit 124).

Fairness, point by point:
- both sides run under ``torch.inference_mode`` (diffusers' ``__call__`` adds ``no_grad`` inside
it);
- the same network module on both sides for every variant: eager, ``torch.compile`` (default mode),
  CUDA graphs of the network (``mode="reduce-overhead"``), and, diffguide only, ``loop-graph`` (the
  whole sampling loop in one CUDA graph: ``cuda_graph=True``) and ``compile+loop-graph``; a compiled
  diffusers row runs wherever a compiled diffguide row does;
- the same VAE dtype on both sides (each family decodes as its diffusers pipeline: SDXL upcasts a
  float16 VAE with force_upcast, SD 1.5 does not), and each side's decoding timed inside its calls;
- the variants run interleaved, ``--repeats`` rounds of one call each, after one warm-up call each;
  a row gives the median and inclusive quartiles of its times and of its per-round ratio to stock
  diffusers eager with the same guidance (the paired ratio);
- parity first: diffguide's image against diffusers' at equal settings, as max, mean and p99 of
  |diff| in [0, 1] (``--tolerance``); a loop-graph row whose loop was not captured is flagged with
  the capture's own error; either exits 1;
- CFG; CFG + PAG (diffusers' PAG pipeline, three branches in one batch); CFG cut off after a fixed
step
  (diffusers' documented ``callback_on_step_end`` against diffguide's ``sigma_lo``), so the NFE
  saved by
  skipped branches is the same on both sides; Flux.1-dev has its guidance embedded (one branch).

``overhead`` (SD 1.5 with CFG, batch 1): the loop's time without decoding against the network's own
time for the same forwards, eagerly and as one CUDA graph; the goal is under 2% non-network work.

    bash bench/device_check.sh DIR                     # on the GPU machine
    python bench/device_bench.py --quick --out DIR    # tiny configs on the CPU, seconds (CI)
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402

from diffguide.core.graphs import CudaGraphs, EagerReplay, LoopGraphs  # noqa: E402
from diffguide.pipelines import GuidedPipeline  # noqa: E402
from diffguide.pipelines import tiny as tm  # noqa: E402

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
FLUX = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
DIT = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
QUICK = {
    "sd15": dict(
        SD15,
        sample_size=8,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        norm_num_groups=8,
    ),
    "sdxl": dict(
        SDXL,
        sample_size=8,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=64,
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=8,
    ),
    "flux": dict(
        FLUX,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6),
    ),
    "dit": dict(DIT, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
    "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8),
}
SIZES = {"sd15": 512, "sdxl": 1024, "flux": 512, "dit": 256}
TOLERANCE = {"float16": 0.05, "bfloat16": 0.1, "float32": 1e-3}


def _vae(quick: bool, latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    cfg = QUICK["vae"] if quick else VAE
    n = len(cfg["block_out_channels"])
    return AutoencoderKL(
        **cfg,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        **kw,
    )


@contextlib.contextmanager
def default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build(name: str, quick: bool, device, dtype):
    """A diffusers pipeline with random weights of the named architecture, built on ``device``."""
    import diffusers

    cfg = QUICK[name] if quick else {"sd15": SD15, "sdxl": SDXL, "flux": FLUX, "dit": DIT}[name]
    torch.manual_seed(0)
    with (
        torch.device(device),
        default_dtype(dtype),
    ):  # made in the run's dtype: Flux in float32 is 48 GB
        sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        if name == "sd15":
            pipe = diffusers.StableDiffusionPipeline(
                vae=_vae(quick),
                text_encoder=tm.clip_text(1, hidden=cfg["cross_attention_dim"]),
                tokenizer=tm.clip_tokenizer(77),
                unet=diffusers.UNet2DConditionModel(**cfg),
                scheduler=diffusers.DPMSolverMultistepScheduler(**sd),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif name == "sdxl":
            d = cfg["cross_attention_dim"]
            pooled = (
                cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            )
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=_vae(quick),
                text_encoder=tm.clip_text(1, hidden=d - pooled),
                tokenizer=tm.clip_tokenizer(77),
                text_encoder_2=tm.clip_text(2, hidden=pooled, projection=pooled),
                tokenizer_2=tm.clip_tokenizer(77),
                unet=diffusers.UNet2DConditionModel(**cfg),
                scheduler=diffusers.DPMSolverMultistepScheduler(**sd),
            )
        elif name == "flux":
            from transformers import T5Config, T5EncoderModel

            t5 = T5EncoderModel(
                T5Config(
                    vocab_size=64,
                    d_model=cfg["joint_attention_dim"],
                    d_kv=64,
                    d_ff=256,
                    num_layers=1,
                    num_heads=4,
                    relative_attention_num_buckets=8,
                )
            )
            pipe = diffusers.FluxPipeline(
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                    use_dynamic_shifting=True,
                    base_shift=0.5,
                    max_shift=1.15,
                    base_image_seq_len=256,
                    max_image_seq_len=4096,
                ),
                vae=_vae(quick, 16, shift_factor=0.1159, scaling_factor=0.3611),
                text_encoder=tm.clip_text(1, hidden=cfg["pooled_projection_dim"]),
                tokenizer=tm.clip_tokenizer(77),
                text_encoder_2=t5,
                tokenizer_2=tm.t5_tokenizer(128),
                transformer=diffusers.FluxTransformer2DModel(**cfg),
            )
        else:
            tr = diffusers.DiTTransformer2DModel(
                in_channels=4,
                out_channels=8,
                patch_size=2,
                num_embeds_ada_norm=1000,
                norm_type="ada_norm_zero",
                **cfg,
            )
            pipe = diffusers.DiTPipeline(
                transformer=tr,
                vae=_vae(quick),
                scheduler=diffusers.DPMSolverMultistepScheduler(beta_schedule="linear"),
                id2label={0: "zero"},
            )
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return pipe.to(device, dtype)


def quartiles(v):
    """(lower quartile, median, upper quartile) of v; inclusive, so never outside v's range (the
    default method extrapolates and gave negative times from 2 repeats)."""
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return round(q[0], 4), round(statistics.median(v), 4), round(q[2], 4)


def differences(a, b) -> dict:
    """max, mean and 99th percentile of |a - b| (images in [0, 1])."""
    d = (a.float().cpu() - b.float().cpu()).abs().flatten()
    return {
        "max": float(d.max()),
        "mean": float(d.mean()),
        "p99": float(torch.quantile(d[: 1 << 24], 0.99)),
    }


class Case:
    """One model, dtype and guidance: the diffusers call and the diffguide call at equal
    settings."""

    def __init__(self, name, pipe, guidance, steps, size, cut, device):
        self.name, self.pipe, self.guidance, self.steps, self.size, self.device = (
            name,
            pipe,
            guidance,
            steps,
            size,
            device,
        )
        self.gp = GuidedPipeline.from_pipe(pipe, progress=False)
        self.cut = cut  # the cut-off step (CFG on steps 0 .. cut-1)
        self.stock_pipe = pipe
        if guidance == "cfg+pag":
            from diffusers import AutoPipelineForText2Image

            self.stock_pipe = AutoPipelineForText2Image.from_pipe(
                pipe, enable_pag=True, pag_applied_layers=["mid"]
            )
        self.stock_pipe.set_progress_bar_config(disable=True)
        if device.type != "cuda":  # the loop-graph rows check their wiring only, by eager replay
            self.gp.graphs = LoopGraphs(EagerReplay())
        self.notices, self.timings, self.nfe = [], {}, None

    def gens(self, seed=0):
        return [torch.Generator(self.device).manual_seed(seed)]

    def stock(self):
        n, kw = self.steps, dict(generator=self.gens(), output_type="pt")
        if self.name == "dit":
            return self.stock_pipe(
                class_labels=[0], num_inference_steps=n, guidance_scale=5.0, **kw
            ).images
        kw.update(prompt=PROMPTS[0], num_inference_steps=n, height=self.size, width=self.size)
        if self.name == "flux":
            return self.stock_pipe(guidance_scale=3.5, **kw).images
        if self.guidance == "cfg+pag":
            return self.stock_pipe(guidance_scale=5.0, pag_scale=3.0, **kw).images
        if self.guidance == "cfg cut":

            def cutoff(
                p, i, t, tensors
            ):  # diffusers' "dynamic CFG" recipe: drop the unconditional half
                if i == self.cut - 1:
                    p._guidance_scale = 0.0
                    tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
                    if "add_text_embeds" in tensors:
                        tensors["add_text_embeds"] = tensors["add_text_embeds"].chunk(2)[-1]
                        tensors["add_time_ids"] = tensors["add_time_ids"].chunk(2)[-1]
                return tensors

            names = ["prompt_embeds"] + (
                ["add_text_embeds", "add_time_ids"] if self.name == "sdxl" else []
            )
            return self.stock_pipe(
                guidance_scale=5.0,
                callback_on_step_end=cutoff,
                callback_on_step_end_tensor_inputs=names,
                **kw,
            ).images
        return self.stock_pipe(guidance_scale=5.0, **kw).images

    def spec(self):
        if self.name == "flux":
            return "none"
        if self.guidance == "cfg+pag":
            return "cfg:scale=5+pag:scale=3"
        if (
            self.guidance == "cfg cut"
        ):  # CFG while the VE level is above the one between steps cut-1 and cut
            ts = self.gp.info.timesteps(self.steps)
            lo = float(self.gp.info.schedule.ve(ts[self.cut])) * (1 + 1e-9)
            return f"cfg:scale=5,sigma_lo={lo!r}"
        return "cfg:scale=5"

    def ours(self, graph=False, output_type="pt", prompt=0, seed=0):
        text = 0 if self.name == "dit" else PROMPTS[prompt]
        extra = {"embedded_guidance": 3.5} if self.name == "flux" else {}
        out = self.gp(
            text,
            guidance=self.spec(),
            steps=self.steps,
            height=self.size,
            width=self.size,
            generator=self.gens(seed),
            output_type=output_type,
            cuda_graph=graph,
            **extra,
        )
        self.notices, self.timings, self.nfe = out.notices, out.timings, out.nfe
        return out.images

    def capture_error(self) -> str | None:
        """Why the last loop was not captured (the capture's own error), or None."""
        return next(iter(self.gp.graphs.refused.values()), None) if self.gp.graphs.refused else None

    def stock_nfe(self):
        if self.name == "flux":
            return self.steps
        if self.guidance == "cfg cut":
            return 2 * self.cut + (self.steps - self.cut)
        return (3 if self.guidance == "cfg+pag" else 2) * self.steps


PROMPTS = ["a photograph of a red circle", "a watercolour of two blue squares"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds of fn() between device syncs, under inference mode; fn's own figure where it returns
    one (a call that timed its part itself)."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        own = fn()
    sync(device)
    return own if isinstance(own, float) else time.perf_counter() - t


class DecodeClock:
    """Times the VAE's decode inside every call, whichever side makes it (synchronised on a GPU), so
    that each side's decoding is measured the same way."""

    def __init__(self, vae, device):
        self.vae, self.device, self.seconds = vae, device, []
        self.inner = vae.decode

        def decode(*a, **k):
            sync(device)
            t = time.perf_counter()
            out = self.inner(*a, **k)
            sync(device)
            self.seconds.append(time.perf_counter() - t)
            return out

        vae.decode = decode

    def take(self) -> float:
        total, self.seconds = sum(self.seconds), []
        return total

    def close(self):
        self.vae.decode = self.inner


def _compiled(net, mode: str):
    """One compiled wrapper per network and mode, shared by every case on that network (its compiled
    code is kept per input shape; dynamo keys cache entries by backend, so the modes coexist)."""
    cache = net.__dict__.setdefault("_bench_compiled", {})
    if mode not in cache:
        cache[mode] = torch.compile(net, mode=None if mode == "default" else mode, dynamic=False)
    return cache[mode]


LOOP_GRAPH = (
    "loop-graph",
    "compile+loop-graph",
)  # diffguide only: the whole loop in one CUDA graph
COMPILED = ("compile", "graphs", "compile+loop-graph")


class Run:
    """The run's results, saved (device.json, device.md; temporary name, then rename) whenever a
    row, round or error is added, so a run stopped by its time limit or a signal keeps what it
    measured."""

    def __init__(self, out, device, args):
        self.out, self.t0 = out, time.perf_counter()
        self.result = {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "versions": versions_seen(),
            "steps": args.steps,
            "quick": args.quick,
            "loop_graph_backend": "cuda"
            if device.type == "cuda"
            else "eager replay (CPU: wiring and parity only)",
            "budget_s": {
                k: (None if v == float("inf") else v)  # none: a quick run's
                for k, v in (("smoke", args.smoke_budget_s), ("plan", args.budget_s))
            },
            "seconds": {"smoke": None, "plan": None},
            "smoke": [],
            "parity": [],
            "rows": [],
            "overhead": [],
            "errors": [],
            "skipped_for_budget": [],
            "complete": False,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def error(self, what: str, e: BaseException) -> None:
        self.result["errors"].append(
            {
                "case": what,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            }
        )
        print(f"device_bench: {what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        self.save()

    def save(self) -> None:
        if not self.out:
            return
        out = self.out
        if not out.endswith(".json"):
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "device.md.tmp"), "w") as f:
                f.write(report(self.result))
            os.replace(os.path.join(out, "device.md.tmp"), os.path.join(out, "device.md"))
            out = os.path.join(out, "device.json")
        with open(out + ".tmp", "w") as f:
            f.write(json.dumps(self.result, indent=1) + "\n")
        os.replace(out + ".tmp", out)


def versions_seen() -> dict:
    import platform

    from diffguide import versions

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in (
        "diffusers",
        "transformers",
        "accelerate",
        "safetensors",
        "numpy",
        "peft",
        "diffguide",
    ):
        out[name] = versions.installed(name)
    try:
        out["untested"] = versions.check()
    except ValueError as e:
        out["untested"] = [str(e)]
    return out


def smoke(run: Run, name, pipe, device, dtype_name, steps, size, tolerance) -> dict:
    """The first GPU run: an eager call, then cuda_graph calls with the same and then a new seed and
    prompt: captured once, replayed, each equal to its eager call; capture time and graph memory."""
    case = Case(name, pipe, "embedded 3.5" if name == "flux" else "cfg", steps, size, 1, device)
    row = {"model": name, "dtype": dtype_name, "steps": steps, "size": size}
    run.result["smoke"].append(row)
    eager = timed(lambda: case.ours(), device)
    first = case.ours()
    mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    capture = timed(lambda: case.ours(graph=True), device)  # eager run, then the capture
    graphed = case.ours(graph=True)  # replay, same inputs
    took = case.gp.graphs.capture_seconds
    row.update(
        eager_s=round(eager, 3),
        first_graph_call_s=round(capture, 3),
        capture_s=round(took[-1], 3) if took else None,
        graph_memory_mb=round((torch.cuda.memory_allocated() - mem) / 2**20, 1)
        if device.type == "cuda"
        else None,
    )
    replay = timed(lambda: case.ours(graph=True, prompt=1, seed=1), device)
    new = case.ours(graph=True, prompt=1, seed=1)
    want = case.ours(prompt=1, seed=1)
    graphs = case.gp.graphs
    row.update(
        replay_s=round(replay, 3),
        captured=graphs.captures == 1,
        capture_error=case.capture_error(),
        replays=graphs.replays,
        same_input=differences(graphed, first),
        new_input=differences(new, want),
    )
    row["ok"] = (
        row["captured"] and max(row["same_input"]["max"], row["new_input"]["max"]) <= tolerance
    )
    run.save()
    return row


def run_case(run: Run, case, variants, repeats, device, dtype_name, tolerance):
    """Parity first, then the variants interleaved, rows refreshed and saved after every round:
    medians, quartiles, paired ratios to stock diffusers eager, and each side's decoding time."""
    with torch.inference_mode():
        a, b = case.stock(), case.ours()
    parity = {
        "model": case.name,
        "dtype": dtype_name,
        "guidance": case.guidance,
        **differences(a, b),
        "tolerance": tolerance,
        "nfe_diffusers": case.stock_nfe(),
        "nfe_diffguide": case.nfe,
    }
    parity["ok"] = parity["max"] <= tolerance and parity["nfe_diffusers"] == parity["nfe_diffguide"]
    run.result["parity"].append(parity)
    net_name = "transformer" if getattr(case.pipe, "transformer", None) is not None else "unet"
    net = getattr(case.pipe, net_name)

    def use(mode):
        module = (
            _compiled(net, "reduce-overhead" if mode == "graphs" else "default")
            if mode in COMPILED
            else net
        )
        setattr(case.pipe, net_name, module)
        if case.stock_pipe is not case.pipe:
            setattr(case.stock_pipe, net_name, module)

    calls = [
        (side, mode)
        for mode in variants
        for side in ("diffusers", "diffguide")
        if side == "diffguide" or mode not in LOOP_GRAPH
    ]
    clock = DecodeClock(case.pipe.vae, device)
    try:
        for side, mode in calls:  # warm-up: compilation, and the loop's capture
            use(mode)
            captures = case.gp.graphs.captures
            timed(
                case.stock
                if side == "diffusers"
                else (lambda: case.ours(graph=mode in LOOP_GRAPH)),
                device,
            )
            if mode in LOOP_GRAPH:  # the replay against diffguide eager: the same image
                key = mode.replace("+", "_").replace("-", "_")
                with torch.inference_mode():
                    replayed = case.ours(graph=True)
                parity[f"{key}_captured"] = case.gp.graphs.captures > captures or bool(
                    case.gp.graphs.replays
                )
                parity[f"{key}_capture_error"] = case.capture_error()
                parity[f"{key}_diff"] = differences(replayed, b)
                parity["ok"] = parity["ok"] and parity[f"{key}_diff"]["max"] <= tolerance
        clock.take()
        times = {c: [] for c in calls}
        decode = {c: [] for c in calls}
        rows = {}
        for r in range(repeats):
            for side, mode in calls:
                use(mode)
                times[(side, mode)].append(
                    timed(
                        case.stock
                        if side == "diffusers"
                        else (lambda: case.ours(graph=mode in LOOP_GRAPH)),
                        device,
                    )
                )
                decode[(side, mode)].append(clock.take())
            for (side, mode), v in times.items():
                rows[(side, mode)] = _row(
                    case,
                    side,
                    mode,
                    v,
                    times[("diffusers", "eager")],
                    decode[(side, mode)],
                    dtype_name,
                    parity,
                )
            _replace_rows(run, case, dtype_name, list(rows.values()))
            run.save()
    finally:
        clock.close()
        use("eager")
    return parity


def _row(case, side, mode, v, base, decode, dtype_name, parity):
    ratio = [b0 / t for b0, t in zip(base, v)]  # > 1: faster than stock diffusers eager
    row = {
        "model": case.name,
        "dtype": dtype_name,
        "guidance": case.guidance,
        "side": side,
        "mode": mode,
        "nfe": case.stock_nfe() if side == "diffusers" else case.nfe,
        "ms_per_image": [round(1000 * q, 2) for q in quartiles(v)],
        "speedup_vs_diffusers_eager": list(quartiles(ratio)),
        "decode_ms": [round(1000 * q, 2) for q in quartiles(decode)],
        "repeats": len(v),
    }
    if mode in LOOP_GRAPH:
        key = mode.replace("+", "_").replace("-", "_")
        row["captured"] = parity.get(f"{key}_captured")
        row["capture_error"] = parity.get(f"{key}_capture_error")
    return row


def _replace_rows(run, case, dtype_name, rows):
    keep = [
        r
        for r in run.result["rows"]
        if (r["model"], r["dtype"], r["guidance"]) != (case.name, dtype_name, case.guidance)
        or (r["side"], r["mode"]) not in {(x["side"], x["mode"]) for x in rows}
    ]
    run.result["rows"] = keep + rows


def overhead(case, device, repeats):
    """The step's non-network work: diffguide's sampling time (``timings["sample"]``, no encoding or
    decoding) against the same forwards of the network alone (the batched CFG input, ``steps``
    calls),
    eagerly and, on a GPU, each as one CUDA graph; interleaved rounds, medians and paired ratios."""
    unet, n = case.pipe.unet, case.steps
    side = case.size // case.pipe.vae_scale_factor
    x = torch.randn(2, unet.config.in_channels, side, side, device=device, dtype=unet.dtype)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=unet.dtype)
    t = torch.full((2,), 500.0, device=device)

    def network():
        for _ in range(n):
            unet(x, t, encoder_hidden_states=emb)

    def loop(graph):
        def go():
            case.ours(graph=graph, output_type="latent")
            return case.timings["sample"]

        return go

    fns = {"network": network, "loop": loop(False), "loop_graph": loop(True)}
    if (
        device.type == "cuda"
    ):  # the network's forwards alone, captured as diffguide captures its loop
        with torch.inference_mode():
            fns["network_graph"] = CudaGraphs().capture(lambda: (network(),), device)[0]
    for fn in fns.values():
        timed(fn, device)  # warm-up, and the loop's capture
    got = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            got[k].append(timed(fn, device))
    out = {
        "model": case.name,
        "dtype": str(unet.dtype).replace("torch.", ""),
        "steps": n,
        "repeats": repeats,
        "graph_backend": case.gp.graphs.backend.name,
    }
    for k, v in got.items():
        out[f"{k}_ms"] = [round(1000 * q, 3) for q in quartiles(v)]
    pairs = [("overhead_eager", "loop", "network")]
    if "network_graph" in got:
        pairs.append(("overhead_graph", "loop_graph", "network_graph"))
    for name, a, b in pairs:  # (loop - network) / network per round
        out[name] = list(quartiles([la / nb - 1 for la, nb in zip(got[a], got[b])]))
    return out


def report(result) -> str:
    """device.md: the smoke stage, the parity checks, the timing rows and the overhead rounds."""
    out = [
        f"device: {result['device']}; torch {result['versions'].get('torch')}; seconds: smoke "
        f"{result['seconds']['smoke']}, plan {result['seconds']['plan']} (budgets "
        f"{result['budget_s']})",
        "",
    ]
    if result["smoke"]:
        out += [
            "| smoke | dtype | captured | capture s | graph MB | eager s | replay s | same input "
            "max | new input max | ok |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['model']} | {r['dtype']} | {r.get('captured')} | {r.get('capture_s')} | "
            f"{r.get('graph_memory_mb')} | "
            f"{r.get('eager_s')} | {r.get('replay_s')} | {r.get('same_input', {}).get('max')} | "
            f"{r.get('new_input', {}).get('max')} | {r.get('ok')} |"
            for r in result["smoke"]
        ]
        out.append("")
    out += [
        "| model | dtype | guidance | side | mode | NFE | ms/image (median, quartiles) | speed-up "
        "vs diffusers eager | decode ms | captured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        q, s = r["ms_per_image"], r["speedup_vs_diffusers_eager"]
        out.append(
            f"| {r['model']} | {r['dtype']} | {r['guidance']} | {r['side']} | {r['mode']} | "
            f"{r['nfe']} | {q[1]} ({q[0]}-{q[2]}) | {s[1]:.3f} ({s[0]:.3f}-{s[2]:.3f}) | "
            f"{r['decode_ms'][1]} | {r.get('captured', '-')} |"
        )
    if result["overhead"]:
        out += [
            "",
            "| model | dtype | steps | network ms | loop ms | non-network / network | network "
            "graph ms | loop graph ms | non-network / network (graphs) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for o in result["overhead"]:
            g = o.get("overhead_graph")
            out.append(
                f"| {o['model']} | {o['dtype']} | {o['steps']} | {o['network_ms'][1]} | "
                f"{o['loop_ms'][1]} | {o['overhead_eager'][1]:.4f} | "
                f"{o.get('network_graph_ms', ['-'] * 3)[1]} | {o['loop_graph_ms'][1]} | "
                f"{g[1] if g else '-'} |"
            )
    if result["errors"]:
        out += ["", "errors:"] + [f"- {e['case']}: {e['error']}" for e in result["errors"]]
    return "\n".join(out) + "\n"


SMOKE = [("sd15", "float16"), ("sdxl", "float16"), ("dit", "float16"), ("flux", "bfloat16")]
# The plan after the smoke stage, most important first: every model eager and with the loop graph
# (the issue's goals on SD 1.5 float16 at batch 1 first: CFG, then AG's skipped branches as "cfg
# cut"), then the compiled variants on both sides, model by model, while the budget lasts.
LIGHT = ["eager", "loop-graph"]
PLAN = [
    ("sd15", "float16", "cfg", LIGHT),
    ("sd15", "float16", "cfg cut", LIGHT),
    ("dit", "float16", "cfg", LIGHT),
    ("sdxl", "float16", "cfg", LIGHT),
    ("flux", "bfloat16", "embedded 3.5", LIGHT),
    ("sd15", "float16", "cfg+pag", LIGHT),
    ("sdxl", "float16", "cfg cut", LIGHT),
    ("sd15", "float16", "cfg", ["eager", "compile", "graphs", "compile+loop-graph"]),
    ("dit", "float16", "cfg", ["eager", "compile", "graphs", "compile+loop-graph"]),
    ("sdxl", "float16", "cfg", ["eager", "compile", "graphs", "compile+loop-graph"]),
    ("flux", "bfloat16", "embedded 3.5", ["eager", "compile", "graphs", "compile+loop-graph"]),
]


def plan(args) -> list:
    """(model, dtype, guidance, variants) in run order: PLAN, or every combination of the options
    given."""
    variants = args.variants.split(",")
    if not (args.models or args.dtypes or args.guidance):
        return [(m, d, g, [x for x in v if x in variants] or v[:1]) for m, d, g, v in PLAN]
    out = []
    for name in (args.models or "sd15,sdxl,flux,dit").split(","):
        for dtype_name in (
            ["bfloat16"] if name == "flux" else (args.dtypes or "float16,bfloat16").split(",")
        ):
            for g in {"dit": ["cfg"], "flux": ["embedded 3.5"]}.get(
                name, (args.guidance or "cfg,cfg+pag,cfg cut").split(",")
            ):
                out.append((name, dtype_name, g, variants))
    return out


class Stopped(BaseException):
    """SIGTERM (the wrapper's timeout): save what was measured and stop."""


def _stop(signum, frame):
    raise Stopped()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="e.g. sd15,sdxl,flux,dit (default: the priority plan, PLAN)")
    ap.add_argument("--dtypes", help="float16,bfloat16 (flux runs in bfloat16 only)")
    ap.add_argument(
        "--guidance", help="cfg,cfg+pag,cfg cut for the UNets; DiT: cfg; Flux: embedded"
    )
    ap.add_argument(
        "--variants",
        default="eager,compile,graphs,loop-graph,compile+loop-graph",
        help="which of these the plan may run",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cut", type=int, default=8, help="'cfg cut': CFG on the first CUT steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--smoke-budget-s",
        type=float,
        default=None,
        help="start no smoke model after this many seconds (default 110; none with --quick)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no case after this many seconds in all (default 420; none with --quick)",
    )
    ap.add_argument("--no-smoke", action="store_true", help="skip the smoke stage")
    ap.add_argument(
        "--no-overhead", action="store_true", help="skip the SD 1.5 non-network overhead rounds"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny configs in float32 on the CPU, 3 steps"
    )
    ap.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="parity bound, max |diff| in [0, 1] (default: 0.05 float16, 0.1 bfloat16, 1e-3 "
        "float32)",
    )
    ap.add_argument("--out", help="a JSON file, or a folder for device.json and device.md")
    args = ap.parse_args()
    for name, default in (
        ("smoke_budget_s", 110.0),
        ("budget_s", 420.0),
    ):  # a quick run's are its own
        if getattr(args, name) is None:
            setattr(args, name, float("inf") if args.quick else default)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cases, smokes = plan(args), list(SMOKE)
    if args.quick:  # every case once, in float32
        args.steps, args.cut, args.repeats = 3, 1, 2
        first = {}
        for m, _, g, v in cases:
            first.setdefault((m, g), (m, "float32", g, v))
        cases = list(first.values())
        smokes = [(m, "float32") for m, _ in smokes]
    if (
        device.type != "cuda"
    ):  # compile and graph capture are GPU rows; the loop graph's wiring is checked
        cases = [(m, d, g, [v for v in vs if v in LIGHT]) for m, d, g, vs in cases]  # by replay
        cases = [c for i, c in enumerate(cases) if c not in cases[:i]]
    run = Run(args.out, device, args)
    signal.signal(signal.SIGTERM, _stop)
    pipes = {}

    def pipe_for(name, dtype_name):
        if (name, dtype_name) not in pipes:
            if (
                device.type == "cuda" and len(pipes) >= 2
            ):  # two models at a time: Flux alone is 24 GB
                pipes.pop(next(iter(pipes)))
                torch.cuda.empty_cache()
            pipes[(name, dtype_name)] = build(name, args.quick, device, getattr(torch, dtype_name))
        return pipes[(name, dtype_name)]

    try:
        for name, dtype_name in [] if args.no_smoke else smokes:
            if run.result["smoke"] and run.elapsed() > args.smoke_budget_s:
                run.result["skipped_for_budget"].append(f"smoke {name} {dtype_name}")
                continue
            try:
                smoke(
                    run,
                    name,
                    pipe_for(name, dtype_name),
                    device,
                    dtype_name,
                    4,
                    64 if args.quick else SIZES[name],
                    _tolerance(args, dtype_name),
                )
            except Exception as e:  # the next model still runs
                run.error(f"smoke {name} {dtype_name}", e)
        run.result["seconds"]["smoke"] = round(run.elapsed(), 1)
        for name, dtype_name, g, variants in cases:
            if run.result["parity"] and run.elapsed() > args.budget_s:  # the first case always runs
                run.result["skipped_for_budget"].append(
                    f"{name} {dtype_name} {g} {'+'.join(variants)}"
                )
                continue
            try:
                if (
                    os.environ.get("DEVICE_BENCH_FAIL") == name
                ):  # the tests' way to make a case raise
                    raise RuntimeError("planted failure (DEVICE_BENCH_FAIL)")
                case = Case(
                    name,
                    pipe_for(name, dtype_name),
                    g,
                    args.steps,
                    64 if args.quick else SIZES[name],
                    args.cut,
                    device,
                )
                run_case(
                    run,
                    case,
                    variants,
                    args.repeats,
                    device,
                    dtype_name,
                    _tolerance(args, dtype_name),
                )
                if (
                    name == "sd15"
                    and g == "cfg"
                    and not args.no_overhead
                    and not run.result["overhead"]
                ):
                    run.result["overhead"].append(overhead(case, device, args.repeats))
            except (
                Exception
            ) as e:  # an OOM, a NonFiniteError, an API difference: recorded, the next case runs
                run.error(f"{name} {dtype_name} {g}", e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            run.result["seconds"]["plan"] = round(run.elapsed(), 1)
            run.save()
        run.result["complete"] = True
    except Stopped:
        run.result["stopped"] = "SIGTERM"
    run.result["seconds"]["plan"] = round(run.elapsed(), 1)
    run.save()
    emit(run.result, None)
    sys.exit(exit_code(run.result, device))


def _tolerance(args, dtype_name) -> float:
    return args.tolerance if args.tolerance is not None else TOLERANCE[dtype_name]


def exit_code(result, device) -> int:
    """1 on a parity failure or a loop that was not captured on a GPU (the rows are flagged and the
    capture's error is in them); 124 when stopped by SIGTERM; else 0."""
    # a row a SIGTERM cut short has no verdict yet ("ok" missing): it fails nothing
    bad = [p for p in result["parity"] if p.get("ok") is False] + [
        s for s in result["smoke"] if s.get("ok") is False
    ]
    uncaptured = (
        [r for r in result["rows"] if r.get("captured") is False] if device.type == "cuda" else []
    )
    if bad or uncaptured:
        print(
            f"parity failure: {bad}" if bad else "",
            f"not captured: {uncaptured}" if uncaptured else "",
            file=sys.stderr,
        )
        return 1
    return 124 if result.get("stopped") else 0


if __name__ == "__main__":
    main()
