"""Name registry for samplers, guidance methods, noise optimisers and step caches:
``@register("sampler", "dpmpp_2m")``.

Registered classes are frozen dataclasses whose fields are their options (diffusers' habit: the
constructor arguments are the config). Specs ``name`` or ``name:key=value,key=value`` resolve here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing

_REGISTRY: dict[str, dict[str, type]] = {"sampler": {}, "guidance": {}, "noise": {}, "cache": {}}


def register(kind: str, name: str):
    def deco(cls):
        _REGISTRY[kind][name] = cls
        cls.name = name
        return cls

    return deco


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY[kind])


def options(kind: str, name: str) -> dict[str, typing.Any]:
    """Public options of a registered class and their defaults."""
    cls = lookup(kind, name)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def lookup(kind: str, name: str) -> type:
    table = _REGISTRY[kind]
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}")
    return table[name]


def create(kind: str, name: str, **opts):
    cls = lookup(kind, name)
    allowed = options(kind, name)
    for key, value in opts.items():
        if key not in allowed:
            raise ValueError(
                f"{kind} {name!r} has no option {key!r}; allowed: {', '.join(allowed) or 'none'}"
            )
    try:
        return cls(**opts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kind} {name!r}: {e}") from None


def _coerce(text: str, default):
    """Turn a spec value into the type of the option's default."""
    low = text.strip().lower()
    if isinstance(default, bool) or low in ("true", "false"):
        if low not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected true or false, got {text!r}")
        return low in ("true", "1", "yes")
    if low in ("none", "null") and not isinstance(default, str):
        return None
    if isinstance(default, (int, float)) or default is None:
        try:
            v = float(text) if low not in ("inf", "-inf") else float(low)
        except ValueError:
            if default is None:
                return text.strip()
            raise ValueError(f"expected a number, got {text!r}") from None
        if isinstance(default, int) and not isinstance(default, bool) and v.is_integer():
            return int(v)
        if default is None and math.isfinite(v) and v.is_integer() and "." not in text:
            return int(v)
        return v
    return text.strip()


_COMBINATORS: dict[str, type] = {}  # "+" -> Sum, "@" -> Modulated (registered by guidance.compose)
# "+" composes guidance methods, except where it is an exponent's sign: 1e+20 is how Python writes
# 1e20
_SUM = re.compile(r"(?<![0-9.][eE])\+")
MAX_SPEC_LENGTH, MAX_TERMS = (
    4096,
    16,
)  # far beyond any real spec; a spec is also read from image files


def number_list(text, error: str) -> tuple[float, ...]:
    """A spec's list of numbers, '10;5' (',' separates too; a list or tuple is taken as is) ->
    floats, () where none is given; ValueError(error) where a part is not a number."""
    parts = text if isinstance(text, (list, tuple)) else str(text).replace(",", ";").split(";")
    try:
        return tuple(float(v) for v in parts if str(v).strip())
    except ValueError:
        raise ValueError(error) from None


def terms(spec: str) -> list[str]:
    """A guidance spec's composed terms: 'cfg:scale=1e+3+tsg' -> ['cfg:scale=1e+3', 'tsg']."""
    return _SUM.split(spec)


def combinator(symbol: str):
    def deco(cls):
        _COMBINATORS[symbol] = cls
        return cls

    return deco


def _options_of(cls) -> dict:
    return {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init and f.default is not dataclasses.MISSING
    }


def _parse_options(kind: str, what: str, spec: str, rest: str, allowed: dict) -> dict:
    opts = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"malformed {kind} spec {spec!r}: {item!r} is not key=value")
        if key in opts:
            raise ValueError(f"{kind} spec {spec!r} gives {key} twice; give each option once")
        try:  # unknown keys pass through uncoerced; the constructor names them
            opts[key] = _coerce(value, allowed[key]) if key in allowed else value
        except ValueError as e:
            raise ValueError(f"{what} option {key}: {e}") from None
    return opts


