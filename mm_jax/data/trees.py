"""Constituency trees as text: Penn brackets in, the paper's linearised targets out, F1 back.

The parsing task follows Vinyals et al. 2015 ("Grammar as a foreign language"), the setup the
MultiModel paper used: the source is the sentence, the target is the tree with the words removed,
POS tags kept (or normalised to XX) and every closing bracket labelled, e.g.
`(S (NP DT NN )NP (VP VBZ )VP . )S`. Leaves stay countable, so labelled brackets (label, start,
end) can be scored against the gold tree without the words.
"""

import collections
import dataclasses
import re

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
# Function tags and co-indices on PTB labels (NP-SBJ-1, NP=2); "-NONE-", "-LRB-" keep theirs.
_FUNCTION_TAG = re.compile(r"(?<=[^-])[-=].*$")


@dataclasses.dataclass
class Node:
  label: str
  children: list  # of Node; a preterminal has exactly one str child, the word

  @property
  def is_preterminal(self) -> bool:
    return len(self.children) == 1 and isinstance(self.children[0], str)


def parse(text: str) -> Node:
  """Reads one Penn-bracketed tree; the PTB's unlabelled outer bracket is dropped."""
  tokens = _TOKEN.findall(text)
  if not tokens or tokens[0] != "(":
    raise ValueError(f"not a bracketed tree: {text[:60]!r}")
  node, end = _parse_at(tokens, 0)
  if end != len(tokens):
    raise ValueError(f"trailing tokens after tree: {tokens[end : end + 5]}")
  while node.label == "" and len(node.children) == 1 and isinstance(node.children[0], Node):
    node = node.children[0]
  return node


def _parse_at(tokens: list[str], i: int) -> tuple[Node, int]:
  i += 1  # "("
  label = ""
  if i < len(tokens) and tokens[i] not in "()":
    label = tokens[i]
    i += 1
  children: list = []
  while i < len(tokens) and tokens[i] != ")":
    if tokens[i] == "(":
      child, i = _parse_at(tokens, i)
      children.append(child)
    else:
      children.append(tokens[i])
      i += 1
  if i >= len(tokens):
    raise ValueError("unbalanced brackets: missing ')'")
  return Node(label, children), i + 1


def clean(node: Node) -> Node | None:
  """The usual PTB clean-up: no traces (-NONE-), no function tags, no emptied constituents."""
  if node.is_preterminal:
    return None if node.label == "-NONE-" else Node(node.label, list(node.children))
  children = [c for c in (clean(c) for c in node.children if isinstance(c, Node)) if c]
  if not children:
    return None
  return Node(_FUNCTION_TAG.sub("", node.label) or node.label, children)


def words(node: Node) -> list[str]:
  if node.is_preterminal:
    return [node.children[0]]
  return [w for c in node.children for w in words(c)]


def to_penn(node: Node) -> str:
  if node.is_preterminal:
    return f"({node.label} {node.children[0]})"
  return f"({node.label} {' '.join(to_penn(c) for c in node.children)})"


def linearize(node: Node, pos_tags: str = "keep") -> str:
  """Tree without words, closing brackets labelled; pos_tags "keep" or "xx" (all tags -> XX)."""
  if pos_tags not in ("keep", "xx"):
    raise ValueError(f"pos_tags={pos_tags!r}: use 'keep' or 'xx'")
  out: list[str] = []

  def walk(n: Node):
    if n.is_preterminal:
      out.append(n.label if pos_tags == "keep" else "XX")
      return
    out.append("(" + n.label)
    for c in n.children:
      walk(c)
    out.append(")" + n.label)

  walk(node)
  return " ".join(out)


def penn_to_example(tree_text: str, pos_tags: str = "keep") -> tuple[str, str]:
  """(sentence, linearised tree) from a Penn-bracketed tree string."""
  tree = clean(parse(tree_text))
  if tree is None:
    raise ValueError("tree is empty after removing traces")
  return " ".join(words(tree)), linearize(tree, pos_tags)


def labelled_brackets(linearized: str) -> collections.Counter:
  """Multiset of (label, first_leaf, end_leaf) from a linearised tree, tolerant of bad output.

  A stray ")X" with nothing open is ignored; brackets left open are closed at the end; a closing
  label that differs from the open one still closes it (the open label counts), as in decoding
  evaluations that score what the model committed to.
  """
  spans: collections.Counter = collections.Counter()
  stack: list[tuple[str, int]] = []
  leaves = 0
  for token in linearized.split():
    if token.startswith("(") and len(token) > 1:
      stack.append((token[1:], leaves))
    elif token.startswith(")") and len(token) > 1:
      if stack:
        label, start = stack.pop()
        spans[(label, start, leaves)] += 1
    else:
      leaves += 1
  while stack:
    label, start = stack.pop()
    spans[(label, start, leaves)] += 1
  return spans


def bracket_counts(predicted: str, gold: str) -> tuple[int, int, int]:
  """(matched, predicted, gold) labelled brackets: what evalb sums over a corpus."""
  pred, ref = labelled_brackets(predicted), labelled_brackets(gold)
  return sum((pred & ref).values()), sum(pred.values()), sum(ref.values())


def precision_recall_f1(matched: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
  precision = matched / n_pred if n_pred else 0.0
  recall = matched / n_gold if n_gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def bracket_f1(predicted: str, gold: str) -> tuple[float, float, float]:
  """Labelled bracket (precision, recall, F1), evalb-style without punctuation deletion."""
  return precision_recall_f1(*bracket_counts(predicted, gold))


def tree_exact(predicted: str, gold: str) -> bool:
  return predicted.split() == gold.split()


def frequent_tokens(linearized_trees, limit: int) -> list[str]:
  """The `limit` most frequent tree tokens (brackets, tags), e.g. as tokenizer symbols."""
  counts = collections.Counter(t for tree in linearized_trees for t in tree.split())
  return [t for t, _ in counts.most_common(limit)]
