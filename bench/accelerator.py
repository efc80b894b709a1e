"""`:paper` on Cloud TPU slices, every accelerator choice side by side, by the TPU compiler.

  python bench/accelerator.py [--proxy] [--topologies=v5p-64,v6e-32] [--rows=all]
      [--out=accelerator_rows] [--compiled_only]

Each row compiles the real train step ahead of time (mm_jax/aot.py, no TPU needed) for one slice
with one combination of activation dtype (float32 | bfloat16), parameter layout (replicated over
`data` | fsdp: parameters and Adam moments split over `data`) and remat (none | block), and reports
per-device memory against the chip's HBM, the compiler's estimated step time and the MFU it
implies, and the collectives' bytes per device per step. Every figure is an estimate of the
compiler's, not a measurement on a TPU.

A full `:paper` compile takes about 10 minutes and 13 GB of host memory on 2 CPU cores, so
`--proxy` compiles a stand-in with the same shapes in every layer (width, heads, experts, expert
width, batch per device, sequence lengths, every task) but one block where `:paper` has several;
rows are chosen on the proxy and the chosen ones compiled in full (`--rows=NAME,...`). Each row
compiles in a child process of its own, so one row's host memory is not another's, and keeps
its figures and HLO in --out: a later call tables them without compiling again, and
`--compiled_only` tables what --out holds for the rows asked (the rest listed as not compiled).

Writes bench/results/accelerator.md (or accelerator_proxy.md) with one header line.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import results  # noqa: E402

GIB = 1024**3
MIB = 1024**2
DTYPES = {"f32": "float32", "bf16": "bfloat16"}
LAYOUTS = ("replicated", "fsdp")
REMATS = ("none", "block")
ROWS = [f"{d},{layout},{r}" for d in DTYPES for layout in LAYOUTS for r in REMATS]
BLOCK_FIELDS = (
  "encoder_blocks_before_ffn",
  "encoder_blocks_after_ffn",
  "decoder_blocks_before_ffn",
  "decoder_blocks_after_ffn",
)


def row_config(row: str, proxy: bool):
  """The `:paper` config of one row, e.g. "bf16,fsdp,block"; more parts are overrides of
  config.model, e.g. "bf16,fsdp,block,kernels=cpu" or "...,moe.group_size=1024", or of
  config.train when they start with "train.", e.g. "...,train.microbatches=2"."""
  from configs import multimodel

  dtype, layout, remat, *overrides = row.split(",")
  config = multimodel.get_config(f"paper,{layout}")
  config.model.dtype = DTYPES[dtype]
  config.model.remat = remat
  for override in overrides:
    path, value = override.split("=", 1)
    *parents, field = path.split(".")
    node = config.model
    if parents[:1] == ["train"]:
      node, parents = config.train, parents[1:]
    for parent in parents:
      node = node[parent]
    node[field] = type(node[field])(value)
  if proxy:
    for field in BLOCK_FIELDS:
      config.model[field] = 1
  return config


def compile_row(topology: str, row: str, proxy: bool, num_slices: int, hlo_path: str) -> dict:
  """Compiles one row in this process: its figures as a dict (JSON-able)."""
  from mm_jax import aot, run

  config = row_config(row, proxy)
  start = time.perf_counter()
  try:
    result = aot.compile_train_step(config, aot.slice_devices(topology, num_slices), num_slices)
  except aot.DoesNotFit as error:
    return {"fits": False, "why": str(error), "compile_s": time.perf_counter() - start}
  seconds = time.perf_counter() - start
  print(f"{topology} {row}: compiled in {seconds:.0f} s", file=sys.stderr, flush=True)
  text = result.compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w", encoding="utf-8") as f:
      f.write(text)
  memory = aot.memory_per_device(result.compiled)
  speed = aot.speed(topology, result)
  return {
    "fits": memory["total"] <= aot.SLICES[topology].hbm_bytes,
    "mesh": dict(result.run.mesh.shape),
    "params": result.run.num_params,
    "kernels": run.model_config(result.run.config.model, "tpu").kernels,
    "memory": memory,
    "hbm": aot.SLICES[topology].hbm_bytes,
    "step_s": speed["step_s"],
    "mfu": speed["mfu"],
    "xla_over_model_flops": speed["xla_flops"] / speed["model_flops"],
    "collectives": aot.collectives(text),
    "compile_s": seconds,
  }


def _child(topology: str, row: str, proxy: bool, num_slices: int, hlo_path: str) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--child", row, "--topologies", topology]
  command += ["--num_slices", str(num_slices)] + (["--proxy"] if proxy else [])
  command += ["--hlo", hlo_path] if hlo_path else []
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
  lines = done.stdout.strip().splitlines()
  if done.returncode or not lines:
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"fits": False, "why": f"compile failed: {tail}", "compile_s": float("nan")}
  return json.loads(lines[-1])


def _row_name(args, topology: str, row: str) -> str:
  return f"{'proxy_' if args.proxy else ''}{topology}x{args.num_slices}_{row.replace(',', '_')}"


def _row_figures(args, topology: str, row: str) -> dict | None:
  """One row's figures: from --out when an earlier call compiled it, else compiled now and kept
  there (with its HLO text), so an interrupted sweep continues where it stopped; None for a row
  not compiled yet under --compiled_only."""
  name = _row_name(args, topology, row)
  path = os.path.join(args.out, name + ".json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  if args.compiled_only:
    return None
  os.makedirs(args.out, exist_ok=True)
  hlo = os.path.join(args.out, name + ".hlo")
  figures = _child(topology, row, args.proxy, args.num_slices, hlo)
  if "memory" in figures or "compile failed" not in figures["why"]:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(figures, f)
  print(f"  {name}: {json.dumps(figures)[:300]}", file=sys.stderr, flush=True)
  return figures


_DEFINITION = re.compile(
  r"\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<type>.+?) (?P<op>[a-z][\w\-]*)\((?P<rest>.*)"
)
_SOURCES = ("recv-done", "parameter", "all-reduce", "all-reduce-done", "reduce-scatter")


def all_gather_sources(hlo_text: str, depth: int = 12) -> dict[str, dict[str, int]]:
  """What each all-gather of a compiled program gathers, by the nearest op upstream of it that
  is a DCN receive (the cross-slice sum of XLA's multi-slice all-reduce), a parameter (a split
  weight gathered for use: fsdp) or another collective: {source: {"count", "bytes"}}."""
  from mm_jax import aot

  defs = {}
  for line in hlo_text.splitlines():
    m = _DEFINITION.match(line)
    if m:
      operands = m["rest"].split(", kind=")[0].split("), channel")[0]
      defs[m["name"]] = (m["op"], m["type"], re.findall(r"%([\w.\-]+)", operands))
  out = {}
  for op, type_text, operands in defs.values():
    if op not in ("all-gather", "all-gather-start"):
      continue
    seen, frontier, source = set(), list(operands), "other"
    for _ in range(depth):
      found = [defs[o][0] for o in frontier if o in defs and defs[o][0] in _SOURCES]
      if found:
        source = found[0]
        break
      seen.update(frontier)
      frontier = [x for o in frontier if o in defs for x in defs[o][2] if x not in seen]
    entry = out.setdefault(source, {"count": 0, "bytes": 0})
    entry["count"] += 1
    sizes = aot._array_bytes(type_text)
    entry["bytes"] += sizes[-1] if sizes else 0
  return out


_CYCLES = re.compile(r'"estimated_cycles":"?(\d+)')
_OP_NAME = re.compile(r'op_name="([^"]+)"')


def time_by_part(hlo_text: str, depth: int = 3) -> dict[str, float]:
  """The compiler's estimated cycles of a compiled TPU program, as shares by the part of the
  model each instruction came from (the first `depth` module names of its op_name; a loop's
  body counted once per iteration)."""
  from mm_jax import aot

  bodies, entry = aot._computations(hlo_text)
  runs = aot._executions(bodies, entry)
  parts: dict[str, float] = {}
  for computation, lines in bodies.items():
    for line in lines:
      cycles = _CYCLES.search(line)
      if not cycles or not runs.get(computation):
        continue
      name = _OP_NAME.search(line)
      path = [p for p in re.split(r"[/()]", name[1] if name else "") if p][:-1]  # no primitive
      start = next((i for i, p in enumerate(path) if p.startswith("MultiModel")), len(path))
      modules = [p.removeprefix("MultiModel.") for p in path[start:] if p != "MultiModel.packed"]
      part = "/".join(modules[:depth]) or "the update and the rest"
      parts[part] = parts.get(part, 0.0) + int(cycles[1]) * runs[computation]
  total = sum(parts.values()) or 1.0
  return dict(sorted(((k, v / total) for k, v in parts.items()), key=lambda kv: -kv[1]))


# The analytic FLOPs' components (mm_jax/models/flops.py) by the module path the compiler's
# instructions carry (time_by_part at depth 3); the first match wins, REST takes the others.
COMPONENTS = (
  ("embed_inputs/", "input net"),
  ("encoder/ffn", "encoder ffn"),
  ("encoder/", "encoder convs"),
  ("decoder/ffn", "decoder ffn"),
  ("decoder/", "decoder attention", "/attention"),
  ("decoder/", "decoder convs"),
  ("mixer/", "mixer"),
  ("language.logits", "softmax"),
  ("decode/categorical", "classifier head"),
)
REST = "the update and the rest"


def component_of(part: str) -> str:
  for prefix, component, *inside in COMPONENTS:
    if part.startswith(prefix) and all(s in part for s in inside):
      return component
  return REST


def macs_by_component(config, topology: str) -> dict[str, int]:
  """The analytic forward multiply-adds of one global batch by component (no compile)."""
  from mm_jax import aot
  from mm_jax import run as run_lib
  from mm_jax.models import flops

  mesh = aot.slice_mesh(config.mesh, aot.slice_devices(topology), 1)
  run = run_lib.build(config, mesh=mesh, check_data=False)
  return flops.step_macs_by_component(run.model.config, run.plan, run.batch_specs)


def components_table(hlo_text: str, macs: dict[str, int], mfu: float) -> list[str]:
  """Each component's share of the estimated time and of the analytic FLOPs, and the MFU it
  runs at (the step's MFU x FLOPs share / time share)."""
  time: dict[str, float] = {}
  for part, share in time_by_part(hlo_text, depth=3).items():
    component = component_of(part)
    time[component] = time.get(component, 0.0) + share
  total = sum(macs.values())
  lines = [
    "| component | share of est. time | share of model FLOPs | its MFU (est.) |",
    "|---|---:|---:|---:|",
  ]
  for component, share in sorted(time.items(), key=lambda kv: -kv[1]):
    flops_share = macs.get(component, 0) / total
    own = f"{mfu * flops_share / share:.0%}" if flops_share and share else "-"
    lines.append(f"| {component} | {share:.1%} | {flops_share:.1%} | {own} |")
  return lines


def table(topology: str, figures: dict[str, dict]) -> list[str]:
  head = (
    "| row (dtype, layout, remat) | GiB per device | % of HBM | step (ms, est.) | MFU (est.) "
    "| XLA / model FLOPs | all-gather MiB | all-reduce MiB | reduce-scatter MiB | all-to-all MiB |"
  )
  lines = [f"{topology}:", "", head, "|" + "---|" * 10]
  for row, f in figures.items():
    if "memory" not in f:
      lines.append(f"| {row} | {f['why']} |" + " |" * 8)
      continue
    c = f["collectives"]
    step = f"{1e3 * f['step_s']:.1f}" if f["step_s"] > 0 else "unavailable"
    mfu = f"{f['mfu']:.1%}" if f["step_s"] > 0 else "unavailable"
    ratio = f"{f['xla_over_model_flops']:.2f}" if "xla_over_model_flops" in f else "not kept"
    lines.append(
      f"| {row} | {f['memory']['total'] / GIB:.2f} | {f['memory']['total'] / f['hbm']:.1%} "
      f"| {step} | {mfu} | {ratio} "
      f"| {c['all-gather']['bytes'] / MIB:,.0f} "
      f"| {c['all-reduce']['bytes'] / MIB:,.0f} | {c['reduce-scatter']['bytes'] / MIB:,.0f} "
      f"| {c['all-to-all']['bytes'] / MIB:,.0f} |"
    )
  return lines


def _print_components(args, topology: str, figures: dict[str, dict]):
  """Where the estimated time of the topology's fastest fitting row goes, from its kept HLO."""
  fitting = {row: f for row, f in figures.items() if f.get("fits") and f.get("step_s", 0) > 0}
  if not fitting:
    return
  row = min(fitting, key=lambda r: fitting[r]["step_s"])
  name = _row_name(args, topology, row)
  hlo = os.path.join(args.out, name + ".hlo")
  if not os.path.exists(hlo):
    return
  with open(hlo, encoding="utf-8") as f:
    text = f.read()
  macs = macs_by_component(row_config(row, args.proxy), topology)
  print(f"where the estimated time of {row} goes, by component of the analytic FLOPs:\n")
  print("\n".join(components_table(text, macs, fitting[row]["mfu"])))
  print(
    "\nShares of time come from the compiler's estimated cycles per instruction, attributed by\n"
    "op name; a component's MFU above 100% marks instructions it estimates faster than their\n"
    "FLOPs at peak (the output softmax's backward), not a real speed.\n",
    flush=True,
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topologies", default="v5p-64,v6e-32")
  parser.add_argument("--rows", default="all", help='"all" or rows like "bf16,fsdp,block;..."')
  parser.add_argument("--proxy", action="store_true", help="one block per stack (see above)")
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--out", default="accelerator_rows", help="each row's figures and HLO")
  parser.add_argument(
    "--compiled_only", action="store_true", help="table the rows in --out; compile nothing"
  )
  parser.add_argument("--name", default="", help="results file name (default by --proxy)")
  parser.add_argument("--explain_all_gathers", default="", help="an HLO file: what they gather")
  parser.add_argument("--where", default="", help="an HLO file: estimated time by model part")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--hlo", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.explain_all_gathers:
    with open(args.explain_all_gathers, encoding="utf-8") as f:
      for source, c in all_gather_sources(f.read()).items():
        print(f"after {source:<16}{c['count']:>6} all-gathers {c['bytes'] / MIB:>12,.1f} MiB")
    return
  if args.where:
    with open(args.where, encoding="utf-8") as f:
      for part, share in list(time_by_part(f.read()).items())[:12]:
        print(f"{share:>7.1%}  {part}")
    return
  if args.child:
    figures = compile_row(args.topologies, args.child, args.proxy, args.num_slices, args.hlo)
    print(json.dumps(figures))
    return
  rows = ROWS if args.rows == "all" else args.rows.split(";")
  name = args.name or ("accelerator_proxy" if args.proxy else "accelerator")
  what = "proxy (one block per stack)" if args.proxy else "`:paper`"
  with results.recorded(name):
    print(f"{what}, {args.num_slices} slice(s); estimates of the TPU compiler (mm_jax.aot)\n")
    for topology in args.topologies.split(","):
      figures = {row: _row_figures(args, topology, row) for row in rows}
      missing = [row for row, f in figures.items() if f is None]
      figures = {row: f for row, f in figures.items() if f is not None}
      if not figures:
        continue
      first = next((f for f in figures.values() if "mesh" in f), None)
      if first:
        print(f"mesh {first['mesh']}, {first['params']:,} parameters\n")
      print("\n".join(table(topology, figures)) + "\n", flush=True)
      if missing:
        print(f"not compiled on {topology}: {'; '.join(missing)}\n")
      _print_components(args, topology, figures)


if __name__ == "__main__":
  main()
