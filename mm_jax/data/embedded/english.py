"""A seeded probabilistic English grammar that emits gold Penn-style trees.

No constituency treebank installs by package name (DATA_SOURCES.md: Penn Treebank is LDC-licensed,
nltk's sample needs a download), so the embedded parsing task uses trees that are correct by
construction: a hand-written lexicon of real English words with their Penn Treebank POS tags, a
context-free grammar with agreement (person, number, tense), and rule probabilities that decay with
depth so most sentences stay short. The speech task reads sentences from the same grammar with the
recursive rules turned off, which keeps its vocabulary to a few hundred common words.

A tree is a tuple (label, child, ...); a leaf is (pos_tag, word).
"""

import dataclasses
import random

Tree = tuple


def _words(text: str) -> tuple[str, ...]:
  return tuple(text.split())


PEOPLE = _words(
  "baker boy child/children doctor driver farmer father friend girl king man/men mother "
  "neighbor nurse pilot queen singer student teacher woman/women"
)
ANIMALS = _words(
  "bear bird cat cow dog duck fox frog goat horse lion mouse/mice rabbit sheep/sheep"
)
THINGS = _words(
  "apple bag ball bike boat book bottle box bridge cake car chair city/cities clock coat cup "
  "door flower garden hat house key lamp letter map park phone picture river road school shoe "
  "song story/stories table train tree window"
)
NAMES = _words("Anna Ben David Emma John Lucy Mary Peter Sarah Tom")
PLACES_NNP = _words("London Paris Berlin Rome")

# base/past; intransitive verbs take no object, transitive ones take an NP.
INTRANSITIVE = _words(
  "arrive/arrived cry/cried dance/danced fall/fell jump/jumped laugh/laughed run/ran sing/sang "
  "sleep/slept smile/smiled swim/swam talk/talked wait/waited walk/walked work/worked"
)
TRANSITIVE = _words(
  "bring/brought build/built buy/bought carry/carried catch/caught clean/cleaned draw/drew "
  "eat/ate find/found follow/followed help/helped hold/held like/liked love/loved make/made "
  "need/needed open/opened paint/painted push/pushed read/read see/saw sell/sold take/took "
  "visit/visited want/wanted watch/watched write/wrote"
)
SENTENTIAL = _words("believe/believed hope/hoped know/knew say/said think/thought")

ADJECTIVES = _words(
  "beautiful big brave bright busy careful clever cold dark green happy heavy hungry kind little "
  "loud new old quiet red sad short small strange tall tired warm young"
)
ADVERBS = _words("again carefully happily loudly quickly quietly sadly slowly softly together")
DEGREE_ADVERBS = _words("very quite really")
PREPOSITIONS = _words("across at behind beside from in near on under with")
MODALS = _words("can could must should will would")

PRONOUNS = {  # subject form: (object form, possessive, agreement)
  "I": ("me", "my", "1sg"),
  "you": ("you", "your", "pl"),
  "he": ("him", "his", "3sg"),
  "she": ("her", "her", "3sg"),
  "it": ("it", "its", "3sg"),
  "we": ("us", "our", "pl"),
  "they": ("them", "their", "pl"),
}
SINGULAR_DETERMINERS = _words("the a this that every")
PLURAL_DETERMINERS = _words("the these those some")
NUMBERS = _words("two three four five")


def _split_form(entry: str) -> tuple[str, str | None]:
  base, _, other = entry.partition("/")
  return base, other or None


def _suffix_s(word: str) -> str:
  """English -s for plurals and third person singular, for the regular cases in this lexicon."""
  if word.endswith(("s", "sh", "ch", "x", "z", "o")):
    return word + "es"
  if word.endswith("y") and word[-2] not in "aeiou":
    return word[:-1] + "ies"
  return word + "s"


@dataclasses.dataclass(frozen=True)
class Noun:
  singular: str
  plural: str
  animate: bool


@dataclasses.dataclass(frozen=True)
class Verb:
  base: str
  past: str

  @property
  def third_singular(self) -> str:
    return _suffix_s(self.base)


def _nouns(entries, animate) -> tuple[Noun, ...]:
  out = []
  for entry in entries:
    singular, plural = _split_form(entry)
    out.append(Noun(singular, plural or _suffix_s(singular), animate))
  return tuple(out)


def _verbs(entries) -> tuple[Verb, ...]:
  return tuple(Verb(*_split_form(e)) for e in entries)


NOUNS = _nouns(PEOPLE, True) + _nouns(ANIMALS, True) + _nouns(THINGS, False)
ANIMATE_NOUNS = tuple(n for n in NOUNS if n.animate)
VERBS_INTRANSITIVE = _verbs(INTRANSITIVE)
VERBS_TRANSITIVE = _verbs(TRANSITIVE)
VERBS_SENTENTIAL = _verbs(SENTENTIAL)


