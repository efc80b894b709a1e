"""How far the TPU compiler's step-time estimate (mm_jax/aot.py) can be trusted.

  python bench/aot_calibration.py [--out=bench/results/aot_calibration.md]

Each program is compiled the way mm_jax/aot.py compiles the train step: jax.jit with shardings on
a mesh of libtpu's description of a slice (aot.slice_devices), lower, compile, and
cost_analysis()["optimal_seconds"] read as the step time. The estimate stands beside a published
figure for the same kind of program on the same chip:

- bf16 and float32 matmuls, 8192x4096 @ 4096x4096, rows split over the chips of a v5p-8, v5e-8
  and v6e-8: the estimate as a fraction of the chip's peak bf16 FLOP/s (aot.SLICES).
- A Mixtral-8x7B-shaped MoE FFN block (d_model 4096, d_ff 14336, SwiGLU experts, 8 experts, top-2,
  bf16), forward and backward, expert-parallel over a v5p-8 (two experts per chip; routing groups
  of 1024 tokens split over the same chips, GShard's one-hot dispatch and combine, capacity
  factor 1.25; 8192 tokens per chip). Its estimated MFU (the experts' and router's multiply-adds,
  backward = 2x forward, as MaxText counts them) stands beside MaxText's published 52.6-54.9%
  MFU for Mixtral-8x7B training on v5p: that figure is the whole model's, measured (attention,
  embeddings and every collective included), not this block's.

Writes a markdown table (one header line: date, git commit, CPU) and prints it. About a minute
on 2 CPU cores: the programs are small.
"""

import argparse
import datetime
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# isort: off
from mm_jax import aot  # noqa: E402  (sets the CPU host and libtpu's environment before jax)
from mm_jax.models import moe  # noqa: E402

# isort: on
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

MAXTEXT_MIXTRAL_V5P_MFU = (0.526, 0.549)
NOTES = """\
- "estimate as": the program's FLOPs (the matmul's 2MNK; for the MoE block the router's and the
  experts' multiply-adds of the k chosen experts, backward = 2x forward) / the estimated time /
  (chips x peak bf16 FLOP/s). The published figure for a matmul is the chip's peak; for the MoE
  block, MaxText's measured MFU of the whole Mixtral-8x7B model (attention, embeddings, every
  collective), which the block alone need not match.
- "XLA FLOPs / analytic": the compiler's FLOP count over the analytic one (the MoE block's
  capacity padding, factor 1.25, and its one-hot dispatch and combine einsums).
- The estimate prices a float32 dot at default precision as a bf16 one (mm_jax/aot.py divides
  float32 configs by the bf16 peak).
- The estimate can be negative: the same MoE block routed with jax.lax.top_k (a TopK custom call
  that the SPMD partitioner replicates) gave -1937 ms for forward + backward, and 59 ms routed
  with mm_jax.models.moe.top_k (argmax rounds). mm_jax/aot.py reports a non-positive estimate as
  unavailable.\
"""


def _mesh(topology: str, axis: str) -> Mesh:
  return Mesh(np.array(aot.slice_devices(topology)), (axis,))


def _estimate(fn, *args) -> tuple[float, float, float]:
  """(optimal_seconds, XLA's FLOPs per device, compile seconds) of jit(fn) lowered on `args`."""
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  cost = aot.cost_analysis(compiled)
  return float(cost["optimal_seconds"]), float(cost["flops"]), time.perf_counter() - start


def matmul_row(topology: str, dtype, m: int = 8192, k: int = 4096, n: int = 4096) -> dict:
  mesh = _mesh(topology, "data")
  rows = NamedSharding(mesh, P("data", None))
  a = jax.ShapeDtypeStruct((m, k), dtype, sharding=rows)
  b = jax.ShapeDtypeStruct((k, n), dtype, sharding=NamedSharding(mesh, P()))
  step_s, xla_flops, compile_s = _estimate(jax.jit(jnp.dot, out_shardings=rows), a, b)
  chips = mesh.size
  peak = aot.SLICES[topology].peak_flops
  name = jnp.dtype(dtype).name
  return {
    "program": f"{name} matmul {m}x{k} @ {k}x{n}",
    "topology": f"{topology} ({chips} chips)",
    "estimate_ms": 1e3 * step_s,
    "estimate": f"{2 * m * k * n / step_s / (chips * peak):.1%} of peak",
    "published": f"peak {peak / aot.TFLOPS:.0f} TFLOP/s per chip (bf16)",
    "xla_over_model": xla_flops * chips / (2 * m * k * n),
    "compile_s": compile_s,
  }


