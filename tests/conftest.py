"""Test-wide settings: nothing may be fetched from a hub; each test session gets its own HF cache."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="dsvlm-test-hf-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
# On a loaded 2-core machine torch's spinning OpenMP threads slow small ops down 100x; let them sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """`make test` runs two xdist workers with `--dist loadgroup`: each module's tests stay on one worker, so a
    module-scoped fixture (a trained run, a prepared dataset) is built once. The documented-commands snippets,
    the longest module, spread over both workers; their workspace is built once and shared (see that module)."""
    for item in items:
        if item.module.__name__ != "test_documented_commands":
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny run with stage `align` finished (tests/fixtures_runs.py), shared read-only by the tests that need one."""
    from fixtures_runs import train_tiny_run

    return train_tiny_run(tmp_path_factory.mktemp("shared-run"))


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory):
    """A tiny LLaVA trained a little (tests/tiny_llava.py), shared by the evaluation tests."""
    from tiny_llava import train_tiny_llava

    return train_tiny_llava(tmp_path_factory.mktemp("trained") / "model")


@pytest.fixture
def model_shaped_dir(tmp_path):
    """Passes `resolve_model`'s file checks but cannot load: an error found before loading must come first."""
    import json

    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    for name in ("model.safetensors", "processor_config.json", "tokenizer.json"):
        (path / name).write_text("{}")
    return path
