"""Tokenizers with the chat templates of two model families, built locally: ChatML as
Qwen2.5 writes it (a default system message, ``<|im_end|>\\n`` after every message) and
Llama-3 (a BOS token, header tokens, content trimmed, ``<|eot_id|>`` with no separator)."""

from __future__ import annotations

from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.modeling import train_tokenizer
from grpo_lab.training.warmup import format_demonstrations

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA3 = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Qwen3's rule: an assistant message after the last user message shows an (empty)
# reasoning block; earlier ones do not, so a new turn re-renders the one before it
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEMPLATES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen3": (QWEN3_LIKE, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}),
}


def chat_tokenizer(kind: str):
    """A byte-level BPE tokenizer trained on FrozenLake prompts, with the special tokens and
    chat template of ``kind`` (:data:`TEMPLATES`); its EOS is the template's end of turn."""
    template, specials, roles = TEMPLATES[kind]
    pairs = format_demonstrations(lambda: FrozenLakeEnv(), 60, 8, 1, seed=0)
    tok = train_tokenizer([p + " " + a for p, a in pairs] + ["system user assistant You are a helpful assistant."],
                          vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": specials, **roles})
    tok.chat_template = template
    return tok
