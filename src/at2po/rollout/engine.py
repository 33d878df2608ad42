"""Tree rollout engine (docs/method.md §1–2): grows one turn tree per prompt with a generator and tools.

A tree goes through phases: M initial chains from its root, then L expansion rounds where K
selected turns get a new sibling that re-samples the turn from exactly its state and continues
to a leaf. Every generation call batches the next turn of every unfinished trajectory of every
tree, whatever phase its tree is in, and the tool calls of a turn run concurrently. With the
default "async" schedule a tree expands as soon as its own phase is over instead of waiting for
the slowest trajectory of the batch (the authors' barrier, kept as schedule "sync"). Schedule
"stream" (backends that stream requests, e.g. vllm) drops the batches: each turn goes to the
running engine on its own, its tool call starts as soon as it finishes and the next turn as soon
as the tool returns, while the other requests keep decoding (docs/method.md §6.8).
A chain rollout (GRPO/GSPO baselines) is L = 0; validation is greedy with M = 1.

The engine knows a task only through ``at2po.tasks.Task.score`` and tools only through their
self-description (``AgentProtocol``): it runs any task with any registered tools.
"""

from __future__ import annotations

import inspect
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from at2po.agent import (
    ATPO_TOOL_LIMIT_NOTICE,
    EMPTY_OBSERVATION,
    TOOL_LIMIT_NOTICE,
    AgentProtocol,
    atpo_tool_input,
    decode_ids,
    encode_observation,
    format_error_observation,
    format_observation,
    render_messages,
    render_prompt,
)
from at2po.algorithms.expansion import select_from_tree
from at2po.algorithms.tree import ACTIVE, FAILED, LEAF, LeafSequence, TurnTree
from at2po.config import PROMPT_LAYOUTS, RolloutConfig
from at2po.rollout.generator import (
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    Generator,
    SamplingParams,
    StreamingGenerator,
    stop_in_turn,
)
from at2po.tasks.base import Sample, Score, Task
from at2po.tools.base import Tool, ToolCallPool, ToolResult, run_tool_calls


@dataclass
class Prompt:
    """A sample to roll out: its rendered prompt ids and the sample the task scores against."""

    prompt_ids: list[int]
    sample: Sample


@dataclass
class LeafRow:
    """One training row: a leaf's trajectory with its score."""

    tree: int
    sequence: LeafSequence
    score: Score
    duplicate: bool = False  # a copy that tops a tree up to N leaves


@dataclass
class TreeStats:
    generated_tokens: int = 0  # sampled by the policy (all turns, including pruned branches)
    prefill_tokens: int = 0  # context tokens sent with each generation request
    tool_calls: int = 0
    tool_failures: int = 0
    tool_infra_failures: int = 0  # failures of a tool's service (at2po.tools.base.ToolResult.infra)
    limit_notices: int = 0
    depth: int = 0  # turns of the longest trajectory
    leaves: int = 0  # finished trajectories before trimming to N
    nodes: int = 0
    phase_end_seconds: list[float] = field(default_factory=list)  # since rollout start, one per phase


