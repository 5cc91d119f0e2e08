"""Models and tokenizers: a real checkpoint by name or path, or a tiny one built locally.

The tiny model is a random-weight decoder built from a ``transformers`` config, with a
byte-level BPE tokenizer trained on text the environment generates, so a run needs no
model hub.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

EOS, PAD = "<|endoftext|>", "<|pad|>"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def text_config(model: torch.nn.Module):
    """The language model's config: ``model.config``, or its text config for multimodal models."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in evaluation mode with gradients off (in place; returns it)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (any text round-trips: the 256
    byte symbols are always in the vocabulary), in Qwen2's pipeline: NFC, Qwen2's
    pre-tokenizer (digits one by one), byte-level symbols.

    Qwen2's pipeline because ``AutoTokenizer`` loads a directory whose ``config.json``
    says ``qwen2`` (the tiny model's default family) as ``Qwen2Tokenizer`` whatever class
    the tokenizer was saved as, and rebuilds that class's own pre-tokenizer around the
    saved vocabulary: a tokenizer with another pipeline would come back tokenizing
    differently (``" 12"`` one token in memory, three after the reload). This one is a
    ``Qwen2Tokenizer`` already, so what the run saves reloads to the same ids, under
    every tiny family.
    """
    from transformers import Qwen2TokenizerFast  # Qwen2Tokenizer itself in transformers 5

    base = Qwen2TokenizerFast(eos_token=EOS, pad_token=PAD, unk_token=None)
    return base.train_new_from_iterator(corpus, vocab_size=vocab_size)


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    architecture: str = "qwen2",
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 512,
    max_position_embeddings: int = 2048,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised decoder-only model of the given ``transformers`` family."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {num_kv_heads}")
    config = AutoConfig.for_model(
        architecture,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def load_pretrained(name_or_path: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM and its tokenizer from the hub or a local directory."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model, tokenizer
