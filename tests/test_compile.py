"""python -m coordtok_jax.compile: slice names, the report against jax.stages.Compiled (on this
host's CPU devices and, with libtpu installed, for a real TPU topology), the verdict and exit
status. (The trainer's start-up memory line is compared with `compile` in test_train.py.)"""

import importlib.util
import json
import os
import subprocess
import sys

import coordtok
import pytest

from coordtok_jax import compile as compile_lib
from coordtok_jax.errors import UserError
from coordtok_jax.train import aot
from coordtok_jax.train import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2.0**30
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


def test_slice_names_map_to_libtpu_topologies():
    t = compile_lib.parse_topology("v5e-256")
    assert (t.libtpu_name, t.chips, t.host_bounds, t.chip.usable_gib) == ("v5e:16x16", 256, (2, 2, 1), 15.75)
    t = compile_lib.parse_topology("v4-128")  # TensorCores: 64 chips, megacore
    assert (t.libtpu_name, t.chips, t.chip.chip_config) == ("v4:4x4x4", 64, "megacore")
    assert compile_lib.parse_topology("v5p-128").libtpu_name == "v5:4x4x4"
    assert compile_lib.parse_topology("v6e-64").libtpu_name == "v6e:8x8"
    t = compile_lib.parse_topology("v5litepod-8")  # one host with 8 chips
    assert (t.libtpu_name, t.host_bounds) == ("v5e:2x4", (2, 4, 1))
    assert compile_lib.parse_topology("v4:4x4x8").chips == 128
    with pytest.raises(UserError, match="TensorCores"):
        compile_lib.parse_topology("v4-127")
    with pytest.raises(UserError, match="not a standard slice; known: v5e-1, v5e-4"):
        compile_lib.parse_topology("v5e-100")
    with pytest.raises(UserError, match="expected e.g. v5e-256"):
        compile_lib.parse_topology("tpu7-8")


