"""Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM's scheduler)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.registry import register
from ..core.sample import Sampler


@register("sampler", "consistency")
@dataclass(frozen=True)
class Consistency(Sampler):
    """Consistency models (Song et al. 2023, Alg. 1): x0 from the model, renoised with fresh noise,
    x' = a' x0 + s' z; the step onto data returns x0. Meant for consistency-distilled students."""

    s_noise: float = 1.0

    def step(self, denoise, x, st, state, noise):
        p = denoise(x, st.t)
        if st.last:
            return st.a_next * p.x0, state
        return st.a_next * p.x0 + (st.s_next * self.s_noise) * noise(x, st.t, st.t_next), state
