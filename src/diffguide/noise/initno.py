"""InitNO (Guo et al., CVPR 2024, arXiv 2404.04650): optimise the initial noise so that every
subject
token gets a strong cross-attention response and the subjects' self-attention maps do not overlap.

Scores from the conditional branch at the first time of the grid (the authors' default):
cross-attention response S_CA = max_k (1 - max of token k's smoothed, softmaxed map) (paper eq. 2)
and self-attention conflict S_SA = mean over subject pairs of sum(min(A_i, A_j)) / sum(A_i + A_j)
(eq. 4), taken as 0 while S_CA > 0.5 (as the authors' code does). The noise is z = mu + sigma * z0
with Adam on (mu, log sigma^2); after each step KL(N(mu, sigma^2) || N(0, I)) is pushed back below
its bound (eq. 6-7). Up to ``rounds`` rounds of ``iterations`` steps from fresh noise until both
scores pass their thresholds; otherwise the round with the lowest S_CA + S_SA is rerun for
``final_iterations`` steps from its starting noise.

Differences from the authors' pipeline: only the initial noise is optimised (their pipeline also
takes Attend-and-Excite latent steps during the first 25 sampling steps); their extra Otsu-mask
"clean" cross-attention term is not used; the KL inner loop is capped at ``kl_steps``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.registry import register
from .base import NoiseContext, NoiseOptimizer, positive

# A small part-of-speech heuristic (no tagger to download): function words and verbs end a noun
# phrase; its head is its last remaining word. Scene words and relation nouns ("the left of") are
# not subjects.
_SPLIT = {
    ",",
    ".",
    ";",
    "and",
    "or",
    "with",
    "of",
    "to",
    "beside",
    "near",
    "next",
    "on",
    "in",
    "at",
    "under",
    "over",
    "behind",
    "above",
    "below",
    "against",
    "inside",
    "by",
    "from",
    "into",
    "onto",
    "through",
    "across",
    "around",
    "between",
    "among",
    "beneath",
    "underneath",
    "atop",
    "toward",
    "towards",
    "while",
    "that",
    "which",
    "who",
    "where",
    "as",
    "for",
    "without",
    "like",
    "its",
    "their",
    "his",
    "her",
}
_VERBS = {
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "has",
    "have",
    "had",
    "does",
    "do",
    "can",
    "will",
    "sits",
    "sit",
    "stands",
    "stand",
    "rides",
    "ride",
    "holds",
    "hold",
    "eats",
    "eat",
    "jumps",
    "jump",
    "flies",
    "fly",
    "runs",
    "run",
    "looks",
    "look",
    "lies",
    "lie",
    "walks",
    "walk",
    "plays",
    "play",
    "wears",
    "wear",
    "swims",
    "swim",
    "sleeps",
    "sleep",
    "reads",
    "read",
    "drinks",
    "drink",
    "chases",
    "chase",
    "carries",
    "carry",
    "watches",
    "watch",
    "floats",
    "float",
    "hangs",
    "hang",
    "rests",
    "rest",
    "leans",
    "lean",
    "grows",
    "grow",
    "shines",
    "shine",
    "made",
    "covered",
    "filled",
}
_SKIP = {
    "a",
    "an",
    "the",
    "some",
    "two",
    "three",
    "four",
    "five",
    "small",
    "large",
    "big",
    "little",
    "one",
    "very",
    "this",
    "these",
    "those",
    "many",
    "several",
    "few",
    "each",
    "every",
    "tiny",
    "huge",
}
_SCENE = {
    "background",
    "backdrop",
    "scene",
    "photo",
    "photograph",
    "picture",
    "image",
    "painting",
    "drawing",
    "illustration",
    "render",
    "style",
    "view",
    "room",
    "sky",
    "ground",
    "floor",
    "wall",
    "art",
    "artwork",
    "sketch",
    "close",
    "closeup",
    "side",
    "left",
    "right",
    "top",
    "bottom",
    "front",
    "middle",
    "center",
    "centre",
    "corner",
    "edge",
    "day",
    "night",
    "sunset",
    "distance",
    "foreground",
    "detail",
}


_ING_NOUNS = {
    "painting",
    "building",
    "drawing",
    "ring",
    "king",
    "wing",
    "string",
    "ceiling",
    "clothing",
    "pudding",
    "earring",
    "wedding",
    "evening",
    "morning",
    "swing",
    "spring",
    "dumpling",
    "sibling",
    "duckling",
    "seedling",
    "sapling",
    "icing",
    "frosting",
    "lightning",
    "stocking",
    "sling",
}
_ED_NOUNS = {"bed", "shed", "sled", "red", "seed", "weed", "reed", "steed", "speed", "bread"}


def _verbal(word: str) -> bool:
    """A participle, gerund or adverb by its ending (sitting, tied, quickly), unless a known
    noun."""
    if word in _ING_NOUNS or word in _ED_NOUNS:
        return False
    return (
        (len(word) > 4 and word.endswith("ing"))
        or (len(word) > 3 and word.endswith("ed"))
        or (len(word) > 4 and word.endswith("ly"))
    )


def subjects_of(prompt: str) -> list[str]:
    """The head nouns of a prompt's noun phrases: "an astronaut riding a horse" -> astronaut, horse;
    "a cat sitting on a mat" -> cat, mat; "a red circle above a blue square" -> circle, square.
    Verbs and participles end a phrase (after a noun; before one, "a running dog", they describe
    it);
    scene words (background, photo) and relation nouns (the left of) are left out. A heuristic: pass
    ``subjects`` where it errs."""
    words = re.findall(r"[a-z]+|[,.;]", prompt.lower())
    out, phrase = [], []

    def close():
        head = [v for v in phrase if v not in _SKIP]
        if head and not _verbal(head[-1]) and head[-1] not in _SCENE and head[-1] not in out:
            out.append(head[-1])
        phrase.clear()

    for w in words + [","]:
        if w in _SPLIT or w in _VERBS:
            close()
        elif _verbal(w) and any(v not in _SKIP for v in phrase):
            close()  # "a cat sitting": the participle ends the cat's phrase
        elif (
            not _verbal(w) or phrase
        ):  # a participle alone after a verb ("is sitting") is no subject
            phrase.append(w)
    return out


def token_positions(
    ctx: NoiseContext, prompt: str, words: list[str]
) -> tuple[list[int], list[int]]:
    """(positions of the prompt's ordinary tokens, position of each word's first token among
    them)."""
    ids = list(ctx.tokenize(prompt))
    keep = [p for p, i in enumerate(ids) if i not in ctx.special]
    found = []
    for w in words:
        sub = [i for i in ctx.tokenize(w) if i not in ctx.special]
        hit = next(
            (
                k
                for k in range(len(keep) - len(sub) + 1)
                if sub and [ids[p] for p in keep[k : k + len(sub)]] == sub
            ),
            None,
        )
        if hit is None:
            raise ValueError(f"InitNO: subject {w!r} is not a word of the prompt {prompt!r}")
        found.append(hit)
    return keep, found


def smooth(m: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """The authors' 3x3 smoothing with reflected borders (InitNO's and Attend-and-Excite's
    GaussianSmoothing): weights exp(-((x - mean) / (2 sigma))^2), so exp(-x^2) at sigma 0.5,
    normalised."""
    g = torch.exp(-((torch.tensor([-1.0, 0.0, 1.0], device=m.device) / (2 * sigma)) ** 2))
    k = (g[:, None] * g[None, :]) / g.sum() ** 2
    return F.conv2d(F.pad(m[None, None], (1, 1, 1, 1), mode="reflect"), k[None, None].to(m.dtype))[
        0, 0
    ]


def scores(
    cross: torch.Tensor, self_: torch.Tensor, hw: tuple, keep: list[int] | None, subjects: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_CA, S_SA) from head- and layer-averaged maps: cross [h*w, T], self [h*w, h*w]. The token
    softmax runs over the columns ``keep`` (None: positions 1 .. T - 2 of the whole padded
    sequence, the authors' ``[:, :, 1:-1]``); ``subjects`` index those columns."""
    h, w = hw
    cols = (
        list(range(1, cross.shape[1] - 1))
        if keep is None
        else [p for p in keep if p < cross.shape[1]]
    )
    a = (cross[:, cols] * 100).softmax(-1)
    maps = [smooth(a[:, k].reshape(h, w)) for k in subjects]
    s_ca = torch.stack([1 - m.max() for m in maps]).max()
    picks = [smooth(self_[int(m.argmax())].reshape(h, w)) for m in maps]
    pairs = [(i, j) for i in range(len(picks)) for j in range(i + 1, len(picks))]
    s_sa = (
        torch.stack(
            [
                torch.minimum(picks[i], picks[j]).sum() / ((picks[i] + picks[j]).sum() + 1e-6)
                for i, j in pairs
            ]
        ).mean()
        if pairs
        else s_ca * 0
    )
    if s_ca > 0.5:
        s_sa = s_sa * 0
    return s_ca, s_sa


