"""The analytic FLOP count (mm_jax/models/flops.py), the MFU numerator, against the model.

The reference is independent of the formulas: trace the real model's forward pass and add up the
multiply-adds of every dot_general and convolution in the jaxpr. Depthwise convs are routed
through XLA's grouped convolution for the trace (the shifted implementation is elementwise
multiplies, invisible to this count); the dense FFN stands in for the MoE, whose capacity
padding the analytic count deliberately leaves out.
"""

import math

import jax
import numpy as np
import pytest

from configs.multimodel import get_config  # noqa: E402
from mm_jax import run  # noqa: E402
from mm_jax.models import blocks, flops  # noqa: E402
from mm_jax.models.multimodel import MultiModel, TaskSignature  # noqa: E402


def _eqn_macs(eqn) -> int:
  out = math.prod(eqn.outvars[0].aval.shape)
  if eqn.primitive.name == "dot_general":
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return out * math.prod(lhs[i] for i in lhs_contract)
  if eqn.primitive.name == "conv_general_dilated":
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, *spatial)
    rhs = eqn.invars[1].aval.shape
    return out * math.prod(rhs[i] for i in rhs_spec[1:])
  return 0


def _sub_jaxprs(eqn):
  for value in eqn.params.values():
    for item in value if isinstance(value, tuple | list) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def traced_macs(jaxpr) -> int:
  return sum(_eqn_macs(e) + sum(traced_macs(j) for j in _sub_jaxprs(e)) for e in jaxpr.eqns)


def _batch(signature, rng, m):
  b = 3
  text = lambda length: rng.integers(1, m.vocab_size, (b, length)).astype(np.int32)
  if signature.input_modality == "image":
    inputs = rng.uniform(-1, 1, (b, 28, 20, 3)).astype(np.float32)
  elif signature.input_modality == "audio":
    inputs = rng.normal(size=(b, 37, m.audio_num_mel_bins)).astype(np.float32)
  else:
    inputs = text(9)
  batch = {"inputs": inputs, "target_space": np.zeros(b, np.int32)}
  if signature.input_modality == "audio":
    batch["inputs_mask"] = np.ones(inputs.shape[:2], np.float32)
  if signature.target_modality == "categorical":
    batch["targets"] = rng.integers(0, signature.num_classes, (b,)).astype(np.int32)
  else:
    batch["targets"] = text(7)
  return batch


SIGNATURES = {
  "language->language": TaskSignature("language", "language"),
  "image->language": TaskSignature("image", "language"),
  "audio->language": TaskSignature("audio", "language"),
  "image->categorical": TaskSignature("image", "categorical", 10),
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_analytic_macs_match_the_traced_model(name, monkeypatch):
  monkeypatch.setitem(blocks.DEPTHWISE, "shifted", blocks.depthwise_grouped)
  m = get_config("tiny,no_moe").model
  # Non-square images (28 x 20) and odd lengths exercise both grid axes and rounded-up strides.
  signature = SIGNATURES[name]
  batch = _batch(signature, np.random.default_rng(0), m)
  model = MultiModel(run.model_config(m, "cpu"))
  if signature.input_modality == "image" and signature.target_modality == "categorical":
    # The head needs a square grid, here 60 x 60 -> 4 x 4, pooled to 2 x 2: every kernel tap
    # can meet a real value, so the layers compute exactly the multiply-adds that are needed.
    batch["inputs"] = np.random.default_rng(1).uniform(-1, 1, (3, 60, 60, 3)).astype(np.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, signature, train=False))
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, batch, signature, train=False))(params)
  traced = traced_macs(jaxpr.jaxpr)
  analytic = flops.task_forward_macs(m, signature, batch["inputs"].shape, batch["targets"].shape)
  assert sum(analytic.values()) == traced


def test_train_flops_and_moe_count_by_hand():
  m = get_config("tiny").model  # d 32, 4 experts, k 2, hidden 64, noisy gating
  assert flops.ffn_macs(m) == 2 * (32 * 64 + 64 * 32) + 2 * 32 * 4
  assert flops.train_flops(10) == 60


def test_step_macs_by_component_sum_to_the_step_macs():
  """The same step counted per task group and per component: the same multiply-adds, and each
  component the sum of its task groups' counts."""
  built = run.build(get_config("tiny"), jax.devices()[:1], check_data=False)
  m, plan, shapes = built.model.config, built.plan, built.batch_specs
  by_group = flops.step_macs(m, plan, shapes)
  by_component = flops.step_macs_by_component(m, plan, shapes)
  assert sum(by_component.values()) == sum(by_group.values())
  softmax = sum(
    flops.task_forward_macs(
      m, g.signature, shapes[g.name]["inputs"].shape, shapes[g.name]["targets"].shape
    ).get("softmax", 0)
    for g in plan
  )
  assert by_component["softmax"] == softmax > 0
