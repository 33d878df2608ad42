"""Trainer: a real tiny HF model, real BM25 search, real checkpoints."""

import json

import numpy as np
import pytest
import torch

from at2po.config import load_config
from at2po.rewards import RewardOutput
from at2po.rollout.generator import Generation
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.tools.base import Tool
from at2po.training.trainer import Trainer, build_train_batch, latest_checkpoint, response_log_probs

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
    with open(root / "corpus.jsonl", "w") as f:
        for i, c in enumerate(CORPUS):
            f.write(json.dumps({"id": str(i), "contents": c}) + "\n")
    with open(root / "train.jsonl", "w") as f:
        for i, (q, a) in enumerate([("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
                                    ("Which country is Quovia in?", "Belmark"), ("What flows through Quovia?", "Drelto")]):
            f.write(json.dumps({"id": str(i), "question": q, "golden_answers": [a]}) + "\n")
    return root


def make_cfg(assets, out, *extra):
    return load_config(None, [
        f"model.path={assets / 'model'}", f"data.train_file={assets / 'train.jsonl'}",
        f"data.val_file={assets / 'train.jsonl'}", f"tools.corpus_file={assets / 'corpus.jsonl'}",
        "rollout.n_initial=3", "rollout.expansion_rounds=1", "rollout.top_k=2", "rollout.samples_per_tree=4",
        "rollout.max_turn_tokens=12", "rollout.max_response_tokens=40", "rollout.max_turns=3",
        "trainer.prompts_per_step=2", "trainer.mini_batch_prompts=1", "trainer.micro_batch_rows=3",
        "trainer.val_every=0", "trainer.val_before_train=false", "trainer.save_every=1", "trainer.progress=false",
        "trainer.tensorboard=false", "optim.lr=1e-3", f"trainer.output_dir={out}", *extra,
    ])


def length_reward(response, golds):
    """A reward that varies on a random policy's output (a test double for EM): odd length wins."""
    r = float(len(response) % 2)
    return RewardOutput(reward=r, em=r, f1=r, format_ok=True, reason="", answer=None)


def test_one_step_raises_logprob_of_positive_advantage_turns(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "trainer.mini_batch_prompts=2", "algo.clip_low=0.2", "algo.clip_high=0.2",
                   "optim.lr=1e-4")
    tr = Trainer(cfg)
    tr.engine.reward_fn = length_reward
    prompts = [tr._prompt(r) for r in tr.train_rows[:2]]
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
            cfg = make_cfg(assets, out, f"trainer.steps={sum(plan[:i + 1])}")
            tr = Trainer(cfg)
            tr.engine.reward_fn = length_reward
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


class GarbageGenerator:
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

    def get_rng_state(self):
        return None

    def set_rng_state(self, state):
        pass


def test_step_survives_failing_tool_and_garbage_generator(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "trainer.steps=1")
    tr = Trainer(cfg, tools={"search": AlwaysFails()})
    metrics = tr.train_step()
    assert np.isfinite(metrics["loss/policy"])
    tr.engine.generator = GarbageGenerator(len(tr.tokenizer), tr.tokenizer.eos_token_id)
    metrics = tr.train_step()
    assert np.isfinite(metrics["loss/policy"]) and metrics["reward/mean"] == -1.0


def test_validation_and_logs(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", "trainer.steps=1", "trainer.val_before_train=true",
                   "trainer.tensorboard=true")
    Trainer(cfg).fit()
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val/em" in rows[0] and rows[0]["step"] == 0
    assert rows[-1]["step"] == 1 and "val/em" in rows[-1] and "loss/clipfrac" in rows[-1]
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.stepz=3", "unknown config key 'trainer.stepz'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("trainer.steps=ten", "trainer.steps must be an integer"),
        ("trainer.steps=0", "trainer.steps must be >= 1"),
        ("algo.loss_level=word", "algo.loss_level='word'"),
        ("rollout.expansion_mode=best", "rollout.expansion_mode='best'"),
        ("tools.search=google", "tools.search='google'"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("trainer.tensorboard=maybe", "trainer.tensorboard must be true or false"),
        ("trainer.prompts_per_step=10", "multiple of trainer.mini_batch_prompts"),
        ("algo", "must look like section.key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_config_yaml_roundtrip(tmp_path):
    from at2po.config import save_config

    cfg = load_config(None, ["rollout.top_k=4", "algo.loss_level=sequence", "optim.betas=[0.9, 0.95]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.rollout.top_k == 4 and again.optim.betas == (0.9, 0.95)
    (tmp_path / "bad.yaml").write_text("rollout:\n  top_k: 3\n  bogus: 1\n")
    with pytest.raises(ValueError, match="rollout.bogus"):
        load_config(tmp_path / "bad.yaml")


def test_train_batch_without_turn_credit_gives_each_row_its_leaf_reward():
    from at2po.config import AlgoConfig
    from at2po.rollout.engine import LeafRow, RolloutResult, TreeStats
    from at2po.algorithms.tree import LEAF, TurnTree

    tree = TurnTree([1, 2])
    a = tree.add_turn(0, obs_ids=[], gen_ids=[3, 4], gen_logprobs=[-1.0, -2.0])
    b = tree.add_turn(a, obs_ids=[9], gen_ids=[5], gen_logprobs=[-0.5], status=LEAF)
    c = tree.add_turn(0, obs_ids=[], gen_ids=[6], gen_logprobs=[-3.0], status=LEAF)
    rows = []
    for leaf, r in ((b, 1.0), (c, 0.0)):
        tree.nodes[leaf].reward = r
        rows.append(LeafRow(0, tree.leaf_sequence(leaf), RewardOutput(r, r, r, True, "", None)))
    result = RolloutResult([tree], rows, [TreeStats()], {}, 0)
    batch, _ = build_train_batch(result, AlgoConfig(turn_credit=False))
    r_hat = 0.5 / (0.5 + 1e-6)
    torch.testing.assert_close(batch.advantages, torch.tensor([[r_hat, r_hat, 0.0, r_hat], [-r_hat, 0, 0, 0]]))
    # With turn credit (child_mean, value) the first turn of the 2-turn row has V(a) = r̂(b).
    batch, _ = build_train_batch(result, AlgoConfig(value_mode="child_mean"))
    torch.testing.assert_close(batch.advantages[0], torch.tensor([r_hat, r_hat, 0.0, r_hat]))
