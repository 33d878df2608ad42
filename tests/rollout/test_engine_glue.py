"""What the rollout engine reports besides tree shapes: the sampling settings of each call, its
progress callback and phase times, the statistics and their totals, tool failures, the turn limit
and a response budget used up by an observation. Scripted generator and tools, through the
engine's public ``rollout``/``validate`` only; every case runs in well under a second."""

import numpy as np
import pytest

from at2po.agent import encode_observation, format_error_observation, format_observation
from at2po.algorithms.tree import FAILED, LEAF
from at2po.rollout.engine import RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import SamplingParams
from at2po.tasks.search_qa import SearchQATask
from at2po.tiny import synthetic_agent_texts, train_tokenizer
from at2po.tools.base import Tool, ToolResult
from conftest import ANSWER, SEARCH, EchoSearch, ScriptedGenerator
from conftest import make_prompt as prompt

task = SearchQATask()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(200), vocab_size=600)


class Recording(ScriptedGenerator):
    """A scripted generator that also keeps each call's params and per-context limits."""

    def __init__(self, tok, script):
        super().__init__(tok, script)
        self.params, self.limits = [], []

    def generate(self, contexts, params, max_new_tokens=None):
        self.params.append(params)
        self.limits.append(list(max_new_tokens))
        return super().generate(contexts, params, max_new_tokens)


def search_then_answer(ctx, k, n):
    # Searches are uncertain (H = 2), answers sure (H = 0.1): expansion re-samples a search turn.
    return (SEARCH.format(q=f"q{n}"), -2.0) if k == 0 else (ANSWER.format(a="paris"), -0.1)


def test_sampling_settings_progress_phases_and_totals(tok):
    gen = Recording(tok, search_then_answer)
    progress = []
    cfg = RolloutConfig(n_initial=2, expansion_rounds=1, top_k=1, samples_per_tree=0, temperature=0.7, top_p=0.9,
                        chunk_tokens=50, max_response_tokens=500)
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], task, cfg, progress=lambda *a: progress.append(a))
    res = eng.rollout([prompt(tok)])

    expected = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=50, stop=("</search>", "</answer>"))
    assert gen.params == [expected] * 4
    assert gen.limits == [[50, 50], [50, 50], [50], [50]]  # the chunk size: the budget is far away
    # Two chains (search, answer), then the sibling of one search turn (search, answer).
    assert progress == [("phase 0-0", 1, 2), ("phase 0-0", 2, 2), ("phase 1-1", 3, 1), ("phase 1-1", 4, 1)]
    tree = res.trees[0]
    assert [n.parent for n in tree.nodes] == [-1, 0, 0, 1, 2, 0, 5]
    assert res.generation_calls == 4

    assert set(res.phase_seconds) == {"rollout", "generate", "tools", "reward"}
    assert 0 <= res.phase_seconds["generate"] + res.phase_seconds["tools"] <= res.phase_seconds["rollout"]
    ends = res.stats[0].phase_end_seconds
    assert len(ends) == 2 and 0 <= ends[0] <= ends[1] == res.phase_seconds["rollout"]

    st = res.stats[0]
    assert st.generated_tokens == sum(len(n.gen_ids) for n in tree.nodes)
    assert st.prefill_tokens == sum(len(c) for c in gen.contexts)
    assert (st.tool_calls, st.tool_failures, st.tool_infra_failures, st.limit_notices) == (3, 0, 0, 0)
    assert (st.depth, st.leaves, st.nodes) == (2, 3, 6)
    assert res.totals() == {
        "generated_tokens": float(st.generated_tokens), "prefill_tokens": float(st.prefill_tokens),
        "tool_calls": 3.0, "tool_failures": 0.0, "tool_infra_failures": 0.0, "limit_notices": 0.0,
        "leaves": 3.0, "depth_max": 2.0, "rows": 3.0,
    }


