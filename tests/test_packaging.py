"""What a user installs and imports: light imports, a core-only CLI, nothing pointing outside the repo."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

# Makes the optional dependencies unimportable in a child interpreter: a core-only install.
BLOCKER = """
import sys
BLOCK = {"transformers", "tokenizers", "bm25s", "requests", "accelerate", "yaml", "tqdm", "tensorboard",
         "matplotlib", "pyarrow", "fastapi", "uvicorn", "faiss", "sentence_transformers", "safetensors"}
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Block())
"""


def _python(code: str, *args: str, core_only: bool = False, tmp_path: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    if core_only:
        (tmp_path / "sitecustomize.py").write_text(BLOCKER)
        env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{SRC}"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_config_and_algorithms_import_no_engine_no_http_client():
    code = ("import sys, json, at2po.config, at2po.algorithms.advantages, at2po.algorithms.credit, "
            "at2po.algorithms.expansion, at2po.algorithms.losses, at2po.algorithms.tree; "
            "print(json.dumps(sorted(sys.modules)))")
    out = _python(code)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout))
    heavy = {"at2po.rollout.engine", "at2po.rollout.generator", "at2po.training.trainer", "requests",
             "transformers", "accelerate", "bm25s", "at2po.tools.search"}
    assert not loaded & heavy, sorted(loaded & heavy)
    assert "at2po.config" in loaded  # the check itself ran


def test_importing_the_tools_does_not_load_the_http_client():
    out = _python("import sys, at2po.tools; print('requests' in sys.modules, sorted(at2po.tools.TOOLS))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False ['python', 'search']"


@pytest.mark.parametrize(
    "argv, extra",
    [(["config"], "train"), (["quickstart", "--out", "unused"], "train"),
     (["train", "model.path=x"], "train"), (["retriever", "build", "--corpus", "{corpus}", "--out", "o"], "retriever")],
)
def test_core_only_cli_names_the_extra_in_one_line(tmp_path, argv, extra):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "contents": "Paris is in France."}\n')
    argv = [a.format(corpus=corpus) for a in argv]
    out = _python("import sys; from at2po.cli import main; sys.exit(main(sys.argv[1:]))", *argv,
                  core_only=True, tmp_path=tmp_path)
    assert out.returncode == 2
    # Progress lines may come first (the retriever reads its corpus before indexing); the error
    # is the last line, and there is no traceback.
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr, out.stderr
    assert last.startswith(f"at2po {argv[0]}: error: this command needs ")
    assert last.endswith(f"pip install 'at2po[{extra}]'")


def test_core_only_cli_help_and_demo_work(tmp_path):
    run = "import sys; from at2po.cli import main; sys.exit(main(sys.argv[1:]))"
    helped = _python(run, "--help", core_only=True, tmp_path=tmp_path)
    assert helped.returncode == 0 and "quickstart" in helped.stdout, helped.stderr
    demo = _python(run, "demo", core_only=True, tmp_path=tmp_path)
    assert demo.returncode == 0 and "turn-wise credit" in demo.stdout, demo.stderr


def test_no_source_file_points_outside_the_repository():
    pattern = re.compile(r"\.\./shared|spec §|at2po-spec|design/")
    offenders = [str(p.relative_to(ROOT)) for p in SRC.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_docstrings_point_to_docs_that_exist():
    cited = {m.group(1) for p in SRC.rglob("*.py") for m in re.finditer(r"docs/([\w.-]+\.md)", p.read_text())}
    assert cited, "no docstring cites docs/"
    assert all((ROOT / "docs" / name).is_file() for name in cited), cited
