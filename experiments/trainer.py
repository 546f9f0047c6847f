"""The training engine: `train_and_evaluate(config, workdir)`.

One engine for two CPU cores and for a TPU pod. The batch is sharded over a
1-D mesh of all devices (``data``), parameters and optimizer state are
replicated, and XLA inserts the cross-device reductions (BatchNorm statistics
included, so a run gives the same losses on 1 or N devices). With several
hosts (``jax.distributed``), each host feeds its own slice of every global
batch and Orbax writes the checkpoints collectively.

A run's workdir holds everything it produces: ``config.json``,
``metrics.jsonl``, TensorBoard events in ``tb/``, and Orbax checkpoints in
``checkpoints/``. Running the same command again resumes from the last
checkpoint (parameters, optimizer, step, RNG; the data position is the step)
and ends with the same parameters as an uninterrupted run.

A run of several processes is one run: each process runs this same code
(`initialize_distributed` says how it joins), the workdir lock is taken
once, only process 0 writes metrics and reports, and every process takes
part in saving and restoring the checkpoints, which must be on a file system
they all see. A checkpoint that cannot be restored (damaged files, or a
digest that does not match) is moved to ``corrupt_checkpoints/`` with a
warning and the run resumes from the newest one that restores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import cli, data, files
from experiments.steps import _cross_entropy, _top_k_correct
from experiments.steps import init_state, make_optimizer, make_schedule
from experiments.steps import make_train_step
from experiments.provenance import provenance
from se_jax.models import create

__all__ = ["CheckpointError", "DISTRIBUTED_ENV", "EXECUTION_KEYS",
           "NonFiniteLossError", "WorkdirError", "WorkdirLockedError",
           "build_model", "distributed_settings", "finished_result",
           "init_state", "initialize_distributed", "make_optimizer",
           "make_schedule", "make_train_step", "recipe", "restore_model",
           "train_and_evaluate"]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class WorkdirLockedError(RuntimeError):
  """Another run holds the workdir."""


class WorkdirError(RuntimeError):
  """The workdir cannot take the run: read-only, or too little free space."""


class CheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


# ------------------------------------------------------------ pieces


def build_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
  """The config's model, for its dataset's classes and channels."""
  info = data.DATASETS[config.dataset]
  options = {k: v for k, v in config.model_options.items() if v is not None}
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(config.compute_dtype)
  if config.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(
        f"compute_dtype must be 'float32' or 'bfloat16', got"
        f" {config.compute_dtype!r}."
    )
  return create(config.model, num_classes=info.num_classes,
                in_channels=info.channels, dtype=dtype, rngs=rngs, **options)


# ------------------------------------------------------------ workdir


def _check_workdir(workdir: str) -> None:
  """Fails now, not at the first checkpoint, if `workdir` cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=workdir, prefix=".write-test-")
    try:
      os.write(fd, b"se_jax")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.remove(probe)
  except OSError as e:
    raise WorkdirError(
        f"workdir {workdir} is not writable ({e.strerror or e}); give a"
        " --workdir on a writable file system."
    ) from e


# Metrics, TensorBoard events and the small files of a run.
_LOG_RESERVE_BYTES = 4 * 2 ** 20


def _preservation(keep: int, every: int | None):
  """Orbax's policy: the latest `keep` checkpoints, and those at multiples
  of `every` steps."""
  latest = ocp.checkpoint_managers.LatestN(n=keep)
  if every is None:
    return latest
  return ocp.checkpoint_managers.AnyPreservationPolicy([
      latest, ocp.checkpoint_managers.EveryNSteps(interval_steps=every)])


