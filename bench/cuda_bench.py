"""CUDA speed: stock diffusers pipelines versus diffguide at equal NFE, then diffguide's speed options.

Random weights built from the published configs (speed does not depend on the weights): an
SD 1.5-architecture UNet at 512x512, an SDXL-architecture UNet at 1024x1024 and DiT-XL/2 at 256x256
(T-Stitch with DiT-S/2); fp16 and bf16, batch 1 and 4, 20 steps with CFG 5 (DPM-Solver++ 2M on both
sides; the denoising loop only, output_type="latent", text encoding included). Rows: ms per image,
images per second, peak GPU memory and achieved TFLOP/s (network FLOPs from torch's FLOP counter
times the forwards) against the GPU's dense peak.

    python bench/cuda_bench.py [--models sd15,sdxl,dit] [--dtypes float16,bfloat16] [--batches 1,4]
                         [--steps 20] [--repeats 3] [--out bench/results/cuda.json]
    python bench/cuda_bench.py --quick   # tiny configs on whatever device there is (CI: it cannot rot)

diffguide options: "compile" is torch.compile of the network (default mode), "graphs" adds CUDA
graph capture of the fixed-shape forward (mode="reduce-overhead"), "channels_last" the memory
format; "ag" is Adaptive Guidance (fewer NFE), "stitch" T-Stitch with DiT-S/2 for 40% of the steps.
The options accumulate in row order (channels_last stays on for the compiled rows).
"""
import argparse
import time

import torch
from _common import emit

