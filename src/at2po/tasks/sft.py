"""SFT warm start on demonstrations, and the quickstart's assets (world, tokenizer, tiny model).

A random-init tiny model knows nothing of the agent protocol, so RL from scratch would only ever
see format errors. The quickstart first teaches the protocol with a short supervised run on
demonstrations (``multihop.demonstration``) and leaves the rest to RL. The demonstrations are
those of a sloppy demonstrator: half of its multi-hop ones answer after too few searches, and
none is 3-hop, so the warm start often answers a 2-hop question with the entity it reached first
(calibrated defaults, seeds 0-2: held-out EM 28/37/40%, 2-hop EM 21-30%, 3-hop 0%, valid format
100%). The outcome reward is what can teach it to keep searching. ``python -m at2po.tasks.sft``
re-measures a grid of settings, see ``main``.

Demonstrations come from "sister" worlds (same names, other facts), so the warm start teaches
reading search results and cannot memorise the facts of the world RL and evaluation use.

Sequences are built exactly as the rollout builds contexts (token-in-token-out): the prompt ids
from ``render_prompt``, then each generated piece encoded on its own (labels = its ids) and each
observation encoded with ``encode_observation`` (labels -100, as are the prompt's), concatenated
as ids.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from at2po.agent import SYSTEM_PROMPT, encode_observation, render_prompt
from at2po.rollout.generator import common_prefix_length
from at2po.tasks.multihop import Demonstration, MultiHopConfig, World, build_world, demonstration
from at2po.tiny import build_tiny_model, save_pretrained_dir, train_tokenizer
from at2po.tools.search import BM25Index, LocalSearchTool

__all__ = [
    "IGNORE_INDEX",
    "SHORT_SYSTEM_PROMPT",
    "QuickstartAssets",
    "QuickstartConfig",
    "SFTExample",
    "build_quickstart_assets",
    "build_search_tool",
    "encode_example",
    "evaluate_greedy",
    "sft_demonstrations",
    "sft_loss",
    "sft_warm_start",
]

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, observations, padding)

# The system prompt of the warm start's first phase (see _warm_started_assets).
SHORT_SYSTEM_PROMPT = "Answer the question with the search tool."


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the demonstration that answers it, as (generated, observation) pieces."""

    prompt_ids: list[int]
    pieces: Sequence[tuple[str, str]]


