"""The RL glue between the pieces: engine → rows → advantages → update → checkpoints → CLI.

Every expected value here is derived independently of the code under test: hand-scripted trees
(tests/conftest.py's scripted generator), naive per-row references, token counts worked out by
hand, or a second run of the same thing under another setting that must not change the result.
"""

from __future__ import annotations

import copy
import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

from at2po.agent import TOOL_LIMIT_MESSAGE, encode_observation, format_observation, render_prompt
from at2po.algorithms.tree import FAILED, LEAF
from at2po.config import AlgoConfig, load_config
from at2po.rollout.engine import RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import HFGenerator, SamplingParams
from at2po.training.logprobs import sequence_logprobs
from at2po.tasks.base import TASKS, Sample, Score, register_task
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.training.trainer import Trainer, build_train_batch, latest_checkpoint, response_log_probs
from conftest import (
    ANSWER,
    SEARCH,
    EchoSearch,
    ScriptedGenerator,
    hand_credit,
    make_prompt,
    make_run_cfg,
    write_search_qa_files,
)

QA = SearchQATask()  # EM reward, −1 on a bad format


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(200), vocab_size=600)


class QuestionScripted(ScriptedGenerator):
    """The scripted generator, but the script also sees the question of the context's prompt:
    script(question, response_text, n_results_seen, call_index) -> (text, logprob).
    Records the per-call token limit the engine asked for."""

    def __init__(self, tok, script):
        super().__init__(tok, None)
        self.question_script = script
        self.limits: list[int] = []

    def generate(self, contexts, params, max_new_tokens=None):
        out = []
        for ctx, lim in zip(contexts, max_new_tokens or [params.max_new_tokens] * len(contexts)):
            q = re.search(r"Question: (.*?)<\|im_end\|>", self.tok.decode(ctx)).group(1)
            self.script = lambda resp, k, n, q=q: self.question_script(q, resp, k, n)
            self.limits.append(lim)
            out += ScriptedGenerator.generate(self, [ctx], params, [lim])
        return out


def leaf_rewards_of(result, t):
    return {r.sequence.leaf: r.score.reward for r in result.rows if r.tree == t and not r.duplicate}


# == trainer helpers (tests/training/test_trainer.py's tiny setting) ===========================================
class LengthRewardQA(SearchQATask):
    """search_qa with a reward that varies on a random policy's output (a test double for EM): odd length wins."""

    name = "glue_length_qa"

    def score(self, response, sample, protocol):
        r = float(len(response) % 2)
        return Score(r, {"em": r, "f1": r, "format_ok": 1.0}, None, "")


@pytest.fixture
def length_task():
    """LengthRewardQA as task.name=glue_length_qa (so runs built from a config, the CLI's too, use it)."""
    assert LengthRewardQA.name not in TASKS
    register_task(LengthRewardQA)
    yield LengthRewardQA.name
    TASKS.pop(LengthRewardQA.name, None)


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def linear_adam(trainer):
    """Adam's first step is lr·sign(g): blind to any uniform scale of the gradient (a wrong
    micro-batch weight). With eps = 1 ≫ |g| the step is ≈ lr·g, so the parameters after the update
    show the gradient itself."""
    for group in trainer.optimizer.param_groups:
        group["eps"] = 1.0
    return trainer


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def read_rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rows):
    """Every logged value but wall-clock ones (time/*, perf/*)."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


CORPUS = [
    "Zorbex was founded by Mila Tarn.",
    "Mila Tarn was born in Quovia.",
    "Quovia is a city in Belmark.",
    "Drelto is a river that flows through Quovia.",
]
QUESTIONS = [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
             ("Which country is Quovia in?", "Belmark"), ("What flows through Quovia?", "Drelto")]


@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    """A tiny model, a BM25 corpus and 4 training questions (tests/training/test_trainer.py's layout)."""
    root = tmp_path_factory.mktemp("glue_assets")
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             seed=0)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, CORPUS, QUESTIONS)
    return root


# == 1. advantages per row when a batch holds several trees ============================================
def _three_tree_rollout(tok):
    """Tree "a": search then answer; tree "b": two searches then answer; tree "c": answers at once and
    every answer is right (constant reward). Answers and entropies vary with the call index."""

    def script(q, resp, k, n):
        searches = {"a": 1, "b": 2, "c": 0}[q]
        if k < searches:
            return SEARCH.format(q=f"{q}{n}"), -(0.3 + 0.25 * (n % 5))
        return ANSWER.format(a="paris" if n % 3 else "rome"), -(0.2 + 0.1 * (n % 4))

    gen = QuestionScripted(tok, script)
    eng = TreeRolloutEngine(gen, tok, [EchoSearch()], QA,
                            RolloutConfig(n_initial=2, expansion_rounds=1, top_k=2, samples_per_tree=5))
    prompts = [make_prompt(tok, "a", ("paris",)), make_prompt(tok, "b", ("rome",)),
               make_prompt(tok, "c", ("paris", "rome"))]
    return eng.rollout(prompts)


def _expected_rows(result):
    """Per-row (tree, grpo) advantages from the naive per-tree reference."""
    out = []
    for row in result.rows:
        tree = result.trees[row.tree]
        r_hat, value = hand_credit(tree, leaf_rewards_of(result, row.tree))
        seq = row.sequence
        out.append(([value(int(n)) if n >= 0 else 0.0 for n in seq.token_node],
                    [r_hat[seq.leaf] if m else 0.0 for m in seq.loss_mask]))
    return out


def _assert_rows_match(result, tree_batch, grpo_batch):
    for i, (row, (want_tree, want_grpo)) in enumerate(zip(result.rows, _expected_rows(result))):
        n = len(row.sequence.loss_mask)
        torch.testing.assert_close(tree_batch.advantages[i, :n], torch.tensor(want_tree, dtype=torch.float32))
        torch.testing.assert_close(grpo_batch.advantages[i, :n], torch.tensor(want_grpo, dtype=torch.float32))
        assert not tree_batch.advantages[i, n:].any() and not grpo_batch.advantages[i, n:].any()


