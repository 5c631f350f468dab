"""Writing generated images: where they go, what they carry, and never losing a file.

- Names: a folder gets ``000007.png`` by seed; the default folder takes A1111's habit of a running
  counter plus the seed (``outputs/00012-7.png``), the counter claimed at write time, so that
  concurrent runs never take the same name.
- Never replaced: a file is written under a temporary name and then linked to its final name,
  which fails if the name exists (``overwrite`` renames over it instead). Nothing half-written is
  ever visible under a final name.
- Metadata: PNG text chunks (``parameters`` in A1111's layout, ``diffguide`` as JSON); JPEG and WebP
  carry the same two in EXIF (UserComment, as A1111 writes it, and ImageDescription). A1111's
  sampler and schedule names are written only where diffguide runs what A1111 runs under them, and
  an image A1111 wrote reads back as the specs that reproduce its names (``read_settings``).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile

from .files import (
    _umask,
    check_link,
    check_path,
    check_space,
    make_folders,
    prove_writable,
    remove_empty,
)

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
UNSUPPORTED = (".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".jxl")
# a video model's clips: MP4 (H.264 through PyAV, the settings in the container's comment tag),
# animated GIF (the settings in its comment) and WebP (in EXIF, as a still's)
VIDEO_FORMATS = {".mp4": "MP4", ".gif": "GIF", ".webp": "WEBP"}
DEFAULT_FPS = 16  # diffusers' export_to_video for Wan
DEFAULT_FOLDER = "outputs"
_COUNTER = re.compile(r"^(\d+)-")

# -- A1111's names, each checked against a transcription of A1111's code in
# tests/test_a1111_labels.py --

# A1111 sampler label -> the diffguide sampler that runs the same function (k-diffusion's, with
# A1111's options) on the same levels
A1111_SAMPLERS = {
    "Euler": "euler",
    "Euler a": "euler_ancestral",
    "Heun": "heun",
    "LMS": "lms",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde:solver_type=heun",
    "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ SDE": "dpmpp_sde",
}
# A1111 labels that no diffguide sampler and spacing reproduce: the nearest spec and what differs.
# They are read from A1111's own images (with a notice) and never written.
_DISCARD = (
    "A1111 drops the next-to-last level of a grid made for steps + 1, which no diffguide spacing "
    "does"
)
_OWN_TIMESTEPS = "A1111 runs its own timesteps 1, 1 + 1000 // steps, ... and stops at timestep 1"
A1111_SAMPLERS_NEAREST = {
    "DPM2": ("dpm2", _DISCARD),
    "DPM2 a": ("dpm2_ancestral", _DISCARD),
    "DPM++ 3M SDE": ("dpmpp_3m_published:eta=1,solver_type=heun,lower_order_final=False", _DISCARD),
    "Restart": (
        "restart",
        "from 20 steps A1111 re-spaces the grid as Karras levels and restarts once "
        "(twice from 36 steps) at 0.1 with its own counts",
    ),
    "DDIM": ("ddim", _OWN_TIMESTEPS),
    "PLMS": ("plms", _OWN_TIMESTEPS + ", with a Heun-like first step"),
    "UniPC": (
        "unipc:order=3,solver_type=bh1",
        "A1111 runs its own time-uniform grid, which stops at the lowest trained level",
    ),
    "LCM": ("consistency", "A1111's LCM runs on its own 50-level table"),
}
A1111_RESTART_PLAIN = 20  # below this many steps A1111's Restart restarts nothing: it is Heun
# A1111 schedule label ("Schedule type") -> the diffguide spacing with the same levels at the same
# steps
A1111_SCHEDULES = {
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "KL Optimal": "kl_optimal_a1111",
    "Align Your Steps": "ays_a1111",
    "Simple": "simple",
    "Beta": "beta",
}
SAME_SPACINGS = {"uniform_lam": "exponential"}  # one grid under two names
# the multistep samplers' lower_order_final acts on a last step that does not land on data, below
# this many steps (samplers.dpmpp.multistep_order); k-diffusion has no such option
LOWER_ORDER_FINAL_BELOW = 15
EXIF_USER_COMMENT, EXIF_IFD, IMAGE_DESCRIPTION = 0x9286, 0x8769, 0x010E


class Outputs:
    """Where a run's images go: ``output`` is a file path (.png, .jpg, .jpeg, .webp), a folder, or
    None for the default folder with counter names. Checked (and the folder proven writable) before
    any work."""

    def __init__(
        self,
        output: str | None,
        seeds: list[int],
        overwrite: bool = False,
        video: bool = False,
        fps: int = DEFAULT_FPS,
    ):
        self.overwrite, self.counter = overwrite, output is None
        self.video, self.fps = video, fps
        formats = VIDEO_FORMATS if video else FORMATS
        self.default_ext = ".mp4" if video else ".png"
        what = "clips" if video else "images"
        if output is not None and not output.strip():
            raise ValueError(
                f"the output path is empty; give a file ({', '.join(formats)}) or a folder"
            )
        output = DEFAULT_FOLDER if output is None else os.path.expanduser(output)
        ext = os.path.splitext(output)[1].lower()
        if (ext in UNSUPPORTED or ext in FORMATS or ext in VIDEO_FORMATS) and ext not in formats:
            raise ValueError(
                f"cannot write {ext} {what} ({output!r}); use {', '.join(formats)} or a folder"
            )
        if ext in formats and not os.path.isdir(output):
            self.folder = os.path.dirname(os.path.abspath(output))
            stem = output[: -len(ext)]
            self.paths = [output] if len(seeds) == 1 else [f"{stem}-{s:06d}{ext}" for s in seeds]
        else:
            if os.path.exists(output) and not os.path.isdir(output):
                raise ValueError(
                    f"output {output!r} is a file without an image extension; give a folder, or "
                    f"a path ending in {', '.join(formats)}"
                )
            self.folder = os.path.abspath(output)
            self.paths = (
                [None] * len(seeds)
                if self.counter
                else [os.path.join(output, f"{s:06d}{self.default_ext}") for s in seeds]
            )
        self.seeds, self.index = list(seeds), {s: i for i, s in enumerate(seeds)}
        self.made, self.written = (
            [],
            0,
        )  # folders this run made (removed again if nothing lands in them)
        check_link(output)
        for p in self.paths if not self.counter else ():
            _check_target(p, overwrite)
        longest = (
            max(self.paths, key=len)
            if not self.counter
            else os.path.join(self.folder, f"99999-{max(seeds, default=0)}{self.default_ext}")
        )
        check_path(longest)
        prove_writable(self.folder)

    def path_for(self, seed: int) -> str | None:
        """The seed's final path (None: a counter name, claimed when written)."""
        return self.paths[self.index[seed]]

    def check_space(self, height: int, width: int, hint: str) -> None:
        """Refuse, before any work, images that cannot fit the free space (an upper estimate per
        file)."""
        check_space(self.folder, len(self.paths) * image_bytes(height, width), hint)

    def write(self, image, seed: int, meta: dict, parameters: str | None = None) -> str:
        """Write one image (never replacing a file unless ``overwrite``); returns its path."""
        target = self.path_for(seed)
        ext = self.default_ext if target is None else os.path.splitext(target)[1].lower()
        self.made += make_folders(self.folder)
        try:
            path = self._place(image, target, seed, ext, meta, parameters)
        except OSError as e:  # a full disk names the file it was writing
            self._tidy()
            raise OSError(e.errno, e.strerror or str(e), target or self.folder) from None
        except BaseException:
            self._tidy()
            raise
        self.written += 1
        return path

    def _place(self, image, target, seed: int, ext: str, meta: dict, parameters) -> str:
        tmp = (
            _encode_clip(image, self.folder, ext, meta, self.fps)
            if self.video
            else _encode(image, self.folder, ext, meta, parameters)
        )
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

    def _tidy(self) -> None:
        """After a failed write: the folders this run made go again while nothing was written in
        them."""
        if not self.written:
            remove_empty(self.made)