def encode_example(tokenizer: Any, example: SFTExample) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the rollout's token layout; labels are -100 off the generated pieces."""
    input_ids = list(example.prompt_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for generated, observation in example.pieces:
        gen_ids = [int(i) for i in tokenizer.encode(generated, add_special_tokens=False)]
        input_ids += gen_ids
        labels += gen_ids
        if observation:
            obs_ids = encode_observation(tokenizer, observation)
            input_ids += obs_ids
            labels += [IGNORE_INDEX] * len(obs_ids)
    return input_ids, labels


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, skip: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of the sequences without their first ``skip`` tokens."""
    rows = [(ids[skip:], labels[skip:]) for ids, labels in encoded]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def sft_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    prefix_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy over all labelled tokens of the sequences ``prefix_ids + row``.

    The prefix that every row shares (the system prompt, most of each sequence) runs once and its
    key/value cache is repeated across the batch: the same loss and gradients as running every
    full row, at a fraction of the cost. ``labels`` is -100 where there is no loss, which must
    include the first token of each row when there is a prefix.
    """
    decoder = model.get_decoder()
    if prefix_ids is None or len(prefix_ids) == 0:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    else:
        # transformers 5 calls the cache argument (and output) ``cache``; 4.x ``past_key_values``.
        cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        n_rows, n_prefix = input_ids.shape[0], len(prefix_ids)
        cache = getattr(decoder(input_ids=prefix_ids[None], use_cache=True), cache_arg)
        cache.batch_repeat_interleave(n_rows)
        positions = torch.arange(n_prefix, n_prefix + input_ids.shape[1], device=input_ids.device)
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=torch.cat([attention_mask.new_ones((n_rows, n_prefix)), attention_mask], dim=1),
            position_ids=positions.expand(n_rows, -1),
            use_cache=True,
            **{cache_arg: cache},
        ).last_hidden_state
    # Position t predicts token t + 1. The LM head runs only where there is a label: most
    # positions are prompt or observation, and the head is a large share of a tiny model.
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[:, :-1][trained])
    return F.cross_entropy(logits.float(), targets[trained])


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def sft_warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[SFTExample],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    log_every: int = 50,
    progress: bool = True,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW on ``examples`` (cross-entropy on generated tokens).

    Batches are drawn epoch by epoch in an order shuffled by ``seed``; the loss is the mean over
    the batch's labelled tokens. Deterministic for a given seed (CPU). The model is left in eval
    mode. Returns {"loss": per-step losses, "seconds": wall time, "tokens": tokens seen,
    "examples": number of examples}.
    """
    if not examples:
        raise ValueError("sft_warm_start needs at least one example")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    encoded = [encode_example(tokenizer, ex) for ex in examples]
    # The system prompt, which all prompts share, runs once per batch; it stops short of every
    # prompt's end so that the first token after it is never a labelled one.
    prompts = [ex.prompt_ids for ex in examples]
    n_prefix = common_prefix_length(prompts, min(map(len, prompts)) - 1)
    device = next(model.parameters()).device
    prefix_ids = torch.tensor(encoded[0][0][:n_prefix], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    order: list[int] = []
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, steps, min(warmup_steps, steps))
    )
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    model.train()
    try:
        for step in range(steps):
            if len(order) < batch_size:
                epoch = list(range(len(encoded)))
                rng.shuffle(epoch)
                order += epoch
            batch = _collate([encoded[i] for i in order[:batch_size]], pad_id, n_prefix)
            del order[:batch_size]
            loss = sft_loss(model, **{k: v.to(device) for k, v in batch.items()}, prefix_ids=prefix_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            tokens += n_prefix * len(batch["input_ids"]) + int(batch["attention_mask"].sum())
            if progress and (step + 1) % log_every == 0:
                elapsed = time.perf_counter() - start
                print(f"  sft step {step + 1}/{steps}  loss {losses[-1]:.4f}  ({elapsed:.0f}s)", flush=True)
    finally:
        model.eval()
    return {"loss": losses, "seconds": time.perf_counter() - start, "tokens": tokens, "examples": len(examples)}


# ---------------------------------------------------------------------------------------------
# Quickstart assets
# ---------------------------------------------------------------------------------------------


@dataclass
class QuickstartConfig:
    """The quickstart's world, tokenizer, tiny model and warm start."""

    world: MultiHopConfig = field(default_factory=MultiHopConfig)
    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 170
    # The warm start uses questions of ``sft_worlds`` sister worlds (same names, other facts), so
    # it teaches the protocol and reading search results but cannot memorise the facts of the
    # world RL and evaluation use; of their 1-, 2- and 3-hop questions it uses these fractions.
    sft_worlds: int = 8
    sft_hop_fractions: tuple[float, float, float] = (1.0, 1.0, 0.0)
    # Share of multi-hop demonstrations from a sloppy demonstrator that answers after too few
    # searches (with the entity reached so far): the warm start imitates the habit, and the
    # outcome reward is what can teach the policy to keep searching.
    sft_early_answer: float = 0.5
    # Two phases: the demonstrations under SHORT_SYSTEM_PROMPT, then under the paper's prompt.
    sft_short_prompt_steps: int = 900
    sft_steps: int = 200
    sft_batch_size: int = 16
    sft_lr: float = 1e-2
    seed: int = 0
    device: str = "cpu"  # where the warm start runs; the model is returned there


class QuickstartAssets(NamedTuple):
    """What ``build_quickstart_assets`` returns; the model is warm-started and in eval mode."""

    world: World
    tokenizer: Any
    model: torch.nn.Module
    search_tool: LocalSearchTool


def build_search_tool(world: World) -> LocalSearchTool:
    """The real BM25 search tool (top 3) over the world's corpus."""
    return LocalSearchTool(BM25Index([row["contents"] for row in world.corpus]), topk=3)


