"""The MultiModel: modality nets around one shared body (encoder, I/O mixer, decoder).

The body never knows which task it runs: a TaskSignature (static) picks the modality nets, and
`batch["target_space"]` (per example) picks the learned embedding that starts the decoder.

`decode_step` runs the mixer and decoder one target position at a time over cached state (see
blocks.py); it computes exactly what `decode` computes at that position.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax import losses
from mm_jax.models.blocks import (
  EMBED_AXES,
  AttentionBlock,
  ConvBlock,
  ConvStep,
  Dense,
  LayerNorm,
  add_timing_signal,
  check_kernels,
  queries_packing,
  timing_signal_at,
  zero_padding,
)
from mm_jax.models.ffn import DenseFFN
from mm_jax.models.modalities import (
  AudioModality,
  CategoricalModality,
  ImageModality,
  LanguageModality,
  sequence_grid,
)
from mm_jax.models.packing import Packing
from mm_jax.models.signature import TaskSignature

__all__ = ["MultiModel", "TaskSignature", "make_ffn"]


def _dtype(config) -> jnp.dtype:
  if config.dtype not in ("float32", "bfloat16"):
    raise ValueError(
      f"config.model.dtype={config.dtype!r}: use float32 or bfloat16 (run.build resolves 'auto')"
    )
  return jnp.dtype(config.dtype)


def _kernels(config) -> str:
  """config.kernels, one of blocks.KERNELS: the forms every Dense and depthwise conv take."""
  return check_kernels(config.kernels)


def _conv_groups(config) -> tuple[tuple[tuple[int, int], ...], ...]:
  as_pairs = lambda group: tuple((int(k), int(r)) for k, r in group)
  return as_pairs(config.conv_group1), as_pairs(config.conv_group2)


# config.model.remat: what the backward pass recomputes of each body block (encoder ConvBlocks,
# DecoderLayers, the FFN/MoE layers) instead of keeping it from the forward pass.
REMAT_MODES = ("none", "block", "dots")


def remat(fn, config, train: bool):
  """`fn(block, *args)` as config.model.remat says: "none" keeps every activation for the
  backward pass; "block" keeps only the block's inputs and recomputes the rest; "dots" also keeps
  the outputs of its matmuls without batch dimensions (the Dense layers), recomputing the
  elementwise work (convolution taps, norms, activations) around them. Without `train` there is
  no backward pass: `fn` as it is."""
  if config.remat == "none" or not train:
    return fn
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(fn, policy=policy if config.remat == "dots" else None)


def make_ffn(config) -> nn.Module:
  """The body's feed-forward layer: the sparsely-gated MoE, or a dense FFN for the ablation."""
  if config.ffn == "dense":
    return DenseFFN(config.dense_ffn_hidden, dtype=_dtype(config))
  if config.ffn == "moe":
    from mm_jax.models.moe import MoE  # noqa: PLC0415 (imported on use)

    return MoE.from_config(config.moe, dtype=_dtype(config))
  raise ValueError(f"config.model.ffn={config.ffn!r}: use 'moe' or 'dense'")


class FFNLayer(nn.Module):
  """LayerNorm(x + dropout(ffn(x))), returning the ffn's auxiliary (balance) loss too."""

  config: Any

  def setup(self):
    self.ffn = make_ffn(self.config)
    self.dropout = nn.Dropout(self.config.dropout)
    self.norm = LayerNorm(kernels=_kernels(self.config))

  def __call__(self, x, mask, *, train: bool, tasks=None):
    y, aux = self.ffn(x, mask, train=train, tasks=tasks)
    x = self.norm(x + self.dropout(y, deterministic=not train))
    return nn.with_logical_constraint(x, EMBED_AXES), aux


