"""The package's shape: no import cycle between its modules (function-level imports included, since
they only hide a cycle), no import against the data flow (the layer order below), no private name
imported from another module, and no module over 450 lines."""

import ast

import conftest

PACKAGE = conftest.ROOT / "coordtok_jax"
MAX_LINES = 450

# The data flow, lowest first: a module may import its own layer and the layers before it. Keys are
# module prefixes under coordtok_jax (a package and everything in it, or one module).
LAYERS = [
    ("errors", "sharding", "remote", "cli", "allocator", "pictures"),  # shared by every layer
    ("data",),  # sources of clips -> model input
    ("models",),  # CoordTok, its decoding, the SiT
    ("io",),  # .pth files, checkpoints, loading a trained run
    ("metrics", "diffusion"),  # PSNR/SSIM/LPIPS/I3D/FVD; flow-matching transport and samplers
    ("train",),  # the tokenizer trainer and the loop, state and step every trainer shares
    ("evaluate",),  # evaluate / reconstruct with a trained tokenizer
    ("generation",),  # SiT on a frozen tokenizer: latent cache, trainer, sampling
    ("convert",),  # to and from the official PyTorch format
    ("compile", "demo", "reconstruct", "train_sit", "sample", "encode_latents", "prepare", "train_scorer"),  # tools
]


def layer_of(module: str) -> int:
    name = module.removeprefix("coordtok_jax.")
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_imports.py: LAYERS; add it where it belongs")


def against_the_flow(graph: dict) -> list:
    return sorted((m, t) for m, targets in graph.items() if m != "coordtok_jax"
                  for t in targets if layer_of(t) > layer_of(m))


def _modules() -> dict:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(conftest.ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def import_graph() -> dict:
    """module -> the package modules it imports anywhere in its body (a `from pkg import name`
    counts as importing pkg.name when that is a module; importing a parent package is not an edge)."""
    modules = _modules()
    graph = {m: set() for m in modules}
    for m, f in modules.items():
        package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(kept + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != m and not m.startswith(t + "."):
                    graph[m].add(t)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "coordtok_jax.generation.train_sit" not in graph["coordtok_jax.generation.sample"]  # sampling needs no trainer
    assert graph["coordtok_jax.train.loop"] >= {"coordtok_jax.io.checkpoint"}  # the walk sees real edges
    assert cycles(graph) == []


def test_no_module_over_450_lines():
    long = {str(f.relative_to(conftest.ROOT)): n for f in PACKAGE.rglob("*.py")
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_import_against_the_flow():
    graph = import_graph()
    assert against_the_flow({"coordtok_jax.io.runs": {"coordtok_jax.train.loop"}}) == [
        ("coordtok_jax.io.runs", "coordtok_jax.train.loop")]  # the check itself sees a violation
    assert against_the_flow(graph) == []


def test_no_private_name_imported_from_another_module():
    found = []
    for f in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("coordtok_jax"):
                found += [f"{f.relative_to(conftest.ROOT)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