def test_totals_add_up_over_trees(tok):
    # Tree "a" answers at once (depth 1), tree "b" searches twice first (depth 3).
    def script(ctx, k, n):
        if "Question: b" in ctx and k < 2:
            return SEARCH.format(q="x"), -1.0
        return ANSWER.format(a="x"), -1.0

    gen = ScriptedGenerator(tok, lambda resp, k, n: None)

    def generate(contexts, params, max_new_tokens=None):
        out = []
        for c, m in zip(contexts, max_new_tokens):
            full = tok.decode(c)
            gen.script = lambda resp, k, n: script(full, k, n)
            out += ScriptedGenerator.generate(gen, [c], params, [m])
        return out

    gen.generate = generate
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], task,
                            RolloutConfig(n_initial=2, expansion_rounds=0, samples_per_tree=3))
    res = eng.rollout([prompt(tok, "a"), prompt(tok, "b")])
    a, b = res.stats
    assert (a.depth, b.depth, a.tool_calls, b.tool_calls, a.leaves, b.leaves) == (1, 3, 0, 4, 2, 2)
    totals = res.totals()
    assert totals["depth_max"] == 3.0 and totals["tool_calls"] == 4.0 and totals["leaves"] == 4.0
    assert totals["rows"] == 6.0  # two trees topped up to 3 rows each
    assert totals["generated_tokens"] == float(a.generated_tokens + b.generated_tokens)


class Flaky(Tool):
    """"down" fails as a service outage, "bad" as a failed call; anything else succeeds."""

    name = "search"

    def __init__(self):
        self.queries = []

    def run(self, query):
        self.queries.append(query)
        if query == "down":
            return ToolResult("service unavailable", ok=False, error="connection", infra=True)
        if query == "bad":
            return ToolResult("no such page", ok=False, error="bad_response")
        return ToolResult(f"about {query}", ok=True)


def test_tool_failures_are_counted_and_shown_as_observations(tok):
    queries = {0: "down", 1: "bad", 2: "fine"}

    def script(ctx, k, n):
        if k == 0 and n in queries:
            return SEARCH.format(q=queries[n]), -1.0
        if k == 0:  # the fourth chain sends an empty query: an error observation, no tool run
            return "<think> hm </think> <search>   </search>", -1.0
        return ANSWER.format(a="x"), -1.0

    tool = Flaky()
    eng = TreeRolloutEngine(ScriptedGenerator(tok, script), tok, [tool], task,
                            RolloutConfig(n_initial=4, expansion_rounds=0, samples_per_tree=0))
    res = eng.rollout([prompt(tok)])
    tree, st = res.trees[0], res.stats[0]
    assert tool.queries == ["down", "bad", "fine"]
    assert (st.tool_calls, st.tool_failures, st.tool_infra_failures) == (4, 3, 1)
    assert [tree.nodes[i].info.get("tool_ok") for i in (1, 2, 3, 4)] == [False, False, True, None]
    obs = {tree.nodes[c].parent: tok.decode(tree.nodes[c].obs_ids) for c in range(5, 9)}
    assert obs[1] == format_observation("service unavailable")
    assert obs[2] == format_observation("no such page")
    assert obs[3] == format_observation("about fine")
    assert obs[4].startswith(" <result>\nError: ") and obs[4] == format_error_observation(obs[4][len(" <result>\nError: "):-len("\n</result>")])
    # Every trajectory still ends with its answer.
    assert all(tree.nodes[leaf].status == LEAF for leaf in tree.leaves()) and len(res.rows) == 4


def test_turn_limit_fails_the_last_turn_without_calling_its_tool(tok):
    tool = EchoSearch()
    eng = TreeRolloutEngine(ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q=f"q{k}"), -1.0)), tok, [tool],
                            task, RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0, max_turns=3,
                                                max_tool_calls=10))
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert len(tree) == 4 and tool.queries == ["q0", "q1"]  # the third search is not run
    assert tree.nodes[3].status == FAILED
    assert tree.nodes[3].info == {"finish": "stop", "action": "search", "end": "turn limit (3) reached"}
    assert res.stats[0].tool_calls == 2 and res.stats[0].depth == 3


