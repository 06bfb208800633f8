import json
from collections import Counter

import pytest

from ccli.data import SPAN_WORDS, is_heldout, load_paragraphs, with_short_spans
from ccli.errors import CcliError
from ccli.recipes import load_recipe


def test_bundled_split_is_fixed_and_disjoint():
    train, heldout = load_paragraphs(None, "train"), load_paragraphs(None, "heldout")
    assert len(train) > 3000 and len(heldout) > 300
    assert not set(train) & set(heldout)
    assert all(is_heldout(p) for p in heldout)
    assert load_paragraphs("bundled", "heldout") == heldout  # same every time


def test_each_domain_has_a_fixed_disjoint_split_and_left_out_domains_never_train():
    from ccli.data import DOMAINS, trained_domains

    assert sum(d.left_out for d in DOMAINS) >= 2 and len(DOMAINS) >= 8
    seen: dict[str, str] = {}
    for d in DOMAINS:
        train, heldout = load_paragraphs(f"bundled:{d.name}", "train"), load_paragraphs(f"bundled:{d.name}", "heldout")
        assert len(heldout) >= 30, d.name
        assert not set(train) & set(heldout) and all(is_heldout(p, d.heldout_tenths) for p in heldout)
        for p in train + heldout:  # no paragraph is in two domains
            assert seen.setdefault(p, d.name) == d.name, (p, d.name, seen[p])
    trained = set(load_paragraphs(None, "all"))
    for d in DOMAINS:
        assert (d.name in trained_domains(None)) != d.left_out
        if d.left_out:
            assert not trained & set(load_paragraphs(f"bundled:{d.name}", "all"))


def test_evaluation_sets_name_the_domains_and_score_a_users_file_as_its_own(tmp_path):
    from ccli.data import DOMAINS, evaluation_sets

    own = tmp_path / "my-notes.txt"
    own.write_text("\n".join(f"Note number {i} says the quick brown fox jumps over the lazy dog again." for i in range(400)))
    sets = evaluation_sets(str(own), per_domain=16)
    assert [s.name for s in sets] == [d.name for d in DOMAINS] + ["my-notes.txt"]
    assert [s.seen for s in sets] == [False] * len(DOMAINS) + [True]  # trained on the file alone
    assert all(0 < len(s.paragraphs) <= 16 for s in sets)
    bundled = evaluation_sets(None, extra=str(own), per_domain=16)
    assert [s.seen for s in bundled] == [not d.left_out for d in DOMAINS] + [False]
    with pytest.raises(CcliError, match="unknown bundled domain 'nope'"):
        load_paragraphs("bundled:nope")


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("First paragraph\nstill first.\n\nSecond one.\n")
    assert load_paragraphs(str(txt), "all") == ["First paragraph still first.", "Second one."]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "hello there"}) + "\n" + json.dumps({"text": "general kenobi"}) + "\n")
    assert load_paragraphs(str(jsonl), "all") == ["hello there", "general kenobi"]


@pytest.mark.parametrize("content, message", [
    ("{not json\n", "not valid JSON"),
    ('{"txt": "x"}\n', "needs a string field 'text'"),
])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CcliError, match=message):
        load_paragraphs(str(path), "all")


def test_missing_data_file():
    with pytest.raises(CcliError, match="no such file"):
        load_paragraphs("/nope/x.txt")