def _check_free_space(workdir: str, checkpoint_bytes: int, keep: int,
                      existing: int) -> None:
  """Fails if the checkpoints to come cannot fit in `workdir`."""
  # Orbax writes a new checkpoint before it deletes the oldest one.
  count = max(1, keep + 1 - existing)
  need = count * checkpoint_bytes + _LOG_RESERVE_BYTES
  free = shutil.disk_usage(workdir).free
  if free < need:
    mib = 2.0 ** 20
    raise WorkdirError(
        f"workdir {workdir} has {free / mib:.1f} MiB free, and the run needs"
        f" about {need / mib:.1f} MiB ({count} more checkpoint(s) of"
        f" {checkpoint_bytes / mib:.1f} MiB, keep_checkpoints={keep}); free"
        " some space or give another --workdir."
    )


@contextlib.contextmanager
def _workdir_lock(workdir: str, run: str = ""):
  path = os.path.join(workdir, ".lock")
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    raise WorkdirLockedError(
        f"workdir {workdir} is in use by another run ({holder}); wait for it"
        " to finish or use another --workdir."
    ) from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}{run}\n")
  f.flush()
  try:
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def _lock_holders(sees_lead: list[bool], hosts: list[str]) -> list[bool]:
  """Which processes lock the workdir, given what they see.

  Process 0 always does. A process that does not see process 0's lock file
  has a file system of its own (a host's local disk), and the first such
  process of each host locks that host's copy, so that a second run is
  refused on every file system the run writes.
  """
  holders = [False] * len(hosts)
  holders[0] = True
  taken = set()
  for p in range(1, len(hosts)):
    if not sees_lead[p] and hosts[p] not in taken:
      holders[p] = True
      taken.add(hosts[p])
  return holders


@contextlib.contextmanager
def _run_lock(workdir: str):
  """The workdir lock of a run of one or several processes."""
  n = jax.process_count()
  if n == 1:
    with _workdir_lock(workdir):
      yield
    return
  from jax.experimental import multihost_utils as mh

  me = jax.process_index()
  run = uuid.UUID(bytes=np.asarray(mh.broadcast_one_to_all(
      np.frombuffer(uuid.uuid4().bytes, np.uint8))).tobytes()).hex
  tag = f", process {me} of run {run}"
  with contextlib.ExitStack() as stack:
    error = None
    if me == 0:
      try:
        stack.enter_context(_workdir_lock(workdir, tag))
      except WorkdirLockedError as e:
        error = e
    if not bool(mh.broadcast_one_to_all(np.int32(error is None))):
      raise error or WorkdirLockedError(
          f"workdir {workdir} is in use by another run (process 0 could not"
          " lock it); wait for it to finish or use another --workdir.")
    try:
      with open(os.path.join(workdir, ".lock")) as f:
        sees_lead = f"process 0 of run {run}" in f.read()
    except OSError:
      sees_lead = False
    host = socket.gethostname()
    seen = np.asarray(mh.process_allgather(np.int32(sees_lead)))
    host_ids = np.asarray(mh.process_allgather(np.frombuffer(
        hashlib.sha256(host.encode()).digest()[:8], np.uint8)))
    hosts = [bytes(h).hex() for h in host_ids.reshape(n, -1)]
    if _lock_holders([bool(x) for x in seen.reshape(n)], hosts)[me] and me:
      try:
        stack.enter_context(_workdir_lock(workdir, tag))
      except WorkdirLockedError as e:
        error = e
    failed = np.asarray(mh.process_allgather(np.int32(error is not None)))
    if failed.any():
      raise error or WorkdirLockedError(
          f"workdir {workdir} is in use by another run on the host of"
          f" process {int(np.argmax(failed.reshape(n)))}; wait for it to"
          " finish or use another --workdir.")
    yield


