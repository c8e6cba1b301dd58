"""launch/: tpu_vm.sh, slurm.sh, multinode.sh.

Nothing here needs gcloud, sbatch or ssh: the scripts run with --dry-run, or against small fakes
put on PATH (a gcloud that records its arguments and runs `ssh --command` locally, an
scontrol/srun pair that runs the generated batch script's tasks on this machine, an ssh that runs
the remote command locally). multinode.sh --local really starts local processes.
"""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm.sh"
MULTINODE = LAUNCH / "multinode.sh"

TRAIN = [
    "python3", "-m", "coordtok_jax.train", "--config=configs/coordtok.py:L,stage=1",
    "--workdir=gs://my-bucket/coordtok/L stage1", "--config.data.path=gs://b/it's here",
]

# Prints the JAX variables of the process as one JSON line.
PRINT_ENV = (
    "import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
    "if k.startswith('JAX_') or k == 'CUDA_VISIBLE_DEVICES'}), flush=True)"
)


def run(script, *args, env=None, cwd=None, timeout=60):
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, env=full_env, cwd=cwd,
        timeout=timeout,
    )


def lines(out):
    return [line for line in out.splitlines() if line.strip()]


def by_process(out):
    """multinode.sh output ('[i] line' per line) -> {i: [lines]}."""
    got = {}
    for line in lines(out):
        assert line.startswith("["), line
        label, _, payload = line.partition("] ")
        got.setdefault(int(label[1:]), []).append(payload)
    return got


def write_exe(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.mark.parametrize("script", [TPU_VM, SLURM, MULTINODE])
def test_scripts_are_executable_bash(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script, words", [
    (TPU_VM, ["Usage:", "create", "install", "run", "--dry-run", "Examples:", "v4-32"]),
    (SLURM, ["Usage:", "--nodes", "--gpus-per-node", "JAX_COORDINATOR_ADDRESS", "Examples:"]),
    (MULTINODE, ["Usage:", "--coordinator", "--hosts", "--local", "JAX_PROCESS_ID", "Examples:"]),
])
def test_help(script, words):
    for flag in ("--help", "-h"):
        r = run(script, flag)
        assert r.returncode == 0, r.stderr
        for word in words:
            assert word in r.stdout
        assert "set -euo" not in r.stdout


# ------------------------------------------------------------------------------------------------
# tpu_vm.sh


def gcloud_lines(out):
    got = [shlex.split(line) for line in lines(out)]
    assert all(words[0] == "gcloud" for words in got), out
    return got


def remote_command(words):
    [cmd] = [w[len("--command="):] for w in words if w.startswith("--command=")]
    return cmd


def test_tpu_up_dry_run_prints_describe_create_install():
    r = run(TPU_VM, "up", "--tpu=coordtok-v4-32", "--zone=us-central2-b", "--project=my-proj",
            "--accelerator-type=v4-32", "--spot", "--repo-url=https://github.com/org/coordtok-jax.git",
            "--branch=dev", "--extras=tfds", "--dry-run")
    assert r.returncode == 0, r.stderr
    describe, create, ssh = gcloud_lines(r.stdout)
    where = ["--zone=us-central2-b", "--project=my-proj"]
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "coordtok-v4-32"]
    assert all(w in describe for w in where)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "coordtok-v4-32"]
    for w in [*where, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]:
        assert w in create
    assert "--preemptible" not in create
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "coordtok-v4-32"]
    assert "--worker=all" in ssh and all(w in ssh for w in where)
    script = remote_command(ssh)
    assert "git clone --quiet --branch dev https://github.com/org/coordtok-jax.git ~/coordtok-jax" in script
    assert "fetch --quiet origin dev" in script and "checkout --quiet -B dev FETCH_HEAD" in script
    assert "python3 -m pip install --upgrade 'jax[tpu]' -e '.[tfds]'" in script


@pytest.mark.parametrize("accel, version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5p-64", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v6e-16", "v2-alpha-tpuv6e"),
])
def test_tpu_create_default_runtime_version(accel, version):
    r = run(TPU_VM, "create", "--tpu=t", "--zone=z", f"--accelerator-type={accel}", "--preemptible",
            "--dry-run")
    assert r.returncode == 0, r.stderr
    create = gcloud_lines(r.stdout)[1]
    assert f"--version={version}" in create and "--preemptible" in create


