"""Bad input at the command line: one line, exit status 2, nothing written.

Most inputs go through the training command's own entry point in this
process (`cli.main_guard(train.main)`, the exact code ``python -m
experiments.train`` runs); a few run the real command, to show the exit
status, that nothing else is printed, and ``--debug``.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from experiments import cli, data, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = "experiments/configs/fashion_mnist_se_resnet20.py"
PREFIX = "experiments.train: error: "
# ml_collections loads config files with importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings(
    "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_DIR),
    reason="Debian's dataset-fashion-mnist is not installed;"
           " experiments/setup.sh installs it")

# (arguments after --config and --workdir, environment, what the line says)
BAD_INPUTS = [
    (["--config.no_such_key=1"], {},
     "--config.no_such_key: the config has no key 'no_such_key'"),
    (["--config.learning_rat=0.1"], {},
     "the config has no key 'learning_rat'; did you mean 'learning_rate'?"),
    (["--config.model_options.reductio=4"], {},
     "--config.model_options.reductio: the config has no key 'reductio'"),
    (["--config.batch_size=0"], {},
     "batch_size=0 is not allowed: an integer >= 1."),
    (["--config.batch_size=-8"], {}, "batch_size=-8 is not allowed"),
    (["--config.batch_size=abc"], {},
     "flag --config.batch_size=abc: invalid literal for int()"),
    (["--config.eval_batch_size=0"], {}, "eval_batch_size=0 is not allowed"),
    (["--config.learning_rate=-0.1"], {},
     "learning_rate=-0.1 is not allowed: a finite number > 0."),
    (["--config.learning_rate=nan"], {}, "learning_rate=nan is not allowed"),
    (["--config.num_train_steps=-1", "--config.num_epochs=0"], {},
     "num_epochs=0.0 is not allowed: a finite number > 0."),
    (["--config.num_train_steps=0"], {},
     "num_train_steps=0 is not allowed: an integer >= 1, or -1 to train for"
     " num_epochs."),
    (["--config.momentum=1.5"], {},
     "momentum=1.5 is not allowed: a finite number >= 0 and < 1."),
    (["--config.weight_decay=-1"], {}, "weight_decay=-1.0 is not allowed"),
    (["--config.label_smoothing=1"], {}, "label_smoothing=1.0 is not allowed"),
    (["--config.schedule=linear"], {},
     "schedule='linear' is not allowed: one of 'step', 'step_every',"
     " 'cosine', 'constant'."),
    (["--config.decay_fractions=(0.75,0.5)", "--config.schedule=step"], {},
     "decay_fractions=(0.75, 0.5) is not allowed: increasing fractions"),
    (["--config.checkpoint_every_steps=0"], {},
     "checkpoint_every_steps=0 is not allowed"),
    (["--config.keep_checkpoints=0"], {}, "keep_checkpoints=0 is not allowed"),
    (["--config.keep_checkpoint_every_steps=0"], {},
     "keep_checkpoint_every_steps=0 is not allowed"),
    (["--config.compute_dtype=fp16"], {},
     "compute_dtype='fp16' is not allowed: one of 'float32', 'bfloat16'."),
    (["--config.dataset=imagenet"], {},
     "dataset='imagenet' is not allowed: one of 'cifar10', 'cifar100',"
     " 'fashion_mnist', 'imagenet2012'."),
    (["--config.data_dir=/no/such/dir"], {},
     "data_dir='/no/such/dir' is not allowed: an existing directory"),
    (["--config.model=no_such_model"], {},
     "model='no_such_model' is not allowed: unknown model 'no_such_model'"),
    (["--config.model_options.reduction=0"], {},
     "model_options.reduction=0.0 is not allowed: reduction must be"),
    (["--config.model_options.gate=bogus"], {},
     "model_options.gate='bogus' is not allowed: gate must be one of"),
    (["--config.model_options.widths=(8,16)"], {},
     "model_options.widths=(8, 16) is not allowed"),
    (["--config.distributed=maybe"], {},
     "distributed='maybe' is not allowed: one of 'auto', 'on', 'off'."),
    (["--config.num_processes=0"], {}, "num_processes=0 is not allowed"),
    (["--config.num_processes=2", "--config.process_id=2"], {},
     "process_id=2 is not allowed: an integer from 0 to num_processes - 1"),
    (["--config.coordinator_address=nohost"], {},
     "coordinator_address='nohost' is not allowed: HOST:PORT"),
    ([], {"JAX_NUM_PROCESSES": "two"},
     "$JAX_NUM_PROCESSES='two' is not allowed: an integer >= 1."),
    ([], {"JAX_NUM_PROCESSES": "2"},
     "coordinator_address=None is not allowed: a run of several processes"
     " needs coordinator_address, num_processes and process_id"),
    (["extra"], {}, "unexpected arguments ['extra']"),
    (["--no_such_flag=1"], {}, "Unknown command line flag 'no_such_flag'"),
]


def _guarded(argv):
  return cli.main_guard(train.main, prog="experiments.train")(argv)


def _one_line(capsys):
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(PREFIX), err
  return err[0][len(PREFIX):]


@pytest.mark.parametrize("args,env,message", BAD_INPUTS,
                         ids=[" ".join(a) or next(iter(e))
                              for a, e, _ in BAD_INPUTS])
def test_a_bad_setting_is_one_line_and_status_2(args, env, message, tmp_path,
                                                capsys, monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv(cli.DEBUG_ENV, "")
  for var, value in env.items():
    monkeypatch.setenv(var, value)
  wd = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    _guarded([f"--config={FMNIST}:smoke", f"--workdir={wd}", *args])
  assert e.value.code == 2
  assert message in _one_line(capsys)
  assert not wd.exists()


@pytest.mark.parametrize("argv,message", [
    ([f"--config={FMNIST}:smoke"], "--workdir is required"),
    (["--workdir=x"], "--config is required"),
    (["--config=experiments/configs/no_such_file.py", "--workdir=x"],
     "--config=experiments/configs/no_such_file.py: cannot load the config:"
     " [Errno 2] No such file or directory"),
    ([f"--config={FMNIST}:bogus", "--workdir=x"],
     f"--config={FMNIST}:bogus: cannot load the config: ValueError: this"
     " config has no variants, got 'bogus'."),
], ids=["no workdir", "no config", "no config file", "bad variant"])
def test_a_bad_command_line_is_one_line_and_status_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    _guarded(argv)
  assert e.value.code == 2
  assert message in _one_line(capsys)


@needs_fmnist
def test_a_batch_larger_than_the_data_is_refused_before_writing(tmp_path,
                                                                 capsys):
  wd = tmp_path / "run"
  with pytest.raises(SystemExit) as e:
    _guarded([f"--config={FMNIST}:smoke", f"--workdir={wd}",
              "--config.batch_size=128"])
  assert e.value.code == 2
  assert _one_line(capsys) == ("batch_size=128 is not allowed: at most the"
                               " 64 training examples.")
  assert not wd.exists()


# ------------------------------------------------------------ real commands


def _train(args, env=None, **kw):
  return subprocess.run(
      [sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
      capture_output=True, text=True,
      env={**os.environ, "SE_JAX_DEBUG": "", **(env or {})}, **kw)


def test_the_command_prints_only_the_line(tmp_path):
  wd = tmp_path / "run"
  r = _train([f"--config={FMNIST}:smoke", f"--workdir={wd}",
              "--config.no_such_key=1"])
  assert r.returncode == 2
  assert r.stdout == ""
  assert r.stderr.splitlines() == [
      PREFIX + "--config.no_such_key: the config has no key 'no_such_key';"
      " see experiments/configs/common.py for the keys."]
  assert not wd.exists()


@needs_fmnist
def test_the_devices_must_divide_the_batch(tmp_path):
  r = _train([f"--config={FMNIST}:smoke", f"--workdir={tmp_path / 'run'}",
              "--config.batch_size=6"],
             env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert r.returncode == 2
  assert r.stderr.splitlines()[-1] == (
      PREFIX + "batch_size=6 is not allowed: a multiple of the 4 devices.")
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
  for args, env in ((["--debug"], {}), ([], {"SE_JAX_DEBUG": "1"})):
    r = _train([f"--config={FMNIST}:smoke", f"--workdir={tmp_path}",
                "--config.batch_size=0", *args], env=env)
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.splitlines()[-1] == (
        PREFIX + "batch_size=0 is not allowed: an integer >= 1.")


def _writable(directory):
  try:
    fd, path = tempfile.mkstemp(dir=directory)
  except OSError:
    return False
  os.close(fd)
  os.remove(path)
  return True


@needs_fmnist
def test_a_read_only_workdir_fails_at_start():
  top = tempfile.mkdtemp()
  try:
    wd = os.path.join(top, "run")
    os.mkdir(wd, 0o555)
    if _writable(wd):
      # Permissions do not bind root; sysfs is read-only to everyone.
      wd = "/sys"
    if _writable(wd):
      pytest.skip("no directory here is read-only to this user")
    r = _train([f"--config={FMNIST}:smoke", f"--workdir={wd}"])
  finally:
    shutil.rmtree(top)
  assert r.returncode == 2, r.stderr[-3000:]
  line = r.stderr.splitlines()[-1]
  assert line.startswith(f"{PREFIX}workdir {wd} is not writable (")
  assert line.endswith("); give a --workdir on a writable file system.")
  assert "Traceback" not in r.stderr


# ------------------------------------------------------------ the guard


def _entry_point(argv):
  p = argparse.ArgumentParser(prog="tool")
  p.add_argument("--n", type=int, required=True)
  args = p.parse_args(argv)
  if args.n < 0:
    raise cli.ConfigError("--n", args.n, "an integer >= 0")
  if args.n == 7:
    raise KeyError("a bug")
  return {"n": args.n}


def test_the_guard_of_any_entry_point(capsys, monkeypatch):
  # Set, so that the test's end restores it (--debug below sets it to 1).
  monkeypatch.setenv(cli.DEBUG_ENV, "")
  guarded = cli.main_guard(_entry_point, prog="tool")
  assert guarded(["--n", "3"]) == {"n": 3}
  for argv, line in (
      (["--n", "x"], "tool: error: argument --n: invalid int value: 'x'"),
      ([], "tool: error: the following arguments are required: --n"),
      (["--n", "-1"],
       "tool: error: --n=-1 is not allowed: an integer >= 0.")):
    with pytest.raises(SystemExit) as e:
      guarded(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]
  # A bug keeps its traceback.
  with pytest.raises(KeyError):
    guarded(["--n", "7"])
  # --debug prints it, then the line, and passes itself on to processes
  # started from here.
  with pytest.raises(SystemExit):
    guarded(["--n", "-1", "--debug"])
  err = capsys.readouterr().err
  assert "Traceback" in err and err.splitlines()[-1].startswith("tool: error")
  assert os.environ[cli.DEBUG_ENV] == "1"


# ------------------------------------------------- the other entry points


def _entry(module):
  import importlib
  return importlib.import_module(f"experiments.{module}")


OTHER_BAD_INPUTS = [
    ("recalibration", ["--epochs", "0"],
     "argument --epochs: 0 is not allowed: a finite number > 0"),
    ("recalibration", ["--batch-size", "0"],
     "argument --batch-size: 0 is not allowed: an integer >= 1"),
    ("recalibration", ["--lr", "nan"],
     "argument --lr: nan is not allowed: a finite number > 0"),
    ("recalibration", ["--model", "cifar_resnet20"],
     "--model must be a model with attention, got 'cifar_resnet20'"),
    ("recalibration", ["--dataset", "cifar11"],
     "argument --dataset: invalid choice: 'cifar11'"),
    ("recalibration", ["--seeds", "a,b"],
     "seeds must be comma-separated integers, got 'a,b'"),
    ("recalibration", ["--fig7-classes", "1"],
     "--fig7-classes takes two classes, got '1'"),
    ("ablations", ["--groups", "reduction,colour"],
     "unknown group(s) ['colour']"),
    ("ablations", ["--train-examples", "-5"],
     "argument --train-examples: -5 is not allowed: an integer >= 1"),
    ("ablations", ["--epochs", "inf"],
     "argument --epochs: inf is not allowed: a finite number > 0"),
    ("ablations", ["--model", "no_such_net"], "no_such_net"),
    ("convert_timm", ["--model", "vit_base_patch16_224", "--pretrained",
                      "--out", "{tmp}/vit"], "is not supported"),
    ("convert_timm", ["--model", "resnet18", "--checkpoint",
                      "{tmp}/missing.pth", "--out", "{tmp}/out"],
     "--checkpoint {tmp}/missing.pth: no such file."),
    ("convert_timm", ["--model", "resnet18", "--out", "{tmp}/out"],
     "one of the arguments --checkpoint --pretrained is required"),
    ("benchmark", ["--sections", "inference,speed"],
     "unknown section(s) ['speed']"),
    ("benchmark", ["--repeats", "0"],
     "argument --repeats: 0 is not allowed: an integer >= 1"),
    ("benchmark", ["--dtype", "float16"],
     "argument --dtype: invalid choice: 'float16'"),
    ("cost_table", ["--out"], "argument --out: expected one argument"),
    ("converged", ["--seeds", ""], "no seed in ''"),
    ("converged", ["--models", "cifar_resnet20"],
     "--models needs a baseline and at least one other network"),
    ("converged", ["--models", "cifar_resnet20,cifar_se_resnet21"],
     "unknown model(s) ['cifar_se_resnet21']"),
    ("accelerator_run", ["--out", "{tmp}", "--minutes", "-1"],
     "argument --minutes: -1 is not allowed: a finite number > 0"),
]


@pytest.mark.parametrize(
    "module,argv,message", OTHER_BAD_INPUTS,
    ids=[f"{m} {' '.join(a)}" for m, a, _ in OTHER_BAD_INPUTS])
def test_every_entry_point_answers_bad_input_in_one_line(
    module, argv, message, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv(cli.DEBUG_ENV, "")
  monkeypatch.chdir(tmp_path)  # Nothing may be written; if it were, here.
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  prog = f"experiments.{module}"
  with pytest.raises(SystemExit) as e:
    cli.main_guard(_entry(module).main, prog=prog)(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1, err
  assert err[0].startswith(f"{prog}: error: "), err
  assert message.replace("{tmp}", str(tmp_path)) in err[0], err
  assert sorted(os.listdir(tmp_path)) == [], "something was written"


def test_the_entry_points_run_under_the_guard():
  for module in ("train", "launch", "recalibration", "ablations",
                 "convert_timm", "benchmark", "cost_table", "converged",
                 "accelerator_run"):
    path = os.path.join(ROOT, "experiments", f"{module}.py")
    with open(path) as f:
      tail = f.read().split('if __name__ == "__main__":')[-1]
    assert "cli.main_guard(main" in tail, module


def test_an_entry_point_answers_in_one_line_from_the_shell():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.benchmark", "--repeats", "x"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.splitlines() == [
      "experiments.benchmark: error: argument --repeats: 'x' is not an"
      " integer"]
