"""What the two large-batch experiments (large_batch_digits, large_batch_text) share:
the replicas, the choice of runs, the loop over runs and seeds, the summary rows, the
markdown table and the accuracy curves."""

import numpy as np


def logical_cpus(replicas):
  """`replicas` logical CPU devices (before TensorFlow runs anything); their names."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_logical_device_configuration(
      tf.config.list_physical_devices("CPU")[0],
      [tf.config.LogicalDeviceConfiguration()] * replicas)
  return [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]


def select(parser, runs, only):
  """The runs named in --only (comma-separated; empty: all), or a usage error."""
  if not only:
    return runs
  wanted = set(only.split(","))
  unknown = wanted - {r.name for r in runs}
  if unknown:
    parser.error(f"unknown --only {sorted(unknown)}; valid: {[r.name for r in runs]}")
  return [r for r in runs if r.name in wanted]


def run_all(runs, seeds, train, what):
  """`train(run, seed)` for every seed and run (seed-major), each reported on one line
  (`what`: the accuracy's name); the results in that order."""
  todo = [(run, seed) for seed in seeds for run in runs]
  results = []
  for i, (run, seed) in enumerate(todo, 1):
    result = train(run, seed)
    results.append(result)
    print(f"[{i}/{len(todo)}] {run.name} seed {seed}: {what} "
          f"{100 * result['final_accuracy']:.2f}% in {result['steps']} steps, "
          f"{result['seconds']:.0f} s", flush=True)
  return results


def summarize(results, runs, fields):
  """Rows: run, its `fields`, steps, mean/std/min of the final accuracy over seeds."""
  rows = []
  for run in runs:
    finals = [r["final_accuracy"] for r in results if r["run"] == run.name]
    if not finals:
      continue
    steps = next(r["steps"] for r in results if r["run"] == run.name)
    rows.append(dict(run=run.name, **{f: getattr(run, f) for f in fields}, steps=steps,
                     seeds=len(finals), mean=float(np.mean(finals)),
                     std=float(np.std(finals)), min=float(np.min(finals))))
  return rows


def format_table(rows, columns, accuracy):
  """A markdown table: run, `columns` ((header, row key) pairs), steps, the `accuracy`
  as mean ± std over seeds, and the difference to the run named "baseline"."""
  base = next((r["mean"] for r in rows if r["run"] == "baseline"), None)
  headers = ["run", *(h for h, _ in columns), "steps", f"{accuracy} (mean ± std, seeds)",
             "vs baseline"]
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for r in rows:
    delta = "" if base is None else f"{100 * (r['mean'] - base):+.2f} pp"
    cells = [r["run"], *(f"{r[k]:g}" if isinstance(r[k], float) else str(r[k])
                         for _, k in columns), str(r["steps"]),
             f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} ({r['seeds']})", delta]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(results, runs, key, path, xlabel, ylabel, fraction=False, ylim=None):
  """The mean curve of each run's `key` (accuracy per evaluation) over seeds; x in
  evaluations, or in fractions of training."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in runs:
    curves = [r[key] for r in results if r["run"] == run.name]
    if curves:
      mean = np.mean(curves, axis=0)
      x = np.arange(1, len(mean) + 1) / (len(mean) if fraction else 1)
      ax.plot(x, 100 * mean, label=f"{run.name} (batch {run.batch})")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if ylim:
    ax.set_ylim(*ylim)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
