"""Negative examples for the reward model (paper §3.2).

The reward model learns from the true (input, output) pairs beside five classes of negative
outputs built from them, "each class equal to the size of the original dataset" and each
negative weighted 1/5 against the class imbalance:

1. ``random_tokens`` - uniformly random vocabulary tokens paired with an existing input;
2. ``repaired``      - outputs re-paired with other inputs (coherent but irrelevant);
3. ``shuffled``      - the words (whitespace-delimited) of the true output in a random order;
4. ``repetitive``    - a correct start that ends in a repeated n-gram (an MLE failure mode);
5. ``copy_input``    - the input repeated as the output (another MLE failure mode).

Categories are a registry (`register_negative`), so another kind of error is one function.
``swap_entities`` - a hallucination-style swap of names and numbers, which the paper's
Discussion suggests - is registered but not in the default list: name it in
``negatives.categories`` (config.OPTIONAL_NEGATIVE_CATEGORIES, which config's validation
accepts; a test ties those constants to `REGISTRY`). Every negative's weight is then 1/6.
A row without a name or number to swap comes back unchanged - about a third of the bundled
data's rows (docs/demo-experiments.md) - and such a row is no error at all: labelled 0, it
would teach the reward model that true outputs are wrong, and in the held-out evaluation it
is a certain tie (counted wrong). So rows that `DROP_UNCHANGED` categories leave unchanged
are left out (the summary's ``left_out_unchanged``), and that class is smaller than the
data; the paper's five keep every row, as the paper sizes them.

Choices the paper leaves open, made here:

- The output budget. The reward model and the policy only ever see `max_output_tokens` (100)
  output tokens, so every negative fits that budget counted with the base model's tokenizer
  (as `modeling.encode_outputs` counts: no special tokens). ``copy_input`` is the input cut to
  the budget at a token boundary: an exact prefix of the input text (as the vocabulary spells
  it), never ending in half a character. ``repetitive`` repeats whole n-grams while they fit.
- ``random_tokens`` draws as many tokens as the true output has (at least 1, at most the
  budget), so length alone does not give the class away. Token ids exclude the special and
  added tokens and ids that decode to no complete character; the decoded text is cut so that
  re-encoding it gives at most that many tokens (re-encoding merges neighbours, so it can be
  a token or two shorter).
- ``repaired`` is a derangement: no row keeps its own output. Identical output texts
  elsewhere in the data are avoided too whenever no text fills more than half of the rows
  (then it is provably possible); otherwise some rows receive an identical text and the
  summary counts them. It needs at least two rows: fewer raises ValueError.
- ``shuffled`` joins the shuffled words with single spaces. With two or more distinct words
  the order always differs from the original; with one distinct word (or none) no other
  order exists and the output is the true one with whitespace normalised. Such rows stay
  (each class is the size of the data, as in the paper) and the summary counts them under
  ``identical_to_true``; the same count covers ``copy_input`` rows whose output equals their
  input, and any other category that could not change a row.
- ``repetitive`` keeps the first k words of the true output (k uniform in 1..all words), then
  repeats an n-gram (n uniform in 1..3) - half the time the last n words of that prefix (the
  loop a model falls into), half the time n consecutive words of the input - as many whole
  times as fit the budget, at least twice (k and then n shrink until two repetitions fit).
  An empty true output gives k = 0 and an n-gram from the input.

Rows come out in the order of the data, each true row followed by its negatives (one per
category, in the configured order). Determinism: each category draws from its own generator
seeded by (seed, category name), so adding or removing a category leaves the others' rows
unchanged.
"""

from __future__ import annotations

import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .config import NegativesConfig
from .io import is_valid_unicode, read_jsonl, write_json, write_jsonl

TRUE = "true"
ROW_FIELDS = ("id", "input", "output", "prompt")
MAX_NGRAM = 3  # repetitive: n-gram length drawn from 1..MAX_NGRAM
MIN_REPEATS = 2  # repetitive: "repeated" means at least twice
#: Categories whose unchanged outputs are left out instead of labelled 0 (module docstring).
DROP_UNCHANGED = frozenset({"swap_entities"})


# ----------------------------------------------------------------------------- registry

NegativeFn = Callable[["NegativeContext", np.random.Generator], list[str]]
REGISTRY: dict[str, NegativeFn] = {}


