"""LoRA (model.lora_rank > 0): only adapters train; checkpoints hold them and resume bit-identically."""

from __future__ import annotations

import json
import re

import pytest
import torch

pytest.importorskip("peft")

from at2po.config import ModelConfig, load_config
from at2po.factory import load_model
from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer
from at2po.training.trainer import Trainer, latest_checkpoint
from conftest import make_run_cfg, write_search_qa_files
from dist_worker import ContextKeyedGenerator

pytestmark = pytest.mark.usefixtures("single_thread")

CORPUS = ["Zorbex was founded by Mila Tarn.", "Mila Tarn was born in Quovia.", "Quovia is a city in Belmark."]
QUESTIONS = [("Who founded Zorbex?", "Mila Tarn"), ("Where was Mila Tarn born?", "Quovia"),
             ("Which country is Quovia in?", "Belmark"), ("Who was born in Quovia?", "Mila Tarn")]
LORA = ["model.lora_rank=4", "model.lora_alpha=8", "optim.lr=1e-2", "data.val_file=", "rollout.samples_per_tree=0",
        "rollout.max_response_tokens=200", "rollout.chunk_tokens=64", "trainer.mini_batch_prompts=2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_assets")
    tok = train_tokenizer(synthetic_agent_texts(200) + CORPUS * 5, vocab_size=600)
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, seed=0)
    save_pretrained_dir(model, tok, root / "model")
    write_search_qa_files(root, CORPUS, QUESTIONS)
    return root


def scripted(trainer: Trainer) -> Trainer:
    """Scripted turns (search, right or wrong answer by context): rewards that vary within a tree."""
    trainer.generator = trainer.engine.generator = ContextKeyedGenerator(trainer.tokenizer)
    return trainer


def weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def test_only_adapter_weights_change(assets, tmp_path):
    tr = scripted(Trainer(make_run_cfg(assets, tmp_path / "run", *LORA)))
    before = weights(tr)
    trainable = {n for n, p in tr.accelerator.unwrap_model(tr.model).named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for _ in range(2):  # step 1 moves B only (B = 0 at init: A's gradient is 0); step 2 moves A too
        m = tr.train_step()
    assert m["adv/abs_max"] > 0
    after = weights(tr)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    base = [k for k in before if "lora_" not in k]
    assert base and all(torch.equal(before[k], after[k]) for k in base)
    # A checkpoint is the adapters over model.path; transformers (with PEFT installed) loads it as
    # the adapted model, so `at2po eval model.path=<checkpoint>` evaluates what was trained.
    ckpt = tr.save_checkpoint()
    loaded = load_model(ModelConfig(path=str(ckpt)))
    ids = torch.tensor([tr.tokenizer.encode("Who founded Zorbex? Mila Tarn")])
    with torch.no_grad():
        trained = tr.accelerator.unwrap_model(tr.model)(input_ids=ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=1e-6, rtol=0)
        base_logits = load_model(ModelConfig(path=str(assets / "model")))(input_ids=ids).logits
    assert float((base_logits - trained).abs().max()) > 1e-4


def test_checkpoint_holds_the_adapters_and_resumes_bit_identically(assets, tmp_path):
    def run(out, plan):
        for i, steps in enumerate(plan):
            tr = scripted(Trainer(make_run_cfg(assets, out, *LORA, f"trainer.steps={sum(plan[:i + 1])}")))
            tr.fit(resume=i > 0)
        return weights(tr), [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]

    w_full, log_full = run(tmp_path / "full", [2])
    w_res, log_res = run(tmp_path / "resumed", [1, 1])
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    keys = ["reward/mean", "loss/policy", "rollout/generated_tokens"]
    assert [[r[k] for k in keys] for r in log_full] == [[r[k] for k in keys] for r in log_res]
    ckpt = latest_checkpoint(tmp_path / "full")
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    # The adapters moved away from their initialisation, so the continuation is a real test.
    fresh = weights(Trainer(make_run_cfg(assets, tmp_path / "fresh", *LORA)))
    assert any(not torch.equal(fresh[k], w_full[k]) for k in w_full if "lora_B" in k)


def test_lora_config_errors_name_the_field(assets, tmp_path):
    with pytest.raises(ValueError, match="model.lora_rank must be >= 0"):
        load_config(None, ["model.lora_rank=-1"])
    with pytest.raises(ValueError, match="model.lora_dropout must be in"):
        load_config(None, ["model.lora_dropout=1.5"])
    with pytest.raises(ValueError, match=r"model.lora_target_modules=\['nope_proj'\]"):
        Trainer(make_run_cfg(assets, tmp_path / "run", *LORA, "model.lora_target_modules=[nope_proj]"))


def test_a_full_model_checkpoint_is_refused_by_a_lora_run_naming_it(assets, tmp_path):
    """Weights without adapters (e.g. a checkpoint of full fine-tuning) do not load silently."""
    full = Trainer(make_run_cfg(assets, tmp_path / "full", "trainer.save_every=0"))
    ckpt = full.save_checkpoint()
    tr = Trainer(make_run_cfg(assets, tmp_path / "lora", *LORA))
    _, state = tr._read_checkpoint(ckpt)
    with pytest.raises(ValueError) as err:
        tr.load_checkpoint(ckpt, ({}, state))
    assert str(err.value) == (f"checkpoint {ckpt} has no adapter weights: was it written by a run with "
                              "model.lora_rank > 0?")
    with pytest.raises(ValueError, match=rf"^checkpoint {re.escape(str(ckpt))} does not match the adapters: missing \["):
        tr.load_checkpoint(ckpt)


def test_lora_under_fsdp_is_refused_naming_both(assets, tmp_path, monkeypatch):
    """FSDP is faked (this CPU process cannot run it): LoRA with FSDP stops at construction."""
    import at2po.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "is_fsdp", lambda acc: True)
    with pytest.raises(ValueError) as err:
        Trainer(make_run_cfg(assets, tmp_path / "run", "model.lora_rank=4"))
    assert str(err.value) == ("model.lora_rank > 0 with FSDP is not supported: LoRA is for one device; "
                              "use full fine-tuning with FSDP or launch without FSDP")
