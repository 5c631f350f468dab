"""A model folder checked before and after diffusers loads it, so that damage is one line naming
the file.

diffusers and transformers load a damaged folder in ways a user cannot read (a missing tokenizer
ends in ``OverflowError``, a zero-byte weight file in ``header too small``) or, worse, do not fail
at all: tensors missing from a file are initialised at random, so every run gives another image.

- ``check_folder`` (before loading, local folders): every JSON file parses, every safetensors file
  has a whole header and data, every tokenizer has its vocabulary, the scheduler's values can work.
- ``check_loaded`` (after loading): every tensor a component holds was read from its weight files,
  and every tensor in them was used. Names are compared (from the headers), with the libraries' own
  exceptions allowed: tied weights, non-persistent buffers, the classes' ignore lists, and names a
  loader converts (a prefix added or dropped; a legacy name whose tensor, read only then, equals the
  one held).
"""

from __future__ import annotations

import json
import math
import os
import re

WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
VOCABULARY_KEYS = (
    "vocab_file",
    "merges_file",
)  # what a tokenizer needs when it has no tokenizer.json
SHOWN = 4  # names quoted in an error before "and N more"


def check_folder(path: str) -> None:
    """Refuse a local diffusers folder whose files cannot load as they are (ValueError naming the
    file)."""
    index_path = os.path.join(path, "model_index.json")
    index = read_json(index_path)
    if not isinstance(index, dict):
        raise ValueError(f"{index_path} is not a JSON object")
    for name, entry in index.items():
        if (
            name.startswith("_")
            or not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or entry[0] is None
        ):
            continue
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise ValueError(
                f"model folder {path!r} has no {name}/ folder, which model_index.json names "
                f"({entry[1]})"
            )
        check_component(folder, str(entry[1]))


def check_component(folder: str, class_name: str) -> None:
    """One component's folder: its JSON files parse, its weight files are whole, a tokenizer has its
    vocabulary, a scheduler's config can work."""
    for file in sorted(os.listdir(folder)):
        full = os.path.join(folder, file)
        if file.endswith(".json"):
            read_json(full)
        elif file.endswith(".safetensors"):
            safetensors_shapes(full)
    if class_name.endswith(("Tokenizer", "TokenizerFast")):
        check_tokenizer(folder, class_name)
    if class_name.endswith("Scheduler"):
        check_scheduler_config(
            read_json(os.path.join(folder, "scheduler_config.json")),
            os.path.join(folder, "scheduler_config.json"),
        )


def read_json(path: str):
    """A JSON file's contents, or a ValueError naming the file and what is wrong with it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be a config") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from None


def safetensors_shapes(path: str) -> dict:
    """{tensor name: shape} from a safetensors file's header; a zero-byte or truncated file (the
    header or the data cut short) is a ValueError naming it."""
    from safetensors import safe_open

    if os.path.getsize(path) == 0:
        raise ValueError(
            f"weight file {path} is empty (0 bytes): the download or copy did not finish"
        )
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError is a Rust type with no stable import path
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"weight file {path} is damaged or truncated ({reason})") from None


def check_tokenizer(folder: str, class_name: str) -> None:
    """A tokenizer folder holds tokenizer.json or the vocabulary files its class reads."""
    import transformers

    files = set(os.listdir(folder))
    if "tokenizer.json" in files:
        return
    names = getattr(getattr(transformers, class_name, None), "vocab_files_names", {}) or {}
    needed = [names[k] for k in VOCABULARY_KEYS if k in names] or ["tokenizer.json"]
    missing = [n for n in needed if n not in files]
    if missing:
        raise ValueError(
            f"tokenizer folder {folder} has no vocabulary ({class_name} needs tokenizer.json or "
            f"{' and '.join(needed)}; missing {', '.join(missing)})"
        )


def check_scheduler_config(config, path: str) -> None:
    """Scheduler values that no sampler can work with: no training steps, NaN, betas outside [0,
    1], a
    resolution shift divided by zero (infinities stay: lambda_min_clipped is -inf by default)."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    for key, value in config.items():
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{path}: {key} is NaN; it must be a number")
    steps = config.get("num_train_timesteps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(
            f"{path}: num_train_timesteps is {steps!r}; it must be a whole number >= 1"
        )
    for key in ("beta_start", "beta_end"):
        value = config.get(key)
        if _number(value) and not 0 <= value <= 1:
            raise ValueError(f"{path}: {key} is {value!r}; betas are in [0, 1]")
    base, top = config.get("base_image_seq_len"), config.get("max_image_seq_len")
    if _number(base) and _number(top) and base == top:
        # the resolution shift interpolates between the two lengths: equal ones divide by zero
        raise ValueError(
            f"{path}: base_image_seq_len and max_image_seq_len are both {base!r}; the "
            f"resolution-dependent shift needs two different lengths"
        )
    if _number(config.get("shift")) and not config["shift"] > 0:
        raise ValueError(f"{path}: shift is {config['shift']!r}; it must be > 0")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# -- after loading: every tensor from a file, every file tensor used