class _MetricWriter:
  """JSON lines and TensorBoard, written by the first host only."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not enabled:
      return
    # Records past the restored step belong to a run that was cut off and
    # will be written again.
    if os.path.exists(self.path):
      with open(self.path) as f:
        keep = [l for l in f if json.loads(l)["step"] <= resume_step]
      files.write_atomic(self.path, "".join(keep))
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, split: str, metrics: dict[str, float]):
    if not self.enabled:
      return
    record = {"step": step, "split": split,
              **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(f"{split}/{k}", float(v), step)
    self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


# The settings of jax.distributed.initialize, and the environment variables
# that give them when the config leaves them at None.
DISTRIBUTED_ENV = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
    "local_device_ids": "JAX_LOCAL_DEVICE_IDS",
}


def _from_environment(key: str, environ) -> Any:
  var = DISTRIBUTED_ENV[key]
  text = environ.get(var, "").strip()
  if not text:
    return None
  try:
    if key == "coordinator_address":
      cli.check_address("$" + var, text)
      return text
    if key == "local_device_ids":
      ids = tuple(int(i) for i in text.split(","))
      if any(i < 0 for i in ids):
        raise ValueError
      return ids
    value = int(text)
    if value < (1 if key == "num_processes" else 0):
      raise ValueError
    return value
  except ValueError:
    rule = {"num_processes": "an integer >= 1",
            "process_id": "an integer >= 0",
            "local_device_ids": "comma-separated device indices, e.g. 0,1",
            }.get(key, "HOST:PORT, e.g. 10.0.0.1:1234")
    raise cli.ConfigError("$" + var, text, rule) from None


def _detect_cluster() -> tuple[str, int | None] | None:
  """The cluster JAX would read its settings from, and its process count.

  JAX's own detectors (Cloud TPU, Slurm, Open MPI, Kubernetes...), so that
  the run joins exactly when ``jax.distributed.initialize()`` would find
  its settings. Only the detectors that run by default are asked.
  """
  try:
    from jax._src import clusters  # JAX's list of cluster environments.
    kinds = list(clusters.ClusterEnv._cluster_types)
  except (ImportError, AttributeError):
    return None
  for kind in kinds:
    try:
      if kind.opt_in_only_method or not kind.is_env_present():
        continue
    except Exception:  # noqa: BLE001 - a detector that fails did not detect.
      continue
    try:
      count = int(kind.get_process_count())
    except Exception:  # noqa: BLE001
      count = None
    return kind.__name__, count
  return None


def distributed_settings(config: ml_collections.ConfigDict,
                         environ=None) -> dict[str, Any] | None:
  """How this process joins a run of several processes, if it does.

  Each of `DISTRIBUTED_ENV`'s settings comes from the config, else from its
  environment variable, else from the cluster (JAX reads Slurm's, Open
  MPI's and Cloud TPU's). With ``distributed="auto"`` a process joins when a
  setting is given or a cluster of several processes is detected; ``"on"``
  always joins and ``"off"`` never does.

  Args:
    config: the run's config.
    environ: the environment (default ``os.environ``).

  Returns:
    The keyword arguments of ``jax.distributed.initialize`` (settings left to
    the cluster are None), or None for a run of one process.

  Raises:
    cli.ConfigError: for a setting out of range, or settings that are
      incomplete with no cluster to complete them.
  """
  environ = os.environ if environ is None else environ
  cli.validate_distributed(config)
  mode = config.distributed
  if mode == "off":
    return None
  settings = {}
  for key in DISTRIBUTED_ENV:
    value = config.get(key)
    settings[key] = (_from_environment(key, environ) if value is None
                     else value)
  n, p = settings["num_processes"], settings["process_id"]
  if n is not None and p is not None and p >= n:
    raise cli.ConfigError("process_id", p,
                          f"an integer from 0 to num_processes - 1 = {n - 1}")
  named = [k for k in ("coordinator_address", "num_processes", "process_id")
           if settings[k] is not None]
  cluster = None if len(named) == 3 else _detect_cluster()
  if mode == "auto" and not named and (cluster is None
                                       or (cluster[1] or 1) < 2):
    return None
  if len(named) < 3 and cluster is None:
    missing = [k for k in ("coordinator_address", "num_processes",
                           "process_id") if settings[k] is None]
    raise cli.ConfigError(
        missing[0], None,
        "a run of several processes needs coordinator_address, num_processes"
        " and process_id (--config.KEY or " + ", ".join(
            DISTRIBUTED_ENV[k] for k in missing) + "), unless it runs under a"
        " cluster that JAX detects (Slurm, Open MPI, Cloud TPU); or set"
        " distributed='off'")
  if settings["local_device_ids"] is not None:
    settings["local_device_ids"] = list(settings["local_device_ids"])
  return settings


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Joins the run's other processes, if `distributed_settings` says so.

  Must run before anything uses JAX's devices. On CPUs the processes'
  collectives go through gloo over TCP, so a run of several processes works
  on one machine (tests/test_multiprocess.py, experiments/launch.py).
  """
  if jax.distributed.is_initialized():
    return
  settings = distributed_settings(config)
  if settings is None:
    return
  jax.distributed.initialize(**settings)


