"""Runs a multi-worker job on this machine: `python -m tf_fusion.launch --workers N -- SCRIPT ARGS`.

Starts N copies of SCRIPT, each with its own TF_CONFIG on 127.0.0.1 (free ports picked
here), prefixes every output line with the worker's rank, forwards Ctrl-C (SIGINT) and
SIGTERM to the workers, and fails fast: when a worker exits non-zero the others are
stopped and the launcher exits non-zero, naming the worker and how it ended.

With --max_restarts K, a failed job is started again (all workers, fresh ports) up to K
times; SCRIPT resumes from its checkpoints. On a cluster, Slurm (srun) or Kubernetes
(TFJob) start the workers instead: see docs/multi_worker.md. SCRIPT builds its strategy
with `tf_fusion.multi_worker_strategy(...)`.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tf_fusion.options import DEVICES_PER_WORKER_ENV


def free_ports(n):
  """n distinct free TCP ports on 127.0.0.1 (held open together so none repeats)."""
  socks = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def tf_config(ports, index):
  """The TF_CONFIG of worker `index` of a cluster on 127.0.0.1 `ports`."""
  return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                     "task": {"type": "worker", "index": index}})


def _pump(stream, prefix, out, lock):
  for line in iter(stream.readline, b""):
    with lock:
      out.write(prefix + line.decode(errors="replace"))
      out.flush()
  stream.close()


def _describe_exit(code):
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with code {code}"


RESTART_ENV = "TF_FUSION_RESTART"   # which start this is: 0, then 1, 2, ... after restarts


def launch(command, workers, devices_per_worker=None, grace_seconds=10.0, out=None,
           env=None, max_restarts=0):
  """Runs `command` as `workers` processes; returns 0 or the last failure's code (> 0).

  When a worker fails, the others are stopped; with `max_restarts` K > 0, all of them
  are then started again on fresh ports, up to K times (each logged), so that a job
  whose script resumes from its checkpoints (keras.callbacks.BackupAndRestore) survives
  a lost worker. A signal to the launcher (Ctrl-C, SIGTERM) is forwarded and never
  restarts.

  Args:
    command: argv of one worker, e.g. [sys.executable, "train.py", "--epochs", "3"].
    workers: number of processes.
    devices_per_worker: sets TF_FUSION_DEVICES_PER_WORKER for the workers.
    grace_seconds: after a failure or a signal, how long the others get to stop
      before SIGKILL.
    out: where the prefixed output goes (sys.stdout).
    env: base environment (os.environ).
    max_restarts: how many times to restart all workers after a failure.
  """
  out = out or sys.stdout
  lock = threading.Lock()
  for attempt in range(max_restarts + 1):
    code, signalled = _launch_once(command, workers, devices_per_worker, grace_seconds,
                                   out, env, lock, attempt)
    if code == 0 or signalled or attempt == max_restarts:
      return code
    _say(out, lock, f"restart {attempt + 1} of {max_restarts}: starting all {workers} "
         "workers again on fresh ports")
  return code


def _launch_once(command, workers, devices_per_worker, grace_seconds, out, env, lock,
                 attempt):
  """One start of all workers; (exit code, whether a signal to the launcher ended it)."""
  ports = free_ports(workers)
  procs, pumps = [], []
  for i in range(workers):
    worker_env = dict(env if env is not None else os.environ, TF_CONFIG=tf_config(ports, i),
                      **{RESTART_ENV: str(attempt)})
    if devices_per_worker:
      worker_env[DEVICES_PER_WORKER_ENV] = str(devices_per_worker)
    proc = subprocess.Popen(command, env=worker_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f"[worker {i}] ", out, lock),
                            daemon=True)
    pump.start()
    pumps.append(pump)
  _say(out, lock, f"started {workers} workers on 127.0.0.1 ports "
       f"{', '.join(map(str, ports))} (pids {', '.join(str(p.pid) for p in procs)})")

  stopping = {"signal": None}

  def forward(signum, frame):
    del frame
    stopping["signal"] = signum
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  failure = None
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        code = p.poll()
        if code not in (None, 0) and failure is None:
          failure = (i, code)
          if stopping["signal"] is None:   # else: the others are handling the signal
            _say(out, lock, f"worker {i} {_describe_exit(code)}; stopping the others")
            _stop(procs, grace_seconds)
      if stopping["signal"] is not None:
        # The workers have the signal itself: let them handle it (a Ctrl-C handler that
        # saves) before anything harder. A SIGTERM sent at once would end a busy worker
        # before Python ran its handler.
        _stop(procs, grace_seconds, signalled=True)
      time.sleep(0.1)
  finally:
    for s, handler in old.items():
      signal.signal(s, handler)
  for pump in pumps:
    pump.join(timeout=5)
  if failure is None:
    failure = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode), None)
    if failure is not None:
      _say(out, lock, f"worker {failure[0]} {_describe_exit(failure[1])}")
  signalled = stopping["signal"] is not None
  if failure is not None:
    return (failure[1] if failure[1] > 0 else 128 - failure[1]), signalled
  if signalled:
    return 128 + stopping["signal"], True
  _say(out, lock, f"all {workers} workers finished")
  return 0, False


def _stop(procs, grace_seconds, signalled=False):
  """Ends the workers still running: SIGTERM (unless they were just sent a signal),
  then `grace_seconds` to exit, then SIGKILL."""
  if not signalled:
    for p in procs:
      if p.poll() is None:
        p.terminate()
  deadline = time.monotonic() + grace_seconds
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def _say(out, lock, text):
  with lock:
    out.write(f"[launch] {text}\n")
    out.flush()


def main(argv=None):
  """The launcher's command line (see the module doc); returns the exit code."""
  argv = sys.argv[1:] if argv is None else argv
  if "--" not in argv:
    print("usage: python -m tf_fusion.launch --workers N [--devices_per_worker K] "
          "-- SCRIPT [ARGS...]", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog="python -m tf_fusion.launch",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workers", type=int, required=True)
  parser.add_argument("--devices_per_worker", type=int, default=None,
                      help="logical CPU devices per worker on hosts without GPUs")
  parser.add_argument("--grace_seconds", type=float, default=10.0)
  parser.add_argument("--max_restarts", type=int, default=0,
                      help="after a worker fails, stop the others and start all again, "
                      "up to this many times (the script resumes from its checkpoints)")
  args = parser.parse_args(argv[:split])
  script = argv[split + 1:]
  if args.workers < 1:
    parser.error(f"--workers must be >= 1, got {args.workers}")
  if args.devices_per_worker is not None and args.devices_per_worker < 1:
    parser.error(f"--devices_per_worker must be >= 1, got {args.devices_per_worker}")
  if args.max_restarts < 0:
    parser.error(f"--max_restarts must be >= 0, got {args.max_restarts}")
  if not script:
    parser.error("nothing to run after --")
  # A Python script or module runs under this interpreter; anything else as given.
  python = script[0] == "-m" or script[0].endswith(".py")
  command = [sys.executable] + script if python else script
  return launch(command, args.workers, args.devices_per_worker, args.grace_seconds,
                max_restarts=args.max_restarts)


if __name__ == "__main__":
  sys.exit(main())
