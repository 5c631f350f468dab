"""True CFG on today's transformer families: diffguide's GuidedPipeline against the stock diffusers
pipeline, time per image at equal NFE on random weights (no download).

FluxPipeline with ``true_cfg_scale`` runs the conditional and the negative branch as two separate
forwards per step; diffguide batches them into one. SanaPipeline already batches its CFG, so the
Sana row shows the loop alone. The transformers keep their published width (Flux.1: 24 heads x 128,
T5 width 4096, pooled CLIP 768; Sana-1.6B: 70 heads x 32, Gemma-2 width 2304) with fewer blocks
(--flux-blocks, --sana-blocks) so that a CPU can run them; text encoders and VAEs are tiny. Both
sides run under the same grad mode (inference_mode), decode with the same VAE, and must give the
same
image (the max difference is reported). Candidates alternate round by round after one warm-up each;
ratios are medians of the per-round ratios (diffguide / diffusers) with quartiles and extremes, in
wall time and in this process's CPU time. Prints JSON; --out writes it.

    python bench/families_true_cfg.py [--families flux sana] [--steps 4] [--repeats 7] [--out FILE]
"""

import argparse
import statistics

import torch

from _common import emit, interleaved, ratio_summary

from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm


def flux(blocks: int, single_blocks: int, heads: int):
    import diffusers

    torch.manual_seed(0)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=blocks,
        num_single_layers=single_blocks,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()
    tm._calm(tr, "proj_out")
    sch = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return diffusers.FluxPipeline(
        scheduler=sch,
        vae=tm.vae(1, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=tm.clip_text(2, hidden=768),
        tokenizer=tm.clip_tokenizer(77),
        text_encoder_2=tm.t5_text(3, d_model=4096),
        tokenizer_2=tm.t5_tokenizer(512),
        transformer=tr,
    )


def sana(blocks: int, heads: int):
    import diffusers
    from transformers import Gemma2Config, Gemma2Model

    # Sana-1.6B's cross-attention is 20 heads x 112 (= 70 x 32)
    cross_heads = (
        dict(num_cross_attention_heads=20, cross_attention_head_dim=112)
        if heads == 70
        else dict(num_cross_attention_heads=heads, cross_attention_head_dim=32)
    )
    tok = tm.gemma_tokenizer()
    torch.manual_seed(4)
    text = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tok),
            hidden_size=2304,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        )
    ).eval()
    tr = diffusers.SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=heads,
        attention_head_dim=32,
        num_layers=blocks,
        **cross_heads,
        cross_attention_dim=32 * heads,
        caption_channels=2304,
        mlp_ratio=2.5,
        sample_size=32,
        patch_size=1,
    ).eval()
    tm._calm(tr, "proj_out")
    ae = diffusers.AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(32, 64),
        decoder_block_out_channels=(32, 64),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        scaling_factor=0.41407,
    ).eval()
    sch = diffusers.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    return diffusers.SanaPipeline(
        tokenizer=tok, text_encoder=text, vae=ae, transformer=tr, scheduler=sch
    )


