"""No silent bad image, no lost file: the non-finite guard, exclusive and atomic outputs, metadata
that A1111's parser reads, --from-png, unconditional models, and bad input as one line and exit
2."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import diffguide as dg
from diffguide.cli.main import main
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.images import Outputs, parameters_text, read_metadata


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "diffguide", *args], capture_output=True, text=True, cwd=cwd
    )


def one_line_error(res):
    lines = res.stderr.strip().splitlines()
    return (
        res.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("diffguide: error:")
        and "Traceback" not in res.stderr
    )


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("sd") / "m"), "sd")


# -- the non-finite guard --------------------------------------------------------------------------


def test_nan_run_exits_2_and_writes_nothing(tmp_path):
    res = cli(
        "generate",
        "a red circle",
        "--scale",
        "1e30",
        "--steps",
        "6",
        "--quiet",
        "-o",
        str(tmp_path / "o.png"),
    )
    assert one_line_error(res), res.stderr
    assert re.search(r"NaN or inf at step \d+ of 6", res.stderr) and "cfg:scale=1e+30" in res.stderr
    assert "lower it" in res.stderr
    assert os.listdir(tmp_path) == []


def test_nan_in_python_raises_unless_asked_not_to():
    gp = GuidedPipeline.from_pretrained("builtin", progress=False)
    with pytest.raises(dg.NonFiniteError) as e:
        gp("a red circle", guidance_scale=1e30, steps=4, seed=0, output_type="np")
    assert isinstance(e.value, ValueError) and e.value.where == "sampling" and e.value.steps == 4
    assert 0 <= e.value.step < 4
    out = gp(
        "a red circle", guidance_scale=1e30, steps=4, seed=0, output_type="np", check_finite=False
    )
    assert np.isnan(out.images).any()


def test_first_bad_step_is_named_exactly():
    """The flag is kept on the device every step and read back only now and then: still exact."""
    sched = dg.VPSchedule.from_betas()
    gm = dg.GaussianMixture.ring(sched)
    calls = {"n": 0}

    def denoise(x, t):
        calls["n"] += 1
        p = gm(x, t, torch.zeros(x.shape[0], dtype=torch.long))
        return dg.Pred(p.x0 * (float("nan") if calls["n"] == 11 else 1.0), p.eps)

    denoise.schedule = sched
    ts = dg.timesteps(sched, 20)
    with pytest.raises(dg.NonFiniteError, match=r"at step 11 of 20") as e:
        dg.sample(denoise, "euler", ts, torch.randn(4, 2) * float(sched.sigma(ts[0])))
    assert e.value.step == 10


def test_nan_from_the_vae_names_the_vae_and_the_fix(sd):
    gp = GuidedPipeline.from_pretrained(sd, progress=False)
    decode = gp.pipe.vae.decode
    gp.pipe.vae.decode = lambda z, **kw: (decode(z, **kw)[0] * float("nan"),)
    with pytest.raises(
        dg.NonFiniteError, match=r"decoding produced NaN pixels.*VAE.*--vae-dtype float32"
    ) as e:
        gp("a red circle", steps=2, seed=0, output_type="np")
    assert e.value.where == "decoding"


def test_vae_dtype_option(sd):
    gp = GuidedPipeline.from_pretrained(
        sd, progress=False, torch_dtype="bfloat16", vae_dtype="float32"
    )
    assert gp.pipe.vae.dtype == torch.float32 and gp.family.net.dtype == torch.bfloat16
    assert np.isfinite(gp("a red circle", steps=2, seed=0, output_type="np").images).all()


# -- files are never lost --------------------------------------------------------------------------


def test_two_concurrent_runs_into_one_folder_keep_every_image(tmp_path):
    """Default names: a running counter and the seed, claimed exclusively at write time."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "diffguide",
                "generate",
                prompt,
                "--seeds",
                "0-3",
                "--steps",
                "2",
                "--quiet",
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for prompt in ("a red circle", "a blue square")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    files = sorted(os.listdir(tmp_path / "outputs"))
    assert len(files) == 8 and all(re.fullmatch(r"\d{5}-[0-3]\.png", f) for f in files), files
    prompts = sorted(
        (
            read_metadata(str(tmp_path / "outputs" / f))["prompt"],
            read_metadata(str(tmp_path / "outputs" / f))["seed"],
        )
        for f in files
    )
    assert prompts == sorted((p, s) for p in ("a red circle", "a blue square") for s in range(4))
    listed = sorted(os.path.basename(x) for o in outs for x in o[0].split())
    assert listed == files


