"""Typed configuration: one dataclass per Hydra group, validated when built.

Hydra merges ``configs/*.yaml`` into these schemas (a key that is not a field, or a
value of the wrong type, stops the run with a message naming it); ``Config.validate``
checks values (ranges, names) and raises :class:`ConfigError` naming the bad one.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .envs import env_names, get_env_factory
from .envs.base import role_instructions_of
from .errors import ConfigError
from .modeling import DTYPES
from .paths import looks_like_local_path
from .rollout.adaptive import AdaptiveConfig
from .rollout.r3 import R3Config
from .rollout.backends import BACKENDS
from .rollout.formats import EPISODE_FORMATS
from .rollout.tree import TreeSamplerConfig
from .advantages import AdvantagePipeline
from .advantages.shaping import PENALTY_PLACEMENTS, default_penalty_placement
from .training.coefficients import KL_CONTROLLERS, AdaptiveEntropy
from .training.kl_reward import KLInReward
from .training.packing import PACKINGS, packing_name
from .endpoint.tools import TOOL_PARSERS  # also registers env=agent
from .losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, RATIO_LEVELS, RATIO_LEVELS_OF_ROWS, Objective


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


@dataclass
class AlgoConfig:
    """The advantage estimator (with its hyper-parameters), modifiers, and the policy loss.

    ``params`` are the estimator's keyword arguments (the YAML of each ``algo/`` option
    lists them all; a dict here must not carry keys of another estimator) and ``modifier_params[name]`` those
    of each modifier; ``python -m grpo_lab.advantages --list`` shows what each accepts.
    ``drop_zero_std_groups`` removes from the update the groups whose advantages are all
    zero, as the estimator computed them (DAPO's dynamic sampling, without refill).

    ``invalid_action_penalty`` lands as ``penalty_placement`` says
    (:mod:`grpo_lab.advantages.shaping`): ``row`` (verl-agent's; each row pays on its own
    episode score and step return) or ``episode`` (subtracted from the step reward, so
    the whole episode's return pays). ``None`` takes the estimator's: ``row``, except
    ``episode`` for ``tree_grpo``, which cannot take a row penalty.

    ``clip_low``, ``clip_high`` and ``loss_agg`` left ``None`` take the ratio level's
    defaults: 0.2, 0.28 and ``token-mean`` for token ratios (PPO with DAPO's clip-higher);
    3e-4, 4e-4 and ``seq-mean-token-mean`` for ``ratio_level=sequence`` (GSPO, whose
    length-normalised sequence ratio stays within about 1e-3 of 1, and whose objective is
    a mean over sequences). With one optimizer pass per batch every ratio is 1 at the
    update (the sampler's log-probs are not the ratio's denominator), so the clip ranges
    only act from the second pass on (``trainer.epochs_per_batch`` or
    ``minibatches_per_epoch`` > 1).

    ``kl_estimator`` as a loss (``kl_coef > 0``; Schulman 2020's estimators of
    KL(policy || reference) on the policy's samples, differentiated through the
    log-probs): ``k1``'s gradient is zero in expectation (it only adds noise), ``k2``'s is
    the gradient of KL(policy || reference), and ``k3``'s (the default, as in GRPO and
    verl) is the gradient of the *forward* KL(reference || policy).

    ``loss_agg``: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum`` or
    ``seq-mean-token-sum-norm`` (:func:`~grpo_lab.losses.aggregate`). The last
    equals TRL's ``dr_grpo`` exactly and differs from verl's option of the same name by a
    factor of the number of sequences (verl divides the token sum by the maximum length
    only).

    ``entropy_coef`` > 0 adds ``-entropy_coef`` times the entropy of the policy to the
    loss, which rewards keeping the distribution broad; it is aggregated like the policy
    loss (``loss_agg``), where TRL always averages it over tokens. ``off_policy_is_cap`` truncates the importance weight
    ``pi_old / pi_behaviour`` of rows an earlier policy sampled (AR3PO's reused episodes
    with ``reuse_mode=off_policy``).

    Modifiers of the loss, each in its own module: ``off_policy_mask_threshold`` and the
    rollout correction (:mod:`grpo_lab.losses.rollout_correction`), ``kl_bias_correction``
    (:func:`~grpo_lab.losses.bias_corrected_kl`), ``top_entropy_quantile``
    (:mod:`grpo_lab.losses.token_selection`), ``mask_truncated_completions`` (rows that hit
    the token budget keep their reward in their group and train nothing),
    ``entropy_target`` (:class:`~grpo_lab.training.coefficients.AdaptiveEntropy`), and KL
    in the reward, ``kl_reward_coef`` with its controller
    (:mod:`grpo_lab.training.kl_reward`). ``loss_params`` are the policy loss's own
    parameters (``python -m grpo_lab --list`` shows each loss's).
    """

    estimator: str = "grpo"
    params: Dict[str, Any] = field(default_factory=dict)  # empty: the estimator's own defaults
    modifiers: List[str] = field(default_factory=list)
    modifier_params: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {"focal": {"gamma": 1.0}})
    drop_zero_std_groups: bool = False
    group_size: int = 8
    invalid_action_penalty: float = 0.1
    penalty_placement: Optional[str] = None  # row | episode; None: row (episode for tree_grpo)
    policy_loss: str = "ppo_clip"  # ppo_clip | reinforce (no ratio, strictly on-policy) | ... (--list)
    loss_params: Dict[str, Any] = field(default_factory=dict)  # the policy loss's own parameters (SAPO's tau_pos, ...)
    clip_low: Optional[float] = None  # None: 0.2 (token ratio), 3e-4 (sequence ratio, GSPO)
    clip_high: Optional[float] = None  # None: 0.28 (token ratio), 4e-4 (sequence ratio, GSPO)
    dual_clip_c: Optional[float] = None  # > 1 enables dual-clip PPO
    ratio_level: str = "token"  # token | sequence (GSPO)
    loss_agg: Optional[str] = None  # None: token-mean (token ratio), seq-mean-token-mean (GSPO)
    kl_coef: float = 0.0  # > 0 loads a frozen reference (the policy at the start of RL)
    kl_estimator: str = "k3"  # k1 | k2 | k3 (see the class docstring for their gradients)
    tis_cap: Optional[float] = None  # truncated importance sampling cap C (e.g. 2.0)
    entropy_coef: float = 0.0  # > 0: entropy bonus
    off_policy_is_cap: float = 2.0  # cap of pi_old / pi_behaviour on rows an earlier policy sampled
    tis_level: str = "token"  # token | sequence | geometric: the ratio tis_cap truncates (grpo_lab.losses.rollout_correction)
    rejection: Optional[str] = None  # token | sequence | geometric: leave out what pi_old / pi_rollout puts off the band
    rejection_upper: float = 2.0  # the band's upper bound (geometric wants ~1.001)
    rejection_lower: Optional[float] = None  # None: 1 / rejection_upper
    off_policy_mask_threshold: Optional[float] = None  # DeepSeek-V3.2: rows with A < 0 and mean KL(rollout||policy) > this leave
    kl_bias_correction: bool = False  # the KL term weighted by pi / pi_old (DeepSeek-V3.2; TRL's use_bias_correction_kl)
    top_entropy_quantile: float = 1.0  # < 1: policy loss on the top-rho entropy tokens only ("Beyond the 80/20 Rule")
    mask_truncated_completions: bool = False  # responses that hit rollout.max_new_tokens train nothing (DAPO, TRL)
    entropy_target: Optional[float] = None  # adaptive entropy coefficient toward this mean token entropy (Skywork-OR1)
    entropy_coef_step: float = 0.005  # its step per update (Skywork-OR1's Delta)
    kl_reward_coef: float = 0.0  # > 0: beta * KL(policy_old || reference) leaves each row's reward (verl's use_kl_in_reward)
    kl_reward_controller: str = "fixed"  # fixed | adaptive (toward kl_target over kl_horizon responses)
    kl_reward_estimator: str = "k1"  # the per-token estimate summed into the reward (verl's in-reward default: k1)
    kl_target: float = 0.1
    kl_horizon: float = 10000.0

    #: the defaults of ``clip_low``, ``clip_high`` and ``loss_agg`` per ratio level
    LOSS_DEFAULTS = {"token": (0.2, 0.28, "token-mean"), "sequence": (3e-4, 4e-4, "seq-mean-token-mean")}

    def loss_settings(self) -> tuple[float, float, str]:
        """``(clip_low, clip_high, loss_agg)`` with the ratio level's defaults for the unset ones."""
        low, high, agg = self.LOSS_DEFAULTS.get(self.ratio_level, self.LOSS_DEFAULTS["token"])
        return (low if self.clip_low is None else self.clip_low, high if self.clip_high is None else self.clip_high,
                agg if self.loss_agg is None else self.loss_agg)

    def objective(self) -> Objective:
        """The loss settings with every name resolved (``policy_loss``, ``loss_agg``,
        ``kl_estimator``) and the ratio level's defaults for the unset ones."""
        clip_low, clip_high, agg = self.loss_settings()
        try:
            policy_loss = POLICY_LOSSES.get(self.policy_loss)
            return Objective(policy_loss=policy_loss, aggregation=AGGREGATIONS.get(agg),
                             clip_low=clip_low, clip_high=clip_high, dual_clip_c=self.dual_clip_c,
                             ratio_level=self.ratio_level, kl_coef=self.kl_coef,
                             kl_estimator=KL_ESTIMATORS.get(self.kl_estimator), entropy_coef=self.entropy_coef,
                             tis_cap=self.tis_cap, off_policy_is_cap=self.off_policy_is_cap,
                             tis_level=RATIO_LEVELS_OF_ROWS.get(self.tis_level),
                             rejection=None if self.rejection is None else RATIO_LEVELS_OF_ROWS.get(self.rejection),
                             rejection_band=self.rejection_bounds(),
                             loss_params=self.loss_params, kl_bias_correction=self.kl_bias_correction,
                             off_policy_mask_threshold=self.off_policy_mask_threshold,
                             top_entropy_quantile=self.top_entropy_quantile)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"algo: {err}") from None

    @property
    def needs_reference(self) -> bool:
        """A KL term in the loss or in the reward: the run keeps a frozen reference."""
        return self.kl_coef > 0 or self.kl_reward_coef > 0

    def entropy_control(self) -> AdaptiveEntropy | None:
        """The adaptive entropy coefficient (``entropy_target``), or None."""
        return None if self.entropy_target is None else AdaptiveEntropy(self.entropy_target, self.entropy_coef_step)

    def kl_in_reward(self) -> KLInReward | None:
        """The reward's KL penalty (``kl_reward_coef > 0``), every name resolved, or None."""
        if self.kl_reward_coef <= 0:
            return None
        controller = KL_CONTROLLERS.get(self.kl_reward_controller)(self.kl_reward_coef, self.kl_target, self.kl_horizon)
        return KLInReward(controller, KL_ESTIMATORS.get(self.kl_reward_estimator))

    def rejection_bounds(self) -> tuple[float, float]:
        """``(lower, upper)`` of the rejection band (``lower`` defaults to ``1 / upper``)."""
        upper = self.rejection_upper
        return (1.0 / upper if self.rejection_lower is None else self.rejection_lower), upper

    def advantages(self) -> AdvantagePipeline:
        """The estimator and modifiers with every name resolved, and the invalid-action
        penalty placed as ``penalty_placement`` says (or as the estimator's default)."""
        try:
            return AdvantagePipeline.of(self.estimator, self.params, self.modifier_settings(),
                                        self.invalid_action_penalty, self.penalty_placement)
        except KeyError as err:
            raise ConfigError(f"algo: {err.args[0]}") from None

    def modifier_settings(self) -> dict[str, dict[str, Any]]:
        """``{name: params}`` of the active modifiers, in order."""
        return {name: dict(self.modifier_params.get(name, {})) for name in self.modifiers}

    def validate(self) -> None:
        from .advantages import example_inputs, get_estimator, get_modifier, run_estimator

        try:
            get_estimator(self.estimator)
            for name in self.modifiers:
                get_modifier(name)
        except KeyError as err:
            raise ConfigError(f"algo: {err.args[0]}") from None
        try:
            example = run_estimator(example_inputs(), self.estimator, dict(self.params), self.modifier_settings())
        except (TypeError, ValueError) as err:
            raise ConfigError(f"algo.params={dict(self.params)!r} / algo.modifier_params: {err}") from None
        _check(self.group_size >= 2, "algo.group_size", self.group_size, "an integer >= 2 (a group needs a baseline)")
        _check(self.invalid_action_penalty >= 0, "algo.invalid_action_penalty", self.invalid_action_penalty, "a number >= 0")
        if self.penalty_placement is None:
            self.penalty_placement = default_penalty_placement(self.estimator)
        _check(self.penalty_placement in PENALTY_PLACEMENTS, "algo.penalty_placement", self.penalty_placement,
               f"one of {list(PENALTY_PLACEMENTS)}")
        _check(not (self.estimator == "tree_grpo" and self.penalty_placement == "row" and self.invalid_action_penalty > 0),
               "algo.penalty_placement", self.penalty_placement,
               "episode (or null) with estimator tree_grpo (a node's advantage comes from the leaves below it)")
        _check(self.ratio_level in RATIO_LEVELS, "algo.ratio_level", self.ratio_level, f"one of {list(RATIO_LEVELS)}")
        self.clip_low, self.clip_high, self.loss_agg = self.loss_settings()
        _check(0 <= self.clip_low <= 1, "algo.clip_low", self.clip_low, "a number in [0, 1] (1: no lower bound)")
        _check(self.clip_high >= 0, "algo.clip_high", self.clip_high, "a number >= 0")
        _check(self.loss_agg in AGGREGATIONS, "algo.loss_agg", self.loss_agg, f"one of {AGGREGATIONS.names()}")
        _check(self.policy_loss in POLICY_LOSSES, "algo.policy_loss", self.policy_loss, f"one of {POLICY_LOSSES.names()}")
        try:
            POLICY_LOSSES.get(self.policy_loss).settings(self.loss_params)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        _check(self.dual_clip_c is None or self.dual_clip_c > 1, "algo.dual_clip_c", self.dual_clip_c, "null or a number > 1")
        _check(self.kl_coef >= 0, "algo.kl_coef", self.kl_coef, "a number >= 0")
        _check(self.kl_estimator in KL_ESTIMATORS, "algo.kl_estimator", self.kl_estimator, f"one of {KL_ESTIMATORS.names()}")
        _check(self.tis_cap is None or self.tis_cap > 0, "algo.tis_cap", self.tis_cap, "null or a number > 0")
        _check(self.entropy_coef >= 0, "algo.entropy_coef", self.entropy_coef, "a number >= 0")
        _check(self.off_policy_is_cap > 0, "algo.off_policy_is_cap", self.off_policy_is_cap, "a number > 0")
        levels = RATIO_LEVELS_OF_ROWS.names()
        _check(self.tis_level in RATIO_LEVELS_OF_ROWS, "algo.tis_level", self.tis_level, f"one of {levels}")
        _check(self.rejection is None or self.rejection in RATIO_LEVELS_OF_ROWS, "algo.rejection", self.rejection,
               f"null or one of {levels}")
        _check(self.rejection_upper >= 1, "algo.rejection_upper", self.rejection_upper, "a number >= 1")
        lower, _ = self.rejection_bounds()
        _check(0 < lower <= 1, "algo.rejection_lower", self.rejection_lower, "null (1 / rejection_upper) or in (0, 1]")
        _check(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold >= 0,
               "algo.off_policy_mask_threshold", self.off_policy_mask_threshold, "null or a number >= 0 (e.g. 0.5)")
        _check(0 <= self.top_entropy_quantile <= 1, "algo.top_entropy_quantile", self.top_entropy_quantile,
               "a share of tokens in [0, 1] (1 keeps all; the paper's 0.2)")
        _check(self.entropy_target is None or self.entropy_target > 0, "algo.entropy_target", self.entropy_target,
               "null or a mean token entropy > 0 (Skywork-OR1's 0.2)")
        _check(self.entropy_target is None or self.entropy_coef == 0, "algo.entropy_coef", self.entropy_coef,
               "0 with algo.entropy_target set (the adaptive coefficient replaces it)")
        _check(self.entropy_coef_step > 0, "algo.entropy_coef_step", self.entropy_coef_step, "a number > 0")
        _check(self.kl_reward_coef >= 0, "algo.kl_reward_coef", self.kl_reward_coef, "a number >= 0")
        _check(self.kl_reward_controller in KL_CONTROLLERS, "algo.kl_reward_controller", self.kl_reward_controller,
               f"one of {KL_CONTROLLERS.names()}")
        _check(self.kl_reward_estimator in KL_ESTIMATORS, "algo.kl_reward_estimator", self.kl_reward_estimator,
               f"one of {KL_ESTIMATORS.names()}")
        _check(self.policy_loss != "vespo" or self.tis_level == "token", "algo.tis_level", self.tis_level,
               "token with algo.policy_loss=vespo (VESPO folds each token's sampler weight into its sequence ratio)")
        _check(self.kl_target > 0, "algo.kl_target", self.kl_target, "a number > 0")
        _check(self.kl_horizon > 0, "algo.kl_horizon", self.kl_horizon, "a number > 0")
        _check(not self.kl_bias_correction or self.kl_coef > 0, "algo.kl_bias_correction", self.kl_bias_correction,
               "false unless algo.kl_coef > 0 (it corrects the KL term of the loss)")
        _check(not (self.drop_zero_std_groups and self.estimator == "copo"), "algo.drop_zero_std_groups",
               self.drop_zero_std_groups, "false with estimator copo (its global stream trains exactly the groups "
               "whose local advantages are all zero)")
        _check(not example.extras or POLICY_LOSSES.get(self.policy_loss).streams, "algo.policy_loss", self.policy_loss,
               f"a policy loss that reads the estimator's streams {sorted(example.extras)} with estimator "
               f"{self.estimator} (ppo_clip: its blended loss is a clipped loss)")


@dataclass
class EnvConfig:
    """The environment, by name (any name given to :func:`grpo_lab.envs.register_env`),
    with its constructor arguments in ``kwargs``. ``step_timeout_s`` bounds every
    ``reset`` and ``step`` of an environment in a worker process
    (``rollout.env_workers > 0``; in process nothing can interrupt a hung step): the
    worker is replaced and the episode dropped. ``null``: no bound."""

    name: str = "frozenlake"
    max_steps: int = 10
    step_timeout_s: Optional[float] = 60.0
    kwargs: Dict[str, Any] = field(default_factory=dict)  # empty: the environment's own defaults

    def validate(self) -> None:
        _check(self.name in env_names(), "env.name", self.name, f"one of {env_names()} (or a name given to register_env)")
        _check(self.max_steps >= 1, "env.max_steps", self.max_steps, "an integer >= 1")
        _check(self.step_timeout_s is None or self.step_timeout_s > 0, "env.step_timeout_s", self.step_timeout_s,
               "null (no bound) or a number of seconds > 0")


@dataclass
class ModelConfig:
    """``name_or_path`` loads a real model (hub name or local directory); ``null`` builds
    the tiny random-weight model described by the ``tiny_*`` fields and trains a tokenizer
    on environment text."""

    name_or_path: Optional[str] = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    tiny_architecture: str = "qwen2"
    tiny_hidden_size: int = 128
    tiny_num_layers: int = 2
    tiny_num_heads: int = 2
    tiny_num_kv_heads: int = 1
    tiny_intermediate_size: int = 256
    tokenizer_vocab_size: int = 512
    lora_r: int = 0  # > 0: train a LoRA adapter of this rank (PEFT) and push only the adapter
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"  # "all-linear" or a list of module names

    def validate(self) -> None:
        if self.name_or_path is not None:
            check_model_source(str(self.name_or_path))
        _check(self.dtype in DTYPES, "model.dtype", self.dtype, f"one of {sorted(DTYPES)}")
        _check(self.tiny_architecture in ("qwen2", "qwen3", "llama"), "model.tiny_architecture", self.tiny_architecture, "qwen2, qwen3 or llama")
        for key in ("tiny_hidden_size", "tiny_num_layers", "tiny_num_heads", "tiny_num_kv_heads", "tiny_intermediate_size"):
            _check(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), "an integer >= 1")
        _check(self.tiny_hidden_size % self.tiny_num_heads == 0, "model.tiny_num_heads", self.tiny_num_heads, "a divisor of tiny_hidden_size")
        _check(self.tiny_num_heads % self.tiny_num_kv_heads == 0, "model.tiny_num_kv_heads", self.tiny_num_kv_heads, "a divisor of tiny_num_heads")
        _check(self.lora_r >= 0, "model.lora_r", self.lora_r, "an integer >= 0 (0: no LoRA)")
        _check(self.lora_alpha > 0, "model.lora_alpha", self.lora_alpha, "a number > 0")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout", self.lora_dropout, "a number in [0, 1)")
        _check(isinstance(self.lora_target_modules, str) or (
            isinstance(self.lora_target_modules, (list, tuple)) and self.lora_target_modules
            and all(isinstance(m, str) for m in self.lora_target_modules)),
            "model.lora_target_modules", self.lora_target_modules, "'all-linear' or a non-empty list of module names")
        _check(self.tokenizer_vocab_size >= 300, "model.tokenizer_vocab_size", self.tokenizer_vocab_size, "an integer >= 300 (256 byte symbols and merges)")


def check_model_source(name: str) -> None:
    """Refuse a ``model.name_or_path`` that names a local directory that is not there
    (before anything is loaded or downloaded)."""
    path = os.path.expanduser(name)
    _check(bool(name.strip()), "model.name_or_path", name, "a hub model id or a local directory")
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise ConfigError(f"model.name_or_path={name!r} is a file, not a directory: give the directory that holds "
                          "config.json and the weights")
    if looks_like_local_path(name):
        raise ConfigError(f"model.name_or_path={name!r}: the directory {os.path.abspath(path)} does not exist "
                          "(a local model is a directory with config.json; a hub model is 'org/name')")


@dataclass
class RolloutConfig:
    """Generation: the backend and its sampling parameters, the prompt's history window,
    and the scheduler (``grpo_lab.rollout.scheduler``).

    ``sampler``: ``chain`` plays ``algo.group_size`` episodes per task; ``tree`` samples
    trees (``rollout.tree``) for the tree estimators; ``adaptive`` runs AR3PO's stages and
    response reuse (``rollout.adaptive``); ``remax`` adds ReMax's greedy episode per task;
    ``r3`` plays chain groups with R³'s replay, reflection and ranking reward
    (``rollout.r3``, :mod:`grpo_lab.rollout.r3`). ``scheduler`` (chain and adaptive samplers):
    ``full`` plays every episode of a step in lock-step turns (one batch per
    turn); ``micro`` runs rounds of micro-groups of ``micro_group_size`` members in
    ``max_inflight`` slots; ``continuous`` refills a slot as soon as its episode ends.
    ``order`` is the length-aware admission order. ``request_seeds`` gives every request
    its own seed, so episodes do not depend on the schedule.

    ``env_workers``: environments live in this many worker processes, stepped that many
    at a time (while the engine generates, under the micro and continuous schedulers); a
    step past ``env.step_timeout_s`` is abandoned. 0: in this process, one at a time
    (faults that raise are still caught; a hung step hangs the run).
    ``max_env_fault_rate``: the run stops when a step loses more than this fraction of
    its episodes to faults (:mod:`grpo_lab.rollout.faults`) rather than train on the
    episodes that happened to run.

    ``episode_format``: ``memory`` re-renders every turn's prompt from the task, the last
    ``history_window`` turns and the observation (verl-agent); ``conversation`` keeps one
    growing token sequence per episode, the sampled ids as they are and each observation
    appended once (:mod:`grpo_lab.rollout.conversation`), bounded by
    ``max_episode_tokens`` (and the model's context). ``overlong_prompt``, for a prompt
    that does not fit: ``truncate_history`` (memory: show fewer past turns until it
    fits; the episode is dropped when even none is too long), ``end_episode``
    (conversation: the episode ends at its last turn that fitted), ``drop_episode`` or
    ``error``; ``null`` takes the format's first."""

    backend: str = "hf"
    sampler: str = "chain"  # chain | tree | adaptive | remax | r3
    tree: TreeSamplerConfig = field(default_factory=TreeSamplerConfig)  # sampler=tree (Tree-GRPO / TreeRPO)
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)  # sampler=adaptive (AR3PO)
    r3: R3Config = field(default_factory=R3Config)  # sampler=r3 (R³: replay, reflection, ranking reward)
    scheduler: str = "full"  # full | micro | continuous
    micro_group_size: Optional[int] = None  # None: the whole group
    max_inflight: Optional[int] = None  # episode slots; None: every episode of the step
    order: str = "fifo"  # fifo | shortest_first | longest_first
    env_workers: int = 2
    max_env_fault_rate: float = 0.2
    episode_format: str = "memory"  # memory | conversation
    max_episode_tokens: Optional[int] = None  # conversation: tokens of a whole episode (None: the model's context)
    overlong_prompt: Optional[str] = None  # truncate_history (memory) | end_episode (conversation) | drop_episode | error
    request_seeds: bool = False
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    history_window: int = 1
    use_chat_template: str = "auto"  # auto | true | false
    system_prompt: str = ""  # opens every prompt (the chat template's system message, or plain text)
    max_batch_size: int = 64
    vllm_gpu_memory_utilization: float = 0.5
    vllm_max_model_len: Optional[int] = None  # None: the model's context length, at most 8192
    vllm_sleep_mode: bool = False  # GPU only: free the KV cache during updates
    vllm_enforce_eager: bool = True
    vllm_tensor_parallel_size: int = 1  # GPUs one engine spans (single-process runs; see docs/cluster.md)
    engines: int = 0  # engine processes this run starts (python -m grpo_lab.serve, rollout.backend inside); 0: none
    engine_urls: List[str] = field(default_factory=list)  # engines started elsewhere: their /v1 base URLs
    engine_api_key: Optional[str] = None  # the serve.api_key those engines were started with
    engine_timeout_s: float = 600.0  # the longest one call to an engine may take
    max_staleness: int = 1  # trainer.async: a row trains at most this many policy versions after it was sampled
    weight_host: Optional[str] = None  # the address engines reach this trainer at for weight pushes (None:
    # $GRPO_LAB_WEIGHT_HOST, else this machine's address on the route to the first engine)
    partial_rollout: str = "finish"  # at a weight push, generations in flight on the engines: finish (on the old
    # weights, the push waits) | continue (cut short, go on from their last token on the new weights: AReaL) | restart

    #: ``partial_rollout`` values: (whether a push cuts generations short, whether their tokens are kept)
    PARTIAL_ROLLOUTS = {"finish": (False, True), "continue": (True, True), "restart": (True, False)}

    def validate(self) -> None:
        _check(self.backend in BACKENDS, "rollout.backend", self.backend, f"one of {BACKENDS.names()}")
        _check(self.engines >= 0, "rollout.engines", self.engines, "an integer >= 0")
        _check(not (self.engines and self.engine_urls), "rollout.engine_urls", list(self.engine_urls),
               f"empty with rollout.engines={self.engines} (start engines, or connect to running ones, not both)")
        _check(not self.engine_urls or bool(self.engine_api_key), "rollout.engine_api_key", self.engine_api_key,
               "the key the engines at rollout.engine_urls were started with (serve.api_key)")
        _check(self.engine_timeout_s > 0, "rollout.engine_timeout_s", self.engine_timeout_s, "a number of seconds > 0")
        _check(self.max_staleness >= 0, "rollout.max_staleness", self.max_staleness,
               "an integer >= 0 (0: the synchronous run)")
        _check(self.partial_rollout in self.PARTIAL_ROLLOUTS, "rollout.partial_rollout", self.partial_rollout,
               f"one of {list(self.PARTIAL_ROLLOUTS)}")
        _check(self.vllm_tensor_parallel_size >= 1, "rollout.vllm_tensor_parallel_size", self.vllm_tensor_parallel_size,
               "an integer >= 1")
        _check(0 < self.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization",
               self.vllm_gpu_memory_utilization, "a number in (0, 1]")
        _check(self.vllm_max_model_len is None or self.vllm_max_model_len >= 16, "rollout.vllm_max_model_len",
               self.vllm_max_model_len, "null (the model's context length) or an integer >= 16")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "a number > 0 (RL needs sampling)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a number in (0, 1]")
        _check(self.history_window >= 0, "rollout.history_window", self.history_window, "an integer >= 0")
        _check(str(self.use_chat_template).lower() in ("auto", "true", "false"), "rollout.use_chat_template", self.use_chat_template, "auto, true or false")
        _check(self.max_batch_size >= 1, "rollout.max_batch_size", self.max_batch_size, "an integer >= 1")
        from .rollout.samplers import sampler_names

        _check(self.sampler in sampler_names(), "rollout.sampler", self.sampler, f"one of {sampler_names()}")
        for key, section in (("rollout.tree", self.tree), ("rollout.adaptive", self.adaptive), ("rollout.r3", self.r3)):
            try:  # the sampler's own checks (they also run when the section is built)
                section.__post_init__()
            except ValueError as err:
                raise ConfigError(f"{key}: {err}") from None
        _check(self.scheduler in ("full", "micro", "continuous"), "rollout.scheduler", self.scheduler, "full, micro or continuous")
        _check(self.micro_group_size is None or self.micro_group_size >= 1, "rollout.micro_group_size",
               self.micro_group_size, "null or an integer >= 1")
        _check(self.max_inflight is None or self.max_inflight >= 1, "rollout.max_inflight", self.max_inflight,
               "null or an integer >= 1")
        _check(self.order in ("fifo", "shortest_first", "longest_first"), "rollout.order", self.order,
               "fifo, shortest_first or longest_first")
        _check(self.env_workers >= 0, "rollout.env_workers", self.env_workers, "an integer >= 0 (0: in this process)")
        _check(0 <= self.max_env_fault_rate <= 1, "rollout.max_env_fault_rate", self.max_env_fault_rate, "a number in [0, 1]")
        _check(self.episode_format in EPISODE_FORMATS, "rollout.episode_format", self.episode_format,
               f"one of {EPISODE_FORMATS.names()}")
        episode_format = EPISODE_FORMATS.get(self.episode_format)
        allowed = episode_format.overlong
        if self.overlong_prompt is None:
            self.overlong_prompt = allowed[0]
        _check(self.overlong_prompt in allowed, "rollout.overlong_prompt", self.overlong_prompt,
               f"one of {list(allowed)} for rollout.episode_format={self.episode_format}")
        _check(self.max_episode_tokens is None or (episode_format.bounded and self.max_episode_tokens >= 2),
               "rollout.max_episode_tokens", self.max_episode_tokens,
               "null, or an integer >= 2 with rollout.episode_format=conversation")


