"""What the tests share: logical devices and references (helpers), real worker
processes on 127.0.0.1 (multi_worker), the ways Keras drives training for the
differential tests (training_cases), and Keras's own tests retargeted to tf_fusion's
optimizers (keras_retarget)."""
