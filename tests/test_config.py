"""Hydra configuration: overrides work, wrong keys and values stop with a message naming them."""

import pytest
from hydra.errors import ConfigCompositionException

from grpo_lab.config import AlgoConfig, Config, ConfigError
from grpo_lab.train import compose_config


def load(*overrides):
    return compose_config(overrides)


def test_defaults_match_the_dataclasses():
    import inspect

    from grpo_lab.advantages.grpo import grpo

    loaded = load()
    defaults = {k: p.default for k, p in inspect.signature(grpo).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert loaded.algo.params == defaults  # the YAML spells out the estimator's own defaults
    from grpo_lab.envs import FrozenLakeEnv

    env_defaults = {k: p.default for k, p in inspect.signature(FrozenLakeEnv).parameters.items()}
    assert loaded.env.kwargs == env_defaults  # and the environment's
    loaded.algo.params, loaded.env.kwargs = {}, {}
    assert loaded == Config().validate()


def test_estimator_options_load():
    cfg = load("algo=gigpo", "algo.params.gamma=0.9", "algo.modifiers=[focal]", "algo.modifier_params.focal.gamma=2")
    assert cfg.algo.estimator == "gigpo" and cfg.algo.params["gamma"] == 0.9 and "scale_rewards" not in cfg.algo.params
    assert cfg.algo.modifier_settings() == {"focal": {"gamma": 2}}
    assert load("algo=rloo").algo.params == {}
    for name in ("tree_grpo", "treerpo"):
        assert load(f"algo={name}", "rollout=tree").algo.estimator == name


def test_overrides_reach_the_typed_config():
    cfg = load("algo.group_size=4", "env.max_steps=7", "env.kwargs.num_holes=2", "trainer.warmup.steps=3")
    assert isinstance(cfg, Config)
    assert (cfg.algo.group_size, cfg.env.max_steps, cfg.env.kwargs["num_holes"], cfg.trainer.warmup.steps) == (4, 7, 2, 3)


@pytest.mark.parametrize("override, name", [("algo.group_sizee=3", "group_sizee"), ("trainer.bogus=1", "bogus")])
def test_unknown_key_is_named(override, name):
    with pytest.raises(ConfigCompositionException) as err:
        load(override)
    assert name in str(err.value) + str(err.value.__cause__)


def test_wrong_type_is_named():
    with pytest.raises(ConfigCompositionException) as err:
        load("algo.group_size=many")
    assert "group_size" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, name", [
    ("algo.group_size=1", "algo.group_size"),
    ("algo.estimator=nope", "nope"),
    ("algo.params.scale_rewards=std", "scale_rewards"),
    ("+algo.params.gama=0.9", "gama"),
    ("algo.modifiers=[focus]", "focus"),
    ("algo.loss_agg=mean", "algo.loss_agg"),
    ("algo.policy_loss=a2c", "algo.policy_loss"),
    ("algo.dual_clip_c=0.5", "algo.dual_clip_c"),
    ("algo.ratio_level=episode", "algo.ratio_level"),
    ("algo.kl_estimator=k4", "algo.kl_estimator"),
    ("algo.kl_coef=-1", "algo.kl_coef"),
    ("algo.tis_cap=0", "algo.tis_cap"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("env.name=chess", "env.name"),
    ("model.dtype=float8", "model.dtype"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.attention=flash", "trainer.attention"),
    ("rollout.sampler=beam", "rollout.sampler"),
    ("rollout.sampler=tree", "rollout.sampler"),  # with algo=grpo: tree batches need a tree estimator
    ("rollout.scheduler=fast", "rollout.scheduler"),
    ("rollout.order=random", "rollout.order"),
    ("rollout.max_inflight=0", "rollout.max_inflight"),
    ("rollout.micro_group_size=99", "rollout.micro_group_size"),
    ("rollout.tree.node=token", "'token'"),
    ("rollout.tree.nodes_per_round=0", "nodes_per_round"),
    ("rollout.adaptive.reuse_mode=fresh", "'fresh'"),
    ("rollout.env_workers=-1", "rollout.env_workers"),
    ("model.lora_r=-1", "model.lora_r"),
    ("model.lora_dropout=1.5", "model.lora_dropout"),
    ("trainer.checkpoint_every=-1", "trainer.checkpoint_every"),
    ("trainer.keep_checkpoints=0", "trainer.keep_checkpoints"),
    ("algo.penalty_placement=step", "algo.penalty_placement"),
    ("algo.entropy_coef=-0.1", "algo.entropy_coef"),
    ("algo.off_policy_is_cap=0", "algo.off_policy_is_cap"),
    ("rollout.vllm_max_model_len=8", "rollout.vllm_max_model_len"),
])
def test_bad_value_is_named(override, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load(override)


@pytest.mark.parametrize("name", ["treerpo", "tree_grpo"])
def test_tree_estimators_on_chains_are_refused_naming_rollout_tree(name):
    with pytest.raises(ConfigError, match=f"algo.estimator='{name}'.*add rollout=tree"):
        load(f"algo={name}")
    assert load(f"algo={name}", "rollout=tree").rollout.sampler == "tree"


def test_penalty_placement_per_estimator():
    assert load().algo.penalty_placement == "row"
    assert load("algo=tree_grpo", "rollout=tree").algo.penalty_placement == "episode"  # its default
    assert AlgoConfig(estimator="tree_grpo").validate() is None and AlgoConfig(estimator="treerpo").penalty_placement is None
    assert load("algo=gigpo", "algo.penalty_placement=episode").algo.penalty_placement == "episode"
    with pytest.raises(ConfigError, match="algo.penalty_placement='row'.*tree_grpo"):
        load("algo=tree_grpo", "rollout=tree", "algo.penalty_placement=row")
    assert load("algo=tree_grpo", "rollout=tree", "algo.penalty_placement=row", "algo.invalid_action_penalty=0")


def test_dynamic_sampling_is_refused_with_copo():
    with pytest.raises(ConfigError, match="algo.drop_zero_std_groups=True.*copo"):
        load("algo=copo", "algo.drop_zero_std_groups=true")


def test_gspo_defaults_through_the_command_line():
    gspo = load("algo.ratio_level=sequence")
    assert (gspo.algo.clip_low, gspo.algo.clip_high, gspo.algo.loss_agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    token = load()
    assert (token.algo.clip_low, token.algo.clip_high, token.algo.loss_agg) == (0.2, 0.28, "token-mean")
    assert load("algo.ratio_level=sequence", "algo.clip_high=1e-3").algo.clip_high == 1e-3


def test_sampler_options_load():
    tree = load("algo=tree_grpo", "rollout=tree", "rollout.tree.node=segment")
    assert tree.rollout.sampler == "tree" and tree.rollout.tree.node == "segment" and tree.rollout.tree.trees_per_prompt == 2
    ar3po = load("rollout=ar3po", "rollout.adaptive.stages=3")
    assert ar3po.rollout.sampler == "adaptive" and ar3po.rollout.adaptive.stages == 3
    assert ar3po.rollout.adaptive.reuse_mode == "stop_gradient"
    sched = load("rollout.scheduler=continuous", "rollout.max_inflight=16", "rollout.order=shortest_first")
    assert (sched.rollout.scheduler, sched.rollout.max_inflight, sched.rollout.order) == ("continuous", 16, "shortest_first")


def test_bad_env_kwargs_are_named():
    from grpo_lab.build import env_factory_from

    with pytest.raises(ConfigError, match="num_holes"):
        env_factory_from(load("env.kwargs.num_holes=99"))
    with pytest.raises(ConfigError, match="colour"):
        env_factory_from(load("+env.kwargs.colour=blue"))


def test_env_errors_name_the_key_not_the_whole_kwargs():
    from grpo_lab.build import env_factory_from

    with pytest.raises(ConfigError) as err:
        env_factory_from(load("env.kwargs.size=1"))
    assert str(err.value).startswith("env=frozenlake: env.kwargs.size=1: ") and "num_holes" not in str(err.value)
    with pytest.raises(ConfigError, match=r"env.kwargs.colour is not an option of env 'frozenlake'; its options: "
                                          r"\['size', "):
        env_factory_from(load("+env.kwargs.colour=blue"))


def test_reinforce_is_refused_off_policy():
    with pytest.raises(ConfigError, match="REINFORCE is on-policy only"):
        load("algo.policy_loss=reinforce", "trainer.epochs_per_batch=2")
    assert load("algo.policy_loss=reinforce").algo.policy_loss == "reinforce"


def test_vllm_backend_option_and_missing_install(monkeypatch, tmp_path):
    from grpo_lab.rollout.backends import vllm as vllm_module
    from grpo_lab.trainer import Trainer

    cfg = load("rollout=vllm", "trainer.warmup.steps=0")
    assert cfg.rollout.backend == "vllm"

    def missing():
        raise ImportError(f"rollout.backend=vllm needs vLLM, which is not installed: {vllm_module.INSTALL_HINT}")

    monkeypatch.setattr(vllm_module, "import_vllm", missing)
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[vllm\]'"):
        Trainer(cfg, output_dir=tmp_path)


def test_vllm_max_model_len_follows_the_model():
    """null takes the model's context length, at most 8192; a longer explicit value is
    refused with both numbers unless the model scales its RoPE."""
    import types

    from transformers import AutoConfig

    from grpo_lab.config import RolloutConfig
    from grpo_lab.build import vllm_max_model_len

    def length(configured, **model_config):
        model = types.SimpleNamespace(config=AutoConfig.for_model("qwen2", **model_config))
        return vllm_max_model_len(Config(rollout=RolloutConfig(vllm_max_model_len=configured)), model)

    assert length(None, max_position_embeddings=2048) == 2048  # the tiny model: 4096 used to stop vLLM
    assert length(None, max_position_embeddings=131072) == 8192
    assert length(1024, max_position_embeddings=2048) == 1024
    with pytest.raises(ConfigError, match="4096 is longer than the model's 2048 positions"):
        length(4096, max_position_embeddings=2048)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048, "rope_theta": 1e6}
    assert length(8192, max_position_embeddings=2048, rope_parameters=yarn) == 8192
