"""The README's Python example runs as written; the CLI's commands and its error contract."""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs(capsys):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "torch.Size([256, 2]) NFE per sample: 40" in out
    assert "2 (16, 16) NFE per image: 24" in out
    assert "true CFG NFE per image: 12" in out


CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def test_readme_starts_with_the_two_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    cmds = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert cmds[0].strip().startswith(CPU_TORCH + ' && pip install -e ".[test]"')
    assert cmds[1].strip() == "pytest"


def test_ci_installs_torch_as_the_readme_says():
    """The README's first command takes torch from PyTorch's CPU index (the public index's
    torch==2.13.0 is the CUDA build), and CI installs it with that same line in every environment
    and checks it got the CPU build."""
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    body = re.search(r"^cpu_torch\(\) \{\n(.*?)\n\}", ci, re.S | re.M)[1]
    assert CPU_TORCH.replace("pip install", "pip install -q") in body
    assert "torch.version.cuda" in body and "cuda is None and v.endswith('+cpu')" in body
    # every environment CI makes gets torch through it, and in no other way
    assert ci.count("python3 -m venv") == ci.count("\ncpu_torch\n") == 3
    assert ci.count("pip install -q torch") == 1


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "diffguide", *args], capture_output=True, text=True
    )


def test_cli_list_and_mixture():
    r = _cli("list")
    assert r.returncode == 0 and "dpmpp_3m_published" in r.stdout and "cfg" in r.stdout
    r = _cli("mixture", "--n", "64", "--steps", "10", "--guidance", "cfg:scale=2")
    assert r.returncode == 0, r.stderr
    assert '"nfe_per_sample": 20' in r.stdout and '"in_class_fraction"' in r.stdout


@pytest.mark.parametrize(
    "args,msg",
    [
        (["mixture", "--sampler", "dpm_2m"], "unknown sampler 'dpm_2m'; choose one of:"),
        (["mixture", "--guidance", "cfg:scale"], "malformed guidance spec"),
        (["mixture", "--guidance", "cfg:size=2"], "has no option 'size'"),
        (["mixture", "--steps", "0"], "steps must be an integer >= 1, got 0"),
        (["mixture", "--spacing", "cosine"], "invalid choice: 'cosine'"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_cli_errors_are_one_line(args, msg):
    r = _cli(*args)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_readme_generate_commands_run(tmp_path):
    """The README's command-line block runs as written (in a scratch folder)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = next(
        b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "diffguide tiny-model" in b
    )
    lines = [ln for ln in block.strip().splitlines() if ln.startswith("diffguide ")]
    assert len(lines) >= 2
    for line in lines:
        args = shlex.split(line)[1:]
        r = subprocess.run(
            [sys.executable, "-m", "diffguide", *args], capture_output=True, text=True, cwd=tmp_path
        )
        assert r.returncode == 0, (line, r.stderr)
    assert sorted(os.listdir(tmp_path / "out")) == [f"{s:06d}.png" for s in range(4)]
    assert (tmp_path / "square.png").exists()


def test_readme_family_commands_run(tmp_path):
    """The Flux, SANA-Sprint and image-to-image commands run as written."""
    text = open(os.path.join(ROOT, "README.md")).read()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "--family flux" in b)
    lines = [ln for ln in block.strip().splitlines() if ln.startswith("diffguide ")]
    assert any("sana_sprint" in ln for ln in lines) and any("--init-image" in ln for ln in lines)
    for line in lines:
        r = subprocess.run(
            [sys.executable, "-m", "diffguide", *shlex.split(line)[1:]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert r.returncode == 0, (line, r.stderr)
    assert {"flux.png", "flux-cfg.png", "sprint.png", "flux-edit.png"} <= set(os.listdir(tmp_path))


def test_readme_guidance_commands_run(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = [
        b
        for b in re.findall(r"```bash\n(.*?)```", text, re.S)
        if "calibrate-linearag" in b or "--stitch" in b
    ]
    assert len(blocks) == 2
    for line in [
        ln.split("#")[0]
        for b in blocks
        for ln in b.strip().splitlines()
        if ln.startswith("diffguide ")
    ]:
        r = subprocess.run(
            [sys.executable, "-m", "diffguide", *shlex.split(line)[1:]],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert r.returncode == 0, (line, r.stderr)
    assert (tmp_path / "lag.json").exists() and (tmp_path / "lag.png").exists()
    assert (tmp_path / "stitch.png").exists() and (tmp_path / "stitch.json").exists()


def test_newcomer_small_items(tmp_path):
    """Issue 40's small items: tiny-model folders have the umask's mode (not mkdtemp's private
    700), outputs/ is ignored by git, distill --help explains --max-steps and --batch, and
    diffguide list gives whole first sentences."""
    r = _cli("tiny-model", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o777 & ~mask
    assert "outputs/" in open(os.path.join(ROOT, ".gitignore")).read().split()
    text = _cli("distill", "scm", "--help").stdout
    assert "training steps in all" in text and "examples per training step" in text
    listing = _cli("list").stdout
    assert "(Lu et al. 2022, Sec. 5 and App. B); eta scales the" in listing


def test_callback_on_step_end_warns_nothing():
    import warnings

    from diffguide.pipelines import GuidedPipeline
    from diffguide.pipelines import tiny

    gp = GuidedPipeline(tiny.sd(), progress=False)
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gp("a cat", steps=2, callback_on_step_end=lambda p, i, t, kw: seen.append(t) or kw)
    assert len(seen) == 2 and not [w for w in caught if issubclass(w.category, UserWarning)]
