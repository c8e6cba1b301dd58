"""What the config scripts in configs/ share: their `SIZE[,key=value...][,runlocal]` argument and
dotted overrides (recipes).

    parse_arg("L,stage=2", sizes=..., options={"stage": ("1", "2")})  -> ("L", {"stage": "2", "runlocal": False})
    parse_arg("S,runlocal", ...)  -> ("S", {"runlocal": True})

`runlocal` (big_vision's spelling) keeps the model of SIZE and swaps the schedule for one that runs on
a CPU in minutes (small batch, data-parallel mesh, short schedule); the CPU-scale sizes (`tiny`, `cpu`)
imply it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import ml_collections


def parse_arg(arg: str, *, sizes: Sequence[str], default: str, options: Mapping[str, Sequence[str]] = (),
              local_sizes: Sequence[str] = ()) -> tuple[str, dict]:
    """'SIZE[,key=value...][,runlocal]' -> (SIZE, {key: value, ..., 'runlocal': bool}).

    `options` maps each allowed key to its allowed values (empty = any). Errors name the argument
    and what was expected."""
    parts = [p.strip() for p in (arg or default).split(",") if p.strip()]
    size = parts.pop(0) if parts and "=" not in parts[0] and parts[0] != "runlocal" else default
    if size not in sizes:
        raise ValueError(f"config argument {arg!r}: unknown size {size!r}; choose one of {list(sizes)}")
    out = {"runlocal": size in local_sizes}
    for p in parts:
        if p == "runlocal":
            out["runlocal"] = True
            continue
        key, sep, value = p.partition("=")
        if not sep:
            raise ValueError(f"config argument {arg!r}: expected SIZE[,key=value...][,runlocal], got {p!r}")
        if key not in options:
            raise ValueError(f"config argument {arg!r}: unknown option {key!r} (known: {sorted(options)}, runlocal)")
        if options[key] and value not in options[key]:
            raise ValueError(f"config argument {arg!r}: {key} must be one of {list(options[key])}, got {value!r}")
        out[key] = value
    return size, out


def override(config: ml_collections.ConfigDict, values: Mapping[str, object]) -> None:
    """Sets each dotted field ('optimizer.learning_rate') of `config`, which must exist."""
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"override {dotted!r}: the config has no field {leaf!r} there")
        node[leaf] = value
