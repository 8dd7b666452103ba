"""Multi-worker tests as real worker processes on 127.0.0.1 (TF_CONFIG).

A test module defines what each worker runs as a function of the strategy, marked with
`@multi_worker.worker(...)`, next to the test that asserts on it:

    @multi_worker.worker(algorithm="auto")
    def fit_in_worker(strategy):
      ...
      return {"weights": ...}          # JSON, handed back to the test

    def test_fit(self):
      first, second = multi_worker.run_workers(fit_in_worker)

Each worker process runs `python -m tests.harness.multi_worker MODULE:FUNCTION OUT`: it
builds `tf_fusion.multi_worker_strategy` with the function's options (TF_FUSION_*
variables apply), calls the function and writes its result, with the worker's "task",
to OUT. Worker functions with the same options that leave the cluster healthy can share
one pair of processes (TensorFlow's start-up and the cluster's are seconds each):
`run_workers((first_in_worker, second_in_worker))` runs them in turn.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import portpicker

from tf_fusion import launch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(algorithm="ring", timeout_seconds=60, **options):
  """Marks `fn(strategy) -> dict` as a worker body; the strategy reduces with
  FusionOptions.from_env(algorithm=..., timeout_seconds=..., **options)."""
  def mark(fn):
    fn.strategy_options = {"algorithm": algorithm, "timeout_seconds": timeout_seconds,
                           **options}
    return fn
  return mark


def _spec(fn):
  if not hasattr(fn, "strategy_options"):
    raise TypeError(f"{fn.__name__} is not marked with @multi_worker.worker(...).")
  return f"{fn.__module__}:{fn.__qualname__}"


def _resolve(spec):
  """The worker function of "module:name" (a test module imported by pytest as
  "test_x" is "tests.test_x" here)."""
  module, name = spec.split(":")
  if not module.startswith("tests."):
    module = "tests." + module
  return getattr(importlib.import_module(module), name)


def main(argv):
  """One worker: `python -m tests.harness.multi_worker MODULE:FUNCTION[,...] OUT`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tf_fusion  # pylint: disable=g-import-not-at-top
  fns = [_resolve(spec) for spec in argv[1].split(",")]
  strategy = tf_fusion.multi_worker_strategy(
      tf_fusion.FusionOptions.from_env(**fns[0].strategy_options))
  task = strategy.cluster_resolver.task_id
  results = []
  for fn in fns:
    results.append(dict(fn(strategy), task=task))
  with open(argv[2].replace("{task}", str(task)), "w") as f:
    json.dump(results[0] if len(fns) == 1 else {"results": results}, f)