def indefinite_article(next_word: str) -> str:
  """'a' or 'an' by the sound of the next word (spelling rule with the common exceptions)."""
  w = next_word.lower()
  if w.startswith(("uni", "use", "usu", "eu", "one")):
    return "a"
  if w.startswith(("hour", "honest", "honou")):
    return "an"
  return "an" if w[:1] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Style:
  """Rule probabilities; each recursive rule's probability is multiplied by `decay` per level."""

  pp: float = 0.3
  relative_clause: float = 0.12
  np_coordination: float = 0.06
  vp_coordination: float = 0.06
  s_coordination: float = 0.08
  sentential_verb: float = 0.1
  adjective: float = 0.35
  degree_adverb: float = 0.2
  adverb: float = 0.2
  copula: float = 0.15
  decay: float = 0.5
  max_depth: int = 4


PARSING = Style()
SPEECH = Style(
  pp=0.25,
  relative_clause=0.0,
  np_coordination=0.0,
  vp_coordination=0.0,
  s_coordination=0.0,
  sentential_verb=0.0,
  adjective=0.3,
  degree_adverb=0.0,
  adverb=0.15,
  copula=0.15,
  max_depth=2,
)


class Generator:
  """Draws one tree at a time from a seeded `random.Random`."""

  def __init__(self, rng: random.Random, style: Style):
    self.rng = rng
    self.style = style

  def _p(self, prob: float, depth: int) -> bool:
    if depth >= self.style.max_depth:
      return False
    return self.rng.random() < prob * self.style.decay**depth

  # Noun phrases ---------------------------------------------------------------------------------

  def noun_phrase(self, depth: int, *, subject: bool, animate: bool = False) -> tuple[Tree, str]:
    """Returns the NP tree and its agreement ("1sg", "3sg" or "pl")."""
    rng = self.rng
    if self._p(self.style.np_coordination, depth):
      left, _ = self.noun_phrase(depth + 1, subject=subject, animate=animate)
      right, _ = self._simple_noun_phrase(depth + 1, subject=subject, animate=animate)
      return ("NP", left, ("CC", rng.choice(("and", "or"))), right), "pl"
    np, agreement = self._simple_noun_phrase(depth, subject=subject, animate=animate)
    if np[1][0] == "PRP":  # pronouns take no modifiers
      return np, agreement
    if self._p(self.style.relative_clause, depth):
      return ("NP", np, self._relative_clause(depth + 1, agreement)), agreement
    if self._p(self.style.pp, depth):
      return ("NP", np, self.prepositional_phrase(depth + 1)), agreement
    return np, agreement

  def _simple_noun_phrase(self, depth: int, *, subject: bool, animate: bool) -> tuple[Tree, str]:
    rng = self.rng
    roll = rng.random()
    if roll < 0.1:
      pronoun = rng.choice(sorted(PRONOUNS))
      if animate and pronoun == "it":
        pronoun = "they"
      obj, _, agreement = PRONOUNS[pronoun]
      return ("NP", ("PRP", pronoun if subject else obj)), agreement
    if roll < 0.18:
      return ("NP", ("NNP", rng.choice(NAMES))), "3sg"
    if roll < 0.2 and not animate:
      return ("NP", ("NNP", rng.choice(PLACES_NNP))), "3sg"
    noun = rng.choice(ANIMATE_NOUNS if animate else NOUNS)
    plural = rng.random() < 0.3
    pre = self._adjectives(depth)
    head = ("NNS", noun.plural) if plural else ("NN", noun.singular)
    det_roll = rng.random()
    if det_roll < 0.12:
      _, possessive, _ = PRONOUNS[rng.choice(sorted(PRONOUNS))]
      det = ("PRP$", possessive)
    elif plural and det_roll < 0.25:
      det = ("CD", rng.choice(NUMBERS))
    elif plural and det_roll < 0.4:
      det = None  # bare plural
    else:
      word = rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS)
      if word == "a":
        word = indefinite_article(_first_word(pre[0]) if pre else head[1])
      det = ("DT", word)
    children = ([det] if det else []) + pre + [head]
    return ("NP", *children), "pl" if plural else "3sg"

  def _adjectives(self, depth: int) -> list[Tree]:
    if self.rng.random() >= self.style.adjective:
      return []
    adjective = ("JJ", self.rng.choice(ADJECTIVES))
    if self._p(self.style.degree_adverb, depth):
      return [("ADJP", ("RB", self.rng.choice(DEGREE_ADVERBS)), adjective)]
    return [adjective]

  def _relative_clause(self, depth: int, agreement: str) -> Tree:
    wh = ("WHNP", ("WDT", self.rng.choice(("that", "which"))))
    return ("SBAR", wh, ("S", self.verb_phrase(depth + 1, agreement, self._tense())))

  def prepositional_phrase(self, depth: int) -> Tree:
    np, _ = self.noun_phrase(depth + 1, subject=False)
    return ("PP", ("IN", self.rng.choice(PREPOSITIONS)), np)

  # Verb phrases ---------------------------------------------------------------------------------

  def _tense(self) -> str:
    return self.rng.choice(("present", "present", "past", "past", "modal"))

  def verb_phrase(self, depth: int, agreement: str, tense: str) -> Tree:
    if self._p(self.style.vp_coordination, depth):
      left = self._simple_verb_phrase(depth + 1, agreement, tense)
      right = self._simple_verb_phrase(depth + 1, agreement, tense)
      return ("VP", left, ("CC", "and"), right)
    return self._simple_verb_phrase(depth, agreement, tense)

  def _simple_verb_phrase(self, depth: int, agreement: str, tense: str) -> Tree:
    if tense == "modal":
      inner = self._verb_phrase_body(depth + 1, "base", agreement)
      return ("VP", ("MD", self.rng.choice(MODALS)), inner)
    return self._verb_phrase_body(depth, tense, agreement)

  def _verb_phrase_body(self, depth: int, form: str, agreement: str) -> Tree:
    rng = self.rng
    if rng.random() < self.style.copula:
      complement = (
        ("ADJP", *self._adjectives_forced(depth))
        if rng.random() < 0.6
        else self.prepositional_phrase(depth + 1)
      )
      return ("VP", _copula(form, agreement), complement)
    if self._p(self.style.sentential_verb, depth):
      verb = rng.choice(VERBS_SENTENTIAL)
      clause = self.clause(depth + 2)
      sbar = ("SBAR", ("IN", "that"), clause) if rng.random() < 0.5 else ("SBAR", clause)
      return ("VP", _verb_leaf(verb, form, agreement), sbar)
    if rng.random() < 0.4:
      verb = rng.choice(VERBS_INTRANSITIVE)
      children = [_verb_leaf(verb, form, agreement)]
    else:
      verb = rng.choice(VERBS_TRANSITIVE)
      obj, _ = self.noun_phrase(depth + 1, subject=False)
      children = [_verb_leaf(verb, form, agreement), obj]
    if self._p(self.style.pp, depth):
      children.append(self.prepositional_phrase(depth + 1))
    elif rng.random() < self.style.adverb:
      children.append(("ADVP", ("RB", rng.choice(ADVERBS))))
    return ("VP", *children)

  def _adjectives_forced(self, depth: int) -> list[Tree]:
    adjective = ("JJ", self.rng.choice(ADJECTIVES))
    if self._p(self.style.degree_adverb, depth):
      return [("RB", self.rng.choice(DEGREE_ADVERBS)), adjective]
    return [adjective]

  # Clauses --------------------------------------------------------------------------------------

  def clause(self, depth: int) -> Tree:
    subject, agreement = self.noun_phrase(depth + 1, subject=True, animate=True)
    return ("S", subject, self.verb_phrase(depth + 1, agreement, self._tense()))

  def sentence(self) -> Tree:
    """A full sentence with its final period, first word capitalised as in the Treebank."""
    if self._p(self.style.s_coordination, 0):
      conj = self.rng.choice(("and", "but"))
      tree = ("S", self.clause(1), (",", ","), ("CC", conj), self.clause(1), (".", "."))
    else:
      tree = (*self.clause(0), (".", "."))
    return _capitalize_first_leaf(tree)


