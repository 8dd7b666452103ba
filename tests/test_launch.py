"""tf_fusion.launch with small Python workers (no TensorFlow in them: fast)."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import tensorflow as tf

from tf_fusion import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code):
  return [sys.executable, "-c", code]


class LaunchTest(tf.test.TestCase):

  def test_tf_config_ranks_and_prefixed_output(self):
    out = io.StringIO()
    code = launch.launch(_python(
        "import os; print(os.environ['TF_CONFIG']); "
        "print('devices', os.environ.get('TF_FUSION_DEVICES_PER_WORKER'))"),
        workers=3, devices_per_worker=2, out=out)
    self.assertEqual(code, 0)
    lines = out.getvalue().splitlines()
    configs = {}
    for i in range(3):
      mine = [l[len(f"[worker {i}] "):] for l in lines if l.startswith(f"[worker {i}] ")]
      self.assertIn("devices 2", mine)
      configs[i] = json.loads(mine[0])
    hosts = configs[0]["cluster"]["worker"]
    self.assertLen(set(hosts), 3)
    for i, c in configs.items():
      self.assertEqual(c["task"], {"type": "worker", "index": i})
      self.assertEqual(c["cluster"]["worker"], hosts)
      self.assertTrue(all(h.startswith("127.0.0.1:") for h in hosts))
    self.assertIn("[launch] all 3 workers finished", lines)

  def test_one_worker_fails_fast_and_the_others_are_stopped(self):
    out = io.StringIO()
    start = time.monotonic()
    code = launch.launch(_python(
        "import json, os, sys, time\n"
        "if json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1: sys.exit(3)\n"
        "time.sleep(120)"), workers=2, grace_seconds=5, out=out)
    self.assertEqual(code, 3)
    self.assertLess(time.monotonic() - start, 60)      # not the 120 s of worker 0
    self.assertIn("[launch] worker 1 exited with code 3; stopping the others",
                  out.getvalue())

  def test_max_restarts_starts_all_workers_again_on_fresh_ports(self):
    # Worker 1 fails in the first start only; every start gets new ports.
    out = io.StringIO()
    code = launch.launch(_python(
        "import json, os, sys, time\n"
        "c = json.loads(os.environ['TF_CONFIG'])\n"
        "print('start', os.environ['TF_FUSION_RESTART'], c['cluster']['worker'][0])\n"
        "if c['task']['index'] == 1 and os.environ['TF_FUSION_RESTART'] == '0': sys.exit(3)\n"
        "time.sleep(0.5)"), workers=2, grace_seconds=5, out=out, max_restarts=2)
    self.assertEqual(code, 0)
    text = out.getvalue()
    self.assertIn("[launch] worker 1 exited with code 3; stopping the others", text)
    self.assertEqual(text.count("[launch] restart "), 1)
    self.assertIn("[launch] restart 1 of 2: starting all 2 workers again", text)
    starts = [l.split()[-2:] for l in text.splitlines() if l.startswith("[worker 0] start")]
    self.assertEqual([s[0] for s in starts], ["0", "1"])
    self.assertNotEqual(starts[0][1], starts[1][1])      # fresh ports

  def test_max_restarts_gives_up_with_the_last_code(self):
    out = io.StringIO()
    code = launch.launch(_python("import sys; sys.exit(5)"), workers=2, grace_seconds=5,
                         out=out, max_restarts=2)
    self.assertEqual(code, 5)
    self.assertEqual(out.getvalue().count("[launch] restart "), 2)

  def test_ctrl_c_is_forwarded(self):
    tmp = self.create_tempdir().full_path
    script = os.path.join(tmp, "worker.py")
    with open(script, "w") as f:
      f.write("import json, os, signal, sys, time\n"
              "i = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"
              "def on_int(*_):\n"
              "  time.sleep(2 if i == 0 else 0)\n"   # worker 1 is done long before
              f"  open(os.path.join({tmp!r}, f'interrupted{{i}}'), 'w').close()\n"
              "  sys.exit(1)\n"
              "signal.signal(signal.SIGINT, on_int)\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-m", "tf_fusion.launch", "--workers", "2",
                             "--", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    ready = 0
    for line in proc.stdout:
      ready += line.endswith("] ready\n")
      if ready == 2:
        break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    self.assertNotEqual(proc.returncode, 0)
    for i in range(2):
      self.assertTrue(os.path.exists(os.path.join(tmp, f"interrupted{i}")), msg=i)

  def test_usage_errors(self):
    self.assertEqual(launch.main(["--workers", "2"]), 2)   # no "--"
    with self.assertRaises(SystemExit):
      launch.main(["--workers", "0", "--", "x.py"])


if __name__ == "__main__":
  tf.test.main()
