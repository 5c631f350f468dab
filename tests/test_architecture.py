"""The layers of docs/architecture.md, kept: no import runs up, core/ is torch only, diffusers only
where it belongs. Read from the source (ast), so a lazy import inside a function counts too."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "diffguide")

# lowest first; a package may import from a lower layer or from itself
LAYERS = {
    "core": 0,
    "files": 0,
    "parallel": 0,
    "versions": 0,
    "assets": 0,
    "guidance": 1,
    "samplers": 1,
    "toy": 1,
    "images": 1,
    "noise": 2,
    "cache": 2,  # step caches: hooks on the network's blocks, beside the perturbations they follow
    "pipelines": 3,
    "comfy": 3,  # the ComfyUI node pack: beside pipelines, never importing them
    "evaluate": 4,
    "distill": 5,
    "cli": 6,
    "__main__": 7,
    "__init__": 7,
}
ROOT_NAMES = {"__version__", "_threads"}  # the version string; the command's thread policy, first
CORE_MAY_IMPORT = {"torch", "numpy", "__future__"}
DIFFUSERS_IN = {"pipelines", "distill"}


def imports(path: str, module: str, is_package: bool):
    """(line, absolute module, names) of each import in a file."""
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name, tuple(a.name for a in node.names)


def modules():
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                package = rel.endswith(".__init__")
                yield path, rel[:-9] if package else rel, package


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_runs_up_the_layers():
    bad = []
    for path, module, package in modules():
        own = layer_of(module)
        for line, name, names in imports(path, module, package):
            if not name.startswith("diffguide"):
                continue
            targets = (
                [layer_of(name)]
                if name != "diffguide"
                else [n for n in names if n not in ROOT_NAMES]
            )
            for target in targets:
                target = layer_of(f"diffguide.{target}") if name == "diffguide" else target
                if target != own and LAYERS.get(target, 99) >= LAYERS.get(own, -1):
                    bad.append(
                        f"{os.path.relpath(path, ROOT)}:{line} ({own}) imports {name} ({target})"
                    )
    assert not bad, "imports that run up:\n" + "\n".join(bad)


def test_core_imports_torch_numpy_and_the_standard_library_only():
    import sys

    stdlib = set(sys.stdlib_module_names)
    bad = [
        f"{os.path.relpath(p, ROOT)}:{line} imports {name}"
        for p, m, pkg in modules()
        if layer_of(m) == "core"
        for line, name, _ in imports(p, m, pkg)
        if name
        and not name.startswith("diffguide")
        and name.split(".")[0] not in CORE_MAY_IMPORT | stdlib
    ]
    assert not bad, "\n".join(bad)


def test_diffusers_is_imported_only_by_pipelines_and_distill():
    bad = [
        f"{os.path.relpath(p, ROOT)}:{line}"
        for p, m, pkg in modules()
        if layer_of(m) not in DIFFUSERS_IN
        for line, name, _ in imports(p, m, pkg)
        if name.split(".")[0] == "diffusers"
    ]
    assert not bad, "diffusers imported in: " + ", ".join(bad)


def test_the_check_sees_an_import_that_runs_up(tmp_path, monkeypatch):
    """The checker itself: a core module importing pipelines is caught."""
    fake = tmp_path / "diffguide" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..pipelines import GuidedPipeline\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path / "diffguide"))
    try:
        test_no_import_runs_up_the_layers()
    except AssertionError as e:
        assert "core/bad.py:1 (core) imports diffguide.pipelines" in str(e)
    else:
        raise AssertionError("an import running up was not caught")
