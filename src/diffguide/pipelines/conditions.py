"""The conditions stage: a request's prompts encoded once, with the model's embedded guidance, the
guidance method's own prompt sets, and the encodings a second model (T-Stitch's small one,
AutoGuidance's guide) reads with its own text encoder."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.guided import Guidance
from ..guidance.nag import NAG_NEGATIVE
from .families import ENCODE_LOCK


@dataclass
class Conditions:
    """The condition tree a run's guided denoiser reads (``tree``), the second models by role, and
    the notice of a prompt the text encoder cannot read whole."""

    tree: dict
    models: dict = field(default_factory=dict)
    notice: str | None = None


def truncation_notice(pipe, req) -> str | None:
    """A line naming prompts longer than the text encoder reads (it tokenises: one thread at a
    time)."""
    if req.has_embeds:
        return None
    with ENCODE_LOCK:
        return pipe.family.notice(list(req.prompts))


def _negative_texts(req) -> list | None:
    """All None stays None: SDXL then uses zero embeddings (force_zeros_for_empty_prompt)."""
    return (
        None
        if all(q is None for q in req.negatives)
        else ["" if q is None else q for q in req.negatives]
    )


def _reads_negative(g) -> bool:
    """A method that reads the negative prompt inside the conditional forward (NAG's attention)
    rather than in a branch of its own; a sum or a modulated method reads what its parts read."""
    parts = [*getattr(g, "parts", ()), getattr(g, "inner", None)]
    return bool(getattr(g, "reads_negative", False)) or any(
        _reads_negative(p) for p in parts if isinstance(p, Guidance)
    )


def _empty_for_nag(req) -> bool:
    """The method reads the negative inside its forward (NAG) and the call gives none: it reads the
    empty prompt's encoding, the authors' ``nag_negative_prompt = ""``, which is not what a branch
    without a negative reads on SDXL (zeros: force_zeros_for_empty_prompt)."""
    return (
        _reads_negative(req.guidance)
        and all(q is None for q in req.negatives)
        and "negative_prompt_embeds" not in req.text_extra
    )


def _main(pipe, req, device) -> tuple[dict | None, dict | None, dict | None]:
    """(pos, neg, NAG's own negative or None): NAG's negative is "neg" unless "neg" also feeds a
    branch (an unconditional one) and no negative prompt is given, where diffusers' negative (SDXL's
    zeros) stays the branch's and NAG's is the encoding of "" (``NAG_NEGATIVE``)."""
    fam = pipe.family
    if not fam.conditional:
        return None, None, None
    texts, own = _negative_texts(req), _empty_for_nag(req)
    if own and "neg" not in req.needed:  # "neg" is read by NAG alone: make it ""'s encoding
        texts, own = [""] * len(req.negatives), False
    prompts = None if req.has_embeds else list(req.prompts)
    with ENCODE_LOCK:
        pos, neg = fam.encode(
            prompts,
            texts,
            req.per_prompt,
            device,
            negative="neg" in req.needed or _reads_negative(req.guidance),
            **req.text_extra,
        )
        if own:
            nag = fam.encode(
                prompts, [""] * len(req.negatives), req.per_prompt, device, **req.text_extra
            )[1]
    conds = [pos, neg, nag if own else None]
    for i, c in enumerate(conds):
        if c is not None:
            c = fam.extra(c, req.height, req.width)
            if req.attention is not None:
                c = {**c, "attention": req.attention}
            conds[i] = embed(fam, c, req.embedded, req.batch)
    return tuple(conds)


def embed(fam, cond, value, rows):
    """The model's own guidance input, in a condition it is given (Flux.1-dev's guidance, an LCM
    w)."""
    return fam.embed_guidance(cond, value, rows) if value is not None and cond is not None else cond


def _prompt_sets(pipe, req, device) -> dict:
    """A guidance method's own prompt sets (ICG's stand-in prompts), encoded once."""
    out, fam = {}, pipe.family
    for name, texts in req.guidance.prompt_sets().items():
        if req.stitch is not None:
            raise ValueError("a guidance with its own prompt set cannot run with stitch yet")
        texts = pipe.caption_set() if texts is None else texts
        with ENCODE_LOCK:
            pool, _ = fam.encode(texts, [""] * len(texts), 1, device, negative=False)
        out[name] = embed(fam, fam.extra(pool, req.height, req.width), req.embedded, len(texts))
    return out


def _with_frame(fam, req, device, pos: dict, neg: dict | None) -> tuple[dict, dict | None]:
    """pos and neg with the first frame's conditions (image to video), encoded by ``fam``."""
    image, raw = req.frame
    with ENCODE_LOCK:
        frame = fam.frame_conditions(raw, image, req.batch, req.frames, device)
    return {**pos, **frame}, None if neg is None else {**neg, **frame}


def _companions(pipe, req) -> tuple[dict, dict]:
    """(models by role, their conditions): a second model reads its own encoding of the prompts,
    with its own embedded guidance input."""
    models, conds = {}, {}
    for key, other in (
        ("small", req.stitch.small if req.stitch is not None else None),
        ("guide", req.guide_model),
    ):
        if other is None:
            continue
        models[key] = other.denoiser
        if not pipe.family.conditional:
            continue
        with ENCODE_LOCK:
            sp, sn = other.family.encode(
                list(req.prompts),
                _negative_texts(req),
                req.per_prompt,
                other.device,
                negative="neg" in req.needed,
            )
        value = other.embedded_guidance if req.embedded is None else req.embedded
        fam = other.family
        if req.frame is not None and fam.first_frame:  # image to video: its own first frame
            sp, sn = _with_frame(fam, req, other.device, sp, sn)
        conds[f"pos@{key}"] = embed(fam, fam.extra(sp, req.height, req.width), value, req.batch)
        conds[f"neg@{key}"] = (
            embed(fam, fam.extra(sn, req.height, req.width), value, req.batch)
            if sn is not None
            else None
        )
    return models, conds


def encode(pipe, req) -> Conditions:
    """Every condition the run reads, encoded once per call."""
    device = pipe.device
    pos, neg, nag = _main(pipe, req, device)
    if req.frame is not None:  # image to video: every branch reads the first frame
        pos, neg = _with_frame(pipe.family, req, device, pos, neg)
    extra = _prompt_sets(pipe, req, device)
    if nag is not None:
        extra[NAG_NEGATIVE] = nag
    models, companion = _companions(pipe, req)
    return Conditions({"pos": pos, "neg": neg, "extra": {**extra, **companion}}, models)
