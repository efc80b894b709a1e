"""Analytic FLOPs of the MultiModel: the multiply-adds any correct implementation must do.

The numerator of every MFU this project reports (bench/model.py, bench/train.py, mm_jax/aot.py).
XLA's cost-analysis FLOPs never serve as one: on CPU they over-count depthwise convolutions, and
they count the MoE's capacity padding. tests/test_bench_train.py checks the count against the
multiply-adds of the traced model.
"""

import math

from mm_jax.models.modalities import audio_widths, sequence_grid

# Analytic multiply-adds of one forward pass, per component. Convolutions count every kernel tap at
# every output position ("same" padding borders included, as the layers compute them) except along
# a grid axis of length 1 (a 3x3 kernel over an L x 1 sequence grid), where only the centre tap can
# meet a real value. Embedding lookups, norms, activations, pooling and the MoE's gathers are not
# multiply-adds; the MoE counts the k experts each token needs, not the capacity padding.

IMAGE_STEM_WIDTHS = (32, 64)  # modalities.ImageModality's two full-conv stems


def conv_step_macs(kernel: int, c_in: int, c_out: int) -> int:
  return kernel * c_in + c_in * c_out  # depthwise taps + pointwise projection, per position


def conv_block_macs(m) -> int:
  return sum(
    conv_step_macs(k, m.d, m.d) for group in (m.conv_group1, m.conv_group2) for k, _ in group
  )


def attention_macs(m, l_out: int, l_in: int) -> int:
  d = m.d
  queries = sum(conv_step_macs(k, d, d) for k, _ in m.attention_query_convs) + 2 * d * d  # q, out
  return l_out * (queries + 2 * l_in * d) + l_in * 2 * d * d  # scores, weighted sum; keys, values


def ffn_macs(m) -> int:
  if m.ffn == "dense":
    return 2 * m.d * m.dense_ffn_hidden
  return m.moe.k * 2 * m.d * m.moe.hidden + m.d * m.moe.num_experts * (
    2 if m.moe.noisy_gating else 1
  )


def grid_taps(kernel: tuple[int, ...], grid: tuple[int, ...]) -> int:
  return math.prod(k if n > 1 else 1 for k, n in zip(kernel, grid))