def test_tpu_create_explicit_version_and_extra_args():
    r = run(TPU_VM, "create", "--tpu", "t", "--zone", "z", "--accelerator-type", "v5p-32",
            "--version", "my-image", "--create-arg=--reserved",
            "--create-arg=--service-account=sa@p.iam.gserviceaccount.com", "--dry-run")
    assert r.returncode == 0, r.stderr
    create = gcloud_lines(r.stdout)[1]
    assert "--version=my-image" in create and "--reserved" in create
    assert "--service-account=sa@p.iam.gserviceaccount.com" in create


def test_tpu_run_dry_run_quotes_the_command():
    r = run(TPU_VM, "run", "--tpu=t", "--zone=z", "--env=TF_CPP_MIN_LOG_LEVEL=3",
            "--env=NOTE=a b", "--dir=/opt/coordtok", "--dry-run", "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    [ssh] = gcloud_lines(r.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t"] and "--worker=all" in ssh
    cmd = remote_command(ssh)
    assert cmd.startswith("cd /opt/coordtok && export TF_CPP_MIN_LOG_LEVEL=3 && export NOTE='a b' && ")
    # The remote shell reads the user's command back word for word.
    assert shlex.split(cmd.split(" && ")[-1]) == TRAIN


def test_tpu_run_detach_and_worker():
    r = run(TPU_VM, "run", "--tpu=t", "--zone=z", "--detach", "--log=/tmp/train.log", "--worker=0",
            "--ssh-arg=--internal-ip", "--dry-run", "--", "python3", "-c", "print(1)")
    assert r.returncode == 0, r.stderr
    [ssh] = gcloud_lines(r.stdout)
    assert "--worker=0" in ssh and "--internal-ip" in ssh
    assert "nohup python3 -c 'print(1)' > /tmp/train.log 2>&1 < /dev/null &" in remote_command(ssh)


def test_tpu_legacy_form_is_run():
    r = run(TPU_VM, "--tpu=t", "--zone=z", "--repo=~/src/ct", "--dry-run", "--", "ls", "-l")
    assert r.returncode == 0, r.stderr
    [ssh] = gcloud_lines(r.stdout)
    assert remote_command(ssh) == "cd ~/src/ct && ls -l"


