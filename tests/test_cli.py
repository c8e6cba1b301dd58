"""Every command-line tool: --help exits 0 and shows its flags; a flag or config override that does
not parse is one `error:` line with exit status 2; dashed flag spellings are aliases."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What each tool's --help must list (one flag of its own).
TOOLS = {
    "train": "--workdir", "evaluate": "--num_videos", "reconstruct": "--save_tokens", "convert": "--checkpoint",
    "train_sit": "--workdir", "sample": "--num_videos", "encode_latents": "--passes", "prepare": "--num_shards",
    "compile": "--topology", "demo": "--output", "train_scorer": "--eval_clips",
}


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _console_scripts() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("coordtok-")}


def test_every_tool_is_a_console_script_and_a_module_with_the_same_run():
    """One convention: coordtok-TOOL and `python -m coordtok_jax.TOOL` call the same run()."""
    import importlib
    import importlib.util

    scripts = _console_scripts()
    assert sorted(scripts) == sorted(f"coordtok-{t.replace('_', '-')}" for t in TOOLS)
    for tool in TOOLS:
        ep = scripts[f"coordtok-{tool.replace('_', '-')}"]
        spec = importlib.util.find_spec(f"coordtok_jax.{tool}")
        entry = f"coordtok_jax.{tool}.__main__" if spec.submodule_search_locations else f"coordtok_jax.{tool}"
        assert ep.value == f"{entry}:run", ep
        assert importlib.import_module(entry).run is ep.load()


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_console_script_help_exits_zero_and_shows_the_tool(tool):
    script = os.path.join(os.path.dirname(sys.executable), f"coordtok-{tool.replace('_', '-')}")
    r = subprocess.run([script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert TOOLS[tool] in r.stdout
    assert f"coordtok_jax.{tool}" in r.stdout  # the tool's own documentation, not the wrapper's


@pytest.mark.parametrize("args, expected", [
    (["--config=configs/coordtok.py:tinny"], "unknown size 'tinny'; choose one of"),
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

    from coordtok_jax import cli

    fv = flags.FlagValues()
    flags.DEFINE_integer("num_videos", 1, "", flag_values=fv)
    flags.DEFINE_bool("side_by_side", False, "", flag_values=fv)
    saved = flags.FLAGS
    try:
        flags.FLAGS = fv
        out = cli.dashed_aliases(["prog", "--num-videos=3", "--side-by-side", "--no-side-by-side", "--not-a-flag=1",
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


@pytest.mark.parametrize("tool, args, message", [
    ("sample", ["--workdir=/nonexistent"], "--output is required (see --help)"),
    ("train_sit", [], "--config and --workdir are required (see --help)"),
    ("reconstruct", ["--workdir=/nonexistent"], "--output is required, with --input and/or --from_tokens (see --help)"),
    ("evaluate", ["--workdir=/nonexistent", "stray"], "unexpected arguments: ['stray']"),
])
def test_the_shared_preamble_names_what_is_missing(tool, args, message):
    """cli.run checks required flags and stray arguments for every tool before its main runs."""
    r = _run(f"coordtok_jax.{tool}", *args)
    assert r.returncode == 1, r.stderr[-2000:]  # absl's usage error: the short help, then the message
    assert message in r.stderr, r.stderr[-2000:]