# ------------------------------------------------------------ checkpoints


def _to_checkpoint(state: dict) -> dict:
  return {
      "step": state["step"],
      "rng": state["rng"],
      "params": nnx.to_pure_dict(state["params"]),
      "batch_stats": nnx.to_pure_dict(state["batch_stats"]),
      "opt_state": {str(i): leaf for i, leaf in
                    enumerate(jax.tree.leaves(state["opt_state"]))},
  }


def _from_checkpoint(template: dict, restored: dict) -> dict:
  params, stats = template["params"], template["batch_stats"]
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(stats, restored["batch_stats"])
  treedef = jax.tree.structure(template["opt_state"])
  leaves = [restored["opt_state"][str(i)] for i in range(treedef.num_leaves)]
  return {"step": restored["step"], "rng": restored["rng"], "params": params,
          "batch_stats": stats,
          "opt_state": jax.tree.unflatten(treedef, leaves)}


def _digest(tree: dict) -> str:
  """sha256 of a checkpoint's arrays: what was saved is what is restored."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, jax.Array):
      # Replicated: every process holds the whole value.
      leaf = leaf.addressable_data(0)
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype.str}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


_DIGEST_KEY = "se_jax_sha256"


def _save(manager: ocp.CheckpointManager, step: int, state: dict) -> None:
  tree = _to_checkpoint(state)
  manager.save(step, args=ocp.args.StandardSave(tree),
               custom_metadata={_DIGEST_KEY: _digest(tree)})


def _key_name(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _layout(tree) -> dict:
  """{'a/b/0': shape}: list indices and the dict keys that a checkpoint's
  metadata gives them compare equal."""
  return {"/".join(map(_key_name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_layout(manager: ocp.CheckpointManager, step: int,
                  abstract: dict) -> None:
  """Raises if the checkpoint of `step` holds other arrays than `abstract`.

  Checked on the metadata, before any array is read: a restore that fails
  half-way leaves TensorStore reads pending.
  """
  have, want = _layout(manager.item_metadata(step)), _layout(abstract)
  if have == want:
    return
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  what = []
  if missing:
    what.append(f"{len(missing)} array(s) missing (e.g. {missing[0]})")
  if extra:
    what.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
  what += ([f"{len(shapes)} of another shape (e.g. {shapes[0]}:"
            f" {have[shapes[0]]} where the model has {want[shapes[0]]})"]
           if shapes else [])
  raise ValueError("it holds another model's arrays: " + ", ".join(what))


def _restore(manager: ocp.CheckpointManager, step: int, abstract: dict):
  """The checkpoint of `step`, checked; raises if it is damaged."""
  _check_layout(manager, step, abstract)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  # Checkpoints from before digests were written have none to compare.
  want = (manager.metadata(step).custom_metadata or {}).get(_DIGEST_KEY)
  if want is not None and _digest(restored) != want:
    raise ValueError("its arrays do not match the digest written with them")
  if int(restored["step"]) != step:
    raise ValueError(f"it holds step {int(restored['step'])}")
  return restored


def _agree(ok: bool) -> np.ndarray:
  """`ok` of every process."""
  if jax.process_count() == 1:
    return np.array([ok])
  from jax.experimental import multihost_utils as mh
  return np.asarray(mh.process_allgather(np.int32(ok))).reshape(-1) > 0


def _restore_newest(manager: ocp.CheckpointManager, abstract: dict,
                    workdir: str, lead: bool):
  """The newest checkpoint that restores, or None if there is none.

  A checkpoint that does not restore is moved out of the way, to
  ``corrupt_checkpoints/``, with a warning, once an older one restores:
  Orbax would not save a step below it, and its files may tell what
  happened.

  Raises:
    CheckpointError: if checkpoints exist and none of them restores.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  ckpt_dir = str(manager.directory)
  dest = os.path.join(workdir, "corrupt_checkpoints")
  errors = {}
  restored = None
  for i, step in enumerate(steps):
    try:
      restored, error = _restore(manager, step, abstract), None
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many.
      restored, error = None, e
    oks = _agree(error is None)
    if oks.all():
      break
    if oks.any():
      raise CheckpointError(
          f"the checkpoint of step {step} in {ckpt_dir} restores on some"
          f" processes but not on others ({list(map(bool, oks))}); do they"
          " all see the same file system?")
    restored = None
    errors[step] = f"{type(error).__name__}: {cli.one_line(error)[:300]}"
    if lead:
      following = (f"trying step {steps[i + 1]}" if i + 1 < len(steps)
                   else "no older checkpoint is left")
      print(f"warning: the checkpoint of step {step} in {ckpt_dir} cannot be"
            f" restored ({errors[step]}); {following}.", file=sys.stderr,
            flush=True)
  if restored is None and steps:
    # All of them failing is more likely a config that does not match than
    # damage: they stay where they are, and the user decides.
    raise CheckpointError(
        f"none of the checkpoints in {ckpt_dir} (steps"
        f" {', '.join(map(str, steps))}) can be restored; step {steps[0]}:"
        f" {errors[steps[0]]}. If they belong to a run with another config,"
        " give another --workdir; to start over, delete them.")
  if errors:
    _set_aside(ckpt_dir, sorted(errors), dest, lead)
    manager.reload()
    if lead:
      print(f"warning: moved the checkpoints of step(s)"
            f" {', '.join(map(str, sorted(errors)))} to {dest}; resuming from"
            f" step {int(restored['step'])}.", file=sys.stderr, flush=True)
  return restored


