"""Initial-noise optimisation on the built-in world: InitNO on the teacher's two-object prompts
(dpmpp_2m, 25 steps, CFG) and ReNO on a one-step student (the toy reward), each with and without,
and the extra NFE, backward passes and seconds per image.

    python bench/noise.py [--n 4] [--student builtin-fast] [--out bench/results/noise.json]
        [--md bench/results/noise.md]
"""

import argparse
import os

from _common import emit, scored, toy_setup

from diffguide.toy import metrics, scenes

KEYS = (
    "nfe_per_image",
    "noise_nfe_per_image",
    "noise_backward_per_image",
    "seconds_per_image",
    "noise_seconds_per_image",
    "adherence",
    "adherence_by_group",
    "frechet_distance",
    "colour_error",
)


def table(rows) -> str:
    head = (
        "| run | noise optimiser | NFE (sampling) | extra NFE | extra backward | s/image | extra "
        "s/image | adherence | single | two | FD | colour error "
        "|\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "".join(
        f"| {r['run']} | {r['noise'] or '-'} | {r['nfe_per_image']:g} | "
        f"{r.get('noise_nfe_per_image', 0):.1f} | {r.get('noise_backward_per_image', 0):.1f} | "
        f"{r['seconds_per_image']:.3f} | {r.get('noise_seconds_per_image', 0):.3f} | "
        f"{r['adherence']:.3f} | {_num(r['adherence_by_group'].get('single'))} | "
        f"{_num(r['adherence_by_group'].get('two'))} | {r['frechet_distance']:.1f} | "
        f"{_num(r['colour_error'])} |\n"
        for r in rows
    )


def _num(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--teacher", default="builtin")
    ap.add_argument("--guidance", default="cfg:scale=5")
    ap.add_argument("--student", default="builtin-fast")
    ap.add_argument("--student-steps", type=int, default=1)
    ap.add_argument("--initno", default="initno")
    ap.add_argument("--reno", default="reno")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: initno, reno")
    ap.add_argument("--quick", action="store_true", help="1 image, 2 prompts, tiny budgets (CI)")
    ap.add_argument("--out")
    ap.add_argument("--md")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    judge, (teacher, student), prompts = toy_setup([args.teacher, args.student], args.quick)
    two = [p for p in metrics.DEFAULT_PROMPTS if len(scenes.parse_prompt(p).objects) == 2]
    steps = 25
    if args.quick:
        args.n, steps, two = 1, 3, two[:2]
        args.initno, args.reno = (
            "initno:iterations=2,rounds=1,final_iterations=1",
            "reno:iterations=2",
        )
    rows = []
    runs = []
    if "initno" not in skip:
        g, s = teacher.resolve(args.guidance, None, "dpmpp_2m")
        runs += [
            ("teacher, two-object prompts", teacher, two, g, s, steps, None),
            ("teacher, two-object prompts", teacher, two, g, s, steps, args.initno),
        ]
    if "reno" not in skip:
        g, s = student.resolve("none", None, None)
        runs += [
            (
                f"student, {args.student_steps} step",
                student,
                prompts,
                g,
                s,
                args.student_steps,
                None,
            ),
            (
                f"student, {args.student_steps} step",
                student,
                prompts,
                g,
                s,
                args.student_steps,
                args.reno,
            ),
        ]
    for name, gp, ps, g, s, n_steps, noise in runs:
        res = scored(gp, judge, ps, args.n, g, s, n_steps, noise=noise)
        rows.append({"run": name, "noise": noise, **{k: res[k] for k in KEYS if k in res}})
        print(rows[-1], flush=True)
    emit(
        {
            "teacher": args.teacher,
            "guidance": args.guidance,
            "student": args.student,
            "images_per_prompt": args.n,
            "rows": rows,
        },
        args.out,
    )
    if args.md:
        with open(args.md + ".tmp", "w") as f:
            f.write(table(rows))
        os.replace(args.md + ".tmp", args.md)


if __name__ == "__main__":
    main()
