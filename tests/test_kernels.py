"""config.model.kernels: the CPU forms and XLA's plain forms compute the same thing, and run.build
decides "auto" (and dtype "auto") from the run's devices; bfloat16 activations keep the logits,
losses and gradients float32."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import short_kernels
from test_model import SIGNATURES, depthwise_reference, jit, make_batches, tiny_model

from configs.multimodel import get_config
from mm_jax import aot, run, validation
from mm_jax import step as step_lib
from mm_jax.errors import ConfigError
from mm_jax.grouping import Group
from mm_jax.models import blocks
from mm_jax.models.multimodel import MultiModel
from mm_jax.models.packing import Packing

FORMS = blocks.KERNELS  # ("cpu", "xla", "tpu")


def values_and_grads(module_of, variables, x, cotangent, **kwargs):
  """Per kernels form: (output, d<output, cotangent>/d(variables, x))."""
  out = {}
  for kernels in FORMS:
    module = module_of(kernels)
    apply = lambda v, x, module=module: module.apply(v, x, **kwargs)
    loss = lambda v, x, apply=apply: jnp.vdot(apply(v, x), cotangent)
    out[kernels] = (jax.jit(apply)(variables, x), jax.jit(jax.grad(loss, (0, 1)))(variables, x))
  return out


def assert_forms_agree(got, atol):
  """Every form's output and gradients against the "cpu" form's."""
  y_cpu, g_cpu = got["cpu"]
  flat_cpu = jax.tree.leaves_with_path(g_cpu)
  for form in FORMS[1:]:
    y, g = got[form]
    np.testing.assert_allclose(y_cpu, y, atol=atol, rtol=1e-5, err_msg=form)
    flat = jax.tree.leaves(g)
    assert len(flat_cpu) == len(flat)
    for (path, a), b in zip(flat_cpu, flat):
      np.testing.assert_allclose(
        a, b, atol=atol, rtol=1e-4, err_msg=f"{form} {jax.tree_util.keystr(path)}"
      )


@pytest.mark.parametrize("lead", [(7,), (2, 3, 5)])
def test_dense_forms_agree_with_each_other_and_numpy(lead):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(*lead, 6))
  cot = rng.normal(size=(*lead, 4))
  w = rng.normal(size=(6, 4))
  b = rng.normal(size=(4,))
  variables = {
    "params": {"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}
  }
  got = values_and_grads(
    lambda k: blocks.Dense(4, use_bias=True, kernels=k),
    variables,
    jnp.asarray(x, jnp.float32),
    jnp.asarray(cot, jnp.float32),
  )
  assert_forms_agree(got, atol=1e-5)
  for y, (g_vars, g_x) in got.values():
    np.testing.assert_allclose(y, x @ w + b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_x, cot @ w.T, rtol=1e-5, atol=1e-5)
    want_dw = x.reshape(-1, 6).T @ cot.reshape(-1, 4)
    np.testing.assert_allclose(g_vars["params"]["kernel"], want_dw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_vars["params"]["bias"], cot.reshape(-1, 4).sum(0), rtol=1e-5)


@pytest.mark.parametrize(
  "kernel, dilation, padding",
  [((3,), (1,), "same"), ((5,), (2,), "causal"), ((4,), (3,), "same"), ((3, 3), (2, 1), "same")],
)
def test_separable_conv_forms_agree(kernel, dilation, padding):
  """The whole SeparableConv (depthwise taps, then the pointwise Dense) in both forms: the same
  parameters, outputs and gradients; the depthwise part against float64 NumPy too."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, *([11] * len(kernel)), 5)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(*x.shape[:-1], 3)), jnp.float32)
  conv = lambda k: blocks.SeparableConv(3, kernel, dilation, padding, kernels=k)
  variables = {
    form: nn.unbox(conv(form).init(jax.random.key(0), x)) for form in FORMS
  }  # both forms make the same parameters: a checkpoint serves either
  for form in FORMS[1:]:
    assert jax.tree.structure(variables["cpu"]) == jax.tree.structure(variables[form])
    jax.tree.map(np.testing.assert_array_equal, variables["cpu"], variables[form])
  got = values_and_grads(conv, variables["cpu"], x, cot)
  assert_forms_agree(got, atol=1e-4)

  params = variables["cpu"]["params"]
  pads = [blocks.conv_padding(k, r, padding) for k, r in zip(kernel, dilation)]
  depthwise = depthwise_reference(np.asarray(x), np.asarray(params["depthwise"]), dilation, pads)
  want = depthwise @ np.asarray(params["pointwise"]["kernel"], np.float64)
  np.testing.assert_allclose(got["xla"][0], want, atol=1e-4)