def test_a_file_that_appears_during_the_run_is_kept(tmp_path):
    target = tmp_path / "x.png"
    out = Outputs(str(target), [0])  # checked: it does not exist yet
    target.write_bytes(b"someone else's")
    img = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="appeared while this run was working; kept it"):
        out.write(img, 0, {"prompt": "p", "seed": 0})
    assert target.read_bytes() == b"someone else's"
    assert os.listdir(tmp_path) == ["x.png"]  # no temporary file left
    Outputs(str(target), [0], overwrite=True).write(img, 0, {"prompt": "p", "seed": 0})
    assert target.read_bytes()[:4] == b"\x89PNG"


def test_jpeg_and_webp_carry_their_settings(tmp_path):
    for ext in ("jpg", "webp"):
        path = tmp_path / f"a.{ext}"
        res = cli("generate", "a red circle, on blue", "--steps", "2", "--quiet", "-o", str(path))
        assert res.returncode == 0, res.stderr
        assert path.is_file() and Image.open(path).format == {"jpg": "JPEG", "webp": "WEBP"}[ext]
        meta = read_metadata(str(path))
        assert meta["prompt"] == "a red circle, on blue" and meta["steps"] == 2
        comment = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\0") and "Steps: 2" in comment[8:].decode("utf-16-be")


# -- metadata other tools read ---------------------------------------------------------------------


