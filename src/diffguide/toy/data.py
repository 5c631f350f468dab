"""The toy world's training data: scenes rendered once (all up front into a cache file, or each
as it is first asked for), captions redrawn every epoch.

Used by the built-in model's trainer (``pipelines.toy_model``) and the distillation trainer.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..files import atomic_write
from . import scenes


class SceneData:
    """The first ``n`` training scenes of the world with this seed (uint8). With a ``cache`` file
    all are rendered at once (or loaded) and saved; without one each is rendered the first time a
    batch asks for it and kept, so training starts at once instead of after n renders."""

    def __init__(self, n: int, seed: int, cache: str | None = None):
        self.n, self.seed = n, seed
        self.images, self._kept = None, {}
        if cache and os.path.exists(cache):
            z = np.load(cache, allow_pickle=False)
            self.images = z["images"]
        elif cache:
            self.images = np.stack([self.render(i) for i in range(n)])
            atomic_write(cache, lambda f: np.savez(f, images=self.images))

    def render(self, i: int) -> np.ndarray:
        """Scene ``i`` as uint8 HWC (the same pixels whether rendered now or cached)."""
        return (scenes.example(self.seed, i)[0] * 255).round().astype(np.uint8)

    def image(self, i: int) -> np.ndarray:
        if self.images is not None:
            return self.images[i]
        if i not in self._kept:
            self._kept[i] = self.render(i)
        return self._kept[i]

    def batch(self, idx: np.ndarray, epoch: int, flip: np.ndarray) -> tuple[torch.Tensor, list]:
        imgs = np.stack([self.image(int(i)) for i in idx]).astype(np.float32) / 127.5 - 1
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
