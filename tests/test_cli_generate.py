"""``diffguide generate`` end to end on a tiny SD model saved with save_pretrained, and its
errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffguide.pipelines import tiny as tm
from diffguide.cli.main import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tm.sd().save_pretrained(path)
    return str(path)


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


def test_png_size_metadata_and_determinism(model, tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    args = [
        "a red circle",
        "--model",
        model,
        "--steps",
        "5",
        "--seed",
        "7",
        "--height",
        "24",
        "--width",
        "16",
        "--negative",
        "blurry",
        "--guidance",
        "cfg:scale=6,rescale=0.5",
        "--sampler",
        "euler",
        "--quiet",
    ]
    assert run(capsys, *args, "-o", str(a))[0] == 0
    assert run(capsys, *args, "-o", str(b))[0] == 0
    assert a.read_bytes() == b.read_bytes()  # same seed, byte-identical file
    im = Image.open(a)
    assert im.size == (16, 24)
    meta = json.loads(im.text["diffguide"])
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blurry"
    assert meta["seed"] == 7 and meta["steps"] == 5 and meta["model"] == model
    assert meta["guidance"] == "cfg:scale=6.0,rescale=0.5" and meta["sampler"] == "euler"
    assert (meta["width"], meta["height"]) == (16, 24) and meta["version"]
    params = im.text["parameters"]
    assert params.startswith("a red circle\nNegative prompt: blurry\nSteps: 5, Sampler: Euler")
    assert "Seed: 7" in params and "Size: 16x24" in params
    assert oct(os.stat(a).st_mode & 0o777) != oct(0o600)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_seeds_differ_and_batches_equal_single_runs(model, tmp_path, capsys):
    code, out, _ = run(
        capsys,
        "a blue square",
        "--model",
        model,
        "--steps",
        "4",
        "--seeds",
        "0-3",
        "--batch",
        "4",
        "-o",
        str(tmp_path / "batch"),
        "--quiet",
    )
    assert code == 0 and len(out.split()) == 4
    batch = [pixels(tmp_path / "batch" / f"{s:06d}.png") for s in range(4)]
    assert all(np.abs(batch[i] - batch[j]).max() > 0 for i in range(4) for j in range(i))
    for s in range(4):
        assert (
            run(
                capsys,
                "a blue square",
                "--model",
                model,
                "--steps",
                "4",
                "--seed",
                str(s),
                "-o",
                str(tmp_path / f"single{s}.png"),
                "--quiet",
            )[0]
            == 0
        )
        # one uint8 level allowed: a batched forward pass may round differently in the last bit
        assert np.abs(pixels(tmp_path / f"single{s}.png") - batch[s]).max() <= 1


def test_existing_file_needs_overwrite(model, tmp_path, capsys):
    target = tmp_path / "x.png"
    target.write_bytes(b"keep")
    code, _, err = run(capsys, "a", "--model", model, "--steps", "2", "-o", str(target))
    assert code == 2 and "--overwrite" in err and target.read_bytes() == b"keep"
    assert (
        run(
            capsys,
            "a",
            "--model",
            model,
            "--steps",
            "2",
            "-o",
            str(target),
            "--overwrite",
            "--quiet",
        )[0]
        == 0
    )
    assert target.read_bytes()[:4] == b"\x89PNG"


BAD = {
    "unknown guidance": (["--guidance", "cgf"], ["cgf", "cfg", "none"]),
    "unknown sampler": (["--sampler", "dpm_2m"], ["dpm_2m", "dpmpp_2m", "euler"]),
    "malformed spec": (["--guidance", "cfg:scale"], ["scale"]),
    "unknown option": (["--guidance", "cfg:strength=3"], ["strength", "scale"]),
    "zero steps": (["--steps", "0"], ["--steps", "0"]),
    "negative steps": (["--steps", "-3"], ["--steps", "-3"]),
    "bad height": (["--height", "15"], ["height", "15", "multiple of 2"]),
    "bad seeds": (["--seeds", "3-1"], ["--seeds"]),
    "strength alone": (["--strength", "0.5"], ["--strength", "--init-image"]),
    "missing init image": (["--init-image", "nope.png"], ["--init-image", "nope.png"]),
    "init image not an image": (["--init-image", __file__], ["--init-image", "cannot read"]),
    "strength out of range": (
        ["--init-image", "INIT", "--strength", "1.5"],
        ["--strength", "1.5", "[0, 1]"],
    ),
    "strength leaves no step": (
        ["--init-image", "INIT", "--strength", "0.01", "--steps", "10"],
        ["strength 0.01", "10 steps"],
    ),
    "cuda graph on the cpu": (["--cuda-graph", "--device", "cpu"], ["--cuda-graph", "CUDA device"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2(case, model, tmp_path, capsys):
    extra, words = BAD[case]
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(init)
    extra = [str(init) if a == "INIT" else a for a in extra]
    code, out, err = run(capsys, "a", "--model", model, "-o", str(tmp_path / "out"), *extra)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffguide: error:"), err
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_model_and_unwritable_output(tmp_path, capsys, model):
    code, _, err = run(capsys, "a", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "a", "--model", model, "-o", str(blocker / "sub" / "x.png"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot write" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_console_entry_point_has_no_traceback(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffguide",
            "generate",
            "a",
            "--model",
            str(tmp_path / "missing"),
            "--steps",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["diffguide: error: --steps must be >= 1, got 0"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda(model, tmp_path, capsys):
    code, _, err = run(capsys, "a", "--model", model, "--device", "cuda", "-o", str(tmp_path / "o"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cuda" in err.lower()
    assert not (tmp_path / "o").exists()


def test_init_image_round_trip(model, tmp_path, capsys):
    """--init-image/--strength: equal to the Python call, the strength recorded for A1111 and in the
    settings, and --from-png makes the same image again."""
    import torch

    from diffguide.pipelines import GuidedPipeline

    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 16, 3), dtype=np.uint8)).save(
        init
    )
    out = tmp_path / "edit.png"
    code, _, err = run(
        capsys,
        "a red circle",
        "--model",
        model,
        "--init-image",
        str(init),
        "--strength",
        "0.5",
        "--steps",
        "8",
        "--seed",
        "3",
        "-o",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    im = Image.open(out)
    assert im.size == (16, 24)  # the init image's size
    meta = json.loads(im.text["diffguide"])
    assert meta["strength"] == 0.5 and meta["init_image"] == str(init)
    assert "Denoising strength: 0.5" in im.text["parameters"]
    gp = GuidedPipeline.from_pretrained(model, progress=False)
    ref = gp(
        "a red circle", image=Image.open(init), strength=0.5, steps=8, seed=3, output_type="np"
    ).images[0]
    assert np.abs(pixels(out) - np.round(ref * 255)).max() <= 1
    code, _, err = run(capsys, "--from-png", str(out), "-o", str(tmp_path / "again.png"), "--quiet")
    assert code == 0 and np.array_equal(pixels(tmp_path / "again.png"), pixels(out)), err
    assert torch.is_tensor(gp.prepare_image(Image.open(init))[0])


def test_autoguidance_and_perturbed_guiders_from_the_command_line(tmp_path, capsys):
    """--guide-model feeds autoguidance, is recorded and re-made by --from-png; PAG and SEG compose
    with CFG by +; without a guide model, one line and exit status 2."""
    from diffguide.pipelines import GuidedPipeline

    out = tmp_path / "ag.png"
    code, _, err = run(
        capsys,
        "a red circle",
        "--guidance",
        "cfg+autoguidance:scale=2",
        "--guide-model",
        "builtin-small",
        "--steps",
        "5",
        "--seed",
        "2",
        "-o",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    meta = json.loads(Image.open(out).text["diffguide"])
    assert meta["guide_model"] == "builtin-small"
    gp = GuidedPipeline.from_pretrained("builtin", progress=False)
    ref = gp(
        "a red circle",
        guidance="cfg+autoguidance:scale=2",
        guide_model="builtin-small",
        steps=5,
        seed=2,
        output_type="np",
    ).images[0]
    assert np.abs(pixels(out) - np.round(ref * 255)).max() <= 1
    code, _, err = run(capsys, "--from-png", str(out), "-o", str(tmp_path / "again.png"), "--quiet")
    assert code == 0 and np.array_equal(pixels(tmp_path / "again.png"), pixels(out)), err
    code, _, err = run(
        capsys,
        "a red circle",
        "--guidance",
        "cfg:scale=5+pag:scale=2+seg:sigma=inf",
        "--steps",
        "3",
        "-o",
        str(tmp_path / "pag.png"),
        "--quiet",
    )
    assert code == 0, err
    code, _, err = run(
        capsys,
        "a red circle",
        "--guidance",
        "autoguidance",
        "--steps",
        "3",
        "-o",
        str(tmp_path / "none.png"),
        "--quiet",
    )
    assert code == 2 and "--guide-model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none.png").exists()
