"""The paper's setting end to end on CPU (docs/method.md §5), in miniature (run with HF_HUB_OFFLINE=1).

A dense index (the packaged MiniLM encoder, offline) over a small corpus, served over HTTP with
Search-R1's /retrieve API; one AT²PO training step of a tiny model whose search calls go through
that server; then greedy evaluation of the trained checkpoint on a FlashRAG jsonl and a Search-R1
parquet benchmark through the same server, with the table checked against the per-sample files.
"""

import json
import threading

import pytest
import torch

from at2po.agent import decode_ids, render_prompt
from at2po.config import load_config
from at2po.data import QARow
from at2po.datasets import write_qa_file
from at2po.evaluation.benchmarks import evaluate
from at2po.retriever import build_index, create_app, load_retriever, packaged_minilm_path, serve_in_thread
from at2po.tasks.base import Sample
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.training.sft import SFTExample, sft_warm_start
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.tools.search import HTTPSearchTool
from at2po.training.trainer import Trainer, latest_checkpoint

WORLD = [
    "Quovia is a city in Belmark.",
    "Belmark is a country with many rivers.",
    "Drelto is a river that flows through Quovia.",
    "Zorbex was founded by Mila Tarn.",
    "Mila Tarn was born in Quovia.",
    "The Zorbex company builds small boats.",
]
GENERAL = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Penicillin was discovered by Alexander Fleming in 1928.",
    "Mount Everest is the highest mountain above sea level.",
    "The Pacific Ocean is the largest ocean on Earth.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "The Great Wall of China stretches across northern China.",
    "Ludwig van Beethoven composed nine symphonies.",
    "The Amazon river flows through South America.",
    "Honey bees live in colonies and make honey from nectar.",
    "Mars is called the Red Planet because of iron oxide.",
    "The telephone was patented by Alexander Graham Bell in 1876.",
    "Tea is made from the leaves of Camellia sinensis.",
    "The blue whale is the largest animal known to have existed.",
    "Johannes Gutenberg introduced the printing press to Europe.",
    "The Colosseum is an amphitheatre in the centre of Rome.",
    "Oxygen has the atomic number 8.",
    "A bicycle has two wheels and is driven by pedals.",
    "The Vikings were seafaring people from Scandinavia.",
    "A rainbow is caused by sunlight in water droplets.",
    "The emperor penguin breeds during the Antarctic winter.",
    "Chocolate is made from roasted cacao seeds.",
    "A lighthouse guides ships at sea with a bright lamp.",
    "Lightning is an electrostatic discharge during a storm.",
    "Bread is baked from a dough of flour and water.",
]
CORPUS = WORLD + GENERAL

TRAIN = [("Which country is Quovia in?", "Belmark"), ("Who founded Zorbex?", "Mila Tarn")]
NQ = [("Which country is Quovia in?", ["Belmark"]), ("What flows through Quovia?", ["Drelto"]),
      ("Where was Mila Tarn born?", ["Quovia"])]
HOTPOT = [("Which country is the birthplace of the founder of Zorbex in?", ["Belmark"]),
          ("What does the company founded by Mila Tarn build?", ["small boats"]),
          ("Which country is Quovia in?", ["Belmark country"])]


class CountingRetriever:
    """The served retriever, counting the queries that reach it over HTTP."""

    def __init__(self, inner):
        self.inner, self.queries, self._lock = inner, [], threading.Lock()
        self.kind, self.n_docs = inner.kind, inner.n_docs

    def search(self, queries, topk):
        with self._lock:
            self.queries += queries
        return self.inner.search(queries, topk)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    with open(root / "corpus.jsonl", "w") as f:
        for i, c in enumerate(CORPUS):
            f.write(json.dumps({"id": f"doc{i}", "contents": c}) + "\n")
    build_index(root / "corpus.jsonl", root / "dense", kind="dense", encoder=packaged_minilm_path(), progress=False,
                device="cpu")
    retriever = CountingRetriever(load_retriever(root / "dense", device="cpu"))
    assert retriever.kind == "dense"
    with serve_in_thread(create_app(retriever)) as url:
        yield url, retriever


def observation_pages(text):
    return [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("Page ")]