def test_tpu_describe_delete_dry_run():
    r = run(TPU_VM, "delete", "--tpu=t", "--zone=z", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert gcloud_lines(r.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t", "--zone=z", "--quiet"]]
    r = run(TPU_VM, "describe", "--tpu=t", "--zone=z", "--project=p", "--dry-run")
    assert gcloud_lines(r.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t", "--zone=z", "--project=p"]]


@pytest.mark.parametrize("args, flag", [
    (["run", "--zone=z", "--", "ls"], "--tpu"),
    (["run", "--tpu=t", "--", "ls"], "--zone"),
    (["create", "--tpu=t", "--zone=z"], "--accelerator-type"),
    (["create", "--tpu=t", "--zone=z", "--accelerator-type=v9-8"], "--version"),
    (["install", "--tpu=t", "--zone=z"], "--repo-url"),
    (["up", "--tpu=t", "--zone=z", "--accelerator-type=v4-8"], "--repo-url"),
    (["run", "--tpu=t", "--zone=z"], "after --"),
    (["--tpu=t", "--zone=z"], "subcommand"),
    (["run", "--tpu=t", "--zone=z", "--bogus=1", "--", "ls"], "--bogus"),
    (["run", "--tpu=t", "--zone=z", "--env=novalue", "--", "ls"], "--env"),
    (["create", "--tpu=t", "--zone=z", "--accelerator-type=v4-8", "--spot", "--preemptible"], "--spot"),
    (["run", "--tpu=t", "--zone"], "--zone"),
])
def test_tpu_usage_errors(args, flag):
    r = run(TPU_VM, *args, "--dry-run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert flag in r.stderr and r.stdout == ""


FAKE_GCLOUD = """\
#!{python}
# Records its arguments; describe answers from $FAKE_TPU_STATE / $FAKE_TPU_TYPE (empty state: not
# found); ssh runs --command locally (one worker).
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    state = os.environ.get("FAKE_TPU_STATE", "")
    if not state:
        sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found\\n")
        sys.exit(1)
    print(state + "\\t" + os.environ.get("FAKE_TPU_TYPE", ""))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    [cmd] = [a[len("--command="):] for a in args if a.startswith("--command=")]
    sys.exit(subprocess.call(["bash", "-c", cmd]))
"""


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    log = tmp_path / "gcloud.log"
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log),
           "HOME": str(home)}

    def calls():
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return env, calls, home


def test_tpu_dry_run_runs_no_gcloud(fake_gcloud):
    env, calls, _ = fake_gcloud
    for args in (["up", "--accelerator-type=v4-32", "--repo-url=u"], ["run", "--", "ls"],
                 ["delete"], ["describe"]):
        r = run(TPU_VM, "--tpu=t", "--zone=z", "--dry-run", *args, env=env)
        assert r.returncode == 0, r.stderr
    assert calls() == []


@pytest.mark.parametrize("state, accel, extra, rc, verbs", [
    ("", "", [], 0, ["describe", "create"]),
    ("READY", "v4-32", [], 0, ["describe"]),
    ("CREATING", "v4-32", [], 0, ["describe"]),
    ("STOPPED", "v4-32", [], 0, ["describe", "start"]),
    ("PREEMPTED", "v4-32", [], 1, ["describe"]),
    ("PREEMPTED", "v4-32", ["--recreate"], 0, ["describe", "delete", "create"]),
    ("READY", "v4-8", [], 1, ["describe"]),
])
def test_tpu_create_reuses_or_creates(fake_gcloud, state, accel, extra, rc, verbs):
    env, calls, _ = fake_gcloud
    env = {**env, "FAKE_TPU_STATE": state, "FAKE_TPU_TYPE": accel}
    r = run(TPU_VM, "create", "--tpu=t", "--zone=z", "--accelerator-type=v4-32", *extra, env=env)
    assert r.returncode == rc, r.stderr
    assert [c[3] for c in calls()] == verbs
    if rc:
        assert "error" in r.stderr
    if "create" in verbs:
        assert calls()[-1] == ["compute", "tpus", "tpu-vm", "create", "t", "--zone=z",
                               "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]


def test_tpu_describe_other_error_fails(fake_gcloud, tmp_path):
    env, _, _ = fake_gcloud
    write_exe(tmp_path / "bin" / "gcloud", "#!/usr/bin/env bash\necho 'PERMISSION_DENIED' >&2; exit 1\n")
    r = run(TPU_VM, "create", "--tpu=t", "--zone=z", "--accelerator-type=v4-8", env=env)
    assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr


def git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})


def test_tpu_install_clones_then_updates_and_run_uses_the_checkout(fake_gcloud, tmp_path):
    env, calls, home = fake_gcloud
    origin = tmp_path / "origin"
    origin.mkdir()
    git("init", "-q", "-b", "main", cwd=origin)
    (origin / "version.txt").write_text("one\n")
    git("add", ".", cwd=origin)
    git("commit", "-q", "-m", "one", cwd=origin)
    pip_log = tmp_path / "pip.log"
    fake_python = write_exe(tmp_path / "python", f"#!/usr/bin/env bash\necho \"$PWD $*\" >> {pip_log}\n")
    args = ["install", "--tpu=t", "--zone=z", f"--repo-url={origin}", "--dir=~/ct",
            f"--python={fake_python}"]

    r = run(TPU_VM, *args, env=env)
    assert r.returncode == 0, r.stderr
    assert (home / "ct" / "version.txt").read_text() == "one\n"
    assert pip_log.read_text().splitlines() == [
        f"{home / 'ct'} -m pip install --quiet --upgrade pip",
        f"{home / 'ct'} -m pip install --upgrade jax[tpu] -e .",
    ]
    (origin / "version.txt").write_text("two\n")
    git("commit", "-q", "-am", "two", cwd=origin)
    r = run(TPU_VM, *args, env=env)
    assert r.returncode == 0, r.stderr
    assert (home / "ct" / "version.txt").read_text() == "two\n"
    assert all("--worker=all" in c for c in calls())

    r = run(TPU_VM, "run", "--tpu=t", "--zone=z", "--dir=~/ct", "--env=GREETING=hello there", "--",
            "bash", "-c", 'echo "$GREETING: $(cat version.txt)"', env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello there: two"
    r = run(TPU_VM, "run", "--tpu=t", "--zone=z", "--dir=~/ct", "--", "false", env=env)
    assert r.returncode == 1


# ------------------------------------------------------------------------------------------------
# slurm.sh


def split_sbatch(out):
    """--dry-run output -> (batch script, sbatch command words)."""
    script, _, command = out.rstrip("\n").rpartition("\n\n")
    return script + "\n", shlex.split(command)


def test_slurm_dry_run_script():
    r = run(SLURM, "--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
            "--time=72:00:00", "--job-name=ct-L1", "--exclusive", "--sbatch-arg=--constraint=h100",
            "--srun-arg=--cpu-bind=none", "--setup=source ~/venvs/ct/bin/activate",
            "--env=XLA_PYTHON_CLIENT_MEM_FRACTION=0.95", "--script=/tmp/x/ct.sbatch", "--dry-run",
            "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    script, command = split_sbatch(r.stdout)
    assert command == ["sbatch", "/tmp/x/ct.sbatch"]
    assert not pathlib.Path("/tmp/x/ct.sbatch").exists()
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=72:00:00",
                 "#SBATCH --job-name=ct-L1", "#SBATCH --exclusive", "#SBATCH --constraint=h100",
                 "source ~/venvs/ct/bin/activate", "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
                 "export JAX_NUM_PROCESSES=4"]:
        assert line in script.splitlines(), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert 'export JAX_COORDINATOR_ADDRESS="$head_node:$JAX_COORDINATOR_PORT"' in script
    assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpu-bind=none" in script
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script
    # The command, read back by a shell, is the user's command word for word.
    last = script.rstrip("\n").splitlines()[-1]
    assert shlex.split(last) == TRAIN
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("args, flag", [
    (["--", "python", "x.py"], "--nodes"),
    (["--nodes=two", "--", "x"], "--nodes"),
    (["--nodes=2"], "after --"),
    (["--nodes=2", "--gpus-per-node=0", "--", "x"], "--gpus-per-node"),
    (["--nodes=2", "--one-process-per=host", "--", "x"], "--one-process-per"),
    (["--nodes=2", "--port=99999", "--", "x"], "--port"),
    (["--nodes=2", "--frobnicate=1", "--", "x"], "--frobnicate"),
])
def test_slurm_usage_errors(args, flag):
    r = run(SLURM, *args, "--dry-run")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert flag in r.stderr


FAKE_SCONTROL = """\
#!/usr/bin/env bash
# scontrol show hostnames LIST, for LIST = prefix[NN-MM]
[[ "$1 $2" == "show hostnames" ]] || exit 1
if [[ "$3" =~ ^(.*)\\[([0-9]+)-([0-9]+)\\]$ ]]; then
  for ((i = 10#${BASH_REMATCH[2]}; i <= 10#${BASH_REMATCH[3]}; i++)); do
    printf '%s%02d\\n' "${BASH_REMATCH[1]}" "$i"
  done
else
  tr , '\\n' <<<"$3"
fi
"""

FAKE_SRUN = """\
#!/usr/bin/env bash
# srun --nodes=N --ntasks-per-node=T [--more] CMD...: runs the N*T tasks here, one after another.
nodes=1 tpn=1
while [[ "$1" == --* ]]; do
  case "$1" in --nodes=*) nodes=${1#*=} ;; --ntasks-per-node=*) tpn=${1#*=} ;; esac
  shift
done
for ((t = 0; t < nodes * tpn; t++)); do
  SLURM_PROCID=$t SLURM_LOCALID=$((t % tpn)) SLURM_NTASKS=$((nodes * tpn)) "$@" || exit $?
done
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    write_exe(bin_dir / "srun", FAKE_SRUN)
    write_exe(bin_dir / "sbatch", f"#!/usr/bin/env bash\necho \"$*\" > {tmp_path / 'sbatch.log'}\n"
                                  "echo 'Submitted batch job 4242'\n")
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "1234",
           "SLURM_JOB_NODELIST": "gpu[07-08]"}
    return env


@pytest.mark.parametrize("per, expected_ids", [("node", ["0,1,2,3"] * 2), ("gpu", ["0", "1", "2", "3"] * 2)])
def test_slurm_batch_script_sets_jax_variables_per_task(fake_slurm, tmp_path, per, expected_ids):
    r = run(SLURM, "--nodes=2", "--gpus-per-node=4", f"--one-process-per={per}", f"--chdir={tmp_path}",
            "--setup=export SETUP_RAN=yes", "--dry-run", "--", sys.executable, "-c",
            PRINT_ENV.replace("k == 'CUDA_VISIBLE_DEVICES'", "k == 'SETUP_RAN'") + "; print(os.getcwd())")
    assert r.returncode == 0, r.stderr
    script, _ = split_sbatch(r.stdout)
    job = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **fake_slurm})
    assert job.returncode == 0, job.stderr
    out = job.stdout.splitlines()
    port = str(61440 + 1234 % 4096)
    assert out[0] == f"coordinator gpu07:{port}, {len(expected_ids)} process(es), nodes gpu[07-08]"
    tasks = [json.loads(line) for line in out[1::2]]
    assert out[2::2] == [str(tmp_path)] * len(expected_ids)
    assert [t["JAX_PROCESS_ID"] for t in tasks] == [str(i) for i in range(len(expected_ids))]
    assert {t["JAX_NUM_PROCESSES"] for t in tasks} == {str(len(expected_ids))}
    assert {t["JAX_COORDINATOR_ADDRESS"] for t in tasks} == {f"gpu07:{port}"}
    assert {t["JAX_COORDINATOR_PORT"] for t in tasks} == {port}
    assert [t["JAX_LOCAL_DEVICE_IDS"] for t in tasks] == expected_ids
    assert {t["SETUP_RAN"] for t in tasks} == {"yes"}


def test_slurm_port_override_and_submit(fake_slurm, tmp_path):
    script_path = tmp_path / "jobs" / "ct.sbatch"
    r = run(SLURM, "--nodes=1", "--port=23456", f"--script={script_path}", "--", "echo", "hi",
            env=fake_slurm)
    assert r.returncode == 0, r.stderr
    assert "Submitted batch job 4242" in r.stdout
    assert (tmp_path / "sbatch.log").read_text().strip() == str(script_path)
    text = script_path.read_text()
    assert "export JAX_COORDINATOR_PORT=23456" in text.splitlines()
    assert text.rstrip().endswith("echo hi")


def test_slurm_submit_without_sbatch_fails_clearly(tmp_path):
    r = run(SLURM, "--nodes=1", f"--script={tmp_path / 's.sbatch'}", "--", "echo",
            env={"PATH": "/usr/bin:/bin"})
    if r.returncode == 0:  # a machine with a real sbatch in /usr/bin
        pytest.skip("sbatch is installed here")
    assert r.returncode == 127 and "sbatch is not installed" in r.stderr


# ------------------------------------------------------------------------------------------------
# multinode.sh


def test_multinode_single_process_exports_and_execs():
    r = run(MULTINODE, "--coordinator=10.0.0.1:12345", "--num-processes=4", "--process-id=3",
            "--local-device-ids=0,1", "--env=EXTRA=x y", "--", sys.executable, "-c", PRINT_ENV)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["JAX_COORDINATOR_ADDRESS"] == "10.0.0.1:12345"
    assert (got["JAX_NUM_PROCESSES"], got["JAX_PROCESS_ID"], got["JAX_LOCAL_DEVICE_IDS"]) == ("4", "3", "0,1")

    r = run(MULTINODE, "--coordinator=h:1", "--num-processes=2", "--process-id=0", "--dry-run", "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == ["env", "JAX_COORDINATOR_ADDRESS=h:1", "JAX_NUM_PROCESSES=2",
                                     "JAX_PROCESS_ID=0", *TRAIN]


@pytest.mark.parametrize("args, flag", [
    (["--num-processes=2", "--process-id=0"], "--coordinator"),
    (["--coordinator=h:1", "--process-id=0"], "--num-processes"),
    (["--coordinator=h:1", "--num-processes=2"], "--process-id"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2"], "--process-id"),
    (["--coordinator=h", "--num-processes=2", "--process-id=0"], "--coordinator"),
    (["--local=0"], "--local"),
    (["--local=2", "--hosts=a,b"], "--hosts"),
    (["--local=3", "--gpus=0,1,2,3"], "--local=3"),
    (["--hosts=a,b", "--num-processes=3"], "--num-processes"),
    (["--hosts=a,b", "--mystery"], "--mystery"),
])
def test_multinode_usage_errors(args, flag):
    r = run(MULTINODE, *args, "--dry-run", "--", "echo")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert flag in r.stderr
    r = run(MULTINODE, "--local=2")
    assert r.returncode == 2 and "after --" in r.stderr


def test_multinode_local_dry_run_splits_gpus():
    r = run(MULTINODE, "--local=2", "--gpus=0,1,2,3", "--port=5555", "--dry-run", "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    got = [shlex.split(line) for line in lines(r.stdout)]
    assert got == [
        ["env", f"CUDA_VISIBLE_DEVICES={share}", "JAX_LOCAL_DEVICE_IDS=0,1",
         "JAX_COORDINATOR_ADDRESS=127.0.0.1:5555", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}", *TRAIN]
        for i, share in enumerate(["0,1", "2,3"])
    ]
    r = run(MULTINODE, "--local=2", "--gpus=none", "--port=5555", "--dry-run", "--", "echo")
    assert [shlex.split(line)[1] for line in lines(r.stdout)] == ["JAX_COORDINATOR_ADDRESS=127.0.0.1:5555"] * 2


def test_multinode_hosts_dry_run_prints_ssh_commands():
    r = run(MULTINODE, "--hosts=gpu-a,me@gpu-b", "--port=2222", "--dir=/srv/coordtok",
            "--setup=source ~/venv/bin/activate", "--ssh-opt=-p2200", "--env=NCCL_DEBUG=WARN",
            "--dry-run", "--", *TRAIN)
    assert r.returncode == 0, r.stderr
    got = [shlex.split(line) for line in lines(r.stdout)]
    assert [w[:6] for w in got] == [["ssh", "-n", "-o", "BatchMode=yes", "-p2200", host]
                                    for host in ("gpu-a", "me@gpu-b")]
    for i, words in enumerate(got):
        remote = words[6]
        assert len(words) == 7
        assert remote.startswith("cd /srv/coordtok && source ~/venv/bin/activate && export ")
        exports, cmd = remote.split(" && exec ")
        assert shlex.split(exports.split(" && ")[-1])[1:] == [
            "JAX_COORDINATOR_ADDRESS=gpu-a:2222", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}",
            "NCCL_DEBUG=WARN"]
        assert shlex.split(cmd) == TRAIN


def test_multinode_local_runs_two_processes():
    start = time.time()
    r = run(MULTINODE, "--local=2", "--gpus=none", "--", sys.executable, "-c", PRINT_ENV)
    assert r.returncode == 0, r.stderr
    got = by_process(r.stdout)
    assert sorted(got) == [0, 1]
    envs = [json.loads(got[i][0]) for i in range(2)]
    for i, env in enumerate(envs):
        assert env["JAX_PROCESS_ID"] == str(i) and env["JAX_NUM_PROCESSES"] == "2"
        assert env["JAX_COORDINATOR_ADDRESS"].startswith("127.0.0.1:")
        assert "JAX_LOCAL_DEVICE_IDS" not in env  # no GPUs split
    assert envs[0]["JAX_COORDINATOR_ADDRESS"] == envs[1]["JAX_COORDINATOR_ADDRESS"]
    assert time.time() - start < 20


def test_multinode_local_failure_fails_the_launcher_and_stops_the_rest():
    start = time.time()
    r = run(MULTINODE, "--local=3", "--gpus=none", "--", "bash", "-c",
            'echo "up $JAX_PROCESS_ID"; if [ "$JAX_PROCESS_ID" = 1 ]; then exit 7; fi; sleep 60; echo late')
    assert r.returncode == 7, (r.stdout, r.stderr)
    assert "process 1 exited with status 7" in r.stderr
    assert "late" not in r.stdout
    assert time.time() - start < 30  # the sleeping processes were stopped, not waited for


def test_multinode_local_gpu_split_is_applied(tmp_path):
    r = run(MULTINODE, "--local=2", "--gpus=4,5,6,7", "--", sys.executable, "-c", PRINT_ENV)
    assert r.returncode == 0, r.stderr
    got = {i: json.loads(out[0]) for i, out in by_process(r.stdout).items()}
    assert [(got[i]["CUDA_VISIBLE_DEVICES"], got[i]["JAX_LOCAL_DEVICE_IDS"]) for i in range(2)] == [
        ("4,5", "0,1"), ("6,7", "0,1")]


def test_multinode_hosts_runs_over_ssh(tmp_path):
    fake_ssh = write_exe(tmp_path / "ssh", """\
        #!/usr/bin/env bash
        # ssh [-n] [-o OPT] [-x...] HOST COMMAND: runs COMMAND here
        while [[ "$1" == -* ]]; do [[ "$1" == -o ]] && shift; shift; done
        host="$1"; shift
        FAKE_HOST="$host" exec bash -c "$*"
        """)
    work = tmp_path / "work"
    work.mkdir()
    code = PRINT_ENV.replace("k == 'CUDA_VISIBLE_DEVICES'", "k == 'FAKE_HOST'") + "; print(os.getcwd())"
    r = run(MULTINODE, "--hosts=alpha,beta", f"--ssh={fake_ssh}", f"--dir={work}",
            "--", sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    got = by_process(r.stdout)
    assert sorted(got) == [0, 1]
    for i, host in enumerate(["alpha", "beta"]):
        env = json.loads(got[i][0])
        assert (env["FAKE_HOST"], env["JAX_PROCESS_ID"], env["JAX_NUM_PROCESSES"]) == (host, str(i), "2")
        assert env["JAX_COORDINATOR_ADDRESS"] == "alpha:12345"
        assert got[i][1] == str(work)

    r = run(MULTINODE, "--hosts=alpha,beta", f"--ssh={fake_ssh}", f"--dir={work}",
            "--", "bash", "-c", '[ "$JAX_PROCESS_ID" = 0 ] || exit 3')
    assert r.returncode == 3


def test_multinode_local_jax_distributed_cpu():
    """Two real JAX processes on CPU join through the variables the launcher sets."""
    code = (
        "import os, jax; "
        "jax.distributed.initialize(num_processes=int(os.environ['JAX_NUM_PROCESSES']), "
        "process_id=int(os.environ['JAX_PROCESS_ID']), initialization_timeout=60); "
        "print(jax.process_index(), jax.process_count(), jax.device_count(), flush=True)"
    )
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    r = run(MULTINODE, "--local=2", "--gpus=none", "--", sys.executable, "-c", code, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert by_process(r.stdout) == {0: ["0 2 4"], 1: ["1 2 4"]}


def test_multinode_local_stopping_the_launcher_stops_its_processes(tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    launcher = subprocess.Popen(
        [str(MULTINODE), "--local=2", "--gpus=none", "--", "bash", "-c",
         f'echo $$ > {pid_dir}/$JAX_PROCESS_ID; exec sleep 60'],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while len(list(pid_dir.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    children = [int(p.read_text()) for p in pid_dir.iterdir()]
    assert len(children) == 2
    launcher.terminate()
    assert launcher.wait(timeout=20) == 143
    deadline = time.time() + 10
    while any(alive(pid) for pid in children) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in children)


def alive(pid):
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
@pytest.mark.parametrize("script", [TPU_VM, SLURM, MULTINODE])
def test_shellcheck(script):
    r = subprocess.run(["shellcheck", "-s", "bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_readme_examples_parse():
    """Every launch/ command in launch/README.md's bash blocks runs cleanly with --dry-run."""
    text = (LAUNCH / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    assert len(blocks) >= 8
    ran = 0
    for block in blocks:
        if "launch/" not in block:
            continue
        script = "set -e\npython() { :; }\npython3() { :; }\ngsutil() { :; }\n"
        for name in ("tpu_vm.sh", "slurm.sh", "multinode.sh"):
            block = block.replace(f"launch/{name}", f"{LAUNCH / name} --dry-run")
        ran += block.count("--dry-run")
        r = subprocess.run(["bash", "-c", script + block], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, timeout=60)
        assert r.returncode == 0, (block, r.stderr)
    assert ran >= 15
