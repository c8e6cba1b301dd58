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


def test_an_unreachable_gcs_path_fails_fast_with_one_line(tmp_path):
    """gs:// whose endpoint accepts connections and never answers (a black hole, as with no network
    behind a proxy): the check gives up after its timeout with one line naming the path; a refused
    connection fails the same way."""
    from gcs_emulator import emulator_env

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # accepts (the kernel does) and never replies
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens: connection refused
    code = ("import sys, time; from coordtok_jax.remote import check_reachable, RemoteError\n"
            "t = time.time()\n"
            "try:\n    check_reachable(sys.argv[1], 'workdir', timeout=3)\n"
            "except RemoteError as e:\n    print(round(time.time() - t, 1)); print(e)\n")
    try:
        for endpoint in (f"http://127.0.0.1:{hole.getsockname()[1]}", f"http://127.0.0.1:{closed_port}"):
            env = {**os.environ, **emulator_env(endpoint)}
            r = subprocess.run([sys.executable, "-c", code, "gs://bucket/run"], capture_output=True, text=True,
                               env=env, timeout=120)
            lines = r.stdout.strip().splitlines()
            assert len(lines) == 2, (r.stdout, r.stderr[-2000:])
            assert float(lines[0]) < 10, lines
            assert lines[1].startswith("workdir gs://bucket/run: "), lines
    finally:
        hole.close()
    from coordtok_jax.remote import check_reachable

    check_reachable(str(tmp_path), "workdir", timeout=0.001)  # local paths are not probed


def test_a_run_of_the_other_kind_is_named(tmp_path):
    """A tokenizer config on a SiT workdir (or the reverse) is refused naming both kinds, not with a
    list of every differing field."""
    sit_config = {"model": {"in_channels": 8, "hidden_size": 64}, "tokenizer": "/t", "batch_size": 8}
    tok_config = {"model": {"enc_embed_dim": 64, "latent_n_features": 8}, "batch_size": 8}
    (tmp_path / "config.json").write_text(json.dumps(sit_config))
    with pytest.raises(wd.WorkdirError, match=r"holds a SiT run \(coordtok_jax.train_sit\); this command trains a "
                                              r"CoordTok tokenizer run .*use another --workdir"):
        wd.check_config(epath.Path(tmp_path), tok_config, has_checkpoint=True)
    (tmp_path / "config.json").write_text(json.dumps(tok_config))
    with pytest.raises(wd.WorkdirError, match=r"holds a CoordTok tokenizer run .*trains a SiT run"):
        wd.check_config(epath.Path(tmp_path), sit_config, has_checkpoint=True)
    assert json.loads((tmp_path / "config.json").read_text()) == tok_config  # nothing rewritten
