"""The built-in model's training loop (v-prediction on the toy world, EMA, resumable bit for bit):
torch and accelerate only; the architecture and its export come from the caller
(``pipelines.toy_model``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..core.schedule import VPSchedule
from ..files import atomic_write
from .data import SceneData


@dataclass
class TrainConfig:
    out: str
    size: str = "main"
    steps: int = 20000
    batch: int = 64
    lr: float = 1e-3
    warmup: int = 200
    min_snr: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0 turns it off
    ema: float = 0.999
    dropout: float = 0.1
    seed: int = 0
    dataset: int = 50000  # distinct scenes, rendered once; captions are redrawn every epoch
    checkpoint_every: int = 500
    log_every: int = 50


def train(cfg: TrainConfig, model, progress: bool = True) -> str:
    """Train (or resume) a toy model; returns the exported folder ``cfg.out/model``. ``model``
    defines the architecture (``pipelines.toy_model``): ``tokenizer()``, ``text_encoder(vocab)``,
    ``unet(size)``, ``export(net, text_encoder, tokenizer, folder)``, ``SCHEDULE`` and
    ``MAX_TOKENS``."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    os.makedirs(cfg.out, exist_ok=True)
    acc = Accelerator()
    torch.manual_seed(cfg.seed)
    tok = model.tokenizer()
    te, net = model.text_encoder(len(tok)), model.unet(cfg.size)
    ema_te, ema_net = model.text_encoder(len(tok)), model.unet(cfg.size)
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
        if state["config"]["size"] != cfg.size or state["config"]["seed"] != cfg.seed:
            raise ValueError(
                f"{ckpt} was trained with size {state['config']['size']!r}, seed "
                f"{state['config']['seed']}; resume with the same settings"
            )
        for m, k in (
            (net, "unet"),
            (te, "text"),
            (ema_net, "ema_unet"),
            (ema_te, "ema_text"),
            (opt, "opt"),
        ):
            m.load_state_dict(state[k])
        step = state["step"]
    net, te, opt = acc.prepare(net, te, opt)
    ema_net.to(acc.device)
    ema_te.to(acc.device)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)

    data = SceneData(
        cfg.dataset, cfg.seed, os.path.join(cfg.out, f"scenes_{cfg.seed}_{cfg.dataset}.npz")
    )
    ac = VPSchedule.from_betas(
        **{k: v for k, v in model.SCHEDULE.items() if k != "prediction_type"}
    ).alphas_cumprod
    ac = ac.float().to(acc.device)
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
        t = torch.randint(0, len(ac), (cfg.batch,), generator=g).to(acc.device)
        eps = torch.randn(x0.shape, generator=g).to(acc.device)
        x0 = x0.to(acc.device)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        out = net(a * x0 + s * eps, t, encoder_hidden_states=te(ids)[0]).sample
        err = (out.float() - (a * eps - s * x0)).pow(2).mean(dim=(1, 2, 3))  # v = a eps - s x0
        if cfg.min_snr > 0:  # in v terms the Min-SNR weight is min(snr, gamma) / (snr + 1)
            snr = ac[t] / (1 - ac[t])
            err = err * snr.clamp(max=cfg.min_snr) / (snr + 1)
        loss = err.mean()
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
