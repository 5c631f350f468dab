"""A small CNN that reads a toy-world image: which (colour, shape) objects it shows and its
background.

In this world the objects of a scene have distinct colours, so the CNN answers, for each colour,
"which shape has it, if any" (a 6-way softmax per colour). That binds colour to shape directly;
independent yes/no outputs per colour-shape pair confuse the two objects of a scene. Trained on the
world's exact labels (held-out pairs included, so compositional generalisation can be measured),
with pixel noise so that imperfect generated images are still read. Its 32-d penultimate features
are what Frechet distance and diversity are computed on.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from . import scenes, weights

COLOURS = list(scenes.COLOURS)
SHAPES = ["none", *scenes.SHAPES]  # class 0: this colour is absent
BACKS = list(scenes.BACKGROUNDS)
FEATURES = 32


class Evaluator(nn.Module):
    def __init__(self):
        super().__init__()

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.GroupNorm(8, o),
                nn.SiLU(),
                nn.Conv2d(o, o, 3, padding=1),
                nn.GroupNorm(8, o),
                nn.SiLU(),
            )

        self.body = nn.Sequential(
            block(3, 16),
            nn.MaxPool2d(2),
            block(16, 32),
            nn.MaxPool2d(2),
            block(32, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.SiLU(),
            nn.Linear(128, FEATURES),
            nn.SiLU(),
        )
        self.shapes = nn.Linear(FEATURES, len(COLOURS) * len(SHAPES))
        self.background = nn.Linear(FEATURES, len(BACKS))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, 32, 32] in [0, 1]."""
        return self.body(x * 2 - 1)

    def forward(self, x: torch.Tensor):
        """(shape logits [B, colours, shapes + 1], background logits [B, 4], features [B, 32])"""
        f = self.features(x)
        return self.shapes(f).view(-1, len(COLOURS), len(SHAPES)), self.background(f), f


def labels(scene: scenes.Scene) -> tuple[np.ndarray, int]:
    """Per colour the index of its shape (0 = absent), and the background index."""
    y = np.zeros(len(COLOURS), dtype=np.int64)
    for c, s in scene.pairs:
        y[COLOURS.index(c)] = SHAPES.index(s)
    return y, BACKS.index(scene.background)


def batch(seed: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes start..start+n of the full world (held-out pairs included): images, pair and
    background labels."""
    imgs, ys, bs = [], [], []
    for i in range(start, start + n):
        sc = scenes.random_scene(scenes.scene_rng(seed, i), train=False)
        y, b = labels(sc)
        imgs.append(scenes.render(sc))
        ys.append(y)
        bs.append(b)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(ys)), torch.tensor(bs)


@torch.no_grad()
def read(model: Evaluator, x: torch.Tensor) -> tuple[list, list, torch.Tensor]:
    """Per image: the set of (colour, shape) pairs present and the background; and the features."""
    logits, bg, f = model(x)
    shapes = logits.argmax(-1).cpu().numpy()
    present = [{(COLOURS[c], SHAPES[k]) for c, k in enumerate(row) if k} for row in shapes]
    return present, [BACKS[k] for k in bg.argmax(1).tolist()], f


def accuracy(model: Evaluator, seed: int = 12345, n: int = 2000) -> float:
    """Exact-match accuracy (every pair and the background right) on fresh clean scenes."""
    model.eval()
    x, y, b = batch(seed, 0, n)
    present, backs, _ = read(model, x)
    truth = [{(COLOURS[c], SHAPES[k]) for c, k in enumerate(row) if k} for row in y.numpy()]
    ok = [p == t and bb == BACKS[k] for p, t, bb, k in zip(present, truth, backs, b.tolist())]
    return float(np.mean(ok))


def train(
    out: str,
    steps: int = 2000,
    batch_size: int = 128,
    seed: int = 1,
    pool: int = 30000,
    noise: float = 0.08,
    progress: bool = True,
) -> dict:
    """Train on a pool of rendered scenes with flips and pixel noise; save weights to ``out``
    (safetensors, written aside and renamed). Accuracy is measured on other, fresh scenes."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    t0 = time.time()
    px, py, pb = batch(seed, 0, pool)
    model = Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), disable=not progress, desc="evaluator"):
        idx = torch.randint(0, pool, (batch_size,), generator=g)
        x = weights.augment(px[idx], g, noise)
        logits, bg, _ = model(x)
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, len(SHAPES)), py[idx].reshape(-1)
        ) + nn.functional.cross_entropy(bg, pb[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    acc = accuracy(model)
    weights.save(model, out)
    return {
        "steps": steps,
        "batch": batch_size,
        "pool": pool,
        "seconds": round(time.time() - t0, 1),
        "held_out_exact_match": acc,
    }


def load(path: str | None = None) -> Evaluator:
    return weights.load(Evaluator(), path, "evaluator.safetensors", "evaluator")


if __name__ == "__main__":
    weights.main(train, "train the toy-world evaluator", steps=2000, seed=1)
