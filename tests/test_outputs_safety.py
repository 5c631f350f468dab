"""Nothing lost, nothing clobbered, limits before work (issue 30, items 1, 3, 4, 7): --overwrite
touches only the files diffguide writes, every output is created exclusively, requests far beyond a
machine are refused (or confirmed with --large) and output paths are checked before the model loads.
Each case compares the files before and after. Each test failed on the behaviour before the fix (the
reason is in its docstring where it is not plain from the assertions)."""

import errno
import json
import os
from collections import namedtuple

import pytest

from diffguide.cli.main import main
from diffguide.pipelines import GuidedPipeline
from diffguide.pipelines import tiny as tm
from helpers import caption_folder

LOADED = "the model was loaded"


def snapshot(folder) -> dict:
    """Every file (its bytes) and folder (None) under ``folder``, by relative path."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + "/"] = None
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = (
                None if os.path.islink(path) else open(path, "rb").read()
            )
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, *words):
    lines = err.strip().splitlines()
    return (
        code == 2
        and len(lines) == 1
        and lines[0].startswith("diffguide: error:")
        and "Traceback" not in err
        and all(w in err for w in words)
    )


@pytest.fixture
def no_load(monkeypatch):
    """Loading a model fails loudly (exit 1, LOADED): a check that passes shows up as that
    failure."""

    def boom(*args, **kwargs):
        raise RuntimeError(LOADED)

    monkeypatch.setattr(GuidedPipeline, "from_pretrained", boom)


@pytest.fixture
def no_sampling(monkeypatch):
    """The model loads, but sampling fails loudly: checks made after loading and before work
    show."""

    def boom(self, *args, **kwargs):
        raise RuntimeError("sampling started")

    monkeypatch.setattr(GuidedPipeline, "run", boom)


@pytest.fixture
def plenty_of_space(monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**60, 0, 2**59))


def project(folder):
    """A folder with files of someone's own."""
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.py").write_text("print('mine')\n")
    (folder / "notes.txt").write_text("my notes\n")


# -- item 1: --overwrite replaces only the files diffguide writes
# -----------------------------------


def test_tiny_model_overwrite_keeps_the_folders_other_files(tmp_path, capsys):
    """Before: the folder was removed as a whole, src/main.py with it."""
    folder = tmp_path / "m"
    tm.save(str(folder), "sd")
    project(folder)
    (folder / "unet" / "NOTES.md").write_text("about this unet\n")
    before = snapshot(folder)
    code, _, err = run(capsys, "tiny-model", folder, "--overwrite")
    assert code == 0, err
    after = snapshot(folder)
    assert sorted(after) == sorted(before)  # the same model's files, by the same names
    for mine in ("src/main.py", "notes.txt", "unet/NOTES.md"):
        assert after[mine] == before[mine]
    assert not [p for p in after if ".diffguide-tiny-" in p]
    assert json.loads(after["model_index.json"])["_class_name"] == "StableDiffusionPipeline"


def test_tiny_model_of_another_family_removes_only_the_old_models_own_files(tmp_path, capsys):
    """An SD folder overwritten with DiT: the SD components' weights, configs and tokenizer files go
    (a stale tokenizer or config beside the new model could be loaded with it), a component folder
    goes only when nothing else is in it, and every other file stays. Before: the folder was
    removed."""
    folder = tmp_path / "m"
    tm.save(str(folder), "sd")
    project(folder)
    (folder / "unet" / "NOTES.md").write_text("about this unet\n")
    before = snapshot(folder)
    fresh = snapshot(tm.save(str(tmp_path / "dit"), "dit"))
    code, _, err = run(capsys, "tiny-model", folder, "--overwrite", "--family", "dit")
    assert code == 0, err
    after = snapshot(folder)
    old_model = {
        p
        for p in before
        if p.split("/")[0] in ("unet", "text_encoder", "tokenizer", "vae", "scheduler")
        and not p.endswith("/")
        and p != "unet/NOTES.md"
    } | {"model_index.json"}
    kept = {
        p
        for p in before
        if p not in old_model and p.split("/")[0] not in ("text_encoder", "tokenizer")
    }
    assert set(after) == kept | set(fresh)
    assert (
        after["unet/NOTES.md"] == before["unet/NOTES.md"]
        and after["src/main.py"] == before["src/main.py"]
    )
    assert not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert json.loads(after["model_index.json"])["_class_name"] == "DiTPipeline"
    assert {p: after[p] for p in fresh if p != "model_index.json"} == {
        p: v for p, v in fresh.items() if p != "model_index.json"
    }  # the new model's files, as saved


def test_tiny_model_refuses_a_folder_that_holds_no_model(tmp_path, capsys, monkeypatch):
    """`diffguide tiny-model . --overwrite` in a project folder. Before: exit 0, src/main.py
    deleted."""
    project(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, "tiny-model", ".", *extra)
        assert one_line(code, err, "not a diffusers model folder", "model_index.json"), err
        assert snapshot(tmp_path) == before


