"""``diffguide distill consistency|dmd2``: a few-step student from a guided teacher."""

from __future__ import annotations

import argparse
import re

from .generate import UsageError


def add_arguments(p) -> None:
    p.add_argument(
        "method",
        help="consistency, dmd2, scm (continuous-time consistency distillation), rcm (sCM with "
        "DMD's reverse divergence) or ict (improved consistency training from the data, no "
        "teacher)",
    )
    p.add_argument(
        "--teacher", default="builtin", help="diffusers folder or hub id (default: built-in)"
    )
    p.add_argument(
        "--out",
        required=True,
        help="run folder: checkpoint.pt, loss.jsonl, val/, student/ (and lora/)",
    )
    p.add_argument(
        "--guidance",
        default="cfg",
        help="the teacher's guidance spec (DMD2: the real score's); "
        "consistency + cfg draws the scale per example (LCM)",
    )
    p.add_argument(
        "--student-steps", type=int, default=4, help="the student's sampling steps (1-8)"
    )
    p.add_argument(
        "--max-steps", type=int, default=2000, help="training steps in all (a resume counts on)"
    )
    p.add_argument("--batch", type=int, default=32, help="examples per training step")
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (consistency), 1e-5 (dmd2)")
    p.add_argument(
        "--data",
        default="toy",
        help="'toy' (the built-in world) or a folder of images with metadata.jsonl",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="a new run into a folder with a previous run's files: replace them by name "
        "(config.json, loss.jsonl, val.jsonl, val/, the student's model files); never a checkpoint",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=0.95)
    p.add_argument("--skip", type=int, default=20, help="consistency: the teacher solver's step k")
    p.add_argument(
        "--scale-range",
        default="3,13",
        help="consistency + cfg: the per-example CFG scales (LO,HI, diffusers' convention)",
    )
    p.add_argument(
        "--solver", default="ddim", help="consistency: the teacher's ODE solver (a sampler spec)"
    )
    p.add_argument(
        "--fake-ratio",
        type=int,
        default=5,
        help="dmd2, rcm: fake-score updates per generator update",
    )
    p.add_argument("--fake-lr", type=float, default=None, help="dmd2: default --lr")
    p.add_argument("--gan", action="store_true", help="dmd2: add the GAN head against the data")
    p.add_argument(
        "--init",
        default="teacher",
        choices=("teacher", "random"),
        help="ict: start from --teacher's weights (default) or from random ones (the paper's)",
    )
    p.add_argument(
        "--ict-total",
        type=int,
        default=0,
        help="ict: the discretisation curriculum's length in steps (default: --max-steps)",
    )
    p.add_argument(
        "--ict-schedule",
        default="ict",
        choices=("ict", "ect"),
        help="ict: the paper's discrete curriculum, or ECT's continuous pairs (r = 0 at first: a "
        "diffusion loss from the teacher's weights)",
    )
    p.add_argument(
        "--ict-ect-stage",
        type=int,
        default=0,
        help="ict --ict-schedule ect: steps per stage, each halving t - r (default: max-steps / 8)",
    )
    p.add_argument(
        "--ict-caption-dropout",
        type=float,
        default=0.1,
        help="ict: the share of empty captions in training, so the student takes CFG (default 0.1)",
    )
    p.add_argument("--scm-warmup", type=int, default=10000, help="scm: tangent warm-up steps")
    p.add_argument(
        "--scm-derivative",
        default="secant",
        choices=("jvp", "finite_difference", "secant"),
        help="scm: the student's time derivative as the secant over --scm-secant-steps teacher "
        "timesteps either side (default: a teacher trained at integer timesteps is steep between "
        "them), by forward-mode AD, or a central difference",
    )
    p.add_argument(
        "--scm-secant-steps",
        type=int,
        default=8,
        help="scm: the secant's span, in the teacher's training timesteps either side (default 8: "
        "the built-in UNet's time embedding turns a radian per timestep)",
    )
    p.add_argument(
        "--scm-p-mean",
        type=float,
        default=0.2,
        help="scm: mean of log(sigma_d tan t) in training (SANA-Sprint's 0.2; the paper's ImageNet "
        "-0.8)",
    )
    p.add_argument(
        "--scm-start-share",
        type=float,
        default=0.1,
        help="scm: the share of training times at the sampler's start (the teacher's largest "
        "level)",
    )
    p.add_argument(
        "--scm-time",
        default="index",
        choices=("index", "dense"),
        help="scm: the student's time input, the teacher's own timestep (default; the student "
        "starts as the teacher) or dense sin t/(sin t + cos t) as SANA-Sprint, which the built-in "
        "teacher's time embedding hardly reads (docs/distillation.md)",
    )
    p.add_argument(
        "--scm-fit-steps",
        type=int,
        default=None,
        help="scm: first steps fitting the student to the guided teacher on its time input "
        "(default: 200 with --scm-time dense, 0 with index)",
    )
    p.add_argument(
        "--scm-weight-lr",
        type=float,
        default=1e-2,
        help="scm: the learning rate of the adaptive weight w(t) (its own parameter group)",
    )
    p.add_argument("--scm-p-std", type=float, default=1.6, help="scm: its standard deviation")
    p.add_argument(
        "--scm-prior-weight",
        action="store_true",
        help="scm: weight the loss by 1/(sigma_d tan t), as SANA-Sprint's training code does",
    )
    p.add_argument(
        "--ladd",
        action="store_true",
        help="scm: add latent adversarial distillation (heads on the frozen teacher's features, "
        "SANA-Sprint)",
    )
    p.add_argument(
        "--rcm-dmd-weight",
        type=float,
        default=1.0,
        help="rcm: the weight of the DMD term beside the sCM loss (default 1)",
    )
    p.add_argument(
        "--ladd-weight", type=float, default=0.5, help="scm --ladd: the adversarial term's weight"
    )
    p.add_argument(
        "--ladd-start-share",
        type=float,
        default=0.5,
        help="scm --ladd: the adversarial term judges the student's x0 from a fresh x_t, this "
        "share of its times at the sampler's start (SANA-Sprint's 0.5; 0: the sCM pass's x0, "
        "one student pass fewer)",
    )
    p.add_argument(
        "--ladd-misaligned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scm --ladd: the heads also see real images under other examples' captions as fakes "
        "(SANA-Sprint's misaligned pairs; default on)",
    )
    p.add_argument(
        "--clip",
        type=float,
        default=None,
        help="gradient-norm clipping of the student (default 1; dmd2 10; SANA-Sprint used 0.1)",
    )
    p.add_argument(
        "--lr-warmup",
        type=int,
        default=None,
        help="linear learning-rate warm-up steps (default: scm 100, others 0)",
    )
    p.add_argument(
        "--lr-decay",
        choices=("none", "cosine"),
        default="none",
        help="cosine: every learning rate falls to 0 at --max-steps (default none: constant)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="train rank-R LoRA adapters on a frozen copy of the teacher (LCM-LoRA) and write "
        "OUT/lora, which the teacher's pipeline loads with load_lora_weights, beside the merged "
        "student (default 0: train the whole network)",
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument(
        "--log-every",
        type=int,
        default=20,
        help="a loss.jsonl line every N steps (the mean since the last), and at step 1 and the "
        "run's last step",
    )
    p.add_argument(
        "--validate-every",
        type=int,
        default=0,
        help="validation grid and metrics every N steps (0: at the end only)",
    )
    p.add_argument(
        "--validate-n", type=int, default=2, help="validation images per prompt (default 2)"
    )
    p.add_argument(
        "--validate-prompts",
        type=int,
        default=0,
        help="validate on the first N toy prompts only (default 0: all)",
    )
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from ..distill import methods
    from ..distill.config import DistillConfig
    from ..distill.run import train
    from ..parallel import launched_rank

    try:
        method = methods.get(args.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not 1 <= args.student_steps <= 8:
        raise UsageError(f"--student-steps must be in 1..8, got {args.student_steps}")
    try:
        lo, hi = (float(v) for v in args.scale_range.split(","))
    except ValueError:
        raise UsageError(
            f"--scale-range must be two numbers LO,HI, got {args.scale_range!r}"
        ) from None
    lr = args.lr if args.lr is not None else method.default_lr
    cfg = DistillConfig(
        out=args.out,
        method=args.method,
        teacher=args.teacher,
        guidance=args.guidance,
        student_steps=args.student_steps,
        max_steps=args.max_steps,
        batch=args.batch,
        lr=lr,
        ema=args.ema,
        data=args.data,
        seed=args.seed,
        solver=args.solver,
        skip=args.skip,
        scale_min=lo,
        scale_max=hi,
        fake_ratio=args.fake_ratio,
        fake_lr=args.fake_lr,
        gan=args.gan,
        init=args.init,
        ict_total=args.ict_total,
        ict_caption_dropout=args.ict_caption_dropout,
        ict_schedule=args.ict_schedule,
        ict_ect_stage=args.ict_ect_stage,
        scm_warmup=args.scm_warmup,
        scm_derivative=args.scm_derivative,
        scm_secant_steps=args.scm_secant_steps,
        scm_p_mean=args.scm_p_mean,
        scm_p_std=args.scm_p_std,
        scm_start_share=args.scm_start_share,
        scm_time=args.scm_time,
        scm_fit_steps=args.scm_fit_steps,
        scm_weight_lr=args.scm_weight_lr,
        lr_warmup=args.lr_warmup,
        lr_decay=args.lr_decay,
        validate_n=args.validate_n,
        validate_prompts=args.validate_prompts,
        scm_prior_weight=args.scm_prior_weight,
        clip=args.clip,
        ladd=args.ladd,
        ladd_weight=args.ladd_weight,
        rcm_dmd_weight=args.rcm_dmd_weight,
        ladd_start_share=args.ladd_start_share,
        ladd_misaligned=args.ladd_misaligned,
        lora_rank=args.lora_rank,
        grad_accum=args.grad_accum,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        validate_every=args.validate_every,
        resume=args.resume,
    )
    try:
        cfg.check()
    except ValueError as e:  # "batch must be ..." -> "--batch must be ..."
        m = re.match(r"([a-z_]+) (must .*)", str(e))
        raise UsageError(f"--{m[1].replace('_', '-')} {m[2]}" if m else str(e)) from None
    # the libraries are quietened inside train, after its checks and its first line: importing
    # diffusers and transformers for that takes seconds
    folder = train(cfg, progress=not args.quiet, overwrite=args.overwrite, quiet=True)
    if launched_rank() == 0:  # one line, however many processes trained
        print(folder)
    return 0
