"""Token-in-token-out generation backends for the rollout engine.

The rollout engine hands a batch of token-id contexts to a :class:`Generator` and gets back, per
context, the sampled ids, the log-prob of each sampled token and why generation ended. Nothing
is re-tokenised: the ids are exactly what was sampled, and the log-probs are what a trainer's
fresh forward pass over ``context + token_ids`` computes (the "old" log-probs of the ratio).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

FINISH_STOP = "stop"  # a stop string appeared in the generated text
FINISH_EOS = "eos"  # an EOS token was sampled (it is included in token_ids)
FINISH_LENGTH = "length"  # the per-context max_new_tokens was reached


@dataclass
class Generation:
    """One context's continuation. ``logprobs[i]`` is the log-prob of ``token_ids[i]``."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # FINISH_STOP, FINISH_EOS or FINISH_LENGTH
    stop_string: str | None = None  # the stop string that ended generation (finish_reason "stop")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample.

    ``greedy`` takes the argmax and ignores ``temperature``/``top_p``; its log-probs are then at
    temperature 1. Otherwise tokens are drawn from softmax(logits / temperature) restricted to
    the top-p nucleus, while the reported log-prob is log_softmax(logits / temperature) at the
    sampled token WITHOUT top-p renormalisation (what the trainer recomputes).
    ``stop``: generation ends once any of these strings appears in the generated text; the token
    that completed it is kept (and may carry text past the stop string).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 unless greedy, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            raise ValueError("stop must be a sequence of strings, not a single string")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@runtime_checkable
class Generator(Protocol):
    """A batched, token-in-token-out sampler.

    ``generate(contexts, params, max_new_tokens, continues)`` continues every context (a non-empty
    list of token ids) and returns one :class:`Generation` per context, in order. ``max_new_tokens``,
    when given, holds one limit per context (e.g. the remaining response budget) that replaces
    ``params.max_new_tokens`` for that context; a limit of 0 yields an empty "length" generation.
    ``continues``, when given, says per context how many of its last tokens the same turn
    generated in earlier calls (0 for a new turn): the stop check must read them together with the
    new tokens, so that a stop string split between two calls ends the call at the token that
    completes it (``stop_in_turn`` does it after the fact). A backend whose ``generate`` has no
    ``continues`` parameter still works: the rollout engine then cuts its output itself.

    Backends must report the log-prob of every sampled token as defined in
    :class:`SamplingParams`. A vLLM backend maps onto this without touching callers:
    ``vllm.SamplingParams(temperature=p.temperature, top_p=p.top_p, max_tokens=limit,
    stop=list(p.stop), include_stop_str_in_output=True, logprobs=0, skip_special_tokens=False)``
    (``temperature=0`` when greedy), one request per context passed as token ids
    (``TokensPrompt(prompt_token_ids=ctx)``) so that per-context limits work; ``logprobs=0``
    returns the sampled token's log-prob, which must be taken from the temperature-scaled,
    un-truncated distribution (vLLM's ``logprobs_mode="processed_logprobs"`` with top-p off, or
    recomputed) to match this contract. vLLM's ``finish_reason`` "stop" covers both EOS and stop
    strings: it is "eos" when ``stop_reason`` is None (an EOS id), else "stop" with
    ``stop_string = stop_reason``. vLLM keeps the token ids it sampled even when it trims stop
    text, so ``token_ids`` stay token-in-token-out.

    A trainer also needs, from any backend: ``load_weights(model)`` after each optimizer step
    (sample from ``model``'s current parameters from then on: a no-op for a backend that runs
    the training module itself, a copy into the inference engine for one that does not), and
    ``get_rng_state``/``set_rng_state`` so that a resumed run samples what the uninterrupted run
    would have. Optionally ``sleep()``: the trainer calls it after each rollout, before the
    update, so that an engine sharing the GPU can free its memory (the vllm backend's sleep mode);
    the engine wakes itself on the next ``load_weights`` or ``generate``.
    """

    eos_token_id: int

    def generate(
        self,
        contexts: list[list[int]],
        params: SamplingParams,
        max_new_tokens: list[int] | None = None,
        continues: list[int] | None = None,
    ) -> list[Generation]: ...

    def load_weights(self, model: torch.nn.Module) -> None: ...

    def get_rng_state(self) -> object: ...

    def set_rng_state(self, state: object) -> None: ...