# ---------------------------------


def check_loaded(pipe, path: str, passed=(), variant: str | None = None) -> None:
    """Every torch component of a loaded pipeline (except those ``passed`` in by the caller) holds
    exactly the tensors of its weight files (``variant``'s, e.g. fp16, where one was asked for), and
    its scheduler's values can work; a ValueError naming the file otherwise."""
    import torch

    for name, module in pipe.components.items():
        if name in passed or not isinstance(module, torch.nn.Module) or _placed_by_library(module):
            continue
        folder = component_folder(module, os.path.join(path, name))
        files = weight_files(folder, variant) if folder else []
        if files:
            check_tensors(module, files)
        else:  # nothing to compare with (diffusers itself refuses a folder without weights)
            check_on_device(module, name)
    if getattr(pipe, "scheduler", None) is not None and "scheduler" not in passed:
        check_scheduler_config(dict(pipe.scheduler.config), f"the scheduler config of {path}")


def _placed_by_library(module) -> bool:
    """Quantized or offloaded (device_map) components hold other tensors than their files
    (quantization
    statistics) or none yet (meta, on disk): the libraries that placed them answer for them."""
    return (
        getattr(module, "hf_quantizer", None) is not None
        or getattr(module, "is_quantized", False) is True
        or getattr(module, "hf_device_map", None) is not None
        or hasattr(module, "_hf_hook")
    )


def component_folder(module, guess: str) -> str | None:
    """The folder a component was read from: the pipeline's subfolder, else what the module records
    (a hub id's cached snapshot)."""
    if os.path.isdir(guess):
        return guess
    for source in (
        getattr(module, "name_or_path", None),
        getattr(getattr(module, "config", None), "_name_or_path", None),
    ):
        if isinstance(source, str) and os.path.isdir(source):
            return source
    return None


def weight_files(folder: str, variant: str | None = None) -> list[str]:
    """The weight files a component loads from (one file or a sharded index's shards; safetensors
    first, as the libraries prefer it)."""
    for ext in (".safetensors", ".bin"):
        for stem in WEIGHT_STEMS:
            single = os.path.join(folder, stem + (f".{variant}" if variant else "") + ext)
            if os.path.isfile(single):
                return [single]
            index = single + ".index.json"
            if os.path.isfile(index):
                mapping = read_json(index).get("weight_map", {})
                return [os.path.join(folder, f) for f in sorted(set(mapping.values()))]
    return []