def register_negative(name: str) -> Callable[[NegativeFn], NegativeFn]:
    """Register `fn(ctx, rng) -> one negative output text per row of ctx.rows` as `name`."""
    if not name or name == TRUE or ":" in name:
        raise ValueError(f"invalid negative category name {name!r}")

    def decorate(fn: NegativeFn) -> NegativeFn:
        if name in REGISTRY:
            raise ValueError(f"negative category {name!r} is already registered")
        REGISTRY[name] = fn
        return fn

    return decorate


# ----------------------------------------------------------------------------- shared context

def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids per text, counted as the reward model counts outputs (no special tokens)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the same ids without the wrapper's per-row conversion (~30%)
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids: Sequence[Sequence[int]]) -> list[str]:
    """Text per id list, special tokens kept and no clean-up of spaces (exact round trips)."""
    if not ids:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the wrapper checks every id in Python first (~3x slower)
        return backend.decode_batch([list(i) for i in ids], skip_special_tokens=False)
    return tokenizer.batch_decode([list(i) for i in ids], clean_up_tokenization_spaces=False)


def special_ids(tokenizer) -> set[int]:
    """Ids of special and added tokens (<|im_end|>, <|endoftext|>, <repo_name>, ...)."""
    found = set(tokenizer.all_special_ids)
    found.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return found


_VOCABULARIES: dict[int, tuple[Any, np.ndarray]] = {}


def random_vocabulary(tokenizer) -> np.ndarray:
    """Ids random_tokens may draw: not special, and decoding alone to complete, non-empty text
    (byte-level BPE has tokens that are a fraction of a UTF-8 character). Cached per tokenizer."""
    cached = _VOCABULARIES.get(id(tokenizer))
    if cached is not None and cached[0] is tokenizer:
        return cached[1]
    excluded = special_ids(tokenizer)
    ids = [i for i in range(len(tokenizer)) if i not in excluded]
    texts = decode(tokenizer, [[i] for i in ids])
    vocab = np.array([i for i, t in zip(ids, texts) if t and "\ufffd" not in t], dtype=np.int64)
    if len(vocab) == 0:
        raise ValueError("the tokenizer has no ordinary tokens to draw random outputs from")
    _VOCABULARIES[id(tokenizer)] = (tokenizer, vocab)
    return vocab


@dataclass
class NegativeContext:
    """What every category function sees: the true rows, the tokenizer and the output budget.
    Token ids of the true outputs and inputs are computed once and shared by the categories."""

    rows: Sequence[dict]
    tokenizer: Any
    max_output_tokens: int

    @property
    def inputs(self) -> list[str]:
        return [r["input"] for r in self.rows]

    @property
    def outputs(self) -> list[str]:
        return [r["output"] for r in self.rows]

    @cached_property
    def output_ids(self) -> list[list[int]]:
        return encode(self.tokenizer, self.outputs)

    @cached_property
    def input_ids(self) -> list[list[int]]:
        return encode(self.tokenizer, self.inputs)

    def count(self, texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in encode(self.tokenizer, texts)]

    def fit(self, texts: Sequence[str], budgets: Sequence[int],
            ids: Sequence[Sequence[int]] | None = None) -> tuple[list[str], list[list[int]]]:
        """Each text cut at a token boundary so that re-encoding it gives <= its budget tokens;
        returns the texts and their token ids.

        A text within its budget is returned unchanged. A cut is the longest decoded token
        prefix that fits and does not end inside a character; with a byte-level tokenizer it
        is an exact prefix of the text (of the text as the vocabulary spells it, when it has
        characters the vocabulary cannot spell). `ids`: the texts' token ids, when known.
        """
        ids = encode(self.tokenizer, texts) if ids is None else ids
        out, out_ids = list(texts), [list(i) for i in ids]
        # row -> tokens to keep; shrinks until the decoded cut re-encodes within the budget
        keep = {i: b for i, (t, b) in enumerate(zip(ids, budgets)) if len(t) > b}
        # The text as the vocabulary spells it, a few tokens past the budget: enough to finish
        # the character a cut may end inside (UTF-8 needs at most 4 bytes).
        spelled = dict(zip(keep, decode(self.tokenizer, [ids[i][: keep[i] + 8] for i in keep])))
        while keep:
            rows = sorted(keep)
            cuts = decode(self.tokenizer, [ids[i][: keep[i]] for i in rows])
            for i, cut, cut_ids in zip(rows, cuts, encode(self.tokenizer, cuts)):
                # A cut inside a multi-byte character decodes to a trailing U+FFFD that the
                # whole text does not have at that place.
                whole = spelled[i].startswith(cut) or not cut.endswith("\ufffd")
                if (len(cut_ids) <= budgets[i] and whole) or keep[i] == 0:
                    out[i], out_ids[i] = cut, cut_ids
                    del keep[i]
                else:
                    keep[i] -= 1
        return out, out_ids


