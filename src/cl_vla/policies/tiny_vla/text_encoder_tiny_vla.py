"""TinyVLA's instruction encoders (:mod:`cl_vla.policies.tiny_vla.modeling_tiny_vla` uses one).

``HashedTextEncoder`` (the default): words and word bigrams hashed into ``vocab_buckets`` ids
(:class:`HashedTokenizer`, the same ids in every process whatever its string-hash salt), embedded,
one transformer layer, attention-pooled into ``text_dim``. ``FrozenTextEncoder``: a frozen Hugging
Face text encoder read from a local directory, mean-pooled, plus a learned projection to
``text_dim``. :func:`make_text_encoder` picks one from the config.
"""

from __future__ import annotations

import functools
import itertools
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from cl_vla.policies.tiny_vla.configuration_tiny_vla import TinyVLAConfig


class HashedTokenizer:
    """Deterministic, vocabulary-free tokenizer: lowercase words (and word bigrams) hashed into buckets.

    Uses CRC-32 rather than Python's ``hash()``, whose string hashing is salted per process
    (PYTHONHASHSEED): ids must be identical across DataLoader workers, DDP ranks and restarts, or a
    saved checkpoint's embeddings would point at different words. Id 0 is padding, id 1 a CLS token
    that starts every sequence, so even an empty instruction encodes to one valid token.
    """

    PAD_ID = 0
    CLS_ID = 1
    _N_RESERVED = 2
    _WORD_RE = re.compile(r"[^\W_]+")

    def __init__(self, vocab_buckets: int, max_tokens: int, use_bigrams: bool = True, cache_size: int = 4096):
        self.vocab_buckets = vocab_buckets
        self.max_tokens = max_tokens
        self.use_bigrams = use_bigrams
        # Instructions repeat constantly (one per task), so encoding is memoized per string.
        self._encode_cached = functools.lru_cache(maxsize=cache_size)(self._encode)

    def _bucket(self, token: str) -> int:
        return self._N_RESERVED + zlib.crc32(token.encode("utf-8")) % (self.vocab_buckets - self._N_RESERVED)

    def _encode(self, text: str) -> tuple[int, ...]:
        words = self._WORD_RE.findall(text.lower())
        ids = [self.CLS_ID] + [self._bucket("w:" + w) for w in words]
        if self.use_bigrams:
            # Unigrams first, so truncation drops bigrams (the less essential tokens) first.
            ids += [self._bucket(f"b:{a} {b}") for a, b in itertools.pairwise(words)]
        return tuple(ids[: self.max_tokens])

    def encode(self, text: str) -> tuple[int, ...]:
        """Token ids of one instruction (CLS first, at most ``max_tokens``)."""
        return self._encode_cached(text)

    def encode_batch(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(ids, valid)``: right-padded ``(N, L)`` int64 ids and a bool mask of real tokens."""
        encoded = [self.encode(t) for t in texts]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), length), self.PAD_ID, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        return ids, ids != self.PAD_ID


class AttentionPool(nn.Module):
    """Learned-query attention pooling over the valid tokens of each sequence."""

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        scores = (tokens @ self.query).masked_fill(~valid, float("-inf"))
        return (scores.softmax(dim=-1).unsqueeze(-1) * tokens).sum(dim=1)


class HashedTextEncoder(nn.Module):
    """Hashed token embeddings -> small transformer encoder -> attention pooling -> instruction vector."""

    def __init__(self, config: TinyVLAConfig):
        super().__init__()
        d = config.text_dim
        self.tokenizer = HashedTokenizer(
            config.vocab_buckets, config.max_text_tokens, config.use_bigrams, config.tokenizer_cache_size
        )
        self.token_embedding = nn.Embedding(config.vocab_buckets, d, padding_idx=HashedTokenizer.PAD_ID)
        self.position_embedding = nn.Parameter(torch.randn(config.max_text_tokens, d) * 0.02)
        self.encoder = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d,
                    config.text_heads,
                    dim_feedforward=2 * d,
                    dropout=0.0,
                    batch_first=True,
                    norm_first=True,
                ),
                num_layers=config.text_layers,
                enable_nested_tensor=False,
            )
            if config.text_layers > 0
            else None
        )
        self.pool = AttentionPool(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, texts: Sequence[str]) -> Tensor:
        # A batch holds a handful of distinct instructions: encode each once, then gather per sample.
        unique = list(dict.fromkeys(texts))
        device = self.token_embedding.weight.device
        ids, valid = self.tokenizer.encode_batch(unique)
        ids, valid = ids.to(device), valid.to(device)
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=~valid)
        encoded = self.norm(self.pool(x, valid))
        if len(unique) == len(texts):
            return encoded
        row = {text: i for i, text in enumerate(unique)}
        return encoded[torch.tensor([row[t] for t in texts], device=device)]


class FrozenTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder read only from a local directory, plus a learned projection.

    The frozen network is kept out of the state dict (it is not ours to checkpoint: the config names its
    path) and its mean-pooled embedding of each instruction is cached, since it never changes.
    """

    def __init__(self, config: TinyVLAConfig):
        super().__init__()
        path = Path(config.frozen_text_encoder_path or "")
        if not path.is_dir():
            raise ValueError(f"The frozen text encoder directory '{path}' does not exist.")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ValueError(
                f"text_encoder='frozen:{path}' needs the 'transformers' package, which is not installed."
            ) from e
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True).eval().requires_grad_(False)
        # object.__setattr__ bypasses nn.Module registration: no state dict entry, no .to() / optimizer.
        object.__setattr__(self, "_hf_tokenizer", tokenizer)
        object.__setattr__(self, "_hf_model", model)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._cache_size = config.tokenizer_cache_size
        self.proj = nn.Linear(model.config.hidden_size, config.text_dim)
        self.norm = nn.LayerNorm(config.text_dim)

    @torch.no_grad()
    def _embed(self, text: str) -> Tensor:
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        inputs = self._hf_tokenizer(text, return_tensors="pt", truncation=True)
        hidden = self._hf_model(**inputs).last_hidden_state[0]
        mask = inputs["attention_mask"][0].unsqueeze(-1).to(hidden.dtype)
        vector = (hidden * mask).sum(0) / mask.sum().clamp_min(1)
        self._cache[text] = vector
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return vector

    def forward(self, texts: Sequence[str]) -> Tensor:
        vectors = torch.stack([self._embed(t) for t in texts]).to(self.proj.weight.device)
        return self.norm(self.proj(vectors))


def make_text_encoder(config: TinyVLAConfig) -> nn.Module:
    """The instruction encoder named by ``config.text_encoder``."""
    if config.frozen_text_encoder_path is not None:
        return FrozenTextEncoder(config)
    return HashedTextEncoder(config)


__all__ = ["AttentionPool", "FrozenTextEncoder", "HashedTextEncoder", "HashedTokenizer", "make_text_encoder"]
