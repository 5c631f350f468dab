"""The built-in model on the toy world: adherence, Frechet distance, colour fidelity and time for
a table of guidance settings (and the companion model). Prints JSON, one row per setting.

    python bench/toy_eval.py [--n 8] [--steps 25] [--model builtin] [--out FILE]
"""
import argparse

from _common import emit

from diffguide.cli.evaluate import prompt_set
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines.pipeline import quiet_loading
from diffguide.toy import evaluator, metrics

SETTINGS = [("none", None), ("cfg", 1.5), ("cfg", 3.0), ("cfg", 5.0), ("cfg", 7.5)]


def run(gp, judge, guidance, scale, sampler, steps, n, seed=0):
    prompts = metrics.DEFAULT_PROMPTS
    g, s = gp.resolve(guidance, scale, sampler)
    images, ids, nfe, seconds = prompt_set(gp, prompts, n, seed, g, s, steps)
    res = metrics.evaluate(images, ids, prompts, judge)
    res.pop("adherence_by_prompt")
    return {"guidance": guidance, "scale": scale, "sampler": sampler, "steps": steps,
            "nfe_per_image": nfe, "seconds_per_image": round(seconds, 4), **res}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--models", default="builtin,builtin-small")
    ap.add_argument("--out")
    args = ap.parse_args()
    quiet_loading()
    judge = evaluator.load()
    rows = []
    for model in args.models.split(","):
        gp = GuidedPipeline.from_pretrained(model, progress=False)
        for guidance, scale in SETTINGS:
            rows.append({"model": model, **run(gp, judge, guidance, scale, args.sampler, args.steps, args.n)})
    emit({"prompts": len(metrics.DEFAULT_PROMPTS), "images_per_prompt": args.n, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
