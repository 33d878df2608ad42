"""One AT²PO training step at the paper's shapes, on CPU; launched by test_paper_shape.py in a
fresh process so that the peak RSS it reports is this step's own.

    python tests/training/paper_shape_step.py WORKDIR [--reduced] [key=value overrides...]

``--reduced`` (the CI test) keeps the model, the tree and the update as they are and shortens
the trajectories: 1-3 searches of 3 passages cut to 500 characters, think blocks of 20-50 words
(responses of about 0.5-1.5k tokens instead of 1.2-2.4k).

The model is a random Qwen3 (2 layers, 64 wide, head dim 64) with Qwen3's vocabulary of 151,936
tokens, saved with a small BPE tokenizer (the model's vocabulary is larger than the tokenizer's,
as Qwen3's is). The run uses the paper's tree (M=10 chains, L=2 rounds of K=6 expansions, N=22
leaves), the paper's system prompt, the real BM25 search tool over a corpus of long passages
(three passages of up to 1,000 characters a search: hundreds of tokens of results per turn),
rewards, credit and the update as configured (gradient checkpointing on, the rows tree-packed
into token-budget micro-batches, the output head in chunks).

The turns are scripted: a random model never writes a tool call, so a scripted generator writes
each turn (a think block of 40-100 words, then a search; after 2-4 searches an answer, right
or wrong) with
random per-token log-probs, which make the turn entropies that steer the expansions. Everything
after the generator is the real path. A first, short step warms up kernels, the allocator and
the optimizer state; the second step is the measured one. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from at2po.config import load_config
from at2po.rollout.generator import Generation
from at2po.tiny import save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script, not by pytest
from conftest import StatelessGenerator  # noqa: E402

V = 151_936
WORDS = ("river city founded born country capital north south old new king queen bridge tower market "
         "harbour valley mountain forest lake island village castle museum school station garden").split()


def write_assets(root: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    rng = np.random.default_rng(0)
    passages = [" ".join(rng.choice(WORDS, 160)) + "." for _ in range(40)]
    tok = train_tokenizer(synthetic_agent_texts(200) + passages, vocab_size=600)
    config = Qwen3Config(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_pretrained_dir(Qwen3ForCausalLM(config).float(), tok, root / "model")
    with open(root / "corpus.jsonl", "w") as f:
        for i, p in enumerate(passages):
            f.write(json.dumps({"id": str(i), "contents": p}) + "\n")
    with open(root / "train.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"id": str(i), "question": f"Which river flows through the city {i}?",
                                "golden_answers": ["river"]}) + "\n")


class ScriptedTurns(StatelessGenerator):
    """Writes each turn as described in the module docstring; ``words`` scales the think blocks."""

    def __init__(self, tokenizer, words: tuple[int, int], searches: tuple[int, int] = (2, 5)):
        self.tok, self.words, self.searches = tokenizer, words, searches
        self.eos_token_id = tokenizer.eos_token_id
        self.rng = np.random.default_rng(1)

    def generate(self, contexts, params, max_new_tokens=None):
        out = []
        for ctx, limit in zip(contexts, max_new_tokens or [params.max_new_tokens] * len(contexts)):
            # Searches so far: results in the response (the system prompt names the tags too).
            searches = self.tok.decode(ctx).split("<|im_start|>assistant\n", 1)[-1].count("<result>")
            think = " ".join(self.rng.choice(WORDS, int(self.rng.integers(*self.words))))
            if searches < int(self.rng.integers(*self.searches)):
                text = f"<think> {think} </think> <search> {' '.join(self.rng.choice(WORDS, 3))} </search>"
            else:
                answer = self.rng.choice(["river", "city"])  # right or wrong: rewards differ within a tree
                text = f"<think> {think} </think> <answer> The final answer is \\[ \\boxed{{{answer}}} \\] </answer>"
            ids = self.tok.encode(text, add_special_tokens=False)
            finish = "stop" if text.endswith("</search>") else "eos"
            ids = ids if finish == "stop" else ids + [self.eos_token_id]
            if len(ids) > limit:
                ids, finish = ids[:limit], "length"
            lps = (-self.rng.uniform(0.05, 3.0) * self.rng.uniform(0.5, 1.5, len(ids))).tolist()
            out.append(Generation(ids, lps, finish, "</search>" if finish == "stop" else None))
        return out


def naive_distinct_tokens(sequences) -> int:
    """The trie's size by a dict walk: one node per distinct (prefix, token)."""
    children: dict[tuple[int, int], int] = {}
    for seq in sequences:
        node = -1
        for t in seq:
            node = children.setdefault((node, int(t)), len(children))
    return len(children)


