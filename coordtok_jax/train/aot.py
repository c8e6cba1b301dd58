"""Ahead-of-time compilation of a program, and what it costs per chip.

A `Program` is a jitted function, the abstract arguments (ShapeDtypeStructs carrying shardings)
it is compiled for, its mesh and its analytic FLOPs. The trainers compile their step through
`compile_program` before the first step and print `memory_line` of the result; `python -m
coordtok_jax.compile` compiles the same program for a TPU topology on a CPU host and prints the
full `report`: per-chip memory (XLA's buffer assignment), analytic FLOPs (XLA's cost analysis
counts a scanned layer stack once), and the collectives of the optimized HLO, counted per step
(ops inside a `while` body multiplied by its known trip count).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import defaultdict
from typing import Any, Optional

import jax
from jax.sharding import Mesh

GiB = float(1 << 30)
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16}


@dataclasses.dataclass
class Program:
    """A jitted function and the abstract arguments it runs on, under `mesh`."""

    name: str
    jitted: Any
    args: tuple
    mesh: Mesh
    flops: float = 0.0  # analytic FLOPs of one call (all chips together)

    def lower(self):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*self.args)


def compile_program(program: Program):
    """(compiled, seconds): the executable the trainers then call, and how long XLA took."""
    t0 = time.perf_counter()
    lowered = program.lower()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t0


def memory(compiled) -> dict[str, float]:
    """Per-chip bytes of a compiled program (XLA's buffer assignment), in GiB.

    total = arguments + outputs - aliased (donated arguments reused as outputs) + temporaries +
    generated code: everything the program holds, as if all of it were live at once (the
    verdict of `compile` uses it). peak: XLA's own estimate of the most bytes live at one point
    (arguments included, code not), when the backend reports it.
    """
    m = compiled.memory_analysis()
    get = lambda name: float(getattr(m, name, 0) or 0)
    arguments, outputs, alias = get("argument_size_in_bytes"), get("output_size_in_bytes"), get("alias_size_in_bytes")
    temporaries, code = get("temp_size_in_bytes"), get("generated_code_size_in_bytes")
    total = arguments + outputs - alias + temporaries + code
    out = {"arguments": arguments / GiB, "outputs": outputs / GiB, "aliased": alias / GiB,
           "temporaries": temporaries / GiB, "code": code / GiB, "total": total / GiB}
    if get("peak_memory_in_bytes"):
        out["peak"] = get("peak_memory_in_bytes") / GiB
    return out


def out_of_memory(error_text: str) -> Optional[dict]:
    """What XLA says when a program does not fit ('... HLO temporaries (17.61G) exceeds available
    HBM (15.75G)' or 'Used 45.7G of 30.75G hbm'): {'needed_gib', 'usable_gib', 'what'}; None if
    the error is something else."""
    units = {"G": 1.0, "M": 1 / 1024, "K": 1 / 1024**2, "": 1 / 1024**3}
    m = re.search(r"memory required for ([\w ]+?) \(([\d.]+)([GMK]?)\) exceeds available HBM \(([\d.]+)([GMK]?)\)",
                  error_text)
    if m:
        return {"what": m.group(1), "needed_gib": float(m.group(2)) * units[m.group(3)],
                "usable_gib": float(m.group(4)) * units[m.group(5)]}
    m = re.search(r"Used ([\d.]+)([GMK]?) of ([\d.]+)([GMK]?) hbm", error_text)
    if m:
        return {"what": "the program", "needed_gib": float(m.group(1)) * units[m.group(2)],
                "usable_gib": float(m.group(3)) * units[m.group(4)]}
    if "RESOURCE_EXHAUSTED" in error_text:
        return {"what": "the program", "needed_gib": float("nan"), "usable_gib": float("nan")}
    return None


def memory_line(name: str, mem: dict[str, float], hbm_gib: Optional[float] = None) -> str:
    """One line: the same text from the trainers' start-up and from `compile`."""
    parts = ", ".join(f"{k} {mem[k]:.3f}" for k in ("arguments", "temporaries", "outputs", "code"))
    of = f" of {hbm_gib:g} GiB HBM" if hbm_gib else ""
    return f"{name}: per-chip memory {mem['total']:.3f} GiB{of} ({parts} GiB)"


def device_memory_gib(device) -> Optional[float]:
    """A local device's memory in GiB when the runtime reports it (accelerators), else None."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU and topology-only devices report nothing
        return None
    limit = stats.get("bytes_limit")
    return round(limit / GiB, 2) if limit else None


def _array_bytes(type_text: str) -> list[float]:
    """Bytes of each array in an HLO result type ('f32[2,64]{1,0}' or a tuple of them), in order."""
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]", type_text):
        if dtype in _DTYPE_BYTES:
            n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            out.append(n * _DTYPE_BYTES[dtype])
    return out


def _collective_bytes(type_text: str, opcode: str) -> float:
    """Bytes a collective delivers per chip, from its result type. A combined collective (XLA
    merges small ones into one op with a tuple result) moves the sum of its arrays; an async
    `all-gather-start` / `collective-permute-start` returns (operands, results[, contexts]), of
    which the results count."""
    arrays = _array_bytes(type_text)
    if opcode in ("all-gather-start", "collective-permute-start") and len(arrays) >= 2:
        arrays = [a for a in arrays if a > 4] or arrays  # drop u32[] / s32[] context scalars
        arrays = arrays[len(arrays) // 2:]
    return float(sum(arrays))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) ([a-z][a-z\-]*)\((.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation)"
                      r"=(?:\{([^}]*)\}|(%?[\w.\-]+))")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], Optional[str]]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        # a header has no '=' before its body (parameter lists past 5 carry /*index=N*/ comments)
        if head and "=" not in _COMMENT.sub("", line).split("{")[0]:
            current = head.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    return comps, entry


def _trip_count(while_rest: str, comps: dict[str, list[str]]) -> int:
    """Iterations of a while loop: XLA's known_trip_count, else the bound its condition compares
    the counter against (`lax.scan` loops count from 0 to a constant)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_rest)
    bounds = [int(c) for line in comps.get(cond.group(1) if cond else "", ())
              for c in re.findall(r"s32\[\][^=]*= s32\[\]\S* constant\((\d+)\)|constant\((\d+)\)", line)
              for c in c if c] if cond else []
    return max(bounds) if bounds else 1


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {'ops': collectives in the HLO, 'count': executions per call, 'bytes': bytes per call}}.

    A kind's async pair (`all-gather-start` / `-done`) counts once. An op inside a `while` body
    executes once per iteration (layer scans: once per layer); bytes are what the op delivers per
    chip (the gathered array for all-gather, the shard for reduce-scatter, the sum over the arrays
    of a combined collective). One collective that XLA's TPU scheduler spreads over several
    fusions to overlap it with compute (its pieces share the channel id and the result type, and
    may sit in several loops that each carry part of its progress) counts once, at the
    executions of its least repeated piece.
    """
    comps, entry = _computations(hlo_text)
    ops: dict[str, list[tuple[str, float, Any]]] = defaultdict(list)  # computation -> [(kind, bytes, key)]
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # computation -> [(callee, times)]
    for name, lines in comps.items():
        for n, line in enumerate(lines):
            inst = _INSTRUCTION.match(line)
            if not inst:
                continue
            type_text, opcode, rest = inst.groups()
            kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
            if kind in COLLECTIVES:
                channel = re.search(r"\bchannel_id=(\d+)", rest)
                key = (kind, channel.group(1), type_text) if channel else (name, n)
                ops[name].append((kind, _collective_bytes(type_text, opcode), key))
            trips = _trip_count(rest, comps) if opcode == "while" else 1
            for attr, listed, single in _CALLEES.findall(rest):
                for callee in (listed or single).split(","):
                    callee = callee.strip().lstrip("%")
                    if callee:
                        calls[name].append((callee, trips if attr in ("body", "condition") else 1))

    times: dict[str, float] = defaultdict(float)

    def visit(name: str, mult: float, depth: int = 0):
        if depth > 64:
            return
        times[name] += mult
        for callee, n in calls.get(name, ()):
            visit(callee, mult * n, depth + 1)

    if entry is not None:
        visit(entry, 1.0)
    logical: dict[Any, tuple[str, float, float]] = {}  # key -> (kind, bytes, executions)
    for comp, items in ops.items():
        mult = times.get(comp, 1.0) or 1.0
        for kind, nbytes, key in items:
            seen = logical.get(key)
            logical[key] = (kind, nbytes, mult if seen is None else min(seen[2], mult))
    out: dict[str, dict[str, float]] = {}
    for kind, nbytes, mult in logical.values():
        row = out.setdefault(kind, {"ops": 0, "count": 0.0, "bytes": 0.0})
        row["ops"] += 1
        row["count"] += mult
        row["bytes"] += mult * nbytes
    return out


def report(program: Program, compiled, *, seconds: float = 0.0, hbm_gib: Optional[float] = None,
           devices_per_host: Optional[int] = None) -> dict:
    """The JSON report of `compile`: fits, per-chip memory, FLOPs, collectives, mesh."""
    mem = memory(compiled)
    devices = program.mesh.devices.size
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "program": program.name,
        "fits": None if hbm_gib is None else bool(mem["total"] <= hbm_gib),
        "hbm_gib": hbm_gib,
        "per_chip_gib": mem,
        "flops_per_step": float(program.flops),
        "flops_per_chip": float(program.flops) / devices,
        "xla_flops_per_chip": float(cost.get("flops", 0.0)),  # a scanned layer counted once
        "collectives": collectives(compiled.as_text()),
        "devices": int(devices),
        "device_kind": getattr(program.mesh.devices.flat[0], "device_kind", "?"),
        "devices_per_host": devices_per_host,
        "mesh": {str(k): int(v) for k, v in program.mesh.shape.items()},
        "compile_seconds": round(seconds, 1),
    }


def format_report(r: dict) -> str:
    """The report as a human-readable block (the CLI prints it)."""
    mem = r["per_chip_gib"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [f"{r['program']} on {r['devices']} x {r['device_kind']} (mesh {mesh}), compiled in "
             f"{r['compile_seconds']:.1f} s",
             "",
             "per-chip memory (GiB)",
             *(f"  {k:<12}{mem[k]:>10.3f}" for k in ("arguments", "temporaries", "outputs", "aliased", "code")),
             f"  {'total':<12}{mem['total']:>10.3f}" + (f"   of {r['hbm_gib']:g} HBM" if r["hbm_gib"] else ""),
             *([f"  {'XLA peak':<12}{mem['peak']:>10.3f}   (most live at once, without code)"] if "peak" in mem
               else []),
             "",
             f"FLOPs per step (analytic): {r['flops_per_step']:.4g} ({r['flops_per_chip']:.4g} per chip)"]
    if r["collectives"]:
        lines += ["", "collectives per step (per chip)", f"  {'kind':<20}{'ops':>6}{'executions':>12}{'GiB':>12}"]
        for kind, row in sorted(r["collectives"].items()):
            lines.append(f"  {kind:<20}{row['ops']:>6}{row['count']:>12.0f}{row['bytes'] / GiB:>12.4f}")
    else:
        lines += ["", "collectives: none"]
    return "\n".join(lines)
