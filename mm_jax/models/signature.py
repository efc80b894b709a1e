"""What the body needs to know about a task: which modality nets read and write it.

Nothing else in the network knows about tasks; the decoder's output space arrives per example as
`batch["target_space"]`, so tasks that share a signature and shapes can run as one batch.
"""

import dataclasses

INPUT_MODALITIES = ("language", "image", "audio")
TARGET_MODALITIES = ("language", "categorical")


@dataclasses.dataclass(frozen=True)
class TaskSignature:
  input_modality: str  # "language" | "image" | "audio"
  target_modality: str  # "language" | "categorical"
  num_classes: int = 0  # categorical targets only

  def __post_init__(self):
    if self.input_modality not in INPUT_MODALITIES:
      raise ValueError(f"input_modality={self.input_modality!r}: use one of {INPUT_MODALITIES}")
    if self.target_modality not in TARGET_MODALITIES:
      raise ValueError(f"target_modality={self.target_modality!r}: use one of {TARGET_MODALITIES}")
    if (self.target_modality == "categorical") != (self.num_classes > 0):
      raise ValueError("num_classes must be > 0 exactly when target_modality is 'categorical'")
