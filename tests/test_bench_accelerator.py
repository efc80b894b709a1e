"""bench/accelerator.py's readings of a compiled TPU program: estimated cycles by model part and
component (a loop's body once per iteration), and what each all-gather gathers. Hand-written HLO,
hand counts."""

import pytest

from bench import accelerator

# A loop of 3 iterations (the condition's constant) whose body holds one decoder-attention dot of
# 100 cycles; in the entry an encoder conv of 200, a softmax dot of 50, an update of 150 with no
# module path, and an all-gather of a parameter and one of a DCN receive's result.
_HLO = """
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %d = bf16[8,128]{1,0} dot(%a, %b), DECODER_100
}
%cond (p: (s32[], f32[8])) -> pred[] {
  %limit = s32[]{:T(128)} constant(3)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %limit), direction=LT
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]{0}) while(%t0), condition=%cond, body=%body
  %c = bf16[8,128]{1,0} fusion(%x), kind=kLoop, ENCODER_200
  %s = bf16[8,32000]{1,0} convolution(%y, %z), SOFTMAX_50
  %u = f32[1024]{0} fusion(%g), kind=kLoop, UPDATE_150
  %param.1 = f32[16,64]{1,0} parameter(1)
  %ag = f32[128,64]{1,0} all-gather(f32[16,64]{1,0} %param.1), dimensions={0}
  %recv = f32[4,64]{1,0} recv-done(%r)
  %cvt = f32[4,64]{1,0} convert(f32[4,64]{1,0} %recv)
  %ag2 = f32[32,64]{1,0} all-gather(f32[4,64]{1,0} %cvt), dimensions={0}
}
"""


def _metadata(op_name: str, cycles: int) -> str:
  """An instruction's op_name and estimated cycles, as the TPU compiler writes them."""
  return f'metadata={{op_name="{op_name}"}}, backend_config={{"estimated_cycles":"{cycles}"}}'


FORWARD, BACKWARD = "jit(train_step)/jvp(MultiModel.packed)", "jit(train_step)/transpose(jvp("
for placeholder, op_name, cycles in [
  ("DECODER_100", f"{FORWARD}/MultiModel.decoder/before_0/attention/dot_general", 100),
  ("ENCODER_200", f"{FORWARD}/MultiModel.encoder/after_1/group0_step0/conv/mul", 200),
  ("SOFTMAX_50", f"{BACKWARD}MultiModel.packed))/MultiModel.language.logits/softmax/dot", 50),
  ("UPDATE_150", "jit(train_step)/add", 150),
]:
  _HLO = _HLO.replace(placeholder, _metadata(op_name, cycles))
TOTAL = 3 * 100 + 200 + 50 + 150


def test_time_by_part_counts_loop_bodies_per_iteration():
  got = accelerator.time_by_part(_HLO, depth=3)
  assert got == pytest.approx(
    {
      "decoder/before_0/attention": 300 / TOTAL,
      "encoder/after_1/group0_step0": 200 / TOTAL,
      "the update and the rest": 150 / TOTAL,
      "language.logits/softmax": 50 / TOTAL,
    }
  )


def test_components_take_each_part_and_its_flops_share():
  assert accelerator.component_of("decoder/after_1/attention") == "decoder attention"
  assert accelerator.component_of("decoder/after_1/convs") == "decoder convs"
  assert accelerator.component_of("decoder/ffn/ffn") == "decoder ffn"
  assert accelerator.component_of("embed_inputs/audio/block0") == "input net"
  assert accelerator.component_of("shifted_targets") == accelerator.REST
  macs = {"decoder attention": 1, "encoder convs": 2, "softmax": 1}
  lines = accelerator.components_table(_HLO, macs, mfu=0.4)
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in lines[2:]}
  # decoder attention: 300/700 of the time, 1/4 of the FLOPs: 0.4 x (1/4) / (3/7) = 23%.
  assert rows["decoder attention"] == ["42.9%", "25.0%", "23% |"]
  assert rows["encoder convs"] == ["28.6%", "50.0%", "70% |"]
  assert rows[accelerator.REST] == ["21.4%", "0.0%", "- |"]


def test_all_gathers_are_sorted_by_what_they_gather():
  got = accelerator.all_gather_sources(_HLO)
  assert got == {
    "parameter": {"count": 1, "bytes": 128 * 64 * 4},
    "recv-done": {"count": 1, "bytes": 32 * 64 * 4},
  }