def test_an_observation_that_uses_up_the_budget_ends_the_trajectory(tok):
    """Budget left after the observation: 0 -> the searching turn becomes a failed leaf and nothing
    more is generated; exactly 1 -> one more call with a 1-token limit."""
    turn = tok.encode(SEARCH.format(q="q"), add_special_tokens=False)
    obs = encode_observation(tok, format_observation("Page 1: facts about q"))

    def run(budget_after_obs):
        gen = Recording(tok, lambda c, k, n: (SEARCH.format(q="q"), -1.0) if k == 0 else (ANSWER.format(a="x"), -1.0))
        cfg = RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=0, chunk_tokens=200,
                            max_response_tokens=len(turn) + len(obs) + budget_after_obs)
        return gen, TreeRolloutEngine(gen, tok, [EchoSearch()], task, cfg).rollout([prompt(tok)])

    gen, res = run(0)
    tree = res.trees[0]
    assert len(tree) == 2 and res.generation_calls == 1
    assert tree.nodes[1].status == FAILED
    assert tree.nodes[1].info["end"] == "response budget exhausted by the observation"
    assert res.rows[0].sequence.leaf == 1 and res.rows[0].score.reward == -1.0

    gen, res = run(1)
    tree = res.trees[0]
    assert res.generation_calls == 2 and gen.limits == [[len(turn) + len(obs) + 1], [1]]
    assert len(tree) == 3 and tree.nodes[2].obs_ids == obs and len(tree.nodes[2].gen_ids) == 1
    assert tree.nodes[2].info["end"] == "length"


def test_validate_is_one_greedy_chain_whatever_the_config(tok):
    gen = Recording(tok, search_then_answer)
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], task,
                            RolloutConfig(n_initial=3, expansion_rounds=2, top_k=2, samples_per_tree=4, chunk_tokens=40))
    res = eng.validate([prompt(tok), prompt(tok, golds=("rome",))])
    assert [len(t) for t in res.trees] == [3, 3]  # root, search, answer: no siblings
    assert len(res.rows) == 2 and not any(r.duplicate for r in res.rows)
    assert [p.greedy for p in gen.params] == [True, True] and gen.params[0].max_new_tokens == 40
    assert [r.score.metrics["em"] for r in res.rows] == [1.0, 0.0]
    assert len(gen.contexts) == 4 and [st.leaves for st in res.stats] == [1, 1]  # one chain each, before trimming
    # The engine's own config is untouched: the next rollout samples M = 3 chains again.
    assert eng.config.n_initial == 3 and eng.config.samples_per_tree == 4


def test_totals_of_an_empty_rollout():
    from at2po.rollout.engine import RolloutResult

    assert RolloutResult([], [], [], {}, 0).totals() == {
        "generated_tokens": 0.0, "prefill_tokens": 0.0, "tool_calls": 0.0, "tool_failures": 0.0,
        "tool_infra_failures": 0.0, "limit_notices": 0.0, "leaves": 0.0, "depth_max": 0.0, "rows": 0.0}


# -- the expansion settings reach the selection ------------------------------------------------------------
def _expansion_script(ctx, k, n):
    """Phase 0 (calls 0-2 open chains A, B, C): A searches twice (H = 1.0, then 0.8), B once
    (H = 0.5), C answers at once; every later first turn searches "qr"; answers have H = 0.1."""
    if k == 0 and n < 3:
        return [(SEARCH.format(q="qa"), -1.0), (SEARCH.format(q="qb"), -0.5), (ANSWER.format(a="x"), -0.1)][n]
    if k == 0:
        return SEARCH.format(q="qr"), -0.3
    if k == 1 and "qa" in ctx:
        return SEARCH.format(q="qa2"), -0.8
    return ANSWER.format(a="x"), -0.1


