"""Speed of the MultiModel on this machine: MFU of a training step, and depthwise-conv alternatives.

  python bench/model.py [--batch 128 --length 64 --repeats 3] [--dtypes bfloat16,float32]

MFU = analytic model FLOPs (the multiply-adds any correct implementation must do) / step time /
the matmul peak of the row's activation dtype (float32 at XLA's default precision: TF32 on NVIDIA
GPUs), the peak measured in the same run. XLA's cost_analysis FLOPs are printed beside
it: on CPU they over-count depthwise convolutions, so they never serve as the numerator.
"""

import argparse
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
from mm_jax.models.flops import forward_macs, train_flops  # noqa: E402
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


def matmul_peak(n: int, repeats: int, dtype=jnp.float32) -> float:
  """FLOP/s of a warm jitted n x n matmul in `dtype` (float32 at XLA's default precision)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  return 2 * n**3 / seconds(jax.jit(jnp.dot), a, b, repeats=repeats)


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


def body_row(config_arg: str, batch: int, length: int, repeats: int, dtype: str | None = None):
  """`dtype` replaces config.model.dtype (None: the config's, "auto" decided for this backend)."""
  m = get_config(config_arg).model
  if dtype is not None:
    m.dtype = dtype
  resolved = run.model_config(m, jax.default_backend())
  model = MultiModel(resolved)
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
    "dtype": resolved.dtype,
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
  parser.add_argument(
    "--dtypes",
    default="",
    help="config.model.dtype per row, e.g. bfloat16,float32 (default: config's)",
  )
  parser.add_argument("--skip_depthwise", action="store_true", help="no depthwise-conv table")
  args = parser.parse_args()

  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}")
  dtypes = [d for d in args.dtypes.split(",") if d] or [None]
  rows = []
  for config_arg in args.configs.split(";"):
    rows += [body_row(config_arg, args.batch, args.length, args.repeats, d) for d in dtypes]
  # Each row against the matmul peak of its own dtype, measured after the steps and again (the
  # higher is used: other work may share these cores, and MFU must not be inflated).
  peaks = {}
  for dtype in sorted({r["dtype"] for r in rows}):
    peaks[dtype] = max(matmul_peak(args.peak_n, args.repeats, jnp.dtype(dtype)) for _ in range(2))
    print(f"{dtype} {args.peak_n}^2 matmul peak: {peaks[dtype] / 1e9:.1f} GFLOP/s")
  print()

  print(
    f"Training step (fwd+bwd), text->text, batch {args.batch}, length {args.length}/{args.length}"
  )
  header = f"{'config':<16}{'dtype':<10}{'step ms':>9}{'model GFLOP':>13}{'XLA GFLOP':>11}"
  print(header + f"{'MFU':>7}{'XLA/peak':>10}")
  for r in rows:
    peak = peaks[r["dtype"]]
    r["mfu"], r["xla_mfu"] = (f / r["step_s"] / peak for f in (r["flops"], r["xla_flops"]))
    print(
      f"{r['config']:<16}{r['dtype']:<10}{1e3 * r['step_s']:>9.1f}{r['model_gflop']:>13.2f}"
      f"{r['xla_gflop']:>11.2f}{100 * r['mfu']:>6.1f}%{100 * r['xla_mfu']:>9.1f}%"
    )
  total = sum(rows[0]["macs"].values())
  print(f"\nAnalytic multiply-adds of {rows[0]['config']}, share per component:")
  for name, macs in rows[0]["macs"].items():
    print(f"  {name:<20}{100 * macs / total:>6.1f}%")

  if args.skip_depthwise:
    return
  shape = (32, 256, 512)
  print(f"\nCausal depthwise conv fwd+bwd on {shape} (ms; ratio to 'shifted')")
  names = list(blocks.DEPTHWISE)
  print(f"{'kernel':>7}{'dilation':>9}" + "".join(f"{n:>18}" for n in names))
  for kernel, dilation, times in depthwise_rows(shape, args.repeats):
    cells = "".join(f"{1e3 * times[n]:>10.1f} ({times[n] / times['shifted']:.2f}x)" for n in names)
    print(f"{kernel:>7}{dilation:>9}{cells}")
  uses = {k: blocks.depthwise_form(k) for k in blocks.KERNELS}
  print(f"model uses at {shape[-1]} channels: {uses}")


if __name__ == "__main__":
  from bench import results

  with results.recorded("model"):
    main()
