import logging

import torch
from networks import build

from nnunet_tucker import TuckerConfig
from nnunet_tucker.files import state_dict_digest
from nnunet_tucker.nnunet.cache import DecompositionCache
from nnunet_tucker.nnunet.predictor import converted_weights
from nnunet_tucker.plan import plan_compression
from nnunet_tucker.swap import convert_state_dict


def _setup(tmp_path):
    net, _ = build("plain3d")
    plan = plan_compression(net, TuckerConfig(0.5, rank_min=2))
    return net.state_dict(), plan, DecompositionCache(tmp_path)


def test_miss_then_hit_gives_the_same_weights(tmp_path):
    state, plan, cache = _setup(tmp_path)
    first, errors = converted_weights(cache, state, plan)
    again, errors_again = converted_weights(DecompositionCache(tmp_path), state, plan)
    expected, _ = convert_state_dict(state, plan)
    assert cache.misses == 1 and errors == errors_again
    assert all(torch.equal(again[k], expected[k]) for k in expected)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))


def test_key_depends_on_weights_and_plan(tmp_path):
    state, plan, cache = _setup(tmp_path)
    other_plan = plan_compression(build("plain3d")[0], TuckerConfig(0.3, rank_min=2))
    changed = {k: v.clone() for k, v in state.items()}
    next(v for k, v in changed.items() if k.endswith("weight")).add_(1e-3)
    keys = {cache.key(state, plan), cache.key(state, other_plan), cache.key(changed, plan)}
    assert len(keys) == 3 and state_dict_digest(state) == state_dict_digest(dict(state))


def test_corrupt_or_foreign_entries_are_recomputed(tmp_path, caplog):
    state, plan, cache = _setup(tmp_path)
    converted_weights(cache, state, plan)
    (entry,) = tmp_path.glob("*.pt")
    for garbage in (entry.read_bytes()[:100], b"not a checkpoint", None):
        if garbage is None:  # a readable file with the wrong content
            torch.save({"state_dict": {"x": torch.zeros(1)}, "errors": {}}, entry)
        else:
            entry.write_bytes(garbage)
        fresh = DecompositionCache(tmp_path)
        with caplog.at_level(logging.WARNING):
            converted, _ = converted_weights(fresh, state, plan)
        assert fresh.misses == 1 and "ignoring unusable cache entry" in caplog.text
        assert converted.keys() == convert_state_dict(state, plan)[0].keys()
        caplog.clear()


def test_unwritable_cache_does_not_stop_conversion(tmp_path, caplog):
    state, plan, _ = _setup(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = DecompositionCache(blocker / "sub")
    with caplog.at_level(logging.WARNING):
        converted, _ = converted_weights(cache, state, plan)
    assert converted and "could not write the cache entry" in caplog.text