def test_tiny_model_takes_an_empty_folder_and_keeps_a_model_without_overwrite(tmp_path, capsys):
    """An empty folder has nothing to lose (before: refused as existing); a model folder is replaced
    only with --overwrite."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "tiny-model", empty)
    assert code == 0, err
    assert (empty / "model_index.json").is_file() and not [
        p for p in os.listdir(empty) if p.startswith(".")
    ]
    before = snapshot(empty)
    code, _, err = run(capsys, "tiny-model", empty)
    assert one_line(code, err, "holds a model", "--overwrite"), err
    assert snapshot(empty) == before


# -- item 3: every file any command writes is created exclusively ----------------------------------


@pytest.fixture
def one_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n")
    return path


@pytest.mark.parametrize("flag", ["--out", "--per-image", "--grid"])
def test_eval_keeps_an_existing_file(flag, tmp_path, capsys, no_load):
    """Before: eval had no --overwrite, replaced --grid silently and checked nothing: it went on to
    load the model (here: exit 1)."""
    target = tmp_path / ("x.png" if flag == "--grid" else "x.json")
    target.write_bytes(b"keep")
    code, _, err = run(capsys, "eval", flag, target, "--n", 1)
    assert one_line(code, err, str(target), "exists", "--overwrite"), err
    assert target.read_bytes() == b"keep" and os.listdir(tmp_path) == [target.name]


def test_eval_overwrite_replaces_its_files(tmp_path, capsys, one_prompt):
    """Before: --overwrite was not an eval flag (exit 2)."""
    files = {
        "--out": tmp_path / "r.json",
        "--per-image": tmp_path / "p.jsonl",
        "--grid": tmp_path / "g.png",
    }
    for path in files.values():
        path.write_bytes(b"old")
    (tmp_path / "mine.txt").write_text("mine")
    code, _, err = run(
        capsys,
        "eval",
        "--prompts",
        one_prompt,
        "--n",
        1,
        "--steps",
        1,
        "--quiet",
        "--overwrite",
        *[x for flag, path in files.items() for x in (flag, path)],
    )
    assert code == 0, err
    assert json.loads(files["--out"].read_text())["images_per_prompt"] == 1
    assert json.loads(files["--per-image"].read_text().splitlines()[0])["seed"] is not None
    assert files["--grid"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["mine.txt", "prompts.txt", "r.json", "p.jsonl", "g.png"]
    )


@pytest.mark.parametrize("flag", ["--out", "--per-image", "--grid"])
def test_eval_file_flags_naming_a_folder_are_one_line(flag, tmp_path, capsys, no_load):
    """Before: --out FOLDER ended in IsADirectoryError (exit 1) after the work; --grid FOLDER wrote
    into it."""
    folder = tmp_path / "d"
    folder.mkdir()
    for extra in ([], ["--overwrite"]):
        code, _, err = run(capsys, "eval", flag, folder, *extra)
        assert one_line(code, err, flag, "is a folder"), err
        assert os.listdir(folder) == []


def test_eval_refuses_one_file_for_two_outputs(tmp_path, capsys, no_load):
    """Before: the second write found the first one's file after all the work."""
    code, _, err = run(
        capsys, "eval", "--out", tmp_path / "a.json", "--per-image", tmp_path / "a.json"
    )
    assert one_line(code, err, "--out", "--per-image"), err
    assert os.listdir(tmp_path) == []


def test_compare_output_naming_a_folder_is_one_line(tmp_path, capsys, no_load):
    """Before: the grid went into the folder as 000000.png (here: the model loaded, exit 1)."""
    folder = tmp_path / "grids"
    folder.mkdir()
    code, _, err = run(capsys, "compare", "a red circle", "-o", folder, "--overwrite")
    assert one_line(code, err, "is a folder"), err
    assert os.listdir(folder) == []


def test_calibrate_output_naming_a_folder_is_one_line(tmp_path, capsys, no_load):
    """Before: with --overwrite the folder passed the check and the run ended in
    IsADirectoryError."""
    folder = tmp_path / "coefficients"
    folder.mkdir()
    code, _, err = run(capsys, "calibrate-linearag", "-o", folder, "--overwrite")
    assert one_line(code, err, "is a folder"), err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return tm.save(str(tmp_path_factory.mktemp("teacher") / "t"), "pixel_sd")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return caption_folder(tmp_path_factory.mktemp("data"), 8)


