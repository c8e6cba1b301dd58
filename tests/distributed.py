"""Run a command as a real 2-process JAX system on 127.0.0.1 (jax.distributed over CPU devices)."""

import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(args, devices_per_process: int = 2, timeout: int = 600):
    """`python ARGS` in two processes (JAX_* variables for the trainers' auto-initialisation);
    asserts both exit 0 and returns [(stdout, stderr)] per process."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
                             "--xla_backend_optimization_level=0")
        procs.append(subprocess.Popen([sys.executable] + list(args), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for pid, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{err[-3000:]}"
    return outputs
