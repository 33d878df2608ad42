"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from at2po.config import load_config

from at2po.agent import render_prompt
from at2po.rollout.engine import Prompt
from at2po.rollout.generator import Generation
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT
from at2po.tools.base import Tool, ToolResult

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str):
    """Import a script that lives outside the package (benchmarks/, scripts/) as a module."""
    path = ROOT / relative
    name = path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class StatelessGenerator:
    """Base of test generators that hold no weights and no random state: the trainer's calls to
    ``load_weights`` and ``get/set_rng_state`` (the Generator protocol) do nothing."""

    def load_weights(self, model):
        pass

    def get_rng_state(self):
        return None

    def set_rng_state(self, state):
        pass


class SearchThenAnswer(StatelessGenerator):
    """A generator whose every trajectory searches once ("Zorbex"), then answers "Mila Tarn" after
    the observation."""

    def __init__(self, tokenizer):
        self.eos_token_id = tokenizer.eos_token_id
        self.end_of_result = tokenizer.convert_tokens_to_ids("</result>")
        self.turns = [tokenizer.encode(t, add_special_tokens=False) for t in (
            "<think> look </think> <search> Zorbex </search>",
            "<think> ok </think> <answer> The final answer is \\[ \\boxed{Mila Tarn} \\] </answer>")]

    def generate(self, contexts, params, max_new_tokens=None):
        turns = [self.turns[int(c[-1] == self.end_of_result)] for c in contexts]
        return [Generation(list(t), [-1.0] * len(t), "stop") for t in turns]


# -- a scripted generator and tool: pin a rollout's shape exactly (the real path is tested too) --
class ScriptedGenerator:
    """Answers each context with script(context_text, n_results_seen, call_index) -> (text, logprob).

    A text that ends with a stop string stops there; one longer than the call's limit is cut
    ("length"); any other ends with EOS."""

    def __init__(self, tok, script):
        self.tok, self.script = tok, script
        self.eos_token_id = tok.eos_token_id
        self.contexts: list[list[int]] = []
        self.greedy_flags: list[bool] = []
        self.n = 0

    def generate(self, contexts, params, max_new_tokens=None):
        self.greedy_flags.append(params.greedy)
        out = []
        for ctx, lim in zip(contexts, max_new_tokens or [params.max_new_tokens] * len(contexts)):
            self.contexts.append(list(ctx))
            text_ctx = self.tok.decode(ctx)
            response = text_ctx.split("<|im_start|>assistant\n", 1)[-1]  # the system prompt names the tags too
            text, lp = self.script(response, response.count("<result>"), self.n)
            self.n += 1
            ids = self.tok.encode(text, add_special_tokens=False) if isinstance(text, str) else list(text)
            stop = next((s for s in params.stop if isinstance(text, str) and text.endswith(s)), None)
            if len(ids) > lim:  # cut at the call's limit: the engine continues the turn if budget is left
                ids, finish = ids[:lim], "length"
            elif stop:
                finish = "stop"
            else:  # the scripted turn is over without a stop string: the model ended it with EOS
                if not ids or ids[-1] != self.eos_token_id:
                    ids = ids + [self.eos_token_id]
                finish = "eos"
            out.append(Generation(ids, [lp] * len(ids), finish, stop if finish == "stop" else None))
        return out


class EchoSearch(Tool):
    name = "search"

    def __init__(self):
        self.queries = []

    def run(self, query):
        self.queries.append(query)
        return ToolResult(f"Page 1: facts about {query}", ok=True)


def make_sample(q="Who?", golds=("paris",)):
    return Sample(f"id-{q}", q, tuple(golds))


def make_prompt(tok, q="Who?", golds=("paris",)):
    """A search-QA prompt rendered as the engine renders it (the paper's system prompt)."""
    return Prompt(render_prompt(tok, f"Question: {q}", PAPER_SYSTEM_PROMPT), make_sample(q, golds))


SEARCH = "<think> look </think> <search> {q} </search>"
ANSWER = "<think> ok </think> <answer> The final answer is \\[ \\boxed{{{a}}} \\] </answer>"


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, which crawl when other processes share the
    CPU (use with ``pytestmark = pytest.mark.usefixtures("single_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hand_credit(tree, leaf_reward):
    """Leaf normalisation within this tree only (population std, eps 1e-6), then entropy-softmax
    values (Eq. 3) by recursion: the naive reference of docs/method.md §3."""
    leaves = sorted(leaf_reward)
    rs = [leaf_reward[n] for n in leaves]
    mean = sum(rs) / len(rs)
    std = math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))
    r_hat = {n: (leaf_reward[n] - mean) / (std + 1e-6) for n in leaves}

    def value(n):
        node = tree.nodes[n]
        if not node.children:
            return r_hat[n]
        weights = [math.exp(tree.nodes[c].entropy) for c in node.children]
        return sum(w * value(c) for w, c in zip(weights, node.children)) / sum(weights)

    return r_hat, value


def write_search_qa_files(root, corpus, questions):
    """``corpus.jsonl`` ({"id", "contents"}) and ``train.jsonl`` (FlashRAG rows) under ``root``."""
    with open(root / "corpus.jsonl", "w") as f:
        for i, c in enumerate(corpus):
            f.write(json.dumps({"id": str(i), "contents": c}) + "\n")
    with open(root / "train.jsonl", "w") as f:
        for i, (q, a) in enumerate(questions):
            f.write(json.dumps({"id": str(i), "question": q, "golden_answers": [a]}) + "\n")


def make_run_cfg(assets, out, *extra, val=True):
    """The trainer tests' tiny search-QA run over ``assets`` (model/, corpus.jsonl, train.jsonl)."""
    return load_config(None, [
        f"model.path={assets / 'model'}", f"data.train_file={assets / 'train.jsonl'}",
        *([f"data.val_file={assets / 'train.jsonl'}"] if val else []),
        f"tools.search.corpus_file={assets / 'corpus.jsonl'}",
        "rollout.n_initial=3", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.samples_per_tree=4",
        "rollout.chunk_tokens=12", "rollout.max_response_tokens=40", "rollout.max_turns=3",
        "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=1", "trainer.micro_batch_rows=3",
        "trainer.val_every=0", "trainer.val_before_train=false", "trainer.save_every=1", "trainer.progress=false",
        "trainer.tensorboard=false", "optim.lr=1e-3", f"trainer.output_dir={out}", *extra,
    ])


def tiny_search_qa_assets(root):
    """A 1-layer random model (context 2048), a 3-passage corpus and 3 questions under ``root``, in
    the layout ``make_run_cfg`` reads."""
    from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer

    corpus = ["Zorbex was founded by Mila Tarn.", "Mila Tarn was born in Quovia.", "Quovia is a city in Belmark."]
    tok = train_tokenizer(synthetic_agent_texts(100) + corpus * 5, vocab_size=500)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, corpus, [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
                                         ("Which country is Quovia in?", "Belmark")])
    return root
