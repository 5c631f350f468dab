"""GPU speed, fair: stock diffusers against diffguide at equal settings (the prepared device check).

Random weights from the published configs (speed does not depend on the weights; no downloads): an
SD 1.5 UNet at 512 px, SDXL's UNet at 1024 px, Flux.1-dev's transformer (512 px by default, to fit the
time budget) and DiT-XL/2 at 256 px, each with its published VAE architecture. Text encoders are small
stand-ins with the right output widths (their cost is the same on both sides and not what is compared).

Fairness, point by point:
- both sides run under ``torch.inference_mode`` (diffusers' ``__call__`` adds ``no_grad`` inside it);
- both sides get the same speed options: eager, ``torch.compile`` of the denoiser, and CUDA graphs of
  the denoiser (``mode="reduce-overhead"``); the network module is swapped in the one pipeline both use;
- VAE decoding is in every timed call (``output_type="pt"``) and is also timed alone (``decode_ms``);
- the variants run interleaved, ``--repeats`` rounds of one call each, after one warm-up call each;
  a row gives the median and quartiles of its times, and the median and quartiles of its per-round
  ratio to stock diffusers eager with the same guidance (the paired ratio);
- every guidance setting is checked first: diffguide's image against diffusers' at equal settings, in
  the run's dtype (``--tolerance``, max |diff| in [0, 1]); the script exits 1 on a parity failure;
- CFG; CFG + PAG (diffusers' PAG pipeline, three branches in one batch, against diffguide's
  ``cfg+pag``); CFG cut off after a fixed step (diffusers' documented ``callback_on_step_end`` that
  drops the unconditional half, against diffguide's CFG with ``sigma_lo`` at the same step), so the
  NFE saving of skipped branches is the same on both sides. Flux.1-dev has its guidance embedded (one
  branch on both sides).

diffguide alone has ``loop-graph`` rows: the whole sampling loop (branch concatenation, network,
combine, sampler update at every step) captured in one CUDA graph (``cuda_graph=True``). The
``compile+loop-graph`` rows put the compiled network (default mode) inside that graph. Their
counterpart on the diffusers side is its best row, ``graphs`` (``reduce-overhead``). Their parity
is checked against diffguide eager. The first call captures, and the warm-up call makes it.

``overhead`` (SD 1.5 with CFG, batch 1): the loop's time without decoding against the network's own
time for the same forwards (the batched CFG forward run ``steps`` times alone, eagerly and as one
CUDA graph), interleaved. (loop - network) / network is the step's non-network work; the goal is
under 2%.

    python bench/device_bench.py --out DIR            # the device run (see device_check.sh)
    python bench/device_bench.py --quick --out DIR    # tiny configs on the CPU, seconds (CI)
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402

from diffguide.core.graphs import CudaGraphs, EagerReplay, LoopGraphs  # noqa: E402
from diffguide.pipelines import GuidedPipeline  # noqa: E402
from diffguide.pipelines import tiny as tm  # noqa: E402

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
DIT = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
QUICK = {"sd15": dict(SD15, sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                      cross_attention_dim=32, norm_num_groups=8),
         "sdxl": dict(SDXL, sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
                      transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
                      cross_attention_dim=64, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
         "flux": dict(FLUX, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                      axes_dims_rope=(4, 6, 6)),
         "dit": dict(DIT, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
         "vae": dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8)}
SIZES = {"sd15": 512, "sdxl": 1024, "flux": 512, "dit": 256}
TOLERANCE = {"float16": 0.05, "bfloat16": 0.1, "float32": 1e-3}


def _vae(quick: bool, latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    cfg = QUICK["vae"] if quick else VAE
    n = len(cfg["block_out_channels"])
    return AutoencoderKL(**cfg, latent_channels=latent_channels, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, **kw)


def build(name: str, quick: bool, device, dtype):
    """A diffusers pipeline with random weights of the named architecture, built on ``device``."""
    import diffusers

    cfg = QUICK[name] if quick else {"sd15": SD15, "sdxl": SDXL, "flux": FLUX, "dit": DIT}[name]
    torch.manual_seed(0)
    with torch.device(device):
        sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        if name == "sd15":
            pipe = diffusers.StableDiffusionPipeline(
                vae=_vae(quick), text_encoder=tm.clip_text(1, hidden=cfg["cross_attention_dim"]),
                tokenizer=tm.clip_tokenizer(77), unet=diffusers.UNet2DConditionModel(**cfg),
                scheduler=diffusers.DPMSolverMultistepScheduler(**sd), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
        elif name == "sdxl":
            d = cfg["cross_attention_dim"]
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            pipe = diffusers.StableDiffusionXLPipeline(
                vae=_vae(quick), text_encoder=tm.clip_text(1, hidden=d - pooled), tokenizer=tm.clip_tokenizer(77),
                text_encoder_2=tm.clip_text(2, hidden=pooled, projection=pooled), tokenizer_2=tm.clip_tokenizer(77),
                unet=diffusers.UNet2DConditionModel(**cfg), scheduler=diffusers.DPMSolverMultistepScheduler(**sd))
        elif name == "flux":
            from transformers import T5Config, T5EncoderModel

            t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=cfg["joint_attention_dim"], d_kv=64, d_ff=256,
                                         num_layers=1, num_heads=4, relative_attention_num_buckets=8))
            pipe = diffusers.FluxPipeline(
                scheduler=diffusers.FlowMatchEulerDiscreteScheduler(
                    use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096),
                vae=_vae(quick, 16, shift_factor=0.1159, scaling_factor=0.3611),
                text_encoder=tm.clip_text(1, hidden=cfg["pooled_projection_dim"]), tokenizer=tm.clip_tokenizer(77),
                text_encoder_2=t5, tokenizer_2=tm.t5_tokenizer(128), transformer=diffusers.FluxTransformer2DModel(**cfg))
        else:
            tr = diffusers.DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000,
                                                 norm_type="ada_norm_zero", **cfg)
            pipe = diffusers.DiTPipeline(transformer=tr, vae=_vae(quick),
                                         scheduler=diffusers.DPMSolverMultistepScheduler(beta_schedule="linear"),
                                         id2label={0: "zero"})
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return pipe.to(device, dtype)


def quartiles(v):
    q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
    return round(q[0], 4), round(statistics.median(v), 4), round(q[2], 4)


class Case:
    """One model, dtype and guidance: the diffusers call and the diffguide call at equal settings."""

    def __init__(self, name, pipe, guidance, steps, size, cut, device):
        self.name, self.pipe, self.guidance, self.steps, self.size, self.device = name, pipe, guidance, steps, size, device
        self.gp = GuidedPipeline.from_pipe(pipe, progress=False)
        self.cut = cut  # the cut-off step (CFG on steps 0 .. cut-1)
        self.stock_pipe = pipe
        if guidance == "cfg+pag":
            from diffusers import AutoPipelineForText2Image

            self.stock_pipe = AutoPipelineForText2Image.from_pipe(pipe, enable_pag=True, pag_applied_layers=["mid"])
        self.stock_pipe.set_progress_bar_config(disable=True)
        if device.type != "cuda":  # the loop-graph rows check their wiring only, by eager replay
            self.gp.graphs = LoopGraphs(EagerReplay())

    def gens(self):
        return [torch.Generator(self.device).manual_seed(0)]

    def stock(self):
        n, kw = self.steps, dict(generator=self.gens(), output_type="pt")
        if self.name == "dit":
            return self.stock_pipe(class_labels=[0], num_inference_steps=n, guidance_scale=5.0, **kw).images
        kw.update(prompt="a photograph of a red circle", num_inference_steps=n, height=self.size, width=self.size)
        if self.name == "flux":
            return self.stock_pipe(guidance_scale=3.5, **kw).images
        if self.guidance == "cfg+pag":
            return self.stock_pipe(guidance_scale=5.0, pag_scale=3.0, **kw).images
        if self.guidance == "cfg cut":
            def cutoff(p, i, t, tensors):  # diffusers' "dynamic CFG" recipe: drop the unconditional half
                if i == self.cut - 1:
                    p._guidance_scale = 0.0
                    tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[-1]
                    if "add_text_embeds" in tensors:
                        tensors["add_text_embeds"] = tensors["add_text_embeds"].chunk(2)[-1]
                        tensors["add_time_ids"] = tensors["add_time_ids"].chunk(2)[-1]
                return tensors
            names = ["prompt_embeds"] + (["add_text_embeds", "add_time_ids"] if self.name == "sdxl" else [])
            return self.stock_pipe(guidance_scale=5.0, callback_on_step_end=cutoff,
                                   callback_on_step_end_tensor_inputs=names, **kw).images
        return self.stock_pipe(guidance_scale=5.0, **kw).images

    def spec(self):
        if self.name == "flux":
            return "none"
        if self.guidance == "cfg+pag":
            return "cfg:scale=5+pag:scale=3"
        if self.guidance == "cfg cut":  # CFG while the VE level is above the one between steps cut-1 and cut
            ts = self.gp.info.timesteps(self.steps)
            lo = float(self.gp.info.schedule.ve(ts[self.cut])) * (1 + 1e-9)
            return f"cfg:scale=5,sigma_lo={lo!r}"
        return "cfg:scale=5"

    def ours(self, graph=False, output_type="pt"):
        prompt = 0 if self.name == "dit" else "a photograph of a red circle"
        extra = {"embedded_guidance": 3.5} if self.name == "flux" else {}
        out = self.gp(prompt, guidance=self.spec(), steps=self.steps, height=self.size, width=self.size,
                      generator=self.gens(), output_type=output_type, cuda_graph=graph, **extra)
        self.notices, self.timings = out.notices, out.timings
        self.nfe = out.nfe
        return out.images

    def stock_nfe(self):
        if self.name == "flux":
            return self.steps
        if self.guidance == "cfg cut":
            return 2 * self.cut + (self.steps - self.cut)
        return (3 if self.guidance == "cfg+pag" else 2) * self.steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Seconds of fn() between device syncs, under inference mode; fn's own figure where it returns one
    (a call that timed its part itself)."""
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        own = fn()
    sync(device)
    return own if isinstance(own, float) else time.perf_counter() - t


