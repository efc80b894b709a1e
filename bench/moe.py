"""MoE layer speed vs an equal-FLOP dense FFN, and collective bytes per layer from compiled HLO.

  python bench/moe.py            # both tables (the HLO part runs in a subprocess on 8 CPU devices)
  python bench/moe.py --quick    # smaller sizes, for a smoke run
  python bench/moe.py --cores=2  # the speed table on two cores (default: one)
  python bench/moe.py --dtype=bfloat16 --ragged=xla,tokamax  # bf16; dropless rows per ragged_dot

Speed: forward+backward (value_and_grad of a loss that uses the output) of one MoE layer, k=2,
capacity factor 1.0 (expert slots = k x tokens, so the expert FLOPs equal the dense FFN's with
hidden = k x expert hidden), ÷ that dense FFN, measured in the same run. "capacity/one-hot" is
the same layer with GShard-style one-hot einsum dispatch and combine, kept as the alternative
that the gather dispatch replaced. "dropless/xla" runs the dropless layer's grouped matmuls through
`jax.lax.ragged_dot` (what models/moe.py uses); "dropless/tokamax" through `tokamax.ragged_dot`
(Pallas grouped-matmul kernels for GPU and TPU; on CPU it falls back to XLA), swapped in for the
run. --dtype sets the activation dtype of both layers (parameters stay float32). One core by
default: the dense layer's two large matmuls spread over several cores better than the MoE's many
small ops, so with more cores the ratio also measures that (give both where it matters).

Bytes: on a (data=2, expert=4) mesh, the bytes of every collective in the compiled HLO of one
MoE layer (per device, result shapes) ÷ the bytes that must move: the dispatched buffer out and
the combined buffer back, once each (twice more in the backward pass). Two expert layouts: the
default rule (experts split over `expert`, replicated over `data`: their gradients are summed over
`data`) and experts split over every device (`--config.mesh_rules.expert=data,expert`, GShard).
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
  "full": dict(tokens=8192, d=512, hidden=1024),
  "quick": dict(tokens=2048, d=128, hidden=256),
  "smoke": dict(tokens=512, d=32, hidden=64),  # bench/gpu.sh's check of itself on a CPU
}
DISPATCHES = ("capacity", "dropless")
# Bytes table: where the experts live, as the `expert` logical-axis rule (config.mesh_rules).
EXPERT_RULES = {"expert": "expert", "data,expert": "data,expert"}
DROPLESS_MAX_EXPERTS = 32  # XLA:CPU lowers ragged_dot to dense work over all experts


def ragged_dots() -> dict:
  """The grouped matmuls the dropless rows can run on: name -> fn(lhs [m, k], rhs [g, k, n],
  group_sizes [g]) -> [m, n], as `jax.lax.ragged_dot` (rows past sum(group_sizes) give zeros)."""
  import jax

  def tokamax_ragged_dot(lhs, rhs, group_sizes):
    import tokamax  # optional: pip install tokamax (bench/gpu.sh installs shipped wheels)
    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax reads its absl flags, else parses this argv
      flags.FLAGS.mark_as_parsed()
    return tokamax.ragged_dot(lhs, rhs, group_sizes)

  return {"xla": jax.lax.ragged_dot, "tokamax": tokamax_ragged_dot}


def ragged_ffn(ragged_dot):
  """models/moe.py's `_ffn_ragged` (the dropless experts' two grouped matmuls) on `ragged_dot`."""
  import jax

  def ffn(rows, group_sizes, w_in, w_out, model_axes):
    hidden = jax.nn.relu(ragged_dot(rows, w_in, group_sizes))
    out = ragged_dot(hidden, w_out, group_sizes)
    return jax.lax.psum(out, model_axes) if model_axes else out

  return ffn


def _one_hot_experts(x, routing, w_in, w_out, capacity, layout, dtype):
  """The GShard/flaxformer formulation: dispatch and combine as one-hot einsums over E x C."""
  import jax
  import jax.numpy as jnp

  from mm_jax.models import moe as moe_lib

  groups, size, d = x.shape
  num_experts = w_in.shape[0]
  slots = moe_lib.assign_slots(routing, num_experts, capacity)
  one_hot = jax.nn.one_hot(slots.position, num_experts * capacity, dtype=dtype)  # [G, S, k, EC]
  dispatch = jnp.sum(one_hot, axis=2).reshape(groups, size, num_experts, capacity)
  combine = jnp.einsum("gskn,gsk->gsn", one_hot, routing.gates * slots.kept)
  combine = combine.reshape(groups, size, num_experts, capacity)
  dispatched = jnp.einsum("gsec,gsd->gecd", dispatch, x.astype(dtype))
  hidden = jax.nn.relu(jnp.einsum("gecd,edh->gech", dispatched, w_in))
  out = jnp.einsum("gech,ehd->gecd", hidden, w_out)
  return jnp.einsum("gecd,gsec->gsd", out, combine), slots.kept


def pin_to_cores(cores: int) -> str:
  """Confines this process (and XLA's thread pools, sized from it) to `cores` CPUs; call before
  jax starts. `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`, used here before, did not: with it
  the dense step still ran in half the time it takes pinned to one core. (On a GPU machine,
  `bench/gpu.sh` gives the host every core.)

  One core (the default) makes the ratio a measure of work, not of how well each layer's ops
  spread over the cores, and keeps other load on the machine off the timed core.
  """
  if not hasattr(os, "sched_setaffinity"):
    return "all cores (this OS cannot pin)"
  allowed = sorted(os.sched_getaffinity(0))
  chosen = allowed[: max(1, min(cores, len(allowed)))]
  os.sched_setaffinity(0, chosen)
  return f"{len(chosen)} of {len(allowed)} cores"


def _time_against(baseline, candidate, repeats):
  """Best-of-n seconds of (baseline, candidate), alternating runs so load spikes hit both."""
  import jax

  for fn, args in (baseline, candidate):
    jax.block_until_ready(fn(*args))  # compile and warm up
  best = [float("inf"), float("inf")]
  for _ in range(repeats):
    for i, (fn, args) in enumerate((baseline, candidate)):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def _weight_touch(k, d, hidden, num_experts):
  """The memory floor at large E: read the expert weights and write their gradients, no math."""
  import jax
  import jax.numpy as jnp

  shapes = ((num_experts, d, hidden), (num_experts, hidden, d))
  weights = tuple(jnp.ones(s, jnp.float32) for s in shapes)
  loss = lambda w: sum(jnp.sum(v) for v in w)
  return jax.jit(jax.value_and_grad(loss)), (weights,)


def _experts_only(tokens, k, d, hidden, num_experts):
  """The experts' two batched matmuls alone (k x tokens / E rows each): no routing, no dispatch.

  Against the dense FFN (the same FLOPs), this separates what XLA's batched dot costs at small
  per-expert batches from what routing and dispatch add.
  """
  import jax
  import jax.numpy as jnp

  rows = k * tokens // num_experts
  key = jax.random.key(4)
  x = jax.random.normal(key, (num_experts, rows, d), jnp.float32)
  w_in = jax.random.normal(key, (num_experts, d, hidden), jnp.float32) * d**-0.5
  w_out = jax.random.normal(key, (num_experts, hidden, d), jnp.float32) * hidden**-0.5

  def loss(x, w_in, w_out):
    h = jax.nn.relu(jnp.einsum("end,edh->enh", x, w_in))
    return jnp.sum(jnp.square(jnp.einsum("enh,ehd->end", h, w_out)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), (x, w_in, w_out)


def speed_table(size: str, repeats: int, cores_used: str, dtype="float32", ragged=("xla",)):
  import jax
  import jax.numpy as jnp

  from mm_jax.models import ffn
  from mm_jax.models import moe as moe_lib

  s = SIZES[size]
  tokens, d, hidden, k = s["tokens"], s["d"], s["hidden"], 2
  batch, length = tokens // 256, 256
  x = jax.random.normal(jax.random.key(0), (batch, length, d), jnp.float32).astype(dtype)
  target = jax.random.normal(jax.random.key(1), x.shape, jnp.float32)

  def step_fn(layer, train):
    def loss(params, x):
      y, aux = layer.apply(
        {"params": params}, x, None, train=train, rngs={"gating": jax.random.key(2)}
      )
      return jnp.mean(jnp.square(y - target)) + aux

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  def params_of(layer):
    return jax.jit(lambda: layer.init(jax.random.key(3), x, None)["params"])()

  on_cpu = jax.devices()[0].platform == "cpu"
  dense = ffn.DenseFFN(hidden=k * hidden, dtype=jnp.dtype(dtype))
  baseline = (step_fn(dense, True), (params_of(dense), x))
  rows = []
  dots = ragged_dots()
  for num_experts in (8, 32, 128):
    for variant in ("capacity", "capacity/one-hot", *(f"dropless/{r}" for r in ragged)):
      dispatch = "dropless" if variant.startswith("dropless") else "capacity"
      layer = moe_lib.MoE(
        num_experts=num_experts,
        k=k,
        hidden=hidden,
        capacity_factor_train=1.0,
        group_size=1024,
        noisy_gating=True,
        dispatch=dispatch,
        dtype=jnp.dtype(dtype),
      )
      if dispatch == "dropless" and num_experts > DROPLESS_MAX_EXPERTS and on_cpu:
        rows.append(
          (num_experts, variant, None, None, "skipped: XLA:CPU ragged_dot is dense over E")
        )
        continue
      original = moe_lib.capacity_experts, moe_lib._ffn_ragged
      if variant == "capacity/one-hot":
        moe_lib.capacity_experts = _one_hot_experts
      if dispatch == "dropless":
        moe_lib._ffn_ragged = ragged_ffn(dots[variant.split("/")[1]])
      try:
        candidate = (step_fn(layer, True), (params_of(layer), x))
        dense_time, seconds = _time_against(baseline, candidate, repeats)
      except Exception as error:  # an optional kernel (tokamax) missing or refusing these shapes
        if variant != "dropless/tokamax":
          raise
        rows.append((num_experts, variant, None, None, f"failed: {error!r}"[:160]))
        continue
      finally:
        moe_lib.capacity_experts, moe_lib._ffn_ragged = original
      rows.append((num_experts, variant, seconds, dense_time, ""))
  for num_experts in (8, 32, 128):
    alone = _time_against(baseline, _experts_only(tokens, k, d, hidden, num_experts), repeats)
    rows.append((num_experts, "(experts only)", alone[1], alone[0], "the batched matmuls alone"))
  floor = _time_against(baseline, _weight_touch(k, d, hidden, 128), repeats)
  rows.append((128, "(weights only)", floor[1], floor[0], "read 2 x [E,d,h] + write their grads"))
  print(f"\nMoE forward+backward ÷ dense FFN (hidden {k * hidden}), {tokens} tokens, d={d}, ")
  platform = jax.devices()[0].platform
  print(f"expert hidden {hidden}, k={k}, capacity factor 1.0, noisy gating, {dtype}, 1 {platform}")
  cores = f"; {cores_used}" if platform == "cpu" else ""
  print(f"(dense timed alternately with each row, best of {repeats} each{cores})\n")
  print(f"{'E':>4} | {'dispatch':<17} | {'MoE ms':>8} | {'dense ms':>8} | {'÷ dense':>7} | note")
  print(f"{'-' * 4}-+-{'-' * 17}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 7}-+-----")
  for num_experts, variant, seconds, dense_time, note in rows:
    if seconds is None:
      print(f"{num_experts:>4} | {variant:<17} | {'-':>8} | {'-':>8} | {'-':>7} | {note}")
    else:
      ratio = seconds / dense_time
      print(
        f"{num_experts:>4} | {variant:<17} | {seconds * 1e3:8.1f} | {dense_time * 1e3:8.1f} | "
        f"{ratio:7.2f} | {note}"
      )
  touch = floor[1] / floor[0]
  print(
    f"\nAt E=128 the experts hold {128 // k}x the dense layer's weights (E / k): reading them and "
    f"writing their gradients\nalone takes {touch:.2f} of the dense step. Where that traffic "
    f"cannot hide behind the matmuls,\nan MoE of this size costs about "
    f"{1 + touch:.2f} x dense before any routing."
  )


# ----------------------------------------------------------------------------------------------
# Collective bytes from compiled HLO (needs 8 devices: run in a subprocess).

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of each collective's result (per device) in a compiled HLO module."""
  totals = dict.fromkeys(COLLECTIVES, 0)
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if not match:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
      count = int(np.prod([int(v) for v in dims.split(",") if v])) if dims else 1
      totals[match.group(2)] += count * DTYPE_BYTES.get(dtype, 4)
  return totals


def bytes_rows(size: str) -> list[dict]:
  import flax.linen as nn
  import jax
  import jax.experimental.mesh_utils  # noqa: F401
  import jax.numpy as jnp

  from mm_jax import sharding
  from mm_jax.models import moe as moe_lib

  s = SIZES[size]
  tokens, d, hidden, k = s["tokens"], s["d"], s["hidden"], 2
  batch, length = tokens // 256, 256
  mesh = sharding.make_mesh({"data": 2, "expert": 4, "model": 1})
  x = jax.ShapeDtypeStruct((batch, length, d), jnp.float32)
  x_sharding = sharding.batch_sharding(mesh, 3)
  rows = []
  for (experts_on, rule), dispatch in itertools.product(EXPERT_RULES.items(), DISPATCHES):
    layer = moe_lib.MoE(
      num_experts=8, k=k, hidden=hidden, capacity_factor_train=1.0, group_size=1024,
      dispatch=dispatch,
    )  # fmt: skip
    with sharding.activate(mesh, sharding.logical_rules({"expert": rule})):
      boxed = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros(x.shape), None)
      specs = nn.get_partition_spec(boxed["params"])
      param_shardings = nn.unbox(nn.logical_to_mesh_sharding(specs, mesh))
      params = nn.unbox(boxed["params"])

      def forward(params, x, layer=layer):
        return layer.apply(
          {"params": params}, x, None, train=True, rngs={"gating": jax.random.key(0)}
        )[0]

      def forward_backward(params, x, layer=layer):
        return jax.grad(lambda p, x: jnp.sum(forward(p, x)), argnums=(0, 1))(params, x)

      for name, fn, passes, out in (
        ("forward", forward, 1, x_sharding),
        ("fwd+bwd", forward_backward, 2, (param_shardings, x_sharding)),
      ):
        jitted = jax.jit(fn, in_shardings=(param_shardings, x_sharding), out_shardings=out)
        totals = collective_bytes(jitted.lower(params, x).compile().as_text())
        # Per device: its share of the dispatched buffer [G, E, C, d] out and back.
        group = moe_lib.routing_group_size(tokens, 1024, 8)
        slots = 8 * moe_lib.expert_capacity(group, k, 8, 1.0) * tokens // group
        needed = 2 * passes * slots * d * 4 // 8
        rows.append(
          dict(experts=experts_on, dispatch=dispatch, program=name, needed=needed, **totals)
        )
  return rows


