from collections import Counter

import pytest

from at2po.agent import AgentProtocol, format_observation
from at2po.data import load_qa_jsonl
from at2po.rewards import check_format
from at2po.tasks import base as tasks_base
from at2po.tasks.base import Sample, Score
from at2po.tasks.multihop import RELATIONS, Demonstration, MultiHopConfig, build_world, demonstration
from at2po.tasks.search_qa import SearchQATask
from at2po.tools.python_sandbox import PythonTool
from at2po.tools.search import BM25Index, LocalSearchTool, load_corpus


def qa_reward(response: str, golds) -> Score:
    """The old rewards.qa_reward (search and python enabled): SearchQATask's EM score."""
    sample = Sample("q", "question", tuple(golds))
    return SearchQATask().score(response, sample, AgentProtocol([LocalSearchTool, PythonTool]))

SMALL = MultiHopConfig(seed=3, n_people=20, n_companies=6, n_cities=6, n_countries=3, n_train=60, n_test=20)


@pytest.fixture(scope="module", params=[MultiHopConfig(), SMALL], ids=["default", "small"])
def world(request):
    return build_world(request.param)


@pytest.fixture(scope="module")
def tool(world):
    return LocalSearchTool(BM25Index([row["contents"] for row in world.corpus]), topk=3)


def test_world_is_deterministic_under_the_seed():
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.corpus == b.corpus and a.splits == b.splits and a.facts == b.facts
    c = build_world(MultiHopConfig(**{**SMALL.__dict__, "seed": 4}))
    assert c.corpus != a.corpus


def test_names_are_unique_short_words(world):
    names = list(world.kinds)
    assert len(names) == len(set(names)) == len(world.corpus)
    assert all(name.isalpha() and name[0].isupper() and 4 <= len(name) <= 8 for name in names)


def test_every_chain_resolves_and_golds_match_the_passages(world):
    for split in ("train", "test"):
        for q in world.questions(split):
            chain, relations = q["chain"], q["relations"]
            assert q["hops"] == len(relations) == len(chain) - 1 and 1 <= q["hops"] <= 3
            assert q["golds"] == [chain[-1]]
            assert chain[0] in q["question"]
            assert len(set(chain)) == len(chain)
            for subject, relation, obj in zip(chain, relations, chain[1:]):
                assert world.facts[subject][relation] == obj
                # The fact is stated in the subject's own passage.
                assert RELATIONS[relation][2].format(s=subject, o=obj) in world.passage(subject)


def test_splits_are_disjoint_and_follow_the_hop_weights(world):
    train, test = world.questions("train"), world.questions("test")
    train_facts = {fact for q in train for fact in zip(q["chain"], q["relations"])}
    # Every test question needs a fact that no training chain uses.
    assert all(set(zip(q["chain"], q["relations"])) - train_facts for q in test)
    assert not {q["question"] for q in train} & {q["question"] for q in test}
    assert len({q["id"] for q in train + test}) == len(train) + len(test)
    hops = Counter(q["hops"] for q in test)
    assert set(hops) == {1, 2, 3}
    assert max(hops.values()) - min(hops.values()) <= max(3, len(test) // 5)
    with pytest.raises(ValueError):
        world.questions("dev")


def test_hop_weights_select_hops():
    world = build_world(MultiHopConfig(**{**SMALL.__dict__, "train_hop_weights": (1, 1, 0)}))
    assert {q["hops"] for q in world.questions("train")} == {1, 2}


def test_bm25_ranks_each_entity_passage_first(world, tool):
    hits = tool.index.search(list(world.kinds), topk=3)
    for i, (name, ranked) in enumerate(zip(world.kinds, hits)):
        assert world.corpus[i]["contents"] == world.passage(name)
        assert ranked[0][0] == i, name


def test_demonstrations_are_valid_and_use_real_tool_output(world, tool):
    for split in ("train", "test"):
        for q in world.questions(split):
            demo = demonstration(world, q, tool)
            ok, reason = check_format(demo.text)
            assert ok, reason
            assert qa_reward(demo.text, q["golds"]).reward == 1.0
            *calls, (final, final_obs) = demo.pieces
            assert len(calls) == q["hops"] and final_obs == ""
            assert final.startswith(" <think>") and final.endswith("</answer>")
            for i, ((generated, observation), entity) in enumerate(zip(calls, q["chain"])):
                assert generated.startswith(" <think>" if i else "<think>")
                assert generated.endswith(f"<search> {entity} </search>")
                assert observation == format_observation(tool(entity).text)


def test_sloppy_demonstration_answers_the_entity_reached_after_too_few_searches(world, tool):
    q = next(q for q in world.questions("train") if q["hops"] == 3)
    for searches in (1, 2):
        demo = demonstration(world, q, tool, searches=searches)
        assert check_format(demo.text)[0]
        *calls, (final, _) = demo.pieces
        assert [g.split("<search> ")[1].split(" </search>")[0] for g, _ in calls] == q["chain"][:searches]
        assert f"\\boxed{{{q['chain'][searches]}}}" in final
        assert qa_reward(demo.text, q["golds"]).metrics["em"] == 0.0
    assert demonstration(world, q, tool, searches=3) == demonstration(world, q, tool)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="searches"):
            demonstration(world, q, tool, searches=bad)


def test_demonstration_rejects_a_tool_that_misses_the_fact(world):
    class Blind:
        def __call__(self, query):
            return LocalSearchTool(BM25Index(["nothing relevant here"]))(query)

    with pytest.raises(ValueError):
        demonstration(world, world.questions("train")[0], Blind())


def test_demonstration_is_the_tasks_base_class():
    assert Demonstration is tasks_base.Demonstration
    demo = Demonstration((("<think> a </think> <search> X </search>", " <result>\nr\n</result>"), (" <answer> y </answer>", "")))
    assert demo.text == "<think> a </think> <search> X </search> <result>\nr\n</result> <answer> y </answer>"


def test_search_qa_task_loads_the_written_files(tmp_path):
    world = build_world(SMALL)
    paths = world.write(tmp_path)
    task = SearchQATask()
    for split in ("train", "test"):
        samples = task.load(paths[split])
        assert [(s.id, s.prompt, s.target) for s in samples] == [
            (q["id"], q["question"], tuple(q["golds"])) for q in world.questions(split)
        ]
        assert [dict(s.meta) for s in samples] == [
            {"hops": q["hops"], "chain": q["chain"], "relations": q["relations"]} for q in world.questions(split)
        ]
        assert task.user_message(samples[0]) == f"Question: {world.questions(split)[0]['question']}"


def test_write_flashrag_files(tmp_path):
    world = build_world(SMALL)
    paths = world.write(tmp_path)
    assert {p.name for p in paths.values()} == {"corpus.jsonl", "train.jsonl", "test.jsonl"}
    assert load_corpus(paths["corpus"]) == world.corpus
    for split in ("train", "test"):
        rows = load_qa_jsonl(paths[split])
        assert [(r.id, r.question, list(r.golds)) for r in rows] == [
            (q["id"], q["question"], q["golds"]) for q in world.questions(split)
        ]
    # The corpus file feeds the search tool directly.
    tool = LocalSearchTool(corpus_path=paths["corpus"])
    name = next(iter(world.kinds))
    assert tool(name).text.startswith(f"Page 1: {world.passage(name)}")


@pytest.mark.parametrize(
    "override",
    [{"n_people": 1}, {"test_fact_fraction": 1.0}, {"train_hop_weights": (0, 0, 0)}, {"test_hop_weights": (1, 1)}],
)
def test_config_validation(override):
    with pytest.raises(ValueError):
        MultiHopConfig(**override)
