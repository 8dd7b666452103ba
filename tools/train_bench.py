"""Training benchmark: the ImageNet recipe end to end, tf_fusion (its update replicated,
and sharded: --weight_update=sharded) against TensorFlow's own reduction (the recipe's
--cross_device_ops=tf) and the no-communication floor (--cross_device_ops=none), side
by side.

Each run is the recipe in fresh processes on synthetic images (one host with --devices
logical CPU replicas, or --workers processes on 127.0.0.1 through tf_fusion.launch),
everything equal but who reduces the gradients. Runs alternate between the sides (A B C,
then C B A, ...), so that drift on a noisy machine hits all alike; every configuration
runs --reps times and the table gives the median of the steady images/s (sequences/s
for the BERT recipe's bert_tiny; the recipe's
step logs after the first window, which holds tracing), the ratio tf_fusion / TF, and
each side's scaling efficiency: its images/s over the floor's. The floor runs the same
step with no cross-replica communication (each replica applies its own gradients: a
measurement, not a training run), so efficiency is what communication costs on top of
the step's compute, as Horovod and Goyal et al. report it.
With --profile, one more run of each configuration traces a few steps and reports the
communication time per step and how much of it overlapped compute (tools.profile_step:
tf_fusion's packs by their name scopes, TF's by its collective ops; asynchronous
collectives count from their launch only, so their spans are lower bounds).

  python -m tools.train_bench                                   # both layouts, both models
  python -m tools.train_bench --layouts 2x2 --models resnet50 --reps 5
  python -m tools.train_bench --extra=--compression=fp16        # any recipe flag, both sides

Writes train_bench.json and train_bench.png to --out_dir.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from tools import bench_lib

# "sharded": tf_fusion with the sharded weight update; "none": the no-communication floor.
SIDES = ("tf_fusion", "sharded", "tf", "none")
COMMUNICATING = ("tf_fusion", "sharded", "tf")
_SIDE_FLAGS = {"sharded": ["--cross_device_ops=tf_fusion", "--weight_update=sharded"]}
# Per model: image size, global batch, steps. Small images keep the CPU's compute near
# what the reduction costs, as on GPUs at full size.
MODELS = {"resnet50": dict(image_size=32, batch_size=64, steps=24),
          "alexnet_bn": dict(image_size=64, batch_size=64, steps=12),
          # The BERT recipe's tiny encoder on a generated corpus (sequences/s).
          "bert_tiny": dict(batch_size=64, steps=48, recipe="bert")}
TEXT_CORPUS = dict(vocab_size=512, seq_length=32, num_train=4096, num_validation=64)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layouts", default="1x4,2x2",
                 help="comma-separated WORKERSxDEVICES, e.g. 1x4 (one host, 4 replicas)")
  p.add_argument("--models", default="resnet50,alexnet_bn",
                 help=f"comma-separated: {', '.join(MODELS)}")
  p.add_argument("--reps", type=int, default=3, help="runs per configuration")
  p.add_argument("--sides", default=",".join(SIDES),
                 help=f"comma-separated, of {', '.join(SIDES)} (none: the floor)")
  p.add_argument("--steps", type=int, default=0, help="steps per run (default: per model)")
  p.add_argument("--log_steps", type=int, default=4, help="steps per images/s window")
  p.add_argument("--profile", action="store_true",
                 help="one more run per configuration with a trace of 2 steps")
  p.add_argument("--extra", action="append", default=[],
                 help="a recipe flag for both sides, e.g. --extra=--dtype=fp32")
  p.add_argument("--out_dir", default="out/train_bench")
  args = p.parse_args(argv)
  try:
    args.layouts = [tuple(int(x) for x in l.lower().split("x")) for l in args.layouts.split(",")]
  except ValueError:
    p.error(f"--layouts must be WORKERSxDEVICES[,...], got {args.layouts!r}")
  if any(len(l) != 2 or min(l) < 1 or l[0] * l[1] < 2 for l in args.layouts):
    p.error("each layout needs >= 1 worker, >= 1 device and >= 2 replicas in all")
  args.models = args.models.split(",")
  args.sides = tuple(args.sides.split(","))
  if set(args.sides) - set(SIDES) or not args.sides:
    p.error(f"--sides takes {', '.join(SIDES)}, got {args.sides}")
  unknown = set(args.models) - set(MODELS)
  if unknown:
    p.error(f"unknown --models {sorted(unknown)}; valid: {', '.join(MODELS)}")
  if args.reps < 1 or args.log_steps < 1:
    p.error("--reps and --log_steps must be >= 1")
  return args


def recipe_argv(model, side, workers, devices, steps, log_steps, model_dir, extra=(),
                profile_steps=""):
  """The recipe's flags for one run: synthetic data, one epoch of `steps`, one
  evaluation step at the end, bf16 compute, the fp16-free default wire."""
  m = MODELS[model]
  batch = m["batch_size"]
  if m.get("recipe") == "bert":
    argv = ["--model=tiny", f"--data_dir={text_corpus()}", "--skip_eval",
            f"--checkpoint_steps={steps}"]
  else:
    argv = [f"--model={model}", "--synthetic", f"--image_size={m['image_size']}",
            "--num_classes=1000", f"--num_train_examples={batch * steps}",
            f"--num_eval_examples={batch}", "--warmup_epochs=0"]
  argv += [f"--batch_size={batch}", f"--train_steps={steps}", "--dtype=bf16",
           f"--log_steps={log_steps}", f"--num_devices={devices}",
           "--stall_seconds=0", f"--model_dir={model_dir}", "--seed=1"]
  argv += _SIDE_FLAGS.get(side, [f"--cross_device_ops={side}"])
  if workers > 1:
    argv.append("--strategy=multi_worker")
  if profile_steps:
    argv.append(f"--profile_steps={profile_steps}")
  return argv + list(extra)


def text_corpus():
  """The generated corpus the BERT runs read (written once per process)."""
  path = os.path.join(tempfile.gettempdir(), "train_bench_text_corpus")
  if not os.path.exists(os.path.join(path, "meta.json")):
    from tools import make_fake_text  # pylint: disable=g-import-not-at-top
    make_fake_text.make(path, **TEXT_CORPUS, log=lambda _: None)
  return path


def run_once(model, side, workers, devices, steps, log_steps, extra, profile_steps="",
             gpus=False):
  """One recipe run in fresh processes; returns worker 0's stats (and its model_dir).
  CPU replicas unless `gpus` (then the host's GPUs, as the recipe picks them)."""
  model_dir = tempfile.mkdtemp(prefix=f"train_bench_{model}_{side}_")
  argv = recipe_argv(model, side, workers, devices, steps, log_steps, model_dir, extra,
                     profile_steps)
  recipe = MODELS[model].get("recipe", "imagenet")
  command = [sys.executable, "-m", f"official_recipes.{recipe}.main"] + argv
  env = dict(os.environ, PYTHONPATH=bench_lib.ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  if not gpus:
    env["CUDA_VISIBLE_DEVICES"] = ""
  with open(os.path.join(model_dir, "run.log"), "w") as log:
    code = bench_lib.run_processes(command, workers, devices, env, log)
  if code:
    with open(os.path.join(model_dir, "run.log")) as f:
      tail = f.read()[-3000:]
    raise RunFailed(f"recipe run failed (exit {code}; log in {model_dir}/run.log): "
                    f"{' '.join(argv)}\n{tail}")
  with open(os.path.join(model_dir, "stats.json")) as f:
    stats = json.load(f)
  # One throughput column: images/s, or the BERT recipe's sequences/s.
  stats.setdefault("images_per_sec", stats.get("sequences_per_sec"))
  return stats


class RunFailed(RuntimeError):
  """One recipe run ended non-zero (its log's tail is in the message)."""


def communication(model_dir, side):
  """Median per-step communication and overlap from the run's trace."""
  from tools import profile_step  # pylint: disable=g-import-not-at-top
  ops, steps = profile_step.read_trace(profile_step.latest_trace(model_dir))
  pattern = profile_step.TF_COMMUNICATION if side == "tf" else profile_step.PACK
  summary = profile_step.analyze(ops, steps, pattern)
  if not summary:
    return {}
  med = lambda k: (statistics.median(s[k] for s in summary)
                   if summary[0][k] is not None else None)
  ms = lambda k: med(k) and 1e3 * med(k)
  return dict(step_ms=ms("step"), communication_ms=ms("communication"),
              overlap_ms=ms("overlap"), overlap_fraction=med("overlap_fraction"),
              in_flight_ms=ms("in_flight"), exposed_ms=ms("exposed"),
              in_flight_hidden=med("in_flight_hidden"))


def summarize(runs):
  """Per (layout, model): images/s medians of each side and tf_fusion / TF."""
  rows = []
  keys = dict.fromkeys((r["layout"], r["model"]) for r in runs)
  for layout, model in keys:
    row = dict(layout=layout, model=model)
    for side in SIDES:
      rates = [r["images_per_sec"] for r in runs
               if (r["layout"], r["model"], r["side"]) == (layout, model, side)
               and r["images_per_sec"]]
      row[side] = dict(median=statistics.median(rates) if rates else None, runs=rates)
    a, b = row["tf_fusion"]["median"], row["tf"]["median"]
    row["ratio"] = a / b if a and b else None
    sharded = row["sharded"]["median"]
    row["sharded_ratio"] = sharded / a if sharded and a else None   # over replicated
    floor = row["none"]["median"]
    row["efficiency"] = {side: row[side]["median"] / floor
                         for side in COMMUNICATING if floor and row[side]["median"]}
    rows.append(row)
  return rows


def print_table(rows, profiles):
  print(f"\n{'layout':>7s} {'model':>11s} {'tf_fusion img/s':>16s} {'sharded':>8s} "
        f"{'TF img/s':>9s} {'floor img/s':>11s} {'ratio':>6s} {'sh/rep':>6s} "
        f"{'eff tf_fusion':>13s} {'eff sharded':>11s} {'eff TF':>7s}  "
        "runs (tf_fusion | sharded | TF | floor)")
  for r in rows:
    fmt = lambda v: f"{v:.1f}" if v else "-"
    two = lambda v: f"{v:.2f}" if v else "-"
    eff = r.get("efficiency", {})
    print(f"{r['layout']:>7s} {r['model']:>11s} {fmt(r['tf_fusion']['median']):>16s} "
          f"{fmt(r['sharded']['median']):>8s} "
          f"{fmt(r['tf']['median']):>9s} {fmt(r['none']['median']):>11s} "
          f"{two(r['ratio']):>6s} {two(r.get('sharded_ratio')):>6s} "
          f"{two(eff.get('tf_fusion')):>13s} {two(eff.get('sharded')):>11s} "
          f"{two(eff.get('tf')):>7s}  "
          + " | ".join(", ".join(fmt(x) for x in r[side]["runs"]) for side in SIDES))
  if profiles:
    print(f"\n{'layout':>7s} {'model':>11s} {'side':>9s} {'step ms':>8s} {'comm ms':>8s} "
          f"{'overlap ms':>10s} {'hidden':>7s} {'in flight':>9s} {'exposed':>8s} "
          f"{'hidden':>7s}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"
    for p in profiles:
      c = p["communication"]
      if c:
        hidden = c.get("in_flight_hidden")
        print(f"{p['layout']:>7s} {p['model']:>11s} {p['side']:>9s} {c['step_ms']:8.1f} "
              f"{c['communication_ms']:8.1f} {c['overlap_ms']:10.1f} "
              f"{100 * c['overlap_fraction']:6.1f}% {fmt(c.get('in_flight_ms'), '9.1f')} "
              f"{fmt(c.get('exposed_ms'), '8.1f')} "
              f"{fmt(hidden and 100 * hidden, '6.1f')}%")


def plot(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 3, 4))
  width = 0.2
  labels = {"tf_fusion": "tf_fusion", "sharded": "tf_fusion, sharded update",
            "tf": "TensorFlow's own reduction", "none": "no communication (floor)"}
  for k, side in enumerate(SIDES):
    xs = [i + (k - 1.5) * width for i in range(len(rows))]
    ax.bar(xs, [r[side]["median"] or 0 for r in rows], width, label=labels[side])
    for x, r in zip(xs, rows):
      ax.plot([x] * len(r[side]["runs"]), r[side]["runs"], "k.", ms=4)
  ax.set_xticks(range(len(rows)),
                [f"{r['model']}\n{r['layout']}" + (f"\n{r['ratio']:.2f}x" if r["ratio"] else "")
                 for r in rows])
  ax.set_ylabel("images/s (median; dots: runs)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  report = dict(args={k: v for k, v in vars(args).items()}, runs=[], rows=[], profiles=[],
                failures=[])
  json_path = os.path.join(args.out_dir, "train_bench.json")

  def attempt(what, fn):
    """Runs one recipe run; a failure is recorded and the bench goes on. The report is
    written after every run, so a crash loses nothing measured."""
    try:
      return fn()
    except RunFailed as e:
      report["failures"].append(dict(what, error=str(e)[:4000]))
      print(f"FAILED {what}: {str(e).splitlines()[0]}", flush=True)
      return None
    finally:
      bench_lib.write_json(report, json_path)

  order = 0
  for rep in range(args.reps):
    for workers, devices in args.layouts:
      for model in args.models:
        sides = args.sides if order % 2 == 0 else args.sides[::-1]
        order += 1
        for side in sides:
          steps = args.steps or MODELS[model]["steps"]
          what = dict(rep=rep, layout=f"{workers}x{devices}", model=model, side=side)
          start = time.perf_counter()
          stats = attempt(what, lambda: run_once(model, side, workers, devices, steps,
                                                 args.log_steps, args.extra))
          if stats is None:
            continue
          run = dict(what, images_per_sec=stats["images_per_sec"],
                     cpu_seconds_per_step=stats.get("cpu_seconds_per_step"),
                     final_step=stats["final_step"], seconds=time.perf_counter() - start)
          report["runs"].append(run)
          print(f"[{rep + 1}/{args.reps}] {run['layout']} {model:10s} {side:9s} "
                f"{run['images_per_sec'] or 0:7.1f} images/s, "
                f"{run['cpu_seconds_per_step'] or 0:.2f} CPU s/step on worker 0 "
                f"({run['seconds']:.0f} s)", flush=True)
  if args.profile:
    for workers, devices in args.layouts:
      for model in args.models:
        for side in [s for s in args.sides if s in COMMUNICATING]:
          steps = args.steps or MODELS[model]["steps"]
          what = dict(layout=f"{workers}x{devices}", model=model, side=side)
          stats = attempt(dict(what, profile=True), lambda: run_once(
              model, side, workers, devices, steps, args.log_steps, args.extra,
              profile_steps=f"{steps - 3},{steps - 2}"))
          if stats is not None:
            report["profiles"].append(dict(what, model_dir=stats["model_dir"],
                                           communication=communication(
                                               stats["model_dir"], side)))
  report["rows"] = summarize(report["runs"])
  print_table(report["rows"], report["profiles"])
  bench_lib.write_json(report, json_path)
  plot(report["rows"], os.path.join(args.out_dir, "train_bench.png"))
  print(f"\nwrote {json_path} and train_bench.png"
        + (f"; {len(report['failures'])} run(s) failed (in the JSON)" if report["failures"]
           else ""))
  return report


if __name__ == "__main__":
  main()