@runtime_checkable
class StreamingGenerator(Protocol):
    """What a backend adds to :class:`Generator` to serve ``rollout.schedule=stream``: requests
    go to a running engine one at a time and come back as they finish, so the rollout engine can
    submit a trajectory's next turn while other requests are still decoding.

    ``submit(key, context, params, max_new_tokens, seed, continues)`` queues one request (``key``
    is the caller's, returned with the result; ``seed`` makes its sampling independent of what else
    runs; ``continues`` as in ``generate``). ``step()`` advances the engine by one batch and
    returns the ``(key, Generation)`` pairs that finished, with the same post-processing as ``generate``. ``unfinished()`` counts the
    requests submitted and not yet returned; ``abort()`` drops them (an interrupted rollout).
    ``draw_seed()`` takes one seed from the generator's RNG (whose state ``get_rng_state``
    saves), from which a rollout derives its requests' seeds. The ``hf`` backend does not stream.
    """

    def abort(self) -> None: ...

    def draw_seed(self) -> int: ...

    def submit(self, key: Any, context: list[int], params: SamplingParams, max_new_tokens: int,
               seed: int | None = None, continues: int = 0) -> None: ...

    def step(self) -> list[tuple[Any, Generation]]: ...

    def unfinished(self) -> int: ...


# -- backends by name (``rollout.backend``) ------------------------------------------------------------
GeneratorBuilder = Callable[..., Generator]
GENERATOR_BACKENDS: dict[str, GeneratorBuilder] = {}
# What a backend needs beyond the core install, checked without building it: a callable that
# raises a one-line ValueError saying what to install.
BACKEND_REQUIREMENTS: dict[str, Callable[[], Any]] = {}


def register_backend(name: str, requires: Callable[[], Any] | None = None) -> Callable[[GeneratorBuilder], GeneratorBuilder]:
    """Decorator: register ``builder(model, tokenizer, *, seed) -> Generator`` as ``rollout.backend=name``;
    ``requires()`` raises when what the backend needs is not installed (``check_backend``)."""

    def decorate(builder: GeneratorBuilder) -> GeneratorBuilder:
        GENERATOR_BACKENDS[name] = builder
        if requires is not None:
            BACKEND_REQUIREMENTS[name] = requires
        return builder

    return decorate


def check_backend(name: str) -> None:
    """Raise the error ``build_generator`` would give for backend ``name`` (unknown, or what it
    needs is not installed) without building it: a command that builds its generator late (the
    quickstart, after its warm start) calls this first."""
    if name not in GENERATOR_BACKENDS:
        import at2po.rollout.vllm_backend  # noqa: F401  registers "vllm"; vllm itself is imported when built
    if name not in GENERATOR_BACKENDS:
        raise ValueError(f"rollout.backend={name!r} is not one of {', '.join(sorted(GENERATOR_BACKENDS))}")
    if name in BACKEND_REQUIREMENTS:
        BACKEND_REQUIREMENTS[name]()


def build_generator(name: str, model: torch.nn.Module, tokenizer, *, seed: int = 0, config=None) -> Generator:
    """The generator of backend ``name`` for ``model`` (the policy being trained) and ``tokenizer``.

    ``config`` (the run's :class:`at2po.config.Config`) reaches the builders that take a
    ``config`` keyword (e.g. vllm reads ``rollout.vllm``); the others are called without it.
    """
    check_backend(name)
    builder = GENERATOR_BACKENDS[name]
    if config is not None and "config" in inspect.signature(builder).parameters:
        return builder(model, tokenizer, seed=seed, config=config)
    return builder(model, tokenizer, seed=seed)


