import pytest

from nnunet_tucker.config import TuckerConfig, TuckerConfigError, read_env, read_plans, resolve_config


def test_defaults_and_dict():
    c = TuckerConfig(0.5)
    assert c.policy == "profiled" and c.rank_min == 8 and c.rank_multiple == 1 and c.exclude == ()
    assert TuckerConfig(**c.to_dict()) == c


@pytest.mark.parametrize(
    "field, value",
    [("rank_ratio", 0), ("rank_ratio", -0.1), ("rank_ratio", 1.5), ("rank_ratio", float("nan")),
     ("rank_ratio", "0.5"), ("policy", "fast"), ("rank_min", 0), ("rank_multiple", 2.5),
     ("hooi_iterations", -1), ("rank_min", True)],
)
def test_invalid_values_name_field_and_value(field, value):
    kwargs = {"rank_ratio": 0.5, field: value}
    with pytest.raises(TuckerConfigError, match=field) as e:
        TuckerConfig(**kwargs)
    assert repr(value) in str(e.value) and "must be" in str(e.value)


@pytest.mark.parametrize("text", ["abc", "0", "-0.5", "1.01", "inf", "nan"])
def test_env_rank_ratio_rejected_with_variable_name(text):
    pattern = r"TUCKER_RANK_RATIO='.*' is not allowed: it must be a number in \(0, 1\]"
    with pytest.raises(TuckerConfigError, match=pattern):
        TuckerConfig.from_env({"TUCKER_RANK_RATIO": text})


def test_env_reading():
    assert TuckerConfig.from_env({}) is None
    assert TuckerConfig.from_env({"TUCKER_RANK_RATIO": " "}) is None
    c = TuckerConfig.from_env(
        {"TUCKER_RANK_RATIO": "0.3", "TUCKER_POLICY": "paper", "TUCKER_RANK_MULTIPLE": "8",
         "TUCKER_EXCLUDE": "decoder.*, encoder.stages.0.*"}
    )
    assert c == TuckerConfig(0.3, policy="paper", rank_multiple=8, exclude=("decoder.*", "encoder.stages.0.*"))
    with pytest.raises(TuckerConfigError, match="TUCKER_RANK_MIN='eight'"):
        read_env({"TUCKER_RANK_MIN": "eight"})


def test_settings_without_ratio_are_an_error():
    with pytest.raises(TuckerConfigError, match="without saying how much to compress"):
        TuckerConfig.from_env({"TUCKER_POLICY": "paper"})


def test_plans_field():
    assert TuckerConfig.from_plans({"configurations": {}}) is None
    assert TuckerConfig.from_plans({"tucker": {"rank_ratio": 0.5, "rank_min": 4}}) == TuckerConfig(0.5, rank_min=4)
    with pytest.raises(TuckerConfigError, match=r"plans.json 'tucker.rank_ratio'=2 is not allowed"):
        TuckerConfig.from_plans({"tucker": {"rank_ratio": 2}})
    with pytest.raises(TuckerConfigError, match=r"unknown key\(s\) \['ratio'\]"):
        read_plans({"tucker": {"ratio": 0.5}})
    with pytest.raises(TuckerConfigError, match="must be an object"):
        read_plans({"tucker": 0.5})


def test_precedence_is_field_by_field_later_wins():
    plans = read_plans({"tucker": {"rank_ratio": 0.9, "policy": "paper", "rank_min": 4}})
    env = read_env({"TUCKER_RANK_RATIO": "0.5"})
    flags = {"rank_min": 16}
    assert resolve_config(plans, env, flags) == TuckerConfig(0.5, policy="paper", rank_min=16)
    assert resolve_config({}, {}, {}) is None


def test_mac_budget_and_calibration_from_every_source():
    env = read_env({"TUCKER_MAC_BUDGET": "0.2", "TUCKER_CALIBRATION": "/data/cal", "TUCKER_CALIBRATION_PATCHES": "6"})
    assert resolve_config(env) == TuckerConfig(mac_budget=0.2, calibration="/data/cal", calibration_patches=6)
    plans = read_plans({"tucker": {"mac_budget": 0.3, "calibration": "cal"}})
    assert resolve_config(plans) == TuckerConfig(mac_budget=0.3, calibration="cal")
    with pytest.raises(TuckerConfigError, match="TUCKER_MAC_BUDGET='1.5' is not allowed"):
        read_env({"TUCKER_MAC_BUDGET": "1.5"})


def test_exactly_one_of_ratio_and_budget():
    with pytest.raises(TuckerConfigError, match="exactly one of rank_ratio and mac_budget"):
        TuckerConfig(0.5, mac_budget=0.2)
    with pytest.raises(TuckerConfigError, match="neither"):
        TuckerConfig()
    # a stronger source's budget replaces a weaker source's ratio, and back
    ratio_in_plans = read_plans({"tucker": {"rank_ratio": 0.5, "rank_min": 4}})
    assert resolve_config(ratio_in_plans, {"mac_budget": 0.2}) == TuckerConfig(mac_budget=0.2, rank_min=4)
    assert resolve_config({"mac_budget": 0.2}, {"rank_ratio": 0.4}) == TuckerConfig(0.4)


def test_calibration_patches_default_to_fewer_from_the_first_case():
    """Each patch costs about a forward and a backward pass of the network, once per model: a run's first
    case gives 2, a folder (chosen to calibrate on) 4, unless the user says how many."""
    assert (TuckerConfig(0.3).patches(first_case=True), TuckerConfig(0.3).patches(first_case=False)) == (2, 4)
    assert TuckerConfig(0.3, calibration_patches=6).patches(first_case=True) == 6
    assert resolve_config(read_env({"TUCKER_RANK_RATIO": "0.3", "TUCKER_CALIBRATION_PATCHES": "3"})).patches(
        first_case=False) == 3


def test_a_floor_on_the_agreement_from_every_source_and_the_targets_it_loosens_to():
    env = read_env({"TUCKER_RANK_RATIO": "0.3", "TUCKER_MIN_AGREEMENT": "0.98"})
    config = resolve_config(read_plans({"tucker": {"min_agreement": 0.95}}), env)
    assert config == TuckerConfig(0.3, min_agreement=0.98)
    assert config.describe() == "rank_ratio=0.3 policy=profiled min_agreement=0.98"
    assert [c.rank_ratio for c in config.looser()] == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert config.looser()[0] == TuckerConfig(0.4, min_agreement=0.98)
    assert TuckerConfig(mac_budget=0.25).looser()[0] == TuckerConfig(mac_budget=0.3)
    assert TuckerConfig(0.95).looser() == [TuckerConfig(1.0)] and TuckerConfig(1.0).looser() == []
    with pytest.raises(TuckerConfigError, match=r"TUCKER_MIN_AGREEMENT=.98. is not allowed: .* number in \(0, 1\]"):
        read_env({"TUCKER_MIN_AGREEMENT": "98"})