# ----------------------------------------------------------------------------- the categories

@register_negative("random_tokens")
def random_tokens(ctx: NegativeContext, rng: np.random.Generator) -> list[str]:
    """Category 1: "completely random tokens for the outputs paired with existing inputs"."""
    vocab = random_vocabulary(ctx.tokenizer)
    excluded = special_ids(ctx.tokenizer)
    # As long as the true output (its token count), at least one token, within the budget.
    targets = [min(max(len(ids), 1), ctx.max_output_tokens) for ids in ctx.output_ids]
    texts = [""] * len(targets)
    todo = list(range(len(targets)))
    for _ in range(100):  # redraws only when a concatenation spells a special token
        drawn = decode(ctx.tokenizer, [rng.choice(vocab, targets[i]).tolist() for i in todo])
        again = []
        for i, text, ids in zip(todo, *ctx.fit(drawn, [targets[i] for i in todo])):
            if excluded.intersection(ids) or not ids:
                again.append(i)
            else:
                texts[i] = text
        todo = again
        if not todo:
            return texts
    raise RuntimeError(f"random_tokens: could not draw ordinary tokens for rows {todo[:5]}")


@register_negative("repaired")
def repaired(ctx: NegativeContext, rng: np.random.Generator) -> list[str]:
    """Category 2: "existing input and output sequences randomly re-paired"."""
    donors = derangement([o.strip() for o in ctx.outputs], rng)
    return [ctx.rows[d]["output"] for d in donors]


def derangement(keys: Sequence[Any], rng: np.random.Generator) -> list[int]:
    """A random permutation `donor` of range(n) with donor[i] != i for every i, and
    keys[donor[i]] != keys[i] whenever no key fills more than half of the rows.

    Rows are put in a random order with equal keys next to each other (groups in random
    order), and row at position p takes the donor at position p + m (mod n), m = the largest
    group. A group of size g <= m occupies g consecutive positions, so a shift by m leaves it
    when g + m <= n, i.e. always when 2m <= n; a shift by 1..n-1 never maps a row to itself.
    With distinct keys this is a uniformly random cyclic permutation.
    """
    n = len(keys)
    if n < 2:
        raise ValueError(f"re-pairing outputs with other inputs needs at least 2 rows, got {n}")
    shuffled = rng.permutation(n).tolist()
    rank: dict[Any, int] = {}
    for i in shuffled:
        rank.setdefault(keys[i], len(rank))
    order = sorted(shuffled, key=lambda i: rank[keys[i]])  # stable: random order within groups
    largest = max(Counter(keys).values())
    shift = largest if largest < n else 1
    donor = [0] * n
    for p, i in enumerate(order):
        donor[i] = order[(p + shift) % n]
    return donor


@register_negative("shuffled")
def shuffled(ctx: NegativeContext, rng: np.random.Generator) -> list[str]:
    """Category 3: the output's whitespace-delimited words randomly shuffled."""
    return [shuffle_words(o.split(), rng) for o in ctx.outputs]


def shuffle_words(words: list[str], rng: np.random.Generator) -> str:
    """The words in a random order that differs from theirs when 2+ distinct words exist."""
    if len(set(words)) < 2:
        return " ".join(words)  # no other order exists
    new = [words[i] for i in rng.permutation(len(words))]
    if new == words:
        # A rotation by one equals the original only when all words are equal.
        new = new[1:] + new[:1]
    return " ".join(new)