def previous_run(out, teacher):
    """A folder holding a previous run's files (no checkpoint: killed before its first), a student
    with a note of the user's, and a file of the user's."""
    out.mkdir()
    (out / "config.json").write_text('{"old": true}')
    (out / "loss.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    tm.save(str(out / "student"), "pixel_sd")
    (out / "student" / "NOTES.md").write_text("which run this was\n")
    (out / "mine.txt").write_text("mine")


def distill(out, teacher, data, *extra):
    return [
        "distill",
        "consistency",
        "--teacher",
        teacher,
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        1,
        "--batch",
        2,
        "--skip",
        100,
        "--log-every",
        1,
        "--quiet",
        *extra,
    ]


def test_distill_new_run_keeps_a_previous_runs_files(tmp_path, capsys, teacher, data, no_load):
    """Before: a new run emptied loss.jsonl (and would replace the rest) before loading the
    teacher."""
    out = tmp_path / "run"
    previous_run(out, teacher)
    before = snapshot(out)
    code, _, err = run(capsys, *distill(out, teacher, data))
    assert one_line(code, err, "--resume", "--overwrite"), err
    assert snapshot(out) == before


def test_distill_overwrite_replaces_only_its_own_files(tmp_path, capsys, teacher, data):
    """Before: --overwrite was not a distill flag, and the student folder was removed as a whole."""
    out = tmp_path / "run"
    previous_run(out, teacher)
    before = snapshot(out)
    code, _, err = run(capsys, *distill(out, teacher, data, "--overwrite"))
    assert code == 0, err
    after = snapshot(out)
    assert (
        after["mine.txt"] == before["mine.txt"]
        and after["student/NOTES.md"] == before["student/NOTES.md"]
    )
    assert (
        after["config.json"] != before["config.json"]
        and json.loads(after["config.json"])["max_steps"] == 1
    )
    assert [json.loads(x)["step"] for x in after["loss.jsonl"].decode().splitlines()] == [1]
    assert (
        after["student/diffguide.json"]
        and after["student/unet/diffusion_pytorch_model.safetensors"]
        != before["student/unet/diffusion_pytorch_model.safetensors"]
    )


def test_distill_out_naming_a_file_is_one_line(tmp_path, capsys, teacher, data, no_load):
    """Before: the teacher loaded first (here: exit 1); without the stub, os.makedirs failed (exit
    1)."""
    out = tmp_path / "run"
    out.write_text("a file")
    code, _, err = run(capsys, *distill(out, teacher, data))
    assert one_line(code, err, "is a file"), err
    assert out.read_text() == "a file"


# -- item 4: limits before work
# ---------------------------------------------------------------------

OVER = {  # each past one bound: steps, pixels an image, images x steps x pixels
    "steps": (["--steps", "10001"], ["10,001", "10,000"]),
    "pixels": (["--height", "4096", "--width", "4104"], ["4104x4096", "16,777,216"]),
    "work": (
        ["--seeds", "0-99", "--steps", "1000", "--height", "4096", "--width", "4096"],
        ["100 images", "2^40"],
    ),
}
AT = {
    "steps": ["--steps", "10000"],
    "pixels": ["--height", "4096", "--width", "4096"],
    "work": ["--seeds", "0-64", "--steps", "1000", "--height", "4096", "--width", "4096"],
}


def test_limits_refuse_before_loading_and_large_confirms(
    tmp_path, capsys, no_load, plenty_of_space
):
    """Over a bound: one line naming the value, the bound and --large, before the model loads; at
    the
    bound, or with --large, the run goes on (here: to the stubbed loading). Before: every request
    went to loading (exit 1), and --large was not a flag."""
    for name, (extra, words) in OVER.items():
        code, _, err = run(capsys, "generate", "a", "-o", tmp_path / "o", *extra)
        assert one_line(code, err, "--large", *words), (name, err)
        code, _, err = run(capsys, "generate", "a", "-o", tmp_path / "o", *extra, "--large")
        assert code == 1 and LOADED in err, (name, err)
        code, _, err = run(capsys, "generate", "a", "-o", tmp_path / "o", *AT[name])
        assert code == 1 and LOADED in err, (name, err)
    assert os.listdir(tmp_path) == []


def test_limits_with_the_models_own_size_are_checked_before_work(capsys, monkeypatch):
    """eval takes the model's size, known once it loads: checked then, before any image. Before: the
    work started (here: the stubbed prompt_set, exit 1)."""
    from diffguide.cli import evaluate

    monkeypatch.setattr(
        evaluate, "prompt_set", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("work started"))
    )
    code, _, err = run(capsys, "eval", "--n", 100000, "--steps", 1000, "--quiet")
    assert one_line(code, err, "2,100,000 images", "1,000 steps", "1,024 pixels", "--large"), err