def sft_demonstrations(cfg: QuickstartConfig) -> list[tuple[dict[str, Any], Demonstration]]:
    """(question, demonstration) pairs for the warm start: from each sister world, the share
    ``cfg.sft_hop_fractions[h - 1]`` of its h-hop questions, with that world's own search results."""
    base_fact_seed = cfg.world.seed if cfg.world.fact_seed is None else cfg.world.fact_seed
    pairs = []
    for k in range(cfg.sft_worlds):
        fact_seed = base_fact_seed + 1 + k
        sister = build_world(replace(cfg.world, fact_seed=fact_seed))
        tool = build_search_tool(sister)
        rng = random.Random(f"sft-{fact_seed}")
        for hops, fraction in zip((1, 2, 3), cfg.sft_hop_fractions):
            pool = [q for q in sister.questions("train") + sister.questions("test") if q["hops"] == hops]
            for q in rng.sample(pool, round(fraction * len(pool))):
                early = hops > 1 and rng.random() < cfg.sft_early_answer
                pairs.append((q, demonstration(sister, q, tool, searches=rng.randint(1, hops - 1) if early else None)))
    return pairs


def _warm_started_assets(cfg: QuickstartConfig, progress: bool) -> tuple[QuickstartAssets, dict[str, Any]]:
    world = build_world(cfg.world)
    tool = build_search_tool(world)
    pairs = sft_demonstrations(cfg)

    # The tokenizer learns the system prompt, the corpus and the agent's turns: all it will see.
    texts = [SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, *(row["contents"] for row in world.corpus)]
    texts += [f"Question: {q['question']}" for q in world.questions("train")] + [d.text for _, d in pairs]
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    model = build_tiny_model(
        tokenizer,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        seed=cfg.seed,
    ).to(cfg.device)
    if progress:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"warm start: {len(pairs)} demonstrations, {n_params / 1e6:.2f}M parameters, vocab {len(tokenizer)}")
    # Phase 1 under a one-line system prompt: a tiny model learns to copy names from its context
    # (the question, the search results, its own thoughts) many times faster in a short context,
    # where its still unfocused attention is not spread over the ~250 tokens of the paper's
    # prompt (with that prompt alone the loss often stays on a plateau for 1000+ steps). Phase 2
    # moves to the paper's prompt, which RL and evaluation use.
    histories = []
    for system_prompt, steps in ((SHORT_SYSTEM_PROMPT, cfg.sft_short_prompt_steps), (SYSTEM_PROMPT, cfg.sft_steps)):
        if steps == 0:
            continue
        examples = [SFTExample(render_prompt(tokenizer, q["question"], system_prompt), d.pieces) for q, d in pairs]
        histories.append(
            sft_warm_start(
                model, tokenizer, examples, steps=steps, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
                seed=cfg.seed, progress=progress,
            )
        )
    history = {
        "loss": [x for h in histories for x in h["loss"]],
        "seconds": sum(h["seconds"] for h in histories),
        "tokens": sum(h["tokens"] for h in histories),
        "examples": len(pairs),
    }
    return QuickstartAssets(world, tokenizer, model, tool), history


