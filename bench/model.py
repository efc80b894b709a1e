"""Speed of the MultiModel on this machine: MFU of a training step, and depthwise-conv alternatives.

  python bench/model.py [--batch 128 --length 64 --repeats 3]

MFU = analytic model FLOPs (the multiply-adds any correct implementation must do) / step time /
float32 matmul peak, the peak measured in the same run. XLA's cost_analysis FLOPs are printed beside
it: on CPU they over-count depthwise convolutions, so they never serve as the numerator.
"""

import argparse
import math
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.multimodel import get_config  # noqa: E402
from mm_jax import run  # noqa: E402
from mm_jax.models import blocks  # noqa: E402
from mm_jax.models.modalities import audio_widths, sequence_grid  # noqa: E402
from mm_jax.models.multimodel import MultiModel, TaskSignature  # noqa: E402


def seconds(fn, *args, repeats: int) -> float:
  """Best wall time of `repeats` warm calls (the first call compiles and is not counted)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(n: int, repeats: int) -> float:
  """float32 FLOP/s of a warm jitted n x n matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  return 2 * n**3 / seconds(jax.jit(jnp.dot), a, b, repeats=repeats)


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


def train_step(model, signature):
  """value_and_grad of the label cross-entropy (+ aux), as the trainer's step computes it."""

  def loss(params, batch, rng):
    dropout, gating = jax.random.split(rng)
    logits, aux = model.apply(
      {"params": params}, batch, signature, train=True, rngs={"dropout": dropout, "gating": gating}
    )
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return -picked.mean() + aux

  return jax.jit(jax.value_and_grad(loss))


def body_row(config_arg: str, batch: int, length: int, repeats: int):
  m = get_config(config_arg).model
  model = MultiModel(run.model_config(m, jax.default_backend()))
  rng = np.random.default_rng(0)
  ids = lambda: rng.integers(3, m.vocab_size, (batch, length)).astype(np.int32)
  data = {"inputs": ids(), "targets": ids(), "target_space": np.zeros(batch, np.int32)}
  signature = TaskSignature("language", "language")
  params = jax.jit(lambda r: model.init({"params": r}, data, signature, train=False))(
    jax.random.key(0)
  )["params"]
  params = nn.unbox(params)
  step = train_step(model, signature)
  cost = step.lower(params, data, jax.random.key(1)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  t = seconds(step, params, data, jax.random.key(1), repeats=repeats)
  macs = forward_macs(m, batch, length, length)
  flops = train_flops(sum(macs.values()))
  return {
    "config": config_arg,
    "step_s": t,
    "model_gflop": flops / 1e9,
    "xla_gflop": cost["flops"] / 1e9,
    "flops": flops,
    "xla_flops": cost["flops"],
    "macs": macs,
  }


def depthwise_rows(shape, repeats: int):
  """Causal depthwise conv fwd+bwd per implementation, for the body's (kernel, dilation) pairs."""
  d = shape[-1]
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  cot = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  rows = []
  for kernel, dilation in ((3, 1), (15, 1), (15, 4)):
    taps = jax.random.normal(jax.random.key(2), (kernel, d), jnp.float32)
    pads = [blocks.conv_padding(kernel, dilation, "causal")]
    times = {}
    for name, impl in blocks.DEPTHWISE.items():
      loss = lambda x, w, impl=impl, dilation=dilation, pads=pads: jnp.vdot(
        impl(x, w, (dilation,), pads), cot
      )
      step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      times[name] = seconds(step, x, taps, repeats=repeats)
    rows.append((kernel, dilation, times))
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--peak_n", type=int, default=4096)
  parser.add_argument("--configs", default="default,no_moe;default")
  args = parser.parse_args()

  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}")
  peak = matmul_peak(args.peak_n, args.repeats)
  print(f"float32 {args.peak_n}^2 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")

  print(
    f"Training step (fwd+bwd), text->text, batch {args.batch}, length {args.length}/{args.length}"
  )
  header = (
    f"{'config':<16}{'step ms':>9}{'model GFLOP':>13}{'XLA GFLOP':>11}{'MFU':>7}{'XLA/peak':>10}"
  )
  print(header)
  rows = [body_row(c, args.batch, args.length, args.repeats) for c in args.configs.split(";")]
  # Other work shares these cores: re-measure the peak and keep the best, so MFU is not inflated.
  best_peak = max(peak, matmul_peak(args.peak_n, args.repeats))
  for r in rows:
    r["mfu"], r["xla_mfu"] = (f / r["step_s"] / best_peak for f in (r["flops"], r["xla_flops"]))
  print(f"(peak re-measured after the steps: {best_peak / 1e9:.1f} GFLOP/s, used below)")
  for r in rows:
    print(
      f"{r['config']:<16}{1e3 * r['step_s']:>9.1f}{r['model_gflop']:>13.2f}{r['xla_gflop']:>11.2f}"
      f"{100 * r['mfu']:>6.1f}%{100 * r['xla_mfu']:>9.1f}%"
    )
  total = sum(rows[0]["macs"].values())
  print(f"\nAnalytic multiply-adds of {rows[0]['config']}, share per component:")
  for name, macs in rows[0]["macs"].items():
    print(f"  {name:<20}{100 * macs / total:>6.1f}%")

  shape = (32, 256, 512)
  print(f"\nCausal depthwise conv fwd+bwd on {shape} (ms; ratio to 'shifted')")
  names = list(blocks.DEPTHWISE)
  print(f"{'kernel':>7}{'dilation':>9}" + "".join(f"{n:>18}" for n in names))
  for kernel, dilation, times in depthwise_rows(shape, args.repeats):
    cells = "".join(f"{1e3 * times[n]:>10.1f} ({times[n] / times['shifted']:.2f}x)" for n in names)
    print(f"{kernel:>7}{dilation:>9}{cells}")
  print(f"model uses: {blocks.DEPTHWISE_FORM}")


if __name__ == "__main__":
  from bench import results

  with results.recorded("model"):
    main()
