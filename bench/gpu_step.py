"""MFU of the whole train step on batches saved as arrays: for a machine without TensorFlow.

  python bench/gpu_step.py --batches=DIR [--dtypes=bfloat16,float32] [--steps=10]
      [--peak_n=8192] [--peak_repeats=5]

DIR comes from `python -m mm_jax.data.arrays save` (run where TensorFlow is). The step is the one
mm_jax.train runs: the saved config rebuilt, `mm_jax.run.build` (all task groups, packing, MoE,
optimizer), `run.jit_step()`, batches placed by `sharding.global_batch`. Only the activation
dtype (config.model.dtype) changes between rows. Nothing here imports TensorFlow.

MFU = analytic FLOPs of one step (mm_jax/models/flops.py: every task group's modality nets, body,
decoder and softmax at the batch's padded shapes; backward = 2x forward, as bench/model.py and
bench/train.py count them) / the median step time (each step blocked until its outputs exist;
batches already on the device, cycled) / the matmul peak of the row's dtype, an n x n jitted
matmul measured in the same run before and after the steps (the higher is used). float32 runs at
XLA's default matmul precision, as the trainer does (TF32 on NVIDIA GPUs), and so does its peak.
"""

import argparse
import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import model as model_bench  # noqa: E402
from mm_jax import run as run_lib  # noqa: E402
from mm_jax import sharding  # noqa: E402
from mm_jax.data import arrays  # noqa: E402
from mm_jax.models.flops import step_macs, train_flops  # noqa: E402


def step_flops(config, run) -> int:
  return train_flops(sum(step_macs(config.model, run.plan, run.batch_specs).values()))


def time_steps(config, saved: arrays.ArrayBatches, steps: int) -> dict:
  """Builds the run for `config`, compiles its step and times `steps` steps after a warm one."""
  devices = jax.devices()[: saved.manifest["devices"]]
  start = time.perf_counter()
  run = run_lib.build(config, devices, check_data=False)
  saved.check(run)
  batches = [sharding.global_batch(b, run.mesh) for b in saved]
  state = run.init_state()
  rng = jax.random.key(config.seed)
  with run.activate():
    compiled = run.jit_step().lower(state, batches[0], rng).compile()
    compile_s = time.perf_counter() - start
    state, metrics = jax.block_until_ready(compiled(state, batches[0], rng))  # warm-up
    times = []
    for i in range(steps):
      start = time.perf_counter()
      state, metrics = jax.block_until_ready(compiled(state, batches[i % len(batches)], rng))
      times.append(time.perf_counter() - start)
  stats = devices[0].memory_stats() or {}
  return {
    "step_s": statistics.median(times),
    "compile_s": compile_s,
    "flops": step_flops(config, run),
    "loss": float(metrics["loss"]),
    "peak_bytes": stats.get("peak_bytes_in_use"),
    "examples": sum(b["task_index"].shape[0] for b in saved.step(0).values()),
    "groups": {g.name: run.batch_specs[g.name]["targets"].shape for g in run.plan},
    "params": run.num_params,
  }


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", required=True, help="a `mm_jax.data.arrays save` directory")
  parser.add_argument("--dtypes", default="bfloat16,float32", help="config.model.dtype per row")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--peak_n", type=int, default=8192)
  parser.add_argument("--peak_repeats", type=int, default=5)
  args = parser.parse_args(argv)

  saved = arrays.ArrayBatches(args.batches)
  config = saved.config()
  m = saved.manifest
  device = jax.devices()[0]
  print(f"jax {jax.__version__}, {jax.device_count()} x {device.platform} ({device.device_kind})")
  print(
    f"batches: {args.batches}, {len(saved)} saved steps of {m['config_file']}:{m['config_arg']}"
  )
  print(f"  overrides {m['overrides']}")
  dtypes = [d for d in args.dtypes.split(",") if d]
  peaks = {d: model_bench.matmul_peak(args.peak_n, args.peak_repeats, jnp.dtype(d)) for d in dtypes}
  rows = {}
  for dtype in dtypes:
    config.model.dtype = dtype
    rows[dtype] = time_steps(config, saved, args.steps)
  # Other work may share the device's host: re-measure and keep the best, so MFU is not inflated.
  for d in dtypes:
    peaks[d] = max(peaks[d], model_bench.matmul_peak(args.peak_n, args.peak_repeats, jnp.dtype(d)))

  first = rows[dtypes[0]]
  print(f"parameters {first['params']:,}; {first['examples']} examples a step; task groups:")
  for name, shape in first["groups"].items():
    print(f"  {name:<28} targets {shape}")
  print(f"\nWhole train step (median of {args.steps}; matmul peak {args.peak_n}^2, same run)")
  header = f"{'dtype':<10}{'step ms':>10}{'GFLOP':>10}{'peak TFLOP/s':>14}{'MFU':>8}"
  print(header + f"{'compile s':>11}{'peak GiB':>10}{'loss':>9}")
  for dtype, r in rows.items():
    mfu = r["flops"] / r["step_s"] / peaks[dtype]
    memory = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] else "-"
    print(
      f"{dtype:<10}{1e3 * r['step_s']:>10.1f}{r['flops'] / 1e9:>10.1f}{peaks[dtype] / 1e12:>14.2f}"
      f"{100 * mfu:>7.1f}%{r['compile_s']:>11.1f}{memory:>10}{r['loss']:>9.3f}"
    )
  return rows


if __name__ == "__main__":
  from bench import results

  with results.recorded("gpu_step"):
    main()
