"""Character-level tokenizer for the tiny zoo, built in code (no hub download).

Every character is one token. The post-processor prepends ``<bos>`` so that any
caller that tokenizes with ``add_special_tokens=True`` (lm-eval, ``generate``)
sees the same input the models were trained on.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
#: Every character the skills use. Order fixes the token ids: never reorder, only append.
CHARS: str = string.digits + string.ascii_lowercase + " ="


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the zoo's char-level tokenizer (ids: specials 0-3, then ``CHARS``)."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
