"""The README's Python example runs as written and does what it says."""

import os
import re

import conftest


def test_readme_example_runs():
    text = (conftest.ROOT / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(conftest.ROOT)
    try:
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    assert scope["recon"].shape == (2, 16, 32, 32, 3)
    assert [p.shape for p in scope["planes"]] == [(2, 8, 8, 8)] * 3
    # What it computes: the float64 NumPy forward of the same weights on the same video, every patch
    # put back in place by einops (an unpatchify independent of models/patches.py).
    import einops
    import numpy as np
    import numpy_reference as ref
    from flax import nnx

    cfg, g = scope["config"].model, scope["g"]
    params = nnx.to_pure_dict(nnx.state(scope["model"], nnx.Param))
    planes = ref.encode(params, cfg, np.asarray(scope["video"]), np.array([16, 12]))
    for got, want in zip(scope["planes"], planes):
        assert np.linalg.norm(np.asarray(got, np.float64) - want) < 1e-5 * np.linalg.norm(want)
    patches = ref.decode(params, cfg, planes, np.asarray(scope["coords"]))
    (T, H, W), (pt, p, _) = g.dec_grid, g.dec_patch
    want = einops.rearrange(patches, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c", t=T, h=H, w=W,
                            pt=pt, ph=p, pw=p)
    assert np.abs(np.asarray(scope["recon"], np.float64) - want).max() < 1e-4


def test_readme_commands_match_ci():
    readme = (conftest.ROOT / "README.md").read_text()
    ci = (conftest.ROOT / ".ci" / "run").read_text()
    test_command = 'pip install -e ".[test]" && python -m pytest -q -n 2 tests'
    assert test_command in readme and test_command in ci
