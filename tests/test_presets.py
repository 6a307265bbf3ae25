"""The presets: TotalSegmentator's models as its source and class maps define them, nnU-Net's residual-encoder
presets as its planners plan them, model folders where nnU-Net and TotalSegmentator look for them, and the
compressed residual encoders computing what the plain three convolutions compute."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, BottleneckD
from networks import scaled_error

from nnunet_tucker import TuckerConfig, compress_network
from nnunet_tucker.cli import build_parser
from nnunet_tucker.layers import FusedInstanceNorm, TuckerConv
from nnunet_tucker.tools import presets
from nnunet_tucker.tools.presets import (
    PRESETS,
    TOTALSEG_DEFAULT_MODE,
    build_preset,
    plan_with_nnunet,
    shipped_plans,
    totalseg_model,
    write_preset_model_folder,
)

PARTS = ("organs", "vertebrae", "cardiac", "muscles", "ribs")


def test_every_preset_builds_its_architecture():
    for name, p in PRESETS.items():
        network, shape = build_preset(name)
        assert shape == (1, 1, *p.patch_size) and not network.training
        assert network.decoder.seg_layers[-1].out_channels == p.num_classes
        assert list(network.encoder.output_channels) == list(p.features)
        assert type(network) is (ResidualEncoderUNet if p.planner else PlainConvUNet)
    assert TOTALSEG_DEFAULT_MODE == tuple(f"totalseg-1.5mm-{part}" for part in PARTS)
    assert PRESETS["totalseg-1.5mm"] is PRESETS["totalseg-1.5mm-organs"]  # its name before the five parts
    assert PRESETS["totalseg-1.5mm"].dataset_name == "Dataset981_RandomTotalSeg1p5mm"
    assert [PRESETS[n].num_classes for n in TOTALSEG_DEFAULT_MODE] == [25, 27, 19, 24, 27]


def test_bench_and_report_accept_every_preset():
    for name in PRESETS:
        assert build_parser().parse_args(["report", "--preset", name]).preset == name
    assert build_parser().parse_args(["bench", "--preset", *PRESETS]).preset == list(PRESETS)  # several at once


def test_output_counts_are_totalsegmentator_classes_plus_background():
    map_to_binary = pytest.importorskip("totalsegmentator.map_to_binary")
    checked = set()
    for name, p in PRESETS.items():
        for model in p.totalseg:
            table, key = model.class_map
            classes = getattr(map_to_binary, table)[key]
            assert sorted(classes) == list(range(1, len(classes) + 1)), (name, model.task)
            assert p.num_classes == len(classes) + 1, (name, model.task)
            checked.add((model.task, model.dataset_id))
    assert checked >= {("total", i) for i in range(291, 296)} | {("total_v3", i) for i in range(831, 836)}


def test_dataset_folders_and_trainers_are_totalsegmentators():
    tasks = pytest.importorskip("totalsegmentator.map_tasks_config")
    for task in ("total", "total_v3"):
        modes = tasks.TASK_CONFIGS[task]["sub_modes"]
        models = [totalseg_model(name, task) for name in TOTALSEG_DEFAULT_MODE]
        assert [m.dataset_id for m in models] == modes["default"]["task_id"]  # in the order it runs them
        assert {m.trainer for m in models} == {modes["default"]["trainer"]}
        fast = totalseg_model("totalseg-3mm", task)
        assert (fast.dataset_id, fast.trainer) == (modes["fast"]["task_id"], modes["fast"]["trainer"])
        for model in [*models, fast]:
            assert model.folder == tasks.TASK_ID_WEIGHTS_CONFIGS[model.dataset_id]["foldername"]
            assert model.plans == "nnUNetPlans" and tasks.DEFAULT_CONFIG["plans"] is None  # its default plans
    with pytest.raises(ValueError, match="no model of TotalSegmentator"):
        totalseg_model("resenc-l", "total")


def test_part_model_folder_is_where_totalsegmentator_looks_and_loads_in_nnunet(tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    results = tmp_path / "home" / "nnunet" / "results"
    labels = {i: f"part_class_{i}" for i in range(1, 19)}
    folder = write_preset_model_folder("totalseg-1.5mm-cardiac", results, seed=3, totalseg="total", labels=labels)
    model = totalseg_model("totalseg-1.5mm-cardiac", "total")
    assert folder == results / model.folder / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
    for name in TOTALSEG_DEFAULT_MODE:  # the other parts' dataset folders, for nnU-Net's search by id
        (results / totalseg_model(name, "total").folder).mkdir(parents=True, exist_ok=True)
    # the folder TotalSegmentator's nnUNetv2_predict asks nnU-Net for, with nnUNet_results its weights folder
    code = ("from nnunetv2.utilities.file_path_utilities import get_output_folder; import json; "
            "print(json.dumps({i: get_output_folder(i, 'nnUNetTrainerNoMirroring', 'nnUNetPlans', '3d_fullres') "
            "for i in range(291, 296)}))")
    env = {**os.environ, "nnUNet_results": str(results), "nnUNet_raw": str(results),
           "nnUNet_preprocessed": str(results), "TUCKER_HOOK": "0"}
    asked = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                      check=True).stdout.splitlines()[-1])
    for name in TOTALSEG_DEFAULT_MODE:
        part = totalseg_model(name, "total")
        assert asked[str(part.dataset_id)] == str(results / part.folder / part.model_folder_name)

    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainerNoMirroring"
    assert checkpoint["inference_allowed_mirroring_axes"] is None  # as that trainer saves it
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,))
    assert predictor.label_manager.num_segmentation_heads == 19 and predictor.allowed_mirroring_axes is None
    assert json.loads((folder / "dataset.json").read_text())["labels"]["part_class_18"] == 18
    assert json.loads((folder / "plans.json").read_text())["dataset_name"] == model.folder
    with pytest.raises(ValueError, match="segments 18 classes"):
        write_preset_model_folder("totalseg-1.5mm-cardiac", tmp_path / "other", labels={1: "a"})


def _narrowed(plans_name: str, divisor: int = 8) -> dict:
    """Shipped plans whose 3d_fullres network has `divisor` times fewer features per stage (a quick test)."""
    plans = shipped_plans(plans_name)
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [f // divisor for f in kwargs["features_per_stage"]]
    return plans


def test_resenc_model_folder_loads_in_nnunet(tmp_path, monkeypatch):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    monkeypatch.setattr(presets, "shipped_plans", _narrowed)  # the same plans, a small network
    folder = write_preset_model_folder("resenc-l", tmp_path, seed=1)
    assert folder == tmp_path / "Dataset988_RandomResEncL" / "nnUNetTrainer__nnUNetResEncUNetLPlans__3d_fullres"
    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), (0,))
    assert type(predictor.network) is ResidualEncoderUNet
    assert list(predictor.configuration_manager.patch_size) == [192, 192, 192]
    assert predictor.plans_manager.plans_name == "nnUNetResEncUNetLPlans"
    loaded = predictor.network.state_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        reference = build_preset("resenc-l")[0].state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.parametrize("name", ["resenc-m", "resenc-l"])
def test_resenc_presets_are_what_nnunets_planner_plans(name, tmp_path):
    """The shipped plans are what the installed nnU-Net's planner writes (``python -m
    nnunet_tucker.tools.presets`` regenerates them when it plans differently), and the preset says what they say."""
    p = PRESETS[name]
    shipped = shipped_plans(p.plans_name)
    assert plan_with_nnunet(name, tmp_path) == shipped
    configuration = shipped["configurations"]["3d_fullres"]
    kwargs = configuration["architecture"]["arch_kwargs"]
    assert configuration["architecture"]["network_class_name"].endswith(".ResidualEncoderUNet")
    assert shipped["experiment_planner_used"] == p.planner and shipped["plans_name"] == p.plans_name
    assert (tuple(configuration["patch_size"]), tuple(configuration["spacing"])) == (p.patch_size, p.spacing)
    assert tuple(kwargs["features_per_stage"]) == p.features and kwargs["n_blocks_per_stage"] == [1, 3, 4, 6, 6, 6]
    assert kwargs["n_conv_per_stage_decoder"] == [1] * 5


@pytest.mark.parametrize("block, policy", [(BasicBlockD, "auto"), (BasicBlockD, "profiled"), (BottleneckD, "auto")])
def test_compressed_residual_encoder_computes_what_the_three_convolutions_compute(block, policy):
    """ResEnc L's planned architecture, narrowed (and with bottleneck blocks): the inference forms (instance
    norms fused into the last GEMM, skips read in place, folded upsampling) give the outputs of the plain
    forms (training mode: each convolution as three, the norm on its own, concatenated skips)."""
    architecture = _narrowed("nnUNetResEncUNetLPlans")["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    features = architecture["features_per_stage"]
    torch.manual_seed(0)
    network = ResidualEncoderUNet(
        input_channels=1, n_stages=architecture["n_stages"], features_per_stage=features, conv_op=torch.nn.Conv3d,
        kernel_sizes=architecture["kernel_sizes"], strides=architecture["strides"],
        n_blocks_per_stage=architecture["n_blocks_per_stage"], num_classes=5,
        n_conv_per_stage_decoder=architecture["n_conv_per_stage_decoder"], conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, block=block, bottleneck_channels=[max(f // 2, 2) for f in features],
    ).eval()
    with torch.no_grad():
        for m in network.modules():
            if isinstance(m, torch.nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    shape = (1, 1, 64, 32, 32)  # 2x1x1 at the sixth stage
    compressed = copy.deepcopy(network)
    report = compress_network(compressed, TuckerConfig(0.3, policy=policy, rank_min=2), shape)
    assert report.decomposed_layers > 0
    if policy == "auto":  # residual blocks' convolutions decomposed, their norms fused
        block_convs = [m for b in compressed.modules() if isinstance(b, block) for m in b.modules()]
        assert any(isinstance(m, TuckerConv) and m.norm is not None for m in block_convs)
        assert any(isinstance(m, FusedInstanceNorm) for m in block_convs)
        residual = [layer for layer in report.layers if layer.in_residual_block]  # and the log line counts them
        decomposed = sum(isinstance(m, TuckerConv) for m in block_convs)
        assert sum(layer.ranks is not None for layer in residual) == decomposed
        assert f" convolutions decomposed, {decomposed}/{len(residual)} in residual blocks, " in report.summary()
    x = torch.randn(shape)
    with torch.no_grad():
        fast = compressed(x)
        compressed.train()
        plain = compressed(x)
    assert scaled_error(fast, plain) < 1e-4  # float32 rounding: the norms' statistics taken two ways
