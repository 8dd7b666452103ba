"""A BERT-style encoder for masked-language-model pre-training (Devlin et al. 2019).

Word, position and segment embeddings, post-LayerNorm transformer blocks, and the MLM
head on the masked positions only, whose output projection is the word embedding table
itself (tied input/output embeddings, as in BERT). The position and segment tables are
looked up with a gather, so their gradients are IndexedSlices; the word table gets the
lookup's IndexedSlices and the output projection's dense gradient, which TensorFlow
sums into one dense tensor.

Logits are float32 under mixed precision, like the ImageNet models', so the softmax
and loss run in full precision.
"""

import dataclasses

import keras
from keras import ops


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes of the encoder. `vocab_size` None: the data's vocabulary. `max_predictions`:
  masked positions per sequence the pre-training task asks it for by default."""
  hidden: int
  layers: int
  heads: int
  intermediate: int
  max_position: int
  vocab_size: int = None
  dropout: float = 0.1
  max_predictions: int = 20


PRESETS = {
    # For this machine's CPUs: trains in seconds per hundred steps.
    "tiny": EncoderConfig(hidden=64, layers=2, heads=2, intermediate=256, max_position=128,
                          max_predictions=5),
    # BERT-base (Devlin et al. 2019): 110M parameters with the 30,522-word vocabulary.
    "bert_base": EncoderConfig(hidden=768, layers=12, heads=12, intermediate=3072,
                               max_position=512, vocab_size=30522),
}


class Block(keras.layers.Layer):
  """Self-attention and a GELU feed-forward layer, each added back and LayerNormed."""

  def __init__(self, config: EncoderConfig, **kwargs):
    super().__init__(**kwargs)
    c = config
    self.attention = keras.layers.MultiHeadAttention(
        c.heads, c.hidden // c.heads, dropout=c.dropout, name="attention")
    self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-12,
                                                          name="attention_layer_norm")
    self.intermediate = keras.layers.Dense(c.intermediate, activation="gelu",
                                           name="intermediate")
    self.output_dense = keras.layers.Dense(c.hidden, name="output")
    self.output_norm = keras.layers.LayerNormalization(epsilon=1e-12,
                                                       name="output_layer_norm")
    self.dropout = keras.layers.Dropout(c.dropout)

  def call(self, x, training=False):
    x = self.attention_norm(x + self.dropout(self.attention(x, x, training=training),
                                             training=training))
    y = self.output_dense(self.intermediate(x))
    return self.output_norm(x + self.dropout(y, training=training))


class MaskedLM(keras.Model):
  """Inputs: {"input_ids", "segment_ids": (batch, length), "masked_positions":
  (batch, predictions)}; output: float32 logits (batch, predictions, vocab)."""

  def __init__(self, config: EncoderConfig, **kwargs):
    super().__init__(**kwargs)
    c = self.config = config
    self.word_embeddings = keras.layers.Embedding(c.vocab_size, c.hidden,
                                                  name="word_embeddings")
    self.position_embeddings = keras.layers.Embedding(c.max_position, c.hidden,
                                                      name="position_embeddings")
    self.segment_embeddings = keras.layers.Embedding(2, c.hidden, name="segment_embeddings")
    self.embedding_norm = keras.layers.LayerNormalization(epsilon=1e-12,
                                                          name="embeddings_layer_norm")
    self.dropout = keras.layers.Dropout(c.dropout)
    self.blocks = [Block(c, name=f"block_{i}") for i in range(c.layers)]
    self.transform = keras.layers.Dense(c.hidden, activation="gelu", name="mlm_transform")
    self.transform_norm = keras.layers.LayerNormalization(epsilon=1e-12,
                                                          name="mlm_layer_norm")

  def build(self, input_shape=None):
    self.output_bias = self.add_weight(shape=(self.config.vocab_size,),
                                       initializer="zeros", name="mlm_output_bias")
    super().build(input_shape)

  def call(self, inputs, training=False):
    ids = inputs["input_ids"]
    length = ops.shape(ids)[1]
    x = (self.word_embeddings(ids)
         + self.position_embeddings(ops.arange(length))[None]
         + self.segment_embeddings(inputs["segment_ids"]))
    x = self.dropout(self.embedding_norm(x), training=training)
    for block in self.blocks:
      x = block(x, training=training)
    # Only the masked positions reach the vocabulary projection (BERT's
    # max_predictions_per_seq): the costliest matmul stays small.
    picked = ops.take_along_axis(x, ops.expand_dims(inputs["masked_positions"], -1), axis=1)
    h = self.transform_norm(self.transform(picked))
    table = ops.cast(self.word_embeddings.embeddings, h.dtype)
    logits = ops.matmul(h, ops.transpose(table))
    return ops.cast(logits, "float32") + ops.cast(self.output_bias, "float32")


def build(preset_or_config, vocab_size=None, dropout=None) -> MaskedLM:
  """The model of a preset name or an EncoderConfig, with the data's `vocab_size`
  where the config leaves it open; its variables are created."""
  config = (PRESETS[preset_or_config] if isinstance(preset_or_config, str)
            else preset_or_config)
  if config.vocab_size is None:
    if vocab_size is None:
      raise ValueError("The encoder needs a vocabulary size: the data's meta.json has it.")
    config = dataclasses.replace(config, vocab_size=vocab_size)
  elif vocab_size is not None and vocab_size > config.vocab_size:
    raise ValueError(f"The data has {vocab_size} token ids, more than the model's "
                     f"vocabulary of {config.vocab_size}.")
  if dropout is not None:
    config = dataclasses.replace(config, dropout=dropout)
  model = MaskedLM(config, name="bert")
  model({"input_ids": ops.zeros((1, 4), "int32"), "segment_ids": ops.zeros((1, 4), "int32"),
         "masked_positions": ops.zeros((1, 1), "int32")})
  return model
