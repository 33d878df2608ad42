"""Trainer: a real tiny HF model, real BM25 search, real checkpoints."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from at2po.agent import decode_ids, format_observation, render_prompt
from at2po.config import AlgoConfig, load_config
from at2po.rewards import exact_match, extract_answer, f1_score
from at2po.rollout.generator import Generation, SamplingParams
from at2po.training.logprobs import sequence_logprobs
from at2po.tasks.base import TASKS, Sample, Score, Task, register_task
from at2po.tasks.search_qa import SearchQATask
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.tools.base import TOOLS, Tool, ToolResult, register_tool
from at2po.training.sft import SFTExample, sft_warm_start
from at2po.training.distributed import combine
from at2po.training.trainer import Trainer, build_train_batch, latest_checkpoint, response_log_probs
from conftest import SearchThenAnswer, StatelessGenerator, hand_credit, make_run_cfg, write_search_qa_files

CORPUS = [
    "Zorbex was founded by Mila Tarn.",
    "Mila Tarn was born in Quovia.",
    "Quovia is a city in Belmark.",
    "Drelto is a river that flows through Quovia.",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, CORPUS, [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
                                         ("Which country is Quovia in?", "Belmark"), ("What flows through Quovia?", "Drelto")])
    return root


class LengthRewardQA(SearchQATask):
    """search_qa with a reward that varies on a random policy's output (a test double for EM): odd length wins."""

    def score(self, response, sample, protocol):
        r = float(len(response) % 2)
        return Score(r, {"em": r, "f1": r, "format_ok": 1.0}, None, "")


def use_length_reward(trainer):
    trainer.task = trainer.engine.task = LengthRewardQA()
    return trainer


def keep_rollouts(trainer):
    """Record every training RolloutResult the trainer's engine returns."""
    kept = []
    rollout = trainer.engine.rollout

    def keep(prompts, **kw):
        result = rollout(prompts, **kw)
        if not kw.get("greedy"):  # training rollouts only (validation rolls out greedily)
            kept.append(result)
        return result

    trainer.engine.rollout = keep
    return kept