def parse_a1111(text: str) -> dict:
    """A reader written from A1111's documented 'parameters' layout: prompt lines, then an optional
    block starting 'Negative prompt:', then one line of 'Key: value' fields separated by commas,
    where a value holding a comma, colon or newline is a JSON string."""
    lines = text.strip().split("\n")
    field = re.compile(r'\s*([A-Za-z][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
    params = {}
    if len(field.findall(lines[-1])) >= 3:
        for key, value in field.findall(lines.pop()):
            params[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **params}


def test_parameters_parse_back_in_a1111s_layout(sd, tmp_path):
    path = tmp_path / "a.png"
    assert (
        main(
            [
                "generate",
                "a red circle, very red: round",
                "--model",
                sd,
                "--negative",
                "blurry, dark",
                "--guidance",
                "cfg:scale=7.5,rescale=0.7",
                "--sampler",
                "dpmpp_2m",
                "--spacing",
                "karras",
                "--steps",
                "3",
                "--seed",
                "42",
                "--quiet",
                "-o",
                str(path),
            ]
        )
        == 0
    )
    p = parse_a1111(Image.open(path).text["parameters"])
    assert p["Prompt"] == "a red circle, very red: round" and p["Negative prompt"] == "blurry, dark"
    assert (p["Steps"], p["Sampler"], p["Schedule type"], p["CFG scale"], p["Seed"], p["Size"]) == (
        "3",
        "DPM++ 2M",
        "Karras",
        "7.5",
        "42",
        "16x16",
    )
    assert (
        p["diffguide guidance"] == "cfg:scale=7.5,rescale=0.7"
        and p["diffguide sampler"] == "dpmpp_2m"
    )
    assert p["Model"] == sd and p["Version"].startswith("diffguide ")


def test_a1111_names_only_where_they_mean_the_same():
    base = dict(
        prompt="p", steps=1, seed=0, width=8, height=8, model="m", guidance="cfg", version="0"
    )
    names = {
        s: parse_a1111(parameters_text({**base, "sampler": s}))["Sampler"]
        for s in ("euler_ancestral", "dpmpp_2m_sde", "consistency", "dpmpp_3m")
    }
    assert names == {
        "euler_ancestral": "Euler a",
        "dpmpp_2m_sde": "DPM++ 2M SDE",
        "consistency": "consistency",
        "dpmpp_3m": "dpmpp_3m",
    }  # no A1111 sampler is the corrected 3M; A1111's LCM has its own table


def test_from_png_recreates_the_image_bit_for_bit(sd, tmp_path):
    """An image made in a batch of four comes back from its own file, made in the same batch."""
    assert (
        main(
            [
                "generate",
                "a blue square",
                "--model",
                sd,
                "--seeds",
                "3-6",
                "--batch",
                "4",
                "--steps",
                "3",
                "--guidance",
                "cfg:scale=6",
                "--quiet",
                "-o",
                str(tmp_path / "batch"),
            ]
        )
        == 0
    )
    src = tmp_path / "batch" / "000005.png"
    assert (
        main(["generate", "--from-png", str(src), "--quiet", "-o", str(tmp_path / "again.png")])
        == 0
    )
    assert (tmp_path / "again.png").read_bytes() == src.read_bytes()
    # a flag given overrides the file's own setting
    assert (
        main(
            [
                "generate",
                "--from-png",
                str(src),
                "--seed",
                "9",
                "--quiet",
                "-o",
                str(tmp_path / "s9.png"),
            ]
        )
        == 0
    )
    assert read_metadata(str(tmp_path / "s9.png"))["seed"] == 9


# -- defaults and unconditional models -------------------------------------------------------------


def test_ddpm_folder_generates_with_no_flags(tmp_path):
    folder = tm.save(str(tmp_path / "ddpm"), "ddpm")
    res = cli("generate", "--model", folder, "--steps", "3", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    meta = read_metadata(
        res.stdout.split()[0]
        if os.path.isabs(res.stdout.split()[0])
        else str(tmp_path / res.stdout.split()[0])
    )
    assert meta["guidance"] == "none"
    res = cli("generate", "--model", folder, "--guidance", "cfg", "--quiet", cwd=tmp_path)
    assert one_line_error(res) and "--guidance none" in res.stderr and "uncond=" not in res.stderr


def test_one_set_of_defaults_in_every_command():
    from diffguide.cli.main import build_parser
    from diffguide.pipelines.pipeline import DEFAULT_STEPS

    p = build_parser()
    for argv in (["generate", "x"], ["eval"], ["compare", "x"]):
        args = p.parse_args(argv)
        assert (args.steps, args.sampler, args.model) == (None, None, None)  # the model's own
    assert (
        GuidedPipeline.from_pretrained("builtin", progress=False).default_steps
        == DEFAULT_STEPS
        == 25
    )
    assert "25 unless a distilled" in " ".join(
        p._subparsers._group_actions[0].choices["eval"].format_help().split()
    )


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,words",
    [
        (
            ["generate", "a", "--seed", "18446744073709551616"],
            ["18446744073709551616", "0..18446744073709551615"],
        ),
        (["generate", "a", "-o", ""], ["output path is empty"]),
        (["generate", "a", "-o", "/proc/x/y.png"], ["cannot write", "/proc/x"]),
        (["generate", "a", "-o", "x.gif"], [".gif", ".png"]),
        (["generate", "a", "--guidance", "cfg:scale=7.5,scale=3"], ["scale twice"]),
        (["mixture", "--label", "-5"], ["--label", "-5", "0..3"]),
        (["eval", "--seed", "-1"], ["--seed", "-1"]),
        (["generate", "--from-png", "/nonexistent.png"], ["cannot read image", "/nonexistent.png"]),
    ],
)
def test_bad_inputs_exit_2_with_one_line(argv, words, tmp_path):
    res = cli(*argv, cwd=tmp_path)
    assert one_line_error(res), res.stderr
    assert all(w in res.stderr for w in words), res.stderr
    assert os.listdir(tmp_path) == []


def test_list_into_a_closed_pipe():
    res = subprocess.run(
        f"{sys.executable} -m diffguide list | head -1",
        shell=True,
        capture_output=True,
        text=True,
        executable="/bin/bash",
    )
    assert res.stdout.strip() == "samplers:" and res.stderr == ""


# -- threads ---------------------------------------------------------------------------------------


def test_threads_sharing_a_pipeline_match_their_serial_twins(sd):
    """Three threads share one pipeline and one stateful guidance object (APG with momentum), with
    stochastic samplers; the calls start together (a barrier) so that their prompt encodings
    overlap. Every image equals the one a lone call makes."""
    import threading

    gp = GuidedPipeline.from_pretrained(sd, progress=False)
    g = dg.parse_spec("guidance", "apg:scale=5,momentum=-0.5")
    samplers = ("dpmpp_2m_sde", "euler_ancestral", "dpmpp_3m_sde")
    prompts = ("a red circle", "a blue square on a white background", "a yellow triangle")

    def make(seed, k):
        return gp(
            prompts[k],
            guidance=g,
            sampler=samplers[k],
            steps=4,
            seed=seed,
            output_type="np",
            progress=False,
        ).images

    serial = {(seed, k): make(seed, k) for seed in range(12) for k in range(3)}
    start = threading.Barrier(3)
    got, errors = {}, []

    def worker(k):
        try:
            for seed in range(12):
                start.wait(timeout=120)
                got[seed, k] = make(seed, k)
        except Exception as e:  # reported below, not lost in the thread; the others stop waiting
            errors.append(e)
            start.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    differ = [key for key in serial if not np.array_equal(serial[key], got[key])]
    assert not differ, differ