def case(name: str, pipe, stock_kw: dict, ours_kw: dict, nfe: int, repeats: int) -> dict:
    pipe.set_progress_bar_config(disable=True)
    gp = GuidedPipeline.from_pipe(pipe, progress=False)
    gp.family.max_sequence_length = stock_kw.get(
        "max_sequence_length", gp.family.max_sequence_length
    )
    calls = {"forwards": 0}
    net = gp.family.net
    net.register_forward_pre_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))

    @torch.inference_mode()
    def stock():
        return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **stock_kw).images

    def ours():
        return gp(seed=0, output_type="np", **ours_kw).images

    a = stock()
    stock_forwards, calls["forwards"] = calls["forwards"], 0
    b = ours()
    ours_forwards = calls["forwards"]
    rec = interleaved({"diffusers": stock, "diffguide": ours}, repeats)
    med = {k: {m: round(statistics.median(v), 4) for m, v in r.items()} for k, r in rec.items()}
    return {
        "family": name,
        "nfe_per_image": nfe,
        "network_calls_per_image": {"diffusers": stock_forwards, "diffguide": ours_forwards},
        "max_abs_image_difference": float(abs(a - b).max()),
        "median_seconds_per_image": med,
        "wall_diffguide_over_diffusers": ratio_summary(
            rec["diffguide"]["wall"], rec["diffusers"]["wall"]
        ),
        "cpu_diffguide_over_diffusers": ratio_summary(
            rec["diffguide"]["cpu"], rec["diffusers"]["cpu"]
        ),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=["flux", "sana"], choices=["flux", "sana"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--size", type=int, default=32, help="image side in pixels (the tiny VAEs halve it)"
    )
    ap.add_argument(
        "--text-tokens",
        type=int,
        default=128,
        help="Flux's T5 length (the pipeline's default is 512)",
    )
    ap.add_argument(
        "--flux-blocks", type=int, nargs=2, default=[1, 2], metavar=("DOUBLE", "SINGLE")
    )
    ap.add_argument("--flux-heads", type=int, default=24, help="24 x 128 is Flux.1's width")
    ap.add_argument("--sana-blocks", type=int, default=2)
    ap.add_argument("--sana-heads", type=int, default=70, help="70 x 32 is Sana-1.6B's width")
    ap.add_argument("--quick", action="store_true", help="narrow networks, 1 step, 1 round (CI)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats, args.flux_heads, args.sana_heads, args.text_tokens = (
            1,
            1,
            2,
            4,
            16,
        )
    from diffguide.pipelines.pipeline import quiet_loading

    quiet_loading()
    rows, n, s = [], args.steps, args.size
    prompt, negative = "a red circle on a blue square", "blurry"
    if "flux" in args.families:
        pipe = flux(*args.flux_blocks, args.flux_heads)
        rows.append(
            case(
                "flux",
                pipe,
                dict(
                    prompt=prompt,
                    negative_prompt=negative,
                    true_cfg_scale=4.0,
                    guidance_scale=3.5,
                    num_inference_steps=n,
                    height=s,
                    width=s,
                    max_sequence_length=args.text_tokens,
                ),
                dict(
                    prompt=prompt,
                    negative_prompt=negative,
                    guidance="cfg:scale=4",
                    embedded_guidance=3.5,
                    steps=n,
                    height=s,
                    width=s,
                ),
                2 * n,
                args.repeats,
            )
            | {
                "config": {
                    "double_blocks": args.flux_blocks[0],
                    "single_blocks": args.flux_blocks[1],
                    "heads": args.flux_heads,
                    "head_dim": 128,
                    "text_tokens": args.text_tokens,
                    "image_tokens": (s // 4) ** 2,
                }
            }
        )
        del pipe
    if "sana" in args.families:
        pipe = sana(args.sana_blocks, args.sana_heads)
        rows.append(
            case(
                "sana",
                pipe,
                dict(
                    prompt=prompt,
                    negative_prompt=negative,
                    guidance_scale=4.5,
                    num_inference_steps=n,
                    height=s,
                    width=s,
                    use_resolution_binning=False,
                ),
                dict(
                    prompt=prompt,
                    negative_prompt=negative,
                    guidance="cfg:scale=4.5",
                    steps=n,
                    sampler="dpmpp_2m",
                    height=s,
                    width=s,
                ),
                2 * n,
                args.repeats,
            )
            | {
                "config": {
                    "blocks": args.sana_blocks,
                    "heads": args.sana_heads,
                    "head_dim": 32,
                    "image_tokens": (s // 2) ** 2,
                }
            }
        )
    emit(
        {
            "device": "cpu",
            "dtype": "float32",
            "threads": torch.get_num_threads(),
            "steps": n,
            "repeats": args.repeats,
            "image": s,
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