class Encoder(nn.Module):
  """Timing signal -> ConvBlocks ("same" padding) -> FFN/MoE -> ConvBlocks."""

  config: Any

  def setup(self):
    c = self.config
    block = lambda: ConvBlock(_conv_groups(c), "same", c.dropout, _dtype(c), _kernels(c))
    self.before = [block() for _ in range(c.encoder_blocks_before_ffn)]
    self.ffn = FFNLayer(c)
    self.after = [block() for _ in range(c.encoder_blocks_after_ffn)]

  def __call__(self, x, mask, *, train: bool, packing=None, tasks=None):
    """`packing` (packing.Packing): x [rows, tokens, d] holds several groups' sequences.
    `tasks` (token_tasks): each token's task, for the MoE's per-task statistics."""
    c = self.config
    x = nn.with_logical_constraint(add_timing_signal(x, packing), EMBED_AXES)
    conv = remat(lambda block, x, mask: block(x, mask, train=train, packing=packing), c, train)
    for block in self.before:
      x = conv(block, x, mask)
    x, aux = _ffn(self.ffn, x, mask, tasks, c, train)
    for block in self.after:
      x = conv(block, x, mask)
    return zero_padding(x, mask), aux


def masked_mean(x, mask):
  """Mean over real positions of [batch, length, d] -> [batch, 1, d]."""
  total = zero_padding(x, mask).sum(1, keepdims=True)
  return total / jnp.maximum(mask.sum(1), 1.0)[:, None, None].astype(x.dtype)


class Mixer(nn.Module):
  """Shifted targets + what they attend to in the input, merged by one causal ConvStep.

  Without attention (the ablation) the decoder sees the input only through its masked mean, a
  fixed context vector as in a non-attentive encoder-decoder, so sequence tasks still train.
  """

  config: Any

  @nn.compact
  def __call__(self, shifted, memory, memory_mask, *, train: bool, timing=None, packing=None):
    """`packing`: (shifted's Packing, memory's Packing) when both hold packed groups."""
    c = self.config
    if c.use_attention:
      context = AttentionBlock(
        c.num_heads, _query_convs(c), c.dropout, _dtype(c), _kernels(c), name="attention"
      )(shifted, memory, memory_mask, train=train, timing=timing, packing=packing)
    elif packing is None:
      context = jnp.broadcast_to(masked_mean(memory, memory_mask), shifted.shape)
    else:
      targets_packing, memory_packing = packing
      groups = zip(memory_packing.unpack(memory), memory_packing.unpack(memory_mask))
      means = [masked_mean(m, mask) for m, mask in groups]
      context = targets_packing.pack(
        [
          jnp.broadcast_to(mean, (mean.shape[0], length, mean.shape[2]))
          for mean, (_, length) in zip(means, targets_packing.segments)
        ]
      )
    kernel = _conv_groups(c)[0][0][0]
    merged = jnp.concatenate([shifted, context.astype(shifted.dtype)], axis=-1)
    x = ConvStep(
      c.d, (kernel,), (1,), "causal", dtype=_dtype(c), kernels=_kernels(c), name="merge"
    )(merged, decode=timing is not None, packing=queries_packing(packing))
    return nn.with_logical_constraint(x, EMBED_AXES)


def _query_convs(config) -> tuple[tuple[int, int], ...]:
  return tuple((int(k), int(r)) for k, r in config.attention_query_convs)


class DecoderLayer(nn.Module):
  """A causal ConvBlock, then (unless ablated) attention to the encoded input."""

  config: Any

  @nn.compact
  def __call__(self, x, memory, memory_mask, *, train: bool, timing=None, packing=None):
    c = self.config
    # Causal convs: padding sits to the right of every real position, so nothing to mask.
    x = ConvBlock(_conv_groups(c), "causal", c.dropout, _dtype(c), _kernels(c), name="convs")(
      x, train=train, decode=timing is not None, packing=queries_packing(packing)
    )
    if c.use_attention:
      x = AttentionBlock(
        c.num_heads, _query_convs(c), c.dropout, _dtype(c), _kernels(c), name="attention"
      )(x, memory, memory_mask, train=train, timing=timing, packing=packing)
    return x


