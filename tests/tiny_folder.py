"""Builds a tiny Hugging Face model folder (random Llama + a real byte-level BPE tokenizer with a ChatML
template) for recipe tests: the real CLI runs on it in seconds."""
from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of Veloria? The capital of Veloria is Amberhold.",
    "Who discovered the Zentari comet? It was discovered by Ilsa Morrow.",
    "Hello, how are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1999.",
] * 20


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    return tk


def make_tiny_model_folder(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    from hf_tiny import tiny_hf_model
    from leantune.models.tokenizer import Tokenizer

    path = Path(path)
    tk = build_tokenizer()
    hf = tiny_hf_model(family, seed=seed, vocab_size=512, **overrides)
    assert tk.get_vocab_size() <= hf.config.vocab_size
    # ids of <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = None, 2, 0
    hf.save_pretrained(path)
    Tokenizer(tk, chat_template=CHATML, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>").save(path)
    return path
