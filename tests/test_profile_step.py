"""tools/profile_step.py: interval arithmetic and the per-step summary, by hand."""

import tensorflow as tf

from tools import profile_step


class AnalyzeTest(tf.test.TestCase):

  def test_union_and_intersection(self):
    self.assertEqual(profile_step.union([(5, 7), (0, 2), (1, 3), (7, 8)]),
                     [(0, 3), (5, 8)])
    self.assertEqual(profile_step.intersect([(0, 3), (5, 8)], [(2, 6)]),
                     [(2, 3), (5, 6)])

  def test_step_summary_by_hand(self):
    pack0 = "StatefulPartitionedCall/lars/tf_fusion_pack_000_ring_400B/concat:ConcatV2"
    pack1 = "StatefulPartitionedCall/lars/tf_fusion_pack_001_reduce_to_one_unknown/a:AddV2"
    ops = [
        ("StatefulPartitionedCall/conv/Conv2D:Conv2D", 0.0, 4.0),          # forward
        ("StatefulPartitionedCall/gradient_tape/conv/g:Conv2DBackprop", 4.0, 10.0),
        ("StatefulPartitionedCall/gradient_tape/fc/g:MatMul", 11.0, 14.0),
        (pack0, 8.0, 12.0),        # 2 s under backward, 1 s alone, 1 s under backward
        (pack1, 15.0, 16.0),       # after everything: exposed
        (pack0, 30.0, 31.0),       # in the next step
        ("StatefulPartitionedCall/conv/Conv2D:Conv2D", 29.0, 30.5),
    ]
    steps = [(0.0, 20.0), (28.0, 32.0)]
    first, second = profile_step.analyze(ops, steps)
    # Compute: [0, 10] + [11, 14] = 13 s; communication: [8, 12] + [15, 16] = 5 s;
    # both: [8, 10] + [11, 12] = 3 s.
    self.assertAlmostEqual(first["compute"], 13.0)
    self.assertAlmostEqual(first["communication"], 5.0)
    self.assertAlmostEqual(first["overlap"], 3.0)
    self.assertAlmostEqual(first["overlap_fraction"], 0.6)
    self.assertAlmostEqual(first["backward"], 10.0)     # 4 .. 14
    self.assertAlmostEqual(first["step"], 20.0)
    self.assertEqual(sorted(first["packs"]), ["tf_fusion_pack_000_ring_400B",
                                              "tf_fusion_pack_001_reduce_to_one_unknown"])
    self.assertAlmostEqual(first["packs"]["tf_fusion_pack_000_ring_400B"]["start"], 8.0)
    self.assertAlmostEqual(first["packs"]["tf_fusion_pack_001_reduce_to_one_unknown"]["busy"],
                           1.0)
    # Second step: pack [30, 31] entirely under the conv [29, 30.5]: half hidden.
    self.assertAlmostEqual(second["overlap_fraction"], 0.5)
    self.assertEqual(list(second["packs"]), ["tf_fusion_pack_000_ring_400B"])

  def test_time_in_flight_runs_from_a_packs_first_data_op_to_its_last(self):
    scope = "StatefulPartitionedCall/lars/tf_fusion_pack_000_ring_400B/"
    ops = [
        (scope + "instance_key/AssignAddVariableOp:AssignAddVariableOp", 0.0, 0.1),
        (scope + "instance_key_1/FloorMod:FloorMod", 0.1, 0.2),   # a second launcher
        ("StatefulPartitionedCall/gradient_tape/conv/g:Conv2DBackprop", 0.0, 20.0),
        (scope + "concat:ConcatV2", 10.0, 11.0),      # packed: the collective launches
        (scope + "split:SplitV", 30.0, 31.0),          # its result is back
        ("StatefulPartitionedCall/conv/Conv2D:Conv2D", 25.0, 27.0),
    ]
    step, = profile_step.analyze(ops, [(0.0, 40.0)])
    self.assertAlmostEqual(step["communication"], 2.2)    # launch spans only
    self.assertAlmostEqual(step["in_flight"], 21.0)       # 10 .. 31, not from 0
    self.assertAlmostEqual(step["in_flight_overlap"], 12.0)   # [10, 20] + [25, 27]
    self.assertAlmostEqual(step["exposed"], 9.0)
    self.assertAlmostEqual(step["in_flight_hidden"], 12.0 / 21.0)
    self.assertAlmostEqual(step["packs"]["tf_fusion_pack_000_ring_400B"]["start"], 10.0)
    tf_side, = profile_step.analyze(
        [(n.replace("tf_fusion_pack_000_ring_400B/", ""), s, e) for n, s, e in ops],
        [(0.0, 40.0)], profile_step.TF_COMMUNICATION)
    self.assertIsNone(tf_side["in_flight"])


if __name__ == "__main__":
  tf.test.main()
