r"""Runs a training command as N processes of one run on this machine.

  python -m experiments.launch --num-processes 2 --cpu-devices 2 \
      --config=experiments/configs/fashion_mnist_se_resnet20.py \
      --workdir=workdirs/fashion_mnist_2x2

Starts N copies of ``python -m experiments.train`` (or of ``--module``)
with the arguments that follow, each told the run's coordinator, size and
its own index through JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port),
JAX_NUM_PROCESSES and JAX_PROCESS_ID. They join through ``jax.distributed``
exactly as the processes of a cluster do, so this is how a multi-host run is
tried on one machine, and how the tests run one. ``--cpu-devices K`` gives
each process K CPU devices (the processes' collectives then go over TCP with
gloo); ``--devices-per-process K`` gives process i the accelerators i*K to
i*K+K-1.

Process 0's output is shown as it comes; the others' only if they fail
differently. When one process fails the others are stopped, and the exit
status is the first failure's.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from experiments import cli

__all__ = ["free_port", "launch", "main", "process_env"]


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port on `host` that nothing listens on now."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(index: int, num_processes: int, coordinator: str, *,
                cpu_devices: int | None = None,
                devices_per_process: int | None = None,
                base: dict[str, str] | None = None) -> dict[str, str]:
  """The environment of process `index` of a local run."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=coordinator,
             JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(index))
  if cpu_devices is not None:
    env["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={cpu_devices}"])
  if devices_per_process is not None:
    first = index * devices_per_process
    env["JAX_LOCAL_DEVICE_IDS"] = ",".join(
        str(i) for i in range(first, first + devices_per_process))
  return env


def _stop(procs, grace: float) -> None:
  """Lets the processes end within `grace` seconds, then ends them."""
  for sig, wait in ((None, grace), (signal.SIGTERM, 5.0),
                    (signal.SIGKILL, 5.0)):
    if sig is not None:
      for p in procs:
        if p.poll() is None:
          p.send_signal(sig)
    deadline = time.monotonic() + wait
    while (any(p.poll() is None for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.05)
    if all(p.poll() is not None for p in procs):
      return


def _terminated(signum, frame):
  raise SystemExit(128 + signum)


def _tail(path: str, lines: int = 20) -> list[str]:
  with open(path, errors="replace") as f:
    return list(collections.deque(f, maxlen=lines))


def launch(args: list[str], *, num_processes: int,
           module: str = "experiments.train", cpu_devices: int | None = None,
           devices_per_process: int | None = None, port: int | None = None,
           host: str = "127.0.0.1", grace: float = 20.0) -> int:
  """Runs ``python -m MODULE ARGS`` as `num_processes` processes of one run.

  Args:
    args: the module's arguments.
    num_processes: how many processes.
    module: the entry point each process runs.
    cpu_devices: CPU devices per process; None leaves JAX's platform alone.
    devices_per_process: accelerators per process (JAX_LOCAL_DEVICE_IDS).
    port: the coordinator's port; default a free one.
    host: the coordinator's address (this machine).
    grace: seconds the others get to end by themselves after one fails.

  Returns:
    0 if every process succeeded, else the first failure's exit status.
  """
  coordinator = f"{host}:{port or free_port(host)}"
  envs = [process_env(i, num_processes, coordinator, cpu_devices=cpu_devices,
                      devices_per_process=devices_per_process)
          for i in range(num_processes)]
  main_thread = threading.current_thread() is threading.main_thread()
  if main_thread:
    # A scheduler's SIGTERM ends the processes too, not only this one.
    previous = signal.signal(signal.SIGTERM, _terminated)
  try:
    return _supervise([sys.executable, "-m", module, *args], envs, grace)
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def _supervise(command: list[str], envs: list[dict[str, str]],
               grace: float) -> int:
  """Runs `command` once per environment; see `launch`."""
  procs, logs = [], []
  with tempfile.TemporaryDirectory(prefix="se_jax-launch-") as tmp:
    try:
      for i, env in enumerate(envs):
        if i == 0:
          procs.append(subprocess.Popen(command, env=env))
          continue
        logs.append(os.path.join(tmp, f"process_{i}.log"))
        with open(logs[-1], "w") as log:
          procs.append(subprocess.Popen(command, env=env, stdout=log,
                                        stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL))
      first = None
      while first is None and any(p.poll() is None for p in procs):
        first = next((i for i, p in enumerate(procs)
                      if p.poll() not in (None, 0)), None)
        time.sleep(0.05)
      if first is not None:
        _stop(procs, grace)
    except BaseException:
      _stop(procs, 5.0)
      raise
    codes = [p.returncode for p in procs]
    if first is None:
      first = next((i for i, c in enumerate(codes) if c), None)
    for i, code in enumerate(codes[1:], 1):
      # The processes of a run mostly fail alike: process 0 has said it.
      if code and (codes[0] == 0 or code != codes[0]):
        print(f"process {i} of {len(procs)} exited with status {code};"
              " its last lines:", file=sys.stderr)
        for line in _tail(logs[i - 1]):
          print(f"  [{i}] {line.rstrip()}", file=sys.stderr)
  if first is None:
    return 0
  code = codes[first]
  return code if code > 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
  """The command line; see the module docstring."""
  p = argparse.ArgumentParser(
      prog="python -m experiments.launch", allow_abbrev=False,
      description=__doc__.splitlines()[0],
      epilog="Every other argument goes to the module.")
  p.add_argument("--num-processes", type=int, required=True, metavar="N",
                 help="processes of the run")
  p.add_argument("--cpu-devices", type=int, metavar="K",
                 help="run on CPUs, K devices per process")
  p.add_argument("--devices-per-process", type=int, metavar="K",
                 help="process i gets accelerators i*K ... i*K+K-1")
  p.add_argument("--port", type=int, help="coordinator port (default: free)")
  p.add_argument("--module", default="experiments.train",
                 help="the entry point each process runs")
  p.add_argument("--grace", type=float, default=20.0, metavar="SECONDS",
                 help="time the others get to end after one fails")
  args, rest = p.parse_known_args(argv)
  if rest[:1] == ["--"]:
    rest = rest[1:]
  for name in ("num_processes", "cpu_devices", "devices_per_process"):
    value = getattr(args, name)
    if value is not None and value < 1:
      p.error(f"--{name.replace('_', '-')} {value} is not allowed: an"
              " integer >= 1")
  if args.port is not None and not 0 < args.port < 65536:
    p.error(f"--port {args.port} is not allowed: 1 to 65535")
  return launch(rest, num_processes=args.num_processes, module=args.module,
                cpu_devices=args.cpu_devices,
                devices_per_process=args.devices_per_process, port=args.port,
                grace=args.grace)


if __name__ == "__main__":
  sys.exit(cli.main_guard(main, prog="experiments.launch")())
