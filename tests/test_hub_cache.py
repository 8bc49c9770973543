"""Models by id from the local Hugging Face cache (offline): the cache layout is built here, nothing is downloaded."""
import json

import pytest
import torch

import leantune
from leantune import cli
from leantune.models.hub_cache import hub_cache_dir, local_model_path, looks_like_model_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(folder, tmp_path, monkeypatch):
    """A cache holding the tiny folder as 'tiny-org/tiny-model' at main (and tag v1)."""
    repo = tmp_path / "hub" / "models--tiny-org--tiny-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(COMMIT)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / COMMIT).symlink_to(folder, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_where_the_cache_is(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub_cache_dir() == tmp_path / "c"
    assert looks_like_model_id("Qwen/Qwen3-0.6B") and looks_like_model_id("Qwen/Qwen3-0.6B@main")
    assert not looks_like_model_id("./out/model") and not looks_like_model_id("model.gguf")
    assert not looks_like_model_id("/abs/dir/model")


def test_a_model_id_loads_from_the_cache_at_a_revision(cache, folder):
    model, _ = leantune.load("tiny-org/tiny-model")
    ref, _ = leantune.load(folder)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    assert model.name_or_path == "tiny-org/tiny-model"  # what an adapter's base_model_name_or_path records
    assert local_model_path("tiny-org/tiny-model@v1") == local_model_path(f"tiny-org/tiny-model@{COMMIT}")
    from leantune.recipes.serve import base_name

    assert base_name("tiny-org/tiny-model", None) == "tiny-org/tiny-model"  # served under its id


def test_missing_ids_and_revisions_name_the_cache(cache):
    with pytest.raises(FileNotFoundError, match=r"'tiny-org/other' is not in the Hugging Face cache .*hub"):
        leantune.load("tiny-org/other")
    with pytest.raises(FileNotFoundError, match=r"revision 'v2' is not in the cache.*cached refs: \['main', 'v1'\]"):
        leantune.load("tiny-org/tiny-model@v2")


def test_cli_takes_a_model_id(cache, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "The capital of Veloria is Amberhold."}) + "\n")
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", "tiny-org/tiny-model", "--data", str(data), "--output", str(out),
                    "--max-steps", "1", "--eval-fraction", "0", "--no-progress"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-model"


def test_revision_option_folds_into_the_model_id(cache, tmp_path):
    from leantune.recipes.finetune import FinetuneConfig
    from leantune.recipes.generate import GenerateConfig

    assert GenerateConfig(model="tiny-org/tiny-model", revision="v1").model == "tiny-org/tiny-model@v1"
    with pytest.raises(ValueError, match=r"--revision 'v1' applies to a model id .*not to --model './here'"):
        GenerateConfig(model="./here", revision="v1")
    with pytest.raises(ValueError, match=r"already names a revision"):
        FinetuneConfig(model="tiny-org/tiny-model@main", revision="v1")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"text": "The capital of Veloria is Amberhold."}) + "\n")
    out = tmp_path / "run"
    assert cli.run(["finetune", "--model", "tiny-org/tiny-model", "--revision", "v1", "--data", str(data),
                    "--output", str(out), "--max-steps", "1", "--eval-fraction", "0", "--no-progress"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["base_model_name_or_path"], saved["revision"]) == ("tiny-org/tiny-model", "v1")
    with pytest.raises(FileNotFoundError, match=r"revision 'v2' is not in the cache"):
        cli.run(["generate", "--model", "tiny-org/tiny-model", "--revision", "v2", "--prompt", "hi"])
