"""Runs of several processes: real processes on this machine.

The processes join through jax.distributed on localhost (a free port), with
gloo collectives between their CPU devices, exactly as the hosts of a
cluster do; experiments/launch.py starts them, as the README shows.

Run as a module (``python -m tests.test_multiprocess ARGS``), this file is a
training command that also records, for every step, which examples each
process fed: the evidence that the per-process slices are disjoint and make
up the global batch.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import cli, data, launch, trainer
from experiments.configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "experiments/configs/fashion_mnist_se_resnet20.py"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_DIR),
    reason="Debian's dataset-fashion-mnist is not installed;"
           " experiments/setup.sh installs it")
# The README's command for a run of two processes of two CPU devices each.
LAUNCH = ["-m", "experiments.launch", "--num-processes", "2",
          "--cpu-devices", "2"]
RECORD_ENV = "SE_JAX_TEST_BATCHES"
STEPS = 12
# Less optimisation, for all the runs compared: on CPUs JAX's compilation
# cache serves only process 0, so process 1 compiles the training step
# afresh each run, and these tests are about processes, not speed.
XLA_FLAGS = ("--xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true")


def _train_args(workdir, steps=STEPS):
  # A small step size keeps rounding differences (the devices sum in
  # another order) from being amplified, as in the 1-vs-4 device test.
  return [f"--config={FMNIST}:smoke", f"--workdir={workdir}",
          f"--config.num_train_steps={steps}",
          "--config.checkpoint_every_steps=6", "--config.keep_checkpoints=2",
          "--config.batch_size=16", "--config.max_train_examples=256",
          "--config.model_options.widths=(8,16,32)",
          "--config.model_options.reduction=4",
          "--config.learning_rate=0.01"]


def _env(devices=None, **extra):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC",
                              "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE"))}
  env["XLA_FLAGS"] = XLA_FLAGS + (
      f" --xla_force_host_platform_device_count={devices}" if devices else "")
  env[cli.DEBUG_ENV] = ""
  env.update(extra)
  return env


def _jsonl(path, split="train"):
  with open(path) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def _final_state(workdir, step):
  # Restored onto this process's one device, whatever the run had.
  manager = ocp.CheckpointManager(
      os.path.join(workdir, "checkpoints"),
      item_handlers=ocp.StandardCheckpointHandler())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      manager.item_metadata(step))
  state = manager.restore(step, args=ocp.args.StandardRestore(target))
  manager.close()
  return state


def _records(directory, process):
  """step -> the example ids `process` fed at that step (the last run's)."""
  out = {}
  path = os.path.join(directory, f"process_{process}.jsonl")
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue  # The line a killed process was writing.
      out[r["step"]] = r["ids"]
  return out


def _wait_for_checkpoint(proc, ckpt_dir, at_least, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    steps = [int(s) for s in (os.listdir(ckpt_dir)
                              if os.path.isdir(ckpt_dir) else ())
             if s.isdigit()]
    if steps and max(steps) >= at_least:
      return
    time.sleep(0.05)
  raise AssertionError("the run ended before it could be interrupted")


@needs_fmnist
def test_two_processes_of_two_devices_train_as_one_of_four(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  rec_one, rec_two = str(tmp_path / "rec_one"), str(tmp_path / "rec_two")
  os.makedirs(rec_one), os.makedirs(rec_two)
  record = ["--module", "tests.test_multiprocess"]

  # One process of four CPU devices, and beside it two processes of two
  # devices, both killed once a checkpoint is written, then run again.
  log = tmp_path / "one.log"
  with open(log, "w") as f:
    reference = subprocess.Popen(
        [sys.executable, "-m", "tests.test_multiprocess", *_train_args(one)],
        cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
        env=_env(devices=4, JAX_PLATFORMS="cpu", **{RECORD_ENV: rec_one}))
  command = [sys.executable, *LAUNCH, *record, *_train_args(two)]
  env = _env(**{RECORD_ENV: rec_two})
  proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True,
                          stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    _wait_for_checkpoint(proc, os.path.join(two, "checkpoints"), 6)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  resumed = re.search(r"Resuming from the checkpoint at step (\d+)",
                      r.stderr)
  assert resumed and 6 <= int(resumed.group(1)) < STEPS, r.stderr[-3000:]
  assert reference.wait() == 0, log.read_text()[-3000:]

  # The same losses as one process (tolerances of the 1-vs-4 device test),
  # written once, by process 0.
  losses = {w: [x["loss"] for x in _jsonl(os.path.join(w, "metrics.jsonl"))]
            for w in (one, two)}
  assert len(losses[one]) == len(losses[two]) == STEPS
  np.testing.assert_allclose(losses[two][0], losses[one][0], rtol=1e-6)
  np.testing.assert_allclose(losses[two], losses[one], rtol=1e-4)
  with open(os.path.join(two, "provenance.jsonl")) as f:
    assert len(f.readlines()) == 2  # One line per invocation, not process.
  with open(os.path.join(two, ".lock")) as f:
    assert "process 0 of run" in f.read()
  # Both processes wrote the checkpoint.
  assert sorted(os.listdir(os.path.join(
      two, "checkpoints", str(STEPS), "default", "array_metadatas"))) == [
          "process_0", "process_1"]

  # The same final parameters, from the checkpoint the resumed run wrote.
  final = {w: _final_state(w, STEPS) for w in (one, two)}
  for a, b in zip(jax.tree.leaves(final[one]["params"]),
                  jax.tree.leaves(final[two]["params"])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)

  # Each step, process p fed the p-th half of the one process's batch.
  whole = _records(rec_one, 0)
  halves = _records(rec_two, 0), _records(rec_two, 1)
  assert sorted(whole) == sorted(halves[0]) == sorted(halves[1]) == list(
      range(STEPS))
  for step in range(STEPS):
    first, second = halves[0][step], halves[1][step]
    assert len(first) == len(second) == 8
    assert not set(first) & set(second)
    assert first + second == whole[step]


@needs_fmnist
def test_a_live_workdir_refuses_a_run_of_two_processes(tmp_path):
  wd = str(tmp_path)
  with trainer._workdir_lock(wd):
    r = subprocess.run([sys.executable, *LAUNCH, *_train_args(wd, steps=2)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if "error" in l]
  assert errors == [f"experiments.train: error: workdir {wd} is in use by"
                    f" another run (pid {os.getpid()} on {os.uname()[1]});"
                    " wait for it to finish or use another --workdir."]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(os.path.join(wd, "config.json"))


def test_the_launcher_stops_the_others_when_one_fails(tmp_path):
  t0 = time.time()
  r = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--num-processes", "2",
       "--grace", "1", "--module", "tests.test_multiprocess", "--",
       "--fail-on-process", "1"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
  assert r.returncode == 3
  assert "process 1 of 2 exited with status 3" in r.stderr
  assert "[1] process 1 gives up" in r.stderr
  # Process 0 waits forever; the launcher ended it.
  assert time.time() - t0 < 60


def test_process_environment():
  env = launch.process_env(1, 2, "127.0.0.1:1234", cpu_devices=2,
                           base={"XLA_FLAGS": "--xla_foo=1"
                                 " --xla_force_host_platform_device_count=8"})
  assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
  assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
  assert env["XLA_FLAGS"] == ("--xla_foo=1"
                              " --xla_force_host_platform_device_count=2")
  assert env["JAX_PLATFORMS"] == "cpu"
  env = launch.process_env(1, 2, "h:1", devices_per_process=4, base={})
  assert env["JAX_LOCAL_DEVICE_IDS"] == "4,5,6,7"
  assert launch.free_port() > 0


# ------------------------------------------------------------ settings


def _config(**kw):
  c = common.base_config()
  c.update(kw)
  return c


_CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                 "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri",
                 "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_LOCAL_RANK")


@pytest.fixture
def no_cluster(monkeypatch):
  for var in _CLUSTER_VARS + tuple(trainer.DISTRIBUTED_ENV.values()):
    monkeypatch.delenv(var, raising=False)
  return monkeypatch


def test_settings_from_the_config_then_the_environment(no_cluster):
  assert trainer.distributed_settings(_config()) is None
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}
  assert trainer.distributed_settings(_config(), env) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4,
      "process_id": 3, "local_device_ids": [0, 1]}
  # The config wins over the environment.
  got = trainer.distributed_settings(
      _config(process_id=1, coordinator_address="h:9"), env)
  assert (got["process_id"], got["coordinator_address"]) == (1, "h:9")
  assert trainer.distributed_settings(_config(distributed="off"), env) is None


def test_bad_or_incomplete_settings_name_the_key(no_cluster):
  cases = [
      ({"JAX_NUM_PROCESSES": "two"}, {}, r"\$JAX_NUM_PROCESSES='two'"),
      ({"JAX_PROCESS_ID": "-1"}, {}, r"\$JAX_PROCESS_ID='-1'"),
      ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, {},
       r"\$JAX_COORDINATOR_ADDRESS='10.0.0.1'.*HOST:PORT"),
      ({"JAX_LOCAL_DEVICE_IDS": "0;1"}, {}, r"\$JAX_LOCAL_DEVICE_IDS"),
      ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, {},
       r"process_id=2 .* 0 to num_processes - 1 = 1"),
      ({"JAX_NUM_PROCESSES": "2"}, {},
       r"coordinator_address=None .* JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"
       r"\).*Slurm"),
      ({}, {"distributed": "on"}, r"coordinator_address=None"),
  ]
  for env, config, message in cases:
    with pytest.raises(cli.ConfigError, match=message):
      trainer.distributed_settings(_config(**config), env)


