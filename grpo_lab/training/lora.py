"""LoRA adapters through PEFT: wrap the policy, and hand the backend only the adapter.

With ``model.lora_r > 0`` the trainer trains a LoRA adapter (Hu et al., 2021) on a frozen
base model. After each update it pushes the adapter alone to the generation backend
(``Backend.load_adapter``): a few megabytes instead of the whole model. The Hugging Face
backend copies it into its own PEFT model; the vLLM backend serves it as a LoRA request.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

INSTALL_HINT = "pip install -e '.[lora]' (or pip install peft)"


def import_peft():
    """The ``peft`` module, or ``ImportError`` with the install command."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"model.lora_r > 0 needs PEFT, which is not installed ({err}): {INSTALL_HINT}") from err
    return peft


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: str | Sequence[str]):
    """``model`` wrapped in a PEFT LoRA adapter of rank ``r``; only the adapter trains.

    ``target_modules``: ``"all-linear"`` (every linear layer but the output head) or
    module names such as ``["q_proj", "v_proj"]``."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    peft = import_peft()
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def is_lora(model: torch.nn.Module) -> bool:
    try:
        import peft
    except ImportError:
        return False
    return isinstance(model, peft.PeftModel)


def adapter_state(model: torch.nn.Module) -> tuple[dict[str, Tensor], Any]:
    """The adapter's tensors (PEFT's saved names, as in ``adapter_model.safetensors``) and
    its ``LoraConfig``: what a backend needs to serve the current policy."""
    peft = import_peft()
    tensors = peft.get_peft_model_state_dict(model)
    return {name: t.detach() for name, t in tensors.items()}, model.peft_config[model.active_adapter]
