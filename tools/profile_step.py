"""Profiles a few training steps and says, per step, how long compute and communication
took and how much of the communication was hidden behind compute.

  python -m tools.profile_step                        # ResNet-50, synthetic, 4 CPUs
  python -m tools.profile_step --logdir out/main_job/<run>   # an existing profile
  python -m tools.profile_step -- --model=alexnet_bn --image_size=64   # recipe flags

Runs the ImageNet recipe (official_recipes.imagenet.main) with --profile_steps, which
writes a TensorBoard profile (open it in TensorBoard's Profile tab: every pack's
operations sit under the name scope `tf_fusion_pack_NNN_<algorithm>_<bytes>B`, so each
pack is a named span in the trace viewer). Then it reads the trace (the .xplane.pb
protobuf TensorBoard reads) and prints:
- per step: step time, compute time, communication time (the union of the pack ops'
  spans), the overlap fraction (communication time during which compute ran too) and
  the backward-pass time (ops under Keras's `gradient_tape/` scope);
- per step, for tf_fusion's packs: the time packs are in flight (the union of each
  pack's span from its first op on its data to its last, which runs once the reduced
  buffer is back: the receiving side closes the span), how much of it compute
  overlapped, and the rest, exposed;
- per pack: its ops' busy time and when it started in the step;
- the --backward_seconds to give the autotuner (FusionOptions.backward_seconds).

Times are wall-clock unions of op spans over all TensorFlow threads. Asynchronous ops
(collectives, cross-device sends) are spans of their launch only, so "comm" of a
collective is a lower bound; "in flight" bounds it from above: it also holds the wait
for the slowest replica's gradients, for the collective cannot finish before they join.
"""

import argparse
import glob
import json
import os
import re
import statistics
import sys
import tempfile


PACK = re.compile(r"(tf_fusion_pack_\d+_[a-z_]+_(?:\d+B|unknown))/")
# TensorFlow's own reduction (the recipe's --cross_device_ops=tf): its collectives and
# the copies between devices; the sums of a reduce-to-one-device are not told apart.
TF_COMMUNICATION = re.compile(
    r":(Collective(?:ReduceV2|GatherV2|BcastSendV2|BcastRecvV2|Reduce|Gather)|"
    r"NcclAllReduce|_Send|_Recv|_HostSend|_HostRecv)$")
STEP = re.compile(r"(?:multi|one)_step_on_iterator$")
# A collective's instance key is computed when the step starts, not when its data is
# ready: not part of a pack's time in flight.
# TF numbers a scope used twice in one scope: instance_key, instance_key_1, ...
INSTANCE_KEY = re.compile(r"/instance_key(?:_\d+)?/")


def union(spans):
  """Merged, sorted (start, end) intervals."""
  out = []
  for start, end in sorted(spans):
    if out and start <= out[-1][1]:
      out[-1][1] = max(out[-1][1], end)
    else:
      out.append([start, end])
  return [tuple(s) for s in out]


def length(spans):
  return sum(end - start for start, end in spans)


def intersect(a, b):
  """Intersection of two merged interval lists."""
  out, i, j = [], 0, 0
  while i < len(a) and j < len(b):
    start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
    if start < end:
      out.append((start, end))
    if a[i][1] < b[j][1]:
      i += 1
    else:
      j += 1
  return out


def clip(spans, window):
  return [(max(s, window[0]), min(e, window[1])) for s, e in spans
          if e > window[0] and s < window[1]]


def analyze(ops, steps, pattern=PACK):
  """Per-step summary from op spans.

  Args:
    ops: (op name, start s, end s) of TensorFlow ops, from every thread.
    steps: (start s, end s) of each training step.
    pattern: what marks a communication op (group 1 names its pack): tf_fusion's pack
      scopes, or TF_COMMUNICATION for TensorFlow's own reduction.

  Returns:
    A list of dicts per step: seconds of step, compute, communication, overlap,
    backward; overlap_fraction; packs {name: {busy, start}}; with tf_fusion's packs
    (pattern PACK) also in_flight, in_flight_overlap, exposed and in_flight_hidden
    (module doc), else those are None.
  """
  comm_ops = [(pattern.search(n).group(1), s, e) for n, s, e in ops if pattern.search(n)]
  data_ops = [(pattern.search(n).group(1), s, e) for n, s, e in ops
              if pattern.search(n) and not INSTANCE_KEY.search(n)]
  compute = union([(s, e) for n, s, e in ops if not pattern.search(n)])
  comm = union([(s, e) for _, s, e in comm_ops])
  backward = union([(s, e) for n, s, e in ops
                    if "gradient_tape/" in n and not pattern.search(n)])
  out = []
  for window in steps:
    c, m, b = clip(compute, window), clip(comm, window), clip(backward, window)
    both = intersect(c, m)
    packs = {}
    for name in sorted({p for p, s, e in comm_ops if e > window[0] and s < window[1]}):
      spans = clip(union([(s, e) for p, s, e in comm_ops if p == name]), window)
      # It starts with its data (its instance keys are drawn at the step's start).
      data = clip(union([(s, e) for p, s, e in data_ops if p == name]), window) or spans
      packs[name] = dict(busy=length(spans), start=data[0][0] - window[0])
    flight = dict(in_flight=None, in_flight_overlap=None, exposed=None,
                  in_flight_hidden=None)
    if pattern is PACK:
      envelopes = []
      for name in packs:
        spans = [(s, e) for p, s, e in data_ops
                 if p == name and e > window[0] and s < window[1]]
        if spans:
          envelopes.append((min(s for s, _ in spans), max(e for _, e in spans)))
      f = clip(union(envelopes), window)
      hidden = length(intersect(c, f))
      flight = dict(in_flight=length(f), in_flight_overlap=hidden,
                    exposed=length(f) - hidden,
                    in_flight_hidden=hidden / length(f) if f else 0.0)
    out.append(dict(step=window[1] - window[0], compute=length(c), communication=length(m),
                    overlap=length(both),
                    overlap_fraction=length(both) / length(m) if m else 0.0,
                    backward=(b[-1][1] - b[0][0]) if b else 0.0, packs=packs, **flight))
  return out