def proc_status_kib(field: str) -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def main() -> None:
    root = Path(sys.argv[1])
    reduced = "--reduced" in sys.argv[2:]
    overrides = [a for a in sys.argv[2:] if a != "--reduced"]
    if reduced:
        overrides.insert(0, "tools.search.max_passage_chars=500")
    write_assets(root)
    cfg = load_config(None, [
        f"model.path={root / 'model'}", "model.gradient_checkpointing=true",
        f"data.train_file={root / 'train.jsonl'}", f"tools.search.corpus_file={root / 'corpus.jsonl'}",
        "rollout.n_initial=10", "rollout.expansion_rounds=2", "rollout.top_k=6", "rollout.samples_per_tree=22",
        "rollout.max_response_tokens=4096", "rollout.chunk_tokens=512", "rollout.max_turns=10",
        "trainer.prompts_per_step=1", "trainer.mini_batch_prompts=1", "trainer.micro_batch_tokens=8192",
        "trainer.logprob_chunk_tokens=256", "trainer.val_before_train=false", "trainer.val_every=0",
        "trainer.save_every=0", "trainer.progress=false", "trainer.tensorboard=false", "optim.lr=1e-3",
        f"trainer.output_dir={root / 'run'}", *overrides,
    ])
    torch.set_num_threads(2)
    tr = Trainer(cfg)
    results = []
    rollout = tr.engine.rollout
    tr.engine.rollout = lambda *a, **kw: results.append(rollout(*a, **kw)) or results[-1]
    tr.engine.generator = ScriptedTurns(tr.tokenizer, (5, 10))
    tr.train_step()  # warm-up: short turns
    tr.engine.generator = (ScriptedTurns(tr.tokenizer, (20, 50), (1, 4)) if reduced
                           else ScriptedTurns(tr.tokenizer, (40, 100)))
    before_weights = tr.model.get_input_embeddings().weight.detach().clone()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: peak RSS (VmHWM) := current RSS; ru_maxrss cannot be reset
    before = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    metrics = tr.train_step()
    seconds = time.perf_counter() - t0
    after = proc_status_kib("VmHWM")
    result = results[-1]
    tree = result.trees[0]
    seqs = [tree.prompt_ids + row.sequence.response_ids.tolist() for row in result.rows]
    print(json.dumps({
        "rows": len(result.rows), "prompt_tokens": len(tree.prompt_ids),
        "response_tokens": [len(s) - len(tree.prompt_ids) for s in seqs],
        "trained_tokens": [int(row.sequence.loss_mask.sum()) for row in result.rows],
        "row_tokens": sum(map(len, seqs)), "distinct_tokens": naive_distinct_tokens(seqs),
        "forward_tokens": metrics["perf/update_forward_tokens"],
        "rows_over_budget": metrics["perf/rows_over_token_budget"],
        "loss": metrics["loss/policy"], "grad_norm": metrics["loss/grad_norm"],
        "logprob_diff_max": metrics["rollout/logprob_diff_max"],
        "weights_moved": float((tr.model.get_input_embeddings().weight.detach() - before_weights).abs().max()),
        "peak_growth_mib": (after - before) / 1024, "step_seconds": seconds,
        "time_update": metrics["time/update"],
    }))


if __name__ == "__main__":
    main()
