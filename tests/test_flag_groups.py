"""The two recipes as one family: the same flag for the same concept, in the same group,
old names that still work and say their new one, and a --helpshort that lists the
flags group by group (official_recipes/flag_groups.py)."""

import os
import re
import subprocess
import sys

from absl import flags
import tensorflow as tf

from official_recipes import flag_groups
from official_recipes.bert import recipe_flags as bert_flags
from official_recipes.imagenet import main as imagenet_main
from official_recipes.imagenet import recipe_flags as imagenet_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {"imagenet": imagenet_flags, "bert": bert_flags}
BASE = {"imagenet": ["--synthetic", "--model_dir=/tmp/x"],
        "bert": ["--data_dir=/d", "--model_dir=/tmp/x"]}
# Concepts both recipes have, each under one name.
SHARED = ("model", "schedule_preset", "batch_size", "train_steps", "learning_rate",
          "warmup_proportion", "poly_power", "weight_decay", "optimizer", "dtype",
          "compression", "weight_update", "strategy", "num_devices", "model_dir", "seed")


def defined(recipe):
  fv = flags.FlagValues()
  RECIPES[recipe].define_all(fv)
  return fv


def parse(recipe, argv):
  fv = defined(recipe)
  fv(["main"] + BASE[recipe] + argv)
  return fv


def group_of(fv):
  return {name: g for g, names in flag_groups.groups_of(fv).items() for name in names}


class GroupsTest(tf.test.TestCase):

  def test_every_flag_is_in_one_group_and_the_groups_match(self):
    groups = {}
    for recipe in RECIPES:
      fv = defined(recipe)
      listed = [n for names in flag_groups.groups_of(fv).values() for n in names]
      self.assertEqual(len(listed), len(set(listed)), recipe)
      ours = {f.name for module, defined_there in fv.flags_by_module_dict().items()
              if module.startswith("official_recipes") for f in defined_there}
      old = {n for n in ours if "Old name of --" in fv[n].help}
      self.assertEqual(sorted(listed), sorted(ours - old), recipe)   # old: --helpfull
      self.assertEqual(list(flag_groups.groups_of(fv)), list(flag_groups.GROUPS), recipe)
      groups[recipe] = group_of(fv)
    for name in SHARED:
      self.assertEqual(groups["imagenet"][name], groups["bert"][name], name)

  def test_an_unknown_group_is_refused(self):
    with self.assertRaisesRegex(ValueError, "unknown flag group 'misc'"):
      with flag_groups.group("misc", flags.FlagValues()):
        pass


class NamesTest(tf.test.TestCase):

  def test_old_names_still_work_and_say_their_new_one(self):
    cases = [("imagenet", "--base_lr=0.5", "learning_rate", 0.5),
             ("imagenet", "--preset=jia2018_alexnet_bn_64k", "schedule_preset",
              "jia2018_alexnet_bn_64k"),
             ("bert", "--preset=bert_base", "model", "bert_base")]
    for recipe, argv, new, want in cases:
      with self.subTest(argv=argv):
        with self.assertLogs("absl", "WARNING") as logs:
          cfg = RECIPES[recipe].resolve(parse(recipe, [argv]))
        self.assertEqual(getattr(cfg, new), want)
        old = argv.split("=")[0]
        self.assertIn(f"{old} is now --{new}", logs.output[0])
        with self.assertRaisesRegex(flags.Error, f"old name of --{new}: give one"):
          parse(recipe, [argv, f"--{new}={want}"])

  def test_the_old_preset_name_still_carries_the_preset(self):
    cfg = imagenet_flags.resolve(parse("imagenet", ["--preset=jia2018_alexnet_bn_64k"]))
    self.assertEqual((cfg.model, cfg.epochs, cfg.weight_decay), ("alexnet_bn", 95, 5e-4))
    with self.assertRaisesRegex(flags.Error, "another --model"):
      parse("imagenet", ["--preset=jia2018_alexnet_bn_64k", "--model=resnet50"])

  def test_warm_up_as_a_proportion_in_both(self):
    bert = bert_flags.resolve(parse("bert", ["--warmup_proportion=0.25"]))
    self.assertEqual(bert.warmup_proportion, 0.25)
    cfg = imagenet_flags.resolve(parse("imagenet", ["--warmup_proportion=0.25",
                                                    "--train_steps=40"]))
    # 40 steps of 10 per epoch: a quarter of them, not --warmup_epochs' default 5 epochs.
    self.assertEqual(imagenet_main.plan_steps(cfg, 80, 8, 8)[2], 10)
    default = imagenet_flags.resolve(parse("imagenet", ["--train_steps=100"]))
    self.assertEqual(imagenet_main.plan_steps(default, 80, 8, 8)[2], 50)   # 5 epochs
    for recipe in RECIPES:
      with self.subTest(recipe=recipe), self.assertRaisesRegex(flags.Error, r"\[0, 1\)"):
        parse(recipe, ["--warmup_proportion=1.5"])
    with self.assertRaisesRegex(flags.Error, "--warmup_epochs or --warmup_proportion"):
      parse("imagenet", ["--warmup_proportion=0.1", "--warmup_epochs=2"])