@register_negative("repetitive")
def repetitive(ctx: NegativeContext, rng: np.random.Generator) -> list[str]:
    """Category 4: "outputs that begin correctly but end with repetitive sequences"."""
    budget = ctx.max_output_tokens
    plans = [RepetitionPlan.draw(row, rng) for row in ctx.rows]
    words = sorted({w for plan in plans for w in plan.out_words + plan.gram})
    # Tokens per word, preceded by a space and (for a text's first word) not. Byte-level BPE
    # pre-tokenizes " word" pieces independently, so a single-space join costs the sum; the
    # exact count is still checked on the final texts below.
    counts = ctx.count([" " + w for w in words] + words)
    cost = WordCosts(dict(zip(words, counts[: len(words)])), dict(zip(words, counts[len(words):])))
    repeats = []
    for plan in plans:
        plan.shrink_to_fit(cost, budget)
        repeats.append(plan.most_repeats(cost, budget))
    texts = [plan.text(r) for plan, r in zip(plans, repeats)]
    ids = encode(ctx.tokenizer, texts)
    over = [i for i, t in enumerate(ids) if len(t) > budget and repeats[i] > MIN_REPEATS]
    while over:  # the additive estimate was short: one repetition fewer, while two remain
        for i in over:
            repeats[i] -= 1
            texts[i] = plans[i].text(repeats[i])
        for i, t in zip(over, encode(ctx.tokenizer, [texts[i] for i in over])):
            ids[i] = t
        over = [i for i in over if len(ids[i]) > budget and repeats[i] > MIN_REPEATS]
    return ctx.fit(texts, [budget] * len(texts), ids=ids)[0]  # a row that still overflows


