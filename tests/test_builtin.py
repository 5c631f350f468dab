"""The built-in toy models ship in the package; generate, eval and compare run on them."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
from PIL import Image

from diffguide.assets import path as asset_path
from diffguide.cli.main import main
from diffguide.pipelines import GuidedPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["builtin", "builtin-small"])
def test_builtin_models_load_and_sample(name):
    gp = GuidedPipeline.from_pretrained(name, progress=False)
    assert gp.family.name == "sd" and gp.pipe.vae is None and gp.info.kind == "v"
    out = gp(
        ["a red circle on a blue background", "a green square"], steps=3, seed=0, output_type="np"
    )
    assert out.images.shape == (2, 32, 32, 3) and out.nfe == 6


def test_companion_is_cheaper():
    """In operations per evaluation (wall time is for bench/, not tests)."""
    from diffguide.pipelines import toy_model

    assert toy_model.flops("main") >= 3 * toy_model.flops("small")


def test_shipped_weights_are_small():
    total = sum(
        os.path.getsize(os.path.join(d, f))
        for d, _, fs in os.walk(asset_path())
        for f in fs
        if f.endswith((".safetensors", ".json", ".txt"))
    )
    assert total < 20 * 2**20


def test_wheel_contains_the_models_and_evaluator(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for part in (
        "toy/model_index.json",
        "toy/unet/diffusion_pytorch_model.safetensors",
        "toy/text_encoder/model.safetensors",
        "toy/tokenizer/tokenizer_config.json",
        "toy-small/unet/diffusion_pytorch_model.safetensors",
        "evaluator.safetensors",
        "toy-fast/diffguide.json",
        "toy-fast/unet/diffusion_pytorch_model.safetensors",
        "reward.safetensors",
    ):
        assert f"diffguide/assets/{part}" in names, part


def test_generate_without_model(tmp_path, capsys):
    out = tmp_path / "x.png"
    code, _, err = run(
        capsys,
        "generate",
        "a red circle on a blue background",
        "--steps",
        "4",
        "-o",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    assert Image.open(out).size == (32, 32)
    assert json.loads(Image.open(out).text["diffguide"])["model"] == "builtin"


def test_eval_json_and_grid(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text(
        "# two prompts\na red circle on a blue background\n\na green square and a yellow cross\n"
    )
    code, out, err = run(
        capsys,
        "eval",
        "--prompts",
        str(prompts),
        "--n",
        "2",
        "--steps",
        "3",
        "--grid",
        str(tmp_path / "g.png"),
        "--out",
        str(tmp_path / "r.json"),
        "--quiet",
    )
    assert code == 0, err
    res = json.loads(out)
    assert res == json.loads((tmp_path / "r.json").read_text())
    for key in (
        "adherence",
        "adherence_by_group",
        "attribute_accuracy",
        "frechet_distance",
        "colour_error",
        "saturation_error",
        "diversity",
        "nfe_per_image",
        "seconds_per_image",
    ):
        assert key in res
    assert res["images"] == 4 and res["nfe_per_image"] == 6
    assert set(res["adherence_by_group"]) == {"single", "two"}
    assert Image.open(tmp_path / "g.png").size[1] == 2 * (64 + 2) + 2  # two rows of 2x tiles


def test_compare_grid_size(tmp_path, capsys):
    out = tmp_path / "c.png"
    code, _, err = run(
        capsys,
        "compare",
        "a blue triangle",
        "--guidance",
        "none",
        "cfg",
        "--scales",
        "2,5",
        "--n",
        "3",
        "--steps",
        "2",
        "-o",
        str(out),
        "--quiet",
    )
    assert code == 0, err
    w, h = Image.open(out).size
    assert h == 3 * (64 + 2) + 2  # rows: none, cfg at 2, cfg at 5
    assert json.loads(Image.open(out).text["diffguide"])["rows"][1].startswith("cfg:scale=2.0")


@pytest.mark.parametrize(
    "args,words",
    [
        (["eval", "--n", "0"], ["--n", "0"]),
        (["eval", "--prompts", "missing.txt"], ["missing.txt", "not a file"]),
        (["eval", "--prompts", "BAD"], ["BAD:2", "hexagon"]),
        (["eval", "--model", "no/such/folder"], ["no/such/folder"]),
        (["compare", "a red circle", "--scales", "2,x"], ["--scales", "2,x"]),
        (["generate", "a red circle", "--model", "./nothing-here"], ["nothing-here"]),
    ],
)
def test_bad_eval_input(args, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD").write_text("a red circle\na red hexagon\n")
    code, _, err = run(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), err
