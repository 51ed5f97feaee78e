"""Concepts files and human references: validation with one-line errors, and the negatives drawn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actdb.compute.concepts.concept_file import parse_concepts, read_reference, sentences_of
from actdb.store.errors import ActdbError


def line(name, positive, parents=(), negative=None):
    item = {"concept": name, "parents": list(parents), "positive": positive}
    if negative is not None:
        item["negative"] = negative
    return json.dumps(item)


def test_negatives_are_drawn_outside_ancestors_and_descendants():
    text = "\n".join(
        [
            line("animal", ["a1", "a2"]),
            line("dog", ["d1", "d2", "d3"], ["animal"]),
            line("oak", ["o1", "o2", "o3"]),
            line("car", ["c1"], negative=["x1"]),
        ]
    )
    cs = parse_concepts(text)
    s = sentences_of(cs, seed=0)
    neg_dog = {s.texts[i] for i in s.negative["dog"]}
    assert len(neg_dog) == 3 and not neg_dog & {"a1", "a2", "d1", "d2", "d3"}
    neg_animal = {s.texts[i] for i in s.negative["animal"]}
    assert not neg_animal & {"d1", "d2", "d3", "a1", "a2"}
    assert [s.texts[i] for i in s.negative["car"]] == ["x1"]
    assert sentences_of(cs, seed=0).negative["dog"].tolist() == s.negative["dog"].tolist()  # seeded
    assert len(s.texts) == len(set(s.texts))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (line("a", ["x"]) + "\n" + line("a", ["y"]), "listed twice"),
        (line("a", []) + "\n" + line("b", ["y"]), "positive is empty"),
        (line("a", ["x"], ["b"]) + "\n" + line("b", ["y"], ["a"]), "cycle: a -> b -> a"),
        (line("a", ["x"], negative=["x"]) + "\n" + line("b", ["y"]), "both positive and negative"),
        (line("a", ["x"]), "at least 2"),
        ('{"concept": "a", "positive": ["x"], "colour": 1}\n' + line("b", ["y"]), "unknown keys"),
        ("not json\n", "is not JSON"),
    ],
)
def test_bad_concepts_files_fail_with_one_line(text, message):
    with pytest.raises(ActdbError, match=message) as err:
        parse_concepts(text)
    assert "\n" not in str(err.value)


def test_a_concept_with_no_possible_negatives_is_refused():
    cs = parse_concepts(line("animal", ["a"]) + "\n" + line("dog", ["d"], ["animal"]))
    with pytest.raises(ActdbError, match="no negatives"):
        sentences_of(cs, 0)


def test_references_pairs_triplets_and_missing_concepts(tmp_path):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("concept_a,concept_b,similarity\na,b,0.9\na,c,0.1\nb,c,0.2\n")
    ref = read_reference(pairs, ["a", "b", "c"])
    assert ref.similarity[1, 0] == 0.9 and ref.triplets is None
    with pytest.raises(ActdbError, match="does not cover these concepts of the set: d"):
        read_reference(pairs, ["a", "b", "c", "d"])
    assert read_reference(pairs, ["a", "b"]).n_ignored == 2  # rows naming concepts outside the set
    trip = tmp_path / "trip.csv"
    trip.write_text("a,b,c,odd\na,b,c,c\n")
    ref = read_reference(trip, ["a", "b", "c"])
    assert ref.triplets.tolist() == [[0, 1, 2, 2]] and ref.similarity[0, 1] == 1.0
    assert np.isfinite(ref.similarity).all()
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(ActdbError, match="header"):
        read_reference(bad, ["a", "b"])


def test_the_python_concepts_file_the_demo_writes(tmp_path):
    from actdb.compute.concepts.concept_file import read_concepts
    from actdb.compute.concepts.python_concepts import TAXONOMY, write_python_concepts
    from actdb.store.ingest.zoo import stdlib_files

    path = write_python_concepts(stdlib_files()[150:], tmp_path / "py.jsonl", per_concept=20)
    cs = read_concepts(path)
    assert set(cs.names) == set(TAXONOMY) | {"control_flow", "data"}
    assert all(len(c.positive) == 20 for c in cs.concepts)
    assert cs.parents["loop"] == ("control_flow",) and cs.descendants("data") == {
        "list",
        "dict",
        "string_literal",
        "number",
    }
    every = [t for c in cs.concepts for t in c.positive]
    assert len(every) == len(set(every))  # no snippet serves two concepts
    loops = [t for t in cs.concepts[cs.names.index("loop")].positive]
    assert all(t.startswith(("for ", "while ", "async for ")) for t in loops)
    s = sentences_of(cs, 0)
    assert all(len(s.negative[n]) == 20 for n in cs.names)
