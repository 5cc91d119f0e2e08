"""Tokenizers with the chat templates of model families, built locally: ChatML as
Qwen2.5 writes it (a default system message, ``<|im_end|>\\n`` after every message),
Llama-3 (a BOS token, header tokens, content trimmed, ``<|eot_id|>`` with no separator),
Phi-3 and Phi-3.5 (a last assistant message closed with ``<|end|>\\n`` and the end-of-text
token, a continued one with ``<|end|>\\n`` only), and Mistral v0.3 and Nemo (no system
role: the system text goes into the *last* user message; the tool-call branches of
their templates are left out)."""

from __future__ import annotations

from grpo_lab.envs import FrozenLakeEnv
from grpo_lab.modeling import train_tokenizer
from grpo_lab.rollout.demonstrations import format_demonstrations

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
PHI3 = (  # microsoft/Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI35 = PHI3.replace("message['role'] == 'system' %}", "message['role'] == 'system' and message['content'] %}")
MISTRAL_V3 = (  # mistralai/Mistral-7B-Instruct-v0.3, without its tool branches
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
MISTRAL_NEMO = (  # mistralai/Mistral-Nemo-Instruct-2407, without its tool branches
    MISTRAL_V3.replace("'[INST] '", "'[INST]'").replace("{{- ' ' + message['content'] + eos_token }}",
                                                        "{{- message['content'] + eos_token }}")
)
# Qwen2.5's tool calling, as its template writes it: the tools' JSON schemas in the system
# message, an assistant's calls as <tool_call> blocks, consecutive tool results in one
# user turn as <tool_response> blocks
QWEN25_TOOLS = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}"
    "{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
PHI_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]
MISTRAL_TOKENS = ["<s>", "</s>", "[INST]", "[/INST]"]
TEMPLATES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "qwen3": (QWEN3_LIKE, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}),
    "qwen2.5_tools": (QWEN25_TOOLS, ["<|im_start|>", "<|im_end|>"], {"eos_token": "<|im_end|>"}),
    "phi3": (PHI3, PHI_TOKENS, {"eos_token": "<|endoftext|>"}),
    "phi3.5": (PHI35, PHI_TOKENS, {"eos_token": "<|endoftext|>"}),
    "mistral_v3": (MISTRAL_V3, MISTRAL_TOKENS, {"bos_token": "<s>", "eos_token": "</s>"}),
    "mistral_nemo": (MISTRAL_NEMO, MISTRAL_TOKENS, {"bos_token": "<s>", "eos_token": "</s>"}),
}
#: the token a model of each family samples to end its turn, and what its answers start
#: with after the generation prompt (Mistral v0.3's template puts a space there)
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "qwen3": "<|im_end|>", "qwen2.5_tools": "<|im_end|>",
               "phi3": "<|end|>",
               "phi3.5": "<|end|>", "mistral_v3": "</s>", "mistral_nemo": "</s>"}
ANSWER_PREFIX = {"mistral_v3": " "}


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