@dataclass
class RolloutResult:
    trees: list[TurnTree]
    rows: list[LeafRow]
    stats: list[TreeStats]
    phase_seconds: dict[str, float]
    generation_calls: int = 0

    def credit_arrays(self, tree: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(parent, entropy, leaf_reward) of one tree for ``at2po.algorithms.credit.turn_credit``."""
        return self.trees[tree].to_arrays()

    def totals(self) -> dict[str, float]:
        keys = ("generated_tokens", "prefill_tokens", "tool_calls", "tool_failures", "tool_infra_failures",
                "limit_notices", "leaves")
        out = {k: float(sum(getattr(s, k) for s in self.stats)) for k in keys}
        out["depth_max"] = float(max((s.depth for s in self.stats), default=0))
        out["rows"] = float(len(self.rows))
        return out


@dataclass
class _Open:
    """A trajectory waiting for its next generation call: where the turn hangs, what it starts
    with, and (``node`` >= 0) the unfinished turn it continues."""

    tree: int
    parent: int  # node the new turn hangs under
    obs_ids: list[int]  # observation shown before the new turn
    tool_calls: int  # tool calls made on the path so far
    turns: int  # turns on the path so far (the continued turn included)
    node: int = -1  # the turn being continued after a call stopped on its chunk size
    # Where the batched schedules put this request: (phase, request number j of the trajectory,
    # then, newest first, 1 for each earlier request whose result waited on a tool (0 if not),
    # then the slot in the phase). Batched calls create a tree's nodes in exactly this order (a
    # call keeps its trajectories' order and puts those back from a tool after the others), so
    # sorting by it gives every schedule the same node numbering; it also names the request.
    order: tuple[int, ...] = (0, 0, 0)

    def then(self, group: int) -> tuple[int, ...]:
        """The order of this trajectory's next request (group 1: it came back from a tool)."""
        return (self.order[0], self.order[1] + 1, group, *self.order[2:])


@dataclass
class _Call:
    """A tool call waiting for its result: the trajectory and the turn that made it."""

    open: _Open
    node: int
    turns: int
    tool: Tool
    query: str


class TreeRolloutEngine:
    """Grows turn trees with a :class:`Generator`, the enabled tools and a task's reward."""

    def __init__(
        self,
        generator: Generator,
        tokenizer: Any,
        tools: Sequence[Tool],
        task: Task,
        config: RolloutConfig | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        system_prompt: str | None = None,
        prompt_layout: str = "chat",
        atpo_backspace_quirk: bool = True,
    ):
        self.generator = generator
        self.tokenizer = tokenizer
        self.protocol = AgentProtocol(tools)
        self.tools: dict[str, Tool] = dict(self.protocol.tools)  # type: ignore[arg-type]
        self.task = task
        self.system_prompt = system_prompt if system_prompt is not None else task.system_prompt(list(tools))
        if prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"data.prompt_layout={prompt_layout!r} is not one of {', '.join(PROMPT_LAYOUTS)}")
        if prompt_layout == "atpo":
            task.check_atpo_layout()
        self.prompt_layout, self.atpo_backspace_quirk = prompt_layout, atpo_backspace_quirk
        self._given_system_prompt = system_prompt
        self.config = config or RolloutConfig()
        self.rng = np.random.default_rng(self.config.seed)
        self._check_schedule(self.config)
        self.progress = progress
        self._limit_notice_ids = encode_observation(tokenizer, TOOL_LIMIT_NOTICE)
        self._atpo_notice_ids = encode_observation(tokenizer, ATPO_TOOL_LIMIT_NOTICE)

    # -- public -------------------------------------------------------------------------------
    def prompt(self, sample: Sample) -> Prompt:
        """A sample's prompt: the system prompt and the task's user message, chat-rendered
        (``data.prompt_layout=chat``), or the ATPO authors' single system message (``atpo``)."""
        if self.prompt_layout == "atpo":
            messages = self.task.atpo_messages(sample, self._given_system_prompt,
                                               backspace_quirk=self.atpo_backspace_quirk)
            return Prompt(render_messages(self.tokenizer, messages), sample)
        return Prompt(render_prompt(self.tokenizer, self.task.user_message(sample), self.system_prompt), sample)

    def rollout(self, prompts: Sequence[Prompt], *, greedy: bool = False, config: RolloutConfig | None = None) -> RolloutResult:
        cfg = config or self.config
        self._check_schedule(cfg)
        params = SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.chunk_tokens,
            stop=AgentProtocol(self.tools.values(), stop_at_answer=cfg.stop_at_answer).stop_strings, greedy=greedy,
        )
        self._stops = params.stop
        # Backends that take ``continues`` look for a stop string split between two calls of a
        # turn themselves; for the others the engine cuts their output (``_take_generation``).
        # Read per rollout: a caller may swap the generator.
        gen = self.generator
        self._sees_turn = {"batched": _takes(getattr(gen, "generate", None), "continues"),
                           "stream": _takes(getattr(gen, "submit", None), "continues")}
        trees = [TurnTree(p.prompt_ids, meta={"id": p.sample.id}) for p in prompts]
        stats = [TreeStats() for _ in prompts]
        self._calls = 0
        self._seconds = {"generate": 0.0, "tools": 0.0}
        self._new_nodes: list[dict[int, tuple[int, ...]]] = [{} for _ in trees]  # node -> order, this phase
        start = time.perf_counter()
        if cfg.schedule == "stream":
            self._run_stream(trees, stats, params, cfg, start)
        else:
            self._run_batched(trees, stats, params, cfg, start)
        end = time.perf_counter() - start
        for t, st in enumerate(stats):
            self._phase_over(trees[t], t)
            st.phase_end_seconds.append(end)

        t0 = time.perf_counter()
        rows = self._collect(trees, stats, prompts, cfg)
        phase_seconds = {"rollout": end, **self._seconds, "reward": time.perf_counter() - t0}
        return RolloutResult(trees, rows, stats, phase_seconds, self._calls)

    def validate(self, prompts: Sequence[Prompt]) -> RolloutResult:
        """Greedy, one chain per prompt (docs/method.md §5 evaluation)."""
        cfg = self.config
        val = RolloutConfig(**{**cfg.__dict__, "n_initial": 1, "expansion_rounds": 0, "samples_per_tree": 1})
        return self.rollout(prompts, greedy=True, config=val)

    def _check_schedule(self, cfg: RolloutConfig) -> None:
        if cfg.schedule == "stream" and not isinstance(self.generator, StreamingGenerator):
            raise ValueError(f"rollout.schedule=stream needs a backend that streams requests (rollout.backend=vllm); "
                             f"{type(self.generator).__name__} does not: set rollout.schedule=async")

    # -- schedules ----------------------------------------------------------------------------
    def _run_batched(self, trees, stats, params, cfg, start) -> None:
        """Schedules "async" and "sync": every generation call batches the next chunk of every
        open trajectory, then the turns that ended in a tool call run their calls together."""
        phase = [0] * len(trees)  # 0 = initial chains, r = expansion round r
        opened = [_Open(t, 0, [], 0, 0, order=(0, 0, i)) for t in range(len(trees)) for i in range(cfg.n_initial)]
        while True:
            # A tree whose current phase is over starts its next one right away (schedule
            # "async"), or only once every tree is done with the phase (schedule "sync", the
            # authors' barrier). Either way a tree's selection sees exactly its finished phase.
            busy = {o.tree for o in opened}
            ready = [t for t in range(len(trees)) if t not in busy and phase[t] < cfg.expansion_rounds]
            if cfg.schedule == "sync" and busy:
                ready = []
            for t in ready:
                self._phase_over(trees[t], t)
                stats[t].phase_end_seconds.append(time.perf_counter() - start)
                phase[t] += 1
                opened += self._expand(trees[t], t, cfg, self.rng, phase[t])
            if not opened:
                if any(p < cfg.expansion_rounds for p in phase):
                    continue  # trees whose selection found no candidate move on to their next round
                break
            if self.progress is not None:
                self.progress(f"phase {min(phase)}-{max(phase)}", self._calls + 1, len(opened))
            opened = self._advance(trees, stats, opened, params, cfg)

    def _run_stream(self, trees, stats, params, cfg, start) -> None:
        """Schedule "stream": each request goes to the engine on its own. A turn's result is
        handled as soon as the engine returns it: its tool call starts at once (in the
        background) and the trajectory's next turn is submitted when the tool returns, while the
        other requests keep decoding; a tree's expansions are submitted the moment its phase is
        over. The engine is stepped while it has work; when it has none, the loop waits for the
        first tool call to finish.

        Nothing random depends on that timing: each request's sampling seed comes from one draw
        of the generator's RNG per rollout and the request's place in its tree (``_Open.order``),
        each tree draws its random expansions from its own RNG, and pruning happens after the
        rollout, tree by tree, as in the other schedules."""
        gen = self.generator
        base = gen.draw_seed()
        rngs = [np.random.default_rng([base, 0, t]) for t in range(len(trees))]
        pool = ToolCallPool(cfg.tool_workers, cfg.tool_timeout)
        phase = [0] * len(trees)
        in_flight = [0] * len(trees)  # trajectories generating or waiting for a tool, per tree
        requests: dict[int, tuple[_Open, list[int], int]] = {}
        keys = itertools.count()

        def submit(o: _Open) -> None:
            request = self._request(trees, o, cfg)
            if request is None:
                in_flight[o.tree] -= 1
                return
            key = next(keys)
            requests[key] = (o, *request)
            seed = int(np.random.SeedSequence([base, 1, o.tree, *o.order]).generate_state(1, np.uint64)[0]) >> 2
            turn = {"continues": self._continues(trees, o)} if self._sees_turn["stream"] else {}
            gen.submit(key, request[0], params, min(cfg.chunk_tokens, request[1]), seed=seed, **turn)

        def start_phase(t: int, opens: list[_Open]) -> None:
            in_flight[t] += len(opens)
            for o in opens:
                submit(o)

        def run() -> None:
            for t in range(len(trees)):
                start_phase(t, [_Open(t, 0, [], 0, 0, order=(0, 0, i)) for i in range(cfg.n_initial)])
            finished = [False] * len(trees)
            while True:
                for t in range(len(trees)):
                    while not finished[t] and in_flight[t] == 0:  # the tree's phase is over
                        if phase[t] == cfg.expansion_rounds:
                            finished[t] = True
                            break
                        self._phase_over(trees[t], t)
                        stats[t].phase_end_seconds.append(time.perf_counter() - start)
                        phase[t] += 1
                        start_phase(t, self._expand(trees[t], t, cfg, rngs[t], phase[t]))
                results: list[tuple[_Call, ToolResult]] = []
                if gen.unfinished():
                    t0 = time.perf_counter()
                    done = gen.step()
                    self._seconds["generate"] += time.perf_counter() - t0
                    self._calls += 1
                    for key, g in done:
                        o, ctx, budget = requests.pop(key)
                        nxt, call = self._take_generation(trees, stats, o, ctx, g, budget, cfg, "stream")
                        if nxt is not None:
                            submit(nxt)
                        elif call is not None:
                            pool.submit(call, call.tool, call.query)
                        else:
                            in_flight[o.tree] -= 1
                    if done and self.progress is not None:
                        self.progress(f"phase {min(phase)}-{max(phase)}", self._calls, gen.unfinished() + pool.pending)
                    if pool.pending:
                        results = pool.wait(0)
                elif pool.pending:
                    t0 = time.perf_counter()
                    results = pool.wait()
                    self._seconds["tools"] += time.perf_counter() - t0
                else:
                    break  # nothing generating, no tool running, every tree past its last phase
                for call, res in results:
                    nxt = self._take_tool_result(trees, stats, call, res, cfg)
                    if nxt is not None:
                        submit(nxt)
                    else:
                        in_flight[call.open.tree] -= 1

        try:
            run()
        except BaseException:
            gen.abort()  # an interrupted rollout (e.g. Ctrl-C): no stale result may reach the next one
            raise

    # -- phases -------------------------------------------------------------------------------
    def _expand(self, tree: TurnTree, t: int, cfg: RolloutConfig, rng: np.random.Generator, phase: int) -> list[_Open]:
        """Siblings of the K selected turns (docs/method.md §2): each starts from exactly the turn's state."""
        opened = []
        for slot, n in enumerate(select_from_tree(tree, cfg.top_k, alpha=cfg.alpha, mode=cfg.expansion_mode, rng=rng,
                                                  include_root=cfg.root_fallback)):
            if n == 0:  # the root's "sibling" (the authors' fallback): a fresh chain
                opened.append(_Open(t, 0, [], 0, 0, order=(phase, 0, slot)))
                continue
            node = tree.nodes[n]
            # Same parent, same observation, same tool-call count (not the authors' count − 1).
            opened.append(_Open(t, node.parent, list(node.obs_ids), node.tool_calls_at_start, tree.depth(n) - 1,
                                order=(phase, 0, slot)))
        return opened

    def _phase_over(self, tree: TurnTree, t: int) -> None:
        """Number the nodes the tree's finished phase added by their request order (see
        ``_Open.order``), whatever order they were created in: node numbers decide ties in the
        expansion selection and which leaves pruning draws, and must not depend on timing."""
        new = self._new_nodes[t]
        if new:
            first = min(new)
            tree.nodes[first:] = sorted(tree.nodes[first:], key=lambda n: new[n.index])
            renumber = {n.index: i for i, n in enumerate(tree.nodes)}
            for n in tree.nodes:
                n.index = renumber[n.index]
                n.parent = renumber[n.parent] if n.parent >= 0 else -1
                n.children = sorted(renumber[c] for c in n.children)
            new.clear()

    def _request(self, trees, o: _Open, cfg) -> tuple[list[int], int] | None:
        """The context of an open trajectory's next request and its response budget (>= 1), or
        None when the trajectory cannot take a turn."""
        tree = trees[o.tree]
        ctx = tree.full_ids(o.node) if o.node >= 0 else tree.full_ids(o.parent) + o.obs_ids
        budget = cfg.max_response_tokens - (len(ctx) - len(tree.prompt_ids))
        # A trajectory whose observation already used up the response budget cannot take a turn:
        # it ends on its previous node, which becomes a failed leaf. (A re-sampled sibling starts
        # from a state that once had budget, so only continuing chains get here.)
        if budget < 1 and o.node < 0 and o.parent > 0 and not tree.nodes[o.parent].children:
            if cfg.env_compat == "atpo":  # the authors: the observation's own node is the leaf
                node = tree.add_turn(o.parent, obs_ids=o.obs_ids, gen_ids=[], gen_logprobs=[],
                                     tool_calls_at_start=o.tool_calls, status=LEAF,
                                     info={"end": "response budget exhausted by the observation"})
                self._new_nodes[o.tree][node] = o.order
                return None
            node = tree.nodes[o.parent]
            node.status = FAILED
            node.info["end"] = "response budget exhausted by the observation"
            return None
        return ctx, max(budget, 1)

    def _advance(self, trees, stats, opened: list[_Open], params, cfg) -> list[_Open]:
        """Generate the next chunk of every open trajectory's turn, run the tool calls of the turns
        that ended in one, and return what stays open."""
        live = [(o, *r) for o in opened if (r := self._request(trees, o, cfg)) is not None]
        if not live:
            return []
        t0 = time.perf_counter()
        turn = {"continues": [self._continues(trees, o) for o, _, _ in live]} if self._sees_turn["batched"] else {}
        gens = self.generator.generate([ctx for _, ctx, _ in live], params,
                                       max_new_tokens=[min(cfg.chunk_tokens, b) for _, _, b in live], **turn)
        self._seconds["generate"] += time.perf_counter() - t0
        self._calls += 1

        next_open: list[_Open] = []
        calls: list[_Call] = []
        for (o, ctx, budget), gen in zip(live, gens):
            nxt, call = self._take_generation(trees, stats, o, ctx, gen, budget, cfg, "batched")
            if nxt is not None:
                next_open.append(nxt)
            if call is not None:
                calls.append(call)
        if calls:
            t0 = time.perf_counter()
            results = run_tool_calls([(c.tool, c.query) for c in calls], max_workers=cfg.tool_workers,
                                     timeout=cfg.tool_timeout)
            self._seconds["tools"] += time.perf_counter() - t0
            taken = [self._take_tool_result(trees, stats, c, res, cfg) for c, res in zip(calls, results)]
            next_open += [o for o in taken if o is not None]
        return next_open

    def _continues(self, trees, o: _Open) -> int:
        """How many of the context's last tokens a continued turn generated since the
        environment last wrote (0 for a new turn): where a split stop string can begin."""
        if o.node < 0:
            return 0
        mask = trees[o.tree].nodes[o.node].gen_mask
        return next((k for k, m in enumerate(reversed(mask)) if not m), len(mask))

    def _take_generation(self, trees, stats, o: _Open, ctx: list[int], gen: Generation, budget: int,
                         cfg, schedule: str) -> tuple[_Open | None, _Call | None]:
        """Add one generation to its tree and decide what follows: the same turn's next chunk, a
        next turn that needs no tool (limit notice, malformed call), a tool call, or nothing
        (the trajectory ended). Returns (next open trajectory, tool call); at most one is set."""
        tree, st = trees[o.tree], stats[o.tree]
        if o.node >= 0 and not self._sees_turn[schedule]:
            # A stop string that the turn's previous call began and this one completed ends the
            # turn here; the backend could not see it (its stop check reads one call's text).
            gen = stop_in_turn(self.tokenizer, self._stops, ctx[len(ctx) - self._continues(trees, o):], gen)
        st.generated_tokens += len(gen.token_ids)
        st.prefill_tokens += len(ctx)
        if o.node >= 0:
            node, turns = o.node, o.turns
            tree.extend_turn(node, gen.token_ids, gen.logprobs)
        else:
            node, turns = tree.add_turn(o.parent, obs_ids=o.obs_ids, gen_ids=gen.token_ids, gen_logprobs=gen.logprobs,
                                        tool_calls_at_start=o.tool_calls), o.turns + 1
            self._new_nodes[o.tree][node] = o.order
        st.depth = max(st.depth, turns)
        if gen.finish_reason == FINISH_LENGTH and 0 < len(gen.token_ids) < budget:
            # The call stopped on its chunk size, not on the response budget: the same turn
            # goes on in the next call (the authors have no per-turn cap). An empty one (the
            # context already fills the backend's model length) cannot go on: the turn ends.
            return _Open(o.tree, o.parent, o.obs_ids, o.tool_calls, turns, node=node, order=o.then(0)), None
        # The whole turn decides; a turn that stopped on a tool's closing tag is that tool call.
        text = decode_ids(self.tokenizer, tree.nodes[node].gen_ids)
        stop = gen.stop_string if gen.finish_reason == FINISH_STOP else None
        action = self.protocol.parse(text, stop=stop)
        atpo = cfg.env_compat == "atpo"
        if atpo:
            # The authors: a call that stopped on a tool's closing tag is that tool's call,
            # whatever the turn holds; its input is found below, in the whole context.
            called = stop[2:-1] if stop and stop[2:-1] in self.tools and stop == f"</{stop[2:-1]}>" else None
        else:
            called = action.kind if gen.finish_reason == FINISH_STOP and action.kind in self.tools else None
        info = {"finish": gen.finish_reason, "action": called or action.kind}
        if called is None:
            status = LEAF
            info["end"] = action.kind if action.kind == "answer" else gen.finish_reason
        elif turns >= cfg.max_turns:
            status = FAILED
            info["end"] = f"turn limit ({cfg.max_turns}) reached"
        else:
            status = ACTIVE
        tree.nodes[node].status = status
        tree.nodes[node].info.update(info)
        if status != ACTIVE:
            return None, None
        if o.tool_calls >= cfg.max_tool_calls:
            st.limit_notices += 1
            if atpo:
                return self._atpo_limit_notice(tree, node, o, turns, cfg), None
            return _Open(o.tree, node, list(self._limit_notice_ids), o.tool_calls, turns, order=o.then(0)), None
        st.tool_calls += 1
        if atpo:
            query = atpo_tool_input(decode_ids(self.tokenizer, tree.full_ids(node), keep_eos=True), called)
            if not query:  # the authors append an EOS, trained, and the trajectory ends
                st.tool_failures += 1
                self._atpo_end(tree, node, "empty tool call: EOS appended", eos=True)
                return None, None
            return None, _Call(o, node, turns, self.tools[called], query)
        if action.error is not None:
            st.tool_failures += 1
            obs = encode_observation(self.tokenizer, format_error_observation(action.error))
            return _Open(o.tree, node, obs, o.tool_calls + 1, turns, order=o.then(0)), None
        return None, _Call(o, node, turns, self.tools[called], action.query)

    def _atpo_limit_notice(self, tree: TurnTree, node: int, o: _Open, turns: int, cfg) -> _Open | None:
        """``env_compat=atpo``: a call beyond the limit gets the authors' plain notice inside the
        same turn (masked), and the turn goes on in the same node unless the response budget is
        spent."""
        ids = self._atpo_notice_ids
        tree.extend_turn(node, ids, [0.0] * len(ids), [0] * len(ids))
        n = tree.nodes[node]
        n.info["limit_notices"] = n.info.get("limit_notices", 0) + 1
        if len(tree.full_ids(node)) - len(tree.prompt_ids) >= cfg.max_response_tokens:
            self._atpo_end(tree, node, "response budget exhausted by the limit notice")
            return None
        return _Open(o.tree, o.parent, o.obs_ids, o.tool_calls, turns, node=node, order=o.then(0))

    def _atpo_end(self, tree: TurnTree, node: int, why: str, eos: bool = False) -> None:
        """``env_compat=atpo``: the trajectory ends on this turn, which becomes a leaf; ``eos``
        appends the tokenizer's EOS first, trained (mask 1) like the authors' though the sampler
        never drew it, so its log-prob is NaN (left out of the turn's entropy; the trainer
        recomputes it)."""
        if eos:
            tree.extend_turn(node, [int(self.tokenizer.eos_token_id)], [float("nan")], [1])
        tree.nodes[node].status = LEAF
        tree.nodes[node].info["end"] = why

    def _take_tool_result(self, trees, stats, call: _Call, res: ToolResult, cfg) -> _Open | None:
        """The trajectory's next turn, after its tool call returned (or failed); None when the
        failure ends the trajectory (``env_compat=atpo``)."""
        o = call.open
        if not res.ok:
            stats[o.tree].tool_failures += 1
            stats[o.tree].tool_infra_failures += int(res.infra)
        trees[o.tree].nodes[call.node].info["tool_ok"] = res.ok
        if cfg.env_compat == "atpo":
            if not res.ok:  # the authors: a failed call ends the trajectory (no EOS appended)
                self._atpo_end(trees[o.tree], call.node, f"tool failed: {res.error or res.text}")
                return None
            # Encoded as the authors do: the whole text at once, the tokenizer's defaults.
            obs = [int(i) for i in self.tokenizer.encode(format_observation(res.text, defuse=False))]
        else:
            obs = encode_observation(self.tokenizer, format_observation(res.text))
        return _Open(o.tree, call.node, obs, o.tool_calls + 1, call.turns, order=o.then(1))

    # -- leaves -> rows -----------------------------------------------------------------------
    def _collect(self, trees, stats, prompts, cfg) -> list[LeafRow]:
        rows: list[LeafRow] = []
        for t, (tree, prompt) in enumerate(zip(trees, prompts)):
            st = stats[t]
            st.leaves = len(tree.leaves())
            st.nodes = len(tree) - 1
            leaves = tree.leaves()
            n = cfg.samples_per_tree
            if n and len(leaves) > n:
                # The authors prune extra leaves at random (docs/method.md §2); the pruned branches leave the tree.
                keep = sorted(self.rng.choice(leaves, size=n, replace=False).tolist())
                tree.prune_leaves(keep)
                leaves = tree.leaves()
            tree_rows = []
            for leaf in leaves:
                seq = tree.leaf_sequence(leaf)
                score = self.task.score(self._scored_text(tree, seq), prompt.sample, self.protocol)
                tree.nodes[leaf].reward = score.reward
                tree_rows.append(LeafRow(t, seq, score))
            if n and tree_rows and len(tree_rows) < n:
                # Short trees repeat their last leaf so every tree yields N rows (docs/method.md §2).
                # The copy is a training row only: credit still sees each trajectory once.
                last = tree_rows[-1]
                tree_rows += [LeafRow(t, last.sequence, last.score, duplicate=True) for _ in range(n - len(tree_rows))]
            rows += tree_rows
        return rows

    def _scored_text(self, tree: TurnTree, seq: LeafSequence) -> str:
        """The response as the task's reward reads it: the policy's own tokens, each observation
        reduced to an empty ``<result>`` block where it stood and the masked text the environment
        wrote inside a turn (the ATPO limit notice) left out, so that a passage quoting
        ``<answer> \\boxed{...} </answer>`` is neither the answer nor a format error
        (docs/method.md §1). A task with ``score_observations`` reads the whole decoded response,
        observation contents included, as the ATPO authors' and Search-R1's scorers do."""
        if self.task.score_observations:
            return decode_ids(self.tokenizer, seq.response_ids)
        pieces: list[str] = []
        for i in seq.path[1:]:
            node = tree.nodes[i]
            if node.obs_ids:  # every observation, error or limit notice is one <result> block
                pieces.append(EMPTY_OBSERVATION)
            for policy, run in itertools.groupby(zip(node.gen_ids, node.gen_mask), key=lambda t: t[1]):
                if policy:
                    pieces.append(decode_ids(self.tokenizer, [t for t, _ in run]))
        return "".join(pieces)


def _takes(method: Any, name: str) -> bool:
    """Whether ``method`` (None: no such method) has a parameter ``name``."""
    try:
        return method is not None and name in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
