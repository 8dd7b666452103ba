"""Runs tests/multi_worker_job.py as real worker processes on 127.0.0.1 (TF_CONFIG)."""

import json
import os
import subprocess
import sys
import tempfile

import portpicker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tf_config(ports, index):
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


def run_workers(mode, num_workers=2, local_devices=2, timeout=240, extra_env=None):
  """Starts the workers, waits (bounded), returns each worker's JSON result.

  Raises:
    RuntimeError: naming the worker that failed or timed out, with its stderr tail.
  """
  ports = [portpicker.pick_unused_port() for _ in range(num_workers)]
  tmp = tempfile.mkdtemp(prefix="tf_fusion_mw_")
  procs = []
  for i in range(num_workers):
    env = dict(os.environ, TF_CONFIG=tf_config(ports, i), CUDA_VISIBLE_DEVICES="",
               TF_FUSION_TEST_LOCAL_DEVICES=str(local_devices), PYTHONPATH=ROOT,
               **(extra_env or {}))
    log = open(os.path.join(tmp, f"worker{i}.log"), "w")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "tests.multi_worker_job", mode,
         os.path.join(tmp, f"worker{i}.json")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
  try:
    for i, (proc, _) in enumerate(procs):
      try:
        code = proc.wait(timeout=timeout)
      except subprocess.TimeoutExpired:
        raise RuntimeError(f"worker {i} did not finish in {timeout}s:\n"
                           + _tail(tmp, i)) from None
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
    with open(os.path.join(tmp, f"worker{i}.json")) as f:
      out.append(json.load(f))
  return out


def _tail(tmp, i, lines=40):
  with open(os.path.join(tmp, f"worker{i}.log")) as f:
    return "".join(f.readlines()[-lines:])
