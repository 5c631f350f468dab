"""Writing generated images: where they go, what they carry, and never losing a file.

- Names: a folder gets ``000007.png`` by seed; the default folder takes A1111's habit of a running
  counter plus the seed (``outputs/00012-7.png``), the counter claimed at write time, so that
  concurrent runs never take the same name.
- Never replaced: a file is written under a temporary name and then linked to its final name,
  which fails if the name exists (``overwrite`` renames over it instead). Nothing half-written is
  ever visible under a final name.
- Metadata: PNG text chunks (``parameters`` in A1111's layout, ``diffguide`` as JSON); JPEG and WebP
  carry the same two in EXIF (UserComment, as A1111 writes it, and ImageDescription).
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
UNSUPPORTED = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".jxl")
DEFAULT_FOLDER = "outputs"
_COUNTER = re.compile(r"^(\d+)-")

# diffguide sampler -> A1111's sampler name; spacing -> A1111's "Schedule type"
A1111_SAMPLERS = {"ddim": "DDIM", "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "lms": "LMS",
                  "dpm2": "DPM2", "dpm2_ancestral": "DPM2 a", "unipc": "UniPC", "plms": "PLMS", "ipndm": "iPNDM",
                  "deis": "DEIS", "tcd": "TCD", "restart": "Restart", "dpmpp_sde": "DPM++ SDE",
                  "dpmpp_2s_singlestep": "DPM++ 2S",
                  "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2s_ancestral": "DPM++ 2S a",
                  "dpmpp_3m_sde": "DPM++ 3M SDE", "consistency": "LCM"}
A1111_SCHEDULES = {"karras": "Karras", "uniform_lam": "Exponential", "exponential": "Exponential",
                   "polyexponential": "Polyexponential", "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal",
                   "ays": "Align Your Steps", "simple": "Simple", "beta": "Beta"}
EXIF_USER_COMMENT, EXIF_IFD, IMAGE_DESCRIPTION = 0x9286, 0x8769, 0x010E


class Outputs:
    """Where a run's images go: ``output`` is a file path (.png, .jpg, .jpeg, .webp), a folder, or
    None for the default folder with counter names. Checked (and the folder proven writable) before
    any work."""

    def __init__(self, output: str | None, seeds: list[int], overwrite: bool = False):
        self.overwrite, self.counter = overwrite, output is None
        if output is not None and not output.strip():
            raise ValueError("the output path is empty; give a file (.png, .jpg, .webp) or a folder")
        output = DEFAULT_FOLDER if output is None else os.path.expanduser(output)
        ext = os.path.splitext(output)[1].lower()
        if ext in UNSUPPORTED:
            raise ValueError(f"cannot write {ext} images ({output!r}); use {', '.join(FORMATS)} or a folder")
        if ext in FORMATS and not os.path.isdir(output):
            self.folder = os.path.dirname(os.path.abspath(output))
            stem = output[: -len(ext)]
            self.paths = [output] if len(seeds) == 1 else [f"{stem}-{s:06d}{ext}" for s in seeds]
        else:
            if os.path.exists(output) and not os.path.isdir(output):
                raise ValueError(f"output {output!r} is a file without an image extension; give a folder, or "
                                 f"a path ending in {', '.join(FORMATS)}")
            self.folder = os.path.abspath(output)
            self.paths = [None] * len(seeds) if self.counter else \
                [os.path.join(output, f"{s:06d}.png") for s in seeds]
        self.seeds = list(seeds)
        if not overwrite:
            for p in self.paths:
                if p is not None and os.path.exists(p):
                    raise ValueError(f"output {p!r} exists; pass --overwrite to replace it")
        prove_writable(self.folder)

    def path_for(self, seed: int) -> str | None:
        """The seed's final path (None: a counter name, claimed when written)."""
        return self.paths[self.seeds.index(seed)]

    def write(self, image, seed: int, meta: dict, parameters: str | None = None) -> str:
        """Write one image (never replacing a file unless ``overwrite``); returns its path."""
        target = self.path_for(seed)
        ext = ".png" if target is None else os.path.splitext(target)[1].lower()
        os.makedirs(self.folder, exist_ok=True)
        tmp = _encode(image, self.folder, ext, meta, parameters)
        try:
            if target is None:
                return _claim_counter_name(tmp, self.folder, seed, ext)
            if self.overwrite:
                os.replace(tmp, target)
            else:
                _link_exclusive(tmp, target)
            return target
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def prove_writable(folder: str) -> None:
    """Create and remove a temporary file in the folder, or in its deepest existing parent when it
    does not exist yet (it is created when the first image is written): a path that cannot be
    written fails here, before any work, and leaves nothing behind."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"cannot write to output folder {folder!r}: {probe!r} is a file")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".diffguide-probe-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ValueError(f"cannot write to output folder {folder!r}: {e.strerror or e}") from None


def _encode(image, folder: str, ext: str, meta: dict, parameters: str | None) -> str:
    """The image with its metadata in a temporary file in ``folder`` (readable as a plain file)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diffguide-", suffix=ext + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fmt = FORMATS[ext]
            if fmt == "PNG":
                from PIL.PngImagePlugin import PngInfo

                info = PngInfo()
                if parameters is not None:
                    info.add_text("parameters", parameters)
                info.add_text("diffguide", json.dumps(meta, sort_keys=True))
                image.save(f, format="PNG", pnginfo=info)
            else:
                from PIL import Image

                exif = Image.Exif()
                exif[IMAGE_DESCRIPTION] = json.dumps(meta, sort_keys=True)  # ASCII: json escapes the rest
                if parameters is not None:  # A1111's own encoding: 'UNICODE\0' + UTF-16 big-endian
                    # (a dict set on the IFD tag: Pillow before 13 drops edits made through get_ifd)
                    exif[EXIF_IFD] = {EXIF_USER_COMMENT: b"UNICODE\0" + parameters.encode("utf-16-be")}
                image.save(f, format=fmt, quality=95, exif=exif)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plain file is expected
        return tmp
    except BaseException:
        os.remove(tmp)
        raise


