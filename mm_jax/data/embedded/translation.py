"""`mm_embedded_translation/de-en` and `/fr-en`: human translations from gettext catalogs in wheels.

Sources: Django's locale catalogs (django.mo, djangojs.mo of core and contrib apps) and, when
installed, the JupyterLab language packs (jupyterlab-language-pack-de-DE / -fr-FR). This is real
human translation of software-interface text, about 2k pairs for German and 4k for French after
cleaning: format placeholders (%(name)s, %s, {0}) are removed where they sit at an edge of the
message and the message is dropped where one sits inside it (no sentence survives that), keyboard
accelerators and HTML are stripped, untranslated and letter-free entries dropped, pairs
deduplicated. Held-out pairs are chosen by English side, so no held-out English string (ignoring
case and final punctuation) occurs in train.
"""

import glob
import html
import importlib.util
import os
import re

import polib
import tensorflow_datasets as tfds

from mm_jax.data.embedded.base import EmbeddedBuilder, is_held_out, stable_order

HELD_OUT_FRACTION = 0.1
MAX_WORDS = 40

# package -> catalog globs under it, with {lang} = "de" / "fr".
CATALOGS = {
  "django": ("**/locale/{lang}/LC_MESSAGES/*.mo",),
  "jupyterlab_language_pack_de_DE": ("locale/{lang}_DE/LC_MESSAGES/*.mo",),
  "jupyterlab_language_pack_fr_FR": ("locale/{lang}_FR/LC_MESSAGES/*.mo",),
}

_PLACEHOLDER = re.compile(
  r"%\([^)]*\)[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]"  # %(name)s
  r"|%[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]"  # %s, %d, %.2f
  r"|\{\{[^{}]*\}\}|\{[^{}]*\}"  # {0}, {name}, {{ var }}
  r"|\$\{[^{}]*\}"  # ${var}
  r"|%\d+"  # %1 (JupyterLab)
)
_HTML_TAG = re.compile(r"<[^<>]+>")
_ACCELERATOR = re.compile(r"(?<![&\w])[&_](?=\w)")  # "&File", "_Open"; not "a & b", not snake_case
_EMPTY_PAREN_SPACE = re.compile(r"\(\s+|\s+\)")  # "(Hidden field )" once "%(name)s" is gone
_EDGE_JUNK = " \t\n:;,-–—()[]\"'“”«»"


def catalog_files(lang: str) -> list[tuple[str, str]]:
  """(source name, path) of every installed catalog for `lang`, in a stable order."""
  found = []
  for package, patterns in CATALOGS.items():
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
      continue
    root = spec.submodule_search_locations[0]
    for pattern in patterns:
      paths = glob.glob(os.path.join(root, pattern.format(lang=lang)), recursive=True)
      found.extend((package, p) for p in sorted(paths))
  return found


def clean(text: str) -> str | None:
  """The message as plain text, or None when nothing sentence-like survives."""
  text = html.unescape(_HTML_TAG.sub(" ", text))
  text = " ".join(_ACCELERATOR.sub("", text).split())
  pieces = _PLACEHOLDER.split(text)
  inner = [p.strip(_EDGE_JUNK) for p in pieces[1:-1]]
  if any(inner) or (
    len(pieces) > 1 and pieces[0].strip(_EDGE_JUNK) and pieces[-1].strip(_EDGE_JUNK)
  ):
    return None  # a placeholder inside the message
  text = " ".join("".join(pieces).split())
  text = _EMPTY_PAREN_SPACE.sub(lambda m: m.group(0).strip(), text)
  if text.startswith("(") and text.endswith(")") and "(" not in text[1:-1]:
    text = text[1:-1]
  text = text.strip(_EDGE_JUNK.replace("(", "").replace(")", "")).strip()
  if not any(c.isalpha() for c in text) or len(text.split()) > MAX_WORDS:
    return None
  return text


def raw_pairs(path: str) -> list[tuple[str, str]]:
  """(English, translation) per entry; plural entries give their singular and plural forms."""
  pairs = []
  for entry in polib.mofile(path):
    if entry.msgid_plural:
      forms = entry.msgstr_plural
      if forms.get(0):
        pairs.append((entry.msgid, forms[0]))
      if forms.get(1):
        pairs.append((entry.msgid_plural, forms[1]))
    elif entry.msgid and entry.msgstr:
      pairs.append((entry.msgid, entry.msgstr))
  return pairs


def english_key(text: str) -> str:
  return text.casefold().rstrip(".!?…: ")


def load_pairs(lang: str) -> tuple[list[tuple[str, str]], dict[str, int]]:
  """Clean, deduplicated pairs in a stable order, and the count each source contributed."""
  seen, pairs, per_source = set(), [], {}
  for source, path in catalog_files(lang):
    for english, foreign in raw_pairs(path):
      english, foreign = clean(english), clean(foreign)
      if english is None or foreign is None or english == foreign:
        continue
      if (english, foreign) not in seen:
        seen.add((english, foreign))
        pairs.append((english, foreign))
        per_source[source] = per_source.get(source, 0) + 1
  return pairs, per_source


def split_pairs(pairs, salt: str) -> dict[str, list[tuple[str, str]]]:
  """Held out by English key; each split in a seeded order (so tiny builds take a sample)."""
  splits = {"train": [], "test": []}
  for english, foreign in pairs:
    held_out = is_held_out(english_key(english), HELD_OUT_FRACTION, salt)
    splits["test" if held_out else "train"].append((english, foreign))
  for name, items in splits.items():
    order = {k: i for i, k in enumerate(stable_order([f"{e}\0{f}" for e, f in items], salt))}
    splits[name] = sorted(items, key=lambda p: order[f"{p[0]}\0{p[1]}"])
  return splits


class TranslationConfig(tfds.core.BuilderConfig):
  def __init__(self, *, language: str, **kwargs):
    super().__init__(name=f"{language}-en", **kwargs)
    self.language = language


class MmEmbeddedTranslation(EmbeddedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Django + JupyterLab language-pack catalogs."}
  BUILDER_CONFIGS = [
    TranslationConfig(language="de", description="English-German catalog pairs."),
    TranslationConfig(language="fr", description="English-French catalog pairs."),
  ]
  SIZES = {"tiny": (32, 16), "full": (10**9, 10**9)}  # full: every pair

  def _info(self) -> tfds.core.DatasetInfo:
    language = self.builder_config.language
    return self._embedded_info(
      {"en": tfds.features.Text(), language: tfds.features.Text()},
      "Human translations from gettext catalogs shipped in wheels (Django, JupyterLab).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    language = self.builder_config.language
    pairs, per_source = load_pairs(language)
    self.info.metadata["pairs_per_source"] = per_source
    splits = split_pairs(pairs, salt=f"translation-{language}")
    num_train, num_test = self.split_sizes
    sizes = {"train": num_train, "test": num_test}
    return {name: self._generate_examples(items[: sizes[name]]) for name, items in splits.items()}

  def _generate_examples(self, pairs):
    language = self.builder_config.language
    for index, (english, foreign) in enumerate(pairs):
      yield index, {"en": english, language: foreign}