def _check_target(path: str, overwrite: bool) -> None:
    """One image's final name, before any work: no folder or dangling link in the way, new unless
    ``overwrite``."""
    if not os.path.lexists(path):
        return
    check_link(path)
    if os.path.isdir(path):
        raise ValueError(
            f"output {path!r} is a folder, where this run writes an image; give another path"
        )
    if not overwrite:
        raise ValueError(f"output {path!r} exists; pass --overwrite to replace it")


def image_bytes(height: int, width: int) -> int:
    """An upper bound on one image file: PNG's unfiltered rows (3 bytes a pixel and a filter byte a
    row), zlib's worst-case growth, and 16 KB for the chunks and metadata (a few KB in practice)."""
    raw = height * (3 * width + 1)
    return raw + raw // 1000 + 16 * 1024


def _temp_file(folder: str, ext: str, write) -> str:
    """``write(f)`` into a temporary file in ``folder`` readable as a plain file; its path (removed
    again if writing fails)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".diffguide-", suffix=ext + ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a plain file is expected
        return tmp
    except BaseException:
        os.remove(tmp)
        raise


def _encode(image, folder: str, ext: str, meta: dict, parameters: str | None) -> str:
    """The image with its metadata in a temporary file in ``folder`` (readable as a plain file)."""

    def write(f):
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
            # ASCII: json escapes the rest
            exif[IMAGE_DESCRIPTION] = json.dumps(meta, sort_keys=True)
            if parameters is not None:  # A1111's own encoding: 'UNICODE\0' + UTF-16 big-endian
                # (a dict set on the IFD tag: Pillow before 13 drops edits made through get_ifd)
                exif[EXIF_IFD] = {EXIF_USER_COMMENT: b"UNICODE\0" + parameters.encode("utf-16-be")}
            image.save(f, format=fmt, quality=95, exif=exif)

    return _temp_file(folder, ext, write)


def _encode_clip(frames: list, folder: str, ext: str, meta: dict, fps: int) -> str:
    """A clip (a list of PIL frames) with its settings in a temporary file in ``folder``."""
    text = json.dumps(meta, sort_keys=True)

    def write(f):
        if ext == ".mp4":
            _write_mp4(f, frames, fps, text)
            return
        from PIL import Image

        extra = {"comment": text.encode()} if ext == ".gif" else {}
        if ext == ".webp":
            exif = Image.Exif()
            exif[IMAGE_DESCRIPTION] = text
            extra = {"exif": exif, "quality": 95}
        frames[0].save(
            f,
            format=VIDEO_FORMATS[ext],
            save_all=True,
            append_images=frames[1:],
            duration=round(1000 / fps),
            loop=0,
            **extra,
        )

    return _temp_file(folder, ext, write)


def _write_mp4(f, frames: list, fps: int, comment: str) -> None:
    """H.264 in MP4 through PyAV (yuv420p: the sides are padded to even numbers of pixels)."""
    try:
        import av
    except ImportError:
        raise ValueError(
            "writing .mp4 needs PyAV (pip install 'diffguide[video]', or pip install av); .gif "
            "and .webp need nothing more"
        ) from None
    import numpy as np

    w, h = frames[0].size
    with av.open(f, mode="w", format="mp4") as container:
        container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
        for frame in frames:
            arr = np.asarray(frame.convert("RGB"))
            arr = np.pad(arr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _link_exclusive(tmp: str, target: str) -> None:
    """Give the finished file its name only if no file has it (hard link; where a file system has
    no links, an exclusive placeholder that the finished file then replaces)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise ValueError(
            f"output {target!r} appeared while this run was working; kept it (pass "
            f"--overwrite to replace it)"
        ) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            raise ValueError(
                f"output {target!r} appeared while this run was working; kept it"
            ) from None
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


