"""DiT (class-conditional) and PixArt (T5 text) transformers."""

from __future__ import annotations

from typing import Sequence

import torch

from .base import TransformerFamily, _no_extra


class DiT(TransformerFamily):
    """DiTTransformer2DModel: class-conditional; the negative is the null class (num_classes)."""

    name = "dit"
    pipelines = ("DiTPipeline",)

    @property
    def net(self):
        return self.pipe.transformer

    @property
    def multiple(self) -> int:
        return self.factor * self.net.config.patch_size

    def labels(self, prompts: Sequence) -> list[int]:
        out = []
        names = {k.lower(): v for k, v in (getattr(self.pipe, "labels", None) or {}).items()}
        classes = self.net.config.num_embeds_ada_norm
        for p in prompts:
            if isinstance(p, str) and p.strip().lstrip("-").isdigit():
                p = int(p)
            if isinstance(p, str):
                if p.strip().lower() not in names:
                    raise ValueError(
                        f"unknown class label {p!r}; give a class index in 0..{classes - 1}"
                        + (" or a name from pipe.labels" if names else "")
                    )
                p = names[p.strip().lower()]
            if not 0 <= int(p) < classes:
                raise ValueError(f"class label {p} out of range 0..{classes - 1}")
            out.append(int(p))
        return out

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        _no_extra(self, extra)
        pos = torch.tensor(self.labels(prompts), device=device).repeat_interleave(n)
        null = self.net.config.num_embeds_ada_norm
        if negatives is None or all(q in (None, "") for q in negatives):
            neg = torch.full_like(pos, null)
        else:
            neg = torch.tensor(self.labels(negatives), device=device).repeat_interleave(n)
        return {"class": pos}, {"class": neg}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(
            x, timestep=tm, class_labels=cond["class"], return_dict=False
        )[0]


class PixArt(DiT):
    """PixArtTransformer2DModel with T5 text conditioning and an attention mask."""

    name = "pixart"
    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "PixArtSigmaPAGPipeline")

    def encode(self, prompts, negatives, n, device, negative=True, **extra):
        if prompts is not None:
            negatives = negatives or [""] * len(prompts)  # its encode_prompt has no None default
        pos, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            negative_prompt=negatives or "",
            num_images_per_prompt=n,
            device=device,
            clean_caption=False,
            **extra,
        )
        return {"text": pos, "mask": mask}, {"text": neg, "mask": neg_mask}

    def extra(self, cond, height, width):
        res = ratio = None
        if getattr(self.net, "use_additional_conditions", False):
            b, dt, dev = cond["text"].shape[0], cond["text"].dtype, cond["text"].device
            res = torch.tensor([[height, width]], dtype=dt, device=dev).expand(b, -1)
            ratio = torch.tensor([[height / width]], dtype=dt, device=dev).expand(b, -1)
        return {**cond, "resolution": res, "aspect_ratio": ratio}

    def forward(self, x, tm, cond, net=None):
        return (self.net if net is None else net)(
            x,
            encoder_hidden_states=cond["text"],
            encoder_attention_mask=cond["mask"],
            timestep=tm,
            added_cond_kwargs={
                "resolution": cond.get("resolution"),
                "aspect_ratio": cond.get("aspect_ratio"),
            },
            return_dict=False,
        )[0]