def test_advantages_of_each_row_come_from_its_own_tree_only(tok):
    result = _three_tree_rollout(tok)
    trees = result.trees
    # The shapes the script asks for: 2 chains + 2 siblings a tree, topped up to N = 5 rows.
    assert [len(t.leaves()) for t in trees] == [4, 4, 4]
    assert [r.tree for r in result.rows] == [0] * 5 + [1] * 5 + [2] * 5
    assert [r.duplicate for r in result.rows] == [False] * 4 + [True] + [False] * 4 + [True] + [False] * 4 + [True]
    assert [max(len(t.path(l)) - 1 for l in t.leaves()) for t in trees] == [2, 3, 1]
    rewards = [leaf_rewards_of(result, t) for t in range(3)]
    assert len(set(rewards[0].values())) > 1 and len(set(rewards[1].values())) > 1  # credit has work to do
    assert set(rewards[2].values()) == {1.0}  # tree c: every answer right, so all its advantages are 0

    tree_batch, _ = build_train_batch(result, AlgoConfig(advantage="tree"))
    grpo_batch, _ = build_train_batch(result, AlgoConfig(advantage="grpo"))
    assert tree_batch.tree_of_row.tolist() == [r.tree for r in result.rows]
    for i, row in enumerate(result.rows):
        assert tree_batch.sequences[i] == trees[row.tree].prompt_ids + row.sequence.response_ids.tolist()
    _assert_rows_match(result, tree_batch, grpo_batch)
    assert not tree_batch.advantages[10:].any()  # tree c, whatever its neighbours' rewards
    assert tree_batch.advantages[:10].abs().sum() > 0

    # Perturbing one tree's rewards changes its rows only (and to the reference's new values).
    for t in range(3):
        before_tree, before_grpo = tree_batch.advantages.clone(), grpo_batch.advantages.clone()
        perturbed = copy.deepcopy(result)
        for leaf in perturbed.trees[t].leaves():
            node = perturbed.trees[t].nodes[leaf]
            node.reward = {1.0: -1.0, 0.0: 1.0, -1.0: 0.0}[node.reward] if leaf % 2 else node.reward
        for row in perturbed.rows:  # the rows' scores follow (the reference reads them)
            row.score = Score(perturbed.trees[row.tree].nodes[row.sequence.leaf].reward, {}, None, "")
        new_tree, _ = build_train_batch(perturbed, AlgoConfig(advantage="tree"))
        new_grpo, _ = build_train_batch(perturbed, AlgoConfig(advantage="grpo"))
        _assert_rows_match(perturbed, new_tree, new_grpo)
        mine = torch.tensor([r.tree == t for r in result.rows])
        assert torch.equal(new_tree.advantages[~mine], before_tree[~mine])
        assert torch.equal(new_grpo.advantages[~mine], before_grpo[~mine])
        assert not torch.equal(new_tree.advantages[mine], before_tree[mine])


# == 4. sibling state at depth 2 ========================================================================
def _depth_two_script(ctx, k, n):
    """One chain: search (call 0, H = 0.1), search (call 1, H = 3: the turn expansion picks), answer.
    The sibling of turn 2 (call 3) searches again, and so does its next turn (call 4)."""
    if TOOL_LIMIT_MESSAGE in ctx or n == 2:
        return ANSWER.format(a="paris"), -0.1
    return SEARCH.format(q=f"q{n}"), -3.0 if n == 1 else -0.1


def test_sibling_at_depth_two_starts_from_exactly_the_selected_turns_state(tok):
    gen, tool = ScriptedGenerator(tok, _depth_two_script), EchoSearch()
    cfg = RolloutConfig(n_initial=1, expansion_rounds=1, top_k=1, samples_per_tree=0, max_tool_calls=2)
    res = TreeRolloutEngine(gen, tok, [tool], QA, cfg).rollout([make_prompt(tok)])
    tree = res.trees[0]
    # Chain: 1 (search) → 2 (search, selected) → 3 (answer); sibling 4 of node 2 → 5 (search) → 6 (answer).
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 2, 1, 4, 5]
    assert tree.depth(2) == tree.depth(4) == 2
    # The sibling saw exactly the selected turn's state: prompt, turn 1, turn 2's observation.
    assert gen.contexts[3] == tree.context_ids(2)
    assert gen.contexts[3] == tree.prompt_ids + tree.nodes[1].gen_ids + tree.nodes[2].obs_ids
    assert tree.nodes[4].obs_ids == tree.nodes[2].obs_ids
    assert tok.decode(tree.nodes[4].obs_ids) == format_observation("Page 1: facts about q0")
    assert tree.nodes[4].tool_calls_at_start == tree.nodes[2].tool_calls_at_start == 1  # not the authors' 1 − 1
    # The limit (2 calls) counts from there: the sibling's call is the path's 2nd and runs,
    # the next one (the path's 3rd) gets the masked notice instead.
    assert tool.queries == ["q0", "q1", "q3"]
    assert tree.nodes[5].tool_calls_at_start == 2 and tree.nodes[6].tool_calls_at_start == 2
    assert tree.nodes[6].obs_ids == encode_observation(tok, format_observation(TOOL_LIMIT_MESSAGE))
    assert res.stats[0].tool_calls == 3 and res.stats[0].limit_notices == 1
    assert gen.contexts[5] == tree.full_ids(5) + tree.nodes[6].obs_ids

    # The turn count starts from the sibling's depth too: with max_turns = 3 the sibling branch's
    # third turn (node 5, a call) ends the trajectory, while the chain's third turn answers.
    gen = ScriptedGenerator(tok, _depth_two_script)
    cfg = RolloutConfig(n_initial=1, expansion_rounds=1, top_k=1, samples_per_tree=0, max_tool_calls=2, max_turns=3)
    tree = TreeRolloutEngine(gen, tok, [EchoSearch()], QA, cfg).rollout([make_prompt(tok)]).trees[0]
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 2, 1, 4]
    assert tree.nodes[3].status == LEAF and tree.nodes[5].status == FAILED
    assert tree.nodes[5].info["end"] == "turn limit (3) reached"