def test_one_step_raises_logprob_of_positive_advantage_turns(assets, tmp_path):
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.mini_batch_prompts=2", "algo.clip_low=0.2", "algo.clip_high=0.2",
                   "optim.lr=1e-4")
    tr = use_length_reward(Trainer(cfg))
    prompts = [tr.engine.prompt(r) for r in tr.train_rows[:2]]
    result = tr.engine.rollout(prompts)
    batch, _ = build_train_batch(result, cfg.algo)
    assert batch.advantages.abs().sum() > 0
    model = tr.accelerator.unwrap_model(tr.model)
    with torch.no_grad():
        before = response_log_probs(model, batch, 1.0)
    # The generator's log-probs are the old policy's: a fresh forward pass reproduces them.
    m = batch.response_mask.bool()
    torch.testing.assert_close(before[m], batch.old_log_probs[m], atol=1e-5, rtol=1e-5)
    w0 = [p.detach().clone() for p in model.parameters()]
    tr._update(batch, n_trees=2)
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    with torch.no_grad():
        after = response_log_probs(model, batch, 1.0)
    delta = (after - before)[m]
    adv = batch.advantages[m]
    assert (delta * adv).sum() > 0  # the surrogate Σ A·log π went up
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_resume_is_bit_identical(assets, tmp_path):
    def final_state(out, plan):
        weights = None
        for i, steps in enumerate(plan):
            cfg = make_run_cfg(assets, out, f"trainer.steps={sum(plan[:i + 1])}")
            tr = use_length_reward(Trainer(cfg))
            res = tr.fit(resume=i > 0)
            weights = {k: v.clone() for k, v in tr.accelerator.unwrap_model(tr.model).state_dict().items()}
        return weights, [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]

    w_full, log_full = final_state(tmp_path / "full", [4])
    w_res, log_res = final_state(tmp_path / "resumed", [2, 2])
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    keys = ["reward/mean", "loss/policy", "rollout/generated_tokens"]
    assert [[r[k] for k in keys] for r in log_full] == [[r[k] for k in keys] for r in log_res]
    assert latest_checkpoint(tmp_path / "full").name == "step_000004"
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp*"))
    assert len(list((tmp_path / "full" / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints


class AlwaysFails(Tool):
    name = "search"

    def run(self, query):
        raise ConnectionError("retriever is on fire")


FAILED_SEARCH = format_observation("search failed: ConnectionError: retriever is on fire")


class GarbageGenerator(StatelessGenerator):
    """Random ids (any byte pieces, broken UTF-8, tags in odd places) with random log-probs."""

    def __init__(self, vocab, eos):
        self.vocab, self.eos_token_id = vocab, eos
        self.rng = np.random.default_rng(0)

    def generate(self, contexts, params, max_new_tokens=None):
        out = []
        for lim in max_new_tokens:
            n = int(self.rng.integers(0, lim + 1))
            ids = self.rng.integers(0, self.vocab, n).tolist()
            out.append(Generation(ids, (-self.rng.random(n) * 5).tolist(), "length"))
        return out


def test_step_survives_failing_tool_and_garbage_generator(assets, tmp_path):
    # One update per step (both trees in one mini-batch): the step's ratio is exactly on-policy.
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.steps=1", "trainer.mini_batch_prompts=2")
    tr = Trainer(cfg, tools=[AlwaysFails()])
    batches = []
    update = tr._update

    def keep_batch(batch, n_trees):
        batches.append(batch)
        return update(batch, n_trees)

    tr._update = keep_batch
    rollouts = keep_rollouts(tr)
    metrics = tr.train_step()
    assert np.isfinite(metrics["loss/policy"])
    # On-policy (ratio 1 up to float error, inside the clip range): the loss is −(1/B) Σ_rows
    # token-mean(A), nothing is clipped, and the step makes exactly one optimizer update.
    batch = batches[0]
    mask = batch.response_mask.float()
    expected = -((batch.advantages * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert metrics["loss/policy"] == pytest.approx(float(expected), abs=1e-4)
    assert metrics["loss/clipfrac"] == 0.0 and metrics["loss/updates"] == 1.0
    # Every call reached the failing tool or was malformed: each one is a failure.
    assert metrics["rollout/tool_failures"] == metrics["rollout/tool_calls"]

    tr.engine.generator = GarbageGenerator(len(tr.tokenizer), tr.tokenizer.eos_token_id)
    metrics = tr.train_step()
    assert np.isfinite(metrics["loss/policy"]) and metrics["reward/mean"] == -1.0
    # Every reward is −1: the normalised leaves, hence every advantage and the loss, are exactly 0.
    assert metrics["reward/format_ok"] == 0.0 and metrics["adv/abs_max"] == 0.0 and metrics["loss/policy"] == 0.0
    assert metrics["rollout/tool_calls"] == 0.0  # a "length" turn is never a tool call

    # A well-formed search on every trajectory: the failure comes back as the observation.
    tr.engine.generator = SearchThenAnswer(tr.tokenizer)
    tr.engine.config = dataclasses.replace(tr.engine.config, max_response_tokens=200)  # room for the observation
    metrics = tr.train_step()
    assert np.isfinite(metrics["loss/policy"])
    # M = 3 chains and K = 2 re-sampled search turns per tree, each one search then an answer.
    trajectories = 2 * (3 + 2)
    assert metrics["rollout/leaves_per_tree"] * 2 == trajectories
    assert metrics["rollout/tool_calls"] == metrics["rollout/tool_failures"] == trajectories
    observations = [decode_ids(tr.tokenizer, n.obs_ids) for t in rollouts[-1].trees for n in t.nodes if n.obs_ids]
    # After pruning to N = 4 leaves a tree, each kept trajectory holds its one observation.
    assert len(observations) == 2 * 4 and set(observations) == {FAILED_SEARCH}
    assert metrics["reward/format_ok"] == 1.0
    # "Mila Tarn" is right only for question 0 (Who founded Zorbex?); every tree keeps N = 4 rows.
    drawn = [t.meta["id"] for t in rollouts[-1].trees]
    assert metrics["reward/em"] == metrics["reward/mean"] == drawn.count("0") / 2


def _means_of(records, keys):
    return {k: sum(float(r[k]) for r in records) / len(records) for k in keys}


def test_validation_and_logs(assets, tmp_path):
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.steps=1", "trainer.val_before_train=true",
                   "trainer.tensorboard=true")
    tr = Trainer(cfg)
    val_records = []
    validate = tr.validate

    def keep_records():
        out = validate()
        val_records.append(tr.val_records)
        return out

    tr.validate = keep_records
    history = tr.fit()["history"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val/em" in rows[0] and rows[0]["step"] == 0
    assert rows[-1]["step"] == 1 and "val/em" in rows[-1] and "loss/clipfrac" in rows[-1]
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    assert rows == history
    # Before and after training: val/* are the means of that validation's per-row records, and
    # each record's scores follow from its own response and golds.
    assert len(val_records) == 2 and tr.val_records is val_records[-1]
    golds = {str(i): g for i, g in enumerate([["Mila Tarn"], ["Quovia"], ["Belmark"], ["Drelto"]])}
    for row, records in zip((rows[0], rows[-1]), val_records):
        assert [r["id"] for r in records] == ["0", "1", "2", "3"]
        for r in records:
            assert list(r["target"]) == golds[r["id"]]
            assert r["prediction"] == extract_answer(r["response"])
            pred = r["prediction"]
            assert r["em"] == (exact_match(pred, r["target"]) if pred is not None else 0.0)
            assert r["f1"] == pytest.approx(f1_score(pred, r["target"]) if pred is not None else 0.0)
            assert r["format_ok"] == float(tr.engine.protocol.check_format(r["response"])[0])
            assert r["reward"] == (r["em"] if r["format_ok"] else -1.0)
        keys = ["em", "f1", "format_ok", "turns", "tool_calls"]
        assert {f"val/{k}": row[f"val/{k}"] for k in keys} == pytest.approx(
            {f"val/{k}": v for k, v in _means_of(records, keys).items()})


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.stepz=3", "unknown config key 'trainer.stepz'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("trainer.steps=ten", "trainer.steps must be an integer"),
        ("trainer.steps=0", "trainer.steps must be >= 1"),
        ("algo.loss_level=word", "algo.loss_level='word'"),
        ("rollout.expansion_mode=best", "rollout.expansion_mode='best'"),
        ("tools.search.backend=google", "tools.search.backend='google'"),
        ("tools.search=google", "tools.search must be a mapping"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("trainer.tensorboard=maybe", "trainer.tensorboard must be true or false"),
        ("trainer.prompts_per_step=10", "multiple of trainer.mini_batch_prompts"),
        ("algo", "must look like section.key=value"),
        ("algo.turn_credit=false", "config key 'algo.turn_credit' was replaced by algo.advantage"),
        ("algo.advantage=ppo", "algo.advantage='ppo'"),
        ("data.val_size=-1", "data.val_size must be >= 0"),
        ("tools.enabled=search", "tools.enabled must be a list"),
        ("task.options=f1", "task.options must be a mapping"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


@pytest.mark.parametrize("option", ["algo.adv_mode=td", "algo.value_mode=child_mean"])
def test_grpo_advantage_rejects_tree_only_options(option):
    key = option.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key}=.* has no effect with algo.advantage='grpo'"):
        load_config(None, ["algo.advantage=grpo", option])
    assert load_config(None, ["algo.advantage=tree", option])  # the tree estimator reads it
    # normalize_leaves is an option of both estimators.
    assert load_config(None, ["algo.advantage=grpo", "algo.normalize_leaves=false"]).algo.normalize_leaves is False


def test_config_yaml_roundtrip(tmp_path):
    from at2po.config import save_config

    cfg = load_config(None, ["rollout.top_k=4", "algo.loss_level=sequence", "optim.betas=[0.9, 0.95]",
                             "tools.enabled=[search, python]", "task.options={reward: f1}", "algo.advantage=grpo"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.rollout.top_k == 4 and again.optim.betas == (0.9, 0.95)
    assert again.tools.enabled == ["search", "python"] and again.task.options == {"reward": "f1"}
    assert again.algo.advantage == "grpo"
    (tmp_path / "bad.yaml").write_text("rollout:\n  top_k: 3\n  bogus: 1\n")
    with pytest.raises(ValueError, match="rollout.bogus"):
        load_config(tmp_path / "bad.yaml")


def _score(r):
    return Score(r, {"em": r, "f1": r, "format_ok": 1.0}, None, "")


def test_train_batch_without_turn_credit_gives_each_row_its_leaf_reward():
    from at2po.algorithms.tree import LEAF, TurnTree
    from at2po.rollout.engine import LeafRow, RolloutResult, TreeStats

    tree = TurnTree([1, 2])
    a = tree.add_turn(0, obs_ids=[], gen_ids=[3, 4], gen_logprobs=[-1.0, -2.0])
    b = tree.add_turn(a, obs_ids=[9], gen_ids=[5], gen_logprobs=[-0.5], status=LEAF)
    c = tree.add_turn(0, obs_ids=[], gen_ids=[6], gen_logprobs=[-3.0], status=LEAF)
    rows = []
    for leaf, r in ((b, 1.0), (c, 0.0)):
        tree.nodes[leaf].reward = r
        rows.append(LeafRow(0, tree.leaf_sequence(leaf), _score(r)))
    result = RolloutResult([tree], rows, [TreeStats()], {}, 0)
    batch, _ = build_train_batch(result, AlgoConfig(advantage="grpo"))
    r_hat = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(batch.advantages, torch.tensor([[r_hat, r_hat, 0.0, r_hat], [-r_hat, 0, 0, 0]]))
    # With turn credit (child_mean, value) the first turn of the 2-turn row has V(a) = r̂(b).
    batch, _ = build_train_batch(result, AlgoConfig(value_mode="child_mean"))
    torch.testing.assert_close(batch.advantages[0], torch.tensor([r_hat, r_hat, 0.0, r_hat]))


def test_tree_and_grpo_advantages_on_a_branching_tree():
    """A turn with two continuations: tree credit gives it the entropy-weighted value of its
    children (Eq. 3, softmax weights), GRPO gives each row's tokens that row's leaf reward."""
    from at2po.algorithms.tree import LEAF, TurnTree
    from at2po.rollout.engine import LeafRow, RolloutResult, TreeStats

    tree = TurnTree([1, 2])
    a = tree.add_turn(0, obs_ids=[], gen_ids=[3, 4], gen_logprobs=[-1.0, -2.0])
    b = tree.add_turn(a, obs_ids=[9], gen_ids=[5], gen_logprobs=[-0.5], status=LEAF)  # H = 0.5
    c = tree.add_turn(a, obs_ids=[9], gen_ids=[6, 7], gen_logprobs=[-0.2, -0.4], status=LEAF)  # H = 0.3
    d = tree.add_turn(0, obs_ids=[], gen_ids=[8], gen_logprobs=[-3.0], status=LEAF)
    rewards = {b: 1.0, c: 0.0, d: 0.0}
    rows = []
    for leaf, r in rewards.items():
        tree.nodes[leaf].reward = r
        rows.append(LeafRow(0, tree.leaf_sequence(leaf), _score(r)))
    # Top-up copy of the last leaf: a training row, but not a second leaf for the statistics.
    rows.append(LeafRow(0, rows[-1].sequence, rows[-1].score, duplicate=True))
    result = RolloutResult([tree], rows, [TreeStats()], {}, 0)

    mean = 1 / 3
    std = math.sqrt(((1 - mean) ** 2 + 2 * mean ** 2) / 3)  # population std over the 3 distinct leaves
    rb, rc = (1 - mean) / (std + 1e-6), (0 - mean) / (std + 1e-6)
    rd = rc
    wb = math.exp(0.5) / (math.exp(0.5) + math.exp(0.3))
    va = wb * rb + (1 - wb) * rc

    grpo, _ = build_train_batch(result, AlgoConfig(advantage="grpo"))
    torch.testing.assert_close(grpo.advantages, torch.tensor([
        [rb, rb, 0.0, rb, 0.0],
        [rc, rc, 0.0, rc, rc],
        [rd, 0.0, 0.0, 0.0, 0.0],
        [rd, 0.0, 0.0, 0.0, 0.0],
    ]))
    tree_batch, _ = build_train_batch(result, AlgoConfig(advantage="tree"))
    torch.testing.assert_close(tree_batch.advantages, torch.tensor([
        [va, va, 0.0, rb, 0.0],
        [va, va, 0.0, rc, rc],
        [rd, 0.0, 0.0, 0.0, 0.0],
        [rd, 0.0, 0.0, 0.0, 0.0],
    ]))
    # The configured value mode reaches the credit: child_mean values a by the plain mean of b and c.
    mean_batch, _ = build_train_batch(result, AlgoConfig(advantage="tree", value_mode="child_mean"))
    vm = (rb + rc) / 2
    torch.testing.assert_close(mean_batch.advantages[:2], torch.tensor([[vm, vm, 0.0, rb, 0.0], [vm, vm, 0.0, rc, rc]]))
    # TD advantages (tree only): A(n) = V(n) − V(parent); V(root) weighs a (H = 1.5) and d (H = 3) by softmax.
    hd = 3.0
    ha = 1.5
    wa = math.exp(ha) / (math.exp(ha) + math.exp(hd))
    v_root = wa * va + (1 - wa) * rd
    td, _ = build_train_batch(result, AlgoConfig(advantage="tree", adv_mode="td"))
    torch.testing.assert_close(td.advantages[0], torch.tensor([va - v_root, va - v_root, 0.0, rb - va, 0.0]))
    torch.testing.assert_close(td.advantages[2], torch.tensor([rd - v_root, 0.0, 0.0, 0.0, 0.0]))


def test_tree_and_grpo_advantages_of_a_real_rollout(assets, tmp_path):
    cfg = make_run_cfg(assets, tmp_path / "run")
    tr = use_length_reward(Trainer(cfg))
    result = tr.engine.rollout([tr.engine.prompt(r) for r in tr.train_rows[:2]])
    grpo, _ = build_train_batch(result, AlgoConfig(advantage="grpo"))
    tree_batch, _ = build_train_batch(result, AlgoConfig(advantage="tree"))
    assert len(result.rows) == 8 and grpo.advantages.abs().sum() > 0
    for i, row in enumerate(result.rows):
        tree = result.trees[row.tree]
        rewards = {r.sequence.leaf: r.score.reward for r in result.rows if r.tree == row.tree and not r.duplicate}
        assert sorted(rewards) == tree.leaves()  # the distinct leaves, each scored once
        r_hat, value = hand_credit(tree, rewards)
        seq = row.sequence
        n = len(seq.loss_mask)
        want_grpo = [r_hat[seq.leaf] if m else 0.0 for m in seq.loss_mask]
        want_tree = [value(int(node)) if node >= 0 else 0.0 for node in seq.token_node]
        torch.testing.assert_close(grpo.advantages[i, :n], torch.tensor(want_grpo, dtype=torch.float32))
        torch.testing.assert_close(tree_batch.advantages[i, :n], torch.tensor(want_tree, dtype=torch.float32))
        assert not grpo.advantages[i, n:].any() and not tree_batch.advantages[i, n:].any()


# -- a task and a tool defined here, run through the real trainer ---------------------------------------------------
CAPITALS = {"belmark": "Quovia", "zorbia": "Drelto", "tarnland": "Zorbex"}
LOOKUP_DESCRIPTION = ("You can look up the capital of a country by writing the country within <lookup> </lookup> "
                      "tags; the capital is returned within <result> </result> tags.")


class CapitalLookup(Tool):
    name = "lookup"
    description = LOOKUP_DESCRIPTION
    max_input_chars = 50

    def __init__(self, table=None, missing="unknown country"):
        self.table = {k.lower(): v for k, v in (table or {}).items()}
        self.missing = missing

    def run(self, query):
        key = query.strip().lower()
        if key in self.table:
            return ToolResult(self.table[key], ok=True)
        return ToolResult(f"{self.missing}: {query}", ok=False, error="not_found")


class CapitalTask(Task):
    name = "capital_quiz_test"
    tools = ("lookup",)
    metrics = ("hit", "format_ok")
    instructions = "Name the capital of the given country."

    def sample_from_dict(self, record, where):
        if not isinstance(record, dict) or any(k not in record for k in ("id", "question", "answer")):
            raise ValueError(f"{where}: a row needs id, question and answer")
        return Sample(str(record["id"]), record["question"], record["answer"])

    def user_message(self, sample):
        return f"Country: {sample.prompt}"

    def score(self, response, sample, protocol):
        ok, reason = protocol.check_format(response)
        answer = extract_answer(response)
        hit = float(ok and answer is not None and answer.strip() == sample.target)
        return Score(hit if ok else -1.0, {"hit": hit, "format_ok": float(ok)}, answer, reason)


@pytest.fixture
def capital_plugins():
    assert "lookup" not in TOOLS and CapitalTask.name not in TASKS
    register_tool()(CapitalLookup)
    register_task(CapitalTask)
    yield
    TOOLS.pop("lookup", None)
    TASKS.pop(CapitalTask.name, None)


@pytest.fixture
def capital_assets(tmp_path, capital_plugins):
    """A tiny model warm-started on one demonstration of the lookup protocol, and the task's data."""
    torch.set_num_threads(1)
    task, tool = CapitalTask(), CapitalLookup(CAPITALS)
    system = task.system_prompt([tool])
    demo = [("<think> look up Belmark </think> <lookup> Belmark </lookup>", format_observation("Quovia")),
            ("<think> done </think> <answer> The final answer is \\[ \\boxed{Quovia} \\] </answer>", "")]
    tok = train_tokenizer(synthetic_agent_texts(200) + [system, *(g + o for g, o in demo)] * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    prompt = render_prompt(tok, task.user_message(Sample("0", "Belmark", "Quovia")), system)
    sft_warm_start(model, tok, [SFTExample(prompt, demo)], steps=150, batch_size=1, lr=1e-2, progress=False)
    save_pretrained_dir(model, tok, tmp_path / "model")
    rows = [{"id": "0", "question": "Belmark", "answer": "Quovia"}, {"id": "1", "question": "Zorbia", "answer": "Drelto"}]
    (tmp_path / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_a_new_task_and_tool_train_through_the_real_trainer(capital_assets, tmp_path):
    root = capital_assets
    table = "{" + ", ".join(f"{k}: {v}" for k, v in CAPITALS.items()) + "}"
    cfg = load_config(None, [
        f"model.path={root / 'model'}", f"data.train_file={root / 'capitals.jsonl'}",
        f"data.val_file={root / 'capitals.jsonl'}", f"task.name={CapitalTask.name}", "tools.enabled=[lookup]",
        f"tools.options={{lookup: {{table: {table}, missing: no such country}}}}",
        "rollout.n_initial=3", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.samples_per_tree=4",
        "rollout.chunk_tokens=40", "rollout.max_response_tokens=120", "rollout.max_turns=3",
        "trainer.steps=2", "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=1", "trainer.micro_batch_rows=4",
        "trainer.val_every=0", "trainer.val_before_train=false", "trainer.save_every=0", "trainer.progress=false",
        "trainer.tensorboard=false", "optim.lr=1e-4", f"trainer.output_dir={tmp_path / 'run'}",
    ])
    trainer = Trainer(cfg)
    assert isinstance(trainer.task, CapitalTask)
    [tool] = trainer.tools
    assert isinstance(tool, CapitalLookup) and tool.table == {k: v for k, v in CAPITALS.items()}
    assert tool.missing == "no such country"
    assert trainer.train_rows == [Sample("0", "Belmark", "Quovia"), Sample("1", "Zorbia", "Drelto")]
    # The rollout's prompt: the task's system prompt with the tool's sentence, the task's user message.
    assert LOOKUP_DESCRIPTION in trainer.engine.system_prompt
    assert trainer.engine.system_prompt == CapitalTask().system_prompt([tool])
    assert trainer.engine.protocol.stop_strings == ("</lookup>", "</answer>")
    prompt = trainer.engine.prompt(trainer.train_rows[1])
    assert "Country: Zorbia" in trainer.tokenizer.decode(prompt.prompt_ids)

    rollouts = keep_rollouts(trainer)
    history = trainer.fit()["history"]
    assert [h["step"] for h in history] == [1, 2] and len(rollouts) == 2
    last = history[-1]
    assert {"reward/mean", "reward/hit", "reward/format_ok", "val/hit", "val/format_ok"} <= set(last)
    assert not any(k in last for k in ("reward/em", "reward/f1", "val/em"))  # the task's metrics only

    protocol = trainer.engine.protocol
    lookups_seen = 0
    for h, result in zip(history, rollouts):
        scores = []
        for row in result.rows:
            sample = trainer.train_rows[int(result.trees[row.tree].meta["id"])]
            response = decode_ids(trainer.tokenizer, row.sequence.response_ids.tolist())
            score = CapitalTask().score(response, sample, protocol)  # recomputed from the decoded response
            assert row.score == score
            assert result.trees[row.tree].nodes[row.sequence.leaf].reward == score.reward
            if not row.duplicate:
                scores.append(score)
        assert h["reward/mean"] == pytest.approx(sum(s.reward for s in scores) / len(scores))
        assert h["reward/hit"] == pytest.approx(sum(s.metrics["hit"] for s in scores) / len(scores))
        assert h["reward/format_ok"] == pytest.approx(sum(s.metrics["format_ok"] for s in scores) / len(scores))
        # The warm-started policy calls the tool; each observation is the table's answer to its query.
        assert h["rollout/tool_calls"] > 0
        for tree in result.trees:
            for node in tree.nodes[1:]:
                if node.children:
                    action = protocol.parse(decode_ids(trainer.tokenizer, node.gen_ids))
                    assert action.kind == "lookup"
                    if action.error is not None:  # a malformed call gets an error observation instead
                        continue
                    want = format_observation(tool(action.query).text)
                    for child in node.children:
                        assert decode_ids(trainer.tokenizer, tree.nodes[child].obs_ids) == want
                        lookups_seen += 1
    assert lookups_seen > 0
    assert any(s.metrics["hit"] == 1.0 for r in rollouts for s in (row.score for row in r.rows))
    # Validation: the shared evaluator's records, scored by the task.
    records = trainer.val_records
    assert [r["id"] for r in records] == ["0", "1"]
    assert set(records[0]) == {"id", "prompt", "target", "prediction", "reward", "hit", "format_ok", "turns",
                               "tool_calls", "tool_failures", "infra_failures", "response"}
    assert last["val/hit"] == pytest.approx(sum(r["hit"] for r in records) / 2)
    for r, sample in zip(records, trainer.val_rows):
        score = CapitalTask().score(r["response"], sample, protocol)
        assert (r["reward"], r["hit"], r["format_ok"], r["prediction"]) == (
            score.reward, score.metrics["hit"], score.metrics["format_ok"], score.answer)
        assert (r["prompt"], r["target"]) == (sample.prompt, sample.target)
    # The demonstrated question, greedy: one lookup, then the answer.
    assert records[0]["hit"] == 1.0 and records[0]["prediction"] == "Quovia"
    assert (records[0]["turns"], records[0]["tool_calls"]) == (2, 1)


def test_generator_samples_from_the_updated_weights(assets, tmp_path):
    cfg = make_run_cfg(assets, tmp_path / "run", "trainer.steps=2", "optim.lr=1e-2")
    tr = use_length_reward(Trainer(cfg))  # rewards that vary: the steps move the weights
    model = tr.accelerator.unwrap_model(tr.model)
    # The HF backend runs the training module itself: no copy to fall out of date.
    assert tr.generator is tr.engine.generator and tr.generator.model is model
    calls = []
    load_weights = tr.generator.load_weights

    def counting(m):
        calls.append(m)
        return load_weights(m)

    tr.generator.load_weights = counting
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tr.fit()
    assert len(calls) == 2 and all(m is model for m in calls)  # once per step (2 mini-batches a step)
    assert any(not torch.equal(w0[k], v) for k, v in model.state_dict().items())

    # A greedy sample now carries the log-probs of the updated weights, not of the initial ones.
    prompt = tr.engine.prompt(tr.train_rows[0]).prompt_ids
    gen = tr.generator.generate([prompt], SamplingParams(greedy=True, max_new_tokens=8))[0]
    assert len(gen.token_ids) > 0
    seq = [prompt + gen.token_ids]
    with torch.no_grad():
        now = sequence_logprobs(model, seq, [len(prompt)])[0]
        initial = build_tiny_model(tr.tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                   intermediate_size=64, seed=0)
        initial.load_state_dict(w0)
        before = sequence_logprobs(initial, seq, [len(prompt)])[0]
    torch.testing.assert_close(torch.tensor(gen.logprobs), now, atol=1e-5, rtol=1e-5)
    assert (torch.tensor(gen.logprobs) - before).abs().max() > 1e-3


# -- old log-probs recomputed by the trainer (docs/method.md §6) ------------------------------------------
@pytest.fixture(scope="module")
def bf16_model(assets, tmp_path_factory):
    """A model large enough (2 layers, hidden 64) for bf16 decoding and a full forward pass to
    round differently (the 1-layer test model happens to agree exactly)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets / "model")
    path = tmp_path_factory.mktemp("bf16") / "model"
    model = build_tiny_model(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=0)
    save_pretrained_dir(model, tok, path)
    return path


def offset_sampler(trainer, delta=0.01):
    """Make the sampler's log-probs ``delta`` higher than its own on every generated token, so
    that sampler and trainer differ whatever the kernels (in bf16 they usually round apart, but
    torch 2.4 on CPU rounds a decode step and a full forward alike on the test model)."""
    rollout = trainer.engine.rollout

    def shifted(prompts, **kw):
        result = rollout(prompts, **kw)
        for seq in {id(r.sequence): r.sequence for r in result.rows}.values():
            seq.old_log_probs = seq.old_log_probs + delta * seq.loss_mask
        return result

    trainer.engine.rollout = shifted
    return trainer


def test_recomputed_old_logprobs_make_first_ratios_exactly_one_in_bf16(assets, bf16_model, tmp_path):
    # One mini-batch per step and one epoch: every forward of the update sees untouched weights.
    extra = (f"model.path={bf16_model}", "model.dtype=bfloat16", "trainer.mini_batch_prompts=2", "trainer.save_every=0")
    trainer = offset_sampler(use_length_reward(Trainer(make_run_cfg(assets, tmp_path / "on", *extra))))
    m = trainer.train_step()
    assert m["loss/updates"] == 1.0
    assert m["loss/clipfrac"] == 0.0 and m["loss/ratio_min"] == 1.0 and m["loss/ratio_max"] == 1.0
    # The sampler's log-probs differ from the trainer's (bf16 rounding, plus the offset): that is
    # what the recompute removes.
    assert m["rollout/logprob_diff_max"] >= 0.01 - 1e-6 and m["rollout/logprob_diff_mean"] > 0
    assert 0.0 <= m["rollout/logprob_turns_outside_clip"] <= 1.0

    off = offset_sampler(use_length_reward(Trainer(make_run_cfg(assets, tmp_path / "off", *extra,
                                                                "algo.recompute_old_logprobs=false"))))
    m_off = off.train_step()
    assert "rollout/logprob_diff_max" not in m_off
    assert (m_off["loss/ratio_min"], m_off["loss/ratio_max"]) != (1.0, 1.0)  # the sampler's π_old: ratios off 1


def test_recompute_uses_the_first_epochs_micro_batches_and_the_truncated_correction(assets, bf16_model, tmp_path):
    cfg = make_run_cfg(assets, tmp_path / "run", f"model.path={bf16_model}", "model.dtype=bfloat16", "algo.rollout_correction=true",
                   "algo.rollout_correction_cap=1.002", "trainer.save_every=0")
    trainer = use_length_reward(Trainer(cfg))
    prompts = [trainer.engine.prompt(s) for s in trainer.train_rows[:2]]
    batch, _ = build_train_batch(trainer.engine.rollout(prompts), cfg.algo)
    # A sampler further off on two rows in three (+0.01 or −0.01 a token): their turns fall outside
    # the clip range, and the rows it under-sampled get importance weights above the cap.
    batch.old_log_probs[0::3] += 0.01 * batch.response_mask[0::3]
    batch.old_log_probs[1::3] -= 0.01 * batch.response_mask[1::3]
    rollout_lp, advantages = batch.old_log_probs.clone(), batch.advantages.clone()
    plan = trainer._epoch_plan(batch, n_trees=2)
    metrics = combine([trainer._recompute_old_log_probs(batch, plan).as_dict()])  # one process: its own
    mask = batch.response_mask.bool()
    # π_old is now the trainer's forward pass of exactly these micro-batches.
    for _, micros in plan:
        for rows in micros:
            with torch.no_grad():
                expected = trainer._log_probs(trainer.model, batch.rows(rows)).float()
            assert torch.equal(batch.old_log_probs[rows], expected * mask[rows])
    # Truncated importance weights min(π_trainer / π_sampler, cap) scale the advantages.
    weight = torch.where(mask, torch.exp(batch.old_log_probs - rollout_lp).clamp(max=1.002), torch.zeros(()))
    assert torch.equal(batch.advantages, advantages * weight)
    # Capped: the ratio reached the cap; counted in float64, as a float32 weight would round at 1.002.
    ratio = torch.exp(batch.old_log_probs - rollout_lp).double()[mask]
    capped = float((ratio >= 1.002).double().mean())
    assert 0 < capped < 1
    assert metrics["rollout/tis_capped_frac"] == pytest.approx(capped)
    assert metrics["rollout/tis_weight_mean"] == pytest.approx(float(weight[mask].mean()))
    # The mismatch metrics, by a naive loop: |Δ log π| over trained tokens, and the share of (row,
    # turn) pairs whose mean Δ puts the turn ratio outside [1 − clip_low, 1 + clip_high].
    diffs, outside, turns = [], 0, 0
    for i in range(len(batch.sequences)):
        for t in sorted(set(batch.turn_ids[i][mask[i]].tolist())):
            sel = mask[i] & (batch.turn_ids[i] == t)
            d = (batch.old_log_probs[i][sel] - rollout_lp[i][sel]).double()
            diffs += d.abs().tolist()
            turn_ratio = math.exp(float(d.mean()))
            outside += not (1 - cfg.algo.clip_low <= turn_ratio <= 1 + cfg.algo.clip_high)
            turns += 1
    assert 0 < outside < turns  # some turns outside the clip range, some inside
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-5)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(max(diffs), rel=1e-5)
    assert metrics["rollout/logprob_turns_outside_clip"] == pytest.approx(outside / turns, rel=1e-12)


def test_rollout_correction_needs_the_recompute():
    with pytest.raises(ValueError, match="algo.recompute_old_logprobs=true"):
        load_config(None, ["algo.rollout_correction=true", "algo.recompute_old_logprobs=false"])
    with pytest.raises(ValueError, match="algo.rollout_correction_cap must be >= 1"):
        load_config(None, ["algo.rollout_correction_cap=0.5"])


def test_old_logprobs_are_recomputed_at_the_rollout_temperature(assets, tmp_path):
    """Pins the recompute's temperature (a π_old recomputed at temperature 1 instead of
    rollout.temperature survived every other test, which all sample at 1). At 0.7, in fp32, the
    trainer's recomputed π_old equals an independent forward pass (logits / 0.7, log-softmax,
    the sampled token) of every trained token and agrees with the sampler's own log-probs, so no
    turn starts outside the clip band; at temperature 1 the difference is ~0.2 a token."""
    cfg = make_run_cfg(assets, tmp_path / "run", "rollout.temperature=0.7", "trainer.save_every=0")
    trainer = use_length_reward(Trainer(cfg))
    prompts = [trainer.engine.prompt(s) for s in trainer.train_rows[:2]]
    batch, _ = build_train_batch(trainer.engine.rollout(prompts), cfg.algo)
    sampler = batch.old_log_probs.clone()
    plan = trainer._epoch_plan(batch, n_trees=2)
    metrics = combine([trainer._recompute_old_log_probs(batch, plan).as_dict()])
    mask = batch.response_mask.bool()
    assert mask.sum() > 20
    for i, (seq, start) in enumerate(zip(batch.sequences, batch.response_starts)):
        with torch.no_grad():
            logits = trainer.model(torch.tensor([seq])).logits[0, start - 1 : -1].double() / 0.7
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[start:])[:, None])[:, 0]
        n = len(seq) - start
        torch.testing.assert_close(batch.old_log_probs[i, :n][mask[i, :n]].double(), expected[mask[i, :n]],
                                   atol=1e-5, rtol=0)
    assert (batch.old_log_probs - sampler)[mask].abs().max() < 1e-4
    assert metrics["rollout/logprob_diff_max"] < 1e-4 and metrics["rollout/logprob_turns_outside_clip"] == 0.0
