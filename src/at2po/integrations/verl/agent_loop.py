"""The ``at2po_tree`` agent loop: one verl ``run()`` grows one AT²PO tree and returns its leaves.

The tree is grown by at2po's own :class:`~at2po.rollout.engine.TreeRolloutEngine` (M, L, K, N, α,
entropy or random expansion, root fallback, tool limits, chunked turns, pruning, the task's
reward): this module only gives the engine a generator backend, ``verl_server``, whose requests
go to verl's LLM servers through the agent loop's ``server_manager``.

**Sync engine, async loop.** The engine is synchronous and verl's agent loops are coroutines on
one event loop per agent-loop worker, shared by every prompt of the batch. ``run()`` therefore
runs the engine in a worker thread of its own (one per tree); the generator, called in that thread,
submits one ``server_manager.generate`` coroutine per context to the agent loop's event loop
(``asyncio.run_coroutine_threadsafe``) and blocks its own thread on their results. The event loop
never blocks: while one tree waits for its turns, the other trees' requests and verl's own work
go on, and vLLM batches the requests of all trees together.

Each leaf becomes one ``AgentLoopOutput`` (one training row): ``response_mask`` 1 on sampled
tokens and 0 on tool observations, the sampler's log-probs, the leaf's own reward, and in
``extra_fields`` the tree fields the ``at2po_tree`` estimator reads (``at2po_node_path``,
``at2po_node_entropy``) plus ``at2po_leaf_reward``. verl's v1 agent-loop worker overwrites every
output's ``reward_score`` with the last one's (it scores a multi-output run once); the ``at2po``
trainer mode (``at2po.integrations.verl.trainer``) takes the reward from ``at2po_leaf_reward``.

Configuration: the tree shape, tools and task come from an at2po config file named in verl's
config as ``+at2po.config=PATH`` (optional ``+at2po.overrides=[key=value,...]``, the same
``--set`` syntax as ``at2po train``); sampling temperature and top-p are verl's
(``actor_rollout_ref.rollout.temperature`` / ``top_p``), since verl's actor recomputes the old
log-probs at that temperature. docs/verl.md has the whole mapping.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from at2po.integrations.verl import NODE_ENTROPY, NODE_PATH
from at2po.rollout.generator import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    SamplingParams,
    context_limits,
    eos_token_set,
    register_backend,
)

__all__ = ["TREE_AGENT_LOOP", "LEAF_REWARD", "TreeAgentLoop", "VerlServer", "VerlServerGenerator", "load_tree_setup"]

TREE_AGENT_LOOP = "at2po_tree"
LEAF_REWARD = "at2po_leaf_reward"


@dataclass
class VerlServer:
    """What the ``verl_server`` backend generates through: verl's server manager and the event
    loop its coroutines must run on (the agent-loop worker's)."""

    server_manager: Any
    loop: asyncio.AbstractEventLoop
    eos_token_ids: frozenset[int]
    top_k: int = -1


class VerlServerGenerator:
    """A :class:`~at2po.rollout.generator.Generator` over verl's LLM servers, for a caller in a
    thread other than the event loop's (the engine's worker thread).

    One request per context (``server_manager.generate`` takes one prompt), all submitted before
    any is awaited, so the servers batch them. vLLM's servers return the sampled tokens, their
    log-probs and only "completed"/"aborted"; the finish reason is read off the tokens: an EOS id
    last is "eos", a stop string in the text is "stop" (requests keep it in the output), reaching
    the limit is "length". A stop string split between two calls of one turn is the engine's to
    find (this backend's ``generate`` takes no ``continues``). Weights and RNG are verl's: verl
    syncs the servers after each update and seeds them itself.
    """

    def __init__(self, server: VerlServer, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id")
        self.server = server
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        # The servers' weight versions (verl's global step) the requests were served with: verl's
        # trainer reads each row's min/max to measure off-policy staleness.
        self.weight_steps: list[int] = []

    def generate(self, contexts: list[list[int]], params: SamplingParams,
                 max_new_tokens: list[int] | None = None) -> list[Generation]:
        limits = context_limits(contexts, params, max_new_tokens)
        if self.server.loop.is_running() and _on_loop_thread(self.server.loop):
            raise RuntimeError("VerlServerGenerator.generate blocks: call it from a worker thread, not the event loop's")
        futures = [None if limit == 0 else
                   asyncio.run_coroutine_threadsafe(self._generate_one(ctx, params, limit), self.server.loop)
                   for ctx, limit in zip(contexts, limits)]
        return [Generation([], [], FINISH_LENGTH) if f is None else f.result() for f in futures]

    async def _generate_one(self, context: list[int], params: SamplingParams, limit: int) -> Generation:
        sampling = {
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "top_k": -1 if params.greedy else self.server.top_k,
            "max_tokens": limit,
            "stop": list(params.stop),
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "logprobs": True,
            "repetition_penalty": 1.0,
        }
        out = await self.server.server_manager.generate(request_id=uuid.uuid4().hex, prompt_ids=list(context),
                                                        sampling_params=sampling)
        if out.stop_reason == "aborted":
            raise RuntimeError("verl's LLM server aborted a tree's request (weights were updated mid-rollout?): "
                               "the at2po_tree agent loop needs the synchronous trainer mode (trainer.v1.trainer_mode=at2po)")
        for key in ("min_global_steps", "max_global_steps", "global_steps"):
            if out.extra_fields.get(key) is not None:
                self.weight_steps.append(int(out.extra_fields[key]))
        ids = [int(i) for i in out.token_ids]
        if out.log_probs is None or len(out.log_probs) != len(ids):
            raise RuntimeError("verl's LLM server returned no log-prob per sampled token: the tree's entropy needs them "
                               "(actor_rollout_ref.rollout.calculate_log_probs=true)")
        logprobs = [float(x) for x in out.log_probs]
        if ids and ids[-1] in self.server.eos_token_ids:
            return Generation(ids, logprobs, FINISH_EOS)
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        hits = [(text.find(s), s) for s in params.stop if s in text]
        if hits:
            return Generation(ids, logprobs, FINISH_STOP, min(hits)[1])
        return Generation(ids, logprobs, FINISH_LENGTH)

    def load_weights(self, model) -> None:
        """Nothing to copy: verl syncs the servers' weights after each update."""

    def get_rng_state(self) -> None:
        return None

    def set_rng_state(self, state) -> None:
        """The servers' sampling RNG is verl's (``actor_rollout_ref.rollout.seed``)."""


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


@register_backend("verl_server")
def _verl_server_backend(server: VerlServer, tokenizer, *, seed: int = 0) -> VerlServerGenerator:
    # ``model`` of the builder contract is the handle on verl's servers: the policy lives there,
    # and so does the sampling seed (``actor_rollout_ref.rollout.seed``): ``seed`` is unused.
    if not isinstance(server, VerlServer):
        raise ValueError("rollout.backend=verl_server generates through verl's LLM servers: it is built by the "
                         "at2po_tree agent loop inside verl (docs/verl.md), not by at2po's own trainer")
    return VerlServerGenerator(server, tokenizer)


# -- configuration -----------------------------------------------------------------------------------
_SETUPS: dict[tuple, tuple] = {}


def load_tree_setup(verl_config) -> tuple[Any, Any, list]:
    """(at2po Config, task, tools) named by verl's ``at2po.config`` / ``at2po.overrides``; built once
    per process (a search tool's index is loaded once, not once per tree)."""
    from omegaconf import OmegaConf

    from at2po.config import load_config
    from at2po.factory import build_task, build_tools

    section = verl_config.get("at2po") if hasattr(verl_config, "get") else None
    path = section.get("config") if section is not None else None
    if not path:
        raise ValueError("the at2po_tree agent loop needs an at2po config for the tree shape, task and tools: "
                         "add +at2po.config=PATH to the verl command (docs/verl.md)")
    overrides = section.get("overrides") or []
    overrides = OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else list(overrides)
    key = (str(path), tuple(str(o) for o in overrides))
    if key not in _SETUPS:
        cfg = load_config(str(path), [str(o) for o in overrides])
        if cfg.rollout.env_compat != "at2po":
            raise ValueError(f"rollout.env_compat={cfg.rollout.env_compat!r} is not supported inside verl: its limit "
                             "notice splits a turn's tokens, and verl's estimator reads turns as mask runs; use at2po")
        task = build_task(cfg)
        _SETUPS[key] = (cfg, task, build_tools(cfg, task))
    return _SETUPS[key]


def _plain(value: Any) -> Any:
    """A parquet row's value as plain Python (numpy arrays from pyarrow become lists)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def sample_from_row(row: dict[str, Any]):
    """The :class:`~at2po.tasks.base.Sample` a verl dataset row describes (Search-R1 parquet
    layout, as ``at2po data convert`` writes it)."""
    from at2po.datasets import parquet_record
    from at2po.tasks.base import Sample

    raw = {k: _plain(v) for k, v in row.items() if k != "raw_prompt"}
    raw.setdefault("prompt", _plain(row.get("raw_prompt")))
    _, qa = parquet_record(raw, f"verl row {row.get('index', '?')}")
    return Sample(str(qa.id), qa.question, tuple(qa.golds))


def tree_seed(base: int, *names: Any) -> int:
    """A seed per tree from ``rollout.seed`` and what names the tree (uid, session): the engine's
    pruning and random expansion must not repeat across the trees of a batch."""
    return (int(base) * 1_000_003 + zlib.crc32("/".join(map(str, names)).encode())) % (2**31)


# -- the agent loop ----------------------------------------------------------------------------------
_TREE_THREADS: ThreadPoolExecutor | None = None


def _tree_threads() -> ThreadPoolExecutor:
    """One thread per tree being grown in this process. Not the event loop's default executor
    (min(32, CPUs + 4) threads): its trees would wait for a free thread instead of sending their
    requests, and vLLM would see smaller batches. The threads mostly wait on the servers."""
    global _TREE_THREADS
    if _TREE_THREADS is None:
        _TREE_THREADS = ThreadPoolExecutor(max_workers=512, thread_name_prefix="at2po-tree")
    return _TREE_THREADS


@register(TREE_AGENT_LOOP)
class TreeAgentLoop(AgentLoopBase):
    """Grows one AT²PO tree per ``run()`` and returns one ``AgentLoopOutput`` per leaf (N of them,
    ``rollout.samples_per_tree``; a short tree repeats its last leaf, as at2po's trainer does)."""

    async def run(self, sampling_params: dict[str, Any], **kwargs) -> list[AgentLoopOutput]:
        from at2po.rollout.engine import TreeRolloutEngine

        cfg, task, tools = load_tree_setup(self.config)
        _check_verl_settings(self.config, cfg)
        # verl asks for validation with temperature 0: at2po's validation (one greedy chain)
        validate = float(sampling_params.get("temperature", 1.0)) == 0.0
        rollout_cfg = replace(
            cfg.rollout, backend="verl_server",
            # validation is greedy whatever the temperature, which must stay > 0 in the config
            temperature=float(sampling_params.get("temperature", cfg.rollout.temperature)) or cfg.rollout.temperature,
            top_p=float(sampling_params.get("top_p", cfg.rollout.top_p)),
            seed=tree_seed(cfg.rollout.seed, kwargs.get("uid", ""), kwargs.get("session_id", 0)),
        )
        server = VerlServer(self.server_manager, asyncio.get_running_loop(), self._eos_ids(),
                            top_k=int(sampling_params.get("top_k", -1) or -1))
        generator = VerlServerGenerator(server, self.tokenizer)
        engine = TreeRolloutEngine(generator, self.tokenizer, tools, task, rollout_cfg,
                                   system_prompt=cfg.data.system_prompt or None, prompt_layout=cfg.data.prompt_layout,
                                   atpo_backspace_quirk=cfg.data.atpo_backspace_quirk)
        prompt = engine.prompt(sample_from_row(kwargs))
        if len(prompt.prompt_ids) > self.rollout_config.prompt_length:
            raise ValueError(f"the tree's prompt has {len(prompt.prompt_ids)} tokens but "
                             f"actor_rollout_ref.rollout.prompt_length={self.rollout_config.prompt_length}: "
                             "raise data.max_prompt_length")
        t0 = time.perf_counter()
        grow = engine.validate if validate else engine.rollout
        result = await asyncio.get_running_loop().run_in_executor(_tree_threads(), grow, [prompt])
        seconds = time.perf_counter() - t0
        steps = generator.weight_steps
        return tree_outputs(result, seconds, (min(steps), max(steps)) if steps else (None, None))

    def _eos_ids(self) -> frozenset[int]:
        cached = getattr(type(self), "_eos_cache", None)
        if cached is None:
            from transformers import GenerationConfig

            try:  # Qwen3 ends chat turns on <|im_end|>, which only the generation config names
                gen_cfg = GenerationConfig.from_pretrained(self.config.actor_rollout_ref.model.path)
            except OSError:
                gen_cfg = None
            holder = type("Model", (), {"generation_config": gen_cfg})()
            cached = type(self)._eos_cache = eos_token_set(holder, self.tokenizer.eos_token_id)
        return cached


def _check_verl_settings(verl_config, cfg) -> None:
    """One-line errors for verl settings that would silently break the tree's rows."""
    rollout = verl_config.actor_rollout_ref.rollout
    if not verl_config.trainer.get("use_v1", True):
        raise ValueError("the at2po_tree agent loop returns one row per leaf, which only verl's v1 trainer takes: "
                         "set trainer.use_v1=true trainer.v1.trainer_mode=at2po")
    mode = verl_config.trainer.get("v1", {}).get("trainer_mode")
    if mode != "at2po":
        raise ValueError(f"trainer.v1.trainer_mode={mode!r}: the at2po_tree agent loop needs trainer.v1.trainer_mode=at2po "
                         "(the stock trainers give every leaf the last leaf's reward and no tree fields)")
    if int(rollout.n) != 1:
        raise ValueError(f"actor_rollout_ref.rollout.n={rollout.n}: one at2po_tree run already returns N leaves "
                         "(rollout.samples_per_tree of the at2po config); set actor_rollout_ref.rollout.n=1")
    if cfg.rollout.max_response_tokens > int(rollout.response_length):
        raise ValueError(f"rollout.max_response_tokens={cfg.rollout.max_response_tokens} of the at2po config exceeds "
                         f"actor_rollout_ref.rollout.response_length={rollout.response_length}: verl would cut the "
                         "trees' rows; raise response_length or lower max_response_tokens")
    if not rollout.get("calculate_log_probs", False):
        raise ValueError("the at2po_tree agent loop needs the sampler's log-probs (turn entropy, rollout log-probs): "
                         "set actor_rollout_ref.rollout.calculate_log_probs=true")


def tree_outputs(result, seconds: float = 0.0, weight_steps: tuple = (None, None)) -> list[AgentLoopOutput]:
    """One ``AgentLoopOutput`` per row of a one-tree rollout, with the tree fields; ``weight_steps``
    are the (oldest, newest) weight versions that served the tree's requests."""
    tree = result.trees[0]
    stats = result.stats[0]
    outputs = []
    for row in result.rows:
        seq = row.sequence
        reward = float(row.score.reward)
        path = [int(n) for n in seq.path]
        extra = {
            NODE_PATH: path,
            NODE_ENTROPY: [0.0] + [float(tree.nodes[n].entropy) for n in path[1:]],
            LEAF_REWARD: reward,
            "at2po_duplicate": bool(row.duplicate),
            "reward_extra_info": {k: float(v) for k, v in row.score.metrics.items()},
            # the tree's sampled tokens, pruned branches included (the same on each of its rows)
            "at2po_tree_generated_tokens": int(stats.generated_tokens),
            "min_global_steps": weight_steps[0],
            "max_global_steps": weight_steps[1],
        }
        turns = len(path) - 1
        outputs.append(AgentLoopOutput(
            prompt_ids=list(tree.prompt_ids),
            response_ids=[int(i) for i in seq.response_ids],
            response_mask=[int(m) for m in seq.loss_mask],
            response_logprobs=[float(x) for x in seq.old_log_probs],
            reward_score=reward,
            num_turns=2 * turns,  # user + assistant turns + tool replies, as verl counts them
            metrics=AgentLoopMetrics(generate_sequences=seconds, tool_calls=float(stats.tool_calls)),
            extra_fields=extra,
        ))
    return outputs