# == 5. pruning to N leaves: random, seeded ===========================================================
def _leaf_texts(tok, tree):
    return sorted(tok.decode(tree.leaf_sequence(l).response_ids.tolist()) for l in tree.leaves())


def _pruning_rollout(tok, seed, n):
    # Every call's text is unique (its index), so a leaf's response names it.
    gen = ScriptedGenerator(tok, lambda c, k, i: (SEARCH.format(q=f"s{i}"), -0.5 - 0.1 * i) if k < 1
                            else (ANSWER.format(a=f"x{i}"), -1.0))
    cfg = RolloutConfig(n_initial=4, expansion_rounds=1, top_k=4, samples_per_tree=n, seed=seed)
    return TreeRolloutEngine(gen, tok, [EchoSearch()], QA, cfg).rollout([make_prompt(tok)])


def test_pruning_to_n_leaves_is_a_seeded_random_draw(tok):
    full = _pruning_rollout(tok, 0, 0)
    all_leaves = _leaf_texts(tok, full.trees[0])
    assert len(all_leaves) == 8 == len(set(all_leaves))  # M + L·K distinct trajectories
    kept = {}
    for seed in range(6):
        res = _pruning_rollout(tok, seed, 3)
        tree = res.trees[0]
        texts = _leaf_texts(tok, tree)
        assert res.stats[0].leaves == 8 and len(texts) == 3 == len(res.rows)
        assert set(texts) <= set(all_leaves)  # the same trajectories, a subset of them
        assert sorted(tok.decode(r.sequence.response_ids.tolist()) for r in res.rows) == texts
        # The pruned branches are gone: every node lies on the path of a kept leaf, and the tree
        # is the union of those paths (renumbered, parent < child).
        on_paths = set().union(*(tree.path(l) for l in tree.leaves()))
        assert on_paths == set(range(len(tree)))
        assert all(n.parent < n.index for n in tree.nodes[1:])
        assert all(c < len(tree) and tree.nodes[c].parent == n.index for n in tree.nodes for c in n.children)
        kept[seed] = texts
    assert _leaf_texts(tok, _pruning_rollout(tok, 0, 3).trees[0]) == kept[0]  # same seed, same leaves
    assert len({tuple(v) for v in kept.values()}) > 1  # another seed, another draw (56 possible)


# == 6. exact response budget =========================================================================
RUNAWAY = "<think> the" + " the" * 400  # never closes a tag: only the budget ends the turn


def test_response_is_exactly_the_budget_when_the_budget_cuts_the_last_turn(tok):
    search_ids = tok.encode(SEARCH.format(q="qq"), add_special_tokens=False)
    obs_ids = encode_observation(tok, format_observation("Page 1: facts about qq"))
    t1, o1 = len(search_ids), len(obs_ids)
    B, C = 75, 16
    assert t1 < C and t1 + o1 < B - C  # the call fits one chunk; the long turn after it needs several

    def script(q, resp, k, n):
        if q == "search" and k == 0:
            return SEARCH.format(q="qq"), -0.5
        return RUNAWAY, -1.0

    gen = QuestionScripted(tok, script)
    cfg = RolloutConfig(n_initial=2, expansion_rounds=1, top_k=2, samples_per_tree=0, chunk_tokens=C,
                        max_response_tokens=B)
    res = TreeRolloutEngine(gen, tok, [EchoSearch()], QA, cfg).rollout(
        [make_prompt(tok, "long"), make_prompt(tok, "search")])
    for t, tree in enumerate(res.trees):
        assert len(tree.leaves()) == 4
        for row in (r for r in res.rows if r.tree == t):
            s = row.sequence
            last = tree.nodes[s.leaf]
            assert last.info["finish"] == "length" and last.status == LEAF
            assert len(s.response_ids) == B  # generated + observation tokens, exactly
            # One turn spans several generation calls: one node, one turn id (docs/method.md §6.4).
            assert len(last.gen_ids) > C
            assert set(s.turn_ids[s.token_node == s.leaf].tolist()) == {len(s.path) - 2}
            if t == 0:
                assert s.path == [0, s.leaf] and len(last.gen_ids) == B
            else:
                assert len(s.path) == 3 and len(last.gen_ids) == B - t1 - o1
                assert s.loss_mask.tolist() == [1] * t1 + [0] * o1 + [1] * (B - t1 - o1)
    # Per-call limits, by hand: each of the long tree's four chains takes 16, 16, 16, 16 and the
    # last 11 tokens; after the search (14 tokens, observation 21) the remaining 40 go as 16, 16, 8.
    rest = B - t1 - o1
    assert (t1, o1) == (14, 21)
    want_after_search = [16, 16, 8]
    long_limits = [lim for lim, ctx in zip(gen.limits, gen.contexts) if "Question: long" in tok.decode(ctx)]
    assert sorted(long_limits) == sorted([16, 16, 16, 16, 11] * 4)
    search_limits = [lim for lim, ctx in zip(gen.limits, gen.contexts) if "Question: search" in tok.decode(ctx)]
    assert sorted(search_limits) == sorted(([C] + want_after_search) * 4)
    assert res.stats[0].generated_tokens == 4 * B and res.stats[1].generated_tokens == 4 * (t1 + rest)


# == 7. log-probs under top-p ========================================================================
PEAK = 6.0  # LM-head scale: nuclei of ~50-80 tokens that hold about half the mass


