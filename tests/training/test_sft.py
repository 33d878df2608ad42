import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from at2po.agent import decode_ids, encode_observation, format_observation, render_prompt
from at2po.evaluation.evaluator import evaluate_greedy, mean_metrics
from at2po.quickstart import QuickstartConfig, build_quickstart_assets, build_search_tool, sft_demonstrations
from at2po.rewards import check_format, exact_match, extract_answer, f1_score
from at2po.rollout.engine import RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import HFGenerator
from at2po.tasks.base import Sample
from at2po.tasks.multihop import MultiHopConfig, build_world, demonstration
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.tiny import build_tiny_model, train_tokenizer
from at2po.training.sft import IGNORE_INDEX, SFTExample, encode_example, sft_loss, sft_warm_start

# A short system prompt keeps the test sequences short (the SFT mechanics do not depend on it).
SHORT_SYSTEM = "Answer with search."
TASK = SearchQATask()


def sample_of(q):
    return Sample(q["id"], q["question"], tuple(q["golds"]), {"hops": q["hops"]})


def user(q):
    """The search-QA task's first user message of a world question ("Question: ...")."""
    return TASK.user_message(sample_of(q))


SMALL = MultiHopConfig(seed=1, n_people=16, n_companies=5, n_cities=5, n_countries=3, n_train=24, n_test=6)


@pytest.fixture(scope="module")
def setup():
    world = build_world(SMALL)
    tool = build_search_tool(world)
    questions = world.questions("train")
    demos = [demonstration(world, q, tool) for q in questions]
    tokenizer = train_tokenizer(
        [PAPER_SYSTEM_PROMPT, *(row["contents"] for row in world.corpus), *(d.text for d in demos)], vocab_size=600
    )
    examples = [
        SFTExample(render_prompt(tokenizer, user(q), SHORT_SYSTEM), d.pieces) for q, d in zip(questions, demos)
    ]
    return world, tool, tokenizer, questions, examples


def tiny_model(tokenizer):
    return build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)


def test_labels_mask_exactly_prompt_and_observations(setup):
    world, tool, tokenizer, questions, _ = setup
    q = next(q for q in questions if q["hops"] == 1)
    entity, answer = q["chain"]
    observation = format_observation(tool(entity).text)
    first = f"<think> Look up {entity}. </think> <search> {entity} </search>"
    final = f" <think> done </think> <answer> The final answer is \\[ \\boxed{{{answer}}} \\] </answer>"
    prompt = render_prompt(tokenizer, user(q), SHORT_SYSTEM)

    # Hand-built: each piece encoded on its own, concatenated as ids (the rollout's layout).
    first_ids = tokenizer.encode(first, add_special_tokens=False)
    obs_ids = encode_observation(tokenizer, observation)
    final_ids = tokenizer.encode(final, add_special_tokens=False)
    expected_ids = prompt + first_ids + obs_ids + final_ids
    expected_labels = [IGNORE_INDEX] * len(prompt) + first_ids + [IGNORE_INDEX] * len(obs_ids) + final_ids

    ids, labels = encode_example(tokenizer, SFTExample(prompt, [(first, observation), (final, "")]))
    assert ids == expected_ids
    assert labels == expected_labels
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    masked = [i for i, lab in zip(ids, labels) if lab == IGNORE_INDEX]
    assert tokenizer.decode(trained) == first + final
    assert tokenizer.decode(masked[len(prompt) :]) == observation


def test_encoded_demonstration_reads_back_as_prompt_plus_trajectory(setup):
    world, tool, tokenizer, questions, examples = setup
    for q, ex in zip(questions, examples):
        ids, labels = encode_example(tokenizer, ex)
        assert len(ids) == len(labels)
        assert tokenizer.decode(ids[len(ex.prompt_ids) :]) == demonstration(world, q, tool).text


