"""The toy world's training data: scenes rendered once and cached, captions redrawn every epoch.

Used by the built-in model's trainer (``pipelines.toy_model``) and the distillation trainer.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..files import atomic_write
from . import scenes


class SceneData:
    """The first ``n`` training scenes of the world with this seed, rendered once (uint8)."""

    def __init__(self, n: int, seed: int, cache: str | None = None):
        if cache and os.path.exists(cache):
            z = np.load(cache, allow_pickle=False)
            self.images = z["images"]
        else:
            self.images = np.stack(
                [(scenes.example(seed, i)[0] * 255).round().astype(np.uint8) for i in range(n)]
            )
            if cache:
                atomic_write(cache, lambda f: np.savez(f, images=self.images))
        self.n, self.seed = n, seed

    def batch(self, idx: np.ndarray, epoch: int, flip: np.ndarray) -> tuple[torch.Tensor, list]:
        imgs = self.images[idx].astype(np.float32) / 127.5 - 1
        imgs = np.where(flip[:, None, None, None], imgs[:, :, ::-1], imgs)
        caps = []
        for i in idx:  # the scene is recomputed from its seed (cheap), the caption drawn per epoch
            rng = scenes.scene_rng(self.seed, int(i))
            scene = scenes.random_scene(rng, train=True)
            caps.append(
                scenes.caption(
                    scene, np.random.Generator(np.random.PCG64([self.seed, int(i), epoch, 7]))
                )
            )
        return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2), caps