def bytes_table(size: str):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, __file__, "--hlo-json", "--size", size],
    env=env, capture_output=True, text=True, check=True,
  )  # fmt: skip
  rows = json.loads(result.stdout.strip().splitlines()[-1])
  print("\nCollective bytes per MoE layer (per device, compiled HLO), mesh data=2 x expert=4, E=8")
  header = f"{'experts on':<12} | {'dispatch':<9} | {'program':<8} | "
  header += " | ".join(f"{c:>18}" for c in COLLECTIVES)
  print(header + f" | {'needed':>10} | {'all ÷ need':>10} | {'tokens ÷ need':>13}")
  print("-" * len(header) + "-+-" + "-" * 10 + "-+-" + "-" * 10 + "-+-" + "-" * 13)
  for row in rows:
    moved = sum(row[c] for c in COLLECTIVES)
    cells = " | ".join(f"{row[c]:>18,}" for c in COLLECTIVES)
    tokens = moved - row["all-reduce"]
    print(f"{row['experts']:<12} | {row['dispatch']:<9} | {row['program']:<8} | {cells} | "
          f"{row['needed']:>10,} | "
          f"{moved / row['needed']:10.2f} | {tokens / row['needed']:13.2f}")  # fmt: skip
  print("all-reduce is the gradient sum of weights replicated over the data axis (data")
  print("parallelism, not token movement): 'tokens ÷ need' leaves it out. 'expert' is the default")
  print("rule (experts replicated over data); 'data,expert' puts one expert on each device")
  print("(--config.mesh_rules.expert=data,expert), so expert gradients need no all-reduce.")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--size", default=None)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cores", type=int, default=1, help="CPUs the speed table may use")
  parser.add_argument("--hlo-json", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--only", choices=("speed", "bytes"), default=None)
  parser.add_argument("--dtype", default="float32", help="activation dtype of the speed table")
  parser.add_argument(
    "--ragged", default="xla", help="grouped matmuls of the dropless rows: xla, tokamax or both"
  )
  args = parser.parse_args()
  size = args.size or ("quick" if args.quick else "full")
  if args.hlo_json:
    print(json.dumps(bytes_rows(size)))
    return
  if args.only in (None, "speed"):
    ragged = tuple(r for r in args.ragged.split(",") if r)
    speed_table(size, args.repeats, pin_to_cores(args.cores), args.dtype, ragged)
  if args.only in (None, "bytes"):
    bytes_table(size)


if __name__ == "__main__":
  from bench import results

  if "--hlo-json" in sys.argv:  # the bytes table's own subprocess: its stdout is JSON
    main()
  else:
    with results.recorded("moe"):
      main()