def test_out_of_memory_messages_are_read():
    oom = aot.out_of_memory("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                            "temporaries (17.61G) exceeds available HBM (15.75G).")
    assert oom == {"what": "HLO temporaries", "needed_gib": 17.61, "usable_gib": 15.75}
    assert aot.out_of_memory("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                             "space hbm. Used 45.70G of 30.75G hbm.")["needed_gib"] == pytest.approx(45.7)
    assert aot.out_of_memory("INVALID_ARGUMENT: something else") is None


def _tiny(mesh=(4, 2)):
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.mesh.shape = mesh
    return config


def _check_report_against_compiled(report, compiled, config):
    m = compiled.memory_analysis()
    assert report["per_chip_gib"]["arguments"] == pytest.approx(m.argument_size_in_bytes / GiB)
    assert report["per_chip_gib"]["temporaries"] == pytest.approx(m.temp_size_in_bytes / GiB)
    assert report["per_chip_gib"]["outputs"] == pytest.approx(m.output_size_in_bytes / GiB)
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    assert report["per_chip_gib"]["total"] == pytest.approx(total / GiB)
    assert m.alias_size_in_bytes > 0.9 * m.output_size_in_bytes  # the state is donated
    assert report["flops_per_step"] == pytest.approx(flops_lib.train_flops_per_step(config))


def test_report_on_this_host_equals_the_compiled_program(devices):
    config = _tiny()
    target = compile_lib.resolve_target(None)
    program = compile_lib.prepare(config, target)
    compiled, seconds = aot.compile_program(program)
    report = aot.report(program, compiled, seconds=seconds)
    _check_report_against_compiled(report, compiled, config)
    assert report["devices"] == 8 and report["mesh"] == {"data": 4, "fsdp": 2}
    assert report["collectives"]["all-gather"]["ops"] > 0  # FSDP gathers weights
    text = aot.format_report(report)
    assert "per-chip memory (GiB)" in text and "all-gather" in text


def test_a_mesh_that_cannot_split_the_batch_is_a_clear_error(devices):
    config = _tiny((8, 1))
    with config.unlocked():
        config.batch_size = 4
    with pytest.raises(UserError, match="batch_size / grad_accum_steps = 4 must be divisible by the 8 chips"):
        compile_lib.prepare(config, compile_lib.resolve_target(None))


@needs_libtpu
def test_tpu_topology_report_equals_the_compiled_program():
    """The report of a v5e-8 compile (micro tokenizer, FSDP x data, attention_impl='splash') equals
    the compiled program, and the Pallas kernel is in it (Mosaic custom calls)."""
    from test_train_step import micro_config

    config = micro_config()
    with config.unlocked():
        config.mesh.shape = (4, 2)
        config.model.attention_impl = "splash"
    target = compile_lib.resolve_target("v5e-8")
    assert len(target.devices) == 8 and target.devices[0].platform == "tpu"
    program = compile_lib.prepare(config, target)
    compiled, seconds = aot.compile_program(program)
    report = aot.report(program, compiled, seconds=seconds, hbm_gib=target.hbm_gib)
    _check_report_against_compiled(report, compiled, config)
    assert report["device_kind"].startswith("TPU v5")
    assert report["collectives"]["all-gather"]["ops"] > 0
    # forward and backward kernels of the ViT3D, self-attention and decoder stacks (the official
    # +1-bias cross-attention stays on XLA)
    assert compiled.as_text().count('custom_call_target="tpu_custom_call"') >= 6


@needs_libtpu
def test_cli_writes_json_and_exits_1_when_it_does_not_fit(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "coordtok_jax.compile", "--config=configs/coordtok.py:tiny", "--topology=v5e-8",
         "--config.mesh.shape=1,8", "--hbm_gib=0.001", f"--json={out}", "--config.model.enc_patch_num_layers=1",
         "--config.model.enc_num_layers=1", "--config.model.dec_num_layers=1"],  # one layer a stack: quicker
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("train_step on v5e-8 (mesh 1x8): does NOT fit") and "0.001 GiB usable" in last
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["usable_gib"] == 0.001
    assert set(report["per_chip_gib"]) >= {"arguments", "temporaries", "outputs", "total"}
    assert report["flops_per_step"] > 0 and "all-gather" in report["collectives"]
    assert "per-chip memory (GiB)" in proc.stdout


@needs_libtpu
def test_splash_attention_compiles_for_a_tpu_topology():
    """attention_impl='splash' in the SiT: its train step compiles for v5e-8 with the Pallas kernel."""
    import sit

    target = compile_lib.resolve_target("v5e-8")
    sit_config = sit.get_config("tiny")
    with sit_config.unlocked():
        sit_config.model.attention_impl = "splash"
        sit_config.latents = None
        sit_config.mesh.shape = (4, 2)
    compiled, _ = aot.compile_program(compile_lib.prepare(sit_config, target))
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()


# An optimized-HLO excerpt in the shape XLA's TPU compiler writes (test_collective_pieces...):
# one all-gather of a (64, 128) table spread over three fusions that share its channel id (one
# before a loop, two inside the 8-layer loop's body), a per-layer weight gather inside the body,
# and a combined all-reduce (a tuple of two gradients) after the loop.
_PIECES_HLO = """\
HloModule pieces

%piece.1 (p0: bf16[64,16], p1: bf16[64,128]) -> bf16[64,128] {
  %p0 = bf16[64,16]{1,0} parameter(0)
  ROOT %all-gather.1 = bf16[64,128]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,8]<=[8], dimensions={1}
}

%piece.2 (p0: bf16[64,16]) -> bf16[64,128] {
  %p0 = bf16[64,16]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[64,128]{1,0} all-gather(%p0), channel_id=7, replica_groups=[1,8]<=[8], dimensions={1}
}

%body (carry: (s32[], bf16[64,16], f32[32,32])) -> (s32[], bf16[64,16], f32[32,32]) {
  %carry = (s32[], bf16[64,16], f32[32,32]) parameter(0)
  %x = bf16[64,16]{1,0} get-tuple-element(%carry), index=1
  %f2 = bf16[64,128]{1,0} fusion(%x), kind=kCustom, calls=%piece.2
  %w = f32[32,4]{1,0} constant({...})
  %ag = f32[32,32]{1,0} all-gather(%w), channel_id=9, replica_groups=[1,8]<=[8], dimensions={1}
  %f3 = bf16[64,128]{1,0} fusion(%x), kind=kCustom, calls=%piece.2
  ROOT %t = (s32[], bf16[64,16], f32[32,32]) tuple(%i, %x, %ag)
}

%cond (carry: (s32[], bf16[64,16], f32[32,32])) -> pred[] {
  %carry = (s32[], bf16[64,16], f32[32,32]) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[64,16], g: f32[256]) -> f32[256] {
  %a = bf16[64,16]{1,0} parameter(0)
  %f1 = bf16[64,128]{1,0} fusion(%a), kind=kCustom, calls=%piece.1
  %w = (s32[], bf16[64,16], f32[32,32]) while(%init), condition=%cond, body=%body
  %g = f32[256]{0} parameter(1)
  %ar = (f32[256]{0}, f32[1024]{0}) all-reduce(%g, %h), channel_id=11, replica_groups=[1,8]<=[8], to_apply=%add
  ROOT %r = f32[256]{0} get-tuple-element(%ar), index=0
}
"""


def test_collective_pieces_count_once_and_combined_collectives_sum():
    counts = aot.collectives(_PIECES_HLO)
    # the table's gather (3 pieces, one outside the loop) once + the weight gather once per layer
    assert counts["all-gather"]["ops"] == 2
    assert counts["all-gather"]["count"] == 1 + 8
    assert counts["all-gather"]["bytes"] == 64 * 128 * 2 + 8 * 32 * 32 * 4
    # the combined all-reduce moves both of its arrays
    assert counts["all-reduce"] == {"ops": 1, "count": 1.0, "bytes": (256 + 1024) * 4.0}