class WeightFiles:
    """The tensors of a component's weight files: names and shapes from the headers, data only when
    asked for (``tensor``)."""

    def __init__(self, files: list[str]):
        self.files, self.shapes, self.where, self._loaded = files, {}, {}, {}
        for file in files:
            shapes = (
                safetensors_shapes(file) if file.endswith(".safetensors") else self._pickle(file)
            )
            self.shapes.update(shapes)
            self.where.update(dict.fromkeys(shapes, file))

    def _pickle(self, file: str) -> dict:
        import torch

        try:
            try:
                data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
                data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a file that does not unpickle is damage, whatever the error's type
            raise ValueError(
                f"weight file {file} cannot be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        self._loaded[file] = data
        return {k: tuple(v.shape) for k, v in data.items() if hasattr(v, "shape")}

    def tensor(self, key: str, head: bool = False):
        """A file tensor, or with ``head`` its first slice along the first axis (a cheap first
        look)."""
        file = self.where[key]
        if file in self._loaded:
            value = self._loaded[file][key]
            return value[:1] if head and value.dim() else value
        from safetensors import safe_open

        with safe_open(file, "pt") as f:
            return f.get_slice(key)[:1] if head and self.shapes[key] else f.get_tensor(key)


def check_tensors(module, files: list[str]) -> None:
    """Compare a module's tensors with its files' by name; what is left after the allowed
    differences
    (tied weights, buffers, ignore lists, renamed keys whose values were read) is an error."""
    on_file = WeightFiles(files)
    held = module.state_dict()
    missing = {k for k in held if k not in on_file.shapes}
    unexpected = {k for k in on_file.shapes if k not in held}
    missing -= _tied(held, missing)
    missing = {k for k in missing if not _ignored(module, "_keys_to_ignore_on_load_missing", k)}
    unexpected = {
        k for k in unexpected if not _ignored(module, "_keys_to_ignore_on_load_unexpected", k)
    }
    buffers = {n for n, _ in module.named_buffers()}
    unexpected = {k for k in unexpected if not any(k == b or k.endswith("." + b) for b in buffers)}
    _pair_by_suffix(missing, unexpected, held, on_file.shapes)
    _pair_by_value(missing, unexpected, held, on_file)
    missing |= {k for k, v in held.items() if v.is_meta}  # never loaded, whatever its name
    if missing or unexpected:
        raise ValueError(_mismatch(module, files[0], missing, unexpected, len(held)))


def _tied(held: dict, missing: set) -> set:
    """Missing names whose tensor shares storage with one that was read (tied weights)."""
    read = {
        (v.data_ptr(), tuple(v.shape))
        for k, v in held.items()
        if k not in missing and not v.is_meta
    }
    return {
        k
        for k in missing
        if not held[k].is_meta
        and held[k].numel()
        and (held[k].data_ptr(), tuple(held[k].shape)) in read
    }


def _ignored(module, attribute: str, key: str) -> bool:
    patterns = getattr(module, attribute, None) or ()
    return any(re.search(p, key) for p in patterns)


def _pair_by_suffix(missing: set, unexpected: set, held: dict, shapes: dict) -> None:
    """Drop the pairs a loader renames by a prefix (transformers' base-model prefix, Qwen2.5-VL's
    language_model): the longest dotted ending shared by exactly one file name of the same shape."""
    endings: dict = {}
    for old in unexpected:
        parts = old.split(".")
        for i in range(0, len(parts) - 1):  # endings of two parts or more
            endings.setdefault((".".join(parts[i:]), shapes[old]), []).append(old)
    for new in sorted(missing):
        parts, shape = new.split("."), tuple(held[new].shape)
        for i in range(0, len(parts) - 1):
            found = [k for k in endings.get((".".join(parts[i:]), shape), ()) if k in unexpected]
            if len(found) == 1:
                missing.discard(new)
                unexpected.discard(found[0])
                break
            if found:
                break  # ambiguous: left to the values


def _pair_by_value(missing: set, unexpected: set, held: dict, on_file: WeightFiles) -> None:
    """Drop the pairs a loader converts under another name (diffusers' legacy attention names): the
    tensor held equals a file tensor of the same shape. A random initialisation equals none."""
    for new in sorted(missing):
        value = held[new]
        if value.is_meta:
            continue
        shape = tuple(value.shape)
        candidates = sorted(
            (k for k in unexpected if on_file.shapes[k] == shape),
            key=lambda k: -len(os.path.commonprefix([k, new])),
        )
        for (
            old
        ) in candidates:  # the first slices first: a whole tensor is read only for a likely match
            if _same(value[:1] if value.dim() else value, on_file.tensor(old, head=True)) and _same(
                value, on_file.tensor(old)
            ):
                missing.discard(new)
                unexpected.discard(old)
                break


def _same(held, stored) -> bool:
    import torch

    return bool(torch.equal(held.detach().cpu(), stored.to(held.dtype)))


def _mismatch(module, file: str, missing: set, unexpected: set, total: int) -> str:
    """The one-line error for a component whose files do not hold its tensors."""
    cls = type(module).__name__
    parts = []
    if missing:
        parts.append(
            f"lacks {len(missing)} of the {total} tensors {cls} needs ({_names(missing)}), which "
            "would be random weights"
        )
    if unexpected:
        parts.append(
            f"holds {len(unexpected)} tensor(s) {cls} does not have ({_names(unexpected)})"
        )
    saved = _saved_class(os.path.dirname(file))
    hint = (
        f": its config.json was saved from {saved}, but model_index.json names {cls}"
        if saved and saved != cls
        else ": the file is damaged or belongs to another model"
    )
    return f"weight file {file} {' and '.join(parts)}{hint}"


def _names(keys: set) -> str:
    ordered = sorted(keys)
    more = f" and {len(ordered) - SHOWN} more" if len(ordered) > SHOWN else ""
    return ", ".join(ordered[:SHOWN]) + more


def _saved_class(folder: str) -> str | None:
    """The class a component's config.json was saved from (diffusers' _class_name, transformers'
    architectures), or None."""
    try:
        config = read_json(os.path.join(folder, "config.json"))
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    arch = config.get("architectures")
    return config.get("_class_name") or (arch[0] if isinstance(arch, list) and arch else None)


def check_on_device(module, name: str) -> None:
    """A component with no weight file to compare: still, nothing may be left unloaded (meta)."""
    meta = [k for k, v in module.state_dict().items() if v.is_meta]
    if meta:
        raise ValueError(
            f"component {name} ({type(module).__name__}) has {len(meta)} tensors that were never "
            f"loaded ({_names(set(meta))})"
        )