class PresetsTest(tf.test.TestCase):

  def test_every_preset_value_is_a_flag_value_that_parses(self):
    """A preset is a set of flag values: each key a flag of its recipe, each value one
    its flag (and the flag's validators) accepts, given on the command line."""
    presets = {"imagenet": imagenet_flags.PRESETS, "bert": bert_flags.SCHEDULE_PRESETS}
    for recipe, table in presets.items():
      for name, preset in table.items():
        values = preset.as_flags()
        fv = defined(recipe)
        for key, value in values.items():
          self.assertIn(key, fv, f"{recipe} preset {name}: no flag --{key}")
        argv = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in values.items()]
        fv(["main"] + BASE[recipe] + argv)   # raises on a value the flag refuses
        for key, value in values.items():
          self.assertEqual(fv[key].value, value, f"{recipe} preset {name}: --{key}")


  def test_a_value_of_another_type_is_refused_when_the_preset_is_written(self):
    with self.assertRaisesRegex(TypeError, r"JiaSchedule.epochs='90': the flag --epochs "
                                "takes a float"):
      imagenet_flags.JiaSchedule("resnet50", epochs="90", weight_decay=5e-5)
    with self.assertRaisesRegex(TypeError, "LambSchedule.lamb_adapt_all=1"):
      bert_flags.LambSchedule(512, 10, 1e-3, 0.1, 20, lamb_adapt_all=1)
    # An int where a float flag is meant is that float.
    self.assertEqual(imagenet_flags.JiaSchedule("resnet50", 90, 1).weight_decay, 1.0)


class HelpshortTest(tf.test.TestCase):

  def test_both_recipes_list_the_same_groups_in_the_same_order(self):
    # The command line once (both mains install the help in training.start, the same
    # code), the text itself for both recipes from their own flag definitions.
    proc = subprocess.run([sys.executable, "-m", "official_recipes.imagenet.main",
                           "--helpshort"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])   # absl's help code
    printed = proc.stdout.split("\nflags:")[1].split("\nTry --helpfull")[0]
    texts = {"imagenet (command line)": printed}
    texts.update({recipe: flag_groups.grouped_help(defined(recipe)) for recipe in RECIPES})
    self.assertEqual(texts["imagenet"].strip(), texts["imagenet (command line)"].strip())
    for recipe, text in texts.items():
      self.assertEqual(re.findall(r"^(\w+):$", text, re.M), list(flag_groups.GROUPS), recipe)
      self.assertIn("  --learning_rate: Peak learning rate", text)
      self.assertIn("  --schedule_preset: <", text)
      self.assertNotIn("--base_lr", text)   # old names: --helpfull only


if __name__ == "__main__":
  tf.test.main()