def _set_aside(ckpt_dir: str, steps: list[int], dest: str,
               lead: bool) -> None:
  if lead:
    os.makedirs(dest, exist_ok=True)
    for step in steps:
      target = os.path.join(dest, str(step))
      if os.path.exists(target):
        target += time.strftime("-%Y%m%d-%H%M%S")
      os.replace(os.path.join(ckpt_dir, str(step)), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils as mh
    mh.sync_global_devices("se_jax: corrupt checkpoints set aside")


# ------------------------------------------------------------ the loop


def _initial_state(config, tx, sharding: NamedSharding):
  """The model's graphs (train, eval) and its state at step 0, replicated.

  With several processes, process 0 initialises the model (exactly as a
  single process does) and sends the state to the others: run op by op,
  the initialisation compiles a few hundred small programs, and on CPUs
  the compilation cache serves them only to process 0.
  """
  lead = jax.process_index() == 0
  if lead:
    model = build_model(config, rngs=nnx.Rngs(config.seed))
  else:
    model = nnx.eval_shape(lambda: build_model(config,
                                               rngs=nnx.Rngs(config.seed)))
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  eval_graphdef = nnx.split(nnx.view(model, use_running_average=True),
                            nnx.Param, nnx.BatchStat)[0]
  if jax.process_count() == 1:
    state = init_state(params, batch_stats, tx, config.seed)
    return graphdef, eval_graphdef, jax.device_put(state, sharding)
  if lead:
    state = jax.tree.map(np.asarray, init_state(params, batch_stats, tx,
                                                config.seed))
  else:
    state = jax.tree.map(
        lambda x: np.zeros(x.shape, x.dtype),
        jax.eval_shape(lambda p, s: init_state(p, s, tx, config.seed),
                       params, batch_stats))
  return graphdef, eval_graphdef, jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x),
      _broadcast_exactly(state))


