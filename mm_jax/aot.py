"""Ahead-of-time compilation of the real train step for a Cloud TPU slice, on a machine without one.

  python -m mm_jax.aot --config=configs/multimodel.py:paper --topology=v5p-64 [--num_slices=2]

libtpu (the `aot` extra) describes a slice's devices on this CPU machine; the trainer's own jitted
step, lowered with ShapeDtypeStructs that carry shardings on a mesh of those devices, compiles to
TPU code. No data is read: batch shapes come from the config. The report gives per-device memory
against the chip's HBM, every collective with its bytes, and the TPU compiler's estimate of the
step time with the MFU it implies (analytic model FLOPs, mm_jax/models/flops.py, over that time
and the chips' peak; bench/aot_calibration.py compares such estimates with published speeds). A
step that cannot fit fails here, at compile time, with one line and the numbers. On 2 CPU cores
`:paper` for v5p-64 takes about 10-12 minutes and 13-18 GB of host memory, more with two slices
(docs/performance.md has the report).
"""

import collections
import dataclasses
import os
import re
import sys

# The host stays a CPU; the TPU is only a compile target. Another jax process on this machine may
# hold libtpu's single-process lock, which a compile-only use does not need.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import mesh_utils, topologies  # noqa: E402
from jax.sharding import AxisType, Mesh  # noqa: E402

from mm_jax import (
  cli,  # noqa: E402
  sharding,  # noqa: E402
)
from mm_jax import run as run_lib  # noqa: E402
from mm_jax.errors import ConfigError  # noqa: E402
from mm_jax.models import flops  # noqa: E402

GIB = 1024**3
TFLOPS = 1e12


@dataclasses.dataclass(frozen=True)
class SliceType:
  """One Cloud TPU slice shape, as libtpu's topology description wants it (MaxText's table)."""

  topology: str
  chip_config: str  # "megacore": one device per chip (v4, v5p); "default": one core per chip
  chips_per_host: tuple[int, int, int]
  wrap: tuple[bool, bool, bool]
  hbm_bytes: int  # per device
  peak_flops: float  # per chip, bf16 matmuls (Cloud TPU's published figure)

  def peak_flops_for(self, dtype: str) -> float:
    """The peak an MFU divides by, per chip, for activations of `dtype` (config.model.dtype).

    float32 takes the bf16 peak: at JAX's default matmul precision a TPU multiplies float32
    operands in one bf16 pass of its matrix unit (accumulating in float32), and the compiler's
    estimate prices a float32 dot exactly as a bf16 one (bench/aot_calibration.py).
    """
    del dtype
    return self.peak_flops


_NO_WRAP = (False, False, False)
_V4_HBM, _V5E_HBM, _V5P_HBM, _V6E_HBM = 32 * GIB, 16 * GIB, 95 * GIB, 32 * GIB
_V4 = (_V4_HBM, 275 * TFLOPS)
_V5E = (_V5E_HBM, 197 * TFLOPS)
_V5P = (_V5P_HBM, 459 * TFLOPS)
_V6E = (_V6E_HBM, 918 * TFLOPS)
SLICES = {
  "v4-8": SliceType("v4:2x2x1", "megacore", (2, 2, 1), _NO_WRAP, *_V4),
  "v4-16": SliceType("v4:2x2x2", "megacore", (2, 2, 1), _NO_WRAP, *_V4),
  "v4-32": SliceType("v4:2x2x4", "megacore", (2, 2, 1), _NO_WRAP, *_V4),
  "v4-64": SliceType("v4:2x4x4", "megacore", (2, 2, 1), _NO_WRAP, *_V4),
  "v5e-4": SliceType("v5e:2x2", "default", (2, 2, 1), _NO_WRAP, *_V5E),
  "v5e-8": SliceType("v5e:2x4", "default", (2, 2, 1), _NO_WRAP, *_V5E),
  "v5e-16": SliceType("v5e:4x4", "default", (2, 2, 1), _NO_WRAP, *_V5E),
  "v5e-32": SliceType("v5e:4x8", "default", (2, 2, 1), _NO_WRAP, *_V5E),
  "v5e-64": SliceType("v5e:8x8", "default", (2, 2, 1), _NO_WRAP, *_V5E),
  "v5p-8": SliceType("v5:2x2x1", "megacore", (2, 2, 1), _NO_WRAP, *_V5P),
  "v5p-16": SliceType("v5:2x2x2", "megacore", (2, 2, 1), _NO_WRAP, *_V5P),
  "v5p-32": SliceType("v5:2x2x4", "megacore", (2, 2, 1), _NO_WRAP, *_V5P),
  "v5p-64": SliceType("v5:2x4x4", "megacore", (2, 2, 1), _NO_WRAP, *_V5P),
  "v5p-128": SliceType("v5:4x4x4", "megacore", (2, 2, 1), (True, True, True), *_V5P),
  "v6e-8": SliceType("v6e:2x4", "default", (2, 2, 1), _NO_WRAP, *_V6E),
  "v6e-16": SliceType("v6e:4x4", "default", (2, 2, 1), _NO_WRAP, *_V6E),
  "v6e-32": SliceType("v6e:4x8", "default", (2, 2, 1), _NO_WRAP, *_V6E),
  "v6e-64": SliceType("v6e:8x8", "default", (2, 2, 1), _NO_WRAP, *_V6E),
}


