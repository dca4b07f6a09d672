"""A tiny chat model for tests and benchmarks: a random tiny checkpoint with a real byte-level BPE tokenizer and
a ChatML chat template, so text, chat templates, stop strings and eos all run as with a real model."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

from hivegen.model.tiny import make_tiny_checkpoint

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "A GPU-sharing network serves transformer blocks to clients who stream hidden states through them.",
    "Credits pay the nodes; the store replays what was already generated.",
    "Once upon a time, in a land far away, there lived a small model with a large vocabulary of bytes.",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' \"",
]


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of about `vocab_size` tokens on a fixed corpus and save it (with the ChatML
    template) to `path`. Deterministic: the same files every time."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def make_tiny_chat_model(path: str | Path, arch: str = "llama", num_layers: int = 4, seed: int = 0) -> Path:
    """A random tiny `arch` checkpoint at `path` whose vocabulary is the tiny tokenizer's, with `<|im_end|>` as
    its eos token, ready for `hivegen api serve --model PATH`."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_tokenizer(out)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    make_tiny_checkpoint(
        arch, out, num_layers=num_layers, seed=seed, vocab_size=len(tokenizer), eos_token_id=eos, pad_token_id=pad,
        bos_token_id=None,
    )  # fmt: skip
    GenerationConfig(eos_token_id=eos, pad_token_id=pad).save_pretrained(out)
    return out