def _broadcast_exactly(tree):
  """Process 0's `tree` of numpy arrays, on every process, bit for bit."""
  from jax.experimental import multihost_utils as mh

  # Broadcast sums the processes' inputs, zeros but for process 0's; as
  # bytes, a -0.0 stays a -0.0.
  as_bytes = jax.tree.map(lambda x: np.ascontiguousarray(x).reshape(-1).view(
      np.uint8), tree)
  return jax.tree.map(
      lambda b, x: np.asarray(b).view(x.dtype).reshape(x.shape),
      mh.broadcast_one_to_all(as_bytes), tree)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains `config`'s model, evaluating every epoch; resumes if it can.

  Args:
    config: a locked ConfigDict, see experiments/configs/common.py.
    workdir: where everything the run produces is written.

  Returns:
    The final evaluation metrics (``loss``, ``top1_err``, ``top5_err`` in %)
    and the run's ``train_seconds`` (this invocation's time in the loop).

  Raises:
    cli.ConfigError: for a setting that is not allowed (a batch size that
      does not fit the data or the devices included), before anything is
      written.
    WorkdirError: if `workdir` is read-only or too full for the checkpoints.
    WorkdirLockedError: if another run holds `workdir`.
    CheckpointError: if checkpoints exist and none of them restores (a
      damaged newest one is set aside and an older one used).
    NonFiniteLossError: if the loss becomes NaN or infinite; the last good
      checkpoint is kept.
    data.DataUnavailableError: if the dataset cannot be found.
  """
  cli.validate_config(config)
  initialize_distributed(config)
  plan = _plan(config)
  _check_workdir(workdir)
  with _run_lock(workdir):
    return _run(config, workdir, plan)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What a run reads and how long it is, checked before it writes."""

  info: data.DatasetInfo
  train_src: Any
  eval_src: Any
  steps_per_epoch: int
  total_steps: int
  eval_every: int


def _plan(config) -> _Plan:
  """Finds the data and checks the batch sizes against it and the devices."""
  info = data.DATASETS[config.dataset]
  if config.image_size is not None:
    info = dataclasses.replace(info, image_size=config.image_size)
  train_src = data.get_source(config.dataset, info.train_split,
                              data_dir=config.data_dir)
  eval_src = data.get_source(config.dataset, info.eval_split,
                             data_dir=config.data_dir)
  n_train = data.num_examples(train_src, config.max_train_examples)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch < 1:
    raise cli.ConfigError(
        "batch_size", config.batch_size,
        f"at most the {n_train} training examples")
  for key in ("batch_size", "eval_batch_size"):
    if config[key] % jax.device_count():
      raise cli.ConfigError(
          key, config[key], f"a multiple of the {jax.device_count()} devices"
          + (f" of the {jax.process_count()} processes"
             if jax.process_count() > 1 else ""))
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(math.ceil(config.num_epochs * steps_per_epoch)))
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  return _Plan(info, train_src, eval_src, steps_per_epoch, total_steps,
               eval_every)


