"""A tiny random GQA Llama with a locally built tokenizer, for the vLLM tests (no downloads).

Not a test module: ``test_vllm_*`` files import it. Token ``t{i}`` is id ``i + 3`` (ids 0-2 are
``<pad>``, ``<s>``, ``</s>``), and text is whitespace-split, so a prompt written as text tokenizes
to exactly the ids it was written from: contexts compiled from ids match served text prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<pad>", "<s>", "</s>")
TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=512,
    max_position_embeddings=32768,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def save_tiny_llama(path, seed: int = 0, **overrides):
    """Write a random fp32 Llama (``TINY`` + ``overrides``) and its tokenizer to ``path``.

    Returns the model (eval mode, fp32), for compiling contexts with ``squeeze.compile``.
    """
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    fields = {**TINY, **overrides}
    config = transformers.LlamaConfig(**fields)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i + len(SPECIALS) for i in range(fields["vocab_size"] - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(path)
    return model


def random_ids(gen: torch.Generator, n: int, vocab: int = TINY["vocab_size"]) -> list[int]:
    """``n`` token ids in ``[3, vocab)``: never a special token."""
    return torch.randint(len(SPECIALS), vocab, (n,), generator=gen).tolist()


def to_text(ids: list[int]) -> str:
    """The prompt text that tokenizes back to ``ids`` (each id a word, separated by spaces)."""
    return " ".join(f"t{i - len(SPECIALS)}" for i in ids)