def test_train_then_evaluate_through_the_http_retriever(server, tmp_path):
    torch.set_num_threads(1)
    url, retriever = server
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 3, vocab_size=700)
    model = build_tiny_model(tok, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                             seed=0)
    # A random tiny model never writes a well-formed <search>: one demonstration (its observation
    # fetched from the served index) teaches the protocol first.
    obs = HTTPSearchTool(url, topk=3)("Quovia").text
    assert retriever.queries == ["Quovia"]
    pieces = [("<think> find Quovia </think> <search> Quovia </search>", " <result>\n" + obs + "\n</result>"),
              ("<think> done </think> <answer> The final answer is \\[ \\boxed{Belmark} \\] </answer>", "")]
    question = SearchQATask().user_message(Sample("0", TRAIN[0][0], (TRAIN[0][1],)))
    prompt = render_prompt(tok, question, PAPER_SYSTEM_PROMPT)
    sft_warm_start(model, tok, [SFTExample(prompt, pieces)], steps=60, batch_size=1,
                   lr=1e-2, progress=False)
    save_pretrained_dir(model, tok, tmp_path / "model")
    write_qa_file([QARow(str(i), q, (a,)) for i, (q, a) in enumerate(TRAIN)], tmp_path / "train.jsonl")

    # -- one AT²PO step, search over HTTP ------------------------------------------------------
    common = ["tools.search.backend=http", f"tools.search.retriever_url={url}", "tools.search.topk=3",
              "rollout.chunk_tokens=40", "rollout.max_response_tokens=200", "rollout.max_turns=4"]
    cfg = load_config(None, [
        f"model.path={tmp_path / 'model'}", f"data.train_file={tmp_path / 'train.jsonl'}", *common,
        "rollout.n_initial=3", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.samples_per_tree=4",
        "trainer.steps=1", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=2", "trainer.micro_batch_rows=4",
        "trainer.val_before_train=false", "trainer.val_every=0", "trainer.progress=false",
        "trainer.tensorboard=false", "optim.lr=1e-4", f"trainer.output_dir={tmp_path / 'run'}",
    ])
    trainer = Trainer(cfg)
    assert [type(t) for t in trainer.tools] == [HTTPSearchTool]
    assert trainer.engine.system_prompt == PAPER_SYSTEM_PROMPT
    rollouts = []
    rollout = trainer.engine.rollout

    def keep_rollout(prompts, **kw):  # the step's trees, to read the observations the policy saw
        rollouts.append(rollout(prompts, **kw))
        return rollouts[-1]

    trainer.engine.rollout = keep_rollout
    before = len(retriever.queries)
    history = trainer.fit()["history"]
    # Both prompts form one mini-batch (mini_batch_prompts=2) and ppo_epochs=1: exactly one update.
    assert len(history) == 1 and history[0]["loss/updates"] == 1.0
    calls = history[0]["rollout/tool_calls"]
    assert calls > 0, "the warm-started model should search during the rollout"
    # Every well-formed call went over HTTP (one query each); malformed ones are the failures.
    sent = len(retriever.queries) - before
    assert sent > 0 and sent == calls - history[0]["rollout/tool_failures"]
    # The observations the policy saw are the server's passages, one "Page i:" line each.
    seen = [tok.decode(n.obs_ids) for tree in rollouts[0].trees for n in tree.nodes if n.obs_ids]
    pages = [p for text in seen for p in observation_pages(text)]
    assert any(text.startswith(" <result>\nPage 1: ") for text in seen)
    assert pages and set(pages) <= set(CORPUS)
    # The step's rewards are the paper's EM reward of each row's decoded response.
    protocol, scores = trainer.engine.protocol, []
    for row in rollouts[0].rows:
        sample = trainer.train_rows[int(rollouts[0].trees[row.tree].meta["id"])]
        score = SearchQATask().score(decode_ids(tok, row.sequence.response_ids.tolist()), sample, protocol)
        assert row.score == score
        if not row.duplicate:
            scores.append(score)
    for key in ("em", "f1", "format_ok"):
        assert history[0][f"reward/{key}"] == pytest.approx(sum(s.metrics[key] for s in scores) / len(scores))
    assert history[0]["reward/mean"] == pytest.approx(sum(s.reward for s in scores) / len(scores))
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == "step_000001"

    # -- greedy evaluation of the trained checkpoint, same server ------------------------------
    files = [tmp_path / "data" / "nq" / "test.jsonl", tmp_path / "data" / "hotpotqa" / "dev.parquet"]
    write_qa_file([QARow(f"nq{i}", q, tuple(g)) for i, (q, g) in enumerate(NQ)], files[0])
    write_qa_file([QARow(f"hp{i}", q, tuple(g)) for i, (q, g) in enumerate(HOTPOT)], files[1])
    eval_cfg = load_config(None, [f"model.path={checkpoint}", *common])
    before = len(retriever.queries)
    results = evaluate(eval_cfg, files, tmp_path / "eval", name="AT2PO", batch_size=2, progress=False)

    out = tmp_path / "eval"
    records = {d: [json.loads(line) for line in (out / f"{d}.jsonl").read_text().splitlines()]
               for d in ("nq", "hotpotqa")}
    assert [r["prompt"] for r in records["nq"]] == [q for q, _ in NQ]
    assert [r["prompt"] for r in records["hotpotqa"]] == [q for q, _ in HOTPOT]
    assert [r["target"] for r in records["nq"]] == [g for _, g in NQ]
    eval_calls = sum(r["tool_calls"] for recs in records.values() for r in recs)
    assert retriever.queries[before] == "preflight"  # `at2po eval` checks the retriever before it starts
    assert 0 < len(retriever.queries) - before - 1 <= eval_calls
    assert any("Page 1: " in r["response"] for recs in records.values() for r in recs)

    def pct(recs, key):
        return 100 * sum(r[key] for r in recs) / len(recs)

    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    assert table[0] == "| Method | NQ | Single-hop Avg. | HotpotQA | Multi-hop Avg. |"
    nq_em, hp_em = pct(records["nq"], "em"), pct(records["hotpotqa"], "em")
    assert table[2] == f"| AT2PO | {nq_em:.2f} | {nq_em:.2f} | {hp_em:.2f} | {hp_em:.2f} |"
    for d in records:
        got = results["datasets"][d]
        assert got["n"] == 3
        assert got["em"] == pytest.approx(pct(records[d], "em"))
        assert got["f1"] == pytest.approx(pct(records[d], "f1"))
        assert got["tool_calls"] == pytest.approx(sum(r["tool_calls"] for r in records[d]) / 3)
        assert got["turns"] == pytest.approx(sum(r["turns"] for r in records[d]) / 3)
        detail = next(line for line in table if line.startswith(f"| AT2PO | {'NQ' if d == 'nq' else 'HotpotQA'} |"))
        assert detail.split(" | ")[3:5] == [f"{got['em']:.2f}", f"{got['f1']:.2f}"]
    assert results["averages"]["multi_hop"]["em"] == pytest.approx(hp_em)
    assert json.loads((out / "results.json").read_text()) == results
