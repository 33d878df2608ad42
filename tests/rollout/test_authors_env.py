"""The switches that reproduce the ATPO authors' run (docs/method.md §6.7a, §6.10):
``rollout.stop_at_answer``, ``rollout.env_compat``, ``data.prompt_layout`` and
``data.atpo_backspace_quirk``; and a replay of authors'-style trajectories against a
reimplementation of their environment, written here from its documented behaviour."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from at2po.agent import ATPO_TOOL_LIMIT_NOTICE, TOOL_LIMIT_MESSAGE, render_prompt
from at2po.algorithms.losses import logprob_mismatch
from at2po.config import load_config
from at2po.rollout.engine import Prompt, RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import FINISH_EOS, FINISH_STOP, Generation, HFGenerator
from at2po.tasks.arithmetic import ArithmeticTask
from at2po.tasks.atpo_scorer import atpo_score
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.tiny import synthetic_agent_texts, train_tokenizer
from at2po.tools.base import Tool, ToolResult
from at2po.tools.search import HTTPSearchTool, LocalSearchTool, format_passages_atpo
from chain_model import chain_model, char_tokenizer
from conftest import ANSWER, SEARCH, EchoSearch, ScriptedGenerator, make_prompt, make_sample

ATPO = dict(env_compat="atpo", stop_at_answer=False)
CHAIN = dict(n_initial=1, expansion_rounds=0, samples_per_tree=1, chunk_tokens=1024, max_response_tokens=4000)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(synthetic_agent_texts(200), vocab_size=600)


def run(tok, script, tools, *, task=None, prompt=None, **rollout):
    gen = ScriptedGenerator(tok, script)
    eng = TreeRolloutEngine(gen, tok, tools, task or SearchQATask(), RolloutConfig(**{**CHAIN, **rollout}))
    res = eng.rollout([prompt or make_prompt(tok)])
    return res, res.trees[0], gen


# -- rollout.stop_at_answer -------------------------------------------------------------------------------
@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("stop_at_answer", [True, False])
def test_stop_at_answer_false_runs_the_answer_turn_to_its_eos_which_is_trained(stop_at_answer):
    """A real model (tests/rollout/chain_model.py) that writes "<answer>K</answer>." then EOS."""
    tok = char_tokenizer(single=("<answer>",))
    prompt = Prompt(render_prompt(tok, "Question: Who?", "S"), make_sample())
    model = chain_model(tok, [prompt.prompt_ids[-1], *tok.encode("<answer>K</answer>.", add_special_tokens=False)])
    eng = TreeRolloutEngine(HFGenerator(model, tok), tok, [EchoSearch()], SearchQATask(),
                            RolloutConfig(**CHAIN, stop_at_answer=stop_at_answer), system_prompt="S")
    res = eng.rollout([prompt], greedy=True)
    node, seq = res.trees[0].nodes[1], res.rows[0].sequence
    if stop_at_answer:  # today's behaviour: the call ends on the tag, no EOS is sampled
        assert tok.decode(node.gen_ids) == "<answer>K</answer>" and node.info["finish"] == FINISH_STOP
    else:  # the authors': only tool tags stop; the turn runs to EOS, and the EOS is a trained token
        assert tok.decode(node.gen_ids) == "<answer>K</answer>." + tok.eos_token and node.info["finish"] == FINISH_EOS
        assert seq.response_ids[-1] == tok.eos_token_id and seq.loss_mask[-1] == 1 and seq.turn_ids[-1] == 0
    assert node.status == "leaf" and node.info["end"] == "answer" and seq.loss_mask.all()


def test_stop_strings_follow_the_switch(tok):
    def script(ctx, n, call):
        return ANSWER.format(a="paris"), -0.2

    for stop_at_answer, stops in ((True, ("</search>", "</answer>")), (False, ("</search>",))):
        gen = ScriptedGenerator(tok, script)
        params = []
        generate = gen.generate
        gen.generate = lambda c, p, max_new_tokens=None: params.append(p.stop) or generate(c, p, max_new_tokens)
        TreeRolloutEngine(gen, tok, [EchoSearch()], SearchQATask(),
                          RolloutConfig(**CHAIN, stop_at_answer=stop_at_answer)).rollout([make_prompt(tok)])
        assert params == [stops]


# -- rollout.env_compat ---------------------------------------------------------------------------------
def searches_until_notice(notice_text):
    def script(response, n_results, call):
        if notice_text in response:
            return ANSWER.format(a="paris"), -0.2
        return SEARCH.format(q=f"q{call}"), -0.5
    return script


def test_atpo_limit_notice_is_plain_masked_text_inside_the_same_turn(tok):
    res, tree, _ = run(tok, searches_until_notice("tool call limit"), [EchoSearch()], max_tool_calls=2, **ATPO)
    # Root, two calls that ran, and ONE node holding the third call, the notice and the answer.
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 2]
    last = tree.nodes[3]
    call, notice = (tok.encode(t, add_special_tokens=False) for t in (SEARCH.format(q="q2"), ATPO_TOOL_LIMIT_NOTICE))
    answer = tok.encode(ANSWER.format(a="paris"), add_special_tokens=False) + [tok.eos_token_id]
    assert last.gen_ids == call + notice + answer
    assert last.gen_mask == [1] * len(call) + [0] * len(notice) + [1] * len(answer)
    assert last.status == "leaf" and last.info["limit_notices"] == 1 and res.stats[0].limit_notices == 1
    assert math.isclose(last.entropy, (0.5 * len(call) + 0.2 * len(answer)) / (len(call) + len(answer)))
    seq = res.rows[0].sequence
    assert seq.loss_mask.sum() == sum(len(tree.nodes[i].gen_ids) for i in (1, 2)) + len(call) + len(answer)
    # Their format check then rejects the trajectory: the third <search> has no <result>.
    assert res.rows[0].score.reward == -1.0
    assert tok.decode(tree.nodes[3].gen_ids).count("I have reached the tool call limit") == 1


def test_at2po_limit_notice_is_a_result_block_in_a_new_node(tok):
    res, tree, _ = run(tok, searches_until_notice(TOOL_LIMIT_MESSAGE), [EchoSearch()], max_tool_calls=2)
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 2, 3]
    assert tok.decode(tree.nodes[4].obs_ids) == f" <result>\n{TOOL_LIMIT_MESSAGE}\n</result>"
    assert res.rows[0].score.reward == 1.0


def test_atpo_empty_query_ends_the_trajectory_with_a_trained_eos(tok):
    def script(response, n_results, call):
        return (SEARCH.format(q="  "), -0.5) if n_results == 0 else (ANSWER.format(a="paris"), -0.2)

    res, tree, _ = run(tok, script, [EchoSearch()], **ATPO)
    node = tree.nodes[1]
    call = tok.encode(SEARCH.format(q="  "), add_special_tokens=False)
    assert len(tree) == 2 and node.status == "leaf" and node.gen_ids == call + [tok.eos_token_id]
    assert node.gen_mask == [1] * (len(call) + 1) and math.isnan(node.gen_logprobs[-1])
    assert math.isclose(node.entropy, 0.5)  # the appended EOS was not sampled: not in H
    seq = res.rows[0].sequence
    assert seq.loss_mask[-1] == 1 and math.isnan(seq.old_log_probs[-1])
    assert res.stats[0].tool_calls == 1 and res.stats[0].tool_failures == 1 and res.rows[0].score.reward == -1.0
    # today's behaviour: an error observation, and the trajectory goes on
    res, tree, _ = run(tok, script, [EchoSearch()])
    assert len(tree) == 3 and tok.decode(tree.nodes[2].obs_ids) == " <result>\nError: empty query\n</result>"


class Failing(Tool):
    name = "search"

    def run(self, query):
        return ToolResult("search failed: could not connect", ok=False, error="connection", infra=True)


def test_atpo_failed_call_ends_the_trajectory_without_eos(tok):
    def script(response, n_results, call):
        return (SEARCH.format(q="x"), -0.5) if n_results == 0 else (ANSWER.format(a="paris"), -0.2)

    for schedule in ("async", "sync"):
        res, tree, _ = run(tok, script, [Failing()], schedule=schedule, **ATPO)
        node = tree.nodes[1]
        assert len(tree) == 2 and node.status == "leaf" and node.gen_ids == tok.encode(SEARCH.format(q="x"),
                                                                                   add_special_tokens=False)
        assert node.info["tool_ok"] is False and node.info["end"].startswith("tool failed")
        assert res.stats[0].tool_failures == 1 and res.stats[0].tool_infra_failures == 1
    res, tree, _ = run(tok, script, [Failing()])
    assert len(tree) == 3 and "could not connect" in tok.decode(tree.nodes[2].obs_ids)


def test_atpo_closing_tag_alone_takes_the_last_opening_tag_of_the_whole_context(tok):
    turns = [SEARCH.format(q="Zorbex"), "<think> so </think> Mila Tarn </search>", ANSWER.format(a="paris")]

    def script(response, n_results, call):  # one chain: the n-th call writes the n-th turn
        return turns[call], -0.3

    tool = EchoSearch()
    res, tree, _ = run(tok, script, [tool], **ATPO)
    # The query runs from the first turn's <search> across its observation into the second turn.
    obs = " <result>\nPage 1: facts about Zorbex\n</result>"
    assert tool.queries == ["Zorbex", "Zorbex </search>" + obs + "<think> so </think> Mila Tarn"]
    assert [n.parent for n in tree.nodes] == [-1, 0, 1, 2] and tree.nodes[2].status == "active"
    # As the first turn, it reaches back into the prompt (the system prompt's example call).
    tool = EchoSearch()
    res, tree, _ = run(tok, lambda r, n, c: (turns[1 + c], -0.3), [tool], **ATPO)
    assert tool.queries[0].startswith("search query here </search> <result> search result here")
    assert tool.queries[0].endswith("Question: Who?<|im_end|>\n<|im_start|>assistant\n<think> so </think> Mila Tarn")
    # today's behaviour: a closing tag without its opening tag ends the trajectory, no call
    tool = EchoSearch()
    res, tree, _ = run(tok, script, [tool])
    assert tool.queries == ["Zorbex"] and tree.nodes[2].status == "leaf" and tree.nodes[2].info["action"] == "none"


def test_atpo_observation_is_not_defused_and_is_encoded_whole(tok):
    class Quoting(Tool):
        name = "search"

        def run(self, query):
            return ToolResult("a </result> b", ok=True)

    def script(response, n_results, call):
        return (SEARCH.format(q="x"), -0.5) if n_results == 0 else (ANSWER.format(a="paris"), -0.2)

    _, tree, _ = run(tok, script, [Quoting()], **ATPO)
    assert tok.decode(tree.nodes[2].obs_ids) == " <result>\na </result> b\n</result>"
    _, tree, _ = run(tok, script, [Quoting()])
    assert tok.decode(tree.nodes[2].obs_ids) == " <result>\na </ result> b\n</result>"


DOCS = ['"Quovia"\nQuovia is a city in Belmark.', '  "Quovia"\nQuovia is a city in Belmark.\n',
        '"Belmark"\nBelmark is a country with many rivers.', '"Drelto"\nDrelto is a river that flows through Quovia.']


def test_atpo_search_observations_by_hand():
    # stripped, the title's line break kept, duplicates (after the strip) and empties dropped, cut
    assert format_passages_atpo([DOCS[0], DOCS[1], " ", DOCS[2]], max_chars=20) == \
        'Page 1: "Quovia"\nQuovia is a\nPage 2: "Belmark"\nBelmark is'
    assert format_passages_atpo([]) == format_passages_atpo(["", "  "]) == "No search results found."
    local = LocalSearchTool(corpus_path=None, index=__import__("at2po.retriever.bm25", fromlist=["x"]).BM25Index(DOCS),
                            env_compat="atpo")
    text = local('"Quovia" "city"').text  # quotes removed before the search
    assert text.startswith('Page 1: "Quovia"\nQuovia is a city in Belmark.\nPage 2: ') and text.count("Quovia is a") == 1
    assert local("zyxwvut").text == "No search results found."
    ours = LocalSearchTool(index=local.index)
    assert ours("zyxwvut").text == "No results found for query: zyxwvut"
    assert ours('"Quovia" city').text.count("Quovia is a city") == 2  # today's: duplicates kept, one line each


def test_atpo_http_search_sends_the_unquoted_query_uncut(monkeypatch):
    tool = HTTPSearchTool("http://127.0.0.1:9", env_compat="atpo")
    sent = []
    monkeypatch.setattr(tool, "_retrieve", lambda qs: sent.extend(qs) or [DOCS[:3]])
    long = '"a" ' + "b" * 1500
    assert tool(long).text == 'Page 1: "Quovia"\nQuovia is a city in Belmark.\nPage 2: "Belmark"\nBelmark is a country ' \
        "with many rivers."
    assert sent == ["a " + "b" * 1500]
    ours = HTTPSearchTool("http://127.0.0.1:9")
    monkeypatch.setattr(ours, "_retrieve", lambda qs: sent.extend(qs) or [DOCS[:3]])
    ours(long)
    assert sent[-1] == long[:1000]


def test_env_compat_reaches_the_search_tool_and_is_validated(tmp_path):
    from at2po.factory import build_tools

    (tmp_path / "c.jsonl").write_text('{"id": "1", "contents": "Quovia is a city."}\n')
    for compat in ("atpo", "at2po"):
        cfg = load_config(None, [f"rollout.env_compat={compat}", f"tools.search.corpus_file={tmp_path / 'c.jsonl'}"])
        assert build_tools(cfg, SearchQATask())[0].env_compat == compat
    with pytest.raises(ValueError, match="rollout.env_compat='verl' is not one of at2po, atpo"):
        load_config(None, ["rollout.env_compat=verl"])
    with pytest.raises(ValueError, match="set algo.recompute_old_logprobs=true"):
        load_config(None, ["rollout.env_compat=atpo", "algo.recompute_old_logprobs=false"])


def test_tokens_without_a_sampler_log_prob_are_left_out_of_the_mismatch():
    nan = float("nan")
    rollout = torch.tensor([[-1.0, -2.0, nan]])
    trainer = torch.tensor([[-1.5, -2.0, -0.7]])
    m = logprob_mismatch(rollout, trainer, torch.tensor([[1, 1, 1]]), torch.tensor([[0, 0, 0]]), 3e-3, 4e-3)
    assert m["diff_mean"] == pytest.approx(0.25) and m["diff_max"] == pytest.approx(0.5)
    assert m["turns_outside_clip"] == 1.0  # exp(-0.25) is far outside the band


# -- data.prompt_layout ----------------------------------------------------------------------------------
QUESTIONS = [
    "who founded Zorbex", "Who founded Zorbex?", "  where was Mila Tarn born  ", "which river flows through Quovia?\n",
    "what is 2+2", "Is Belmark a country ?", "Zürich or Genève", "the  capital\tof Belmark", "When did it happen?? ",
    'what does "Quovia" mean', "a {braced} question", "\\boxed{x} in a question", "who is ...", "why?!",
    "name the 3 rivers", "was it 1887", "ends with a dot.", "Ünïcödé ✓", "x", "what  is  <search>  here",
]


def authors_prompt_ids(tokenizer, question: str, backspace: bool = True) -> list[int]:
    """The authors' data builder and dataset, from their documented behaviour (not their code):
    their prompt text has a double space after the example's "</result>"; their Python f-string
    turns each "\\b" of "\\boxed" into a backspace; the question is stripped and gets "?" unless
    it ends with one; the whole is ONE system message, joined by "\\nuser\\n"; the dataset renders
    it with the chat template and a generation prompt, then encodes without special tokens."""
    boxed = "\bboxed"[0] + "oxed" if backspace else "\\boxed"
    text = ("You are a helpful assistant that can solve the given question step by step with the help of the "
            "wikipedia search tool. Given a question, you need to first think about the reasoning process in the "
            "mind and then provide the answer. During thinking, you can invoke the wikipedia search tool to search "
            "for fact information about specific topics if needed. You can search as many times as your want. The "
            "reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags "
            "respectively, and the search query and result are enclosed within <search> </search> and <result> "
            "</result> tags respectively. For example, <think> This is the reasoning process. </think> <search> "
            "search query here </search> <result> search result here </result>  <think> This is the reasoning "
            f"process. </think> <answer> The final answer is \\[ {boxed}{{answer here}} \\] </answer>. In the last "
            f"part of the answer, the final exact answer is enclosed within {boxed}{{}} with latex format.")
    q = question.strip()
    if q[-1] != "?":
        q += "?"
    raw = tokenizer.apply_chat_template([{"role": "system", "content": f"{text}\nuser\n{q}"}],
                                        add_generation_prompt=True, tokenize=False)
    return tokenizer(raw, add_special_tokens=False)["input_ids"]


def test_atpo_prompt_layout_is_the_authors_prompt_token_for_token(tok):
    eng = TreeRolloutEngine(ScriptedGenerator(tok, None), tok, [EchoSearch()], SearchQATask(), prompt_layout="atpo")
    plain = TreeRolloutEngine(ScriptedGenerator(tok, None), tok, [EchoSearch()], SearchQATask(), prompt_layout="atpo",
                              atpo_backspace_quirk=False)
    for q in QUESTIONS:
        sample = make_sample(q)
        assert eng.prompt(sample).prompt_ids == authors_prompt_ids(tok, q), q
        assert plain.prompt(sample).prompt_ids == authors_prompt_ids(tok, q, backspace=False), q
    text = tok.decode(eng.prompt(make_sample("x")).prompt_ids)
    assert text.count("\x08oxed{") == 2 and "\\boxed" not in text and "</result>  <think>" in text
    assert text.startswith("<|im_start|>system\nYou are") and text.endswith("\nuser\nx?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(plain.prompt(make_sample("x")).prompt_ids).count("\\boxed{") == 2
    # data.system_prompt replaces their prompt, the layout stays
    given = TreeRolloutEngine(ScriptedGenerator(tok, None), tok, [EchoSearch()], SearchQATask(), prompt_layout="atpo",
                              system_prompt="Be brief.")
    assert tok.decode(given.prompt(make_sample("x")).prompt_ids) == \
        "<|im_start|>system\nBe brief.\nuser\nx?<|im_end|>\n<|im_start|>assistant\n"
    # chat (default): today's two messages
    chat = TreeRolloutEngine(ScriptedGenerator(tok, None), tok, [EchoSearch()], SearchQATask())
    assert chat.prompt(make_sample("x")).prompt_ids == render_prompt(tok, "Question: x", PAPER_SYSTEM_PROMPT)


def test_atpo_prompt_layout_is_validated(tok):
    with pytest.raises(ValueError, match="task 'arithmetic' has no such prompt: set data.prompt_layout=chat"):
        TreeRolloutEngine(ScriptedGenerator(tok, None), tok, [], ArithmeticTask(), prompt_layout="atpo")
    with pytest.raises(ValueError, match="data.prompt_layout='authors' is not one of chat, atpo"):
        load_config(None, ["data.prompt_layout=authors"])


def test_the_factory_builds_the_configured_prompt_layout(tmp_path):
    from conftest import tiny_search_qa_assets, make_run_cfg
    from at2po.factory import build_engine, load_model, load_tokenizer

    assets = tiny_search_qa_assets(tmp_path)
    cfg = make_run_cfg(assets, tmp_path / "run", "data.prompt_layout=atpo", "data.atpo_backspace_quirk=false",
                       "rollout.env_compat=atpo")
    tokenizer = load_tokenizer(cfg.model)
    eng = build_engine(cfg, load_model(cfg.model), tokenizer)
    assert eng.prompt(make_sample("Who founded Zorbex")).prompt_ids == \
        authors_prompt_ids(tokenizer, "Who founded Zorbex", backspace=False)
    assert eng.tools["search"].env_compat == "atpo"


# -- a replay of authors'-style trajectories against their environment --------------------------------------
ATPO_NOTICE = (" I have reached the tool call limit and cannot make further tool calls. Let me provide the final "
               "answer based on the information I have gathered so far. \n\n")
CORPUS = ['"Quovia"\nQuovia is a city in Belmark.', '"Quovia"\nQuovia is a city in Belmark.',
          '"Belmark"\nBelmark is a country with many rivers.', '"Drelto"\nDrelto is a river that flows through Quovia.',
          '"Zorbex"\nZorbex was founded by Mila Tarn.']
CASES = {  # question: (gold, the turns the policy writes, in order)
    "tool calls": ("Belmark", [SEARCH.format(q='"Quovia" city'), SEARCH.format(q="Belmark rivers"),
                               ANSWER.format(a="Belmark")]),
    "7th call": ("Belmark", [SEARCH.format(q=f"Quovia {i}") for i in range(7)] + [ANSWER.format(a="Belmark")]),
    "empty query": ("Belmark", [SEARCH.format(q="  "), ANSWER.format(a="Belmark")]),
    "closing tag only": ("Mila Tarn", [SEARCH.format(q="Zorbex"), "<think> so </think> Mila Tarn </search>",
                                       ANSWER.format(a="Mila Tarn")]),
    "closing tag only, first turn": ("Mila Tarn", ["<think> hm </think> Zorbex </search>",
                                                   ANSWER.format(a="Mila Tarn")]),
    "answer + EOS": ("Belmark", [ANSWER.format(a="Belmark")]),
    "no results": ("x", [SEARCH.format(q="zyxwvut"), ANSWER.format(a="x")]),
    "tool fails": ("x", [SEARCH.format(q="FAIL"), ANSWER.format(a="x")]),
}


def next_turn(tok, context_ids):
    """The scripted policy, for both environments: the case's next turn after as many tool-call
    turns as the response holds; a turn ending in </search> stops there, any other ends in EOS."""
    text = tok.decode(context_ids)
    question = text.split("\nuser\n", 1)[1].split("?<|im_end|>", 1)[0]
    response = text.split("<|im_start|>assistant\n", 1)[1]
    turns = CASES[question][1]
    turn = turns[min(response.count("</search>"), len(turns) - 1)]
    ids = tok.encode(turn, add_special_tokens=False)
    return (ids, "stop") if turn.endswith("</search>") else (ids + [tok.eos_token_id], "eos")


class ReplayGenerator:
    def __init__(self, tok):
        self.tok, self.eos_token_id = tok, tok.eos_token_id

    def generate(self, contexts, params, max_new_tokens=None):
        assert params.stop == ("</search>",)  # stop_at_answer=false: tool tags only
        out = []
        for c in contexts:
            ids, finish = next_turn(self.tok, c)
            out.append(Generation(ids, [-0.5] * len(ids), finish, "</search>" if finish == "stop" else None))
        return out


class FailingOn(LocalSearchTool):
    def run(self, query):
        if query == "FAIL":
            return ToolResult("search failed", ok=False, error="connection")
        return super().run(query)


def their_search(index, query):
    """Their search tool: double quotes removed, top 3, passages stripped, empty and repeated ones
    dropped, cut to 1000 characters, "Page i: " lines; "" (a failure) is what a failing call
    returns, and they treat it as one."""
    if query == "FAIL":
        return ""
    kept = []
    for doc, _ in index.search([query.replace('"', "")], 3)[0]:
        text = index.docs[doc].strip()
        if text and text not in kept:
            kept.append(text)
    return "\n".join(f"Page {i}: {t[:1000]}" for i, t in enumerate(kept, 1)) if kept else "No search results found."


def their_chain(tok, prompt_ids, index, limit=6):
    """Their environment on one chain, from its documented behaviour: token lists with a result
    mask; a generation that stops on </search> is a call (below the limit: counted, input = the
    last <search>…</search> of the WHOLE decoded context, stripped; empty input: EOS appended,
    mask 1, leaf; a failed call: leaf; else a new node that starts with " <result>\\n…\\n</result>"
    encoded whole, mask 0); at the limit the plain notice (mask 0) goes into the same node, which
    goes on; any other end is a leaf. Loss mask = result mask up to and including the first EOS."""
    curr, nodes = list(prompt_ids), [[]]  # each node: (token, mask) pairs it appended
    counter = 0
    while True:
        ids, finish = next_turn(tok, curr)
        curr += ids
        nodes[-1] += [(i, 1) for i in ids]
        if finish != "stop":
            break
        if counter >= limit:
            notice = tok.encode(ATPO_NOTICE, add_special_tokens=False)
            curr += notice
            nodes[-1] += [(i, 0) for i in notice]
            continue
        counter += 1
        full = tok.decode(curr)
        end = full.rfind("</search>")
        start = full.rfind("<search>", 0, end)
        query = full[start + len("<search>"):end].strip() if start >= 0 else ""
        if not query:
            curr.append(tok.eos_token_id)
            nodes[-1].append((tok.eos_token_id, 1))
            break
        result = their_search(index, query)
        if not result:
            break
        obs = tok.encode(f" <result>\n{result}\n</result>")
        curr += obs
        nodes.append([(i, 0) for i in obs])
    response = curr[len(prompt_ids):]
    mask = [m for node in nodes for _, m in node]
    first_eos = response.index(tok.eos_token_id) if tok.eos_token_id in response else len(response)
    mask = [m if k <= first_eos else 0 for k, m in enumerate(mask)]
    return nodes, response, mask


def test_replay_of_authors_style_trajectories_equals_their_environment(tok):
    """prompt_layout=atpo, env_compat=atpo, stop_at_answer=false, reward=atpo_em, one chain per case:
    per case, the node structure (each node's tokens and masks), the response and loss mask, the
    observation text and the reward equal those of their environment. The table is written to
    $AT2PO_REPLAY_TABLE when set."""
    from at2po.retriever.bm25 import BM25Index

    index = BM25Index(CORPUS)
    task = SearchQATask(reward="atpo_em")
    eng = TreeRolloutEngine(ReplayGenerator(tok), tok, [FailingOn(index=index, env_compat="atpo")], task,
                            RolloutConfig(**CHAIN, **ATPO), prompt_layout="atpo")
    prompts = [eng.prompt(make_sample(q, (gold,))) for q, (gold, _) in CASES.items()]
    res = eng.rollout(prompts)
    rows = ["| case | nodes after the root | tool calls run | how it ends | limit notices | observation bodies | "
            "trained / masked tokens | EOS trained | reward ours / theirs | equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t, ((case, (gold, _)), prompt) in enumerate(zip(CASES.items(), prompts)):
        tree, row = res.trees[t], next(r for r in res.rows if r.tree == t)
        nodes, response, mask = their_chain(tok, prompt.prompt_ids, index)
        ours = [list(zip(n.obs_ids, [0] * len(n.obs_ids))) + list(zip(n.gen_ids, n.gen_mask))
                for n in (tree.nodes[i] for i in row.sequence.path[1:])]
        assert [n.parent for n in tree.nodes] == list(range(-1, len(tree) - 1)), case  # one chain
        assert ours == nodes, case
        assert row.sequence.response_ids.tolist() == response and row.sequence.loss_mask.tolist() == mask, case
        theirs = atpo_score(tok.decode(response, skip_special_tokens=True), (gold,)).score
        assert row.score.reward == theirs, case
        obs = [tok.decode(tree.nodes[i].obs_ids) for i in row.sequence.path[2:]]
        assert obs == [tok.decode([i for i, _ in n[: len(tree.nodes[p].obs_ids)]]) for n, p in
                       zip(nodes[1:], row.sequence.path[2:])], case
        bodies = sorted({o.removeprefix(" <result>\n").removesuffix("\n</result>") for o in obs})
        shown = "<br>".join(repr(b if len(b) < 70 else b[:67] + "...") for b in bodies) or "none"
        leaf = tree.nodes[row.sequence.leaf]
        calls = sum(1 for i in row.sequence.path[1:] if tree.nodes[i].info.get("tool_ok") is not None)
        eos = bool(row.sequence.response_ids[-1] == tok.eos_token_id and row.sequence.loss_mask[-1] == 1)
        rows.append(f"| {case} | {len(nodes)} | {calls} | {leaf.info['end']} | {leaf.info.get('limit_notices', 0)} | "
                    f"{shown.replace('|', '/')} | {int(row.sequence.loss_mask.sum())} / "
                    f"{int((row.sequence.loss_mask == 0).sum())} | {'yes' if eos else 'no'} | "
                    f"{row.score.reward:g} / {theirs:g} | yes |")
    if os.environ.get("AT2PO_REPLAY_TABLE"):
        with open(os.environ["AT2PO_REPLAY_TABLE"], "w") as f:
            f.write("\n".join(rows) + "\n")


def test_a_training_step_with_the_authors_environment_trains_the_appended_eos(tmp_path):
    """env_compat=atpo end to end in the trainer: every trajectory writes an empty query first, so
    each row ends with the appended EOS that has no sampler log-prob. The trainer recomputes its
    old log-prob; the loss, the mismatch metrics and the importance weights stay finite."""
    from conftest import make_run_cfg, tiny_search_qa_assets
    from at2po.training.trainer import Trainer

    assets = tiny_search_qa_assets(tmp_path / "assets")
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.steps=1", "trainer.mini_batch_prompts=2",
                       "rollout.env_compat=atpo", "rollout.stop_at_answer=false", "data.prompt_layout=atpo",
                       "algo.rollout_correction=true", "trainer.save_every=0", "rollout.chunk_tokens=40")
    tr = Trainer(cfg)
    gen = ScriptedGenerator(tr.tokenizer, lambda r, n, c: (SEARCH.format(q=" "), -0.7))
    gen.load_weights = gen.get_rng_state = gen.set_rng_state = lambda *a: None
    tr.engine.generator = tr.generator = gen
    batches = []
    update = tr._update
    tr._update = lambda batch, n_trees: batches.append(batch) or update(batch, n_trees)
    metrics = tr.train_step()
    batch = batches[0]
    last = batch.response_mask.sum(1) - 1  # every row: the call's tokens, then the EOS
    rows = torch.arange(len(last))
    ends = torch.tensor([s[-1] for s in batch.sequences])
    assert (ends == tr.tokenizer.eos_token_id).all() and batch.response_mask[rows, last].all()
    assert torch.isfinite(batch.old_log_probs[rows, last]).all()  # the trainer's own, recomputed
    for key in ("loss/policy", "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/tis_weight_mean"):
        assert np.isfinite(metrics[key]), key
    assert metrics["reward/mean"] == -1.0 and metrics["rollout/tool_failures"] == metrics["rollout/tool_calls"] > 0


def test_at2po_eval_records_the_authors_switches_only_where_they_are_set():
    """A resumed `at2po eval` compares these settings: the switches change answers, so they are in
    them when set, and absent at their defaults (runs made before the switches still resume)."""
    from at2po.evaluation.benchmarks import _settings

    plain = _settings(load_config(None, []), "S")
    assert "prompt_layout" not in plain and not {"stop_at_answer", "env_compat"} & set(plain["rollout"])
    from conftest import ROOT

    paper = _settings(load_config(ROOT / "configs" / "at2po_qwen3_4b_multihop.yaml"), "S")
    assert paper["prompt_layout"] == {"layout": "atpo", "atpo_backspace_quirk": True}
    assert (paper["rollout"]["stop_at_answer"], paper["rollout"]["env_compat"]) == (False, "atpo")