def _batch(tokenizer, examples, skip=0):
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    width = max(len(ids) for ids, _ in encoded) - skip
    input_ids = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids) - skip] = torch.tensor(ids[skip:])
        labels[row, : len(labs) - skip] = torch.tensor(labs[skip:])
        mask[row, : len(ids) - skip] = 1
    return input_ids, mask, labels


def test_shared_prefix_loss_equals_the_full_forward(setup):
    *_, tokenizer, _, examples = setup
    examples = examples[:5]
    model = tiny_model(tokenizer).train()
    full = sft_loss(model, *_batch(tokenizer, examples))
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    first = examples[0].prompt_ids
    n_prefix = min(
        next(i for i, (a, b) in enumerate(zip(first, ex.prompt_ids)) if a != b) for ex in examples[1:]
    )
    assert n_prefix > 5  # the system prompt, at least
    prefix = torch.tensor(first[:n_prefix])
    shared = sft_loss(model, *_batch(tokenizer, examples, skip=n_prefix), prefix_ids=prefix)
    shared.backward()
    torch.testing.assert_close(shared, full)
    for p, g in zip(model.parameters(), full_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def test_loss_is_the_mean_cross_entropy_of_labelled_tokens(setup):
    *_, tokenizer, _, examples = setup
    model = tiny_model(tokenizer)
    input_ids, mask, labels = _batch(tokenizer, examples[:3])
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(sft_loss(model, input_ids, mask, labels), expected)


def test_sft_demonstrations_come_from_sister_worlds():
    world = build_world(SMALL)
    full = sft_demonstrations(QuickstartConfig(world=SMALL, sft_worlds=2, sft_hop_fractions=(1.0, 1.0, 1.0)))
    pairs = sft_demonstrations(QuickstartConfig(world=SMALL, sft_worlds=2, sft_hop_fractions=(1.0, 0.5, 0.0)))
    count = lambda ps, h: sum(q["hops"] == h for q, _ in ps)  # noqa: E731
    assert count(pairs, 1) == count(full, 1) > 0
    assert abs(count(pairs, 2) - count(full, 2) / 2) <= 1
    assert count(pairs, 3) == 0 < count(full, 3)
    names = set(world.kinds)
    assert all(set(q["chain"]) <= names for q, _ in pairs)  # the same names...
    # ...but other facts: the warm start cannot memorise the RL world.
    world_facts = {(s, r, o) for s, rels in world.facts.items() for r, o in rels.items()}
    used = {fact for q, _ in pairs for fact in zip(q["chain"], q["relations"], q["chain"][1:])}
    assert len(used & world_facts) < 0.5 * len(used)


def test_early_answer_share_of_multi_hop_demonstrations():
    def searches_and_hops(cfg):
        return [(sum("<search>" in g for g, _ in d.pieces), q["hops"]) for q, d in sft_demonstrations(cfg)]

    cfg = QuickstartConfig(world=SMALL, sft_worlds=2, sft_hop_fractions=(1.0, 1.0, 1.0), sft_early_answer=0.0)
    assert all(s == h for s, h in searches_and_hops(cfg))
    sloppy = searches_and_hops(replace(cfg, sft_early_answer=0.5))
    assert len(sloppy) == len(searches_and_hops(cfg))
    assert all(s == h for s, h in sloppy if h == 1)  # nothing to cut short
    multi = [(s, h) for s, h in sloppy if h > 1]
    early = sum(s < h for s, h in multi)
    assert all(1 <= s <= h for s, h in multi)
    assert 0.3 < early / len(multi) < 0.7


def test_sft_loss_decreases(setup):
    *_, tokenizer, _, examples = setup
    model = tiny_model(tokenizer)
    history = sft_warm_start(model, tokenizer, examples, steps=30, batch_size=4, lr=1e-2, progress=False)
    losses = history["loss"]
    assert len(losses) == 30 and history["tokens"] > 0
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
    assert not model.training


def test_sft_is_deterministic_under_the_seed(setup):
    *_, tokenizer, _, examples = setup
    runs = []
    for _ in range(2):
        model = tiny_model(tokenizer)
        history = sft_warm_start(model, tokenizer, examples, steps=4, batch_size=3, seed=7, progress=False)
        runs.append((history["loss"], model.state_dict()))
    (loss_a, state_a), (loss_b, state_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_sft_rejects_empty_input(setup):
    *_, tokenizer, _, examples = setup
    with pytest.raises(ValueError):
        sft_warm_start(tiny_model(tokenizer), tokenizer, [], steps=1)
    with pytest.raises(ValueError):
        sft_warm_start(tiny_model(tokenizer), tokenizer, examples, steps=0)


def test_quickstart_assets_and_greedy_evaluation(tmp_path):
    cfg = QuickstartConfig(
        world=SMALL, vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=64, sft_short_prompt_steps=3, sft_steps=2, sft_batch_size=2,
    )
    world, tokenizer, model, tool = build_quickstart_assets(cfg, out_dir=tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"corpus.jsonl", "train.jsonl", "test.jsonl", "model", "sft_log.json"}
    assert len(json.loads((tmp_path / "sft_log.json").read_text())["loss"]) == 3 + 2
    # The trainer reloads the warm-started model from disk: it must tokenise exactly as here.
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "model")
    q = world.questions("train")[0]
    text = demonstration(world, q, tool).text
    assert render_prompt(reloaded, user(q), PAPER_SYSTEM_PROMPT) == render_prompt(tokenizer, user(q), PAPER_SYSTEM_PROMPT)
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)

    # Greedy evaluation of the warm-started model with the real rollout engine (the shared evaluator).
    engine = TreeRolloutEngine(HFGenerator(model, tokenizer), tokenizer, [tool], TASK,
                               RolloutConfig(chunk_tokens=8, max_response_tokens=32))
    assert engine.system_prompt == PAPER_SYSTEM_PROMPT
    questions = world.questions("test")[:3]
    samples = [sample_of(q) for q in questions]
    records = evaluate_greedy(engine, samples)
    assert [r["id"] for r in records] == [q["id"] for q in questions]
    for rec, q in zip(records, questions):
        assert (rec["prompt"], rec["target"], rec["meta"]) == (q["question"], list(q["golds"]), {"hops": q["hops"]})
        # Scores follow from the record's own response and golds.
        pred = extract_answer(rec["response"])
        assert rec["prediction"] == pred
        assert rec["em"] == (exact_match(pred, q["golds"]) if pred is not None else 0.0)
        assert rec["f1"] == pytest.approx(f1_score(pred, q["golds"]) if pred is not None else 0.0)
        assert rec["format_ok"] == float(check_format(rec["response"], ("search",))[0])
        assert rec["reward"] == (rec["em"] if rec["format_ok"] else -1.0)
        assert 1 <= rec["turns"] <= 10 and 0 <= rec["tool_calls"] <= rec["turns"]
    # The first turn is the model's own greedy continuation of the prompt (argmax, token by token,
    # until EOS, a stop string or chunk_tokens), decoded here without the engine.
    stops = engine.protocol.stop_strings
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if model.generation_config.eos_token_id
                                      is not None else [])}
    for rec, sample in zip(records, samples):
        ids, gen = engine.prompt(sample).prompt_ids, []
        with torch.no_grad():
            while len(gen) < 8:
                gen.append(int(model(torch.tensor([ids + gen])).logits[0, -1].argmax()))
                if gen[-1] in eos or any(s in decode_ids(tokenizer, gen) for s in stops):
                    break
        assert rec["response"].startswith(decode_ids(tokenizer, gen))
    means = mean_metrics(records, ["em", "format_ok", "tool_calls"])
    assert means == pytest.approx({k: sum(r[k] for r in records) / 3 for k in ("em", "format_ok", "tool_calls")})