def test_clusters_are_joined_when_jax_detects_several_processes(no_cluster):
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]",
           "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
  for var, value in slurm.items():
    no_cluster.setenv(var, value)
  no_cluster.setenv("SLURM_NTASKS", "1")
  assert trainer.distributed_settings(_config()) is None
  # "on" joins even a cluster of one process.
  left_to_jax = dict.fromkeys(trainer.DISTRIBUTED_ENV)
  assert trainer.distributed_settings(_config(distributed="on")) == left_to_jax
  no_cluster.setenv("SLURM_NTASKS", "4")
  # JAX reads the rest from Slurm's variables; a setting given still wins.
  assert trainer.distributed_settings(_config(), {"JAX_PROCESS_ID": "1"}) == {
      **left_to_jax, "process_id": 1}


def test_one_lock_per_file_system():
  same = trainer._lock_holders([True, True, True, True], ["a", "a", "b", "b"])
  assert same == [True, False, False, False]
  # Hosts b and c have disks of their own: one process of each locks.
  apart = trainer._lock_holders([True, True, False, False, False],
                                ["a", "a", "b", "b", "c"])
  assert apart == [True, False, True, False, True]


def test_the_readme_shows_the_commands_the_tests_run():
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = readme.split("### Several hosts", 1)[1].split("\n## ", 1)[0]
  assert "python " + " ".join(LAUNCH) in " ".join(section.split())
  assert f"--config={FMNIST}:smoke" in section
  for what in ("srun", "JAX_COORDINATOR_ADDRESS", "--worker=all"):
    assert what in section


# ------------------------------------------------------------ the module


def _record_and_train(argv):
  """The training command, recording each process's examples per step."""
  if argv[:1] == ["--fail-on-process"]:
    if os.environ["JAX_PROCESS_ID"] == argv[1]:
      print(f"process {argv[1]} gives up", flush=True)
      return 3
    time.sleep(600)
    return 0
  from experiments import train

  out = os.environ[RECORD_ENV]
  train_batches = data.train_batches

  def recording(*args, **kwargs):
    path = os.path.join(out, f"process_{kwargs['process_index']}.jsonl")
    step = kwargs["start_step"]
    for batch in train_batches(*args, **kwargs):
      ids = [hashlib.sha1(np.ascontiguousarray(image).tobytes()
                          + bytes([int(label)])).hexdigest()[:16]
             for image, label in zip(batch["image"], batch["label"])]
      with open(path, "a") as f:
        f.write(json.dumps({"step": step, "ids": ids}) + "\n")
      step += 1
      yield batch

  data.train_batches = recording
  train.main(argv)
  return 0


if __name__ == "__main__":
  sys.exit(cli.main_guard(_record_and_train, prog="experiments.train")())
