"""The student as a diffusers folder with its own defaults (``diffguide.json``), and the validation
grid and metrics drawn from it during a run."""

from __future__ import annotations

import json
import os
import shutil

from ..files import atomic_write, save_model


def student_pipe(method, net):
    """The teacher's pipeline with the student network ``net`` and the method's scheduler for it:
    LCMScheduler on the student's training grid where it has LCM's boundary, else the teacher's own
    (``Method.student_scheduler``; the pipeline class is the family's ``student_pipeline``)."""
    return method.family.student_pipeline(net.eval(), method.student_scheduler())


def export(method, net, folder: str) -> str:
    """Write the student folder (aside, then renamed) with ``diffguide.json`` giving its default
    steps. A LoRA student's adapters are merged into its weights: the folder loads as any other."""
    from .methods import merged

    cfg = method.cfg
    pipe = student_pipe(method, merged(net))
    meta = {
        "steps": cfg.student_steps,
        "sampler": "consistency",
        "guidance": "none",
        "method": method.name,
        "teacher": cfg.teacher,
        "teacher_guidance": cfg.guidance,
        **method.student_grid(),
    }
    if getattr(
        net.config, "time_cond_proj_dim", None
    ):  # the scale the student is sampled at by default
        meta["guidance_scale"] = default_scale(cfg)
    return save_model(pipe, folder, {"diffguide.json": meta})


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, what load_lora_weights looks for


def export_lora(method, net, folder: str) -> str | None:
    """A LoRA student's adapters as diffusers' LoRA file in ``folder``, saved by the teacher's
    pipeline class so that its ``load_lora_weights(folder)`` puts them on the teacher's network
    (written aside, then moved in by name). A whole student has none: a LoRA file left in
    ``folder`` by an earlier run (``--overwrite``) is removed, as it is not this run's."""
    from .methods import has_lora

    path = os.path.join(folder, LORA_FILE)
    if not has_lora(net):
        if os.path.isfile(path):
            os.remove(path)
        return None
    from peft.utils import get_peft_model_state_dict

    # peft's own key names, as diffusers' LCM-LoRA script saves them: diffusers'
    # convert_state_dict_to_diffusers renames only the attention projections' keys (to_q.lora.down)
    # and its loader then silently drops those of a file mixing both namings (a test checks this)
    layers = get_peft_model_state_dict(net)
    tmp = folder.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    save = type(method.teacher.pipe).save_lora_weights
    save(tmp, **{f"{method.family.component}_lora_layers": layers}, safe_serialization=True)
    os.makedirs(folder, exist_ok=True)
    os.replace(os.path.join(tmp, LORA_FILE), path)
    shutil.rmtree(tmp)
    return folder


def default_scale(cfg) -> float:
    """A scale-embedding student's default, the scale it is compared with its teacher at: the CFG
    spec's scale (``cfg`` alone: CFG's default 5) when inside the trained range, else the middle of
    the range."""
    from ..core.registry import parse_spec

    w = getattr(parse_spec("guidance", cfg.guidance), "scale", None)
    return (
        float(w)
        if w is not None and cfg.scale_min <= w <= cfg.scale_max
        else (cfg.scale_min + cfg.scale_max) / 2
    )


def validate(method, net, step: int) -> dict | None:
    """Validation at ``step``: a grid of the student's samples (``val/step_N.png``) and, for a
    toy-world
    teacher, ``diffguide eval`` metrics at the student's steps (appended to ``val.jsonl``)."""
    from ..evaluate import grid, prompt_set
    from ..pipelines import GuidedPipeline
    from ..toy import evaluator, metrics

    cfg, teacher = method.cfg, method.teacher
    was = net.training
    gp = GuidedPipeline.from_pipe(student_pipe(method, net), progress=False)
    gp.set_defaults(
        {"guidance_scale": default_scale(cfg), "sampler": "consistency", **method.student_grid()}
    )
    try:
        # a class-conditional teacher (DiT) is shown its first classes instead of the toy prompts
        prompts = list(metrics.DEFAULT_PROMPTS) if teacher.family.name != "dit" else list(range(4))
        prompts = prompts[: cfg.validate_prompts or None]  # --validate-prompts: the first N
        images, ids, nfe, seconds = prompt_set(
            gp, prompts, cfg.validate_n, 0, "none", None, cfg.student_steps
        )
        os.makedirs(os.path.join(cfg.out, "val"), exist_ok=True)
        img = grid([images[ids == k] for k in range(len(prompts))], [str(p) for p in prompts])
        atomic_write(
            os.path.join(cfg.out, "val", f"step_{step}.png"), lambda f: img.save(f, format="PNG")
        )
        if not data_is_toy(teacher):
            return None
        res = metrics.evaluate(images, ids, prompts, evaluator.load())
        res.pop("adherence_by_prompt", None)
        rec = {
            "step": step,
            "steps": cfg.student_steps,
            "nfe_per_image": nfe,
            "seconds_per_image": round(seconds, 4),
            **res,
        }
        with open(os.path.join(cfg.out, "val.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec
    finally:
        net.train(was)


def data_is_toy(teacher) -> bool:
    """Whether the teacher draws the toy world (32x32 pixels, the built-in tokenizer's
    vocabulary)."""
    fam = teacher.family
    return fam.default_size == 32 and fam.factor == 1 and getattr(teacher.pipe, "vae", None) is None
