"""The rollout engine (``grpo_lab.rollout``): backends, the multi-turn agent loop, and
its schedulers."""

from .agent_loop import AgentLoopConfig, request_seed_of, run_episodes
from .backend import Backend, BatchStream, Completion, RequestStream, SamplingParams, StreamStats
from .backends.hf import HFBackend
from .prompts import PromptEncoder, Turn, format_action, parse_action, render_prompt
from .scheduler import LengthPredictor, ScheduleStats, SchedulerConfig, run_scheduled

__all__ = [
    "AgentLoopConfig",
    "Backend",
    "BatchStream",
    "Completion",
    "HFBackend",
    "LengthPredictor",
    "PromptEncoder",
    "RequestStream",
    "SamplingParams",
    "ScheduleStats",
    "SchedulerConfig",
    "StreamStats",
    "Turn",
    "format_action",
    "parse_action",
    "render_prompt",
    "request_seed_of",
    "run_episodes",
    "run_scheduled",
]
