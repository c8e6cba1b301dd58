"""The workdir lock (one trainer per workdir, stale locks taken over) and the config comparison."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from coordtok_jax.train import workdir as wd


def _write_lock(path, **holder):
    (path / wd.LOCK_NAME).write_text(json.dumps(holder))


def test_a_live_holder_is_refused_with_its_host_and_pid(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, host=socket.gethostname(), pid=sleeper.pid, time=time.time())
        with pytest.raises(wd.WorkdirError, match=f"pid {sleeper.pid}.*is writing this workdir"):
            wd.Lock(epath.Path(tmp_path)).acquire()
        assert json.loads((tmp_path / wd.LOCK_NAME).read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = wd.Lock(epath.Path(tmp_path)).acquire()  # the holder died: its lock is stale, taken over
    assert json.loads((tmp_path / wd.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / wd.LOCK_NAME).exists()


def test_another_hosts_lock_expires_when_not_refreshed(tmp_path):
    _write_lock(tmp_path, host="other-host", pid=1, time=time.time() - 60)
    with pytest.raises(wd.WorkdirError, match="host other-host"):
        wd.Lock(epath.Path(tmp_path)).acquire()
    _write_lock(tmp_path, host="other-host", pid=1, time=time.time() - wd.STALE_SECONDS - 1)
    wd.Lock(epath.Path(tmp_path)).acquire().release()
    (tmp_path / wd.LOCK_NAME).write_text("garbage")  # unreadable: stale
    wd.Lock(epath.Path(tmp_path)).acquire().release()


def test_two_processes_race_for_one_lock(tmp_path):
    """Of several processes taking the lock at once exactly one wins."""
    code = ("import sys; from etils import epath; from coordtok_jax.train import workdir as wd\n"
            "import time; time.sleep(float(sys.argv[2]) - time.time())\n"
            "try:\n    wd.Lock(epath.Path(sys.argv[1])).acquire(); print('won'); time.sleep(3)\n"
            "except wd.WorkdirError:\n    print('refused')\n")
    start = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), start], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["refused", "refused", "won"]


def test_config_differences_split_refused_and_accepted():
    saved = {"model": {"enc_embed_dim": 64, "dtype": "float32"}, "batch_size": 8, "total_steps": 10,
             "data": {"seed": 0, "root": "a"}}
    requested = {"model": {"enc_embed_dim": 64, "dtype": "bfloat16"}, "batch_size": 16, "total_steps": 20,
                 "data": {"seed": 1, "root": "b"}, "new_field": 1}
    refused, accepted = wd.config_differences(saved, requested)
    assert refused == ['batch_size: 8 -> 16', 'data.seed: 0 -> 1', 'new_field: "<absent>" -> 1']
    assert accepted == ['data.root: "a" -> "b"', 'model.dtype: "float32" -> "bfloat16"', 'total_steps: 10 -> 20']


def test_a_garbage_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(wd.WorkdirError, match="config.json is not valid JSON"):
        wd.check_config(epath.Path(tmp_path), {}, has_checkpoint=True)


@pytest.mark.parametrize("schedule, warmup", [("constant", 0), ("constant", 10), ("cosine", 10)])
def test_learning_rate_schedule_against_its_formula(schedule, warmup):
    """train.state.lr_schedule: linear warm-up, then constant or cosine decay to 0 at total_steps
    (checked against the closed form in float64)."""
    import math

    import coordtok

    from coordtok_jax.train.state import learning_rate

    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.total_steps, config.optimizer.learning_rate = 100, 2e-3
        config.optimizer.warmup_steps, config.optimizer.schedule = warmup, schedule
    for step in (0, 5, 10, 40, 99, 100):
        if step < warmup:
            want = 2e-3 * step / warmup
        elif schedule == "constant":
            want = 2e-3
        else:
            want = 2e-3 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (100 - warmup)))
        assert float(learning_rate(config, step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step


def test_an_unknown_schedule_is_named():
    import coordtok

    from coordtok_jax.errors import UserError
    from coordtok_jax.train.state import make_optimizer

    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.optimizer.schedule = "linear"
    with pytest.raises(UserError, match="config.optimizer.schedule must be 'constant' or 'cosine'"):
        make_optimizer(config)