def _expanded_from(tok, **cfg):
    """The node the single expansion re-sampled (its sibling's parent and observation identify it)."""
    gen = ScriptedGenerator(tok, _expansion_script)
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], task,
                            RolloutConfig(n_initial=3, expansion_rounds=1, top_k=1, samples_per_tree=0, **cfg))
    tree = eng.rollout([prompt(tok)]).trees[0]
    # Phase 0 nodes: A1 = 1, B1 = 2, C1 = 3, A2 = 4, B2 = 5, A3 = 6; the sibling is node 7.
    assert [n.parent for n in tree.nodes[:7]] == [-1, 0, 0, 0, 1, 2, 4]
    sib = tree.nodes[7]
    matches = [n for n in (0, 1, 2, 4) if n != 0 and tree.nodes[n].parent == sib.parent
               and tree.nodes[n].obs_ids == sib.obs_ids]
    if sib.parent == 0 and not sib.obs_ids:  # root or a first turn: both start from the prompt alone
        assert sib.tool_calls_at_start == 0
        return "first turn"
    assert len(matches) == 1 and sib.tool_calls_at_start == tree.nodes[matches[0]].tool_calls_at_start
    return matches[0]


def test_expansion_uses_the_configured_alpha(tok):
    # s(A1) = 1.0 - 3α, s(A2) = 0.8 - 1α (A1 has one child), s(B1) = 0.5 - 3α, s(root) = -3α.
    assert _expanded_from(tok, alpha=0.05) == "first turn"  # A1 (0.85 > 0.75): a sibling under the root
    assert _expanded_from(tok, alpha=0.2) == 4  # A2 (0.6 > 0.4): a sibling under A1 after its result


@pytest.mark.parametrize("root_fallback, candidates", [(True, [0, 1, 2, 4]), (False, [1, 2, 4])])
def test_random_expansion_draws_from_the_seeded_engine_rng(tok, root_fallback, candidates):
    """The pick is the engine rng's first draw (seeded by rollout.seed) over the candidates: the
    root (with the fallback) and the tool-calling turns A1, B1, A2. A1, B1 and the root all start
    from the prompt alone, so only a pick of A2 is told apart; 20 seeds make a wrong rng or mode
    show (a fresh rng matches all 20 with probability < 1e-3)."""
    outcomes = []
    for seed in range(20):
        expected = int(np.random.default_rng(seed).permutation(candidates)[0])
        got = _expanded_from(tok, expansion_mode="random", seed=seed, root_fallback=root_fallback)
        assert got == (4 if expected == 4 else "first turn"), seed
        outcomes.append(got)
    assert len(set(outcomes)) == 2


def test_a_root_fallback_sibling_is_a_fresh_chain_with_fresh_counts(tok):
    """One chain (search, answer); K = 2 picks its search turn, then the root (cyclic reuse): the
    root's "sibling" starts with no tool calls and no turns, so with max_tool_calls = 1 and
    max_turns = 2 it may search once and then answer."""
    tool = EchoSearch()
    gen = ScriptedGenerator(tok, lambda c, k, n: (SEARCH.format(q=f"q{n}"), -1.0) if k == 0 else (ANSWER.format(a="x"), -0.1))
    eng = TreeRolloutEngine(gen, tok, [tool], task, RolloutConfig(
        n_initial=1, expansion_rounds=1, top_k=2, samples_per_tree=0, max_tool_calls=1, max_turns=2))
    res = eng.rollout([prompt(tok)])
    tree = res.trees[0]
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 0, 0, 3, 4]
    fresh = tree.nodes[4]
    assert fresh.obs_ids == [] and fresh.tool_calls_at_start == 0 and fresh.status != FAILED
    assert tree.nodes[6].status == LEAF and tree.nodes[6].tool_calls_at_start == 1
    assert res.stats[0].limit_notices == 0 and res.stats[0].tool_calls == 3 and len(tool.queries) == 3