def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, averaged (the authors' normalisation)."""
    return -0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp())


@register("noise", "initno")
@dataclass(frozen=True)
class InitNO(NoiseOptimizer):
    """InitNO (Guo et al. 2024): initial noise with strong, non-overlapping subject attention."""

    subjects: str = ""  # "cat|dog"; empty: the prompt's nouns (subjects_of)
    iterations: int = 10
    rounds: int = 5
    final_iterations: int = 50
    lr: float = 1e-2
    tau_cross: float = 0.2
    tau_self: float = 0.3
    kl_bound: float = 1e-3
    kl_steps: int = 100
    tokens: str = (
        "padded"  # the token softmax: "padded" (the authors') or "prompt" (its own tokens only)
    )
    attention_steps: int = (
        50  # attention at the first time of this many steps of the model's grid; 0: the run's
    )
    needs = ("attention", "tokenize")

    def __post_init__(self):
        for k in ("iterations", "rounds", "final_iterations", "kl_steps"):
            positive(k, getattr(self, k), integer=True, zero=k != "rounds")
        for k in ("lr", "kl_bound"):
            positive(k, getattr(self, k))
        positive("attention_steps", self.attention_steps, integer=True, zero=True)
        if self.tokens not in ("padded", "prompt"):
            raise ValueError(f"tokens must be padded or prompt, got {self.tokens!r}")
        if not isinstance(self.subjects, str):
            raise ValueError(f"subjects must be words separated by '|', got {self.subjects!r}")

    def words(self, prompt: str) -> list[str]:
        words = [w.strip().lower() for w in self.subjects.split("|") if w.strip()] or subjects_of(
            prompt
        )
        if not words:
            raise ValueError(
                f"InitNO: no subject noun found in prompt {prompt!r}; name them with "
                "subjects=word|word"
            )
        return words

    def _run(self, ctx, i, z0, keep, subj, steps):
        """One optimisation from z0; (z, S_CA + S_SA ranking score, passed)."""
        mu = torch.zeros_like(z0, requires_grad=True)
        logvar = torch.zeros_like(z0, requires_grad=True)
        opt = torch.optim.Adam([logvar, mu], lr=self.lr, eps=1e-3)
        s_ca = s_sa = torch.tensor(math.inf)
        for _ in range(steps):
            cross, self_, hw = ctx.attention((z0 * (0.5 * logvar).exp() + mu) * ctx.scale, i)
            s_ca, s_sa = scores(cross, self_, hw, keep, subj)
            if s_ca < self.tau_cross and s_sa < self.tau_self:
                return (
                    (z0 * (0.5 * logvar).exp() + mu).detach(),
                    float((s_ca + s_sa).detach()),
                    True,
                )
            opt.zero_grad()
            (s_ca + s_sa).backward()
            ctx.counts["backward"] += 1
            opt.step()
            for _ in range(self.kl_steps):
                d = kl(mu, logvar)
                if d <= self.kl_bound:
                    break
                opt.zero_grad()
                d.backward()
                opt.step()
        s_ca, s_sa = (
            s_ca.detach(),
            s_sa.detach() + (1.0 if s_sa <= 1e-6 else 0.0),
        )  # the authors' ranking of gated rounds
        return (z0 * (0.5 * logvar).exp() + mu).detach(), float((s_ca + s_sa).detach()), False

    def optimise(self, ctx: NoiseContext, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        self.check(ctx)
        if self.iterations == 0:
            return x, {"passed": []}
        out, passed, final, chosen = [], [], [], []
        with torch.enable_grad():
            for i, prompt in enumerate(ctx.prompts):
                words = self.words(prompt)
                keep, subj = token_positions(ctx, prompt, words)
                if self.tokens == "padded":  # columns 1 .. T - 2: token position p is column p - 1
                    keep, subj = None, [keep[k] - 1 for k in subj]
                chosen.append(words)
                z0, tried = x[i : i + 1].detach().float() / ctx.scale, []
                for r in range(self.rounds):
                    z, score, ok = self._run(ctx, i, z0, keep, subj, self.iterations)
                    tried.append((score, r, z, z0))
                    if ok:
                        break
                    z0 = ctx.draw(i, r + 1).to(z0)
                if not ok:  # no round passed: the best round again, longer, from its own start
                    score, _, z, start = min(tried, key=lambda c: (c[0], c[1]))
                    if self.final_iterations:
                        z, score, ok = self._run(ctx, i, start, keep, subj, self.final_iterations)
                out.append(z)
                passed.append(ok)
                final.append(round(score, 4))
        return torch.cat(out).to(x.dtype) * ctx.scale, {
            "passed": passed,
            "score": final,
            "subjects": chosen,
        }
