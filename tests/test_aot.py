"""Ahead-of-time compilation for TPU slices on this CPU machine (libtpu from the test extra)."""

import jax
import numpy as np
import pytest
import short_kernels  # noqa: E402

from configs import multimodel as multimodel_config  # noqa: E402
from mm_jax import aot, grouping, mixture  # noqa: E402
from mm_jax.data import layout, pipeline  # noqa: E402

# Hand-written post-optimisation HLO: an async all-reduce of 2 arrays, an all-gather-start whose
# tuple holds (operand, result), a sync all-to-all, a collective-permute-start with its u32
# scratch, and a fusion that merely mentions "all-reduce" in its name (not a collective).
_HLO = """
  %ar = (f32[1024]{0}, bf16[8,128]{1,0}) all-reduce-start(f32[1024]{0} %a, bf16[8,128]{1,0} %b)
  %ard = (f32[1024]{0}, bf16[8,128]{1,0}) all-reduce-done((f32[1024]{0}, bf16[8,128]{1,0}) %ar)
  %ag = (f32[16,64]{1,0}, f32[128,64]{1,0}) all-gather-start(f32[16,64]{1,0} %c), dimensions={0}
  %agd = f32[128,64]{1,0} all-gather-done((f32[16,64]{1,0}, f32[128,64]{1,0}) %ag)
  %a2a = s32[4,32]{1,0} all-to-all(s32[4,32]{1,0} %d), dimensions={0}
  %cp = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(f32[256]{0} %e)
  %fusion.all-reduce = f32[2]{0} fusion(f32[2]{0} %f), kind=kLoop
"""


def test_collectives_are_counted_with_their_result_bytes():
  got = aot.collectives(_HLO)
  assert got["all-reduce"] == {"count": 1, "bytes": 1024 * 4 + 8 * 128 * 2}
  assert got["all-gather"] == {"count": 1, "bytes": 128 * 64 * 4}
  assert got["all-to-all"] == {"count": 1, "bytes": 4 * 32 * 4}
  assert got["collective-permute"] == {"count": 1, "bytes": 256 * 4}
  assert got["reduce-scatter"] == {"count": 0, "bytes": 0}


# A while loop of known trip count 4 (the microbatch scan) whose body all-reduces, nested in a
# loop whose condition stops at 3; a conditional whose branch all-gathers; an all-to-all in the
# entry; and a computation nothing calls.
_LOOP_HLO = """
%add (x: f32[], y: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %x, f32[] %y)
}
%inner_body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %ar = f32[256]{0} all-reduce(f32[256]{0} %g), channel_id=1, to_apply=%add
}
%inner_cond (p: (s32[], f32[256])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}
%outer_body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %w = (s32[], f32[256]{0}) while(%t), condition=%inner_cond, body=%inner_body, TRIPS_4
}
%outer_cond (p: (s32[], f32[256])) -> pred[] {
  %limit = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}
%update (p: f32[64]) -> f32[512] {
  %ag = f32[512]{0} all-gather(f32[64]{0} %p), dimensions={0}
}
%skip (p: f32[64]) -> f32[512] {
  ROOT %b = f32[512]{0} broadcast(f32[] %z), dimensions={}
}
%unused (p: f32[8]) -> f32[8] {
  %never = f32[8]{0} all-reduce(f32[8]{0} %p), to_apply=%add
}
ENTRY %main (a: f32[256], b: f32[64]) -> f32[256] {
  %loop = (s32[], f32[256]{0}) while(%t0), condition=%outer_cond, body=%outer_body
  %c = f32[512]{0} conditional(pred[] %ok, f32[64]{0} %b, f32[64]{0} %b),
    branch_computations={%update, %skip}
  %a2a = f32[4,32]{1,0} all-to-all(f32[4,32]{1,0} %d), dimensions={0}
}
"""
# As XLA:CPU records a loop's trip count; TPU code has it only in the condition (outer_cond).
_LOOP_HLO = _LOOP_HLO.replace("TRIPS_4", 'backend_config={"known_trip_count":{"n":"4"}}')


def test_collectives_in_loops_count_once_per_iteration():
  got = aot.collectives(_LOOP_HLO)
  assert got["all-reduce"] == {"count": 12, "bytes": 12 * 256 * 4}
  assert got["all-gather"] == {"count": 1, "bytes": 512 * 4}
  assert got["all-to-all"] == {"count": 1, "bytes": 4 * 32 * 4}
  times = aot.executions_per_step(_LOOP_HLO)
  assert (times["main"], times["outer_body"], times["inner_body"], times["unused"]) == (1, 3, 12, 0)


def test_batch_specs_match_what_the_pipeline_yields(tiny_data_dir):
  tasks_arg = "image_classification+image_captioning+speech_recognition+translate_en_de"
  config = multimodel_config.get_config(f"tiny,tasks={tasks_arg}")
  config.data.data_dir = str(tiny_data_dir)
  batch = next(pipeline.TrainIterator(config, data_parallel=8))
  sizes = mixture.task_batch_sizes(config, 8)
  for name, task in layout.build_tasks(config).items():
    specs = grouping.batch_specs(layout.example_shapes(config, task), sizes[name])
    real = {k: (v.shape, v.dtype) for k, v in batch[name].items()}
    assert {k: (s.shape, s.dtype) for k, s in specs.items()} == real, name


def _tiny(tasks, **overrides):
  config = short_kernels.apply(multimodel_config.get_config(f"tiny,tasks={tasks}"))
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.slow
def test_tiny_train_step_compiles_for_v5e_8():
  devices = aot.slice_devices("v5e-8")
  assert len(devices) == 8 and {d.platform for d in devices} == {"tpu"}
  # One task group (text: encoder, MoE, mixer, decoder) keeps libtpu's compile short.
  config = _tiny("translate_en_de", **{"mesh.data": 2, "mesh.expert": 4})
  result = aot.compile_train_step(config, devices)
  memory = aot.memory_per_device(result.compiled)
  assert 0 < memory["total"] < aot.SLICES["v5e-8"].hbm_bytes
  # Every parameter and both Adam moments live on the devices, sharded or not.
  assert memory["arguments"] >= 4 * result.run.num_params * 3 / 8
  found = aot.collectives(result.compiled.as_text())
  assert found["all-to-all"]["count"] > 0  # experts split over the expert axis
  assert found["all-reduce"]["count"] > 0  # gradients summed over the batch axes
  speed = aot.speed("v5e-8", result)
  assert speed["step_s"] > 0 and 0 < speed["mfu"] <= 1, speed
  assert speed["model_flops"] > 0 and speed["peak_flops"] == aot.SLICES["v5e-8"].peak_flops
  text = aot.report("v5e-8", 1, result)
  assert "HBM of the chip" in text and "all-to-all" in text
  assert "step time (estimate, TPU compiler)" in text and "MFU (estimate, TPU compiler)" in text
  # The host stays a CPU: the TPU was only a compile target.
  assert jax.devices()[0].platform == "cpu"


@pytest.mark.slow
def test_a_step_that_cannot_fit_fails_at_compile_time_with_the_numbers():
  # ~2 G expert parameters replicated on every device: 8 GiB, plus gradients and Adam: > 16 GiB.
  config = _tiny("image_classification", **{"model.moe.hidden": 2**23})
  with pytest.raises(aot.DoesNotFit) as info:
    aot.compile_train_step(config, aot.slice_devices("v5e-8"))
  message = str(info.value)
  assert "\n" not in message and any(ch.isdigit() for ch in message), message
  assert np.any([unit in message for unit in ("G", "M")]), message
