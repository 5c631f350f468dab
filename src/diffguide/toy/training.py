"""The built-in models' training loop (on the toy world, EMA, resumable bit for bit): torch and
accelerate only; the architecture, its loss and its export come from the caller
(``pipelines.toy_model``: a v-prediction UNet; ``pipelines.toy_mmdit``: a flow-matching MMDiT)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..files import atomic_write, trim_log
from .data import SceneData


@dataclass
class TrainConfig:
    out: str
    size: str = "main"
    arch: str = "unet"  # the caller's model module (recorded so a resume cannot mix them)
    steps: int = 20000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_snr: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 off; VP models only
    ema: float = 0.999
    dropout: float = 0.1
    seed: int = 0
    dataset: int = 50000  # distinct scenes, rendered once; captions are redrawn every epoch
    checkpoint_every: int = 500
    log_every: int = 50
    decay_from: int | None = None  # from this step, a half cosine to 0 at `steps` (None: constant)
    teacher: str | None = None  # a v-prediction UNet folder whose x0 estimates are the targets


def rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate at ``step``: a linear warm-up, then constant, or (``decay_from``) a half
    cosine from there to 0 at ``cfg.steps``; from the step alone, so a resume repeats it."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.decay_from is not None:
        lr *= cosine_decay(step, cfg.decay_from, cfg.steps)
    return lr


def cosine_decay(step: int, start: int, end: int) -> float:
    """1 until ``start``, then a half cosine to 0 at ``end`` (and 0 after): a rate's factor."""
    done = min(max(step - start, 0) / (end - start), 1.0)
    return 0.5 * (1 + math.cos(math.pi * done))


def train(cfg: TrainConfig, model, progress: bool = True) -> str:
    """Train (or resume) a toy model; returns the exported folder ``cfg.out/model``. ``model``
    defines the architecture (``pipelines.toy_model``): ``tokenizer()``, ``text_encoder(vocab)``,
    ``network(size)``, ``condition(text_encoder, ids)`` (the network's text keywords),
    ``loss(net, x0, cond, g, cfg)`` (per example; draws its times and noise from ``g``),
    ``export(net, text_encoder, tokenizer, folder)`` and ``MAX_TOKENS``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if cfg.teacher and not hasattr(model, "UNetTeacher"):
        raise ValueError(f"a teacher gives a flow model's targets; arch {cfg.arch!r} takes none")
    os.makedirs(cfg.out, exist_ok=True)
    acc = Accelerator()
    torch.manual_seed(cfg.seed)
    tok = model.tokenizer()
    te, net = model.text_encoder(len(tok)), model.network(cfg.size)
    ema_te, ema_net = model.text_encoder(len(tok)), model.network(cfg.size)
    ema_te.load_state_dict(te.state_dict())
    ema_net.load_state_dict(net.state_dict())
    for m in (ema_te, ema_net):
        m.requires_grad_(False).eval()
    params = list(net.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    step = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        old = {"arch": "unet", **state["config"]}  # runs before the MMDiT were all UNets
        if (old["arch"], old["size"], old["seed"]) != (cfg.arch, cfg.size, cfg.seed):
            raise ValueError(
                f"{ckpt} was trained with arch {old['arch']!r}, size {old['size']!r}, seed "
                f"{old['seed']}; resume with the same settings"
            )
        for m, k in (  # the network's keys are "unet" whatever it is (they were named first)
            (net, "unet"),
            (te, "text"),
            (ema_net, "ema_unet"),
            (ema_te, "ema_text"),
            (opt, "opt"),
        ):
            m.load_state_dict(state[k])
        step = state["step"]
        if old.get("teacher") != cfg.teacher:  # allowed (a run may switch), never silent
            print(
                f"train-toy: {ckpt} (step {step}) was trained with teacher {old.get('teacher')!r}; "
                f"going on with {cfg.teacher!r}",
                file=sys.stderr,
            )
        trim_log(os.path.join(cfg.out, "loss.jsonl"), step)  # steps after it run again
    net, te, opt = acc.prepare(net, te, opt)
    teacher = model.UNetTeacher(cfg.teacher, acc.device) if cfg.teacher else None
    ema_net.to(acc.device)
    ema_te.to(acc.device)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)

    data = SceneData(
        cfg.dataset, cfg.seed, os.path.join(cfg.out, f"scenes_{cfg.seed}_{cfg.dataset}.npz")
    )
    log = open(os.path.join(cfg.out, "loss.jsonl"), "a")
    bar = tqdm(
        total=cfg.steps,
        initial=step,
        disable=not progress or not acc.is_main_process,
        desc=f"train-toy {cfg.size}",
    )
    running, t0 = [], time.time()
    while step < cfg.steps:
        # everything random about this step comes from (seed, step): resuming repeats it exactly
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        per_epoch = cfg.dataset // cfg.batch
        epoch, k = divmod(step, per_epoch)
        order = np.random.Generator(np.random.PCG64([cfg.seed, epoch, 1])).permutation(cfg.dataset)
        idx = order[k * cfg.batch : (k + 1) * cfg.batch]
        flip = torch.rand(cfg.batch, generator=g).numpy() < 0.5
        x0, caps = data.batch(idx, epoch, flip)
        drop = torch.rand(cfg.batch, generator=g) < cfg.dropout
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        ids = tok(
            caps,
            padding="max_length",
            max_length=model.MAX_TOKENS,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(acc.device)
        lr = rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        extra = {} if teacher is None else {"teacher": teacher.given(ids)}
        loss = model.loss(net, x0.to(acc.device), model.condition(te, ids), g, cfg, **extra)
        loss = loss.mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for ema, live in ((ema_net, net), (ema_te, te)):
                for pe, pl in zip(ema.parameters(), acc.unwrap_model(live).parameters()):
                    pe.lerp_(pl.detach(), 1 - decay)
        step += 1
        running.append(loss.item())
        bar.update(1)
        if step % cfg.log_every == 0 and acc.is_main_process:
            rec = {
                "step": step,
                "loss": float(np.mean(running)),
                "lr": lr,
                "seconds": round(time.time() - t0, 2),
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            running = []
        if (step % cfg.checkpoint_every == 0 or step == cfg.steps) and acc.is_main_process:
            state = {
                "unet": acc.unwrap_model(net).state_dict(),
                "text": acc.unwrap_model(te).state_dict(),
                "ema_unet": ema_net.state_dict(),
                "ema_text": ema_te.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "config": asdict(cfg),
            }
            atomic_write(ckpt, lambda f: torch.save(state, f))
    bar.close()
    log.close()
    folder = os.path.join(cfg.out, "model")
    if acc.is_main_process:
        model.export(ema_net, ema_te, tok, folder)
    return folder
