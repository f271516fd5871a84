"""A byte-level tokenizer built in code with the ``tokenizers`` library: no download, any text.

The tiny twins use it in place of the hub tokenizers (SmolVLM2's, PaliGemma's): one token per UTF-8
byte (no merges), plus the special tokens a model's code looks up by name. Built from constants only,
so the same folder comes out on every machine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PAD = "<pad>"
EOS = "<eos>"
BOS = "<bos>"


def byte_tokenizer(special_tokens: Sequence[str] = (), named_tokens: Mapping[str, str] | None = None) -> Any:
    """A ``PreTrainedTokenizerFast``: ``<pad>``, ``<eos>``, ``<bos>``, ``special_tokens``, 256 bytes.

    ``named_tokens`` become attributes (``tokenizer.<name>`` and ``tokenizer.<name>_id``), as the hub
    tokenizers' ``extra_special_tokens`` do (SmolVLA reads ``fake_image_token_id`` that way).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, BOS, *special_tokens]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        extra_special_tokens=dict(named_tokens or {}),
    )


def write_tokenizer(folder: Path, special_tokens: Sequence[str] = ()) -> Path:
    """Save :func:`byte_tokenizer` into ``folder`` (``AutoTokenizer.from_pretrained(folder)`` loads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_tokenizer(special_tokens).save_pretrained(str(folder))
    return folder