class DoesNotFit(RuntimeError):
  """XLA ran out of device memory while compiling: the message is one line with the numbers."""


def slice_devices(name: str, num_slices: int = 1) -> list:
  """The TPU devices of `num_slices` slices of type `name`, described by libtpu (no TPU needed)."""
  if name not in SLICES:
    raise ConfigError(f"--topology={name!r}: use one of {', '.join(SLICES)}")
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices}: use a positive integer")
  s = SLICES[name]
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", name.replace("v5e-", "v5litepod-"))
  topology = topologies.get_topology_desc(
    platform="tpu",
    topology_name=s.topology,
    chip_config_name=s.chip_config,
    chips_per_host_bounds=s.chips_per_host,
    num_slices=num_slices,
    wrap=s.wrap,
  )
  return list(topology.devices)


def slice_mesh(mesh_config, devices, num_slices: int) -> Mesh:
  """The config's mesh over the slices; with several, `data` is the axis that crosses them (DCN)."""
  sizes = sharding.mesh_shape(mesh_config, len(devices))
  shape = [sizes[a] for a in sharding.MESH_AXES]
  if num_slices == 1:
    array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    if sizes["data"] % num_slices:
      raise ConfigError(
        f"config.mesh.data={sizes['data']} does not split over {num_slices} slices: make it a "
        "multiple of --num_slices"
      )
    per_slice = [shape[0] // num_slices, *shape[1:]]
    dcn = [num_slices] + [1] * (len(shape) - 1)
    array = mesh_utils.create_hybrid_device_mesh(
      per_slice, dcn, devices, allow_split_physical_axes=True
    )
  return Mesh(array, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


@dataclasses.dataclass(frozen=True)
class Compiled:
  compiled: object
  run: run_lib.Run


def compile_train_step(config, devices, num_slices: int = 1) -> Compiled:
  """Lowers and compiles the run's jitted train step for `devices` (DoesNotFit when too big)."""
  mesh = slice_mesh(config.mesh, devices, num_slices)
  run = run_lib.build(config, mesh=mesh, check_data=False)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding.replicated(mesh))
  with run.activate():
    lowered = run.jit_step().lower(run.sharded_state_specs(), run.sharded_batch_specs(), rng)
  try:
    compiled = lowered.compile()
  except Exception as error:  # noqa: BLE001 - only out-of-memory is turned into a message
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise DoesNotFit(_out_of_memory_line(str(error))) from None
  return Compiled(compiled, run)


def _out_of_memory_line(message: str) -> str:
  """XLA's out-of-memory report, reduced to its lines with figures (used, capacity, excess)."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  figures = [line for line in lines if re.search(r"\d+(\.\d+)?\s*[KMGT]i?B?\b", line)]
  return " ".join((figures or lines)[:3])


# --- reports --------------------------------------------------------------------------------


def memory_per_device(compiled) -> dict[str, int]:
  """Bytes per device: arguments + outputs - donated aliases + temporaries + code."""
  stats = compiled.memory_analysis()
  out = {
    "arguments": stats.argument_size_in_bytes,
    "outputs": stats.output_size_in_bytes,
    "aliased": stats.alias_size_in_bytes,
    "temporaries": stats.temp_size_in_bytes,
    "code": stats.generated_code_size_in_bytes,
  }
  out["total"] = (
    out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
  )
  return out


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# `%name = <result type> op-name(` with op-name one of the collectives, maybe async (-start).
_INSTRUCTION = re.compile(
  r"=\s*(?P<type>.+?)\s+(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")


def _array_bytes(type_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    n = int(np.prod([int(x) for x in dims.split(",") if x])) if dims else 1
    sizes.append(n * _BYTES[dtype])
  return sizes


# A computation's header line (`[ENTRY] %name (params) -> result {`), the computations an
# instruction calls, and a while loop's trip count as XLA records it in its backend config.
_HEADER = re.compile(r"^(?P<entry>ENTRY\s+)?%?(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(
  r"\b(?P<kind>to_apply|calls|body|condition|true_computation|false_computation)=%?"
  r"(?P<name>[\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{(?P<names>[^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"\bcondition=%?(?P<name>[\w.\-]+)")
_INT_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((?P<value>\d+)\)")


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """{computation name: its instruction lines} and the entry's name (None: no headers)."""
  bodies, entry, current = {"": []}, None, ""
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header["name"]
      bodies[current] = []
      entry = current if header["entry"] else entry
    else:
      bodies[current].append(line)
  return bodies, entry


def executions_per_step(hlo_text: str) -> dict[str, int]:
  """How often each computation runs per run of the entry computation.

  A while loop's body runs its trip count times per run of its caller (the microbatch scan:
  config.train.microbatches): XLA:CPU records it in the loop's backend config, TPU code only in
  the loop's condition (`counter < N`). Every other callee, each branch of a conditional
  included, counts once per run of its caller.
  """
  return _executions(*_computations(hlo_text))


def _executions(bodies: dict[str, list[str]], entry: str | None) -> dict[str, int]:
  counts = collections.Counter({"": 1})

  def trip_count(line: str) -> int:
    """XLA's recorded count, else the N of a condition `counter < N` (scan counts 0, 1, ...)."""
    known = _TRIP_COUNT.search(line)
    if known:
      return int(known[1])
    condition = _CONDITION.search(line)
    lines = bodies.get(condition["name"], ()) if condition else ()
    limits = [int(m["value"]) for m in map(_INT_CONSTANT.search, lines) if m]
    compares_lt = any("compare(" in x and "direction=LT" in x for x in lines)
    return limits[0] if compares_lt and len(limits) == 1 else 1

  def visit(name: str, times: int):
    counts[name] += times
    for line in bodies.get(name, ()):
      for callee in _CALLEE.finditer(line):
        loop = callee["kind"] == "body"
        visit(callee["name"], times * (trip_count(line) if loop else 1))
      for branches in _BRANCHES.finditer(line):
        for branch in branches["names"].split(","):
          visit(branch.strip().lstrip("%"), times)

  if entry is not None:
    visit(entry, 1)
  return counts


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per collective kind: how many run per step and the bytes each device receives, summed.

  A collective inside a loop counts once per iteration. An async `-start` returns (operands,
  results, [scratch]); only its results count. Results are the second half of the arrays for
  all-gather/all-to-all/collective-permute starts.
  """
  totals = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
  bodies, entry = _computations(hlo_text)
  times = _executions(bodies, entry)
  for computation, lines in bodies.items():
    for line in lines:
      match = _INSTRUCTION.search(line)
      if match is None:
        continue
      sizes = _array_bytes(match["type"])
      if match["start"] and match["op"] != "all-reduce":
        sizes = [s for s in sizes if s > 8]  # drop u32[] scratch/sync scalars
        sizes = sizes[len(sizes) // 2 :] if len(sizes) > 1 else sizes
      totals[match["op"]]["count"] += times[computation]
      totals[match["op"]]["bytes"] += times[computation] * sum(sizes)
  return totals


def cost_analysis(compiled) -> dict[str, float]:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def speed(name: str, result: Compiled) -> dict[str, float]:
  """The TPU compiler's estimate of one step and the MFU it implies (chips = devices: one device
  per chip on every slice in SLICES).

  `step_s`: cost analysis's `optimal_seconds` of the per-device program; `model_flops`: the
  analytic FLOPs of the whole step's global batch (mm_jax/models/flops.py, backward = 2x
  forward); `xla_flops`: the compiler's own count summed over devices (it includes what the
  analytic count leaves out: the MoE's capacity padding, the optimizer, every elementwise op).

  Cost analysis counts a loop's body once: with config.train.microbatches = N it prices one
  microbatch's forward and backward plus the update (measured: N=2 halves both figures of the
  tiny step). Both are multiplied by N here, which counts the update N times: for N > 1 the
  time is an upper bound and the MFU a lower one.
  """
  run = result.run
  cost = cost_analysis(result.compiled)
  loops = run.config.train.microbatches
  step_s = float(cost["optimal_seconds"]) * loops
  macs = flops.step_macs(run.config.model, run.plan, run.batch_specs)
  model_flops = flops.train_flops(sum(macs.values()))
  peak = SLICES[name].peak_flops_for(run.config.model.dtype)
  return {
    "step_s": step_s,
    "model_flops": model_flops,
    "xla_flops": float(cost["flops"]) * run.mesh.size * loops,
    "peak_flops": peak,
    "mfu": model_flops / step_s / (run.mesh.size * peak) if step_s > 0 else float("nan"),
  }


def _flops_text(count: float) -> str:
  return f"{count / 1e12:.2f} TFLOP" if count >= 1e12 else f"{count / 1e9:.2f} GFLOP"


def report(name: str, num_slices: int, result: Compiled) -> str:
  hbm = SLICES[name].hbm_bytes
  memory = memory_per_device(result.compiled)
  run = result.run
  mesh = dict(run.mesh.shape)
  lines = [
    f"topology {name} x {num_slices} slice(s): {run.mesh.size} devices, mesh {mesh}",
    f"parameters {run.num_params:,}; task groups {[g.name for g in run.plan]}",
    "",
    f"{'memory per device':<20}{'GiB':>10}",
  ]
  for key, value in memory.items():
    lines.append(f"{key:<20}{value / GIB:>10.3f}")
  lines.append(f"{'HBM of the chip':<20}{hbm / GIB:>10.3f}")
  lines.append(f"{'fraction used':<20}{memory['total'] / hbm:>10.1%}")
  lines += ["", f"{'collective':<20}{'count':>8}{'MiB per device':>16}"]
  for op, c in collectives(result.compiled.as_text()).items():
    lines.append(f"{op:<20}{c['count']:>8}{c['bytes'] / 1024**2:>16.2f}")
  est = speed(name, result)
  dtype = run.config.model.dtype
  known = est["step_s"] > 0
  step = f"{1e3 * est['step_s']:>11.3f} ms" if known else f"{'unavailable':>14}"
  mfu = f"{est['mfu']:>14.1%}" if known else f"{'unavailable':>14}"
  loops = run.config.train.microbatches
  lines += [
    "",
    "speed",
    f"{'step time (estimate, TPU compiler)':<36}{step}",
    f"{'model FLOPs per step (analytic)':<36}{_flops_text(est['model_flops']):>14}",
    f"{'XLA FLOPs per step, all devices':<36}{_flops_text(est['xla_flops']):>14}",
    f"{'peak per chip (' + dtype + ')':<36}{est['peak_flops'] / TFLOPS:>7.0f} TFLOP/s",
    f"{'MFU (estimate, TPU compiler)':<36}{mfu}",
  ]
  if dtype == "float32":
    lines.append("  float32 at the default matmul precision: one bf16 pass, the bf16 peak")
  if not known:
    lines.append(f"  the compiler's estimate is {est['step_s']:.3g} s: not a time")
  if loops > 1:
    lines.append(
      f"  microbatches={loops}: the compiler prices one microbatch (its loop body) and the update;"
      f" time and XLA FLOPs are {loops} x its figures (an upper bound)"
    )
  return "\n".join(lines)


def main(argv, values=None):
  del argv
  from absl import flags

  values = values or flags.FLAGS
  config = cli.config_or_exit(values["config"], "aot")
  name, num_slices = values.topology, values.num_slices
  try:
    result = compile_train_step(config, slice_devices(name, num_slices), num_slices)
  except ConfigError as error:
    print(f"config error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
  except DoesNotFit as error:
    hbm = SLICES[name].hbm_bytes / GIB
    print(
      f"does not fit: the train step for {name} x {num_slices} needs more than the chip's "
      f"{hbm:.0f} GiB of HBM per device: {error}",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(3)
  print(report(name, num_slices, result), flush=True)


def define_flags(values):
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/multimodel.py:paper.", flag_values=values
  )
  flags.mark_flag_as_required("config", flag_values=values)
  flags.DEFINE_string(
    "topology", "v5p-64", f"TPU slice type: one of {', '.join(SLICES)}.", flag_values=values
  )
  flags.DEFINE_integer(
    "num_slices", 1, "Slices joined over the data-center network (DCN).", flag_values=values
  )


if __name__ == "__main__":
  cli.start(define_flags, main)