# -- A1111's "parameters" text --------------------------------------------------------------------


def quote(value) -> str:
    """A1111's quoting: a value with a comma, colon or newline becomes a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_sampler_name(sampler: str, steps: int, above_data: bool = False) -> str:
    """A1111's label for a diffguide sampler spec where A1111 runs the same function on the same
    levels
    (``A1111_SAMPLERS``), else the spec itself. ``above_data``: the grid's last step does not land
    on data (A1111's KL Optimal), where k-diffusion keeps the multistep order that diffguide's
    lower_order_final lowers."""
    for label, own in A1111_SAMPLERS.items():
        if _same_sampler(sampler, own, steps, above_data):
            return label
    return sampler


def _same_sampler(spec: str, label_spec: str, steps: int, above_data: bool) -> bool:
    """Whether two sampler specs make the same steps on a grid of ``steps`` steps."""
    import dataclasses

    from .core.registry import parse_spec

    mine, theirs = parse_spec("sampler", spec), parse_spec("sampler", label_spec)
    if type(mine) is not type(theirs):
        return False
    if hasattr(theirs, "lower_order_final"):
        # k-diffusion never lowers the order; diffguide's option does only where above_data and few
        # steps
        theirs = dataclasses.replace(theirs, lower_order_final=False)
        if not (above_data and steps < LOWER_ORDER_FINAL_BELOW):
            mine = dataclasses.replace(mine, lower_order_final=False)
    return mine == theirs


def a1111_schedule_name(spacing: str, family: str | None = None) -> str:
    """A1111's "Schedule type" for a diffguide spacing with the same levels (``A1111_SCHEDULES``),
    else
    the spacing's own name. Align Your Steps only for a known SD 1/2 model: A1111 takes its SDXL
    table for SDXL, and diffguide's spacing by name runs the SD 1 table."""
    name = SAME_SPACINGS.get(spacing, spacing)
    for label, own in A1111_SCHEDULES.items():
        if own == name and (own != "ays_a1111" or family == "sd"):
            return label
    return spacing


def _grid_name(grid: dict) -> str:
    """A grid's spacing with its options, in spec form ('leading:steps_offset=1')."""
    options = ",".join(f"{k}={v}" for k, v in grid.items() if k != "spacing")
    return str(grid["spacing"]) + (":" + options if options else "")


def parameters_text(meta: dict, family: str | None = None, grid: dict | None = None) -> str:
    """The ``parameters`` text in A1111's layout (prompt; ``Negative prompt:``; one line of
    ``Key: value`` fields), readable by its ``parse_generation_parameters`` with every field intact:
    A1111's sampler and schedule names where diffguide runs what A1111 runs under them, diffguide's
    own
    names otherwise, and diffguide's specs beside. ``grid``: the model's own grid (its ``timesteps``
    arguments) when ``meta`` names no spacing; ``family``: the model family's name ('sd',
    'sdxl')."""
    from .core.spacing import ABOVE_DATA

    lines = [str(meta["prompt"])]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    grid = {"spacing": meta["spacing"]} if meta.get("spacing") else grid
    above = grid is not None and (grid["spacing"] in ABOVE_DATA or grid.get("final") == "sigma_min")
    fields = [
        ("Steps", meta["steps"]),
        ("Sampler", a1111_sampler_name(meta["sampler"], meta["steps"], above)),
    ]
    if (
        grid is not None
    ):  # a grid with options of its own is no A1111 schedule: it keeps its own name
        plain = set(grid) == {"spacing"}
        fields.append(
            (
                "Schedule type",
                a1111_schedule_name(grid["spacing"], family) if plain else _grid_name(grid),
            )
        )
    if meta.get("scale") is not None:
        fields.append(("CFG scale", meta["scale"]))
    if meta.get("embedded_guidance") is not None:  # Forge's name for Flux's guidance input
        fields.append(("Distilled CFG Scale", meta["embedded_guidance"]))
    fields += [
        ("Seed", meta["seed"]),
        ("Size", f"{meta['width']}x{meta['height']}"),
        ("Model", meta["model"]),
    ]
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
    raw, _ = _read_texts(path)
    if not raw:
        raise ValueError(
            f"{path!r} carries no diffguide settings (it was not written by diffguide generate)"
        )
    return _settings_json(raw, path)


def read_settings(path: str) -> tuple[dict, list[str]]:
    """The settings to make an image again, and notices: diffguide's own JSON where the image
    carries it (no notices), else the ``parameters`` of an image A1111 wrote, mapped by
    ``a1111_settings``."""
    raw, parameters = _read_texts(path)
    if raw:
        return _settings_json(raw, path), []
    if parameters:
        return a1111_settings(parse_parameters(parameters))
    raise ValueError(f"{path!r} carries no diffguide settings and no A1111 parameters")


def _read_texts(path: str) -> tuple[str | None, str | None]:
    """(diffguide JSON, A1111 parameters) an image carries: PNG text chunks, or EXIF
    ImageDescription and UserComment in JPEG and WebP."""
    from PIL import Image, UnidentifiedImageError

    if path.lower().endswith(".mp4"):
        return _mp4_comment(path), None
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                text = getattr(im, "text", {})
                return text.get("diffguide"), text.get("parameters")
            if im.format == "GIF":  # a clip: the settings in its comment
                comment = im.info.get("comment")
                return (comment.decode("utf-8", "replace") if comment else None), None
            exif = im.getexif()
            return exif.get(IMAGE_DESCRIPTION), _user_comment(
                exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
            )
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        # ValueError: Pillow's limits on text chunks (an image is untrusted input)
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def _mp4_comment(path: str) -> str | None:
    """The comment tag of an MP4 clip diffguide wrote (its settings), read through PyAV."""
    try:
        import av
    except ImportError:
        raise ValueError(f"reading {path!r} needs PyAV (pip install av)") from None
    try:
        with av.open(path) as clip:
            return clip.metadata.get("comment")
    except (OSError, av.error.FFmpegError) as e:
        raise ValueError(f"cannot read clip {path!r}: {e}") from None


def _user_comment(raw) -> str | None:
    """EXIF UserComment text: an 8-byte character-code prefix, then UTF-16 (big-endian, as A1111
    writes it) or ASCII."""
    if raw is None or isinstance(raw, str):
        return raw
    if raw.startswith(b"UNICODE\0"):
        return raw[8:].decode("utf-16-be", errors="replace")
    return raw[8:].decode("ascii", errors="replace") if raw.startswith(b"ASCII") else None


def _settings_json(raw: str, path: str) -> dict:
    """The settings JSON an image carries, read as untrusted input: an object of plain values (no
    NaN or Infinity, which diffguide never writes; no nesting that exhausts the parser)."""
    try:
        meta = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(
            f"{path!r} has diffguide settings nested too deeply to be settings"
        ) from None
    except ValueError as e:
        raise ValueError(
            f"{path!r} has unreadable diffguide settings ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(meta, dict) or "prompt" not in meta or "seed" not in meta:
        raise ValueError(f"{path!r} has incomplete diffguide settings")
    return meta


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number diffguide writes")


# -- reading the settings of an image A1111 wrote
# ------------------------------------------------------

_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# fields that say who made the image, not how: nothing to carry over
_IDENTITY = {"Version", "Model hash", "VAE hash", "Lora hashes", "TI hashes", "Hashes"}
_SCHEDULE_SUFFIXES = (
    " Karras",
    " Exponential",
)  # A1111 before 1.9 named the schedule in the sampler


def parse_parameters(text: str) -> dict:
    """A1111's ``parameters`` text as a dict of 'Prompt', 'Negative prompt' and the last line's
    fields
    (JSON-quoted values unquoted), read as its parse_generation_parameters reads it: the last line
    is fields only when it holds at least three."""
    lines = text.strip().split("\n")
    fields = {}
    if len(_FIELD.findall(lines[-1])) >= 3:
        for key, value in _FIELD.findall(lines.pop()):
            fields[key.strip()] = _unquote(value.strip())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def a1111_sampler_spec(label: str, steps: int, above_data: bool = False) -> tuple[str, str | None]:
    """(diffguide spec, notice) for A1111's sampler label: the spec that reproduces it, or the
    nearest one with a notice saying what differs; a label with no diffguide sampler is an error."""
    import dataclasses

    from .core.registry import parse_spec, to_spec

    if label in A1111_SAMPLERS:
        spec = parse_spec("sampler", A1111_SAMPLERS[label])
        if hasattr(spec, "lower_order_final") and above_data and steps < LOWER_ORDER_FINAL_BELOW:
            spec = dataclasses.replace(spec, lower_order_final=False)  # k-diffusion keeps the order
        return to_spec(spec), None
    if label == "Restart" and steps < A1111_RESTART_PLAIN:
        return "heun", None
    if label in A1111_SAMPLERS_NEAREST:
        spec, why = A1111_SAMPLERS_NEAREST[label]
        return (
            spec,
            f"A1111's sampler {label!r} is not reproduced ({why}); running the nearest, {spec}",
        )
    raise ValueError(
        f"diffguide has no sampler for A1111's {label!r}; give --sampler (diffguide list shows "
        "them)"
    )


def a1111_spacing(schedule: str | None, sampler_label: str) -> tuple[str | None, list[str]]:
    """(diffguide spacing or None for the model's own grid, notices) for A1111's "Schedule type"."""
    if schedule in A1111_SCHEDULES:
        spacing = A1111_SCHEDULES[schedule]
        return spacing, (
            ["ays_a1111 runs A1111's SD 1 table (A1111 takes its SDXL table for SDXL models)"]
            if spacing == "ays_a1111"
            else []
        )
    if (
        schedule is None
    ):  # A1111 names no schedule for its timestep samplers, or where it ran Uniform
        own_grid = sampler_label in ("DDIM", "PLMS", "UniPC", "LCM")
        return None, [] if own_grid else [
            "A1111 ran its Uniform levels (no Schedule type), which no diffguide spacing gives; "
            "the model's own grid is used"
        ]
    return None, [
        f"A1111's schedule {schedule!r} has no diffguide spacing; the model's own grid is used"
    ]


def a1111_settings(fields: dict) -> tuple[dict, list[str]]:
    """diffguide settings and notices for an image A1111 made (``parse_parameters``' fields): its
    sampler and schedule labels as the specs that reproduce them (``A1111_SAMPLERS``,
    ``A1111_SCHEDULES``), CFG scale as cfg's scale, and a notice for everything that does not carry
    over."""
    missing = [k for k in ("Steps", "Sampler", "Seed", "Size") if k not in fields]
    if missing:
        raise ValueError(
            f"A1111 parameters without {', '.join(missing)}: cannot make the image again"
        )
    used = {
        "Prompt",
        "Negative prompt",
        "Steps",
        "Sampler",
        "Schedule type",
        "Seed",
        "Size",
        "CFG scale",
        "Model",
        "Eta",
        "Beta schedule alpha",
        "Beta schedule beta",
        "Denoising strength",
    }
    steps, seed = _integer(fields, "Steps"), _integer(fields, "Seed")
    width, height = _size(fields["Size"])
    label, schedule = _legacy_label(fields["Sampler"], fields.get("Schedule type"))
    from .core.spacing import ABOVE_DATA

    spacing, notices = a1111_spacing(schedule, label)
    sampler, notice = a1111_sampler_spec(label, steps, spacing in ABOVE_DATA)
    notices += [notice] if notice else []
    sampler, eta_notice = _with_eta(sampler, fields.get("Eta"))
    notices += [eta_notice] if eta_notice else []
    if spacing == "beta" and any(
        fields.get(k, "0.6") != "0.6" for k in ("Beta schedule alpha", "Beta schedule beta")
    ):
        notices.append(
            "A1111's Beta schedule alpha/beta other than 0.6 cannot be given by spacing name; 0.6 "
            "is used"
        )
    meta = {
        "prompt": fields["Prompt"],
        "negative_prompt": fields["Negative prompt"],
        "steps": steps,
        "sampler": sampler,
        "spacing": spacing,
        "seed": seed,
        "width": width,
        "height": height,
    }
    if "CFG scale" in fields:
        meta.update(guidance="cfg", scale=float(fields["CFG scale"]))
    notices += _a1111_caveats(fields, used)
    return meta, notices


def _a1111_caveats(fields: dict, used: set) -> list[str]:
    """What of an A1111 image does not carry over: its model, its noise, its prompt syntax, an input
    image, and every other field."""
    notes = ["A1111 draws its noise with its own generator: the same seed gives other noise here"]
    if "Model" in fields:
        notes.append(
            f"A1111's model {fields['Model']!r} is a checkpoint name, not loaded: --model picks "
            f"the model (default: the built-in one)"
        )
    if re.search(
        r"[()\[\]]|<lora:|\bAND\b|\bBREAK\b", fields["Prompt"] + fields["Negative prompt"]
    ):
        notes.append(
            "A1111's prompt syntax (weights, [from:to:when], <lora:...>, AND, BREAK) is read as "
            "plain text"
        )
    if "Denoising strength" in fields:
        notes.append(
            "an image-to-image run: A1111 records no input image, so this one starts from noise"
        )
    rest = [k for k in fields if k not in used and k not in _IDENTITY]
    if rest:
        notes.append(f"A1111 settings not carried over: {', '.join(rest)}")
    return notes


def _legacy_label(sampler: str, schedule: str | None) -> tuple[str, str | None]:
    """('DPM++ 2M', 'Karras') from A1111's older 'DPM++ 2M Karras', which named no Schedule type."""
    if schedule is None:
        for suffix in _SCHEDULE_SUFFIXES:
            if sampler.endswith(suffix):
                return sampler[: -len(suffix)], suffix.strip()
    return sampler, schedule


def _with_eta(spec: str, eta: str | None) -> tuple[str, str | None]:
    """A1111's Eta (written where it is not 1) as the sampler's eta option."""
    import dataclasses

    from .core.registry import parse_spec, to_spec

    if eta is None:
        return spec, None
    sampler = parse_spec("sampler", spec)
    if not hasattr(sampler, "eta"):
        return spec, f"A1111's Eta {eta} has no place in {spec}; not used"
    return to_spec(dataclasses.replace(sampler, eta=float(eta))), None


def _integer(fields: dict, key: str) -> int:
    try:
        return int(fields[key])
    except ValueError:
        raise ValueError(f"A1111 parameters have {key} {fields[key]!r}, not an integer") from None


def _size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"A1111 parameters have Size {text!r}, not WIDTHxHEIGHT")
    return int(m.group(1)), int(m.group(2))
