"""Bad input at the boundary (issue 14): every user error of the CLI is one line on stderr and a
non-zero exit, naming the field or file and the fix; no value that would train silently wrong
passes the config."""

from __future__ import annotations

import json
import os

import pytest

from at2po.cli import main
from at2po.config import load_config


def run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("override, message", [
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 values"),
    ("optim.betas=[0.9, 1.5]", "optim.betas must lie in [0, 1)"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("tools.search.max_passage_chars=-1", "tools.search.max_passage_chars must be >= 1"),
    ("tools.search.max_consecutive_failures=-1", "tools.search.max_consecutive_failures must be >= 0"),
    ("tools.python.timeout=0", "tools.python.timeout must be > 0"),
    ("data.val_size=-1", "data.val_size must be >= 0"),
    ("rollout.top_p=1.5", "rollout.top_p must be in (0, 1]"),
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("rollout.alpha=-1", "rollout.alpha (the branching penalty) must be >= 0"),
    ("rollout.seed=-1", "rollout.seed must be >= 0"),
    ("algo.log_ratio_max=0", "algo.log_ratio_max must be > 0"),
    ("trainer.seed=-3", "trainer.seed must be >= 0"),
    ("trainer.save_every=-1", "trainer.save_every must be >= 0"),
    ("trainer.output_dir=' '", "trainer.output_dir is empty"),
    ("task.name=''", "task.name is empty"),
    ("tools.search.backend=http", None),  # the default URL is fine
])
def test_config_values_out_of_range_are_one_line_errors(override, message, capsys):
    code, err = run_cli(["config", override], capsys)
    if message is None:
        assert code == 0 and err == ""
        return
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_retriever_url_without_a_scheme_is_refused():
    with pytest.raises(ValueError, match="retriever_url='localhost:8000' must start with http://"):
        load_config(None, ["tools.search.backend=http", "tools.search.retriever_url=localhost:8000"])


@pytest.mark.parametrize("content, message", [
    ("model: [unclosed\n", "bad.yaml:2: not valid YAML"),
    (b"model:\n  path: caf\xe9\n", "bad.yaml: not UTF-8 text"),
    ("- a list\n", "the top level must be a mapping"),
    ("", "bad.yaml is empty (or only comments): give a YAML mapping of sections"),  # ran on the defaults
    ("# settings to come\n", "bad.yaml is empty (or only comments)"),
    ("optim:\n  betas: [0.9]\n", "optim.betas must be a list of 2 values"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for command in ("config", "train"):
        code, err = run_cli([command, "--config", str(path)], capsys)
        assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_a_config_path_that_is_a_directory_or_missing(tmp_path, capsys):
    code, err = run_cli(["train", "--config", str(tmp_path)], capsys)
    assert code == 2 and f"config file {tmp_path} is a directory" in err
    code, err = run_cli(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1
    # Not a regular file, but readable: /dev/null is empty (it was said not to exist), a pipe is read.
    code, err = run_cli(["config", "--config", "/dev/null"], capsys)
    assert code == 2 and "config file /dev/null is empty (or only comments)" in err and len(err.splitlines()) == 1, err
    read, write = os.pipe()
    os.write(write, b"optim: {lr: 0.5}\n")
    os.close(write)
    try:
        assert load_config(f"/dev/fd/{read}").optim.lr == 0.5
    finally:
        os.close(read)


def test_train_user_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "1", "question": "q?", "golden_answers": ["a"]}) + "\n")
    code, err = run_cli(["train", f"data.train_file={data}"], capsys)
    assert code == 2 and "model.path is empty" in err and len(err.splitlines()) == 1
    code, err = run_cli(["train", "--resume", "--overwrite", "model.path=x"], capsys)
    assert code == 2 and "--overwrite and --resume contradict each other" in err
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"id": "1", "question": "caf\u00e9?", "golden_answers": ["a"]}\n'.encode("latin-1"))
    code, err = run_cli(["eval", "--dataset", f"x={latin1}", "model.path=x", f"--out={tmp_path / 'e'}"], capsys)
    assert code == 2 and f"{latin1}: not UTF-8 text" in err and len(err.splitlines()) == 1


def test_a_lone_surrogate_in_a_data_row_names_the_file_row_and_field(tmp_path, capsys):
    """JSON's escape "\\ud800" reads as a lone surrogate, which the tokenizer refused mid-run with
    "TypeError: TextEncodeInput must be Union[...]", naming neither the file nor the row."""
    from at2po.datasets import load_qa_file
    from at2po.tasks.arithmetic import ArithmeticTask

    data = tmp_path / "train.jsonl"
    data.write_text('{"id": "1", "question": "ok?", "golden_answers": ["a"]}\n'
                    '{"id": "2", "question": "Who?", "golden_answers": ["Mila \\udc80Tarn"]}\n')
    code, err = run_cli(["eval", "--dataset", f"x={data}", "model.path=x", f"--out={tmp_path / 'e'}"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{data}:2: field 'golden_answers[0]' holds a lone surrogate (\\udc80)" in err, err
    array = tmp_path / "rows.json"
    array.write_text('[{"id": "1", "question": "Who \\ud800?", "golden_answers": ["a"]}]')
    with pytest.raises(ValueError, match=r"rows.json, row 1: field 'question' holds a lone surrogate \(\\ud800\)"):
        load_qa_file(array)
    problems = tmp_path / "problems.jsonl"
    problems.write_text('{"id": "1", "question": "2 \\ud800+ 2?", "answer": 4}\n')
    with pytest.raises(ValueError, match=r"problems.jsonl:1: field 'question' holds a lone surrogate"):
        ArithmeticTask().load(problems)


@pytest.mark.parametrize("override", [
    "model.path={a:", "optim.betas=[0.9,", "model.path='abc", "model.path=@x", "model.path=*x",
    "model.path=!!python/name:os.system", "model.path=%x", "model.path=`x", "model.path=\tx",
])
def test_an_override_that_is_not_valid_yaml_is_one_line(override, capsys):
    """These raised a YAML traceback; the message names the override and how to pass text."""
    key = override.split("=", 1)[0]
    for argv in (["config", override], ["quickstart", "--set", override]):
        code, err = run_cli(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"{override!r}: the value is not valid YAML (" in err and f"quote it in YAML: {key}=" in err, err


def test_a_comment_inside_an_override_is_refused_and_a_quoted_hash_kept(capsys):
    """'runs/exp #2' was read as 'runs/exp' (YAML's ' #' starts a comment): silently wrong."""
    code, err = run_cli(["config", "trainer.output_dir=runs/exp #2"], capsys)
    assert code == 2 and "' #' starts a YAML comment" in err and len(err.splitlines()) == 1, err
    assert load_config(None, ["trainer.output_dir='runs/exp #2'"]).trainer.output_dir == "runs/exp #2"
    assert load_config(None, ["trainer.output_dir=runs/exp#2"]).trainer.output_dir == "runs/exp#2"


def test_a_key_or_section_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    """YAML keeps the last of two equal keys silently: the first setting was lost without a word."""
    for text, line in (("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n", 3), ("optim:\n  lr: 1.0e-3\noptim:\n  warmup_steps: 2\n", 3)):
        path = tmp_path / "twice.yaml"
        path.write_text(text)
        code, err = run_cli(["config", "--config", str(path)], capsys)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"twice.yaml:{line}: not valid YAML (the key " in err and "appears twice" in err, err


@pytest.mark.parametrize("flag, value, low", [("--chains", "0", 1), ("--rounds", "-1", 0), ("--top-k", "0", 1),
                                              ("--seed", "-2", 0)])
def test_demo_arguments_out_of_range_are_one_line_errors(flag, value, low, capsys):
    """--rounds -1 ran as 0 rounds and --chains 0 failed with "parent=-1 is not a node"."""
    code, err = run_cli(["demo", flag, value], capsys)
    assert (code, err) == (2, f"at2po demo: error: demo: {flag} must be >= {low}, got {value}  "
                              "(AT2PO_DEBUG=1 for the traceback)")


def test_a_missing_model_dir_or_one_without_a_tokenizer_says_so(tmp_path, capsys):
    """A missing local model directory was reported as a malformed hub repo id, and a model
    directory without tokenizer files as "every context must contain at least one token"."""
    from at2po.config import ModelConfig
    from at2po.factory import load_model, load_tokenizer

    missing = tmp_path / "no_such_model"
    for load in (load_tokenizer, load_model):
        with pytest.raises(ValueError, match=rf"^model.path={missing} does not exist: point it at"):
            load(ModelConfig(path=str(missing)))
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=rf"^model.path={weights_only} holds no tokenizer files \(tokenizer.json, "):
        load_tokenizer(ModelConfig(path=str(weights_only)))
    with pytest.raises(ValueError, match=r"^model.tokenizer_path=.*weights_only holds no tokenizer files"):
        load_tokenizer(ModelConfig(path="org/name", tokenizer_path=str(weights_only)))
    code, err = run_cli(["train", f"model.path={missing}", "data.train_file=x.jsonl"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"model.path={missing} does not exist" in err, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny saved model with its tokenizer: the intact original each damage test copies."""
    from at2po.tiny import build_tiny_model, save_pretrained_dir, synthetic_agent_texts, train_tokenizer

    root = tmp_path_factory.mktemp("model") / "model"
    tok = train_tokenizer(synthetic_agent_texts(20), vocab_size=300)
    save_pretrained_dir(build_tiny_model(tok, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                         intermediate_size=32), tok, root)
    return root


def eval_argv(tmp_path, model, *extra):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "1", "question": "q?", "golden_answers": ["a"]}) + "\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": "a passage"}) + "\n")
    return ["eval", "--dataset", f"x={data}", f"--out={tmp_path / 'e'}", f"model.path={model}",
            f"tools.search.corpus_file={corpus}", "trainer.progress=false", *extra]


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b"\xff" * 8 + b[8:], "header too large"),  # a bad header length
    (lambda b: bytes(reversed(b)), "header"),  # random-looking bytes
    (lambda b: b[: len(b) - 7], "incomplete metadata, file not fully covered"),  # cut short
    (lambda b: b"", "header too small"),  # empty
])
def test_a_damaged_safetensors_file_is_named(model_dir, tmp_path, capsys, damage, reason):
    import shutil

    model = shutil.copytree(model_dir, tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    code, err = run_cli(eval_argv(tmp_path, model), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{weights} is damaged (" in err and reason in err, err


def test_a_broken_chat_template_is_named(model_dir, tmp_path, capsys):
    import shutil

    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content ")
    code, err = run_cli(eval_argv(tmp_path, model), capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{model / 'chat_template.jinja'}: line 1: not a valid Jinja chat template" in err, err


def test_a_model_with_fewer_embedding_rows_than_tokens_is_refused_at_load(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = len(AutoTokenizer.from_pretrained(model_dir)) - 50
    model.resize_token_embeddings(rows)
    model.save_pretrained(tmp_path / "small")
    capsys.readouterr()
    code, err = run_cli(eval_argv(tmp_path, tmp_path / "small", f"model.tokenizer_path={model_dir}"), capsys)
    assert code == 2 and "Traceback" not in err, err  # the model loads (transformers' progress bar), then this line:
    err = err.splitlines()[-1]
    assert err.startswith("at2po eval: error: ") and f"the model's embedding has {rows} rows but the tokenizer ({model_dir}) has {rows + 50} tokens" in err, err


def test_quickstart_with_a_backend_that_is_not_installed_fails_before_the_warm_start(tmp_path, capsys, monkeypatch):
    """`quickstart --set rollout.backend=vllm` without vLLM failed only after the minute of warm start."""
    import importlib.util

    import at2po.quickstart

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")

    def warm_start(*args, **kwargs):
        raise AssertionError("the warm start ran")

    monkeypatch.setattr(at2po.quickstart, "build_quickstart_assets", warm_start)
    code, err = run_cli(["quickstart", "--out", str(tmp_path / "qs"), "--set", "rollout.backend=vllm"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "rollout.backend=vllm needs vLLM: pip install" in err, err
    code, err = run_cli(["quickstart", "--out", str(tmp_path / "qs2"), "--set", "rollout.backend=nope"], capsys)
    assert code == 2 and "rollout.backend='nope' is not one of hf, vllm" in err, err
