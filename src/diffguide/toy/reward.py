"""An image-text scorer for the toy world (contrastive, CLIP-style): ReNO's default reward.

It is deliberately a different network from ``toy.evaluator`` (the metric of ``diffguide eval``):
a strided-conv + attention-pooling image tower and a word-level transformer text tower, trained
with a contrastive loss on captions, never on the evaluator's labels, so optimising the reward
cannot simply game the metric. The world is known, so the contrastive targets are exact: caption j
matches image i when the scene satisfies every attribute the caption states (an under-specified
caption such as "a circle" matches many images of a batch, not only its own).
Trained on the training split only (held-out colour-shape pairs never appear).
"""

from __future__ import annotations

import re
import time

import numpy as np
import torch
from torch import nn

from . import metrics, scenes, weights

DIM = 64
MAX_WORDS = 16
WORDS = ["<pad>", "<unk>", *scenes.vocabulary()]


def tokens(texts: list[str]) -> torch.Tensor:
    """Word ids [B, MAX_WORDS] (0 = padding); colour spellings are normalised as the world does."""
    index = {w: i for i, w in enumerate(WORDS)}
    out = torch.zeros(len(texts), MAX_WORDS, dtype=torch.long)
    for r, t in enumerate(texts):
        ws = [scenes.COLOUR_WORDS.get(w, w) for w in re.findall(r"[a-z]+", t.lower())][:MAX_WORDS]
        out[r, : len(ws)] = torch.tensor([index.get(w, 1) for w in ws], dtype=torch.long)
    return out


class Reward(nn.Module):
    """score(images in [0, 1], texts) = scale * cos(image embedding, text embedding)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, DIM, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(DIM, DIM, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(DIM, DIM, 3, padding=1),
        )
        self.image_pos = nn.Parameter(torch.zeros(1, 16, DIM))
        self.image_mix = nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.0, batch_first=True)
        self.pool = nn.Linear(DIM, 1)
        self.image_out = nn.Linear(DIM, DIM)
        self.embed = nn.Embedding(len(WORDS), DIM, padding_idx=0)
        self.text_pos = nn.Parameter(torch.zeros(1, MAX_WORDS, DIM))
        self.text_mix = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(DIM, 4, 2 * DIM, dropout=0.0, batch_first=True),
            2,
            enable_nested_tensor=False,
        )
        self.text_out = nn.Linear(DIM, DIM)
        self.log_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def image(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (
            scenes.SIZE,
            scenes.SIZE,
        ):  # larger renders are judged at the world's size
            x = nn.functional.interpolate(
                x,
                size=(scenes.SIZE, scenes.SIZE),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        h = self.stem(x * 2 - 1).flatten(2).transpose(1, 2) + self.image_pos
        h = self.image_mix(h)
        w = self.pool(h).softmax(1)
        return nn.functional.normalize(self.image_out((w * h).sum(1)), dim=-1)

    def text(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == 0
        h = self.text_mix(self.embed(ids) + self.text_pos, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        h = (h * keep).sum(1) / keep.sum(1).clamp_min(1)
        return nn.functional.normalize(self.text_out(h), dim=-1)

    def forward(self, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """One score per (image, text) pair: [B]."""
        ids = tokens(texts).to(images.device)
        return self.log_scale.exp() * (self.image(images.float()) * self.text(ids)).sum(-1)


def _pool(seed: int, n: int):
    imgs, caps, scs = [], [], []
    for i in range(n):
        img, cap, sc = scenes.example(seed, i, train=True)
        imgs.append(img)
        caps.append(cap)
        scs.append(sc)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, caps, scs


def matches(captions: list[str], scs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whether an image's scene satisfies everything a caption states, as a table over the distinct
    prompts and scene contents: (table [P, S], prompt id per caption, content id per scene)."""
    ps, ss = {}, {}
    pid = [ps.setdefault(scenes.parse_prompt(c), len(ps)) for c in captions]
    sid = [ss.setdefault((frozenset(s.pairs), s.background), len(ss)) for s in scs]
    table = torch.tensor(
        [[metrics.check(p, set(pairs), bg)["all"] for pairs, bg in ss] for p in ps]
    )
    return table, torch.tensor(pid), torch.tensor(sid)


def retrieval(model: Reward, seed: int = 54321, n: int = 500) -> float:
    """Fraction of fresh captions whose best-scoring image among n fresh images satisfies them."""
    x, caps, scs = _pool(seed, n)
    table, pid, sid = matches(caps, scs)
    ok = table[pid][:, sid]
    with torch.no_grad():
        sim = model.text(tokens(caps)) @ model.image(x).T
    return float(ok[torch.arange(n), sim.argmax(1)].float().mean())


def train(
    out: str,
    steps: int = 3000,
    batch_size: int = 256,
    seed: int = 2,
    pool: int = 30000,
    noise: float = 0.08,
    progress: bool = True,
) -> dict:
    """Multi-positive InfoNCE in both directions on a pool of training-split scenes, with flips and
    pixel noise; weights saved atomically to ``out`` (safetensors)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    t0 = time.time()
    px, caps, scs = _pool(seed, pool)
    ids = tokens(caps)
    table, pid, sid = matches(caps, scs)
    model = Reward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), disable=not progress, desc="reward"):
        idx = torch.randint(0, pool, (batch_size,), generator=g)
        x = weights.augment(px[idx], g, noise)
        ok = table[pid[idx]][:, sid[idx]].float()
        logits = model.log_scale.exp() * model.text(ids[idx]) @ model.image(x).T  # [texts, images]
        loss = (
            -(ok / ok.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
            - (ok.T / ok.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.log_scale.clamp_(max=float(np.log(100.0)))
    model.eval()
    acc = retrieval(model)
    weights.save(model, out)
    return {
        "steps": steps,
        "batch": batch_size,
        "pool": pool,
        "seconds": round(time.time() - t0, 1),
        "retrieval_accuracy": acc,
        "loss": loss.item(),
    }


def load(path: str | None = None) -> Reward:
    return weights.load(Reward(), path, "reward.safetensors", "reward").requires_grad_(False)


if __name__ == "__main__":
    weights.main(
        train, "train the toy-world reward model (ReNO's default reward)", steps=3000, seed=2
    )
