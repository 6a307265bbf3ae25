import functools
import json
import os
import statistics
import time

import pytest
import torch
from networks import build

from nnunet_tucker import TuckerConfig
from nnunet_tucker.tools.benchmark import (
    benchmark,
    environment,
    time_interleaved,
    time_prediction,
    to_table,
    write_outputs,
)


def _table_rows(table: str, timings) -> list[list[str]]:
    """The cells of each variant's row of `to_table` (the name is the first 18 characters), after checking the
    head and the rule above them."""
    head, rule, *rows = table.splitlines()
    assert head.split()[:4] == ["variant", "params", "GMACs", "MACs"] and set(rule) == {"-"}
    assert len(rows) == len(timings)
    return [[row[:18].strip(), *row[18:].split()] for row in rows]


def _expected_cells(t) -> list[str]:
    """What `to_table` promises for `t`: name, parameters, GMACs, MAC reduction, min / median / max seconds,
    speed-up, realized share, peak memory."""
    return [t.name, f"{t.params / 1e6:.2f}M", f"{t.macs / 1e9:.1f}", f"{t.mac_reduction:.1f}x",
            f"{min(t.seconds):.3f}", f"{statistics.median(t.seconds):.3f}", f"{max(t.seconds):.3f}",
            f"{t.speedup:.2f}x", f"{t.speedup / t.mac_reduction:.0%}", "-"]


def test_interleaved_timer_runs_every_variant_once_per_round_and_keeps_the_timed_rounds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    calls, seen = [], []

    def run(name: str, seconds: float):
        calls.append(name)
        now[0] += seconds + len(calls)  # each call takes longer than the one before
        return name.upper()

    runs = {"original": functools.partial(run, "original", 10.0), "a": functools.partial(run, "a", 5.0)}
    seconds = time_interleaved(runs, torch.device("cpu"), rounds=2, warmup=1,
                               on_run=lambda *args: seen.append(args))
    assert calls == ["original", "a"] * 3
    assert seconds == {"original": [13.0, 15.0], "a": [9.0, 11.0]}  # rounds 2 and 3 of each
    assert seen[0] == ("original", 11.0, "ORIGINAL", False) and seen[-1] == ("a", 11.0, "A", True)
    assert [timed for *_, timed in seen] == [False, False, True, True, True, True]


def test_environment_is_set_inside_and_restored_after(monkeypatch):
    monkeypatch.setenv("TUCKER_CACHE_DIR", "/before")
    monkeypatch.delenv("nnUNet_compile", raising=False)
    with environment(TUCKER_CACHE_DIR="/inside", nnUNet_compile="1"):
        assert os.environ["TUCKER_CACHE_DIR"] == "/inside" and os.environ["nnUNet_compile"] == "1"
    assert os.environ["TUCKER_CACHE_DIR"] == "/before" and "nnUNet_compile" not in os.environ
    with pytest.raises(KeyError), environment(TUCKER_CACHE_DIR="/inside"):
        raise KeyError
    assert os.environ["TUCKER_CACHE_DIR"] == "/before"


