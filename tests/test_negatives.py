"""Negative synthesis (paper §3.2): properties of each category on the real SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lastmile import negatives as neg
from lastmile.config import NEGATIVE_CATEGORIES, NegativesConfig

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Words: common English, names, numbers, punctuation-attached, and arbitrary unicode.
COMMON = ["the", "of", "Alice", "Bob", "Paris", "2019", "3.5", "said,", "government.", "café",
          "über", "日本語", "😀", "don't", "(see", "it)", "a", "a"]
unicode_word = st.text(st.characters(blacklist_categories=("Cs", "Z", "Cc")), min_size=1,
                       max_size=6)
word = st.one_of(st.sampled_from(COMMON), unicode_word)
separator = st.sampled_from([" ", " ", " ", "  ", "\n"])


@st.composite
def texts(draw, min_words=0, max_words=30):
    words = draw(st.lists(word, min_size=min_words, max_size=max_words))
    out = ""
    for i, w in enumerate(words):
        out += (draw(separator) if i else "") + w
    return out


@st.composite
def datasets(draw, min_rows=2, max_rows=6):
    n = draw(st.integers(min_rows, max_rows))
    rows = []
    for i in range(n):
        inp = draw(texts(min_words=1, max_words=80))
        out = draw(st.one_of(texts(0, 30), st.just(inp)))  # sometimes output == input
        rows.append({"id": f"r{i}", "input": inp, "output": out, "prompt": f"Summarize: {inp}"})
    return rows


def outputs_of(rows: list[dict], category: str) -> list[str]:
    return [r["output"] for r in rows if r["category"] == category]


def synth(rows, tokenizer, categories=NEGATIVE_CATEGORIES, **kw):
    return neg.synthesize(rows, NegativesConfig(categories=tuple(categories), **kw), tokenizer)


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- categories

@SETTINGS
@given(rows=datasets(), budget=st.sampled_from([100, 20]), seed=st.integers(0, 2**31))
def test_random_tokens_are_ordinary_tokens_as_long_as_the_true_output(tokenizer, rows,
                                                                      budget, seed):
    made = outputs_of(synth(rows, tokenizer, ["random_tokens"], seed=seed,
                            max_output_tokens=budget), "random_tokens")
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for row, text in zip(rows, made):
        target = min(max(n_tokens(tokenizer, row["output"]), 1), budget)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert not special.intersection(ids)
        assert "\ufffd" not in text
        # Re-encoding may merge a neighbour pair; never longer than the true output's count.
        assert target - max(2, target // 10) <= len(ids) <= target


@SETTINGS
@given(keys=st.lists(st.integers(0, 4), min_size=2, max_size=40), seed=st.integers(0, 2**31))
def test_derangement_is_a_permutation_without_fixed_points_or_equal_keys(keys, seed):
    donor = neg.derangement(keys, np.random.default_rng(seed))
    n = len(keys)
    assert sorted(donor) == list(range(n))
    assert all(donor[i] != i for i in range(n))
    if 2 * max(Counter(keys).values()) <= n:  # possible: then no row gets an equal key
        assert all(keys[donor[i]] != keys[i] for i in range(n))


def test_derangement_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 rows"):
        neg.derangement(["only"], np.random.default_rng(0))


@SETTINGS
@given(rows=datasets(), seed=st.integers(0, 2**31))
def test_repaired_is_a_permutation_of_the_outputs_never_a_rows_own(tokenizer, rows, seed):
    made = outputs_of(synth(rows, tokenizer, ["repaired"], seed=seed), "repaired")
    truth = [r["output"] for r in rows]
    assert Counter(made) == Counter(truth)
    keys = Counter(t.strip() for t in truth)
    if 2 * max(keys.values()) <= len(rows):
        assert all(m.strip() != t.strip() for m, t in zip(made, truth))


@SETTINGS
@given(rows=datasets(), seed=st.integers(0, 2**31))
def test_shuffled_keeps_the_word_multiset_in_another_order(tokenizer, rows, seed):
    made = outputs_of(synth(rows, tokenizer, ["shuffled"], seed=seed), "shuffled")
    for row, text in zip(rows, made):
        words, new = row["output"].split(), text.split()
        assert Counter(new) == Counter(words)
        assert text == " ".join(new)  # single spaces
        if len(set(words)) >= 2:
            assert new != words
        else:
            assert new == words  # one distinct word (or none): no other order exists


def repetition_parts(text: str, output: str, source: str) -> list[tuple[int, list[str], int]]:
    """Every (k, gram, repeats) with text = first k output words + gram repeated >= 2 times,
    the gram being the prefix's last words or consecutive input words."""
    words, out_words, in_words = text.split(), output.split(), source.split()
    found = []
    for k in range(1, len(out_words) + 1) if out_words else [0]:
        if words[:k] != out_words[:k]:
            break
        rest = words[k:]
        for n in range(1, neg.MAX_NGRAM + 1):
            gram = rest[:n]
            if len(gram) < n or len(rest) % n or len(rest) // n < neg.MIN_REPEATS:
                continue
            if gram * (len(rest) // n) != rest:
                continue
            from_prefix = k >= n and out_words[k - n:k] == gram
            from_input = any(in_words[s:s + n] == gram for s in range(len(in_words)))
            if from_prefix or from_input:
                found.append((k, gram, len(rest) // n))
    return found


@SETTINGS
@given(rows=datasets(), seed=st.integers(0, 2**31))
def test_repetitive_starts_correctly_then_repeats_an_ngram_up_to_the_budget(tokenizer, rows,
                                                                           seed):
    budget = 100
    made = outputs_of(synth(rows, tokenizer, ["repetitive"], seed=seed), "repetitive")
    for row, text in zip(rows, made):
        assert n_tokens(tokenizer, text) <= budget
        parts = repetition_parts(text, row["output"], row["input"])
        assert parts, (row, text)
        assert all(k >= 1 for k, _, _ in parts) or not row["output"].split()
        # Up to the budget: one more repetition of its n-gram would not fit.
        assert any(n_tokens(tokenizer, text + " " + " ".join(gram)) > budget
                   for _, gram, _ in parts)


def test_repetitive_example(tokenizer):
    rows = [{"id": "a", "input": "x y z", "output": "The cat sat on the mat.", "prompt": "p"},
            {"id": "b", "input": "u v w", "output": "Dogs bark.", "prompt": "q"}]
    for seed in range(5):
        for row, text in zip(rows, outputs_of(synth(rows, tokenizer, ["repetitive"], seed=seed),
                                              "repetitive")):
            assert repetition_parts(text, row["output"], row["input"])
            assert 90 <= n_tokens(tokenizer, text) <= 100


@SETTINGS
@given(rows=datasets(), budget=st.sampled_from([100, 12]), seed=st.integers(0, 2**31))
def test_copy_input_is_the_input_cut_to_the_output_budget(tokenizer, rows, budget, seed):
    made = outputs_of(synth(rows, tokenizer, ["copy_input"], seed=seed,
                            max_output_tokens=budget), "copy_input")
    for row, text in zip(rows, made):
        if n_tokens(tokenizer, row["input"]) <= budget:
            assert text == row["input"]
        else:
            # The longest token prefix that fits and does not end inside a character: an
            # exact prefix of the input as the vocabulary spells it (a character it cannot
            # spell, e.g. an unassigned code point, decodes to U+FFFD).
            ids = tokenizer(row["input"], add_special_tokens=False)["input_ids"]
            spelled = tokenizer.decode(ids)
            assert spelled.startswith(text)
            assert text == next(c for c in (tokenizer.decode(ids[:k])
                                             for k in range(budget, -1, -1))
                                if spelled.startswith(c) and n_tokens(tokenizer, c) <= budget)


def test_copy_input_of_a_very_long_input_keeps_its_first_tokens(tokenizer):
    long_input = " ".join(f"word{i}" for i in range(5000))
    rows = [{"id": "a", "input": long_input, "output": "short", "prompt": "p"},
            {"id": "b", "input": "日本語" * 200, "output": "x", "prompt": "p"}]
    made = outputs_of(synth(rows, tokenizer, ["copy_input"]), "copy_input")
    ids = tokenizer(long_input, add_special_tokens=False)["input_ids"][:100]
    assert made[0] == tokenizer.decode(ids)
    assert rows[1]["input"].startswith(made[1]) and "\ufffd" not in made[1]
    assert 97 <= n_tokens(tokenizer, made[1]) <= 100


# ----------------------------------------------------------------------------- the dataset

@SETTINGS
@given(rows=datasets())
def test_each_class_is_the_size_of_the_data_with_weight_one_fifth(tokenizer, rows):
    out = synth(rows, tokenizer)
    assert len(out) == 6 * len(rows)
    assert Counter(r["category"] for r in out) == {c: len(rows) for c in ("true",
                                                                         *NEGATIVE_CATEGORIES)}
    by_id = {r["id"]: r for r in rows}
    for r in out:
        src = by_id[r["source_id"]]
        assert (r["input"], r["prompt"]) == (src["input"], src["prompt"])
        if r["category"] == "true":
            assert (r["id"], r["output"], r["label"], r["weight"]) == (src["id"], src["output"],
                                                                      1.0, 1.0)
        else:
            assert r["id"] == f"{src['id']}:{r['category']}"
            assert (r["label"], r["weight"]) == (0.0, pytest.approx(1 / 5))


def test_weight_override_and_one_over_the_number_of_categories(tokenizer, rows10):
    out = synth(rows10, tokenizer, ["shuffled", "copy_input"])
    assert {r["weight"] for r in out if r["category"] != "true"} == {0.5}
    out = synth(rows10, tokenizer, ["shuffled"], weight=0.3)
    assert {r["weight"] for r in out if r["category"] != "true"} == {0.3}


@pytest.fixture
def rows10():
    return [{"id": i, "input": f"Input number {i} talks about Alice and {i * 7} cats in Rome.",
             "output": f"Alice saw {i * 7} cats and {i} dogs.", "prompt": f"P {i}"}
            for i in range(10)]


def test_deterministic_for_a_seed_and_different_across_seeds(tokenizer, rows10):
    a, b = synth(rows10, tokenizer, seed=3), synth(rows10, tokenizer, seed=3)
    assert a == b
    c = synth(rows10, tokenizer, seed=4)
    for category in ("random_tokens", "repaired", "shuffled", "repetitive"):
        assert outputs_of(a, category) != outputs_of(c, category), category
    assert outputs_of(a, "copy_input") == outputs_of(c, "copy_input")  # no randomness


def test_adding_or_dropping_a_category_leaves_the_others_unchanged(tokenizer, rows10):
    five = synth(rows10, tokenizer, seed=1)
    six = synth(rows10, tokenizer, (*NEGATIVE_CATEGORIES, "swap_entities"), seed=1)
    reordered = synth(rows10, tokenizer, ("copy_input", "shuffled", "repaired"), seed=1)
    for category in NEGATIVE_CATEGORIES:
        assert outputs_of(six, category) == outputs_of(five, category)
    for category in ("copy_input", "shuffled", "repaired"):
        assert outputs_of(reordered, category) == outputs_of(five, category)


def test_a_new_category_is_one_registered_function(tokenizer, rows10):
    @neg.register_negative("upper_case")
    def upper_case(ctx, rng):
        return [o.upper() for o in ctx.outputs]

    try:
        out = synth(rows10, tokenizer, ("upper_case", "shuffled"))
        assert outputs_of(out, "upper_case") == [r["output"].upper() for r in rows10]
        with pytest.raises(ValueError, match="already registered"):
            neg.register_negative("upper_case")(upper_case)
    finally:
        del neg.REGISTRY["upper_case"]


def test_a_category_with_the_wrong_number_of_outputs_is_an_error(tokenizer, rows10):
    neg.register_negative("too_few")(lambda ctx, rng: ctx.outputs[:-1])
    try:
        with pytest.raises(RuntimeError, match="'too_few' made 9 outputs for 10 rows"):
            synth(rows10, tokenizer, ("too_few",))
    finally:
        del neg.REGISTRY["too_few"]


# ----------------------------------------------------------------------------- swap_entities

def test_swap_entities_replaces_a_name_or_number_with_one_from_the_input():
    source = "Alice met Bob in Paris in 2019. They spent 40 euros."
    output = "Yesterday Alice went to Paris, spending 40 euros."
    seen = set()
    for seed in range(30):
        text = neg.swap_one_entity(source, output, np.random.default_rng(seed))
        changed = [(a, b) for a, b in zip(output.split(), text.split()) if a != b]
        assert len(text.split()) == len(output.split()) and len(changed) == 1
        seen.add(changed[0])
    # Names swap with names, numbers with numbers; never a word already in the output.
    assert seen <= {("Alice", "Bob"), ("Paris,", "Bob,"), ("40", "2019")}
    assert len(seen) >= 2


def test_swap_entities_trades_two_output_entities_without_input_candidates():
    text = neg.swap_one_entity("nothing here", "The match Leeds v Hull ended 2 to 1.",
                               np.random.default_rng(0))
    assert text in ("The match Hull v Leeds ended 2 to 1.", "The match Leeds v Hull ended 1 to 2.")
    assert neg.swap_one_entity("x", "all lower case.", np.random.default_rng(0)) == \
        "all lower case."


def test_swap_entities_is_registered_but_not_a_default(tokenizer, rows10):
    assert "swap_entities" in neg.REGISTRY and "swap_entities" not in NEGATIVE_CATEGORIES
    cfg = NegativesConfig(categories=("shuffled", "swap_entities"))
    out = neg.synthesize(rows10, cfg, tokenizer)
    made = {r["source_id"]: r["output"] for r in out if r["category"] == "swap_entities"}
    # Row 0 ("Alice saw 0 cats and 0 dogs.") has no name to swap and one distinct number: its
    # output would come back unchanged, no error at all, so the class leaves that row out.
    assert neg.swap_one_entity(rows10[0]["input"], rows10[0]["output"],
                               np.random.default_rng(0)) == rows10[0]["output"]
    assert sorted(made) == sorted(r["id"] for r in rows10[1:])
    assert all(made[r["id"]] != r["output"] for r in rows10[1:])
    assert len(outputs_of(out, "shuffled")) == 10  # the paper's classes keep every row
    summary = neg.summarize(10, out, cfg)
    assert summary["per_category"] == {"true": 10, "shuffled": 10, "swap_entities": 9}
    assert summary["left_out_unchanged"] == {"swap_entities": 1}
    assert summary["identical_to_true"]["swap_entities"] == 0


def test_config_constants_name_every_registered_category():
    from lastmile import config

    assert set(config.ALL_NEGATIVE_CATEGORIES) == set(neg.REGISTRY)
    assert not set(config.OPTIONAL_NEGATIVE_CATEGORIES) & set(NEGATIVE_CATEGORIES)
    assert "swap_entities" in config.describe("negatives.categories")


def test_config_accepts_swap_entities_from_a_parameter_or_a_config_file():
    from lastmile import config

    six = ",".join((*NEGATIVE_CATEGORIES, "swap_entities"))
    profile = config.resolve("demo", {"negatives.categories": six})  # --param K=a,b,...
    assert profile.negatives.categories == (*NEGATIVE_CATEGORIES, "swap_entities")
    yaml_text = "negatives:\n  categories: [repaired, swap_entities]\n"  # --config / overrides
    profile = config.resolve("demo", config.parse_overrides(yaml_text))
    assert profile.negatives.categories == ("repaired", "swap_entities")
    assert neg.negative_weight(profile.negatives) == 0.5
    assert config.resolve("demo").negatives.categories == NEGATIVE_CATEGORIES  # not a default


@pytest.mark.parametrize("value, why", [("repaired,swapped", "unknown swapped"),
                                        ("repaired,repaired", "a name repeats"),
                                        ("", "none named")])
def test_config_rejects_bad_categories_listing_the_choices(value, why):
    from lastmile import config

    with pytest.raises(config.ConfigError) as err:
        config.resolve("smoke", {"negatives.categories": value})
    message = str(err.value)
    assert message.startswith(f"negatives.categories: {why}; choose one or more of ")
    assert all(c in message for c in config.ALL_NEGATIVE_CATEGORIES)


# ----------------------------------------------------------------------------- edge cases

def test_one_row_cannot_be_repaired_but_works_without_that_category(tokenizer):
    rows = [{"id": "only", "input": "An input.", "output": "An output.", "prompt": "p"}]
    with pytest.raises(ValueError, match="'repaired' category needs at least 2 rows, got 1"):
        synth(rows, tokenizer)
    out = synth(rows, tokenizer, ("random_tokens", "shuffled", "repetitive", "copy_input"))
    assert len(out) == 5


def test_edge_rows(tokenizer):
    rows = [{"id": "empty", "input": "Some input words here.", "output": "", "prompt": "p"},
            {"id": "one", "input": "Yes or no?", "output": "Yes", "prompt": "p"},
            {"id": "same", "input": "Echo this.", "output": "Echo this.", "prompt": "p"},
            {"id": "uni", "input": "Ünïcödé 日本語 😀 text.", "output": "日本語 😀",
             "prompt": "p"}]
    out = {r["id"]: r["output"] for r in synth(rows, tokenizer)}
    assert out["empty:random_tokens"] and out["empty:repetitive"]  # never empty
    assert out["one:shuffled"] == "Yes"
    assert out["same:copy_input"] == "Echo this."
    assert out["uni:copy_input"] == "Ünïcödé 日本語 😀 text."
    summary = neg.summarize(len(rows), synth(rows, tokenizer), NegativesConfig())
    # empty->"" shuffled, "Yes" shuffled, "Echo this." copied, "日本語 😀" shuffled is 2 words
    assert summary["identical_to_true"]["shuffled"] == 2
    assert summary["identical_to_true"]["copy_input"] == 1


@pytest.mark.parametrize("rows, message", [
    ([], "no rows"),
    ([{"id": "a", "input": "x", "output": "y"}], r"row 1 \(id='a'\) lacks \['prompt'\]"),
    ([{"id": "a", "input": "x", "output": 3, "prompt": "p"}], "field 'output' is not text"),
    ([{"id": "a", "input": "x", "output": "y", "prompt": "p"},
      {"id": "a", "input": "z", "output": "w", "prompt": "p"}], "row 2 repeats id 'a'"),
    ([{"id": "a", "input": "", "output": "", "prompt": "p"},
      {"id": "b", "input": "z", "output": "w", "prompt": "p"}], "id='a'.*both empty"),
])
def test_bad_rows_raise_naming_the_row(tokenizer, rows, message):
    with pytest.raises(ValueError, match=message):
        synth(rows, tokenizer)


@pytest.mark.parametrize("change, message", [
    ({"categories": ("shuffled", "bogus")}, r"unknown negative categories \['bogus'\]"),
    ({"categories": ()}, "categories is empty"),
    ({"categories": ("shuffled", "shuffled")}, "repeats a name"),
    ({"max_output_tokens": 0}, "max_output_tokens must be >= 1"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"weight": 0.0}, "weight must be > 0"),
])
def test_bad_config_raises_naming_the_parameter(tokenizer, rows10, change, message):
    cfg = dataclasses.replace(NegativesConfig(), **change)
    with pytest.raises(ValueError, match=message):
        neg.synthesize(rows10, cfg, tokenizer)


# ----------------------------------------------------------------------------- the stage

def test_build_reward_dataset_writes_rm_jsonl_and_summary(tokenizer, rows10, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({**r, "id": f"t{r['id']}"}) + "\n" for r in rows10))
    summary = neg.build_reward_dataset(train, tmp_path / "rm" / "rm.jsonl", NegativesConfig(),
                                       tokenizer, summary_path=tmp_path / "s.json")
    written = [json.loads(line) for line in (tmp_path / "rm" / "rm.jsonl").open()]
    assert written == synth([{**r, "id": f"t{r['id']}"} for r in rows10], tokenizer)
    assert summary == json.loads((tmp_path / "s.json").read_text())
    assert summary["stage"] == "negatives"
    assert (summary["rows_in"], summary["rows_out"]) == (10, 60)
    assert summary["per_category"] == {"true": 10, **{c: 10 for c in NEGATIVE_CATEGORIES}}
    assert summary["weights"] == {"true": 1.0, **{c: 0.2 for c in NEGATIVE_CATEGORIES}}


def test_build_reward_dataset_names_the_file_of_a_bad_row(tokenizer, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"id": "a", "input": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError, match="train.jsonl: row 1"):
        neg.build_reward_dataset(train, tmp_path / "rm.jsonl", NegativesConfig(), tokenizer)


def test_thousands_of_rows_take_seconds(tokenizer):
    rng = np.random.default_rng(0)
    vocab = ["the", "a", "Alice", "said", "government", "in", "2019", "of", "Paris", "were"]
    rows = [{"id": i, "input": " ".join(rng.choice(vocab, 250)), "prompt": "p",
             "output": " ".join(rng.choice(vocab, int(rng.integers(3, 40))))}
            for i in range(3000)]
    started = time.perf_counter()
    out = synth(rows, tokenizer)
    elapsed = time.perf_counter() - started
    assert len(out) == 18000
    assert elapsed < 20, f"3000 rows took {elapsed:.1f} s"
