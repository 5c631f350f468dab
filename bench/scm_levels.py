"""Where a TrigFlow student fails (issue 33): clean toy scenes noised to known TrigFlow levels, each
denoised in one step by the student and by its teacher (the built-in UNet). Per level: the x0
error, its cosine with the added noise (a consistency function's output carries none of it), and
the student's error with its time input set to the largest level's (a student that ignores its time
input scores the same). Then the teacher's smoothness in a continuous timestep index: the norm of
dF/dt (TrigFlow's F) by central differences from a hundredth of one index to about a hundred.
Prints JSON.

    python bench/scm_levels.py STUDENT_FOLDER [--n 16] [--out FILE]
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from _common import emit

SD = 0.5  # TrigFlow's sigma_d, as distill/scm.py
LEVELS = (0.6, 1.0, 1.3, 1.45, 1.55)  # TrigFlow t; 2-step sCM samples at pi/2 and 1.3


def load(folder):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
    net = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    path = os.path.join(folder, "diffguide.json")
    info = json.load(open(path)) if os.path.isfile(path) else {}
    return te, net, info


def scenes_batch(n):
    from diffguide.pipelines.toy_model import MAX_TOKENS, tokenizer
    from diffguide.toy import scenes

    ims, caps = zip(*[scenes.example(123, i)[:2] for i in range(n)])
    x0 = torch.tensor(np.stack(ims)).permute(0, 3, 1, 2).float()
    x0 = x0 * 2 - 1 if x0.min() >= 0 else x0
    tok = tokenizer()
    ids = tok(
        list(caps),
        padding="max_length",
        max_length=MAX_TOKENS,
        truncation=True,
        return_tensors="pt",
    )
    return x0, ids.input_ids


def level(t):
    """(alpha, sigma) of the VP level at TrigFlow t: ve = sigma_d tan t."""
    ve = SD * math.tan(t)
    return 1 / math.sqrt(1 + ve * ve), ve / math.sqrt(1 + ve * ve)


def index_of(a, ac):
    """The teacher's continuous timestep index at alpha a (its alphas_cumprod table)."""
    return float(np.interp(-a * a, -ac.numpy(), np.arange(len(ac))))


def x0_error(net, x, x0, z, a, s, time, kw):
    """(mean squared x0 error, cosine of the error with the noise) of a v-prediction UNet."""
    v = net(x, torch.full((x.shape[0],), time), **kw).sample
    err = (a * x - s * v - x0).flatten()
    return float(err.pow(2).mean()), float(
        torch.nn.functional.cosine_similarity(err, z.flatten(), 0)
    )


def levels_table(student_dir, n):
    from diffguide.core.denoiser import TrigFlowTime
    from diffguide.distill.methods import embed_scale
    from diffguide.pipelines.pipeline import builtin_path
    from diffguide.pipelines.toy_model import _alphas_cumprod

    x0, ids = scenes_batch(n)
    ac = _alphas_cumprod().double()
    (tte, tnet, _) = load(builtin_path("builtin"))
    ste, snet, info = load(builtin_path(student_dir))
    dense = info.get("time_input") == "trigflow"
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t_top = math.atan(math.sqrt(1 / float(ac[-1]) - 1) / SD)

    def student_time(a, s):
        return TrigFlowTime(SD)(a, s) if dense else index_of(a, ac)

    rows = []
    with torch.no_grad():
        tkw = {"encoder_hidden_states": tte(ids)[0]}
        skw = {"encoder_hidden_states": ste(ids)[0]}
        if snet.config.time_cond_proj_dim:  # a CFG-distilled student: its scale, embedded
            w = float(info.get("guidance_scale", 5.0))
            skw["timestep_cond"] = embed_scale(torch.full((n,), w - 1.0))
        for t in LEVELS:
            a, s = level(t)
            x = a * x0 + s * z
            mse_t, cos_t = x0_error(tnet, x, x0, z, a, s, index_of(a, ac), tkw)
            mse_s, cos_s = x0_error(snet, x, x0, z, a, s, student_time(a, s), skw)
            blind, _ = x0_error(snet, x, x0, z, a, s, student_time(*level(t_top)), skw)
            rows.append(
                {
                    "trigflow_t": t,
                    "ve": round(s / a, 3),
                    "teacher_index": round(index_of(a, ac), 1),
                    "teacher": {"x0_mse": mse_t, "noise_cosine": cos_t},
                    "student": {"x0_mse": mse_s, "noise_cosine": cos_s},
                    "student_at_top_time_input": {"x0_mse": blind, "ratio": blind / mse_s},
                }
            )
    return {"student": student_dir, "time_input": "dense" if dense else "index", "rows": rows}


def wiggle_table(n):
    """The teacher's TrigFlow F at fixed x_t, differenced over h in t (float64)."""
    from diffguide.pipelines.pipeline import builtin_path
    from diffguide.pipelines.toy_model import _alphas_cumprod

    x0, ids = scenes_batch(n)
    x0 = x0.double()
    ac = _alphas_cumprod().double()
    te, net, _ = load(builtin_path("builtin"))
    net = net.double()
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = []
    with torch.no_grad():
        kw = {"encoder_hidden_states": te(ids)[0].double()}

        def F(t, xt):
            a, s = level(t)
            x = a * xt / math.cos(t)
            c = index_of(a, ac)
            v = net(x, torch.full((n,), c, dtype=torch.float64), **kw).sample
            x0h, eps = a * x - s * v, s * x + a * v
            return math.cos(t) * eps - math.sin(t) * x0h / SD, c

        for t in LEVELS:
            xt = math.cos(t) * x0 + math.sin(t) * SD * z
            row = {"trigflow_t": t, "index": round(F(t, xt)[1], 2), "slopes": []}
            for h in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
                (fp, cp), (fm, cm) = F(t + h, xt), F(t - h, xt)
                norm = ((fp - fm) / (2 * h)).flatten(1).norm(dim=1).mean()
                row["slopes"].append({"h": h, "indices_spanned": cp - cm, "dF_dt": float(norm)})
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("student", help="a student folder of the built-in UNet (or builtin-fast)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="2 scenes (CI)")
    ap.add_argument("--out")
    args = ap.parse_args()
    n = 2 if args.quick else args.n
    emit(
        {**levels_table(args.student, n), "teacher_slopes": wiggle_table(min(n, 4))},
        args.out,
    )


if __name__ == "__main__":
    main()