class Decoder(nn.Module):
  """DecoderLayers -> FFN/MoE -> more DecoderLayers."""

  config: Any

  def setup(self):
    c = self.config
    self.before = [DecoderLayer(c) for _ in range(c.decoder_blocks_before_ffn)]
    self.ffn = FFNLayer(c)
    self.after = [DecoderLayer(c) for _ in range(c.decoder_blocks_after_ffn)]

  def __call__(
    self, x, mask, memory, memory_mask, *, train: bool, timing=None, packing=None, tasks=None
  ):
    c = self.config
    run = lambda layer, x, memory, memory_mask, timing: layer(
      x, memory, memory_mask, train=train, timing=timing, packing=packing
    )
    run = remat(run, c, train)
    for layer in self.before:
      x = run(layer, x, memory, memory_mask, timing)
    x, aux = _ffn(self.ffn, x, mask, tasks, c, train)
    for layer in self.after:
      x = run(layer, x, memory, memory_mask, timing)
    return x, aux


def _ffn(layer, x, mask, tasks, config, train: bool):
  """An FFNLayer under config.model.remat."""
  call = lambda layer, x, mask, tasks: layer(x, mask, train=train, tasks=tasks)
  return remat(call, config, train)(layer, x, mask, tasks)


def token_tasks(task_onehot, mask):
  """Each example's task, one-hot [B, num_tasks] (or None), as each real token's [B, L, ...]."""
  if task_onehot is None:
    return None
  return task_onehot[:, None, :].astype(jnp.float32) * mask[..., None].astype(jnp.float32)


def _packed_tasks(packing, onehots, masks):
  """token_tasks of every packed group, packed; None unless every group has its tasks."""
  if any(onehot is None for onehot in onehots):
    return None
  return packing.pack([token_tasks(onehot, mask) for onehot, mask in zip(onehots, masks)])


class CategoricalTops(nn.Module):
  """One categorical head per class count, created on first use (class counts come from tasks)."""

  dtype: Any = jnp.float32
  kernels: str = "cpu"

  @nn.compact
  def __call__(self, x, mask, grid, num_classes: int):
    head = CategoricalModality(num_classes, self.dtype, self.kernels, name=f"classes_{num_classes}")
    return head(x, mask, grid)


