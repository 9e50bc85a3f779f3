"""A byte-level tokenizer with a chat template for the LongBench tests (no downloads).

Not a test module by itself: the other ``test_longbench_*`` files import it.
"""

from __future__ import annotations

CHAT = "{{ bos_token }}<|user|>{{ messages[0]['content'] }}<|assistant|>"


def byte_tokenizer():
    """A byte-level tokenizer with no merges: ids 0-2 are <pad>, <s>, </s>, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT
    return fast
