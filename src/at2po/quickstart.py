"""`at2po quickstart`: the whole AT²PO loop on a laptop CPU in minutes.

1. builds a synthetic multi-hop world (entities, relations, a passage corpus, 1–3-hop questions)
   for the ``search_qa`` task,
2. trains a tokenizer and a tiny Qwen2 model in-process and warm-starts it on demonstrations,
3. writes an ordinary training config for them and runs the same trainer as `at2po train`,
4. prints held-out EM before and after RL and saves a PNG of the training curves.

The warm start imitates a sloppy demonstrator: half of its multi-hop demonstrations answer after
too few searches, and none is 3-hop, so the warm start often answers a 2-hop question with the
entity it reached first (seeds 0-2 with the package versions in the README, 2 threads: held-out
EM 44/55/54%; one thread: 49/49/39%, seed 0 by hops 88/61/0% for 1/2/3 hops; the numbers move with
thread count and package versions, and ``scripts/calibrate_warm_start.py`` re-measures a grid of
settings). The outcome reward is what can teach it to keep searching. Demonstrations come from
"sister" worlds (same names, other facts), so the warm start teaches reading search results and
cannot memorise the facts of the world RL and evaluation use.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from at2po.agent import render_prompt
from at2po.config import Config, load_config, save_config
from at2po.retriever.bm25 import BM25Index
from at2po.tasks.base import Demonstration, Sample
from at2po.tasks.multihop import MultiHopConfig, World, build_world, demonstration
from at2po.tasks.search_qa import PAPER_SYSTEM_PROMPT, SearchQATask
from at2po.tiny import build_tiny_model, save_pretrained_dir, train_tokenizer
from at2po.tools.search import LocalSearchTool
from at2po.training.sft import SFTExample, sft_warm_start

# The system prompt of the warm start's first phase (see _warm_started_assets).
SHORT_SYSTEM_PROMPT = "Answer the question with the search tool."

# RL settings sized for 2 CPU cores; every one can be overridden with `--set key=value`.
QUICKSTART_OVERRIDES = [
    "rollout.n_initial=5",
    "rollout.expansion_rounds=1",
    "rollout.top_k=3",
    "rollout.samples_per_tree=8",
    "rollout.chunk_tokens=48",
    "rollout.max_response_tokens=400",
    "rollout.max_turns=6",
    "rollout.max_tool_calls=4",
    "rollout.tool_workers=2",
    "trainer.prompts_per_step=16",
    "trainer.mini_batch_prompts=4",
    "trainer.micro_batch_rows=32",
    "trainer.steps=30",
    "trainer.val_every=10",
    "trainer.save_every=0",
    "trainer.keep_checkpoints=1",
    "optim.lr=1e-3",
    "optim.weight_decay=0.0",
]


def _sample(question: dict[str, Any]) -> Sample:
    return Sample(question["id"], question["question"], tuple(question["golds"]), {"hops": question["hops"]})


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
    task = SearchQATask()
    texts = [PAPER_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, *(row["contents"] for row in world.corpus)]
    texts += [task.user_message(_sample(q)) for q in world.questions("train")] + [d.text for _, d in pairs]
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
    for system_prompt, steps in ((SHORT_SYSTEM_PROMPT, cfg.sft_short_prompt_steps), (PAPER_SYSTEM_PROMPT, cfg.sft_steps)):
        if steps == 0:
            continue
        examples = [SFTExample(render_prompt(tokenizer, task.user_message(_sample(q)), system_prompt), d.pieces)
                    for q, d in pairs]
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


def quickstart_assets_config(seed: int, backend: str = "hf") -> QuickstartConfig:
    """The world, tiny model and warm start of ``at2po quickstart --seed seed``.

    vLLM's attention kernels need a head dimension of at least 32, and the default model's is 16
    (64 hidden / 4 heads): with ``backend="vllm"`` the model has 2 heads of 32 over 1 KV head,
    the same parameter count and grouped-query ratio, but another model, so its numbers differ.
    """
    cfg = QuickstartConfig(seed=seed, world=MultiHopConfig(seed=seed))
    if backend == "vllm":
        cfg = replace(cfg, num_heads=2, num_kv_heads=1)
    return cfg


def quickstart_config(assets_dir: Path, out_dir: Path, seed: int, overrides: list[str]) -> Config:
    return load_config(None, [
        f"model.path={assets_dir / 'model'}",
        f"data.train_file={assets_dir / 'train.jsonl'}",
        f"data.val_file={assets_dir / 'test.jsonl'}",
        f"tools.search.corpus_file={assets_dir / 'corpus.jsonl'}",
        f"trainer.output_dir={out_dir / 'train'}",
        f"trainer.seed={seed}",
        f"rollout.seed={seed}",
        *QUICKSTART_OVERRIDES,
        *overrides,
    ])


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("at2po", "torch", "transformers", "tokenizers", "numpy", "bm25s"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def run_quickstart(out_dir: str | Path = "runs/quickstart", seed: int = 0, overrides: list[str] | None = None,
                   progress: bool = True, overwrite: bool = False) -> dict:
    from at2po.rollout.generator import check_backend
    from at2po.training.run_dir import prepare_fresh
    from at2po.training.trainer import Trainer, plot_metrics

    out = Path(out_dir)
    prepare_fresh(out / "train", overwrite=overwrite)  # refuse before minutes of warm start, not after
    t0 = time.perf_counter()
    assets_dir = out / "assets"
    cfg = quickstart_config(assets_dir, out, seed, overrides or [])  # checks the overrides before the warm start
    check_backend(cfg.rollout.backend)  # and that the backend is installed: the trainer builds it after the warm start
    print(f"[1/3] world, tokenizer, tiny model and warm start -> {assets_dir}", flush=True)
    build_quickstart_assets(quickstart_assets_config(seed, cfg.rollout.backend), out_dir=assets_dir, progress=progress)
    t_assets = time.perf_counter() - t0

    cfg.trainer.progress = progress
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "quickstart.yaml")
    print(f"[2/3] AT²PO RL ({cfg.trainer.steps} steps; the same run: at2po train --config {out / 'quickstart.yaml'})",
          flush=True)
    result = Trainer(cfg).fit(overwrite=overwrite)
    t_total = time.perf_counter() - t0

    vals = [h for h in result["history"] if "val/em" in h]
    before, after = vals[0], vals[-1]
    png = plot_metrics(Path(cfg.trainer.output_dir) / "metrics.jsonl", out / "training_curves.png")
    summary = {
        "seed": seed,
        "heldout_em_before": before["val/em"], "heldout_em_after": after["val/em"],
        "heldout_f1_before": before["val/f1"], "heldout_f1_after": after["val/f1"],
        "format_before": before["val/format_ok"], "format_after": after["val/format_ok"],
        "tool_calls_before": before["val/tool_calls"], "tool_calls_after": after["val/tool_calls"],
        "seconds_warm_start": t_assets, "seconds_total": t_total,
        # The numbers depend on these (tokenizer training, kernels, summation order): keep them with
        # the result so that two runs can be compared.
        "torch_threads": torch.get_num_threads(), "versions": _package_versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("[3/3] held-out results (greedy, one chain per question)")
    print(f"  {'':<22}{'before RL':>10}{'after RL':>10}")
    for label, key in (("exact match", "heldout_em"), ("F1", "heldout_f1"), ("valid format", "format"),
                       ("searches / question", "tool_calls")):
        print(f"  {label:<22}{summary[key + '_before']:>10.3f}{summary[key + '_after']:>10.3f}")
    print(f"  curves: {png}   metrics: {Path(cfg.trainer.output_dir) / 'metrics.jsonl'}   "
          f"time: {t_total / 60:.1f} min")
    return summary