def test_long_runs_say_their_size_up_front(tmp_path, capsys, monkeypatch, plenty_of_space):
    """`--seeds 0-1000000` and `eval --n 100000` say how many images before the first one. Before:
    nothing was said."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        GuidedPipeline, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    code, _, err = run(
        capsys, "generate", "a red circle", "--seeds", "0-1000000", "--steps", 1, "--quiet"
    )
    assert code == 130 and "1,000,001 images x 1 steps at 32x32" in err, err
    from diffguide.cli import evaluate

    monkeypatch.setattr(
        evaluate, "prompt_set", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
    )
    code, _, err = run(capsys, "eval", "--n", 100000, "--steps", 1, "--quiet")
    assert code == 130 and "2,100,000 images x 1 steps at 32x32" in err, err
    assert os.listdir(tmp_path) == []


def test_the_time_estimate_follows_the_first_batch(tmp_path, capsys):
    """Before: a run of several batches said nothing until its end."""
    code, out, err = run(
        capsys,
        "generate",
        "a red circle",
        "--seeds",
        "0-3",
        "--batch",
        2,
        "--steps",
        1,
        "--quiet",
        "-o",
        tmp_path / "o",
    )
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0].startswith("diffguide: 4 images x 1 steps at 32x32, in 2 batches")
    assert lines[1].startswith("diffguide: the first 2 image(s) took ") and lines[1].endswith(
        "more for the other 2"
    )
    assert len(out.split()) == 4


# -- item 7: output paths checked before work
# -------------------------------------------------------


def test_names_over_the_limit_are_refused_before_loading(tmp_path, capsys, no_load):
    """Before: the model loaded and sampled first, and the failed write left the folders it made."""
    for output in (tmp_path / ("a" * 300 + ".png"), tmp_path / "new" / ("b" * 300) / "x.png"):
        code, _, err = run(capsys, "generate", "a", "-o", output)
        assert one_line(code, err, "bytes", "at most 255"), err
        assert len(err) < 400  # the long name is shortened in the message
    assert os.listdir(tmp_path) == []


def test_paths_over_the_limit_are_refused_before_loading(tmp_path, capsys, no_load):
    deep = tmp_path.joinpath(
        *["d" * 200] * 21, "x.png"
    )  # each name short, the whole over 4096 bytes
    code, _, err = run(capsys, "generate", "a", "-o", deep)
    assert one_line(code, err, "full path", "at most 4095"), err
    assert os.listdir(tmp_path) == []


def test_free_space_is_checked_before_work(tmp_path, capsys, no_load, monkeypatch):
    """Before: a full disk showed only when the first file failed, after the work."""
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 50_000, 50_000))
    code, _, err = run(
        capsys,
        "generate",
        "a",
        "--seeds",
        "0-3",
        "--height",
        64,
        "--width",
        64,
        "-o",
        tmp_path / "o",
    )
    assert one_line(code, err, "50.0 KB free", "--large"), err
    code, _, err = run(
        capsys,
        "generate",
        "a",
        "--seeds",
        "0-3",
        "--height",
        64,
        "--width",
        64,
        "-o",
        tmp_path / "o",
        "--large",
    )
    assert code == 1 and LOADED in err, err
    assert os.listdir(tmp_path) == []


def test_free_space_with_the_models_own_size(tmp_path, capsys, no_sampling, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 20_000, 20_000))
    code, _, err = run(capsys, "generate", "a", "--seeds", "0-3", "-o", tmp_path / "o")
    assert one_line(code, err, "20.0 KB free"), err


def test_a_dangling_link_as_output_is_named(tmp_path, capsys, no_load):
    """Before: the run did its work and then said the file 'appeared while this run was working'."""
    for name in ("x.png", "folder"):
        link = tmp_path / name
        link.symlink_to(tmp_path / "nowhere" / name)
        before = snapshot(tmp_path)
        code, _, err = run(capsys, "generate", "a", "-o", link)
        assert one_line(code, err, "symbolic link", "does not exist"), err
        assert "appeared" not in err and snapshot(tmp_path) == before and os.readlink(link)


def test_a_folder_in_an_images_place_is_kept_even_with_overwrite(tmp_path, capsys, no_load):
    """Before: --overwrite skipped the check and the rename onto the folder failed after the
    work."""
    (tmp_path / "o" / "000000.png").mkdir(parents=True)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, "generate", "a", "-o", tmp_path / "o", "--overwrite")
    assert one_line(code, err, "000000.png", "is a folder"), err
    assert snapshot(tmp_path) == before


def test_a_failed_write_leaves_no_empty_folders(tmp_path, capsys, monkeypatch):
    """A full disk on the first image: the error names the file, and the folders the run made are
    gone. Before: '[Errno 28] No space left on device' with no path, and a/b/ left behind."""
    from diffguide import images

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images, "_encode", full)
    target = tmp_path / "a" / "b" / "x.png"
    code, _, err = run(capsys, "generate", "a red circle", "--steps", 1, "--quiet", "-o", target)
    assert code == 1 and "No space left on device" in err and str(target) in err, err
    assert os.listdir(tmp_path) == []