def run_workers(fn, num_workers=2, local_devices=2, timeout=240, extra_env=None,
                may_die=(), may_hang=()):
  """Runs worker function `fn` in `num_workers` processes with `local_devices` logical
  CPUs each; waits (bounded) and returns each worker's JSON result. With a tuple of
  worker functions (the same options), runs them in turn in the same processes and
  returns, for each function, each worker's result.

  Workers in `may_die` may end by a signal; their result is None. Workers in `may_hang`
  are not waited for: killed once the others are done, their result is None.

  Raises:
    RuntimeError: naming the worker that failed or timed out, with its stderr tail.
  """
  fns = fn if isinstance(fn, tuple) else (fn,)
  spec = ",".join(_spec(f) for f in fns)
  if any(f.strategy_options != fns[0].strategy_options for f in fns):
    raise ValueError("worker functions sharing processes need the same options: "
                     + ", ".join(f"{f.__name__} {f.strategy_options}" for f in fns))
  ports = [portpicker.pick_unused_port() for _ in range(num_workers)]
  tmp = tempfile.mkdtemp(prefix="tf_fusion_mw_")
  procs = []
  for i in range(num_workers):
    env = dict(os.environ, TF_CONFIG=launch.tf_config(ports, i), CUDA_VISIBLE_DEVICES="",
               TF_FUSION_DEVICES_PER_WORKER=str(local_devices), PYTHONPATH=ROOT,
               **(extra_env or {}))
    log = open(os.path.join(tmp, f"worker{i}.log"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "tests.harness.multi_worker", spec,
         os.path.join(tmp, f"worker{i}.json")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  try:
    for i, (proc, _) in enumerate(procs):
      if i in may_hang:
        continue
      try:
        code = proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        raise RuntimeError(f"worker {i} did not finish in {timeout}s:\n"
                           + _tail(tmp, i)) from None
      if code < 0 and i in may_die:
        continue
      if code != 0:
        raise RuntimeError(f"worker {i} exited with {code}:\n" + _tail(tmp, i))
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
  out = []
  for i in range(num_workers):
    path = os.path.join(tmp, f"worker{i}.json")
    if (i in may_die or i in may_hang) and not os.path.exists(path):
      out.append(None)
      continue
    with open(path) as f:
      out.append(json.load(f))
  if isinstance(fn, tuple):
    return [[w["results"][i] for w in out] for i in range(len(fns))]
  return out


def _tail(tmp, i, lines=40):
  with open(os.path.join(tmp, f"worker{i}.log")) as f:
    return "".join(f.readlines()[-lines:])


def launch_job(fn, out_dir, workers=2, devices_per_worker=2, timeout=240,
               extra_env=None, launcher_args=()):
  """Worker function `fn` under `python -m tf_fusion.launch` (its restarts, its ports).

  Returns:
    (exit code, launcher output).
  """
  return launch_script(["-m", "tests.harness.multi_worker", _spec(fn),
                        os.path.join(out_dir, "worker{task}.json")],
                       workers, devices_per_worker, timeout, extra_env, launcher_args)


def launch_script(script, workers=2, devices_per_worker=2, timeout=240,
                  extra_env=None, launcher_args=()):
  """`python -m tf_fusion.launch --workers W --devices_per_worker D -- SCRIPT...`.

  Returns:
    (exit code, launcher output).
  """
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, **(extra_env or {}))
  cmd = [sys.executable, "-m", "tf_fusion.launch", "--workers", str(workers),
         "--devices_per_worker", str(devices_per_worker), "--grace_seconds", "5",
         *launcher_args, "--"] + list(script)
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def launched_stats(code, out, workers=2):
  """Each worker's final stats line (a JSON dict) from launch_script's (code, output);
  AssertionError with the output's tail unless the job succeeded and all printed one."""
  found = dict(re.findall(r"^\[worker (\d)\] (\{.*\})$", out, re.M))
  if code != 0 or len(found) != workers:
    raise AssertionError(f"exit {code}, {len(found)} stats lines:\n{out[-3000:]}")
  return [json.loads(found[k]) for k in sorted(found)]


def read_results(out_dir, workers=2):
  out = []
  for i in range(workers):
    with open(os.path.join(out_dir, f"worker{i}.json")) as f:
      out.append(json.load(f))
  return out


# One algorithm: "auto" would first calibrate its cost model across the processes (~20 s
# here); test_multi_worker's kill-and-resume keeps that path.
RECIPE = ["-m", "official_recipes.imagenet.main", "--strategy=multi_worker", "--synthetic",
          "--model=alexnet_bn", "--image_size=64", "--num_classes=6", "--batch_size=8",
          "--num_train_examples=32", "--num_eval_examples=8", "--warmup_epochs=0",
          "--seed=1", "--log_steps=1", "--stall_seconds=0", "--all_reduce_alg=ring"]


def start_recipe(envs, model_dir, flags=(), logs_dir=None):
  """The recipe (RECIPE + flags) in one process per (env, extra flags) of `envs`, with
  no launcher: the env is all each gets. Returns [(Popen, log path)]."""
  logs_dir = logs_dir or tempfile.mkdtemp(prefix="tf_fusion_recipe_")
  out = []
  for i, (env, extra) in enumerate(envs):
    path = os.path.join(logs_dir, f"process{i}.log")
    with open(path, "w") as log:
      out.append((subprocess.Popen(
          [sys.executable] + RECIPE + [f"--model_dir={model_dir}"] + list(flags) + extra,
          cwd=ROOT, env=dict(env, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2"),
          stdout=log, stderr=subprocess.STDOUT), path))
  return out


def finish_recipe(started, timeout=300, codes=(0,)):
  """Waits for start_recipe's processes; returns each one's final stats line (dict).

  Raises:
    AssertionError: a process ended with a code not in `codes`, with its log's tail.
  """
  try:
    for proc, _ in started:
      proc.wait(timeout=timeout)
  finally:
    for proc, _ in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  stats = []
  for proc, path in started:
    with open(path) as f:
      out = f.read()
    if proc.returncode not in codes:
      raise AssertionError(f"exit {proc.returncode}:\n{out[-3000:]}")
    stats.append(json.loads(re.findall(r"^(\{.*\})$", out, re.M)[-1]))
  return stats


def run_recipe(envs, model_dir, flags=(), timeout=300):
  """start_recipe, then finish_recipe."""
  return finish_recipe(start_recipe(envs, model_dir, flags), timeout)


if __name__ == "__main__":
  main(sys.argv)
