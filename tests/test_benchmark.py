import json

from networks import build

from nnunet_tucker import TuckerConfig
from nnunet_tucker.tools.benchmark import benchmark, time_prediction, to_table, write_outputs


def test_interleaved_timings_and_outputs(tmp_path):
    net, shape = build("plain3d")
    timings = benchmark(net, shape, [TuckerConfig(0.5, policy="auto", rank_min=2),
                                     TuckerConfig(0.3, policy="auto", rank_min=2)], rounds=2)
    assert [t.name for t in timings] == ["original", "auto 0.5", "auto 0.3"]
    assert all(len(t.seconds) == 2 for t in timings) and timings[0].speedup == 1.0
    assert timings[2].macs < timings[1].macs < timings[0].macs and timings[2].mac_reduction > 1
    assert "speed-up" in to_table(timings)
    write_outputs(timings, {"title": "t"}, tmp_path / "b.json", tmp_path / "b.png")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["variants"][1]["median"] > 0 and (tmp_path / "b.png").stat().st_size > 1000


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
    assert "load s" in to_table(timings)