def test_interleaved_timings_and_outputs(tmp_path):
    net, shape = build("plain3d")
    timings = benchmark(net, shape, [TuckerConfig(0.5, policy="auto", rank_min=2),
                                     TuckerConfig(mac_budget=0.3, policy="auto", rank_min=2)], rounds=3)  # a median
    assert [t.name for t in timings] == ["original", "auto 0.5", "auto MACs 0.3"]
    assert all(len(t.seconds) == 3 and all(s > 0 for s in t.seconds) for t in timings)
    assert timings[2].macs < timings[1].macs < timings[0].macs and timings[2].mac_reduction > 1
    for t in timings:
        assert t.median == statistics.median(t.seconds)
        assert t.speedup == pytest.approx(timings[0].median / t.median, rel=1e-12)  # a ratio of medians
        assert t.mac_reduction == pytest.approx(timings[0].macs / t.macs, rel=1e-12)
    assert timings[0].speedup == 1.0 and timings[0].mac_reduction == 1.0
    assert _table_rows(to_table(timings), timings) == [_expected_cells(t) for t in timings]
    write_outputs(timings, {"title": "t"}, tmp_path / "b.json", tmp_path / "b.png")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["title"] == "t" and [v["name"] for v in data["variants"]] == [t.name for t in timings]
    for written, t in zip(data["variants"], timings, strict=True):
        assert written["seconds"] == t.seconds and written["median"] == t.median
        assert written["min"] == min(t.seconds) and written["max"] == max(t.seconds)
        assert written["speedup"] == t.speedup and written["realized"] == t.speedup / t.mac_reduction
        assert (written["params"], written["macs"]) == (t.params, t.macs)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preset_model_folder_loads_in_nnunet(tmp_path):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunet_tucker.tools.presets import build_preset, write_preset_model_folder

    folder = write_preset_model_folder("totalseg-3mm", tmp_path, seed=1)
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,))
    reference = build_preset("totalseg-3mm")[0].state_dict()
    loaded = predictor.network.state_dict()
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in reference.items()}
    assert predictor.label_manager.num_segmentation_heads == 118
    assert list(predictor.configuration_manager.spacing) == [3.0, 3.0, 3.0]
    again = torch.load(write_preset_model_folder("totalseg-3mm", tmp_path / "again", seed=1) / "fold_0" /
                       "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert all(torch.equal(loaded[k], again[k]) for k in again)  # seeded


def test_time_prediction_end_to_end(tmp_path):
    from nnunet_tucker.tools.demo_model import demo_model_folder
    from nnunet_tucker.tools.synthetic import make_test_cases

    make_test_cases(tmp_path / "images", 1, seed=3)
    timings = time_prediction(demo_model_folder(), tmp_path / "images", [TuckerConfig(0.5, policy="auto", rank_min=2)],
                              rounds=1, warmup=0)
    assert [t.name for t in timings] == ["original", "auto 0.5"]
    assert all(len(t.seconds) == 1 and t.seconds[0] > 0 and t.load_seconds > 0 for t in timings)
    assert timings[1].params < timings[0].params and timings[1].mac_reduction > 1
    rows = _table_rows(to_table(timings), timings)
    assert [row[:-1] for row in rows] == [_expected_cells(t) for t in timings]  # and the load time last:
    assert [row[-1] for row in rows] == [f"{t.load_seconds:.1f}" for t in timings]
    assert to_table(timings).splitlines()[0].split()[-2:] == ["load", "s"]


def test_bench_times_several_presets_one_after_the_other_into_one_json(tmp_path, monkeypatch, capsys):
    from nnunet_tucker import cli
    from nnunet_tucker.tools import presets

    built = []
    monkeypatch.setattr(presets, "build_preset", lambda name: built.append(name) or build("plain3d"))
    names = ["resenc-l", "totalseg-1.5mm-ribs"]
    path = tmp_path / "presets.json"
    assert cli.main(["bench", "--preset", *names, "--ratios", "0.5", "--policies", "auto", "--rank-min", "2",
                     "--rounds", "1", "--warmup", "0", "--json", str(path)]) == 0
    assert built == names
    sections = json.loads(path.read_text())["sections"]
    assert [s["source"] for s in sections] == names
    for section, name in zip(sections, names, strict=True):
        assert section["description"] == presets.PRESETS[name].description and section["rounds"] == 1
        assert [v["name"] for v in section["variants"]] == ["original", "auto 0.5"]
        assert section["variants"][1]["macs"] < section["variants"][0]["macs"]
    assert capsys.readouterr().out.count("variant ") == 2  # a table each
    assert cli.main(["bench", "--preset", *names, "--png", str(tmp_path / "p.png")]) == 2


def test_bench_times_mac_budgets_beside_ratios_or_alone(tmp_path, monkeypatch):
    from nnunet_tucker import cli
    from nnunet_tucker.tools import presets

    monkeypatch.setattr(presets, "build_preset", lambda name: build("plain3d"))
    common = ["bench", "--preset", "resenc-l", "--policies", "auto", "--rank-min", "2", "--rounds", "1", "--warmup",
              "0", "--json"]
    assert cli.main([*common, str(tmp_path / "a.json"), "--ratios", "0.5", "--mac-budgets", "0.6", "0.4"]) == 0
    variants = json.loads((tmp_path / "a.json").read_text())["variants"]
    assert [v["name"] for v in variants] == ["original", "auto 0.5", "auto MACs 0.6", "auto MACs 0.4"]
    assert variants[3]["macs"] <= 0.4 * variants[0]["macs"] < variants[2]["macs"] <= 0.6 * variants[0]["macs"]
    assert cli.main([*common, str(tmp_path / "b.json"), "--mac-budgets", "0.5"]) == 0  # no default ratios then
    assert [v["name"] for v in json.loads((tmp_path / "b.json").read_text())["variants"]] == ["original",
                                                                                          "auto MACs 0.5"]


def test_every_variant_is_also_timed_on_another_backend(tmp_path, monkeypatch):
    """``--backends torch openvino``: the original and each compressed variant once more, run by OpenVINO, with the
    same parameters and MACs and the backend named."""
    pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'nnunet-tucker[openvino]'")
    monkeypatch.setenv("TUCKER_CACHE_DIR", str(tmp_path))
    net, shape = build("plain3d")
    timings = benchmark(net, shape, [TuckerConfig(0.5, policy="auto", rank_min=2)], rounds=1,
                        backends=("torch", "openvino"))
    assert [(t.name, t.backend) for t in timings] == [("original", "torch"), ("auto 0.5", "torch"),
                                                      ("original openvino", "openvino"),
                                                      ("auto 0.5 openvino", "openvino")]
    for torch_run, openvino_run in zip(timings[:2], timings[2:], strict=True):
        assert (openvino_run.params, openvino_run.macs) == (torch_run.params, torch_run.macs)
        assert len(openvino_run.seconds) == 1 and openvino_run.seconds[0] > 0
    assert len(list((tmp_path / "openvino").glob("*/model.xml"))) == 2
