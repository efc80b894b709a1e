"""bench/profile_step.py: kernels found in a real profile, and how they are charged."""

import jax
import jax.numpy as jnp
import numpy as np

from bench import profile_step  # noqa: E402


def test_a_profiled_function_is_charged_to_its_own_kernels():
  def loss(w, x):
    hidden = jax.nn.relu(x @ w)
    padded = jnp.pad(hidden, ((0, 0), (1, 1)))
    return jnp.sum(jnp.square(padded[:, 2:] - padded[:, :-2]))

  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(256, 256)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(512, 256)), jnp.float32)
  compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
  jax.block_until_ready(compiled(w, x))

  def run_steps(n):
    for _ in range(n):
      jax.block_until_ready(compiled(w, x))

  found = profile_step.profile(run_steps, compiled.as_text(), steps=2)
  lines = profile_step.instruction_lines(compiled.as_text())

  assert found, "no kernel of the program was found in its profile"
  names = [k.name for k in found]
  assert len(set(names)) == len(names)
  assert all(name in lines for name in names)
  assert [k.seconds for k in found] == sorted((k.seconds for k in found), reverse=True)
  assert all(k.seconds > 0 for k in found)
  # The matmuls (forward and backward) are in the profile, whichever library runs them.
  assert any("dot_general" in k.op_name for k in found)
  report = profile_step.tables(found, top=3)
  shares = [
    float(line.rsplit(None, 1)[1].rstrip("%")) for line in report.split("\n\n")[0].split("\n")[1:]
  ]
  assert abs(sum(shares) - 100.0) < 0.5
  # The part-by-kind table splits the same time: each kind's column adds up to its own share.
  cross = profile_step.shares_by_part_and_kind(found)
  total = sum(k.seconds for k in found)
  for label, _, _ in profile_step.KINDS:
    own = sum(k.seconds for k in found if k.kind == label) / total
    assert abs(sum(row[label] for row in cross.values()) - own) < 1e-9
  assert len(profile_step.KIND_COLUMNS) == len(profile_step.KINDS)
  assert "share of all kernel time, by part and kind" in report


def test_parts_and_directions_follow_the_op_name():
  part = profile_step.part
  audio = (
    "jit(train_step)/transpose(jvp(MultiModel.packed))/MultiModel.embed_inputs/audio/block0/"
    "step0/norm/mul"
  )
  assert part(audio) == ("audio net", "backward")
  decoder = "jit(train_step)/jvp(MultiModel.packed)/decoder/after_0/convs/group1_step1/conv/add"
  assert part(decoder) == ("decoder", "forward")
  softmax = (
    "jit(train_step)/jvp(MultiModel.packed)/MultiModel.decode/language.logits/softmax/dot_general"
  )
  assert part(softmax) == ("language net (out: softmax)", "forward")
  assert part("jit(train_step)/adam/mul") == (profile_step.OUTSIDE, "forward")