def build_quickstart_assets(
    cfg: QuickstartConfig | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> QuickstartAssets:
    """Build the world and its search tool, train a tokenizer, build the tiny model and warm-start it.

    With ``out_dir``: writes the world (corpus.jsonl, train.jsonl, test.jsonl), the warm-started
    model and tokenizer (``model/``) and the SFT loss history (``sft_log.json``).
    """
    cfg = cfg or QuickstartConfig()
    assets, history = _warm_started_assets(cfg, progress)
    if out_dir is not None:
        out = Path(out_dir)
        assets.world.write(out)
        save_pretrained_dir(assets.model, assets.tokenizer, out / "model")
        (out / "sft_log.json").write_text(json.dumps({"config": asdict(cfg), **history}))
    return assets


def evaluate_greedy(
    model: torch.nn.Module,
    tokenizer: Any,
    search_tool: Any,
    questions: Sequence[dict[str, Any]],
    *,
    max_turn_tokens: int = 64,
    max_response_tokens: int = 1024,
    max_turns: int = 10,
    max_tool_calls: int = 6,
) -> dict[str, float]:
    """Greedy held-out metrics with the real rollout engine: EM, format rate, EM by hop count.
    The limits are those of ``RolloutConfig``; pass a trainer's to reproduce its validation."""
    from at2po.rewards import qa_reward
    from at2po.rollout.engine import Prompt, RolloutConfig, TreeRolloutEngine
    from at2po.rollout.generator import HFGenerator

    engine = TreeRolloutEngine(
        HFGenerator(model, tokenizer),
        tokenizer,
        {"search": search_tool},
        qa_reward,
        RolloutConfig(max_turn_tokens=max_turn_tokens, max_response_tokens=max_response_tokens,
                      max_turns=max_turns, max_tool_calls=max_tool_calls),
    )
    prompts = [Prompt(render_prompt(tokenizer, q["question"]), list(q["golds"]), q["question"]) for q in questions]
    start = time.perf_counter()
    result = engine.validate(prompts)
    metrics = {
        "em": sum(r.reward.em for r in result.rows) / len(result.rows),
        "format": sum(r.reward.format_ok for r in result.rows) / len(result.rows),
        "searches": sum(s.tool_calls for s in result.stats) / len(result.stats),
        "seconds": time.perf_counter() - start,
    }
    for hops in sorted({q["hops"] for q in questions}):
        ems = [r.reward.em for r in result.rows if questions[r.tree]["hops"] == hops]
        metrics[f"em_{hops}hop"] = sum(ems) / len(ems)
    return metrics


# Calibration grid: option -> (type, default).
_GRID: dict[str, tuple[type, Any]] = {
    "people": (int, QuickstartConfig().world.n_people),  # world size (companies, cities, countries scale with it)
    "vocab": (int, QuickstartConfig.vocab_size),
    "hidden": (int, QuickstartConfig.hidden_size),  # intermediate size = 8/3 hidden
    "layers": (int, QuickstartConfig.num_layers),
    "short_steps": (int, QuickstartConfig.sft_short_prompt_steps),
    "steps": (int, QuickstartConfig.sft_steps),
    "batch": (int, QuickstartConfig.sft_batch_size),
    "lr": (float, QuickstartConfig.sft_lr),
    "worlds": (int, QuickstartConfig.sft_worlds),
    "three_hop": (float, QuickstartConfig.sft_hop_fractions[2]),  # share of 3-hop questions in the warm start
    "early_answer": (float, QuickstartConfig.sft_early_answer),
}


def _calibration_config(setting: dict[str, Any], seed: int, device: str) -> QuickstartConfig:
    people = setting["people"]
    world = MultiHopConfig(
        # Proportions of the default world (60 people, 20 companies, 20 cities, 8 countries).
        seed=seed, n_people=people, n_companies=max(2, people // 3), n_cities=max(2, people // 3),
        n_countries=max(2, people * 2 // 15),
    )
    return QuickstartConfig(
        world=world, vocab_size=setting["vocab"], hidden_size=setting["hidden"], num_layers=setting["layers"],
        intermediate_size=setting["hidden"] * 8 // 3, sft_short_prompt_steps=setting["short_steps"], sft_steps=setting["steps"],
        sft_batch_size=setting["batch"],
        sft_lr=setting["lr"], sft_worlds=setting["worlds"], sft_hop_fractions=(1.0, 1.0, setting["three_hop"]),
        sft_early_answer=setting["early_answer"], seed=seed,
        device=device,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Calibration: warm-start every combination of the given settings and print, per setting,
    one JSON line with the SFT time, the final loss and greedy held-out (and training) metrics.

    Example: ``python -m at2po.tasks.sft --steps 150 200 300 --seed 0 1 2``.
    """
    parser = argparse.ArgumentParser(description=main.__doc__)
    for name, (kind, default) in _GRID.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, nargs="+", default=[default])
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--n-train-eval", type=int, default=50, help="training questions also evaluated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard", default="0/1", help="i/n: run only every n-th setting, from the i-th")
    args = parser.parse_args(argv)
    shard, n_shards = (int(x) for x in args.shard.split("/"))

    names = [*_GRID, "seed"]
    for index, values in enumerate(itertools.product(*(getattr(args, n) for n in names))):
        if index % n_shards != shard:
            continue
        setting = dict(zip(names, values))
        cfg = _calibration_config(setting, setting["seed"], args.device)
        start = time.perf_counter()
        (world, tokenizer, model, tool), history = _warm_started_assets(cfg, progress=False)
        row: dict[str, Any] = {
            **setting, "n_sft": history["examples"], "build_s": round(time.perf_counter() - start, 1),
            "sft_s": round(history["seconds"], 1), "final_loss": round(sum(history["loss"][-10:]) / 10, 3),
        }
        for split, questions in (("test", world.questions("test")), ("train", world.questions("train")[: args.n_train_eval])):
            metrics = evaluate_greedy(model, tokenizer, tool, questions)
            row.update({f"{split}_{k}": round(v, 3) for k, v in metrics.items()})
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