def read_trace(path):
  """(ops, steps) from a .xplane.pb file, in seconds."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  ops, steps = [], []
  for plane in space.planes:
    if not plane.name.startswith("/host:"):
      continue
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      base = line.timestamp_ns * 1000
      for e in line.events:
        name = names.get(e.metadata_id, "")
        start = (base + e.offset_ps) * 1e-12
        span = (start, start + e.duration_ps * 1e-12)
        if STEP.search(name):
          steps.append(span)
        elif line.name.startswith("tf_Compute") and ":" in name and "::" not in name:
          ops.append((name,) + span)
  steps = [s for s in union(steps)]   # nested step events of one call merge
  return ops, steps


def latest_trace(logdir):
  found = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise SystemExit(f"no *.xplane.pb under {logdir}: profile some steps first "
                     "(--profile_steps of the recipe).")
  return found[-1]


def report(summary, path):
  print(f"trace: {path}")
  print(f"{'step':>4s} {'step ms':>8s} {'compute':>8s} {'comm':>8s} {'overlap':>8s} "
        f"{'hidden':>7s} {'in flight':>9s} {'exposed':>8s} {'hidden':>7s} "
        f"{'backward':>9s} {'packs':>5s}")
  fmt = lambda v, scale, spec: format(scale * v, spec) if v is not None else "-"
  for i, s in enumerate(summary):
    print(f"{i:4d} {1e3 * s['step']:8.1f} {1e3 * s['compute']:8.1f} "
          f"{1e3 * s['communication']:8.1f} {1e3 * s['overlap']:8.1f} "
          f"{100 * s['overlap_fraction']:6.1f}% {fmt(s['in_flight'], 1e3, '9.1f')} "
          f"{fmt(s['exposed'], 1e3, '8.1f')} {fmt(s['in_flight_hidden'], 100, '6.1f')}% "
          f"{1e3 * s['backward']:9.1f} {len(s['packs']):5d}")
  if summary and summary[-1]["packs"]:
    print("packs of the last step (busy ms, start ms into the step):")
    for name, p in list(summary[-1]["packs"].items())[:40]:
      print(f"  {name:48s} {1e3 * p['busy']:8.2f} {1e3 * p['start']:9.1f}")
  backward = [s["backward"] for s in summary if s["backward"]]
  if backward:
    print(f"backward pass, median: {statistics.median(backward):.4f} s -> for the "
          f"autotuner: --pack_bytes=auto --backward_seconds="
          f"{statistics.median(backward):.4f}")


def run_recipe(out_dir, extra):
  """A few profiled steps of the recipe; returns its model_dir."""
  from official_recipes.imagenet import main as recipe  # pylint: disable=g-import-not-at-top
  from official_recipes.imagenet import recipe_flags  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  recipe_flags.define_all(fv)
  argv = ["profile_step", "--model=resnet50", "--synthetic", "--image_size=32",
          "--num_classes=10", "--batch_size=32", "--num_train_examples=1024",
          "--skip_eval", "--train_steps=6", "--warmup_epochs=0", "--num_devices=4",
          "--profile_steps=4,6", "--log_steps=2", "--all_reduce_alg=reduce_to_one",
          "--pack_bytes=4194304", f"--model_dir={out_dir}"] + list(extra)
  fv(argv)
  return recipe.run(fv)["model_dir"]


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--logdir", default="", help="analyze the latest profile under it")
  p.add_argument("--out_dir", default="", help="where a new run writes (default: temp)")
  p.add_argument("--json", default="", help="also write the summary here")
  args = p.parse_args(argv)
  logdir = args.logdir
  if not logdir:
    logdir = args.out_dir or tempfile.mkdtemp(prefix="tf_fusion_profile_")
    logdir = run_recipe(logdir, extra)
  path = latest_trace(logdir)
  ops, steps = read_trace(path)
  if not steps:
    raise SystemExit(f"{path}: no training step found in the trace.")
  summary = analyze(ops, steps)
  report(summary, path)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(trace=path, steps=summary), f, indent=2)
  return summary


if __name__ == "__main__":
  main()