def _recipe(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert {"fff-minilm.yaml", "ternary-minilm.yaml"} <= {r.name for r in recipes}
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe["convert"]


@pytest.mark.parametrize("text, message", [
    ("convert: [{to: fff, dept: 3}]", "unknown key 'convert\\[0\\].dept'"),
    ("convert: [{to: fff}]\ndistil: {steps: 3}", "unknown key 'distil'"),
    ("convert: [{to: fff}]\ndistill: {stepz: 3}", "unknown key 'distill.stepz'"),
    ("convert: [{to: fff, depth: three}]", "'convert\\[0\\].depth' must be an integer"),
    ("convert: [{to: moo}]", "is not a variant family"),
    ("convert: []", "non-empty list"),
    ("convert: [{to: fff}]\ndistill: {lr: fast}", "'distill.lr' must be a number"),
    ("convert: [{to: fff}]\ndistill: {short_spans: many}", "'distill.short_spans' must be a number"),
    ("convert: [{to: fff}]\ndistill: {e2e_target: 2}", "'distill.e2e_target' must be a string"),
    ("- just\n- a list", "top level must be a mapping"),
    ("convert: [{to: fff\n", "not valid YAML"),
    ("convert: [{to: ternary, act_bits: '8'}]", "'convert\\[0\\].act_bits' must be an integer"),
    ("convert: [{to: ternary, targets: 3}]", "'convert\\[0\\].targets' must be a string"),
    ("convert: [{to: int8, head: 1}]", "'convert\\[0\\].head' must be true or false"),
    ("convert: [{to: mod, capacity: true}]", "'convert\\[0\\].capacity' must be a number"),
    ("convert: [{to: ternary, depth: 3}]", "unknown key 'convert\\[0\\].depth' for ternary"),
    ("convert: [{to: fff, layers: 3}]", "'convert\\[0\\].layers' must be a list of block indices"),
])
def test_malformed_recipes_name_the_bad_key(tmp_path, text, message):
    with pytest.raises(CcliError, match=message):
        load_recipe(_recipe(tmp_path, text))


def test_recipe_reads_scientific_notation(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "convert: [{to: fff, depth: 2}]\ndistill: {lr: 1e-3}"))
    assert recipe["distill"]["lr"] == pytest.approx(1e-3)


def test_short_spans_are_cut_from_the_paragraphs():
    paragraphs = load_paragraphs(None, "train")[:200]
    assert with_short_spans(paragraphs, 0.0) == paragraphs
    mixed = with_short_spans(paragraphs, 0.5, seed=3)
    assert mixed[: len(paragraphs)] == paragraphs and len(mixed) == len(paragraphs) + 100
    assert mixed == with_short_spans(paragraphs, 0.5, seed=3)  # deterministic
    assert mixed != with_short_spans(paragraphs, 0.5, seed=4)
    lengths = []
    for span in mixed[len(paragraphs):]:
        words = span.split()
        lengths.append(len(words))
        assert len(words) <= SPAN_WORDS[1]
        assert any(f" {span} " in f" {p} " and (len(words) >= SPAN_WORDS[0] or len(p.split()) == len(words))
                   for p in paragraphs)  # a contiguous run of whole words of one paragraph
    assert min(lengths) < 8 and max(lengths) > 32  # log-uniform: both short and long spans


def test_training_text_deals_every_domain_into_every_stretch():
    from ccli.data import trained_domains, training_text

    text = training_text(None, 0.5, seed=0)
    assert text == training_text(None, 0.5, seed=0)  # seeded
    names = trained_domains(None)
    per_domain = {n: set(load_paragraphs(f"bundled:{n}", "train")) for n in names}
    train = load_paragraphs(None, "train")
    assert not Counter(train) - Counter(text)  # every training paragraph, plus spans of them
    assert len(text) == len(train) + sum(round(0.5 * len(ps)) for ps in map(list, per_domain.values()))
    head = text[: 4 * len(names)]
    for n in names:  # every domain is in the first few turns
        assert any(p in per_domain[n] for p in head), n
    spans = [p for p in text[:400] if not any(p in ps for ps in per_domain.values())]
    assert spans  # and the short spans are mixed in from the start


def test_recipe_reads_a_whole_number_for_a_float_option(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("convert: [{to: mod, capacity: 1}]\n")
    step = load_recipe(path)["convert"][0]
    assert step["capacity"] == 1.0 and isinstance(step["capacity"], float)