@dataclass
class RepetitionPlan:
    """A repetitive negative: the first k output words, then n words repeated - the last n
    of the prefix (start None) or input words start..start+n."""

    out_words: list[str]
    in_words: list[str]
    k: int
    n: int
    start: int | None

    @classmethod
    def draw(cls, row: dict, rng: np.random.Generator) -> RepetitionPlan:
        out_words = row["output"].split()
        n = int(rng.integers(1, MAX_NGRAM + 1))
        k = int(rng.integers(1, len(out_words) + 1)) if out_words else 0
        from_input = bool(rng.random() < 0.5) or k == 0
        in_words = row["input"].split() if from_input else []
        if in_words:
            start = int(rng.integers(0, max(1, len(in_words) - n + 1)))
            return cls(out_words, in_words, k, n, start)
        if k == 0:
            raise ValueError(f"row id={row['id']!r}: input and output are both empty; "
                             "no words to build a repetitive negative from")
        return cls(out_words, in_words, k, n, None)

    @property
    def prefix(self) -> list[str]:
        return self.out_words[: self.k]

    @property
    def gram(self) -> list[str]:
        if self.start is None:
            return self.out_words[max(0, self.k - self.n): self.k]
        return self.in_words[self.start: self.start + self.n]

    def text(self, repeats: int) -> str:
        return " ".join(self.prefix + self.gram * repeats)

    def _tokens(self, cost: WordCosts) -> tuple[int, int]:
        """(tokens of the prefix, tokens per repetition), the text's first word without the
        space before it."""
        prefix = sum(cost.spaced[w] for w in self.prefix)
        gram = sum(cost.spaced[w] for w in self.gram)
        first = (self.prefix or self.gram)[:1]
        if first:
            prefix -= cost.spaced[first[0]] - cost.first[first[0]]
        return prefix, gram

    def shrink_to_fit(self, cost: WordCosts, budget: int) -> None:
        """Shorten the prefix (to >= 1 word), then the n-gram, until two repetitions fit."""
        def fits() -> bool:
            prefix, gram = self._tokens(cost)
            return prefix + MIN_REPEATS * gram <= budget

        while not fits() and self.k > 1:
            self.k -= 1
        while not fits() and self.n > 1:
            self.n -= 1

    def most_repeats(self, cost: WordCosts, budget: int) -> int:
        """Whole repetitions that fit the budget after the prefix (at least 1)."""
        prefix, gram = self._tokens(cost)
        return max(1, (budget - prefix) // max(1, gram))


@dataclass
class WordCosts:
    spaced: dict[str, int]  # tokens of " " + word
    first: dict[str, int]  # tokens of word alone (the first word of a text)


@register_negative("copy_input")
def copy_input(ctx: NegativeContext, rng: np.random.Generator) -> list[str]:
    """Category 5: "outputs which repeat the input sequence", cut to the output budget."""
    return ctx.fit(ctx.inputs, [ctx.max_output_tokens] * len(ctx.rows), ids=ctx.input_ids)[0]


# Beyond the paper's five (its Discussion): a hallucination-style error. Not in the defaults.

_WORD = re.compile(r"\w+(?:[.,'’-]\w+)*")


def entities(text: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of numbers ("number": starts with a digit) and capitalised words not
    at the start of a sentence ("name") in `text`."""
    found = []
    for m in _WORD.finditer(text):
        word, before = m.group(), m.start() - 1
        while before >= 0 and text[before].isspace():
            before -= 1
        if word[0].isdigit():
            found.append((m.start(), m.end(), "number"))
        elif word[0].isupper() and before >= 0 and text[before] not in ".!?":
            found.append((m.start(), m.end(), "name"))
    return found


@register_negative("swap_entities")
def swap_entities(ctx: NegativeContext, rng: np.random.Generator) -> list[str]:
    """Hallucination-style: one name or number of the output replaced (every occurrence) by a
    different one of the same kind from the input; without such a candidate, two distinct
    entities of one kind in the output trade places; otherwise the output is unchanged."""
    return [swap_one_entity(r["input"], r["output"], rng) for r in ctx.rows]


def swap_one_entity(source: str, output: str, rng: np.random.Generator) -> str:
    spans = entities(output)
    mine = {output[s:e] for s, e, _ in spans}
    pool: dict[str, list[str]] = {}
    for s, e, kind in entities(source):
        if source[s:e] not in mine and source[s:e] not in pool.setdefault(kind, []):
            pool[kind].append(source[s:e])
    kinds = {output[s:e]: kind for s, e, kind in spans}
    swappable = sorted(t for t, kind in kinds.items() if pool.get(kind))
    if swappable:
        old = swappable[int(rng.integers(len(swappable)))]
        candidates = pool[kinds[old]]
        return _replace(output, spans, {old: candidates[int(rng.integers(len(candidates)))]})
    for kind in ("name", "number"):
        same = sorted(t for t, k in kinds.items() if k == kind)
        if len(same) >= 2:
            a, b = (same[i] for i in rng.choice(len(same), 2, replace=False))
            return _replace(output, spans, {a: b, b: a})
    return output


def _replace(text: str, spans: list[tuple[int, int, str]], mapping: dict[str, str]) -> str:
    pieces, last = [], 0
    for s, e, _ in spans:
        if text[s:e] in mapping:
            pieces += [text[last:s], mapping[text[s:e]]]
            last = e
    return "".join(pieces) + text[last:]


# ----------------------------------------------------------------------------- synthesis

def category_rng(seed: int, category: str) -> np.random.Generator:
    """The generator of one category: depends on (seed, name) only, not on the other classes."""
    return np.random.default_rng([seed, zlib.crc32(category.encode("utf-8"))])


def negative_weight(cfg: NegativesConfig) -> float:
    """Weight of each negative row: 1 / number of categories (1/5 in the paper) or cfg.weight."""
    weight = cfg.weight if cfg.weight is not None else 1.0 / len(cfg.categories)
    if not weight > 0:
        raise ValueError(f"NegativesConfig.weight must be > 0, got {cfg.weight!r}")
    return float(weight)


def check_config(cfg: NegativesConfig) -> None:
    if not cfg.categories:
        raise ValueError("NegativesConfig.categories is empty; name at least one category")
    unknown = [c for c in cfg.categories if c not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown negative categories {unknown}; known: {sorted(REGISTRY)}")
    if len(set(cfg.categories)) != len(cfg.categories):
        raise ValueError(f"NegativesConfig.categories repeats a name: {list(cfg.categories)}")
    if not isinstance(cfg.max_output_tokens, int) or cfg.max_output_tokens < 1:
        raise ValueError(f"NegativesConfig.max_output_tokens must be >= 1, "
                         f"got {cfg.max_output_tokens!r}")
    if not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ValueError(f"NegativesConfig.seed must be a non-negative integer, got {cfg.seed!r}")


def check_rows(rows: Sequence[dict], source: str = "rows") -> None:
    """Raise naming the row when a true row is unusable (fields id, input, output, prompt)."""
    if not rows:
        raise ValueError(f"{source}: no rows to build negatives from")
    seen: set[str] = set()
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{source}: row {i} is not an object")
        missing = [k for k in ROW_FIELDS if row.get(k) is None]
        if missing:
            raise ValueError(f"{source}: row {i} (id={row.get('id')!r}) lacks {missing}")
        for key in ("input", "output", "prompt"):
            if not isinstance(row[key], str):
                raise ValueError(f"{source}: row {i} (id={row['id']!r}) field {key!r} is not text")
            if not is_valid_unicode(row[key]):  # the tokenizer cannot encode a lone surrogate
                raise ValueError(f"{source}: row {i} (id={row['id']!r}) field {key!r} is not "
                                 "valid Unicode (it holds a lone surrogate)")
        if str(row["id"]) in seen:
            raise ValueError(f"{source}: row {i} repeats id {row['id']!r}")
        seen.add(str(row["id"]))


def synthesize(rows: Sequence[dict], cfg: NegativesConfig, tokenizer) -> list[dict]:
    """Every true row (label 1, weight 1) followed by one negative per category (label 0).

    Negative rows: id "<id>:<category>", source_id the true row's id, the true row's input and
    prompt, the negative output, label 0.0, weight 1/len(categories) (or cfg.weight).
    Deterministic for cfg.seed; see the module docstring for each category. A category in
    `DROP_UNCHANGED` has no row where its output equals the true one (after stripping).
    """
    check_config(cfg)
    check_rows(rows)
    if "repaired" in cfg.categories and len(rows) < 2:
        raise ValueError(f"the 'repaired' category needs at least 2 rows, got {len(rows)}")
    ctx = NegativeContext(rows, tokenizer, cfg.max_output_tokens)
    weight = negative_weight(cfg)
    made: dict[str, list[str]] = {}
    for name in cfg.categories:
        texts = REGISTRY[name](ctx, category_rng(cfg.seed, name))
        if len(texts) != len(rows):
            raise RuntimeError(f"negative category {name!r} made {len(texts)} outputs "
                               f"for {len(rows)} rows")
        made[name] = texts
    out = []
    for i, row in enumerate(rows):
        base = {"input": row["input"], "prompt": row["prompt"]}
        out.append({"id": row["id"], "source_id": row["id"], **base, "output": row["output"],
                    "label": 1.0, "weight": 1.0, "category": TRUE})
        for name in cfg.categories:
            if name in DROP_UNCHANGED and made[name][i].strip() == row["output"].strip():
                continue
            out.append({"id": f"{row['id']}:{name}", "source_id": row["id"], **base,
                        "output": made[name][i], "label": 0.0, "weight": weight,
                        "category": name})
    return out


def summarize(rows_in: int, synthesized: Sequence[dict], cfg: NegativesConfig) -> dict:
    """Counts per category, weights, how many negatives equal their true output, and how
    many rows `DROP_UNCHANGED` categories left out (unchanged: no error to learn)."""
    truth = {r["source_id"]: r["output"].strip() for r in synthesized if r["category"] == TRUE}
    per_category = Counter(r["category"] for r in synthesized)
    identical = Counter(r["category"] for r in synthesized
                        if r["category"] != TRUE and r["output"].strip() == truth[r["source_id"]])
    weight = negative_weight(cfg)
    return {
        "stage": "negatives",
        "rows_in": rows_in,
        "rows_out": len(synthesized),
        "categories": list(cfg.categories),
        "per_category": {c: per_category[c] for c in (TRUE, *cfg.categories)},
        "weights": {TRUE: 1.0, **{c: weight for c in cfg.categories}},
        "identical_to_true": {c: identical[c] for c in cfg.categories},
        "left_out_unchanged": {c: rows_in - per_category[c] for c in cfg.categories
                               if c in DROP_UNCHANGED},
        "max_output_tokens": cfg.max_output_tokens,
        "seed": cfg.seed,
    }


def build_reward_dataset(train_path: str | os.PathLike, out_path: str | os.PathLike,
                         cfg: NegativesConfig, tokenizer,
                         summary_path: str | os.PathLike | None = None) -> dict:
    """The synthesize_negatives stage: train.jsonl (id, input, output, prompt) -> rm.jsonl.

    Returns the summary (see `summarize`); also writes it to `summary_path` when given.
    """
    rows = list(read_jsonl(train_path))
    check_rows(rows, str(train_path))
    synthesized = synthesize(rows, cfg, tokenizer)
    write_jsonl(out_path, synthesized)
    summary = summarize(len(rows), synthesized, cfg)
    if summary_path is not None:
        write_json(Path(summary_path), summary)
    return summary