@dataclass
class WarmupConfig:
    """Supervised warm-up on format-only demonstrations (random legal actions)."""

    steps: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    episodes: int = 400

    def validate(self) -> None:
        _check(self.steps >= 0, "trainer.warmup.steps", self.steps, "an integer >= 0")
        _check(self.batch_size >= 1, "trainer.warmup.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, "trainer.warmup.lr", self.lr, "a number > 0")
        _check(self.episodes >= 1, "trainer.warmup.episodes", self.episodes, "an integer >= 1")


STRATEGIES = ("auto", "ddp", "fsdp")
MIXED_PRECISION = ("auto", "no", "bf16")
LR_SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class TrainerConfig:
    """The RL loop.

    ``resume``: ``true`` continues the run in ``output_dir`` from its newest complete
    checkpoint (and refuses a directory without one); ``auto`` continues it when there
    is one and starts afresh otherwise (a run that died before its first checkpoint
    starts again, its old ``metrics.jsonl`` kept aside); ``false`` refuses a directory
    that holds a run. A resumed run must have the saved run's config, except the keys in
    :attr:`HARMLESS_ON_RESUME` and ``logger.*``; ``resume_allow_changes=true`` accepts
    other changes (a new ``lr`` or ``weight_decay`` is then set in the optimizer)."""

    total_steps: int = 50
    tasks_per_step: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    epochs_per_batch: int = 1
    minibatches_per_epoch: int = 1
    micro_batch_size: int = 64
    micro_batch_tokens: Optional[int] = None  # also cut micro-batches at this many tokens encoded (None: rows only)
    packing: str = "auto"  # auto: per micro-batch the trie or none, whichever costs less | trie: every shared token
    # prefix once (groups, conversation turns, tree branches) | group: each group's common prompt prefix once
    # (Prefix Grouper) | none (true / false: group / none); python -m grpo_lab --list packings
    shared_prefix: Optional[str] = None  # the old name of ``packing``: read, with a warning
    attention: str = "sdpa_shared_prefix"  # sdpa_shared_prefix | triton_shared_prefix (GPU)
    eval_episodes: int = 64  # evaluation tasks (seeds), after the warm-up and at the end
    eval_samples: int = 1  # sampled episodes per evaluation task; > 1 adds pass@k (k = 1, 2, 4, ..., eval_samples)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    save_final: bool = True
    output_dir: Optional[str] = None  # default: Hydra's run directory, or ./outputs
    checkpoint_every: int = 0  # steps between checkpoints (0: none; the final model is saved anyway)
    keep_checkpoints: int = 2  # the newest ones kept
    resume: str = "false"  # false | true | auto (see the class docstring)
    resume_allow_changes: bool = False  # resume even when the config differs from the saved one
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    strategy: str = "auto"  # auto | ddp | fsdp: data parallelism under torchrun / accelerate launch (auto: ddp, or fsdp
    # when the accelerate config says so)
    mixed_precision: str = "auto"  # auto | no | bf16: bf16 compute over fp32 weights (auto: the accelerate config's, else no)
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, one more forward per layer)
    lr_scheduler: str = "constant"  # constant | linear | cosine (over the run's optimizer steps)
    lr_warmup_steps: int = 0  # optimizer steps of linear warm-up from 0 to trainer.lr
    async_rollout: bool = False  # trainer.async on the command line: generation runs ahead of training on the engines,
    # at most rollout.max_staleness policy versions (grpo_lab.training.async_rollout)

    #: keys a resumed run may change without ``resume_allow_changes`` (they change
    #: neither the data nor the updates of the steps to come); ``logger.*`` too
    HARMLESS_ON_RESUME = ("trainer.total_steps", "trainer.checkpoint_every", "trainer.keep_checkpoints",
                          "trainer.resume", "trainer.resume_allow_changes", "trainer.output_dir", "trainer.save_final",
                          "trainer.micro_batch_size", "trainer.micro_batch_tokens",  # the gradient does not depend on them
                          "trainer.packing", "trainer.shared_prefix",  # nor on the packing (exact, up to order)
                          "rollout.env_workers", "env.step_timeout_s", "rollout.max_env_fault_rate",
                          "serve.host", "serve.port", "serve.api_key",
                          "rollout.engine_urls", "rollout.engine_api_key", "rollout.engine_timeout_s",
                          "rollout.weight_host")  # engines move

    #: ``attention`` values and the packed attention's backend each selects
    ATTENTION_BACKENDS = {"sdpa_shared_prefix": "reference", "triton_shared_prefix": "triton"}

    @property
    def attention_backend(self) -> str:
        """The packed attention's backend ``attention`` selects (``reference`` or ``triton``)."""
        return self.ATTENTION_BACKENDS[self.attention]

    def resume_mode(self) -> str:
        """``resume`` as one of ``false``, ``true``, ``auto``."""
        return str(self.resume).lower()

    def validate(self) -> None:
        for key in ("total_steps", "tasks_per_step", "epochs_per_batch", "minibatches_per_epoch", "micro_batch_size"):
            _check(getattr(self, key) >= 1, f"trainer.{key}", getattr(self, key), "an integer >= 1")
        _check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1, "trainer.micro_batch_tokens",
               self.micro_batch_tokens, "null or an integer >= 1")
        _check(self.lr > 0, "trainer.lr", self.lr, "a number > 0")
        _check(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "a number >= 0")
        _check(self.max_grad_norm > 0, "trainer.max_grad_norm", self.max_grad_norm, "a number > 0")
        _check(self.attention in self.ATTENTION_BACKENDS, "trainer.attention", self.attention,
               f"one of {list(self.ATTENTION_BACKENDS)}")
        if self.shared_prefix is not None:  # the old key
            warnings.warn(f"trainer.shared_prefix is now trainer.packing: reading trainer.shared_prefix="
                          f"{self.shared_prefix} as trainer.packing={self.shared_prefix}", FutureWarning, stacklevel=2)
            _check(str(self.packing) in ("auto", str(self.shared_prefix)), "trainer.shared_prefix", self.shared_prefix,
                   f"null, or the same as trainer.packing={self.packing!r} (it is the old name of trainer.packing)")
            self.packing, self.shared_prefix = str(self.shared_prefix), None
        try:
            self.packing = packing_name(self.packing)
        except ValueError:
            _check(False, "trainer.packing", self.packing, f"one of {PACKINGS.names()} (or true / false)")
        _check(self.packing != "none" or self.attention == "sdpa_shared_prefix", "trainer.attention",
               self.attention, "sdpa_shared_prefix when trainer.packing=none (the kernel is the packed forward)")
        _check(self.checkpoint_every >= 0, "trainer.checkpoint_every", self.checkpoint_every, "an integer >= 0 (0: none)")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints", self.keep_checkpoints, "an integer >= 1")
        _check(self.eval_episodes >= 0, "trainer.eval_episodes", self.eval_episodes, "an integer >= 0")
        _check(self.eval_samples >= 1, "trainer.eval_samples", self.eval_samples, "an integer >= 1")
        _check(self.resume_mode() in ("false", "true", "auto"), "trainer.resume", self.resume, "false, true or auto")
        self.resume = self.resume_mode()
        _check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            "trainer.device", self.device, "auto, cpu, cuda or cuda:N",
        )
        _check(self.strategy in STRATEGIES, "trainer.strategy", self.strategy, f"one of {list(STRATEGIES)}")
        _check(self.mixed_precision in MIXED_PRECISION, "trainer.mixed_precision", self.mixed_precision,
               f"one of {list(MIXED_PRECISION)}")
        _check(self.lr_scheduler in LR_SCHEDULERS, "trainer.lr_scheduler", self.lr_scheduler, f"one of {list(LR_SCHEDULERS)}")
        _check(self.lr_warmup_steps >= 0, "trainer.lr_warmup_steps", self.lr_warmup_steps, "an integer >= 0")
        self.warmup.validate()

    def optimizer_steps(self) -> int:
        """Optimizer steps in the whole run (the learning-rate schedule's length)."""
        return self.total_steps * self.epochs_per_batch * self.minibatches_per_epoch