def test_layer_norm_forms_agree_with_float64_numpy():
  # Channels with a mean well away from zero: where a one-pass variance rounds most.
  rng = np.random.default_rng(0)
  x = jnp.asarray(3.0 + rng.normal(size=(4, 7, 24)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  variables = {"params": {"scale": jnp.linspace(0.5, 1.5, 24), "bias": jnp.linspace(-1, 1, 24)}}
  got = values_and_grads(lambda k: blocks.LayerNorm(kernels=k), variables, x, cot)
  assert_forms_agree(got, atol=1e-5)

  x64 = np.asarray(x, np.float64)
  centred = x64 - x64.mean(-1, keepdims=True)
  want = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-6)
  want = want * np.asarray(variables["params"]["scale"]) + np.asarray(variables["params"]["bias"])
  np.testing.assert_allclose(got["tpu"][0], want, atol=1e-5)


def test_only_the_xla_form_convolves_depthwise_grouped():
  assert blocks.depthwise_form("tpu") == "shifted"
  assert blocks.depthwise_form("cpu") == "shifted"
  assert blocks.depthwise_form("xla") == "grouped"
  with pytest.raises(ValueError, match="kernels='auto'"):
    blocks.depthwise_form("auto")


@pytest.mark.parametrize("padding, dilation", [("causal", 2), ("same", 1)])
def test_packed_separable_conv_forms_agree(padding, dilation):
  """Packed sequences: the written-out masked taps against their sum under plain autodiff."""
  rng = np.random.default_rng(2)
  packing = Packing.of([(4, 6), (2, 9)], rows=2)
  x = jnp.asarray(rng.normal(size=(2, packing.tokens, 4)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(*x.shape[:-1], 3)), jnp.float32)
  conv = lambda k: blocks.SeparableConv(3, (3,), (dilation,), padding, kernels=k)
  variables = nn.unbox(conv("cpu").init(jax.random.key(0), x, packing=packing))
  got = values_and_grads(conv, variables, x, cot, packing=packing)
  assert_forms_agree(got, atol=1e-4)


def test_an_unresolved_form_is_refused():
  x = jnp.zeros((1, 3, 2))
  with pytest.raises(ValueError, match="kernels='auto'"):
    blocks.Dense(2, kernels="auto").init(jax.random.key(0), x)


# The run builder decides "auto".


def test_model_config_resolves_auto_by_platform():
  m = get_config("tiny").model
  assert (m.kernels, m.dtype) == ("auto", "auto")
  for platform, want in [
    ("cpu", ("cpu", "float32")),
    ("tpu", ("tpu", "bfloat16")),
    ("gpu", ("xla", "bfloat16")),
  ]:
    resolved = run.model_config(m, platform)
    assert (resolved.kernels, resolved.dtype) == want, platform
  m.kernels, m.dtype = "cpu", "bfloat16"  # explicit choices pass on every platform
  assert (run.model_config(m, "gpu").kernels, run.model_config(m, "cpu").dtype) == (
    "cpu",
    "bfloat16",
  )
  assert m.kernels == "cpu" and get_config("tiny").model.kernels == "auto"  # config untouched
  assert get_config("paper").model.dtype == "bfloat16"
  assert get_config("default").model.dtype == "auto"


@pytest.mark.parametrize("kernels, want", [("auto", "cpu"), ("xla", "xla")])
def test_build_on_cpus_hands_the_model_resolved_kernels(devices, kernels, want):
  config = short_kernels.apply(get_config("tiny,tasks=translate_en_de"))
  config.model.kernels = kernels
  built = run.build(config, devices[:1], check_data=False)
  assert built.model.config.kernels == want
  assert built.model.config.dtype == "float32"
  assert built.config.model.kernels == kernels  # the run's config keeps what was asked


def test_build_for_a_tpu_slice_hands_the_model_tpu_kernels_and_bfloat16():
  """aot.py's mesh of TPU devices (described by libtpu, traced only): "auto" follows the mesh's
  devices, not the CPU this process runs on."""
  config = short_kernels.apply(get_config("tiny,tasks=translate_en_de"))
  config.mesh.data = 8
  devices = aot.slice_devices("v5e-8")
  built = run.build(config, mesh=aot.slice_mesh(config.mesh, devices, 1), check_data=False)
  assert (built.model.config.kernels, built.model.config.dtype) == ("tpu", "bfloat16")
  params = jax.tree.leaves(built.abstract_state.params)
  assert {x.dtype for x in params} == {jnp.dtype(jnp.float32)}
  opt_state = jax.tree.leaves(built.abstract_state.opt_state)
  assert {x.dtype for x in opt_state if jnp.issubdtype(x.dtype, jnp.floating)} == {
    jnp.dtype(jnp.float32)
  }


@pytest.mark.parametrize("field, value", [("kernels", "gpu"), ("dtype", "float16")])
def test_bad_value_is_a_config_error(field, value):
  config = get_config("tiny")
  config.model[field] = value
  with pytest.raises(ConfigError, match=f"config.model.{field}") as info:
    validation.validate(config, num_devices=1, check_data=False)
  assert "\n" not in str(info.value)


def test_saved_configs_without_the_field_get_the_cpu_forms():
  config = get_config("tiny")
  del config.model["kernels"]
  assert validation.complete_saved_config(config).model.kernels == "cpu"


# bfloat16 activations: what must stay float32 does.


def test_bfloat16_model_keeps_logits_losses_and_gradients_float32():
  """Traced only (eval_shape): the packed train forward of every task group, MoE included."""
  model = tiny_model(dtype="bfloat16", **short_kernels.model_overrides())
  assert model.config.dtype == "bfloat16"
  # Both kinds of target and the audio net's CTC head; the decoder and the MoE serve two groups.
  signatures = {n: SIGNATURES[n] for n in ("text_to_text", "image_to_class", "audio_to_text")}
  batches = make_batches(groups=signatures)
  params = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), batches, signatures, train=False, method=MultiModel.all_tasks
    )
  )["params"]
  params = nn.unbox(params)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}

  def logits_of(params):
    return model.apply(
      {"params": params},
      batches,
      signatures,
      train=True,
      rngs={"dropout": jax.random.key(1), "gating": jax.random.key(2)},
      method="packed",
    )

  jaxpr, (logits, aux) = jax.make_jaxpr(logits_of, return_shape=True)(params)
  assert {n: x.dtype for n, x in logits.items()} == dict.fromkeys(signatures, jnp.float32)
  assert aux.dtype == jnp.float32
  assert "bf16[" in str(jaxpr)  # while the body does run in bfloat16

  plan = tuple(Group(name, signature, (name,)) for name, signature in signatures.items())
  step_batches = {
    name: {**batch, "task_index": np.zeros(len(batch["targets"]), np.int32)}
    for name, batch in batches.items()
  }
  loss_fn = lambda p: step_lib.forward_losses(
    model, p, step_batches, plan, train=True, rng=jax.random.key(3), step=0, label_smoothing=0.1
  )
  (loss, (per_task, total_aux, _)), grads = jax.eval_shape(
    jax.value_and_grad(loss_fn, has_aux=True), params
  )
  assert loss.dtype == total_aux.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(per_task))
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_whole_model_forms_agree():
  """The packed body, the image net and the categorical head in both forms, one set of
  parameters: the same logits."""
  groups = ("text_to_text", "image_to_class")
  signatures = {n: SIGNATURES[n] for n in groups}
  batches = make_batches(groups=groups)
  models = {k: tiny_model(ffn="dense", kernels=k, **short_kernels.model_overrides()) for k in FORMS}
  params = jit(
    lambda: models["cpu"].init(
      jax.random.key(0), batches, signatures, train=False, method=MultiModel.all_tasks
    )
  )()["params"]
  logits = {
    k: jit(
      lambda p, model=model: model.apply(
        {"params": p}, batches, signatures, train=False, method="packed"
      )[0]
    )(params)
    for k, model in models.items()
  }
  for name in groups:
    for form in FORMS[1:]:
      np.testing.assert_allclose(
        logits["cpu"][name], logits[form][name], atol=2e-4, err_msg=f"{form} {name}"
      )
