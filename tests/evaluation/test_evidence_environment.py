"""The environment record each sweep run carries, and the fingerprint the tables pair runs by."""

from importlib import metadata

import torch

from at2po.evidence.environment import FINGERPRINT_FIELDS, environment, fingerprint, requirement_closure


def test_the_closure_holds_what_the_trainer_imports_and_not_the_tools_beside_it():
    closure = requirement_closure()
    assert {"at2po", "torch", "numpy", "transformers", "tokenizers", "accelerate", "safetensors"} <= set(closure)
    # The installed distribution's version: PyPI's CUDA wheels report torch.__version__ with a
    # local tag (2.4.0+cu121) that their metadata (2.4.0) lacks.
    assert closure["torch"] == metadata.version("torch")
    assert "pytest" not in closure and "mutmut" not in closure  # test extras and tools are not the trainer's
    assert set(requirement_closure(extras=())) < set(closure)  # without [train]: no accelerate
    assert "accelerate" not in requirement_closure(extras=())


def test_the_fingerprint_changes_with_what_changes_numbers_and_only_that():
    env = environment()
    assert env["fingerprint"] == fingerprint(env)
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for field, other in [("packages", {**env["packages"], "numpy": "0.0.1"}), ("torch_threads", env["torch_threads"] + 1),
                         ("torch_cpu_capability", "AVX2" if env["torch_cpu_capability"] != "AVX2" else "AVX512"),
                         ("cpu_model", "another CPU"), ("cpu_isa", [*env["cpu_isa"], "amx_tile"]), ("python", "3.0.0")]:
        assert field in FINGERPRINT_FIELDS
        assert fingerprint({**env, field: other}) != env["fingerprint"], field
    # The package's own source, the kernel build string and the core count are recorded, not fingerprinted.
    for field in ("at2po_source", "platform", "cpus"):
        assert fingerprint({**env, field: "x"}) == env["fingerprint"], field


def test_an_incomplete_record_cannot_be_fingerprinted():
    import pytest

    with pytest.raises(ValueError, match="packages"):
        fingerprint({f: 1 for f in FINGERPRINT_FIELDS if f != "packages"})
