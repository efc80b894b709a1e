"""The task registry: everything that makes a task a task, one entry each.

A task names its modalities (which modality nets the body uses), its target space (the decoder's
"To-..." embedding), its sources per mixture ("embedded": the offline builders in
mm_jax/data/embedded, "paper": the full-scale TFDS datasets), its metrics and default weight.
A source's `adapter` maps a raw TFDS example to the canonical fields the pipeline understands:

  image        encoded image bytes (decoded, resized and scaled by the pipeline)
  label        int class id
  speech       int16 samples at 16 kHz
  input_text   source sentence
  target_text  target sentence

Adding a task is adding one entry to TASKS; nothing else changes. LibriSpeech stands in for the
paper's WSJ speech (TFDS has no WSJ); WSJ parsing comes from Penn Treebank .mrg files the user owns
(mm_jax/data/ptb.py).

TensorFlow is imported inside the adapters that use it: the trainer resolves its tasks before
TensorFlow is loaded (see layout.py).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from mm_jax.data import trees
from mm_jax.models.signature import TaskSignature

TARGET_SPACES = ("en", "de", "fr", "parse", "class")


@dataclasses.dataclass(frozen=True)
class Source:
  tfds_name: str
  train_split: str
  eval_split: str
  # (raw example, stateless seed: a tf.Tensor [2]) -> canonical fields; heavy features read with
  # .get so the same adapter also serves text-only reads (tokenizer training) that skip them.
  adapter: Callable[[dict, Any], dict]
  num_classes: int = 0
  # Features to read when only text is wanted (None: all of them).
  text_features: tuple[str, ...] | None = None
  # Python (input_text, target_text, data_config) -> (input_text, target_text), run per example
  # where tf ops can't express it (tree linearisation).
  text_fn: Callable[[str, str, object], tuple[str, str]] | None = None
  # config.data field holding a manual-download directory, if the builder needs one.
  manual_dir_field: str | None = None


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  input_modality: str
  target_modality: str
  target_space: str
  sources: Mapping[str, Source]
  metrics: tuple[str, ...]
  default_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Task:
  """A TaskSpec resolved against one mixture: what the trainer and the pipeline use."""

  spec: TaskSpec
  source: Source
  mixture: str

  @property
  def name(self) -> str:
    return self.spec.name

  @property
  def signature(self) -> TaskSignature:
    return TaskSignature(
      self.spec.input_modality, self.spec.target_modality, self.source.num_classes
    )

  @property
  def target_space(self) -> str:
    return self.spec.target_space

  @property
  def target_space_id(self) -> int:
    return TARGET_SPACES.index(self.spec.target_space)

  @property
  def metrics(self) -> tuple[str, ...]:
    return self.spec.metrics


# --- adapters: raw TFDS example -> canonical fields -----------------------------------------


def _image_label(ex, seed):
  del seed
  return {"image": ex.get("image"), "label": ex["label"]}


def _embedded_caption(ex, seed):
  del seed
  return {"image": ex.get("image"), "target_text": ex["caption"]}


def _coco_caption(ex, seed):
  """One of the image's captions, drawn per example and epoch from the stateless seed."""
  import tensorflow as tf

  captions = ex["captions"]["text"]
  n = tf.maximum(tf.shape(captions)[0], 1)
  pick = tf.random.stateless_uniform([], seed, 0, n, dtype=tf.int32)
  caption = tf.cond(tf.size(captions) > 0, lambda: captions[pick], lambda: tf.constant(""))
  return {"image": ex.get("image"), "target_text": caption}


def _speech(ex, seed):
  import tensorflow as tf

  del seed
  return {"speech": ex.get("speech"), "target_text": tf.strings.lower(ex["text"])}


def _translation(source_lang, target_lang):
  def adapter(ex, seed):
    del seed
    return {"input_text": ex[source_lang], "target_text": ex[target_lang]}

  adapter.__name__ = f"translate_{source_lang}_{target_lang}"
  return adapter


def _tree(ex, seed):
  del seed
  return {"input_text": ex["tree"], "target_text": ex["tree"]}


def _linearize_tree(input_text, target_text, data_config):
  """Sentence words and the linearised tree, both from the Penn tree (they can't disagree)."""
  del input_text
  return trees.penn_to_example(target_text, str(data_config.parse_pos_tags))


def _translation_sources(pair, source_lang, target_lang):
  adapter = _translation(source_lang, target_lang)
  return {
    "embedded": Source(f"mm_embedded_translation/{pair}", "train", "test", adapter),
    "paper": Source(f"wmt14_translate/{pair}", "train", "validation", adapter),
  }


def _translation_task(source_lang, target_lang):
  pair = f"{'de' if 'de' in (source_lang, target_lang) else 'fr'}-en"
  return TaskSpec(
    name=f"translate_{source_lang}_{target_lang}",
    input_modality="language",
    target_modality="language",
    target_space=target_lang,
    sources=_translation_sources(pair, source_lang, target_lang),
    metrics=("bleu",),
  )


TASKS: dict[str, TaskSpec] = {
  t.name: t
  for t in (
    TaskSpec(
      name="image_classification",
      input_modality="image",
      target_modality="categorical",
      target_space="class",
      sources={
        "embedded": Source("mm_embedded_digits", "train", "test", _image_label, num_classes=10),
        "paper": Source("imagenet2012", "train", "validation", _image_label, num_classes=1000),
      },
      metrics=("accuracy", "top5"),
    ),
    TaskSpec(
      name="image_captioning",
      input_modality="image",
      target_modality="language",
      target_space="en",
      sources={
        "embedded": Source(
          "mm_embedded_captions", "train", "test", _embedded_caption, text_features=("caption",)
        ),
        "paper": Source(
          "coco_captions/2014", "train", "val", _coco_caption, text_features=("captions",)
        ),
      },
      metrics=("bleu",),
    ),
    TaskSpec(
      name="speech_recognition",
      input_modality="audio",
      target_modality="language",
      target_space="en",
      sources={
        "embedded": Source("mm_embedded_speech", "train", "test", _speech, text_features=("text",)),
        # LibriSpeech stands in for WSJ speech, which TFDS does not carry.
        "paper": Source(
          "librispeech",
          "train_clean100+train_clean360+train_other500",
          "dev_clean",
          _speech,
          text_features=("text",),
        ),
      },
      metrics=("wer",),
    ),
    TaskSpec(
      name="constituency_parsing",
      input_modality="language",
      target_modality="language",
      target_space="parse",
      sources={
        "embedded": Source("mm_embedded_parsing", "train", "test", _tree, text_fn=_linearize_tree),
        "paper": Source(
          "mm_penn_treebank",
          "train",
          "validation",
          _tree,
          text_fn=_linearize_tree,
          manual_dir_field="ptb_dir",
        ),
      },
      metrics=("bracket_f1", "tree_exact"),
    ),
    _translation_task("en", "de"),
    _translation_task("de", "en"),
    _translation_task("en", "fr"),
    _translation_task("fr", "en"),
  )
}


def resolve(name: str, mixture: str) -> Task:
  from mm_jax.errors import ConfigError

  if name not in TASKS:
    raise ConfigError(f"config.data.tasks has unknown task {name!r}: use names from {list(TASKS)}")
  spec = TASKS[name]
  if mixture not in spec.sources:
    raise ConfigError(
      f"config.data.mixture={mixture!r} has no source for {name}: use one of {list(spec.sources)}"
    )
  return Task(spec, spec.sources[mixture], mixture)