def test_top_p_samples_inside_the_nucleus_and_reports_full_distribution_logprobs(tok):
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAK)
    model.eval()
    top_p, temperature = 0.5, 0.8
    contexts = [tok.encode(t) for t in ("<think> the", "<search> Quovia </search>", "a", "Page 1: Zorbex was")] * 6
    outs = HFGenerator(model, tok, seed=3).generate(contexts, SamplingParams(temperature=temperature, top_p=top_p,
                                                                            max_new_tokens=6))
    outside_mass, sizes, not_argmax, renormalised_gap = [], [], 0, []
    for ctx, out in zip(contexts, outs):
        assert len(out.token_ids) >= 1
        # First step, by hand: softmax of the model's last logits at this temperature; the nucleus
        # is the most likely tokens, each taken while the mass ranked above it is < top_p.
        with torch.no_grad():
            logits = model(torch.tensor([ctx])).logits[0, -1].double()
        probs = torch.softmax(logits / temperature, dim=-1)
        nucleus, mass = [], 0.0
        for p, i in sorted(((float(p), i) for i, p in enumerate(probs)), reverse=True):
            if mass >= top_p:
                break
            nucleus.append(i)
            mass += p
        first = out.token_ids[0]
        assert first in nucleus
        # The reported log-prob is that of the full temperature-scaled distribution, not renormalised.
        assert out.logprobs[0] == pytest.approx(math.log(float(probs[first])), abs=2e-5)
        renormalised_gap.append(-math.log(mass))
        outside_mass.append(1 - mass)
        sizes.append(len(nucleus))
        not_argmax += first != int(probs.argmax())
        # Every step: the trainer's fresh forward pass reproduces the reported log-probs.
        fresh = sequence_logprobs(model, [ctx + out.token_ids], [len(ctx)], temperature=temperature)[0]
        torch.testing.assert_close(torch.tensor(out.logprobs), fresh.detach(), atol=2e-5, rtol=0)
    # The check has teeth: nuclei hold several tokens but leave real mass outside (sampling from
    # the whole distribution would land there), and renormalised log-probs would differ visibly.
    assert max(sizes) > 1 and min(renormalised_gap) > 0.05 and np.mean(outside_mass) > 0.2
    assert not_argmax > 0


# == 8. evaluation records and resume ================================================================
EVAL_QUESTIONS = {"one": 0, "two": 1, "three": 2, "four": 3}  # question -> searches before the answer


def _eval_script(q, resp, k, n):
    if k < EVAL_QUESTIONS[q]:
        return SEARCH.format(q=f"{q}-{k}"), -0.5
    return ANSWER.format(a="paris" if q in ("one", "three") else "rome"), -0.5


