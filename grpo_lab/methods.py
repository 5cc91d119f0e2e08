"""Every method a run can select, with its paper and the config line that selects it:
the README's table of methods and ``python -m grpo_lab --list methods`` both print
:data:`METHODS` (``tests/test_methods.py`` checks that every registered estimator,
modifier, policy loss, KL estimator, ratio level and sampler is listed, and that the
README holds this table)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """One row: what kind of method, its name, the paper (or library) it follows, and
    the command-line overrides that select it."""

    kind: str
    name: str
    paper: str
    config: str


METHODS: tuple[Method, ...] = (
    # advantage estimators and modifiers
    Method("estimator", "grpo", "Shao et al. 2024, DeepSeekMath", "algo=grpo"),
    Method("estimator", "Dr. GRPO", "Liu et al. 2025, Understanding R1-Zero-Like Training",
           "algo.params.scale_rewards=none algo.loss_agg=seq-mean-token-sum-norm"),
    Method("estimator", "rloo", "Ahmadian et al. 2024, Back to Basics", "algo=rloo"),
    Method("estimator", "gigpo", "Feng et al. 2025, Group-in-Group Policy Optimization", "algo=gigpo"),
    Method("estimator", "tree_grpo", "Ji et al. 2025, Tree Search for LLM Agent RL", "algo=tree_grpo rollout=tree"),
    Method("estimator", "treerpo", "Yang et al. 2025, TreeRPO", "algo=treerpo rollout=tree rollout.tree.node=segment"),
    Method("estimator", "copo", "COPO 2025, Consistency-Aware Policy Optimization (arXiv 2508.04138)", "algo=copo"),
    Method("estimator", "reinforce_pp", "Hu 2025, REINFORCE++", "algo=reinforce_pp"),
    Method("estimator", "reinforce_pp_baseline", "Hu 2025, REINFORCE++", "algo=reinforce_pp_baseline"),
    Method("estimator", "opo", "Hao et al. 2025, On-Policy RL with Optimal Reward Baseline", "algo=opo"),
    Method("estimator", "gpg", "Chu et al. 2025, GPG: A Simple and Strong RL Baseline", "algo=gpg"),
    Method("estimator", "grpo_passk", "arXiv:2503.19595, as verl's grpo_passk", "algo=grpo_passk"),
    Method("estimator", "remax", "Li et al. 2024, ReMax", "algo=remax rollout.sampler=remax"),
    Method("estimator", "mgrpo", "Hong et al. 2025, M-GRPO (main agent and aligned sub-agents)", "algo=mgrpo"),
    Method("modifier", "focal", "F-GRPO 2025, focal scaling of solved groups", "algo.modifiers=[focal]"),
    # samplers
    Method("sampler", "adaptive", "Zhang et al. 2025, AR3PO (adaptive rollout, response reuse)", "rollout=ar3po"),
    Method("sampler", "tree", "Ji et al. 2025 and Yang et al. 2025: trees of episodes", "algo=tree_grpo rollout=tree"),
    Method("sampler", "remax", "Li et al. 2024, ReMax (a greedy episode per task)", "algo=remax rollout.sampler=remax"),
    Method("sampler", "r3", "Jiang et al. 2026, R³: Replay, Reflection, and Ranking Rewards", "rollout.sampler=r3"),
    # policy losses
    Method("policy loss", "ppo_clip", "Schulman et al. 2017, PPO; Yu et al. 2025, DAPO clip-higher", "algo.policy_loss=ppo_clip"),
    Method("policy loss", "dual clip", "Ye et al. 2020, dual-clip PPO", "algo.dual_clip_c=3.0"),
    Method("policy loss", "GSPO", "Zheng et al. 2025, Group Sequence Policy Optimization", "algo.ratio_level=sequence"),
    Method("policy loss", "reinforce", "Williams 1992, REINFORCE (one pass per batch)", "algo.policy_loss=reinforce"),
    Method("policy loss", "cispo", "MiniMax 2025, MiniMax-M1 (CISPO)", "algo=cispo"),
    Method("policy loss", "geo_mean", "Zhao et al. 2025, Geometric-Mean Policy Optimization", "algo=gmpo"),
    Method("policy loss", "sapo", "Gao et al. 2025, Soft Adaptive Policy Optimization", "algo=sapo"),
    Method("policy loss", "vespo", "VESPO 2026, Variational Sequence-Level Soft Policy Optimization", "algo=vespo"),
    Method("policy loss", "clip_cov", "Cui et al. 2025, The Entropy Mechanism of RL for Reasoning LMs", "algo=clip_cov"),
    Method("policy loss", "kl_cov", "Cui et al. 2025, The Entropy Mechanism of RL for Reasoning LMs", "algo=kl_cov"),
    # loss aggregation
    Method("aggregation", "token-mean", "Yu et al. 2025, DAPO", "algo.loss_agg=token-mean"),
    Method("aggregation", "seq-mean-token-mean", "Shao et al. 2024, GRPO", "algo.loss_agg=seq-mean-token-mean"),
    Method("aggregation", "seq-mean-token-sum", "verl's seq-mean-token-sum", "algo.loss_agg=seq-mean-token-sum"),
    Method("aggregation", "seq-mean-token-sum-norm", "Liu et al. 2025, Dr. GRPO (TRL's dr_grpo)",
           "algo.loss_agg=seq-mean-token-sum-norm"),
    # KL
    Method("KL estimator", "k1", "Schulman 2020, Approximating KL Divergence", "algo.kl_coef=0.01 algo.kl_estimator=k1"),
    Method("KL estimator", "k2", "Schulman 2020, Approximating KL Divergence", "algo.kl_coef=0.01 algo.kl_estimator=k2"),
    Method("KL estimator", "k3", "Schulman 2020; GRPO's and verl's low_var_kl", "algo.kl_coef=0.01 algo.kl_estimator=k3"),
    Method("KL estimator", "abs", "verl's abs", "algo.kl_coef=0.01 algo.kl_estimator=abs"),
    Method("KL estimator", "k1+", "verl's straight-through + modes", "algo.kl_coef=0.01 algo.kl_estimator=k1+"),
    Method("KL estimator", "k3+", "verl's straight-through + modes", "algo.kl_coef=0.01 algo.kl_estimator=k3+"),
    Method("KL estimator", "abs+", "verl's straight-through + modes", "algo.kl_coef=0.01 algo.kl_estimator=abs+"),
    Method("KL", "bias-corrected KL", "DeepSeek-AI 2025, DeepSeek-V3.2 (TRL's use_bias_correction_kl)",
           "algo.kl_coef=0.01 algo.kl_bias_correction=true"),
    Method("KL", "KL in the reward", "Ziegler et al. 2019; verl's use_kl_in_reward, fixed or adaptive",
           "algo.kl_reward_coef=0.05 algo.kl_reward_controller=adaptive"),
    # rollout correction
    Method("correction", "token", "Yao et al. 2025, truncated importance sampling", "algo.tis_cap=2.0"),
    Method("correction", "sequence", "Liu, Li et al. 2025, When Speed Kills Stability", "algo.tis_cap=2.0 algo.tis_level=sequence"),
    Method("correction", "geometric", "Liu, Li et al. 2025, When Speed Kills Stability",
           "algo.rejection=geometric algo.rejection_upper=1.001"),
    Method("correction", "rejection", "Liu, Li et al. 2025 (token, sequence or geometric band)", "algo.rejection=token"),
    Method("correction", "off-policy sequence mask", "DeepSeek-AI 2025, DeepSeek-V3.2 (TRL's off_policy_mask_threshold)",
           "algo.off_policy_mask_threshold=0.5"),
    Method("correction", "stale rows", "Hilton et al. 2022, decoupled PPO (reused and async rows)", "algo.off_policy_is_cap=2.0"),
    # token selection and entropy
    Method("token selection", "top entropy", "Wang et al. 2025, Beyond the 80/20 Rule", "algo.top_entropy_quantile=0.2"),
    Method("token selection", "mask truncated", "Yu et al. 2025, DAPO (TRL's mask_truncated_completions)",
           "algo.mask_truncated_completions=true"),
    Method("entropy", "entropy bonus", "Schulman et al. 2017, PPO", "algo.entropy_coef=0.001"),
    Method("entropy", "adaptive entropy", "He et al. 2025, Skywork Open Reasoner 1", "algo.entropy_target=0.2"),
    Method("groups", "dynamic sampling", "Yu et al. 2025, DAPO (without refill)", "algo.drop_zero_std_groups=true"),
    # rewards
    Method("reward", "toolrl", "Qian et al. 2025, ToolRL: Reward is All Tool Learning Needs",
           "env=dataset env.kwargs.path=calls.jsonl env.kwargs.rewards=[toolrl]"),
    Method("reward", "autorefine", "Shi et al. 2025, Search and Refine During Think (AutoRefine)",
           "env=search_qa env.kwargs.refine=true env.kwargs.retrieval_reward=0.1"),
)


def markdown_table() -> str:
    """:data:`METHODS` as a markdown table (the README's)."""
    lines = ["| kind | method | paper | selected by |", "|---|---|---|---|"]
    lines += [f"| {m.kind} | `{m.name}` | {m.paper} | `{m.config}` |" for m in METHODS]
    return "\n".join(lines)


def describe() -> str:
    """:data:`METHODS` as ``--list`` prints them."""
    width = max(len(m.name) for m in METHODS)
    lines = ["methods (kind, name, paper, config):"]
    lines += [f"  {m.kind:<15} {m.name:<{width}}  {m.paper}\n      {m.config}" for m in METHODS]
    return "\n".join(lines)