def strided_grid(grid: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(-(-n // s) for n, s in zip(grid, strides))


def xception_block_macs(grid, c_in: int, features: int, strides) -> tuple[int, tuple[int, ...]]:
  """Two separable 3x3 ConvSteps at the input grid, then a strided 1x1 skip at the output grid."""
  taps = grid_taps((3, 3), grid)
  out = strided_grid(grid, strides)
  steps = math.prod(grid) * (taps * c_in + c_in * features + taps * features + features**2)
  return steps + math.prod(out) * c_in * features, out


def image_net_macs(m, height: int, width: int, channels: int) -> tuple[int, int]:
  """Multiply-adds per image and the number of positions the body sees."""
  grid = strided_grid((height, width), (2, 2))
  stem0, stem1 = IMAGE_STEM_WIDTHS
  taps = grid_taps((3, 3), grid)
  macs = math.prod(grid) * taps * (channels * stem0 + stem0 * stem1)
  c_in = stem1
  for features in (min(128, m.d), min(256, m.d), m.d):
    block, grid = xception_block_macs(grid, c_in, features, (2, 2))
    macs, c_in = macs + block, features
  return macs, math.prod(grid)


def audio_net_macs(m, frames: int, bins: int) -> tuple[int, int]:
  """Multiply-adds per utterance (a full 3x3 stem, time-strided blocks, then the bins x channels
  -> d projection)."""
  widths = audio_widths(m.d, m.audio_blocks)
  grid, c_in = strided_grid((frames, bins), (m.audio_stem_stride, 1)), widths[0]
  macs = math.prod(grid) * grid_taps((3, 3), grid) * c_in
  for features in widths:
    block, grid = xception_block_macs(grid, c_in, features, (2, 1))
    macs, c_in = macs + block, features
  return macs + grid[0] * grid[1] * c_in * m.d, grid[0]


def categorical_head_macs(m, grid: tuple[int, int], num_classes: int) -> int:
  """The Xception exit flow of CategoricalModality, per example."""
  d, wide, wider = m.d, int(1.25 * m.d), int(2.5 * m.d)
  taps = grid_taps((3, 3), grid)
  out = strided_grid(grid, tuple(2 if n > 1 else 1 for n in grid))
  out_taps = grid_taps((3, 3), out)
  before_pool = math.prod(grid) * (taps * d + d * d + taps * d + d * wide)
  after_pool = math.prod(out) * (taps * d * wide + out_taps * wide + wide * 2 * d)
  after_pool += math.prod(out) * (out_taps * 2 * d + 2 * d * wider)
  return before_pool + after_pool + wider * num_classes


def encoder_macs(m, l_in: int) -> dict[str, int]:
  blocks = m.encoder_blocks_before_ffn + m.encoder_blocks_after_ffn
  return {"encoder convs": l_in * blocks * conv_block_macs(m), "encoder ffn": l_in * ffn_macs(m)}


def decoder_macs(m, l_in: int, l_out: int) -> dict[str, int]:
  """Mixer, decoder and softmax for `l_out` target positions attending to `l_in` positions."""
  layers = m.decoder_blocks_before_ffn + m.decoder_blocks_after_ffn
  attention = attention_macs(m, l_out, l_in) if m.use_attention else 0
  merge_kernel = m.conv_group1[0][0]
  return {
    "mixer": attention + l_out * conv_step_macs(merge_kernel, 2 * m.d, m.d),
    "decoder convs": l_out * layers * conv_block_macs(m),
    "decoder attention": layers * attention,
    "decoder ffn": l_out * ffn_macs(m),
    "softmax": l_out * m.d * m.vocab_size,
  }


def forward_macs(m, batch: int, l_in: int, l_out: int) -> dict[str, int]:
  """Text in, text out: the body alone (the language net's embedding lookup has no MACs)."""
  parts = {**encoder_macs(m, l_in), **decoder_macs(m, l_in, l_out)}
  return {name: batch * macs for name, macs in parts.items()}


def task_forward_macs(m, signature, inputs_shape, targets_shape) -> dict[str, int]:
  """One forward pass of a batch with these (padded) shapes, through its modality nets too."""
  batch = targets_shape[0]
  if signature.input_modality == "image":
    input_net, l_in = image_net_macs(m, *inputs_shape[1:])
  elif signature.input_modality == "audio":
    input_net, l_in = audio_net_macs(m, *inputs_shape[1:])
  else:
    input_net, l_in = 0, inputs_shape[1]
  parts = {"input net": input_net, **encoder_macs(m, l_in)}
  if signature.input_modality == "audio" and m.audio_ctc_weight > 0:
    # The projection, then optax's CTC: a one-hot gather of the label scores written as an einsum
    # [T, V] x [N, V], and a [N + 1] one-hot pick of the final score.
    labels = targets_shape[1]
    parts["ctc head"] = l_in * m.d * m.vocab_size + l_in * labels * m.vocab_size + labels + 1
  if signature.target_modality == "categorical":
    grid = sequence_grid(l_in, signature.input_modality)
    parts["classifier head"] = categorical_head_macs(m, grid, signature.num_classes)
  else:
    parts.update(decoder_macs(m, l_in, targets_shape[1]))
  return {name: batch * macs for name, macs in parts.items()}


def train_flops(macs: int) -> int:
  """A training step's FLOPs: forward + backward, the backward counted as twice the forward."""
  return 3 * 2 * macs


def _group_parts(model_config, plan, batch_shapes):
  """(group name, its forward multiply-adds by component) for every task group of one step."""
  for group in plan:
    shapes = batch_shapes[group.name]
    yield (
      group.name,
      task_forward_macs(
        model_config, group.signature, shapes["inputs"].shape, shapes["targets"].shape
      ),
    )


def step_macs(model_config, plan, batch_shapes) -> dict[str, int]:
  """Forward multiply-adds per task group of one step: `plan` (grouping.Group per group) and
  `batch_shapes` ({group: {key: array or ShapeDtypeStruct}}, the step's global batch)."""
  return {
    name: sum(parts.values()) for name, parts in _group_parts(model_config, plan, batch_shapes)
  }


def step_macs_by_component(model_config, plan, batch_shapes) -> dict[str, int]:
  """Forward multiply-adds of one step summed over its task groups by component ("encoder
  convs", "softmax", ...: the keys of task_forward_macs)."""
  out: dict[str, int] = {}
  for _, parts in _group_parts(model_config, plan, batch_shapes):
    for component, macs in parts.items():
      out[component] = out.get(component, 0) + macs
  return out