def parse_options(kind: str, text: str, allowed: dict) -> dict:
    """``'rho=5,model=sdxl'`` as {'rho': 5, 'model': 'sdxl'}: each value typed like ``allowed``'s
    default (None: a number where it reads as one, else the text), as a spec's options are."""
    return _parse_options(kind, kind, text, text, allowed)


def _spec_file(kind: str, path: str) -> str:
    """The ``kind`` entry (e.g. "guidance") of a JSON spec file."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {kind} spec file {path!r}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"{kind} spec file {path!r} is not JSON") from None
    spec = data.get(kind) if isinstance(data, dict) else None
    if not isinstance(spec, str) or spec.startswith("@"):
        raise ValueError(f"{kind} spec file {path!r} has no {kind!r} entry (a spec string)")
    return spec


def parse_spec(kind: str, spec: str):
    """``'cfg:scale=7.5,rescale=0.7'`` -> CFG(scale=7.5, rescale=0.7).

    Guidance specs also compose: ``'cfg:scale=5+tsg:scale=2'`` sums methods (shared branches run
    once) and ``'apg:scale=5@sigma_lo=0.3,weight_schedule=linear'`` wraps one in a schedule,
    interval and rescale. ``'@tuned.json'`` reads the spec from a file's ``kind`` entry."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty {kind} spec; expected name or name:key=value,...")
    if len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(f"{kind} spec of {len(spec):,} characters; at most {MAX_SPEC_LENGTH:,}")
    if spec.startswith("@"):  # a spec file, e.g. written by diffguide tune
        return parse_spec(kind, _spec_file(kind, spec[1:]))
    parts = terms(spec) if kind == "guidance" and "+" in _COMBINATORS else [spec]
    if len(parts) > MAX_TERMS:
        raise ValueError(
            f"guidance spec composes {len(parts)} methods with '+'; at most {MAX_TERMS}"
        )
    if len(parts) > 1:
        return _COMBINATORS["+"](tuple(parse_spec(kind, term) for term in parts))
    if kind == "guidance" and "@" in spec and "@" in _COMBINATORS:
        inner, _, rest = spec.partition("@")
        cls = _COMBINATORS["@"]
        allowed = _options_of(cls)
        opts = _parse_options(kind, "guidance '@'", spec, rest, allowed)
        bad = sorted(set(opts) - set(allowed))
        if bad:
            raise ValueError(f"'@' takes no option {bad[0]!r}; allowed: {', '.join(allowed)}")
        try:
            return cls(parse_spec(kind, inner), **opts)
        except (TypeError, ValueError) as e:
            raise ValueError(f"guidance {spec!r}: {e}") from None
    name, _, rest = spec.strip().partition(":")
    lookup(kind, name)
    opts = _parse_options(kind, f"{kind} {name!r}", spec, rest, options(kind, name))
    return create(kind, name, **opts)


def to_spec(obj) -> str:
    """Inverse of parse_spec for a registered config: only options that differ from the defaults."""
    if type(obj) is _COMBINATORS.get("+"):
        return "+".join(to_spec(p) for p in obj.parts)
    if type(obj) is _COMBINATORS.get("@"):
        extra = [
            f"{k}={getattr(obj, k)}"
            for k, d in _options_of(type(obj)).items()
            if getattr(obj, k) != d
        ]
        return to_spec(obj.inner) + ("@" + ",".join(extra) if extra else "")
    defaults = options(_kind_of(obj), obj.name)
    parts = []
    for key, default in defaults.items():
        value = getattr(obj, key)
        if value != default:
            parts.append(f"{key}={value}")
    return obj.name + (":" + ",".join(parts) if parts else "")


def _kind_of(obj) -> str:
    for kind, table in _REGISTRY.items():
        if table.get(getattr(obj, "name", None)) is type(obj):
            return kind
    raise ValueError(
        f"{type(obj).__name__} is not a registered sampler, guidance method, noise optimiser or "
        "cache"
    )