def _run(config, workdir, plan: _Plan):
  lead = jax.process_index() == 0
  info, train_src, eval_src = plan.info, plan.train_src, plan.eval_src
  steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
  eval_every = plan.eval_every
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))

  schedule = make_schedule(config, steps_per_epoch, total_steps)
  tx = make_optimizer(config, schedule)
  graphdef, eval_graphdef, state = _initial_state(config, tx, replicated)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      _to_checkpoint(state))

  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  every = config.get("keep_checkpoint_every_steps")
  snapshots = 0 if every is None else total_steps // every
  _check_free_space(
      workdir, sum(x.size * x.dtype.itemsize
                   for x in jax.tree.leaves(abstract)),
      config.keep_checkpoints + snapshots,
      sum(d.isdigit() for d in (os.listdir(ckpt_dir)
                                if os.path.isdir(ckpt_dir) else ())))
  # Saves go through a temporary directory renamed when complete; one left
  # by a process killed while saving is removed, never restored.
  manager = ocp.CheckpointManager(
      ckpt_dir, item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(
          preservation_policy=_preservation(config.keep_checkpoints, every),
          create=True, cleanup_tmp_directories=True))
  restored = _restore_newest(manager, abstract, workdir, lead)
  if restored is not None:
    state = _from_checkpoint(state, restored)
  if lead:
    files.write_atomic(os.path.join(workdir, "config.json"),
                       config.to_json_best_effort(indent=2) + "\n")
    # Each invocation (a resume too) records where it ran.
    with open(os.path.join(workdir, "provenance.jsonl"), "a") as f:
      f.write(json.dumps(provenance()) + "\n")
  start = int(state["step"])
  num_classes = info.num_classes
  smoothing = config.label_smoothing

  train_step = make_train_step(graphdef, tx, schedule,
                               num_classes=num_classes,
                               label_smoothing=smoothing)

  def eval_step(state, batch):
    m = nnx.merge(eval_graphdef, state["params"], state["batch_stats"])
    logits = m(batch["image"])
    mask = batch["mask"]
    loss = _cross_entropy(logits, batch["label"], num_classes, 0.0)
    return {
        "loss": jnp.sum(loss * mask),
        "top1_correct": jnp.sum(_top_k_correct(logits, batch["label"], 1)
                                * mask),
        "top5_correct": jnp.sum(_top_k_correct(logits, batch["label"], 5)
                                * mask),
        "count": jnp.sum(mask),
    }

  train_step = jax.jit(train_step, donate_argnums=0,
                       out_shardings=(replicated, replicated))
  eval_step = jax.jit(eval_step, out_shardings=replicated)

  train_tf, eval_tf = data.make_transforms(info, flip=config.augment_flip,
                                           pad=config.augment_pad)
  threads = data.input_threads(config.num_threads)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in batch.items()}

  def evaluate():
    totals = None
    for batch in data.eval_batches(
        eval_src, eval_tf, global_batch=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        max_examples=config.max_eval_examples,
        num_threads=threads):
      out = eval_step(state, to_global(batch))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    return {"loss": float(totals["loss"]) / n,
            "top1_err": 100.0 * (1.0 - float(totals["top1_correct"]) / n),
            "top5_err": 100.0 * (1.0 - float(totals["top5_correct"]) / n)}

  writer = _MetricWriter(workdir, start, lead)
  if lead and start > 0:
    print(f"Resuming from the checkpoint at step {start} of {total_steps}.",
          file=sys.stderr, flush=True)
  batches = data.train_batches(
      train_src, train_tf, global_batch=config.batch_size, seed=config.seed,
      start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(),
      max_examples=config.max_train_examples, num_threads=threads)

  pending: list[tuple[int, dict]] = []

  def flush():
    """Checks and logs the steps since the last flush."""
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not np.isfinite(m["loss"]) or not m["params_finite"]:
        last = manager.latest_step()
        what = (f"training loss is {m['loss']}" if not np.isfinite(m["loss"])
                else "the parameters became non-finite")
        raise NonFiniteLossError(
            f"{what} at step {s}; stopping. The last good checkpoint is"
            " kept: " + (f"step {last} in {ckpt_dir}." if last is not None
                         else "none was saved yet.")
        )
    s, m = pending[-1][0], dict(fetched[-1])
    del m["params_finite"]
    writer.write(s, "train", m)
    if bar is not None:
      bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.4g}")
    pending.clear()

  bar = None
  if lead and config.progress:
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start, unit="step",
               desc=f"{config.model} on {config.dataset}", dynamic_ncols=True,
               mininterval=1.0)
  t0 = time.perf_counter()
  eval_metrics = None
  try:
    for step in range(start, total_steps):
      state, metrics = train_step(state, to_global(next(batches)))
      pending.append((step + 1, metrics))
      done = step + 1
      if done % config.log_every_steps == 0:
        flush()
      if done % eval_every == 0 or done == total_steps:
        flush()
        eval_metrics = evaluate()
        eval_metrics["epoch"] = done / steps_per_epoch
        writer.write(done, "eval", eval_metrics)
        if lead:
          msg = (f"step {done}/{total_steps} (epoch"
                 f" {eval_metrics['epoch']:.2f}): eval loss"
                 f" {eval_metrics['loss']:.4f}, top-1 err"
                 f" {eval_metrics['top1_err']:.2f}%, top-5 err"
                 f" {eval_metrics['top5_err']:.2f}%")
          (bar.write if bar is not None else print)(msg)
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        flush()
        _save(manager, done, state)
      if bar is not None:
        bar.update(1)
    flush()
    manager.wait_until_finished()
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    manager.close()
  if eval_metrics is None:
    eval_metrics = evaluate()
  result = {**eval_metrics, "train_seconds": time.perf_counter() - t0,
            "steps": total_steps}
  if lead:
    files.write_json(os.path.join(workdir, "final.json"), result)
  return result