def test_eval_records_turns_and_resume_fills_a_hole_in_the_middle(run_assets, tmp_path, monkeypatch):
    import at2po.factory
    from at2po.datasets import write_qa_file
    from at2po.data import QARow
    from at2po.evaluation.benchmarks import evaluate

    seen: list[str] = []  # ids of the samples the engine was asked to roll out

    def scripted_engine(cfg, model, tokenizer, *, task=None, tools=None, seed=None, progress=None):
        eng = TreeRolloutEngine(QuestionScripted(tokenizer, _eval_script), tokenizer, tools, task, cfg.rollout)
        prompt = eng.prompt

        def counting(sample):
            seen.append(sample.id)
            return prompt(sample)

        eng.prompt = counting
        return eng

    monkeypatch.setattr(at2po.factory, "build_engine", scripted_engine)
    rows = [QARow(f"id{i}", q, ("paris",)) for i, q in enumerate(EVAL_QUESTIONS)]
    write_qa_file(rows, tmp_path / "toy.jsonl")
    cfg = load_config(None, [f"model.path={run_assets / 'model'}", "trainer.progress=false",
                             "rollout.max_response_tokens=512"])  # the tiny model's context is 2048
    out = tmp_path / "eval"

    def run():
        res = evaluate(cfg, {"toy": tmp_path / "toy.jsonl"}, out, batch_size=2, tools=[EchoSearch()], progress=False)
        return res, [json.loads(l) for l in (out / "toy.jsonl").read_text().splitlines()]

    first, records = run()
    assert seen == ["id0", "id1", "id2", "id3"]
    # Turns and tool calls per record are the scripted rollout's: k searches then one answer.
    assert [r["id"] for r in records] == ["id0", "id1", "id2", "id3"]
    assert [r["turns"] for r in records] == [1, 2, 3, 4]
    assert [r["tool_calls"] for r in records] == [0, 1, 2, 3]
    assert [r["em"] for r in records] == [1.0, 0.0, 1.0, 0.0]
    assert first["datasets"]["toy"]["turns"] == pytest.approx(2.5)

    # A hole in the middle of the per-sample file (line 2 of 4): only that id runs again.
    lines = (out / "toy.jsonl").read_text().splitlines()
    (out / "toy.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    seen.clear()
    again, records2 = run()
    assert seen == ["id1"]
    assert sorted(r["id"] for r in records2) == ["id0", "id1", "id2", "id3"]  # each id once
    assert {r["id"]: r for r in records2} == {r["id"]: r for r in records}
    assert again == first
    # Nothing missing: nothing runs, the file stays as it is.
    seen.clear()
    assert run()[0] == first and seen == []


# == 2. the update does not depend on the micro-batch size ============================================
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"])
def test_update_is_invariant_to_micro_batch_rows(run_assets, tmp_path, length_task, agg):
    # No weight decay: at lr 0.1 decay alone moves the weights by more than the check below, so a
    # wrong weight that zeroes the gradient would still look like an update.
    extra = (f"task.name={length_task}", f"algo.loss_agg={agg}", "optim.grad_clip=1e9", "optim.lr=0.1",
             "optim.weight_decay=0", "trainer.save_every=0")
    small, large = (linear_adam(Trainer(make_run_cfg(run_assets, tmp_path / f"m{m}", *extra,
                                                     f"trainer.micro_batch_rows={m}")))
                    for m in (1, 64))
    w0 = weights(small)
    assert_same_weights(w0, weights(large), atol=0)
    result = small.engine.rollout([small.engine.prompt(r) for r in small.train_rows[:2]])
    batch, _ = build_train_batch(result, small.cfg.algo)
    assert batch.advantages.abs().sum() > 0 and len(batch.sequences) == 8
    lengths = batch.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # rows of different lengths: token-mean ≠ seq-mean weights
    m_small = small._update(copy.deepcopy(batch), n_trees=2)
    m_large = large._update(copy.deepcopy(batch), n_trees=2)
    assert m_small["loss/updates"] == m_large["loss/updates"] == 2.0  # one update per tree
    assert m_small["loss/policy"] == pytest.approx(m_large["loss/policy"], abs=1e-6)
    w_small, w_large = weights(small), weights(large)
    assert max(float((w_small[k] - w0[k]).abs().max()) for k in w0) > 1e-3  # the update is not negligible
    assert_same_weights(w_small, w_large)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp-or-single", "fsdp"])
def test_update_hands_the_configured_objective_to_the_loss_and_syncs_once_per_mini_batch(
        run_assets, tmp_path, length_task, monkeypatch, fsdp):
    """Each micro-batch's loss gets the config's level, clip range, aggregation and log-ratio cap
    and the micro-batch's own turn ids, old log-probs, advantages and mask; gradients are kept
    local (no_sync) for all but the last micro-batch of a mini-batch (never under FSDP, which
    also runs one forward per micro-batch, π_old's recompute included); the logged loss is the
    token-weighted sum over a mini-batch's micro-batches and the logged grad norm the mean of the
    clipped norms. The values are off the defaults so that a dropped argument shows. FSDP is
    faked (one process)."""
    import at2po.training.trainer as trainer_module

    tr = Trainer(make_run_cfg(run_assets, tmp_path / "run", f"task.name={length_task}", "algo.loss_level=token",
                              "algo.clip_low=0.11", "algo.clip_high=0.27", "algo.loss_agg=token-mean",
                              "algo.log_ratio_max=7.5",
                              "trainer.mini_batch_prompts=1", "trainer.micro_batch_rows=3", "trainer.save_every=0"))
    monkeypatch.setattr(trainer_module, "is_fsdp", lambda acc: fsdp)
    events, micros, recomputed, losses, norms = [], [], [], [], []
    policy_loss, log_probs = trainer_module.policy_loss, trainer_module.response_log_probs

    def loss_spy(*args, **kw):
        loss, m = policy_loss(*args, **kw)
        events.append("loss")
        losses.append((args, kw, float(loss.detach())))
        return loss, m

    def log_probs_spy(model, batch, temperature, **kw):
        (micros if torch.is_grad_enabled() else recomputed).append((batch, kw))  # no grad: π_old's recompute
        return log_probs(model, batch, temperature, **kw)

    acc = tr.accelerator
    no_sync, clip = acc.no_sync, acc.clip_grad_norm_

    def no_sync_spy(model):
        events.append("no_sync")
        assert model is tr.model
        return no_sync(model)

    def clip_spy(params, max_norm):
        norms.append(float(clip(params, max_norm)))
        events.append("step")
        return torch.tensor(norms[-1])

    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    monkeypatch.setattr(trainer_module, "response_log_probs", log_probs_spy)
    monkeypatch.setattr(acc, "no_sync", no_sync_spy)
    monkeypatch.setattr(acc, "clip_grad_norm_", clip_spy)
    result = tr.engine.rollout([tr.engine.prompt(r) for r in tr.train_rows[:2]])
    batch, _ = build_train_batch(result, tr.cfg.algo)
    metrics = tr._update(batch, n_trees=2)

    # One mini-batch per tree (in a shuffled order), each cut into micro-batches of at most 3 rows.
    trees = [int(m.tree_of_row[0]) for m, _ in micros]
    assert all(len(set(m.tree_of_row.tolist())) == 1 for m, _ in micros)
    order = list(dict.fromkeys(trees))
    assert sorted(order) == [0, 1] and trees == sorted(trees, key=order.index)  # a tree's micro-batches together
    n_micro = [math.ceil(int((batch.tree_of_row == t).sum()) / 3) for t in order]
    assert max(n_micro) > 1  # several micro-batches in a mini-batch: the sync pattern shows

    def one_mini_batch(n):  # no_sync around every micro-batch but the last (none under FSDP), then the step
        return (["loss"] * n if fsdp else ["no_sync", "loss"] * (n - 1) + ["loss"]) + ["step"]

    assert events == [e for n in n_micro for e in one_mini_batch(n)]
    assert metrics["loss/updates"] == 2.0
    assert metrics["loss/grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-12)

    assert len(recomputed) == len(micros) == len(losses) == sum(n_micro)
    # The configured log-prob path (at2po.training.logprobs) in both: packed, chunked head.
    path = {"share_prefix": not fsdp, "chunk_tokens": 1024, "tree_packing": True}
    assert all(kw == path for _, kw in recomputed)
    for (micro, lp_kw), (args, kw, _) in zip(micros, losses):
        assert lp_kw == path
        assert kw == {"level": "token", "clip_low": 0.11, "clip_high": 0.27, "turn_ids": kw["turn_ids"],
                      "agg": "token-mean", "log_ratio_max": 7.5}
        assert torch.equal(kw["turn_ids"], micro.turn_ids)
        for got, want in zip(args[1:], (micro.old_log_probs, micro.advantages, micro.response_mask)):
            assert torch.equal(got, want)
    # token-mean: a micro-batch's weight is its share of its mini-batch's trained tokens.
    logged, i = 0.0, 0
    for n in n_micro:
        part = losses[i:i + n]
        tokens = [float(m.response_mask.sum()) for m, _ in micros[i:i + n]]
        logged += sum(t / sum(tokens) * loss for t, (_, _, loss) in zip(tokens, part))
        i += n
    assert metrics["loss/policy"] == pytest.approx(logged / 2, rel=1e-9)


def test_a_one_row_mini_batch_backpropagates_its_whole_loss(run_assets, tmp_path, length_task, monkeypatch):
    """Chains of one row per prompt, one prompt per mini-batch: each micro-batch is the whole
    mini-batch, so backward gets loss + kl_coef·KL at weight exactly 1 (a one-row tree's advantage is
    0, so only the KL term carries a gradient: the policy is moved off the reference first)."""
    import at2po.training.trainer as trainer_module

    coef = 0.5
    tr = Trainer(make_run_cfg(run_assets, tmp_path / "run", f"task.name={length_task}", "rollout.n_initial=1",
                              "rollout.expansion_rounds=0", "rollout.samples_per_tree=1", f"algo.kl_coef={coef}",
                              "trainer.mini_batch_prompts=1", "trainer.save_every=0", "optim.lr=1e-2"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in tr.accelerator.unwrap_model(tr.model).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    calls, backward = [], []
    policy_loss = trainer_module.policy_loss

    def loss_spy(*args, **kw):
        loss, m = policy_loss(*args, **kw)
        calls.append((float(loss.detach()), m))  # the trainer adds m["kl_ref"] after the call
        return loss, m

    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    acc = tr.accelerator
    real_backward = acc.backward
    monkeypatch.setattr(acc, "backward", lambda x: (backward.append(float(x.detach())), real_backward(x))[1])
    metrics = tr.train_step()
    assert metrics["loss/updates"] == 2.0 and len(calls) == len(backward) == 2
    assert min(m["kl_ref"] for _, m in calls) > 1e-6
    assert backward == pytest.approx([pl + coef * m["kl_ref"] for pl, m in calls], rel=1e-6, abs=1e-12)
    assert metrics["loss/kl_ref"] == pytest.approx(sum(m["kl_ref"] for _, m in calls) / 2, rel=1e-9)


# == 3. PPO epochs, KL to the reference, warm-up, gradient checkpointing =================================
def test_ppo_epochs_double_the_updates_and_the_second_epoch_is_off_policy(run_assets, tmp_path, length_task,
                                                                           monkeypatch):
    import at2po.training.trainer as trainer_module

    calls = []
    policy_loss = trainer_module.policy_loss

    def recording(*args, **kw):
        loss, m = policy_loss(*args, **kw)
        calls.append(m)
        return loss, m

    monkeypatch.setattr(trainer_module, "policy_loss", recording)
    # (epochs, prompts per mini-batch): 2 trees a step, one micro-batch per mini-batch.
    for epochs, mb in ((1, 2), (2, 2), (2, 1)):
        calls.clear()
        tr = Trainer(make_run_cfg(run_assets, tmp_path / f"e{epochs}{mb}", f"task.name={length_task}",
                                  f"trainer.ppo_epochs={epochs}", f"trainer.mini_batch_prompts={mb}",
                                  "trainer.micro_batch_rows=64", "trainer.save_every=0"))
        steps, norms = [], []
        step = tr.optimizer.step
        tr.optimizer.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
        clip = tr.accelerator.clip_grad_norm_
        tr.accelerator.clip_grad_norm_ = lambda *a, **k: (norms.append(float(n := clip(*a, **k))), n)[1]
        metrics = tr.train_step()
        updates = epochs * (2 // mb)  # one optimizer step per mini-batch and epoch
        assert len(steps) == len(calls) == tr.scheduler.last_epoch == metrics["loss/updates"] == updates
        assert metrics["loss/grad_norm"] == pytest.approx(sum(norms) / updates, rel=1e-12)  # mean over updates
        # The first epoch's first update runs on π_old itself (recomputed): every ratio exactly 1.
        assert calls[0]["ratio_min"] == calls[0]["ratio_max"] == 1.0
        if (epochs, mb) == (2, 2):
            # One mini-batch per epoch: the second epoch runs on the weights the first one moved,
            # against the same π_old, so its ratios are not all 1.
            assert (calls[1]["ratio_min"], calls[1]["ratio_max"]) != (1.0, 1.0)


@pytest.mark.parametrize("kind", ["low_var_kl", "k2"])
def test_kl_to_a_frozen_reference(run_assets, tmp_path, length_task, kind):
    off = Trainer(make_run_cfg(run_assets, tmp_path / "off", f"task.name={length_task}", "trainer.save_every=0"))
    assert off.ref_model is None and "loss/kl_ref" not in off.train_step()

    coef = 0.5
    tr = Trainer(make_run_cfg(run_assets, tmp_path / "on", f"task.name={length_task}", f"algo.kl_coef={coef}",
                              f"algo.kl_kind={kind}", "trainer.mini_batch_prompts=2", "trainer.micro_batch_rows=64", "trainer.save_every=0",
                              "optim.lr=1e-2"))
    ref = tr.ref_model
    policy = tr.accelerator.unwrap_model(tr.model)
    assert ref is not None and ref is not policy
    assert all(not p.requires_grad for p in ref.parameters())
    w_init = weights(tr)
    ref_init = {k: v.clone() for k, v in ref.state_dict().items()}
    assert_same_weights(ref_init, w_init, atol=0)

    batches = []
    update = tr._update
    tr._update = lambda batch, n_trees: (batches.append(copy.deepcopy(batch)), update(batch, n_trees))[1]
    m1 = tr.train_step()
    assert m1["loss/kl_ref"] == pytest.approx(0.0, abs=1e-7)  # one update per step: π_θ = π_ref at its start
    w1 = weights(tr)
    m2 = tr.train_step()
    # By hand: k3 = exp(ref − logp) − (ref − logp) − 1 (or k2 = ½ (ref − logp)²) per trained token,
    # the mean over a row's tokens, then over rows; logp from the weights after step 1, ref from
    # the initial ones.
    batch = batches[1]
    mask = batch.response_mask.bool()
    snapshot = copy.deepcopy(policy)
    snapshot.load_state_dict(w1)
    with torch.no_grad():
        logp = response_log_probs(snapshot, batch, 1.0)
        ref_lp = response_log_probs(ref, batch, 1.0)
    d = (ref_lp - logp).double()
    est = torch.where(mask, d.exp() - d - 1 if kind == "low_var_kl" else 0.5 * d * d, torch.zeros_like(d))
    kl = float((est.sum(1) / mask.sum(1)).mean())
    assert kl > 1e-6
    assert m2["loss/kl_ref"] == pytest.approx(kl, rel=1e-4)
    # On-policy (ratio 1, nothing clipped) the loss is −mean_rows token-mean(A) + coef·KL.
    adv = (batch.advantages * mask).sum(1) / mask.sum(1)
    assert m2["loss/policy"] == pytest.approx(float(-adv.mean()) + coef * kl, abs=1e-5)
    # The policy moved; the reference did not.
    assert any(not torch.equal(w_init[k], v) for k, v in weights(tr).items())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ref_init[k]), k


def test_warmup_scales_the_lr_of_the_first_updates(run_assets, tmp_path, length_task):
    lr = 1e-3
    tr = Trainer(make_run_cfg(run_assets, tmp_path / "run", f"task.name={length_task}", "optim.warmup_steps=3",
                              f"optim.lr={lr}", "trainer.mini_batch_prompts=2", "trainer.save_every=0"))
    used = []
    step = tr.optimizer.step
    tr.optimizer.step = lambda *a, **k: (used.append(tr.optimizer.param_groups[0]["lr"]), step(*a, **k))[1]
    for _ in range(4):
        tr.train_step()
    # One update per step; update s (0-based) runs at lr·min(1, (s + 1)/3).
    assert used == pytest.approx([lr / 3, 2 * lr / 3, lr, lr], rel=1e-12)
    assert tr.scheduler.last_epoch == 4


def test_logged_lr_is_the_lr_the_step_used(run_assets, tmp_path, length_task):
    lr = 1e-3
    tr = Trainer(make_run_cfg(run_assets, tmp_path / "run", f"task.name={length_task}", "optim.warmup_steps=3",
                              f"optim.lr={lr}", "trainer.mini_batch_prompts=2", "trainer.save_every=0",
                              "rollout.n_initial=2", "rollout.expansion_rounds=0", "rollout.samples_per_tree=2"))
    logged = [tr.train_step()["lr"] for _ in range(3)]
    assert logged == pytest.approx([lr / 3, 2 * lr / 3, lr], rel=1e-12)


def checkpointing(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
    return model.is_gradient_checkpointing if on is None else on


def test_gradient_checkpointing_gives_the_same_update(run_assets, tmp_path, length_task):
    extra = (f"task.name={length_task}", "optim.grad_clip=1e9", "optim.lr=0.1", "trainer.save_every=0")
    plain, ckpt = (linear_adam(Trainer(make_run_cfg(run_assets, tmp_path / f"gc{gc}", *extra,
                                                    f"model.gradient_checkpointing={gc}")))
                   for gc in ("false", "true"))
    assert not checkpointing(plain) and checkpointing(ckpt)
    w0 = weights(plain)
    result = plain.engine.rollout([plain.engine.prompt(r) for r in plain.train_rows[:2]])
    batch, _ = build_train_batch(result, plain.cfg.algo)
    assert batch.advantages.abs().sum() > 0
    m_plain = plain._update(copy.deepcopy(batch), n_trees=2)
    m_ckpt = ckpt._update(copy.deepcopy(batch), n_trees=2)
    assert m_plain["loss/policy"] == pytest.approx(m_ckpt["loss/policy"], abs=1e-6)
    assert max(float((weights(plain)[k] - w0[k]).abs().max()) for k in w0) > 1e-3
    assert_same_weights(weights(plain), weights(ckpt))


# == 9. the command line ============================================================================
def test_cli_config_demo_and_train_resume(run_assets, tmp_path, length_task, capsys):
    from at2po.cli import main

    overrides = ["rollout.top_k=3", "algo.loss_agg=token-mean", "optim.betas=[0.8, 0.9]", "tools.enabled=[search]"]
    assert main(["config", *overrides]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(printed)
    assert yaml.safe_load(printed)["rollout"]["top_k"] == 3
    assert load_config(str(tmp_path / "printed.yaml"), []) == load_config(None, overrides)
    assert main(["config"]) == 0
    (tmp_path / "default.yaml").write_text(capsys.readouterr().out)
    assert load_config(str(tmp_path / "default.yaml"), []) == load_config(None, [])

    assert main(["demo"]) == 0
    heads = [line.split(")")[0] for line in capsys.readouterr().out.splitlines() if not line.startswith(" ")]
    assert heads == ["1", "2.1", "2.2", "3", "4"]  # chains, two expansion rounds, credit, losses
    assert main(["demo", "--rounds", "1"]) == 0
    assert [l.split(")")[0] for l in capsys.readouterr().out.splitlines() if not l.startswith(" ")] == ["1", "2.1", "3", "4"]

    def train(out, steps, *flags):
        args = [f"model.path={run_assets / 'model'}", f"data.train_file={run_assets / 'train.jsonl'}",
                f"tools.search.corpus_file={run_assets / 'corpus.jsonl'}", f"task.name={length_task}",
                "rollout.n_initial=3", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.samples_per_tree=4",
                "rollout.chunk_tokens=12", "rollout.max_response_tokens=40", "rollout.max_turns=3",
                "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=1", "trainer.micro_batch_rows=3",
                "trainer.val_before_train=false", "trainer.save_every=1", "trainer.progress=false",
                "trainer.tensorboard=false", "optim.lr=1e-2", f"trainer.output_dir={out}", f"trainer.steps={steps}"]
        assert main(["train", *flags, *args]) == 0

    train(tmp_path / "straight", 4)
    train(tmp_path / "resumed", 2)
    assert latest_checkpoint(tmp_path / "resumed").name == "step_000002"
    # Mark the rows of steps 1-2: a resumed run keeps them as they are and runs steps 3-4 only.
    log = tmp_path / "resumed" / "metrics.jsonl"
    log.write_text("".join(json.dumps({**r, "marker": r["step"]}) + "\n" for r in read_rows(tmp_path / "resumed")))
    capsys.readouterr()
    train(tmp_path / "resumed", 4, "--resume")
    assert f"resumed from {tmp_path / 'resumed' / 'checkpoints' / 'step_000002'} at step 2" in capsys.readouterr().out
    straight, resumed = read_rows(tmp_path / "straight"), read_rows(tmp_path / "resumed")
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    assert [r.pop("marker", None) for r in resumed] == [1, 2, None, None]
    assert untimed(resumed) == untimed(straight)
    assert all(r["adv/abs_max"] > 0 for r in straight)  # every step moves the weights
    final = [checkpoint_weights(latest_checkpoint(tmp_path / d)) for d in ("straight", "resumed")]
    assert latest_checkpoint(tmp_path / "resumed").name == "step_000004"
    for k in final[0]:
        assert torch.equal(final[0][k], final[1][k]), k


def checkpoint_weights(path):
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


# == 10. resume of a non-trivial run ================================================================
@pytest.fixture(scope="module")
def warm_assets(tmp_path_factory):
    """A tiny model warm-started on two search-then-answer demonstrations with real BM25
    observations, so that its sampled (and greedy) rollouts call the search tool."""
    from at2po.retriever.bm25 import BM25Index
    from at2po.tools.search import LocalSearchTool
    from at2po.training.sft import SFTExample, sft_warm_start

    root = tmp_path_factory.mktemp("glue_warm")
    search = LocalSearchTool(BM25Index(CORPUS), topk=3)
    demos = [(QUESTIONS[i][0], [
        (f"<think> find {key} </think> <search> {key} </search>", format_observation(search(key).text)),
        (f"<think> done </think> <answer> The final answer is \\[ \\boxed{{{QUESTIONS[i][1]}}} \\] </answer>", ""),
    ]) for i, key in ((0, "Zorbex"), (2, "Quovia"))]
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5 + [g + o for _, d in demos for g, o in d] * 5,
                          vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                             seed=0)
    examples = [SFTExample(render_prompt(tok, QA.user_message(Sample("d", q, ())), PAPER_SYSTEM_PROMPT), d)
                for q, d in demos]
    sft_warm_start(model, tok, examples, steps=100, batch_size=2, lr=1e-2, progress=False)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, CORPUS, QUESTIONS)
    return root


def test_resume_of_a_run_with_expansions_pruning_tool_calls_and_validation(warm_assets, tmp_path, length_task,
                                                                            capsys):
    def trainer(out):
        # M = 3 chains, L = 2 rounds of K = 2 siblings (7 trajectories) pruned to N = 4 at random,
        # real BM25 search, greedy validation after every step, a checkpoint after every step.
        return Trainer(make_run_cfg(
            warm_assets, out, f"task.name={length_task}", "rollout.expansion_rounds=2", "rollout.chunk_tokens=24",
            "rollout.max_response_tokens=160", "rollout.max_turns=4", "trainer.micro_batch_rows=4",
            "trainer.val_every=1", "trainer.steps=4", "optim.lr=1e-3"))

    straight = trainer(tmp_path / "straight")
    straight.fit()
    want_rows, want_weights = read_rows(tmp_path / "straight"), weights(straight)
    assert [r["step"] for r in want_rows] == [1, 2, 3, 4]
    # The run is what it claims to be: expansions, pruning, tool calls, validation, learning.
    for r in want_rows:
        assert r["rollout/leaves_per_tree"] == 7 and r["adv/abs_max"] > 0  # 7 trajectories, 4 kept
        assert {"val/em", "val/tool_calls", "val/turns"} <= set(r)
    assert sum(r["rollout/tool_calls"] for r in want_rows[:2]) > 0
    # The steps a resume replays call the tool too. (lr 1e-3: at 1e-2 this tiny policy unlearns
    # searching within two steps under some package versions, and the replay had no tool call.)
    assert sum(r["rollout/tool_calls"] for r in want_rows[2:]) > 0
    assert max(r["rollout/depth_max"] for r in want_rows) >= 2 and any(r["val/tool_calls"] > 0 for r in want_rows)

    # 2 steps, killed (a fresh Trainer resumes), 2 more steps; a crashed save's temp dir lies
    # next to the complete checkpoint and is ignored.
    killed = tmp_path / "killed"
    trainer(killed).fit(stop_after=2)
    stale = killed / "checkpoints" / ".tmp_step_000003_99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100)  # half-written
    capsys.readouterr()
    resumed = trainer(killed)
    resumed.fit(resume=True)
    assert f"resumed from {killed / 'checkpoints' / 'step_000002'} at step 2" in capsys.readouterr().out
    assert untimed(read_rows(killed)) == untimed(want_rows)
    for k, v in weights(resumed).items():
        assert torch.equal(v, want_weights[k]), k

    # Killed while saving step 3: the step was logged, its checkpoint never renamed into place.
    # The resume starts from step 2, drops the orphaned log row and replays step 3.
    crashed = tmp_path / "crashed"
    trainer(crashed).fit(stop_after=3)
    ckpts = crashed / "checkpoints"
    (ckpts / "step_000003").rename(ckpts / ".tmp_step_000003_4242")
    (ckpts / ".tmp_step_000003_4242" / "trainer_state.pt").unlink()
    assert [r["step"] for r in read_rows(crashed)] == [1, 2, 3]
    assert latest_checkpoint(crashed).name == "step_000002"
    resumed = trainer(crashed)
    resumed.fit(resume=True)
    assert untimed(read_rows(crashed)) == untimed(want_rows)
    for k, v in weights(resumed).items():
        assert torch.equal(v, want_weights[k]), k
    assert latest_checkpoint(crashed).name == "step_000004"