def _compiled(net, mode: str):
    """One compiled wrapper per network and mode, shared by every case on that network (its compiled
    code is kept per input shape; dynamo keys cache entries by backend, so the modes coexist)."""
    cache = net.__dict__.setdefault("_bench_compiled", {})
    if mode not in cache:
        cache[mode] = torch.compile(net, mode=None if mode == "default" else mode, dynamic=False)
    return cache[mode]


LOOP_GRAPH = ("loop-graph", "compile+loop-graph")  # diffguide only: the whole loop in one CUDA graph


def _call(case, side, mode):
    return case.stock if side == "diffusers" else (lambda: case.ours(graph=mode in LOOP_GRAPH))


def run_case(case, variants, repeats, device, dtype_name, tolerance):
    """Parity first, then the variants interleaved; rows with medians, quartiles and paired ratios."""
    with torch.inference_mode():
        a, b = case.stock(), case.ours()
    diff = float((a.float().cpu() - b.float().cpu()).abs().max())
    parity = {"model": case.name, "dtype": dtype_name, "guidance": case.guidance, "max_abs_diff": diff,
              "tolerance": tolerance, "ok": diff <= tolerance, "nfe_diffusers": case.stock_nfe(), "nfe_diffguide": case.nfe}
    net_name = "transformer" if hasattr(case.pipe, "transformer") and case.pipe.transformer is not None else "unet"
    net = getattr(case.pipe, net_name)
    compiled = {}
    times = {}
    for mode in variants:
        if mode in ("compile", "graphs", "compile+loop-graph"):
            compiled[mode] = _compiled(net, "reduce-overhead" if mode == "graphs" else "default")
        for side in ("diffusers", "diffguide") if mode not in LOOP_GRAPH else ("diffguide",):
            setattr(case.pipe, net_name, compiled.get(mode, net))
            if case.stock_pipe is not case.pipe:
                setattr(case.stock_pipe, net_name, compiled.get(mode, net))
            captures = case.gp.graphs.captures
            timed(_call(case, side, mode), device)  # warm-up (and compilation, and the loop's capture)
            times[(side, mode)] = []
            if mode in LOOP_GRAPH:  # the replay against diffguide eager: the same image
                key = "loop_graph" if mode == "loop-graph" else "compile_loop_graph"
                parity[f"{key}_captured"] = case.gp.graphs.captures > captures
                parity[f"{key}_notices"] = case.notices  # why, where the loop ran eagerly
                with torch.inference_mode():
                    replayed = case.ours(graph=True)
                parity[f"{key}_diff"] = float((replayed.float().cpu() - b.float().cpu()).abs().max())
                parity["ok"] = parity["ok"] and parity[f"{key}_diff"] <= tolerance
    print(json.dumps(parity), flush=True)
    vae = case.pipe.vae
    lat = torch.randn(1, vae.config.latent_channels, case.size // 8, case.size // 8, device=device, dtype=vae.dtype)
    decode = []
    for _ in range(repeats):
        for mode in variants:
            for side in ("diffusers", "diffguide"):
                setattr(case.pipe, net_name, compiled.get(mode, net))
                if case.stock_pipe is not case.pipe:
                    setattr(case.stock_pipe, net_name, compiled.get(mode, net))
                if (side, mode) in times:
                    times[(side, mode)].append(timed(_call(case, side, mode), device))
        decode.append(timed(lambda: vae.decode(lat), device))
    setattr(case.pipe, net_name, net)
    if case.stock_pipe is not case.pipe:
        setattr(case.stock_pipe, net_name, net)
    base = times[("diffusers", "eager")]
    rows = []
    for (side, mode), v in times.items():
        ratio = [b0 / t for b0, t in zip(base, v)]  # > 1: faster than stock diffusers eager
        rows.append({"model": case.name, "dtype": dtype_name, "guidance": case.guidance, "side": side, "mode": mode,
                     "nfe": case.stock_nfe() if side == "diffusers" else case.nfe,
                     "ms_per_image": [round(1000 * q, 2) for q in quartiles(v)],
                     "speedup_vs_diffusers_eager": list(quartiles(ratio)),
                     "decode_ms": [round(1000 * q, 2) for q in quartiles(decode)], "repeats": repeats})
        print(json.dumps(rows[-1]), flush=True)
    return parity, rows


def overhead(case, device, repeats):
    """The step's non-network work: diffguide's sampling time (``timings["sample"]``, no encoding or
    decoding) against the same forwards of the network alone (the batched CFG input, ``steps`` calls),
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
        def run():
            case.ours(graph=graph, output_type="latent")
            return case.timings["sample"]
        return run
    fns = {"network": network, "loop": loop(False), "loop_graph": loop(True)}
    if device.type == "cuda":  # the network's forwards alone, captured as diffguide captures its loop
        with torch.inference_mode():
            fns["network_graph"] = CudaGraphs().capture(lambda: (network(),), device)[0]

    for fn in fns.values():
        timed(fn, device)  # warm-up, and the loop's capture
    got = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            got[k].append(timed(fn, device))
    out = {"model": case.name, "dtype": str(unet.dtype).replace("torch.", ""), "steps": n, "repeats": repeats,
           "graph_backend": case.gp.graphs.backend.name}
    for k, v in got.items():
        out[f"{k}_ms"] = [round(1000 * q, 3) for q in quartiles(v)]
    pairs = [("overhead_eager", "loop", "network")]
    if "network_graph" in got:
        pairs.append(("overhead_graph", "loop_graph", "network_graph"))
    for name, a, b in pairs:  # (loop - network) / network per round
        out[name] = list(quartiles([la / nb - 1 for la, nb in zip(got[a], got[b])]))
    print(json.dumps(out), flush=True)
    return out


def table(rows) -> str:
    out = ["| model | dtype | guidance | side | mode | NFE | ms/image (median, quartiles) | speed-up vs diffusers eager | "
           "VAE decode ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, s = r["ms_per_image"], r["speedup_vs_diffusers_eager"]
        out.append(f"| {r['model']} | {r['dtype']} | {r['guidance']} | {r['side']} | {r['mode']} | {r['nfe']} | "
                   f"{q[1]} ({q[0]}-{q[2]}) | {s[1]:.3f} ({s[0]:.3f}-{s[2]:.3f}) | {r['decode_ms'][1]} |")
    return "\n".join(out) + "\n"


def overhead_table(items) -> str:
    if not items:
        return ""
    out = ["", "| model | dtype | steps | network ms | loop ms | non-network / network | network graph ms | "
           "loop graph ms | non-network / network (graphs) |", "|---|---|---|---|---|---|---|---|---|"]
    for o in items:
        g = o.get("overhead_graph")
        out.append(f"| {o['model']} | {o['dtype']} | {o['steps']} | {o['network_ms'][1]} | {o['loop_ms'][1]} | "
                   f"{o['overhead_eager'][1]:.4f} | {o.get('network_graph_ms', ['-'] * 3)[1]} | "
                   f"{o['loop_graph_ms'][1]} | {g[1] if g else '-'} |")
    return "\n".join(out) + "\n"


# The default plan, most important first: the goals on SD 1.5 float16 at batch 1 (CFG with every
# speed option on both sides, then the skipped branches of AG as "cfg cut"), then the other settings
# eager and with the loop graph (the compiles of every shape would not fit the time); each case starts
# only while the budget lasts, and the results are saved after each.
PLAN = [("sd15", "float16", "cfg", "all"), ("sd15", "float16", "cfg cut", "eager"), ("sd15", "float16", "cfg+pag", "eager"),
        ("dit", "float16", "cfg", "eager"), ("sdxl", "float16", "cfg", "eager"), ("flux", "bfloat16", "embedded 3.5", "eager"),
        ("sd15", "bfloat16", "cfg", "eager"), ("sdxl", "float16", "cfg+pag", "eager"), ("sdxl", "bfloat16", "cfg", "eager"),
        ("dit", "bfloat16", "cfg", "eager"), ("sdxl", "float16", "cfg cut", "eager")]


def plan(args) -> list:
    """(model, dtype, guidance, variants) in run order: PLAN, or every combination of the options given."""
    variants = args.variants.split(",")
    light = [v for v in variants if v in ("eager", "loop-graph")]
    if not (args.models or args.dtypes or args.guidance):
        return [(m, d, g, variants if v == "all" else light) for m, d, g, v in PLAN]
    out = []
    for name in (args.models or "sd15,sdxl,flux,dit").split(","):
        for dtype_name in (["bfloat16"] if name == "flux" else (args.dtypes or "float16,bfloat16").split(",")):
            for g in {"dit": ["cfg"], "flux": ["embedded 3.5"]}.get(name, (args.guidance or "cfg,cfg+pag,cfg cut").split(",")):
                out.append((name, dtype_name, g, variants))
    return out


def save(result: dict, rows, overheads, out: str | None) -> str | None:
    """device.json and device.md (written to temporary names, then renamed): after every case, so that a
    run stopped by its time limit keeps what it measured."""
    if not out:
        return None
    if not out.endswith(".json"):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "device.md.tmp"), "w") as f:
            f.write(table(rows) + overhead_table(overheads))
        os.replace(os.path.join(out, "device.md.tmp"), os.path.join(out, "device.md"))
        out = os.path.join(out, "device.json")
    with open(out + ".tmp", "w") as f:
        f.write(json.dumps(result, indent=1) + "\n")
    os.replace(out + ".tmp", out)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="e.g. sd15,sdxl,flux,dit (default: the priority plan, PLAN)")
    ap.add_argument("--dtypes", help="float16,bfloat16 (flux runs in bfloat16 only)")
    ap.add_argument("--guidance", help="cfg,cfg+pag,cfg cut for the UNets; DiT: cfg; Flux: embedded")
    ap.add_argument("--variants", default="eager,compile,graphs,loop-graph,compile+loop-graph",
                    help="with the default plan, the compiled ones run on SD 1.5 float16 CFG only")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cut", type=int, default=8, help="'cfg cut': CFG on the first CUT steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no case after this many seconds")
    ap.add_argument("--no-overhead", action="store_true", help="skip the SD 1.5 non-network overhead rounds")
    ap.add_argument("--quick", action="store_true", help="tiny configs in float32 on the CPU, 3 steps")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="parity bound, max |diff| in [0, 1] (default: 0.05 float16, 0.1 bfloat16, 1e-3 float32)")
    ap.add_argument("--out", help="a JSON file, or a folder for device.json and device.md")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    cases = plan(args)
    if args.quick:  # every case once, in float32
        args.steps, args.cut, args.repeats = 3, 1, 2
        first = {}
        for m, _, g, v in cases:
            first.setdefault((m, g), (m, "float32", g, v))
        cases = list(first.values())
    if device.type != "cuda":  # compile and graph capture are GPU rows; the loop graph's wiring is checked
        cases = [(m, d, g, [v for v in vs if v in ("eager", "loop-graph")]) for m, d, g, vs in cases]  # by replay
    t0, parities, rows, skipped, overheads = time.perf_counter(), [], [], [], []
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "steps": args.steps, "parity": parities, "rows": rows, "overhead": overheads,
              "loop_graph_backend": "cuda" if device.type == "cuda" else "eager replay (CPU: wiring and parity only)",
              "skipped_for_budget": skipped, "quick": args.quick, "complete": False}
    pipe, built = None, None
    for name, dtype_name, g, variants in cases:
        if parities and time.perf_counter() - t0 > args.budget_s:  # the first case always runs
            skipped.append(f"{name} {dtype_name} {g}")
            continue
        if built != (name, dtype_name):
            pipe = None
            if device.type == "cuda":
                torch._dynamo.reset()  # the previous model's compiled code
                torch.cuda.empty_cache()
            pipe, built = build(name, args.quick, device, getattr(torch, dtype_name)), (name, dtype_name)
        size = 64 if args.quick else SIZES[name]
        case = Case(name, pipe, g, args.steps, size, args.cut, device)
        tol = args.tolerance if args.tolerance is not None else TOLERANCE[dtype_name]
        parity, r = run_case(case, list(variants), args.repeats, device, dtype_name, tol)
        parities.append(parity)
        rows += r
        if name == "sd15" and g == "cfg" and not args.no_overhead and not any(o["dtype"] == dtype_name for o in overheads):
            overheads.append(overhead(case, device, args.repeats))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        save(result, rows, overheads, args.out)
    result["seconds"], result["complete"] = round(time.perf_counter() - t0, 1), True
    emit(result, save(result, rows, overheads, args.out))
    bad = [p for p in parities if not p["ok"]]
    if bad:
        print(f"parity failure: {bad}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
