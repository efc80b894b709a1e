"""The model's costliest narrow parts alone on one TPU chip, by the TPU compiler: per form.

  python bench/tpu_parts.py [--chip=v5p-8]

Compiles the forward and backward pass of two pieces of `:paper` at the batch one device of a
v5p-64 holds (mm_jax/aot.py: no TPU needed) and prints the compiler's estimated time and the MFU
it implies (analytic FLOPs, mm_jax/models/flops.py, backward = 2x forward):
- the audio net (1,600 frames x 80 mel bins, 8 utterances) in each kernels form and at audio stem
  strides 1 (`:paper`) and 2: with 16 and 32 channels and every bin kept, its LayerNorms and
  depthwise taps fill a TPU's 128 lanes an eighth or a quarter full;
- one encoder ConvBlock (d=1536, 40 sequences of 256 tokens) through the packed path :paper's
  body takes (packing.Packing: taps masked at sequence ends): four separable convolutions, each
  one d x d matmul among memory-bound passes (ReLU, mask, depthwise taps, LayerNorm), per form.
Each compile takes about a minute on one CPU core. Every figure is an estimate of the compiler's,
not a measurement on a TPU. Writes bench/results/tpu_parts.md.
"""

import argparse
import functools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import results  # noqa: E402
from configs import multimodel  # noqa: E402
from mm_jax import aot  # noqa: E402
from mm_jax.models import blocks, flops, modalities  # noqa: E402
from mm_jax.models.packing import Packing  # noqa: E402

AUDIO_BATCH, FRAMES = 8, 1600  # :paper's 256 utterances a step over 32 devices
BLOCK_BATCH, LENGTH = 40, 256  # :paper's 1,280 translation examples a step over 32 devices


def estimate(module, inputs, chip: str, input_gradient: bool, **kwargs) -> float:
  """The compiler's estimated seconds of d(sum of squared outputs)/d(parameters) (and d/d(first
  input) if `input_gradient`: the body's blocks pass one back, the modality nets do not), on one
  chip of `chip`; `kwargs` go to the module's call."""
  params = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *inputs)
  device = jax.sharding.SingleDeviceSharding(aot.slice_devices(chip)[0])
  placed = lambda tree: jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree
  )

  def loss(params, first, *rest):
    out = module.apply(params, first, *rest, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  wrt = (0, 1) if input_gradient else 0
  compiled = jax.jit(jax.grad(loss, wrt)).lower(placed(params), *placed(inputs)).compile()
  return float(aot.cost_analysis(compiled)["optimal_seconds"])


def audio_row(m, kernels: str, stride: int, chip: str) -> tuple[float, int]:
  net = modalities.AudioModality(m.d, m.audio_blocks, stride, jnp.bfloat16, kernels)
  frames = jax.ShapeDtypeStruct((AUDIO_BATCH, FRAMES, m.audio_num_mel_bins), jnp.float32)
  mask = jax.ShapeDtypeStruct((AUDIO_BATCH, FRAMES), jnp.float32)
  macs, _ = flops.audio_net_macs(m, FRAMES, m.audio_num_mel_bins)
  return estimate(net, (frames, mask), chip, input_gradient=False), AUDIO_BATCH * macs


def block_row(m, kernels: str, chip: str) -> tuple[float, int]:
  groups = (tuple(m.conv_group1), tuple(m.conv_group2))
  block = blocks.ConvBlock(groups, "same", 0.0, jnp.bfloat16, kernels)
  packing = Packing.of([(BLOCK_BATCH, LENGTH)])
  x = jax.ShapeDtypeStruct((packing.rows, packing.tokens, m.d), jnp.bfloat16)
  seconds = estimate(block, (x,), chip, input_gradient=True, packing=packing)
  return seconds, BLOCK_BATCH * LENGTH * flops.conv_block_macs(m)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--chip", default="v5p-8", help="a slice of mm_jax.aot.SLICES; one chip")
  args = parser.parse_args()
  peak = aot.SLICES[args.chip].peak_flops_for("bfloat16")
  base = multimodel.get_config("paper").model
  rows = []
  for kernels in blocks.KERNELS:
    for stride in (1, 2):
      m = base.copy_and_resolve_references()
      m.audio_stem_stride = stride
      print(f"audio net, {kernels}, stride {stride}", file=sys.stderr, flush=True)
      rows.append(
        (f"audio net, stem stride {stride}", kernels, *audio_row(m, kernels, stride, args.chip))
      )
  for kernels in blocks.KERNELS:
    rows.append(("encoder ConvBlock", kernels, *block_row(base, kernels, args.chip)))
  with results.recorded("tpu_parts"):
    print(
      f"one {args.chip} chip, bfloat16 activations, forward + backward; estimates of the TPU "
      "compiler (mm_jax.aot)\n"
    )
    print("| part | kernels | step (ms, est.) | analytic GFLOP | MFU (est.) |")
    print("|---|---|---:|---:|---:|")
    for part, kernels, seconds, macs in rows:
      model_flops = flops.train_flops(macs)
      print(
        f"| {part} | {kernels} | {1e3 * seconds:.2f} | {model_flops / 1e9:,.1f} "
        f"| {model_flops / seconds / peak:.1%} |"
      )


if __name__ == "__main__":
  start = time.perf_counter()
  main()
  print(f"\n{time.perf_counter() - start:.0f} s", file=sys.stderr)
