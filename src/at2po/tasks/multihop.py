"""A synthetic multi-hop QA world: the quickstart's embedded task (no downloads).

A seeded world of invented entities (people, companies, cities, countries) linked by relations
(born_in, works_for, founded_by, based_in, located_in). Every entity has one passage in a
Search-R1 style corpus (``{"id", "contents"}``) that states each of its facts as a sentence
starting with its name, so a BM25 search for a name ranks that entity's passage first (its name
occurs once per fact; any other passage mentions it at most once). Questions follow a chain of
1-3 relations, e.g. "In which country was the founder of Zorbex born?" (founded_by -> born_in ->
located_in), and are solved by searching each entity of the chain in turn. Every held-out
test question uses at least one fact that no training question's chain uses, so it cannot be
answered from facts memorised during training, only by searching.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from at2po.agent import format_observation
from at2po.tasks.base import Demonstration

__all__ = [
    "Demonstration",
    "MultiHopConfig",
    "RELATIONS",
    "World",
    "build_world",
    "demonstration",
]

# relation -> (subject kind, object kind, sentence with {s} and {o}); the sentence is used both
# in passages and in the demonstrations' think steps. The word right before the object differs
# between relations ("in", "for", "by", "at", "of"), so that the object a turn needs is the one
# word of the search result that follows that word: a copy a tiny model learns quickly.
RELATIONS: dict[str, tuple[str, str, str]] = {
    "born_in": ("person", "city", "{s} was born in {o}."),
    "works_for": ("person", "company", "{s} works for {o}."),
    "founded_by": ("company", "person", "{s} was founded by {o}."),
    "based_in": ("company", "city", "{s} is based at {o}."),
    "located_in": ("city", "country", "{s} is a city of {o}."),
}

# Question templates by relation path; {x} is the chain's first entity.
TEMPLATES: dict[tuple[str, ...], str] = {
    ("born_in",): "Where was {x} born?",
    ("works_for",): "Which company does {x} work for?",
    ("founded_by",): "Who founded {x}?",
    ("based_in",): "In which city is {x} based?",
    ("located_in",): "In which country is {x}?",
    ("born_in", "located_in"): "In which country was {x} born?",
    ("works_for", "founded_by"): "Who founded the company that {x} works for?",
    ("works_for", "based_in"): "In which city is the company that {x} works for based?",
    ("founded_by", "born_in"): "Where was the founder of {x} born?",
    ("founded_by", "works_for"): "Which company does the founder of {x} work for?",
    ("based_in", "located_in"): "In which country is {x} based?",
    ("founded_by", "born_in", "located_in"): "In which country was the founder of {x} born?",
    ("works_for", "founded_by", "born_in"): "Where was the founder of the company that {x} works for born?",
    ("works_for", "based_in", "located_in"): "In which country is the company that {x} works for based?",
}

KINDS = ("person", "company", "city", "country")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "s", "l", "x", "m")

# Words of the passages, questions and prompt that a name must not collide with (BM25 would
# confuse a name with a template word).
_RESERVED = frozenset(
    w.strip("?.,").lower()
    for text in [*TEMPLATES.values(), *(r[2] for r in RELATIONS.values())]
    for w in text.split()
) | {"page", "result", "search", "answer", "think", "final", "boxed", "question", "country", "city"}


@dataclass
class MultiHopConfig:
    """Size and split of the world. Everything is a deterministic function of these fields."""

    seed: int = 0
    # Seed of the facts and splits (None: ``seed``). Worlds that differ only here share every
    # name but (except by chance) no fact: the warm start learns to read search results on such
    # "sister" worlds, with nothing to memorise about the world RL is run on.
    fact_seed: int | None = None
    n_people: int = 60
    n_companies: int = 20
    n_cities: int = 20
    n_countries: int = 8
    # Questions per split, at most: a hop count whose pool runs short contributes all it has.
    n_train: int = 400
    n_test: int = 100
    # Relative frequency of 1-, 2- and 3-hop questions in each split.
    train_hop_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    test_hop_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Share of the facts held out: a question whose chain uses one goes to the test pool.
    test_fact_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name in ("n_people", "n_companies", "n_cities", "n_countries"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        for name in ("train_hop_weights", "test_hop_weights"):
            weights = tuple(float(w) for w in getattr(self, name))
            if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"{name} must be 3 non-negative weights with a positive sum, got {weights}")
            setattr(self, name, weights)
        if not 0 < self.test_fact_fraction < 1:
            raise ValueError(f"test_fact_fraction must be in (0, 1), got {self.test_fact_fraction}")


@dataclass
class World:
    """Entities, facts, the passage corpus and the question splits."""

    config: MultiHopConfig
    kinds: dict[str, str]  # entity name -> kind
    facts: dict[str, dict[str, str]]  # entity name -> {relation: object name}
    corpus: list[dict[str, str]]  # {"id", "contents"}: one passage per entity
    splits: dict[str, list[dict[str, Any]]] = field(repr=False)

    def questions(self, split: str) -> list[dict[str, Any]]:
        """Questions of "train" or "test": dicts {"id", "question", "golds", "hops", "chain", "relations"}."""
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(self.splits)}")
        return self.splits[split]

    def passage(self, name: str) -> str:
        """The corpus text of entity ``name``."""
        return _passage(name, self.kinds[name], self.facts[name])

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write corpus.jsonl and {train,test}.jsonl (FlashRAG layout); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"corpus": out / "corpus.jsonl"}
        _write_jsonl(paths["corpus"], self.corpus)
        for split, rows in self.splits.items():
            paths[split] = out / f"{split}.jsonl"
            _write_jsonl(
                paths[split],
                (
                    {
                        "id": q["id"],
                        "question": q["question"],
                        "golden_answers": q["golds"],
                        "metadata": {"hops": q["hops"], "chain": q["chain"], "relations": q["relations"]},
                    }
                    for q in rows
                ),
            )
        return paths


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _make_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """``count`` new capitalised names of 2-3 syllables, unique (also against ``taken``)."""
    names: list[str] = []
    while len(names) < count:
        n_syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n_syllables)) + rng.choice(_CODAS)
        if len(word) > 8 or word in _RESERVED or word.capitalize() in taken:
            continue
        taken.add(word.capitalize())
        names.append(word.capitalize())
    return names


def _passage(name: str, kind: str, facts: dict[str, str]) -> str:
    # One sentence per fact, each starting with the name: the name's term frequency in its own
    # passage (>= 2) beats its single mention in any other passage, so BM25 ranks it first.
    sentences = [f"{name} is a {kind}."] + [RELATIONS[rel][2].format(s=name, o=obj) for rel, obj in facts.items()]
    return " ".join(sentences)


def _chain(facts: dict[str, dict[str, str]], start: str, relations: Sequence[str]) -> list[str]:
    chain = [start]
    for rel in relations:
        chain.append(facts[chain[-1]][rel])
    return chain


def _sample_by_hops(rng: random.Random, pool: list[dict], n: int, weights: Sequence[float]) -> list[dict]:
    """``n`` questions from ``pool`` (without replacement) with hop counts in proportion to ``weights``."""
    by_hops = {h: [q for q in pool if q["hops"] == h] for h in (1, 2, 3)}
    total = sum(weights)
    quotas = {h: round(n * w / total) for h, w in zip((1, 2, 3), weights)}
    chosen: list[dict] = []
    for h in (1, 2, 3):
        candidates = by_hops[h]
        rng.shuffle(candidates)
        chosen += candidates[: quotas[h]]
    rng.shuffle(chosen)
    return chosen


def build_world(cfg: MultiHopConfig | None = None) -> World:
    """Build the world, corpus and splits deterministically from ``cfg`` (its seed included)."""
    cfg = cfg or MultiHopConfig()
    name_rng = random.Random(cfg.seed)
    taken: set[str] = set()
    people = _make_names(name_rng, cfg.n_people, taken)
    companies = _make_names(name_rng, cfg.n_companies, taken)
    cities = _make_names(name_rng, cfg.n_cities, taken)
    countries = _make_names(name_rng, cfg.n_countries, taken)
    rng = random.Random(f"facts-{cfg.seed if cfg.fact_seed is None else cfg.fact_seed}")
    kinds = {n: k for k, names in zip(KINDS, (people, companies, cities, countries)) for n in names}

    facts: dict[str, dict[str, str]] = {n: {} for n in kinds}
    for person in people:
        facts[person]["born_in"] = rng.choice(cities)
        facts[person]["works_for"] = rng.choice(companies)
    # Founders are distinct people, and none works for the company they founded (so no chain
    # revisits an entity).
    for company, founder in zip(companies, rng.sample(people, len(companies))):
        facts[company]["founded_by"] = founder
        facts[company]["based_in"] = rng.choice(cities)
        if facts[founder]["works_for"] == company:
            facts[founder]["works_for"] = rng.choice([c for c in companies if c != company])
    for city in cities:
        facts[city]["located_in"] = rng.choice(countries)

    corpus = [{"id": str(i), "contents": _passage(n, kinds[n], facts[n])} for i, n in enumerate(kinds)]

    # Held-out facts (subject, relation): a test question needs at least one, so it cannot be
    # answered from what training questions teach about the world, only by searching.
    all_facts = [(name, rel) for name, rels in facts.items() for rel in rels]
    test_facts = set(rng.sample(all_facts, max(1, round(len(all_facts) * cfg.test_fact_fraction))))
    pools: dict[str, list[dict]] = {"train": [], "test": []}
    for relations, template in TEMPLATES.items():
        subject_kind = RELATIONS[relations[0]][0]
        for start in (n for n, k in kinds.items() if k == subject_kind):
            chain = _chain(facts, start, relations)
            if len(set(chain)) < len(chain):
                continue
            held_out = any((chain[i], rel) in test_facts for i, rel in enumerate(relations))
            pools["test" if held_out else "train"].append(
                {
                    "question": template.format(x=start),
                    "golds": [chain[-1]],
                    "hops": len(relations),
                    "chain": chain,
                    "relations": list(relations),
                }
            )
    splits = {
        "train": _sample_by_hops(rng, pools["train"], cfg.n_train, cfg.train_hop_weights),
        "test": _sample_by_hops(rng, pools["test"], cfg.n_test, cfg.test_hop_weights),
    }
    for split, rows in splits.items():
        for i, q in enumerate(rows):
            q["id"] = f"{split}_{i}"
    return World(config=cfg, kinds=kinds, facts=facts, corpus=corpus, splits=splits)


# ---------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------


def demonstration(world: World, question: dict[str, Any], tool: Any, searches: int | None = None) -> Demonstration:
    """The ideal trajectory for ``question``: search each entity of its chain, then answer.

    With ``searches`` below the question's hop count, a sloppy one instead: it stops searching
    after that many hops and answers with the entity it has reached (a wrong answer).

    ``tool`` (a search tool, e.g. ``LocalSearchTool`` over ``world.corpus``) is really called,
    so every observation is exactly what the environment would insert. Think steps are short:
    the first names the entity to look up, the others restate the fact just read. Raises
    ValueError if a search result misses the fact the chain needs (the corpus is built so that
    this does not happen).
    """
    chain, relations = question["chain"], question["relations"]
    if searches is not None:
        if not 1 <= searches <= len(relations):
            raise ValueError(f"searches must be in [1, {len(relations)}], got {searches}")
        chain, relations = chain[: searches + 1], relations[:searches]
    pieces: list[tuple[str, str]] = []
    think = f"Look up {chain[0]}."
    for i, relation in enumerate(relations):
        # Turns after an observation start with a space: "</result> <think> ...".
        generated = f"{' ' if pieces else ''}<think> {think} </think> <search> {chain[i]} </search>"
        result = tool(chain[i])
        think = RELATIONS[relation][2].format(s=chain[i], o=chain[i + 1])
        if not result.ok or think not in result.text:
            raise ValueError(f"search for {chain[i]!r} does not show {think!r}: {result.text!r}")
        pieces.append((generated, format_observation(result.text)))
    answer = f" <think> {think} </think> <answer> The final answer is \\[ \\boxed{{{chain[-1]}}} \\] </answer>"
    pieces.append((answer, ""))
    return Demonstration(tuple(pieces))