@dataclass
class LoggerConfig:
    """Where metrics go: JSON lines always; wandb (offline) when installed and allowed."""

    wandb: str = "auto"  # auto | true | false
    wandb_project: str = "grpo_lab"
    plot: bool = True
    progress_bar: bool = True
    engine_console_level: str = "WARNING"  # vLLM's own console output; all of it still goes to the run's log file

    def validate(self) -> None:
        _check(str(self.wandb).lower() in ("auto", "true", "false"), "logger.wandb", self.wandb, "auto, true or false")
        _check(self.engine_console_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "logger.engine_console_level",
               self.engine_console_level, "DEBUG, INFO, WARNING or ERROR")


def plays_own_episodes(env_name: str) -> bool:
    """Whether the environment plays whole episodes itself (``env=agent``) rather than
    turn by turn; an environment whose module cannot load answers no (building it
    reports why)."""
    try:
        return hasattr(get_env_factory(env_name), "episode_player")
    except ImportError:
        return False


@dataclass
class ServeConfig:
    """The OpenAI-compatible endpoint (``python -m grpo_lab.serve``; the runs of agents
    that call it). It binds ``host`` (127.0.0.1: this machine only) on ``port`` (0: a
    free one); ``api_key`` is the run's key (null: a random one, printed at start)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    tool_parser: str = "hermes"  # how tool calls are read from answers (python -m grpo_lab --list tool_parsers)
    model_name: Optional[str] = None  # the name clients pass as ``model`` (null: model.name_or_path, or "policy")
    roles: List[str] = field(default_factory=list)  # multi-agent: the model names that address roles 0, 1, ... (M-GRPO)

    def validate(self) -> None:
        _check(bool(self.host), "serve.host", self.host, "a host name or address to bind")
        _check(0 <= self.port <= 65535, "serve.port", self.port, "0 (a free port) to 65535")
        _check(self.api_key is None or len(self.api_key) >= 8, "serve.api_key", "<hidden>", "null or 8 characters or more")
        _check(self.tool_parser in TOOL_PARSERS.names(), "serve.tool_parser", self.tool_parser,
               f"one of {TOOL_PARSERS.names()}")
        _check(self.model_name is None or bool(self.model_name), "serve.model_name", self.model_name, "null or a name")
        _check(len(set(self.roles)) == len(self.roles) and all(isinstance(r, str) and r for r in self.roles),
               "serve.roles", list(self.roles), "distinct, non-empty model names (role 0, the main agent, first)")
        _check(self.model_name is None or self.model_name not in self.roles[1:], "serve.roles", list(self.roles),
               f"names other than serve.model_name={self.model_name!r} after the first (the served model is role 0)")


#: command-line keys that are not Python names, and the config keys they set
KEY_ALIASES = {"trainer.async": "trainer.async_rollout"}


def aliased(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` with each aliased key (:data:`KEY_ALIASES`) replaced by the key it sets."""
    out = []
    for item in overrides:
        sign = item[: len(item) - len(item.lstrip("+~"))]
        key, eq, value = item[len(sign):].partition("=")
        out.append(f"{sign}{KEY_ALIASES.get(key, key)}{eq}{value}")
    return out


