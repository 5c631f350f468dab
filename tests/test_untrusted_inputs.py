"""Inputs diffguide does not control (issue 30): an image's settings read by --from-png, damaged
model
folders, and the replay of diffguide's own files; every notice the Python API gives reaches the
command line. Each case compares the files before and after."""

import json
import os
import re
import shutil

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

from diffguide.cli.main import main
from diffguide.core.registry import names, options, parse_spec, to_spec
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from diffguide.images import read_metadata

TE = os.path.join("text_encoder", "model.safetensors")
UNET = os.path.join("unet", "diffusion_pytorch_model.safetensors")
VAE = os.path.join("vae", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("sd") / "m"), "sd")


@pytest.fixture(scope="module")
def made(sd, tmp_path_factory):
    """An image diffguide wrote (seed 0 of a batch of two, CFG 6), to be edited into hostile
    ones."""
    out = tmp_path_factory.mktemp("made")
    assert (
        main(
            [
                "generate",
                "a red circle",
                "--model",
                sd,
                "--seeds",
                "0-1",
                "--batch",
                "2",
                "--steps",
                "2",
                "--guidance",
                "cfg:scale=6",
                "--quiet",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    return str(out / "000000.png")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err) -> bool:
    lines = err.strip().splitlines()
    return code == 2 and len(lines) == 1 and lines[0].startswith("diffguide: error:")


def tree(folder) -> dict:
    """Every file under a folder with its bytes: what a run left, to compare before and after."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def retext(src: str, dst, change=None, raw: str | None = None) -> str:
    """A copy of ``src`` whose diffguide settings are ``change``d (a function editing the dict) or
    replaced by ``raw`` text; the pixels and A1111's parameters stay."""
    im = Image.open(src)
    meta = json.loads(im.text["diffguide"])
    if change is not None:
        change(meta)
    info = PngInfo()
    info.add_text("parameters", im.text["parameters"])
    info.add_text("diffguide", raw if raw is not None else json.dumps(meta))
    im.save(dst, pnginfo=info)
    return str(dst)


@pytest.fixture
def no_loading(monkeypatch):
    """The model must not load: every case here is refused before it."""

    def refuse(*args, **kwargs):
        pytest.fail("the model was loaded before the bad input was refused")

    monkeypatch.setattr(GuidedPipeline, "from_pretrained", classmethod(refuse))


# -- item 2: --from-png reads settings only, each checked as its flag is
# ----------------------------


def test_a_png_cannot_replace_a_file(made, tmp_path, capsys):
    """Before: noise_optimizer 'overwrite:yes' set args.overwrite, and the user's file was
    replaced."""
    evil = retext(made, tmp_path / "evil.png", lambda m: m.update(noise_optimizer="overwrite:yes"))
    (tmp_path / "mine.png").write_bytes(b"the user's own file")
    before = tree(tmp_path)
    code, _, err = run(
        capsys, "generate", "--from-png", evil, "-o", str(tmp_path / "mine.png"), "--quiet"
    )
    assert one_line_error(code, err) and "noise_optimizer" in err and "initno, reno" in err, err
    assert tree(tmp_path) == before


def test_a_png_cannot_choose_where_images_go(made, tmp_path, capsys):
    """Before: noise_optimizer 'output:DIR' replaced the user's -o, and the image went to the
    file's folder."""
    elsewhere = tmp_path / "chosen-by-the-file"
    evil = retext(
        made, tmp_path / "evil.png", lambda m: m.update(noise_optimizer=f"output:{elsewhere}")
    )
    before = tree(tmp_path)
    code, _, err = run(
        capsys, "generate", "--from-png", evil, "-o", str(tmp_path / "mine.png"), "--quiet"
    )
    assert one_line_error(code, err) and "output:" in err, err
    assert tree(tmp_path) == before and not elsewhere.exists()


@pytest.mark.parametrize(
    "change,words",
    [
        ({"steps": "many"}, ["steps", "'many'", "invalid int"]),
        ({"steps": 2.5}, ["steps", "2.5"]),
        ({"steps": True}, ["steps", "True"]),
        ({"steps": 10**6}, ["1,000,000", "10,000"]),
        ({"width": 8192, "height": 8192}, ["8192x8192", "4096x4096"]),
        ({"dtype": "float64"}, ["float64", "float32"]),
        ({"spacing": "nope"}, ["nope", "karras"]),
        ({"height": [16]}, ["height", "[16]"]),
        ({"prompt": 5}, ["prompt", "5"]),
        ({"seed": -1}, ["seed", "-1"]),
        ({"seed": "0"}, ["seed", "'0'"]),
        ({"batch_seeds": [1, 2]}, ["seed 0 is not in its batch_seeds", "no image"]),
        ({"batch_seeds": [0, 0]}, ["batch_seeds repeats"]),
        ({"sampler": "euler:bogus=1"}, ["bogus"]),
        ({"guidance": "@/etc/passwd"}, ["spec file", "@"]),
        ({"guidance": "cfg+@/etc/passwd"}, ["spec file", "@"]),
        ({"guidance": "+".join(["cfg"] * 40)}, ["40 methods", "at most 16"]),
        ({"noise_optimizer": "initno:bogus=1"}, ["bogus"]),
        ({"stitch_reset": "yes"}, ["stitch_reset", "'yes'"]),
    ],
)
def test_png_settings_get_the_flags_checks_before_loading(
    change, words, made, tmp_path, capsys, no_loading
):
    """Before: each value went into the run unchecked (a TypeError, a model loaded for a value its
    flag refuses, a run that wrote nothing); now one line names the file and the value, and nothing
    loads."""
    png = retext(made, tmp_path / "in.png", lambda m: m.update(change))
    before = tree(tmp_path)
    code, _, err = run(
        capsys, "generate", "--from-png", png, "-o", str(tmp_path / "out.png"), "--quiet"
    )
    assert one_line_error(code, err) and png in err, err
    assert all(w in err for w in words), err
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "raw,words",
    [
        ("[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
        ('{"prompt": "a", "seed": 0, "scale": NaN}', ["NaN"]),
    ],
)
def test_png_json_that_is_no_settings(raw, words, made, tmp_path, capsys, no_loading):
    """Before: deeply nested JSON ended in RecursionError (exit 1); NaN was taken as a scale."""
    png = retext(made, tmp_path / "in.png", raw=raw)
    code, _, err = run(
        capsys, "generate", "--from-png", png, "-o", str(tmp_path / "out.png"), "--quiet"
    )
    assert one_line_error(code, err) and png in err and all(w in err for w in words), err
    assert sorted(os.listdir(tmp_path)) == ["in.png"]


def test_what_a_png_says_beside_its_settings_is_noticed_not_taken(made, tmp_path, capsys):
    """Before: keys such as output and overwrite were dropped without a word."""
    png = retext(
        made, tmp_path / "in.png", lambda m: m.update(output=str(tmp_path / "x"), overwrite=True)
    )
    code, out, err = run(
        capsys, "generate", "--from-png", png, "-o", str(tmp_path / "out.png"), "--quiet"
    )
    assert code == 0, err
    assert "not read (not generation settings): output, overwrite" in err
    assert out.split() == [str(tmp_path / "out.png")] and sorted(os.listdir(tmp_path)) == [
        "in.png",
        "out.png",
    ]


def test_a_new_guidance_drops_the_files_scale(made, tmp_path, capsys):
    """Issue 40 item 1. Before: the file's scale 6 was applied to 'none', which has no scale (exit
    2)."""
    code, _, err = run(
        capsys,
        "generate",
        "--from-png",
        made,
        "--guidance",
        "none",
        "-o",
        str(tmp_path / "x.png"),
        "--quiet",
    )
    assert code == 0, err
    assert (
        "its scale (part of its guidance 'cfg:scale=6.0') is not applied to --guidance none" in err
    )
    meta = read_metadata(str(tmp_path / "x.png"))
    assert meta["guidance"] == "none" and meta["scale"] is None and meta["steps"] == 2
    # the user's own spec file is theirs to read
    (tmp_path / "tuned.json").write_text(json.dumps({"guidance": "cfg:scale=2"}))
    code, _, err = run(
        capsys,
        "generate",
        "--from-png",
        made,
        "--guidance",
        f"@{tmp_path / 'tuned.json'}",
        "-o",
        str(tmp_path / "z.png"),
        "--quiet",
    )
    assert code == 0 and read_metadata(str(tmp_path / "z.png"))["guidance"] == "cfg:scale=2.0", err
    # a new scale alone still applies to the file's guidance
    code, _, err = run(
        capsys,
        "generate",
        "--from-png",
        made,
        "--scale",
        "3",
        "-o",
        str(tmp_path / "y.png"),
        "--quiet",
    )
    assert code == 0 and read_metadata(str(tmp_path / "y.png"))["guidance"] == "cfg:scale=3.0", err


# -- item 5: damaged folders name the file and the problem -----------------------------------------


def _drop_tensors(path: str, count: int) -> None:
    tensors = load_file(path)
    for key in sorted(tensors)[:count]:
        del tensors[key]
    save_file(tensors, path, metadata={"format": "pt"})


def _add_tensor(path: str) -> None:
    tensors = load_file(path)
    tensors["bogus.weight"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _edit_json(path: str, **values) -> None:
    with open(path) as f:
        data = json.load(f)
    data.update(values)
    with open(path, "w") as f:
        json.dump(data, f)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


DAMAGE = {
    "no tokenizer folder": (
        lambda m: shutil.rmtree(os.path.join(m, "tokenizer")),
        ["tokenizer/", "CLIPTokenizer"],
    ),
    "no vocabulary": (
        lambda m: [
            os.remove(os.path.join(m, "tokenizer", f))
            for f in os.listdir(os.path.join(m, "tokenizer"))
        ],
        ["tokenizer", "no vocabulary"],
    ),
    "zero-byte weights": (lambda m: _write(os.path.join(m, TE), ""), [TE, "empty"]),
    "truncated weights": (lambda m: _truncate(os.path.join(m, UNET)), [UNET, "truncated"]),
    "text encoder tensors missing": (
        lambda m: _drop_tensors(os.path.join(m, TE), 16),
        [TE, "lacks 16 of the 36 tensors", "random weights"],
    ),
    "unet tensors missing": (lambda m: _drop_tensors(os.path.join(m, UNET), 5), [UNET, "lacks 5"]),
    "unexpected tensor": (lambda m: _add_tensor(os.path.join(m, UNET)), [UNET, "bogus.weight"]),
    "swapped class": (
        lambda m: _edit_json(
            os.path.join(m, "model_index.json"), vae=["diffusers", "AutoencoderTiny"]
        ),
        [VAE, "saved from AutoencoderKL", "model_index.json names AutoencoderTiny"],
    ),
    "config not JSON": (
        lambda m: _write(os.path.join(m, "unet", "config.json"), "{not json"),
        [os.path.join("unet", "config.json"), "not valid JSON", "line 1"],
    ),
    "config nested too deeply": (
        lambda m: _write(os.path.join(m, "unet", "config.json"), "[" * 100_000),
        [os.path.join("unet", "config.json"), "nested too deeply"],
    ),
    "negative training steps": (
        lambda m: _edit_json(
            os.path.join(m, "scheduler", "scheduler_config.json"), num_train_timesteps=-5
        ),
        ["scheduler_config.json", "num_train_timesteps is -5"],
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_folder_names_the_file_and_the_problem(case, sd, tmp_path, capsys):
    """Before: OverflowError, SafetensorError without a file, 'Cannot copy out of meta tensor', a
    RuntimeError, or (missing text-encoder tensors) a run on random weights with exit 0."""
    folder = str(tmp_path / "m")
    shutil.copytree(sd, folder)
    damage, words = DAMAGE[case]
    damage(folder)
    out = tmp_path / "out"
    out.mkdir()
    before = tree(tmp_path)
    code, _, err = run(
        capsys,
        "generate",
        "a red circle",
        "--model",
        folder,
        "--steps",
        "2",
        "-o",
        str(out),
        "--quiet",
    )
    assert one_line_error(code, err) and all(w in err for w in words), err
    assert tree(tmp_path) == before
    with pytest.raises(ValueError, match=re.escape(words[0])):
        GuidedPipeline.from_pretrained(folder, progress=False)


def test_a_flow_scheduler_whose_shift_divides_by_zero(tmp_path, capsys):
    """Before: base_image_seq_len equal to max_image_seq_len loaded, to divide by zero at
    sampling."""
    folder = tm.save(str(tmp_path / "flux"), "flux")
    _edit_json(
        os.path.join(folder, "scheduler", "scheduler_config.json"),
        base_image_seq_len=64,
        max_image_seq_len=64,
    )
    code, _, err = run(
        capsys,
        "generate",
        "a red circle",
        "--model",
        folder,
        "--steps",
        "2",
        "-o",
        str(tmp_path / "x.png"),
        "--quiet",
    )
    assert one_line_error(code, err) and "scheduler_config.json" in err and "both 64" in err, err
    assert not (tmp_path / "x.png").exists()


def test_renamed_tensors_load_only_where_their_values_were_read(sd, tmp_path):
    """A legacy checkpoint's names (CLIP's text_model. prefix and its position_ids, diffusers' old
    VAE attention names) load with the same weights; names no loader converts, with the same sizes,
    leave
    random weights and are refused. Before: the second folder loaded silently on random weights."""
    legacy = str(tmp_path / "legacy")
    shutil.copytree(sd, legacy)
    te = load_file(os.path.join(legacy, TE))
    te = {"text_model." + k: v for k, v in te.items()}
    te["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(te, os.path.join(legacy, TE), metadata={"format": "pt"})
    old_names = {
        ".to_q.": ".query.",
        ".to_k.": ".key.",
        ".to_v.": ".value.",
        ".to_out.0.": ".proj_attn.",
    }
    vae = load_file(os.path.join(legacy, VAE))
    renamed = {}
    for key, value in vae.items():
        for new, old in old_names.items():
            key = key.replace(new, old) if ".attentions." in key else key
        renamed[key] = value
    assert set(renamed) != set(vae)
    save_file(renamed, os.path.join(legacy, VAE), metadata={"format": "pt"})
    plain = GuidedPipeline.from_pretrained(sd, progress=False)
    loaded = GuidedPipeline.from_pretrained(legacy, progress=False)
    for name in ("text_encoder", "vae"):
        a, b = getattr(plain.pipe, name).state_dict(), getattr(loaded.pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    wrong = str(tmp_path / "wrong")
    shutil.copytree(sd, wrong)
    tensors = load_file(os.path.join(wrong, UNET))
    tensors["conv_in.kernel"] = tensors.pop("conv_in.weight")  # same size, a name nothing converts
    save_file(tensors, os.path.join(wrong, UNET), metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"lacks 1 of .* \(conv_in\.weight\).*holds 1 .*\(conv_in\.kernel\)"
    ):
        GuidedPipeline.from_pretrained(wrong, progress=False)


# -- item 6: diffguide's own files replay; notices reach the command line
# ---------------------------


def test_numbers_with_exponents_parse_and_specs_round_trip():
    """Before: '+' split 'cfg:scale=1e+3' into 'cfg:scale=1e' and '3'."""
    assert parse_spec("guidance", "cfg:scale=1e+3").scale == 1000.0
    both = parse_spec("guidance", "cfg:scale=1E+3+tsg:scale=2e-1")
    assert [type(p).__name__ for p in both.parts] == ["CFG", "TSG"] and both.parts[1].scale == 0.2
    assert to_spec(parse_spec("guidance", "cfg:sigma_hi=1e20")) == "cfg:sigma_hi=1e+20"
    for kind in ("sampler", "guidance"):
        for name in names(kind):
            base = parse_spec(kind, name)
            for key, default in options(kind, name).items():
                if isinstance(default, float):
                    for value in (1e20, -3e-40):
                        try:
                            obj = type(base)(
                                **{**{k: getattr(base, k) for k in options(kind, name)}, key: value}
                            )
                        except ValueError:
                            continue  # a value the option refuses
                        assert parse_spec(kind, to_spec(obj)) == obj, to_spec(obj)


def test_own_png_replays_from_another_folder(sd, tmp_path, capsys, monkeypatch):
    """A relative --model and a spec written with an exponent: the image comes back bit for bit from
    another folder. Before: the spec failed to parse, and the model was looked for in the wrong
    folder."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    shutil.copytree(sd, first / "model")
    monkeypatch.chdir(first)
    code, _, err = run(
        capsys,
        "generate",
        "a red circle",
        "--model",
        "model",
        "--guidance",
        "cfg:sigma_hi=1e20",
        "--steps",
        "2",
        "-o",
        "made.png",
        "--quiet",
    )
    assert code == 0, err
    meta = read_metadata("made.png")
    assert meta["guidance"] == "cfg:sigma_hi=1e+20" and meta["model"] == str(first / "model")
    monkeypatch.chdir(second)
    code, _, err = run(
        capsys, "generate", "--from-png", str(first / "made.png"), "-o", "again.png", "--quiet"
    )
    assert code == 0, err
    assert (second / "again.png").read_bytes() == (first / "made.png").read_bytes()


def test_fallback_sampler_notice_reaches_generate_eval_and_compare(tmp_path, capsys):
    """A scheduler diffguide has no sampler for says which one it samples with. Before: the Python
    API said it (out.notices), the commands did not."""
    from diffguide.assets import path

    folder = str(tmp_path / "m")
    shutil.copytree(path("toy-small"), folder)
    _edit_json(os.path.join(folder, "model_index.json"), scheduler=["diffusers", "PNDMScheduler"])
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    notice = "diffguide: notice: PNDMScheduler without skip_prk_steps"
    for argv in (
        ["generate", "a red circle", "-o", str(tmp_path / "g.png")],
        ["eval", "--prompts", str(tmp_path / "prompts.txt"), "--n", "1"],
        [
            "compare",
            "a red circle",
            "--guidance",
            "none",
            "--n",
            "1",
            "-o",
            str(tmp_path / "c.png"),
        ],
    ):
        code, _, err = run(capsys, *argv, "--model", folder, "--steps", "2", "--quiet")
        assert code == 0 and err.count(notice) == 1, (argv[0], err)
    code, _, err = run(
        capsys,
        "generate",
        "a red circle",
        "--model",
        folder,
        "--steps",
        "2",
        "--sampler",
        "euler",
        "-o",
        str(tmp_path / "e.png"),
        "--quiet",
    )
    assert code == 0 and notice not in err, err  # a sampler the user named needs no word


def test_prompt_truncated_notice_reaches_compare(tmp_path, capsys):
    """Before: compare passed the PromptTruncated warning on as a Python warning, not as a notice
    line."""
    prompt = "a red circle" + " and a blue square" * 30
    code, _, err = run(
        capsys,
        "compare",
        prompt,
        "--model",
        "builtin-small",
        "--guidance",
        "none",
        "cfg",
        "--n",
        "1",
        "--steps",
        "2",
        "-o",
        str(tmp_path / "c.png"),
        "--quiet",
    )
    assert code == 0, err
    assert err.count("diffguide: notice: 1 prompt(s) longer than") == 1 and "Warning" not in err, (
        err
    )


@pytest.mark.parametrize("spec", ["pag:layers=", "seg:layers=;", "cfg+slg:layers= "])
def test_a_perturbation_of_no_layer_is_refused(spec, tmp_path, capsys, no_loading):
    """Before: PAG's extra branch ran on no layer, the same pixels as without it at twice the
    cost."""
    code, _, err = run(
        capsys, "generate", "a red circle", "--guidance", spec, "-o", str(tmp_path / "x.png")
    )
    assert one_line_error(code, err) and "names no layer" in err, err
    assert os.listdir(tmp_path) == []