# Settings that change how a run executes, not what it computes: the batches
# are a function of (seed, step) whatever the input threads and processes,
# and where the data lives or whether a progress bar shows changes no number.
EXECUTION_KEYS = ("num_threads", "progress", "distributed", "data_dir",
                  "keep_checkpoint_every_steps",
                  "coordinator_address", "num_processes", "process_id",
                  "local_device_ids")


def recipe(config: ml_collections.ConfigDict | dict) -> dict:
  """What a run of `config` computes, as a dict.

  The config without its `EXECUTION_KEYS`, and without the model options
  left at None (the model's default), so that a model option added later
  does not make earlier runs look different.
  """
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  out = {k: v for k, v in config.items() if k not in EXECUTION_KEYS}
  out["model_options"] = {k: v for k, v in out["model_options"].items()
                          if v is not None}
  return out


def finished_result(config: ml_collections.ConfigDict,
                    workdir: str) -> dict[str, Any] | None:
  """The final metrics of a finished run of `config`'s recipe, if any.

  Lets a study reuse runs that completed earlier; a run with another recipe
  in the same workdir does not count (settings of `EXECUTION_KEYS` may
  differ).
  """
  try:
    with open(os.path.join(workdir, "final.json")) as f:
      final = json.load(f)
    with open(os.path.join(workdir, "config.json")) as f:
      same = recipe(json.load(f)) == recipe(config)
  except (OSError, ValueError):
    return None
  return final if same else None


def restore_model(config: ml_collections.ConfigDict, workdir: str,
                  step: int | None = None):
  """The model of a run, with the parameters of its latest checkpoint.

  Args:
    config: the run's config.
    workdir: the run's workdir.
    step: a checkpoint step; default the latest.

  Returns:
    ``(model, step)``, the model in eval mode.

  Raises:
    FileNotFoundError: if the workdir has no checkpoint.
  """
  model = build_model(config, rngs=nnx.Rngs(config.seed))
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt_dir}.")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  nnx.replace_by_pure_dict(params, restored["params"])
  nnx.replace_by_pure_dict(stats, restored["batch_stats"])
  model = nnx.merge(graphdef, params, stats)
  model.eval()
  return model, step