def _link_exclusive(tmp: str, target: str) -> None:
    """Give the finished file its name only if no file has it (hard link; where a file system has
    no links, an exclusive placeholder that the finished file then replaces)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise ValueError(f"output {target!r} appeared while this run was working; kept it (pass "
                         f"--overwrite to replace it)") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise ValueError(f"output {target!r} appeared while this run was working; kept it") from None
        os.replace(tmp, target)


def next_counter(folder: str) -> int:
    """One more than the largest leading number of ``NNNNN-...`` names in the folder."""
    best = -1
    for name in os.listdir(folder):
        m = _COUNTER.match(name)
        if m:
            best = max(best, int(m.group(1)))
    return best + 1


def _claim_counter_name(tmp: str, folder: str, seed: int, ext: str) -> str:
    """The first free ``NNNNN-SEED.ext`` from the folder's next counter on, taken exclusively: two
    runs that read the same counter get different names."""
    k = next_counter(folder)
    while True:
        path = os.path.join(folder, f"{k:05d}-{seed}{ext}")
        try:
            _link_exclusive(tmp, path)
            return path
        except ValueError:
            k += 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- A1111's "parameters" text --------------------------------------------------------------------

def quote(value) -> str:
    """A1111's quoting: a value with a comma, colon or newline becomes a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def parameters_text(meta: dict) -> str:
    """The ``parameters`` text in A1111's layout (prompt; ``Negative prompt:``; one line of
    ``Key: value`` fields), readable by its ``parse_generation_parameters`` with every field intact:
    its sampler and schedule names where diffguide's sampler has one, diffguide's own specs beside."""
    lines = [str(meta["prompt"])]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    name = str(meta["sampler"]).split(":")[0]
    fields = [("Steps", meta["steps"]), ("Sampler", A1111_SAMPLERS.get(name, meta["sampler"]))]
    if meta.get("spacing") in A1111_SCHEDULES:
        fields.append(("Schedule type", A1111_SCHEDULES[meta["spacing"]]))
    if meta.get("scale") is not None:
        fields.append(("CFG scale", meta["scale"]))
    if meta.get("embedded_guidance") is not None:  # Forge's name for Flux's guidance input
        fields.append(("Distilled CFG Scale", meta["embedded_guidance"]))
    fields += [("Seed", meta["seed"]), ("Size", f"{meta['width']}x{meta['height']}"), ("Model", meta["model"])]
    if meta.get("strength") is not None:  # image-to-image
        fields.append(("Denoising strength", meta["strength"]))
    fields += [("diffguide guidance", meta["guidance"]), ("diffguide sampler", meta["sampler"])]
    if meta.get("spacing"):
        fields.append(("diffguide spacing", meta["spacing"]))
    fields.append(("Version", f"diffguide {meta['version']}"))
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields))
    return "\n".join(lines)


def read_metadata(path: str) -> dict:
    """The ``diffguide`` JSON an image written by ``Outputs.write`` carries (PNG text chunk, or EXIF
    ImageDescription in JPEG/WebP)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            raw = getattr(im, "text", {}).get("diffguide") if im.format == "PNG" else \
                im.getexif().get(IMAGE_DESCRIPTION)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None
    if not raw:
        raise ValueError(f"{path!r} carries no diffguide settings (it was not written by diffguide generate)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{path!r} has unreadable diffguide settings") from None
    if not isinstance(meta, dict) or "prompt" not in meta or "seed" not in meta:
        raise ValueError(f"{path!r} has incomplete diffguide settings")
    return meta