def _copula(form: str, agreement: str) -> Tree:
  if form == "base":
    return ("VB", "be")
  if form == "past":
    return ("VBD", "were" if agreement == "pl" else "was")
  return {"1sg": ("VBP", "am"), "3sg": ("VBZ", "is"), "pl": ("VBP", "are")}[agreement]


def _verb_leaf(verb: Verb, form: str, agreement: str) -> Tree:
  if form == "base":
    return ("VB", verb.base)
  if form == "past":
    return ("VBD", verb.past)
  if agreement == "3sg":
    return ("VBZ", verb.third_singular)
  return ("VBP", verb.base)


def is_leaf(tree: Tree) -> bool:
  return len(tree) == 2 and isinstance(tree[1], str)


def leaves(tree: Tree) -> list[str]:
  if is_leaf(tree):
    return [tree[1]]
  return [word for child in tree[1:] for word in leaves(child)]


def _first_word(tree: Tree) -> str:
  return leaves(tree)[0]


def _capitalize_first_leaf(tree: Tree) -> Tree:
  if is_leaf(tree):
    return (tree[0], tree[1][:1].upper() + tree[1][1:])
  return (tree[0], _capitalize_first_leaf(tree[1]), *tree[2:])


def bracketed(tree: Tree) -> str:
  """The Penn Treebank string form: (S (NP (DT The) (NN dog)) (VP (VBZ barks)) (. .))."""
  if is_leaf(tree):
    return f"({tree[0]} {tree[1]})"
  return f"({tree[0]} " + " ".join(bracketed(child) for child in tree[1:]) + ")"