def moe_block(x, router, w1, w3, w2, *, k: int, capacity: int, mesh: Mesh):
  """Mixtral's sparse FFN on routing groups x [G, S, d]: top-k softmax gates over the chosen
  experts, SwiGLU experts, GShard one-hot dispatch/combine with `capacity` slots per expert."""
  groups, size, _ = x.shape
  num_experts = router.shape[1]
  on_experts = lambda t: jax.lax.with_sharding_constraint(
    t, NamedSharding(mesh, P("expert", None, None, None))
  )
  on_groups = lambda t: jax.lax.with_sharding_constraint(
    t, NamedSharding(mesh, P("expert", None, None))
  )
  logits = jnp.einsum("gsd,de->gse", x, router).astype(jnp.float32)
  values, index = moe.top_k(logits, k)  # [G, S, k], split over the groups like the rest
  gates = jax.nn.softmax(values, axis=-1)
  # Slots: the k-th choices of all tokens queue after the (k-1)-th (GShard's priority).
  chosen = jax.nn.one_hot(index, num_experts, dtype=jnp.int32)  # [G, S, k, E]
  queue = chosen.transpose(0, 2, 1, 3).reshape(groups, k * size, num_experts)
  position = (jnp.cumsum(queue, axis=1) - 1) * queue - (1 - queue)  # -1 where not chosen
  slots = jax.nn.one_hot(position, capacity, dtype=x.dtype)  # [G, kS, E, C]; -1 or >= C: zeros
  slots = slots.reshape(groups, k, size, num_experts, capacity)
  dispatch = slots.sum(axis=1)  # [G, S, E, C]
  combine = jnp.einsum("gksec,gsk->gsec", slots, gates.astype(x.dtype))
  dispatched = on_experts(jnp.einsum("gsec,gsd->egcd", dispatch, x))
  hidden = jax.nn.silu(jnp.einsum("egcd,edf->egcf", dispatched, w1))
  hidden = hidden * jnp.einsum("egcd,edf->egcf", dispatched, w3)
  out = on_experts(jnp.einsum("egcf,efd->egcd", hidden, w2))
  return on_groups(jnp.einsum("egcd,gsec->gsd", out, combine))


def moe_row(
  topology: str = "v5p-8",
  tokens_per_chip: int = 8192,
  group_size: int = 1024,
  d: int = 4096,
  ffn: int = 14336,
  num_experts: int = 8,
  k: int = 2,
  capacity_factor: float = 1.25,
) -> dict:
  mesh = _mesh(topology, "expert")
  chips = mesh.size
  tokens = tokens_per_chip * chips
  capacity = int(np.ceil(group_size * k * capacity_factor / num_experts))
  spec = lambda shape, *axes: jax.ShapeDtypeStruct(
    shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*axes))
  )
  x = spec((tokens // group_size, group_size, d), "expert", None, None)
  router = spec((d, num_experts), None, None)
  w1 = spec((num_experts, d, ffn), "expert", None, None)
  w3 = spec((num_experts, d, ffn), "expert", None, None)
  w2 = spec((num_experts, ffn, d), "expert", None, None)

  def loss(x, router, w1, w3, w2):
    y = moe_block(x, router, w1, w3, w2, k=k, capacity=capacity, mesh=mesh)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
  step_s, xla_flops, compile_s = _estimate(step, x, router, w1, w3, w2)
  model_flops = 3 * 2 * tokens * (d * num_experts + k * 3 * d * ffn)
  peak = aot.SLICES[topology].peak_flops
  low, high = MAXTEXT_MIXTRAL_V5P_MFU
  return {
    "program": (
      f"Mixtral-8x7B MoE FFN fwd+bwd (d {d}, d_ff {ffn}, {num_experts} experts, top-{k}, bf16, "
      f"{tokens_per_chip} tokens/chip, expert-parallel)"
    ),
    "topology": f"{topology} ({chips} chips)",
    "estimate_ms": 1e3 * step_s,
    "estimate": f"MFU {model_flops / step_s / (chips * peak):.1%}",
    "published": f"MaxText Mixtral-8x7B on v5p: MFU {low:.1%}-{high:.1%} (whole model, measured)",
    "xla_over_model": xla_flops * chips / model_flops,
    "compile_s": compile_s,
  }


def header() -> str:
  commit = subprocess.run(
    ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
  ).stdout.strip()
  cpu = "unknown CPU"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
  when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
  return f"{when}, git {commit}, {cpu}, jax {jax.__version__}"


def table(rows: list[dict]) -> str:
  lines = [
    "| program | slice | estimate (TPU compiler) | estimate as | published figure | "
    "XLA FLOPs / analytic | compile s |",
    "|---|---|---:|---|---|---:|---:|",
  ]
  for r in rows:
    lines.append(
      f"| {r['program']} | {r['topology']} | {r['estimate_ms']:.3f} ms | {r['estimate']} | "
      f"{r['published']} | {r['xla_over_model']:.2f} | {r['compile_s']:.1f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "aot_calibration.md"))
  args = parser.parse_args()
  start = time.perf_counter()
  large = dict(m=32768, k=8192, n=8192)
  rows = [
    matmul_row("v5p-8", jnp.bfloat16),
    matmul_row("v5p-8", jnp.float32),
    matmul_row("v5p-8", jnp.bfloat16, **large),
    matmul_row("v5e-8", jnp.bfloat16),
    matmul_row("v5e-8", jnp.bfloat16, **large),
    matmul_row("v6e-8", jnp.bfloat16),
    matmul_row("v6e-8", jnp.bfloat16, **large),
    moe_row(),
  ]
  text = f"{header()}\n\n{table(rows)}\n\n{NOTES}\n"
  text += f"\nAll compiles took {time.perf_counter() - start:.0f} s on this machine.\n"
  with open(args.out, "w") as f:
    f.write(text)
  print(text, flush=True)


if __name__ == "__main__":
  main()