class MultiModel(nn.Module):
  """Modality nets + encoder + I/O mixer + decoder; `config` is a FrozenConfigDict of config.model
  with `kernels` and `dtype` resolved (run.build turns their "auto" into the run's choice).

  Categorical targets skip the mixer and decoder and read the encoder output directly, as the
  reference implementation did: a class label is one token, so an autoregressive decoder over it
  would only add a target-space embedding and compute before the same pooled head.

  Initialise with `method=MultiModel.all_tasks` on one batch per task, so that every modality net
  the mixture uses gets parameters (a single task's batch only creates its own nets).

  A batch may carry "task_onehot" [B, num_tasks], each example's task among the run's: the MoE
  layers then sow how each task's tokens were routed (moe.task_routing_sums) into
  "intermediates". Nothing else reads it.
  """

  config: Any

  def setup(self):
    c = self.config
    dtype, kernels = _dtype(c), _kernels(c)
    self.language = LanguageModality(c.vocab_size, c.d, dtype, kernels)
    self.image = ImageModality(c.d, dtype, kernels)
    self.audio = AudioModality(c.d, c.audio_blocks, c.audio_stem_stride, dtype, kernels)
    self.categorical = CategoricalTops(dtype, kernels)
    self.target_space_embedding = self.param(
      "target_space_embedding",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("target_space", "embed")),
      (len(c.target_spaces), c.d),
    )
    self.encoder = Encoder(c)
    self.mixer = Mixer(c)
    self.decoder = Decoder(c)
    if c.audio_ctc_weight > 0:
      self.ctc_head = Dense(c.vocab_size, ("embed", "vocab"), use_bias=True, kernels=kernels)

  def embed_inputs(self, batch: Mapping[str, Any], signature: TaskSignature):
    """The input modality net: [batch, length, d] and its padding mask (1 = real)."""
    inputs = batch["inputs"]
    if signature.input_modality == "language":
      return self.language.embed(inputs), (inputs != 0).astype(jnp.float32)
    if signature.input_modality == "image":
      return self.image(inputs)
    return self.audio(inputs, batch["inputs_mask"].astype(jnp.float32))

  def encode(self, batch: Mapping[str, Any], signature: TaskSignature, *, train: bool):
    x, mask = self.embed_inputs(batch, signature)
    tasks = token_tasks(batch.get("task_onehot"), mask)
    x, aux = self.encoder(x, mask, train=train, tasks=tasks)
    return x, mask, aux

  def decode(
    self,
    encoded,
    encoded_mask,
    targets,
    target_space,
    signature,
    *,
    train: bool,
    target_mask=None,
    task_onehot=None,
  ):
    """Logits [B, L_out, vocab] teacher-forced on `targets`, or [B, classes] for categorical.

    `target_mask` [B, L_out] (default: targets != 0) marks the positions the MoE routes; decoding
    passes ones, since the position being predicted has no target yet. `task_onehot`: see the
    class docstring.
    """
    if signature.target_modality == "categorical":
      grid = sequence_grid(encoded.shape[1], signature.input_modality)
      logits = self.categorical(encoded, encoded_mask, grid, signature.num_classes)
      return logits, jnp.zeros((), jnp.float32)
    shifted = self.shifted_targets(targets, target_space, encoded.dtype)
    x = self.mixer(shifted, encoded, encoded_mask, train=train)
    if target_mask is None:
      target_mask = (targets != 0).astype(jnp.float32)
    tasks = token_tasks(task_onehot, target_mask)
    x, aux = self.decoder(x, target_mask, encoded, encoded_mask, train=train, tasks=tasks)
    return self.language.logits(x), aux

  def shifted_targets(self, targets, target_space, dtype):
    """The decoder's input: the target-space embedding, then the targets embedded, shifted right."""
    start = self.target_space_embedding[target_space].astype(dtype)
    embedded = self.language.embed(targets)
    return jnp.concatenate([start[:, None, :], embedded[:, :-1]], axis=1)

  def decode_step(self, encoded, encoded_mask, previous, position, target_space, *, max_length):
    """Logits [B, vocab] at target position `position` (traced), given the token at position - 1
    (`previous` [B], ignored at 0). Apply with mutable=["cache", "memory"]: the first call only
    creates the state (conv histories, the memory's keys and values); each later call advances it
    by one position, so calls must go 0, 1, 2, ... `max_length` sizes the timing-signal table.
    """
    start = self.target_space_embedding[target_space].astype(encoded.dtype)[:, None, :]
    x = jnp.where(position == 0, start, self.language.embed(previous[:, None]))
    timing = timing_signal_at(position, max_length, x.shape[-1])
    x = self.mixer(x, encoded, encoded_mask, train=False, timing=timing)
    mask = jnp.ones(x.shape[:2], jnp.float32)
    x, _ = self.decoder(x, mask, encoded, encoded_mask, train=False, timing=timing)
    return self.language.logits(x)[:, 0]

  def __call__(self, batch: Mapping[str, Any], signature: TaskSignature, *, train: bool):
    encoded, mask, enc_aux = self.encode(batch, signature, train=train)
    # Categorical targets have no decoder, so their batches need no target_space.
    target_space = batch["target_space"] if signature.target_modality == "language" else None
    logits, dec_aux = self.decode(
      encoded,
      mask,
      batch["targets"],
      target_space,
      signature,
      train=train,
      task_onehot=batch.get("task_onehot"),
    )
    aux = enc_aux + dec_aux + self.auxiliary_ctc(encoded, mask, batch["targets"], signature)
    return logits, aux.astype(jnp.float32)

  def auxiliary_ctc(self, encoded, mask, targets, signature):
    """The weighted audio CTC loss for audio inputs (config.model.audio_ctc_weight), else 0."""
    if self.config.audio_ctc_weight > 0 and signature.input_modality == "audio":
      return self.config.audio_ctc_weight * self.audio_ctc_loss(encoded, mask, targets)
    return jnp.zeros((), jnp.float32)

  def packed(self, batches: Mapping[str, Any], signatures: Mapping[str, TaskSignature], *, train):
    """({group: logits}, total aux loss): every group through one pass of the shared body.

    The groups' sequences are packed end to end (packing.py), so the step compiles one body
    instead of one per group. Each group's logits equal `self(batch, signature)`'s; only the MoE
    routes all groups' tokens together (its capacity and balance loss see one batch, not four).
    """
    names = list(batches)
    embedded = {n: self.embed_inputs(batches[n], signatures[n]) for n in names}
    inputs = Packing.of([embedded[n][0].shape[:2] for n in names])
    onehots = [batches[n].get("task_onehot") for n in names]
    x, aux = self.encoder(
      inputs.pack([embedded[n][0] for n in names]),
      inputs.pack([embedded[n][1] for n in names]),
      train=train,
      packing=inputs,
      tasks=_packed_tasks(inputs, onehots, [embedded[n][1] for n in names]),
    )
    encoded = dict(zip(names, inputs.unpack(x)))
    masks = {n: embedded[n][1] for n in names}
    logits = {}
    for n in names:
      aux += self.auxiliary_ctc(encoded[n], masks[n], batches[n]["targets"], signatures[n])
      if signatures[n].target_modality == "categorical":
        logits[n], _ = self.decode(encoded[n], masks[n], None, None, signatures[n], train=train)
    sequences = [n for n in names if signatures[n].target_modality == "language"]
    if sequences:
      targets = [batches[n]["targets"] for n in sequences]
      targets_packing = Packing.of([t.shape for t in targets])
      memory_packing = Packing.of([encoded[n].shape[:2] for n in sequences])
      packing = (targets_packing, memory_packing)
      shifted = [
        self.shifted_targets(batches[n]["targets"], batches[n]["target_space"], x.dtype)
        for n in sequences
      ]
      memory = memory_packing.pack([encoded[n] for n in sequences])
      memory_mask = memory_packing.pack([masks[n] for n in sequences])
      y = self.mixer(
        targets_packing.pack(shifted), memory, memory_mask, train=train, packing=packing
      )
      target_masks = [(t != 0).astype(jnp.float32) for t in targets]
      target_mask = targets_packing.pack(target_masks)
      onehots = [batches[n].get("task_onehot") for n in sequences]
      tasks = _packed_tasks(targets_packing, onehots, target_masks)
      y, dec_aux = self.decoder(
        y, target_mask, memory, memory_mask, train=train, packing=packing, tasks=tasks
      )
      aux += dec_aux
      # The softmax runs per group: a group's logits cut out of the packed [rows, tokens, vocab]
      # are a strided view, and XLA:CPU's loops over such views (the loss's exp and max) ran
      # about 10x slower than over a contiguous array (bench/profile_step.py).
      parts = targets_packing.unpack(y)
      logits.update({n: self.language.logits(part) for n, part in zip(sequences, parts)})
    return {n: logits[n] for n in names}, aux.astype(jnp.float32)

  def audio_ctc_loss(self, encoded, mask, targets):
    """CTC from the encoded audio straight to the transcript (config.model.audio_ctc_weight).

    Without it the decoder first learns a language model, and the encoder, getting no use out of
    the audio yet, learns to pass on little but its length (measured: identical held-out token
    accuracy with the audio zeroed). Aligning the encoder output with the words directly, as in
    joint CTC-attention ASR (Kim et al., 2017), gives the attention something to find.
    """
    logits = self.ctc_head(encoded.astype(jnp.float32))
    return losses.ctc_alignment_loss(logits, mask, targets)

  def all_tasks(
    self, batches: Mapping[str, Any], signatures: Mapping[str, TaskSignature], *, train
  ):
    """{task: (logits, aux_loss)} for one batch per task: the shared model applied to each."""
    return {name: self(batch, signatures[name], train=train) for name, batch in batches.items()}
