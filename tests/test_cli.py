"""Every command-line tool: --help exits 0 and shows its flags; a flag or config override that does
not parse is one `error:` line with exit status 2; dashed flag spellings are aliases."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOOLS = {
    "coordtok_jax.train": "--workdir",
    "coordtok_jax.train_sit": "--workdir",
    "coordtok_jax.sample": "--num_videos",
    "coordtok_jax.evaluate": "--num_videos",
    "coordtok_jax.reconstruct": "--save_tokens",
    "coordtok_jax.compile": "--topology",
}


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("module", sorted(TOOLS))
def test_help_exits_zero_and_lists_the_flags(module):
    r = _run(module, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert TOOLS[module] in r.stdout


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/coordtok.py:tinny"], "unknown CoordTok size 'tinny'; choose one of"),
    (["--config=configs/coordtok.py:tiny", "--config.total_step=10"], 'Did you mean "total_steps"'),
    (["--config=configs/missing.py:tiny"], "configs/missing.py"),
    (["--config=configs/coordtok.py:tiny", "--config.total_steps=ten"], "total_steps"),
])
def test_config_errors_are_one_line_with_exit_2(tmp_path, args, expected):
    r = _run("coordtok_jax.train", *args, f"--workdir={tmp_path / 'w'}")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "w").exists()  # nothing written


def test_dashed_spellings_are_aliases():
    from absl import flags

    from coordtok_jax import entry

    fv = flags.FlagValues()
    flags.DEFINE_integer("num_videos", 1, "", flag_values=fv)
    flags.DEFINE_bool("side_by_side", False, "", flag_values=fv)
    saved = flags.FLAGS
    try:
        flags.FLAGS = fv
        out = entry.dashed_aliases(["prog", "--num-videos=3", "--side-by-side", "--no-side-by-side", "--not-a-flag=1",
                                    "--", "--num-videos=4"])
    finally:
        flags.FLAGS = saved
    assert out == ["prog", "--num_videos=3", "--side_by_side", "--noside_by_side", "--not-a-flag=1", "--",
                   "--num-videos=4"]


def test_an_unwritable_workdir_is_one_line_naming_it():
    """A workdir that cannot be created (here under /sys, which refuses even root) is refused with
    one line naming it and the cause, before anything is compiled."""
    if not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here")
    r = _run("coordtok_jax.train", "--config=configs/coordtok.py:tiny", "--workdir=/sys/coordtok_run")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot create the workdir /sys/coordtok_run: "), lines