@dataclass
class Config:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def served_model_name(self) -> str:
        """The name clients pass as ``model`` to the endpoint: ``serve.model_name``, else
        ``model.name_or_path``, else ``"policy"``."""
        return self.serve.model_name or self.model.name_or_path or "policy"

    def validate(self) -> "Config":
        """Check every value; raise :class:`ConfigError` naming the first bad one."""
        for section in (self.algo, self.env, self.model, self.rollout, self.trainer, self.logger, self.serve):
            section.validate()
        rc = self.rollout
        _check(not self.trainer.async_rollout or bool(rc.engines or rc.engine_urls), "trainer.async",
               self.trainer.async_rollout, "false without engines in their own processes: add rollout.engines=N (or "
               "rollout.engine_urls=[...]), so that generation runs on other devices while this process trains")
        if plays_own_episodes(self.env.name):  # its own episodes (env=agent), not turns
            _check(rc.sampler not in ("tree", "remax", "r3"), "rollout.sampler", rc.sampler,
                   f"chain or adaptive with env={self.env.name} (its episodes are its agent's calls, not a tree, and "
                   "it samples as its requests say: no greedy baseline or reflection can be imposed)")
            _check(rc.env_workers == 0, "rollout.env_workers", rc.env_workers,
                   f"0 with env={self.env.name} (the agents run in this process, against the endpoint)")
        if len(role_instructions_of(get_env_factory(self.env.name))) > 1:  # a multi-agent environment
            _check(rc.episode_format == "memory", "rollout.episode_format", rc.episode_format,
                   f"memory with env={self.env.name} (its roles each see their own turns; a conversation is one "
                   "agent's)")
            _check(rc.sampler != "tree", "rollout.sampler", rc.sampler,
                   f"chain, adaptive, remax or r3 with env={self.env.name} (trees branch one agent's turns)")
        tree_estimators = ("tree_grpo", "treerpo")
        _check(rc.sampler != "tree" or self.algo.estimator in tree_estimators, "rollout.sampler", rc.sampler,
               f"chain or adaptive with algo.estimator={self.algo.estimator!r} (tree batches need one of {list(tree_estimators)})")
        _check(self.algo.estimator not in tree_estimators or rc.sampler == "tree", "algo.estimator", self.algo.estimator,
               f"a chain estimator with rollout.sampler={rc.sampler!r}: {self.algo.estimator} needs tree-sampled batches, "
               "so add rollout=tree (on chains TreeRPO trains only first steps and Tree-GRPO is GRPO)")
        _check(rc.sampler != "remax" or self.algo.estimator == "remax", "rollout.sampler", rc.sampler,
               f"another sampler with algo.estimator={self.algo.estimator!r} (the remax sampler's greedy episodes are "
               "ReMax's baseline; another estimator would count them as group members)")
        _check(self.algo.estimator != "remax" or rc.sampler == "remax", "algo.estimator", self.algo.estimator,
               f"another estimator with rollout.sampler={rc.sampler!r}: ReMax's baseline is a greedy episode per task, "
               "so add rollout.sampler=remax")
        _check(rc.sampler != "adaptive" or rc.adaptive.max_responses >= 2,
               "rollout.adaptive.responses_per_stage", rc.adaptive.responses_per_stage, "stages * responses_per_stage >= 2")
        _check(rc.micro_group_size is None or rc.micro_group_size <= self.algo.group_size, "rollout.micro_group_size",
               rc.micro_group_size, f"at most algo.group_size={self.algo.group_size}")
        unit = 1 if rc.scheduler == "continuous" else (rc.micro_group_size or self.algo.group_size)
        _check(rc.max_inflight is None or rc.scheduler == "full" or rc.max_inflight >= unit, "rollout.max_inflight",
               rc.max_inflight, f"at least one micro-group ({unit} episodes)")
        _check(self.trainer.mixed_precision in ("auto", "no") or self.model.dtype == "float32", "trainer.mixed_precision",
               self.trainer.mixed_precision, f"no with model.dtype={self.model.dtype!r}: mixed precision keeps float32 "
               "weights and computes in half precision, so set model.dtype=float32")
        passes = self.trainer.epochs_per_batch * self.trainer.minibatches_per_epoch
        _check(POLICY_LOSSES.get(self.algo.policy_loss).ratio or passes == 1, "algo.policy_loss", self.algo.policy_loss,
               "a ratio loss (ppo_clip) when trainer.epochs_per_batch * trainer.minibatches_per_epoch > 1 "
               f"({self.algo.policy_loss.upper()} is on-policy only)")
        return self