from diffguide.pipelines import GuidedPipeline, Stitching
from diffguide.pipelines import tiny as tm

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense fp16/bf16 tensor-core peaks

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
DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32)
DIT_S = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=32)
QUICK = {"sd15": dict(SD15, sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                      cross_attention_dim=32, norm_num_groups=8),
         "sdxl": dict(SDXL, sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1,
                      transformer_layers_per_block=(1, 1, 1), attention_head_dim=(2, 4, 4),
                      cross_attention_dim=64, addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=8),
         "dit": dict(DIT_XL, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
         "dit_s": dict(DIT_S, num_attention_heads=2, attention_head_dim=8, num_layers=1, sample_size=8)}


def _vae8():
    """A minimal VAE with SD's 8x latent factor: only its config is used (no decoding)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def build(name: str, quick: bool):
    """A diffusers pipeline with random weights of the named architecture."""
    import diffusers

    cfg = QUICK[name] if quick else {"sd15": SD15, "sdxl": SDXL, "dit": DIT_XL, "dit_s": DIT_S}[name]
    sch = diffusers.DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear")
    if name == "sd15":
        hidden = cfg["cross_attention_dim"]
        return diffusers.StableDiffusionPipeline(
            vae=_vae8(), text_encoder=tm.clip_text(1, hidden=hidden), tokenizer=tm.clip_tokenizer(77),
            unet=diffusers.UNet2DConditionModel(**cfg), scheduler=sch, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    if name == "sdxl":
        d = cfg["cross_attention_dim"]
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae8(), text_encoder=tm.clip_text(1, hidden=d - pooled), tokenizer=tm.clip_tokenizer(77),
            text_encoder_2=tm.clip_text(2, hidden=pooled, projection=pooled), tokenizer_2=tm.clip_tokenizer(77),
            unet=diffusers.UNet2DConditionModel(**cfg), scheduler=sch)
    tr = diffusers.DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2,
                                         num_embeds_ada_norm=1000, norm_type="ada_norm_zero", **cfg)
    sch = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear")
    return diffusers.DiTPipeline(transformer=tr, vae=_vae8(), scheduler=sch, id2label={0: "zero"})


def flops_per_forward(gp, prompt, batch: int, size: int) -> float:
    """FLOPs of one network forward on a CFG batch (2 x batch rows), by torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        gp(prompt, guidance="none", steps=1, height=size, width=size, num_images_per_prompt=2 * batch,
           seed=list(range(2 * batch)), output_type="latent", progress=False)
    return counter.get_total_flops()  # one step, one forward of 2 x batch rows (plus the text encoder)


def measure(fn, repeats: int, device) -> tuple[float, float]:
    """(median seconds, peak memory GiB) after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak


def run_model(name, dtype, batch, args, device, peak_tflops):
    pipe = build(name, args.quick).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    dit = name == "dit"
    size = (pipe.transformer.config.sample_size if dit else pipe.unet.config.sample_size) * 8
    prompt = 0 if dit else "a photograph of a red circle"
    gen = lambda: [torch.Generator(device).manual_seed(i) for i in range(batch)]
    n, rows = args.steps, []

    def stock():
        kw = dict(num_inference_steps=n, guidance_scale=5.0, generator=gen(), output_type="latent")
        if dit:
            return pipe(class_labels=[0] * batch, **kw)
        return pipe([prompt] * batch, height=size, width=size, **kw)

    gp = GuidedPipeline.from_pipe(pipe, progress=False)
    flops = flops_per_forward(gp, prompt, batch, size)

    def ours(g="cfg:scale=5", stitch=None):
        return lambda: gp(prompt, guidance=g, sampler="dpmpp_2m", steps=n, height=size, width=size,
                              num_images_per_prompt=batch, seed=list(range(batch)), output_type="latent",
                              stitch=stitch)

    def row(label, fn, nfe_per_image):
        sec, mem = measure(fn, args.repeats, device)
        achieved = flops / (2 * batch) * nfe_per_image * batch / sec / 1e12
        rows.append({"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "variant": label,
                     "ms_per_image": round(1000 * sec / batch, 2), "images_per_second": round(batch / sec, 3),
                     "peak_memory_gib": round(mem, 3), "nfe_per_image": nfe_per_image,
                     "tflops": round(achieved, 2),
                     "fraction_of_peak": round(achieved / peak_tflops, 4) if peak_tflops else None})
        print(rows[-1], flush=True)

    row("diffusers", stock, 2 * n)
    row("diffguide", ours(), 2 * n)
    net_name = "transformer" if dit else "unet"
    net = getattr(pipe, net_name)
    if not dit:
        setattr(pipe, net_name, net.to(memory_format=torch.channels_last))
        row("diffguide channels_last", ours(), 2 * n)
    # the family reads pipe.<net> at call time, so swapping it in compiles diffguide's forward
    modes = (None, "reduce-overhead") if device.type == "cuda" else (None,)  # graphs need a GPU
    for mode in modes:
        label = "compile" if mode is None else "compile+graphs"
        torch._dynamo.reset()
        setattr(pipe, net_name, torch.compile(net, mode=mode, dynamic=False))
        row(f"diffguide {label}", ours(), 2 * n)
    ag = "ag:scale=5,threshold=0.99"
    ag_nfe = gp(prompt, guidance=ag, steps=n, height=size, width=size, num_images_per_prompt=batch,
                seed=list(range(batch)), output_type="latent", progress=False).nfe
    row(f"diffguide {label} + ag", ours(ag), ag_nfe)
    if dit:
        small = GuidedPipeline.from_pipe(build("dit_s", args.quick).to(device, dtype), progress=False)
        small.pipe.transformer = torch.compile(small.pipe.transformer, mode=mode, dynamic=False)
        row(f"diffguide {label} + stitch 0.4 (DiT-S/2)", ours(stitch=Stitching(small, 0.4)), 2 * n)
    setattr(pipe, net_name, net)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd15,sdxl,dit")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny configs, 2 steps, float32 if no GPU")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    if args.quick:
        args.steps, args.repeats = 2, 1
        if device.type == "cpu":
            dtypes = [torch.float32]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for model in args.models.split(","):
        for dtype in dtypes:
            for batch in (int(b) for b in args.batches.split(",")):
                rows += run_model(model, dtype, batch, args, device, peak)
    emit({"device": name, "peak_tflops": peak, "steps": args.steps, "cfg_scale": 5.0,
          "torch": torch.__version__, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
