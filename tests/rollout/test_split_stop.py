"""A stop string split between two generation calls of one turn (docs/method.md §6.4): the stop
check reads the turn so far, so the call ends at the token that completes the tag, whatever
call boundary the tag straddles. The model is a real Qwen2 that writes a planned text one
character a token (tests/rollout/chain_model.py); the vLLM backend's version of these tests is in
test_vllm_backend.py."""

import math

import pytest

from at2po.agent import render_prompt
from at2po.rollout.engine import Prompt, RolloutConfig, TreeRolloutEngine
from at2po.rollout.generator import FINISH_EOS, FINISH_STOP, Generation, HFGenerator, SamplingParams, stop_in_turn
from at2po.tasks.search_qa import SearchQATask
from chain_model import chain_model, char_tokenizer
from conftest import EchoSearch, StreamQueue, make_sample

pytestmark = pytest.mark.usefixtures("single_thread")

TURN = "XY<search>Z</search>"  # the tag's 9 tokens are tokens 4..12 of the turn
AFTER = "QW"  # what the model writes after the tag (and after an observation, which ends in ">")
TAG_START, TAG_END = 4, 13


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(single=("<search>",))


@pytest.fixture(scope="module")
def prompt(tok):
    return Prompt(render_prompt(tok, "Question: Who?", "S"), make_sample())


@pytest.fixture(scope="module")
def model(tok, prompt):
    chain = [prompt.prompt_ids[-1], *tok.encode(TURN + AFTER, add_special_tokens=False)]
    return chain_model(tok, chain)


def turn_ids(tok, text=TURN):
    return tok.encode(text, add_special_tokens=False)


def split_chunk_sizes():
    """Every chunk size whose boundaries fall inside the tag, and the boundaries they make."""
    sizes = {c: [k - TAG_START for k in range(c, TAG_END, c) if TAG_START < k < TAG_END] for c in range(1, TAG_END)}
    return {c: js for c, js in sizes.items() if js}


def test_the_chunk_sizes_split_the_tag_after_each_of_its_tokens():
    assert sorted({j for js in split_chunk_sizes().values() for j in js}) == list(range(1, 9))


@pytest.mark.parametrize("j", range(1, 9))
def test_hf_generator_finds_a_tag_that_an_earlier_call_began(tok, model, prompt, j):
    """A context ending with the turn's first 4 + j tokens (j of the tag's 9): with continues the
    call ends at the tag's last token; without, the check sees only the new tokens and runs on."""
    gen = HFGenerator(model, tok)
    so_far = turn_ids(tok)[: TAG_START + j]
    params = SamplingParams(max_new_tokens=20, stop=("</search>", "</answer>"), greedy=True)
    out = gen.generate([prompt.prompt_ids + so_far], params, continues=[len(so_far)])[0]
    assert tok.decode(so_far + out.token_ids) == TURN
    assert (out.finish_reason, out.stop_string) == (FINISH_STOP, "</search>")
    assert all(lp > -1e-3 for lp in out.logprobs)  # the planned text, with certainty
    blind = gen.generate([prompt.prompt_ids + so_far], params)[0]  # the old check: the turn runs on
    assert tok.decode(so_far + blind.token_ids) == TURN + AFTER + tok.eos_token and blind.finish_reason == FINISH_EOS


def test_stop_in_turn_cuts_after_the_fact(tok):
    """The post-hoc cut (vLLM, and the engine for backends without continues), by hand."""
    ids = turn_ids(tok, TURN + AFTER)
    prior, new = ids[:6], ids[6:] + [tok.eos_token_id]  # "XY<search>Z</" | "search>QW<eos>"
    lps = [-0.1 * (i + 1) for i in range(len(new))]
    cut = stop_in_turn(tok, ("</search>",), prior, Generation(new, lps, FINISH_EOS))
    assert cut.token_ids == new[:7] and cut.logprobs == lps[:7]
    assert (cut.finish_reason, cut.stop_string) == (FINISH_STOP, "</search>")
    # No earlier tokens, or a tag that lies wholly in the new text: unchanged.
    whole = Generation(ids[6:], [0.0] * len(ids[6:]), FINISH_EOS)
    assert stop_in_turn(tok, ("</search>",), [], whole) is whole
    assert stop_in_turn(tok, ("</search>",), ids[:3], Generation(ids[3:], [0.0] * len(ids[3:]), FINISH_EOS)).token_ids \
        == ids[3:TAG_END]
    plain = Generation(turn_ids(tok, "QW"), [0.0, 0.0], FINISH_EOS)
    assert stop_in_turn(tok, ("</search>",), ids[:6], plain) is plain


class NoContinues:
    """The HF generator behind a ``generate`` without ``continues`` (a backend of before): the
    engine has to cut its output itself."""

    def __init__(self, gen):
        self.gen, self.eos_token_id = gen, gen.eos_token_id

    def generate(self, contexts, params, max_new_tokens=None):
        return self.gen.generate(contexts, params, max_new_tokens)


class Streaming(StreamQueue):
    """A streaming front to the HF generator (``rollout.schedule=stream``): ``step`` generates
    every pending request, one at a time; ``with_continues`` says whether ``submit`` takes it."""

    def __init__(self, gen, with_continues):
        self.gen, self.eos_token_id, self.pending = gen, gen.eos_token_id, []
        if with_continues:
            self.submit = self._submit_continues

    def generate(self, contexts, params, max_new_tokens=None):
        return self.gen.generate(contexts, params, max_new_tokens)

    def submit(self, key, context, params, max_new_tokens, seed=None):
        self.pending.append((key, context, params, max_new_tokens, 0))

    def _submit_continues(self, key, context, params, max_new_tokens, seed=None, continues=0):
        self.pending.append((key, context, params, max_new_tokens, continues))

    def step(self):
        done, self.pending = self.pending, []
        return [(k, self.gen.generate([c], p, [m], continues=[n])[0]) for k, c, p, m, n in done]


@pytest.mark.parametrize("front", ["continues", "engine cuts", "stream", "stream, engine cuts"])
def test_a_tag_split_at_any_chunk_boundary_is_one_tool_call(tok, model, prompt, front):
    """For every chunk size that splits the tag (after each of its 9 tokens, see above), under
    both schedules: the turn ends on the tag and calls the tool; the next turn follows the
    observation. With the old check, the turn ran on past the tag into "QW" and EOS."""
    hf = HFGenerator(model, tok)
    gen = {"continues": hf, "engine cuts": NoContinues(hf), "stream": Streaming(hf, True),
           "stream, engine cuts": Streaming(hf, False)}[front]
    schedule = "stream" if front.startswith("stream") else "async"
    for chunk, boundaries in split_chunk_sizes().items():
        tool = EchoSearch()
        cfg = RolloutConfig(n_initial=1, expansion_rounds=0, samples_per_tree=1, chunk_tokens=chunk,
                            max_response_tokens=200, schedule=schedule)
        eng = TreeRolloutEngine(gen, tok, [tool], SearchQATask(), cfg, system_prompt="S")
        res = eng.rollout([prompt], greedy=True)
        tree = res.trees[0]
        first, second = tree.nodes[1], tree.nodes[2]
        assert tok.decode(first.gen_ids) == TURN, (chunk, boundaries)
        assert first.status == "active" and first.info["action"] == "search" and tool.queries == ["Z"]
        assert tok.decode(second.gen_ids) == AFTER + tok.eos_token and second.status == "leaf"
        assert len(tree) == 3 and res.stats[0].generated_tokens == len(first.gen_ids) + len(second.gen_ids)
        assert math.isclose(first.entropy, 0.0, abs_tol=1e-3)