class _StopChecker:
    """Finds stop strings in a growing token sequence by decoding only its tail.

    A stop string of B UTF-8 bytes spans at most B tokens (every token decodes to >= 1 byte), and
    the sequence is checked after every token, so a new occurrence always lies in the last B + 1
    tokens; the extra token absorbs decoders that alter the first token of a slice (e.g. dropping
    a SentencePiece leading space). A turn continued from an earlier call passes the turn's
    earlier tokens in front of the new ones (``prior``), so a stop string split between two
    calls is found too; the turn so far holds no stop string (it would have ended the turn).
    """

    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(stops)
        self.window = max((len(s.encode("utf-8")) for s in self._stops), default=0) + 1

    def find(self, tails: list[list[int]]) -> list[str | None]:
        """For each token sequence, the stop string its last ``window`` tokens contain (earliest
        in the text), if any."""
        if not self._stops:
            return [None] * len(tails)
        texts = self._tokenizer.batch_decode(
            [ids[-self.window :] for ids in tails],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        found: list[str | None] = []
        for text in texts:
            hits = [(text.find(s), i) for i, s in enumerate(self._stops) if s in text]
            found.append(self._stops[min(hits)[1]] if hits else None)
        return found

    def prior(self, context: Sequence[int], continues: int) -> list[int]:
        """The tail of a turn's earlier tokens (the last ``continues`` of ``context``) that a
        stop string completed by the new tokens can begin in."""
        return list(context[len(context) - min(continues, self.window, len(context)):]) if continues > 0 else []


def stop_in_turn(tokenizer, stops: Sequence[str], prior: Sequence[int], gen: Generation) -> Generation:
    """``gen`` cut at the first stop string that the turn's earlier tokens (``prior``, the end of
    the context that the same turn generated in earlier calls) and ``gen``'s tokens complete
    together: the token that completes it is the call's last, ``finish_reason`` becomes "stop".
    ``gen`` unchanged when no such stop string ends in its first tokens (one that lies wholly in
    ``gen``'s own text is the backend's to find). For backends whose stop check reads only a
    call's own text (vLLM), and for the rollout engine with backends that take no ``continues``.
    """
    checker = _StopChecker(tokenizer, stops)
    tail = checker.prior(prior, len(prior))
    if not tail or not gen.token_ids:
        return gen
    # A stop string that begins in the earlier tokens ends within the first `window` new ones.
    heads = [tail + list(gen.token_ids[:k]) for k in range(1, min(len(gen.token_ids), checker.window) + 1)]
    for k, stop in enumerate(checker.find(heads), start=1):
        if stop is not None:
            if k == len(gen.token_ids) and gen.finish_reason == FINISH_STOP:
                return gen  # the backend stopped on it already
            return Generation(list(gen.token_ids[:k]), list(gen.logprobs[:k]), FINISH_STOP, stop)
    return gen


def _top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the tokens outside the top-p nucleus (per row of ``probs``).

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``; a token is
    inside iff the mass of the tokens ranked above it is < top_p (so the top token always is).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    outside_sorted = mass_above >= top_p
    return outside_sorted.scatter(-1, order, outside_sorted)


def forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """The model's KV-cache argument name and whether it accepts ``logits_to_keep``.

    transformers 5 renamed ``past_key_values`` to ``cache`` (input and output; the old input name
    is deprecated until 5.40); 4.x uses ``past_key_values``. Wrappers such as DDP hide the
    signature, so it is read from the wrapped module.
    """
    params = inspect.signature(getattr(model, "module", model).forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, "logits_to_keep" in params


def context_limits(contexts: Sequence[Sequence[int]], params: SamplingParams,
                   max_new_tokens: Sequence[int] | None) -> list[int]:
    """The new-token limit of each context for ``Generator.generate`` (``params.max_new_tokens``
    unless per-context limits are given), after checking the arguments every backend takes."""
    if max_new_tokens is None:
        limits = [params.max_new_tokens] * len(contexts)
    else:
        if len(max_new_tokens) != len(contexts):
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(contexts)} contexts")
        if any(m < 0 for m in max_new_tokens):
            raise ValueError("max_new_tokens entries must be >= 0")
        limits = list(max_new_tokens)
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context must contain at least one token")
    return limits


def context_continues(contexts: Sequence[Sequence[int]], continues: Sequence[int] | None) -> list[int]:
    """``continues`` of ``Generator.generate`` checked (one entry >= 0 per context), 0s when None."""
    if continues is None:
        return [0] * len(contexts)
    if len(continues) != len(contexts):
        raise ValueError(f"continues has {len(continues)} entries for {len(contexts)} contexts")
    if any(c < 0 or c > len(ctx) for c, ctx in zip(continues, contexts)):
        raise ValueError("continues entries must be >= 0 and at most the context's length")
    return list(continues)


def eos_token_set(model: Any, eos_token_id: int, eos_token_ids: Iterable[int] | None = None) -> frozenset[int]:
    """The ids that end a generation: ``eos_token_ids`` when given, else the tokenizer's EOS plus
    the model's ``generation_config.eos_token_id`` (one id or a list; Qwen3 ends chat turns on
    ``<|im_end|>``, which only the generation config names)."""
    if eos_token_ids is not None:
        return frozenset(eos_token_ids)
    ids = {eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= {config_eos} if isinstance(config_eos, int) else set(config_eos)
    return frozenset(ids)


class HFGenerator:
    """A :class:`Generator` over a Hugging Face causal LM on its own device (CPU or one GPU).

    Contexts are batched with left padding (explicit position ids, so padding does not shift
    positions) and decoded step by step with a KV cache; finished rows are dropped from the batch.
    Sampling draws from one ``torch.Generator`` seeded at construction, so the same sequence of
    calls with the same inputs reproduces the same outputs (the draws depend on batch
    composition, so chunking with another ``max_batch_size`` changes sampled, not greedy, output).

    EOS ids: ``tokenizer.eos_token_id`` plus the model's ``generation_config.eos_token_id``
    (e.g. Qwen instruct models end turns with ``<|im_end|>``), unless ``eos_token_ids`` is given.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        seed: int = 0,
        max_batch_size: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        min_shared_prefix: int = 32,
    ) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.eos_token_id: int = tokenizer.eos_token_id
        self.eos_token_ids = eos_token_set(model, self.eos_token_id, eos_token_ids)
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.device = next(model.parameters()).device
        self._rng = torch.Generator(device=self.device)
        self._rng.manual_seed(seed)
        self._cache_arg, self._has_logits_to_keep = forward_kwargs(model)
        self.min_shared_prefix = min_shared_prefix

    def get_rng_state(self) -> torch.Tensor:
        """The sampling RNG state (a CPU byte tensor), e.g. for checkpoints."""
        return self._rng.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._rng.set_state(state)

    def load_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s parameters. When ``model`` is the module this generator runs
        (the trainer's policy, shared in memory) there is nothing to copy."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def generate(
        self,
        contexts: list[list[int]],
        params: SamplingParams,
        max_new_tokens: list[int] | None = None,
        continues: list[int] | None = None,
    ) -> list[Generation]:
        limits = context_limits(contexts, params, max_new_tokens)
        continues = context_continues(contexts, continues)

        results: list[Generation | None] = [None] * len(contexts)
        todo = []
        for i, limit in enumerate(limits):
            if limit == 0:
                results[i] = Generation([], [], FINISH_LENGTH)
            else:
                todo.append(i)
        # Similar lengths share a chunk, which keeps left padding small.
        todo.sort(key=lambda i: len(contexts[i]))
        chunk = self.max_batch_size or max(len(todo), 1)

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for start in range(0, len(todo), chunk):
                    idx = todo[start : start + chunk]
                    outs = self._generate_batch([contexts[i] for i in idx], [limits[i] for i in idx], params,
                                                [continues[i] for i in idx])
                    for i, out in zip(idx, outs):
                        results[i] = out
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _forward(self, cache, **inputs):
        if self._has_logits_to_keep:
            inputs["logits_to_keep"] = 1
        out = self.model(**inputs, **{self._cache_arg: cache}, use_cache=True)
        return out.logits[:, -1, :].float(), getattr(out, self._cache_arg)

    def _sample(self, logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Next tokens and their log-probs (fp32, temperature-scaled, no top-p renormalisation)."""
        if params.greedy:
            tokens = logits.argmax(dim=-1)
            logprobs = F.log_softmax(logits, dim=-1)
        else:
            logprobs = F.log_softmax(logits / params.temperature, dim=-1)
            probs = logprobs.exp()
            if params.top_p < 1:
                probs = probs.masked_fill(_top_p_mask(probs, params.top_p), 0.0)
            tokens = torch.multinomial(probs, 1, generator=self._rng).squeeze(1)
        return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)

    def _generate_batch(
        self, contexts: list[list[int]], limits: list[int], params: SamplingParams, continues: list[int]
    ) -> list[Generation]:
        n = len(contexts)
        # A prompt prefix that every context shares (the system prompt; a tree's whole prompt)
        # is prefilled once and its KV cache repeated over the rows: prefill dominates the cost of
        # multi-turn rollouts, where every turn re-reads its context. Each row keeps >= 1 own token.
        limit = min(map(len, contexts)) - 1
        n_prefix = common_prefix_length(contexts, limit, self.min_shared_prefix) if n > 1 else 0
        cache = None
        if n_prefix:
            prefix = torch.tensor(contexts[0][:n_prefix], dtype=torch.long, device=self.device)[None]
            _, cache = self._forward(None, input_ids=prefix)
            cache.batch_repeat_interleave(n)
        # The rest of each context is left-padded after the prefix; positions skip the padding.
        width = max(len(c) for c in contexts) - n_prefix
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, n_prefix + width), dtype=torch.long)
        attention_mask[:, :n_prefix] = 1
        for row, ctx in enumerate(contexts):
            rest = ctx[n_prefix:]
            input_ids[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            attention_mask[row, n_prefix + width - len(rest) :] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        # Each row's positions start at 0 at its first real token; pads get a harmless value.
        position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)[:, n_prefix:]

        logits, cache = self._forward(
            cache, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        next_positions = position_ids[:, -1:] + 1

        stop_checker = _StopChecker(self.tokenizer, params.stop)
        # A continued turn's earlier tokens go in front of the new ones for the stop check.
        priors = [stop_checker.prior(ctx, c) for ctx, c in zip(contexts, continues)]
        token_ids: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        results: list[Generation | None] = [None] * n
        active = list(range(n))  # original row of each row of the current batch tensors
        while True:
            tokens, token_logprobs = self._sample(logits, params)
            for row, tok, lp in zip(active, tokens.tolist(), token_logprobs.tolist()):
                token_ids[row].append(tok)
                logprobs[row].append(lp)
            stops = stop_checker.find([priors[row] + token_ids[row][-stop_checker.window:] for row in active])

            keep = []
            for k, row in enumerate(active):
                if token_ids[row][-1] in self.eos_token_ids:
                    results[row] = Generation(token_ids[row], logprobs[row], FINISH_EOS)
                elif stops[k] is not None:
                    results[row] = Generation(token_ids[row], logprobs[row], FINISH_STOP, stops[k])
                elif len(token_ids[row]) >= limits[row]:
                    results[row] = Generation(token_ids[row], logprobs[row], FINISH_LENGTH)
                else:
                    keep.append(k)
            if not keep:
                return results  # type: ignore[return-value]

            if len(keep) < len(active):
                keep_t = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(keep_t)
                tokens, attention_mask, next_positions = tokens[keep_t], attention_mask[keep_t], next_positions[keep_t]
                active = [active[k] for k in keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
            logits, cache = self._forward(
                cache, input_ids=tokens.unsqueeze(1), attention_mask=attention_mask, position_ids=next_positions
            )
            next_positions = next_positions + 1


def common_prefix_length(sequences: Sequence[Sequence[int]], limit: int, minimum: int = 0) -> int:
    """Length of the token prefix all ``sequences`` share, at most ``limit``; 0 when it is
    shorter than ``minimum`` (too short to be worth running separately)."""
    first = sequences[0]
    n = limit
    for seq in sequences[1:]:
        n = next((i for i in range(n) if seq[i] != first[i]), n)
    return n if n >= minimum else 0


@register_backend("hf")
def _hf_backend(model: torch.nn.Module, tokenizer, *, seed: int = 0) -> HFGenerator:
    # Shares the training module: new weights are visible to the next rollout without a copy.
    return HFGenerator(model, tokenizer, seed=seed)
