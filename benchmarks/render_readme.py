"""Render the benchmark numbers of README.md and docs/ from the results files in benchmarks/results/.

    python benchmarks/render_readme.py           # rewrite every block between its markers
    python benchmarks/render_readme.py --check   # exit 1 where a block differs from what would be rendered

A block is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in one of the files of
`BLOCKS`; it is rendered from JSON files only (a measurement kept in Markdown gets a JSON copy next to it,
which names the section it comes from). Numbers are printed as the results files hold them, or rounded
as the benchmark's own Markdown rounds them; ranges are the smallest and largest of the runs.
tests/test_readme.py fails when a block differs from what this script renders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

SPEED = "speed_cpu_2cores.json"  # forward pass, 3 mm network (copy of the newest section of speed_cpu_2cores.md)
WHOLE_RUN = "whole_run_backends_cpu/whole_run.json"  # --fast --ml, both backends (README: the PyTorch forms)
FIRST_RUN = "first_run_overhead_cpu_2cores.json"
FIRST_RUN_1P5MM = "first_run_overhead_1p5mm_cpu_2cores.json"
WHOLE_RUN_TOTAL = "whole_run_total_clinical_cpu/whole_run_total.json"  # TotalSegmentator's default mode, five models
PRESETS = "speed_presets_cpu_2cores.json"  # forward pass, 1.5 mm part and ResEnc M/L (bench --json)
WHOLE_RUN_PREDICT = "whole_run_predict_cpu/whole_run_predict.json"  # nnUNetv2_predict, ResEnc L
FIDELITY = "fidelity_cpu.json"  # copy of the newest section of fidelity_cpu.md
BACKENDS = "speed_backends_cpu_2cores.json"  # forward pass, PyTorch vs OpenVINO (bench --backends torch openvino)
BACKEND_LOAD = "backend_load_cpu_2cores.json"  # the OpenVINO backend's first and later loads
GPU_FORWARD = "whole_run_cuda_h200/forward_cuda_3mm.json"
GPU_WHOLE_RUN = "whole_run_cuda_h200/whole_run.json"


def load(name: str, results: Path = RESULTS) -> dict:
    with open(results / name) as f:
        return json.load(f)


def _span(values: list[float], digits: int) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else f"{low:.{digits}f}–{high:.{digits}f}"


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape))


def _by_name(entries: list[dict]) -> dict[str, dict]:
    return {entry["name"]: entry for entry in entries}


def _totalseg_runs(whole: dict) -> tuple[dict, dict]:
    """The original TotalSegmentator run of a whole-run file and the compressed one on the PyTorch forms."""
    original, *compressed = whole["totalsegmentator"]
    return original, next((c for c in compressed if c["name"].endswith(", torch")), compressed[0])


def _with_huge_pages(total: dict) -> str:
    """The original's time with PyTorch's 2 MB pages, which compressing processes use, where the file has it."""
    reference = total.get("original_with_huge_pages")
    if reference is None:
        return ""
    return f"; the original with 2 MB pages, as compressed runs have them: {reference['seconds']:.0f} s"


def _default_mode_runs(total: dict, run: str) -> list[dict]:
    """The original's and the compressed variant's `run` ("first" or "later") rows of a default-mode file; the
    original's first where it ran once (it caches nothing)."""
    rows = {(r["variant"], r["run"]): r for r in total["summary"]}
    original = rows.get(("original", run)) or rows["original", "first"]
    return [original, rows[f"ratio {total['config']['rank_ratio']}", run]]


def _worst(row: dict) -> float:
    return min(row["dice_vs_original"].values())


def _shown(stage: str, *runs: dict) -> bool:
    """Whether a stage takes a tenth of a second or more in any of `runs` (else its row says nothing)."""
    return any(round(run["stage_medians"][stage], 1) > 0 for run in runs)


def _fidelity_row(fidelity: dict, target: str, variant: str) -> dict:
    (row,) = [r for r in fidelity["rows"] if r["target"] == target and r["variant"] == variant]
    return row


# ------------------------------------------------------------------------------------------------ README
def results_table(to_results: str = "benchmarks/results", results: Path = RESULTS) -> str:
    """README's table: today's gains, one row per measurement, each with the file it comes from."""
    speed, whole, first, fidelity, total = (load(n, results) for n in (SPEED, WHOLE_RUN, FIRST_RUN, FIDELITY,
                                                                        WHOLE_RUN_TOTAL))
    total_later, total_first = (_default_mode_runs(total, run) for run in ("later", "first"))
    predict = load(WHOLE_RUN_PREDICT, results)
    predict_runs = {(r["variant"], r["run"]): r for r in predict["summary"]}
    compressed = f"ratio {predict['config']['rank_ratio']}"
    predict_later, predict_first = ([predict_runs[v, run] for v in ("original", compressed)]
                                    for run in ("later", "first"))
    runs = speed["runs"]
    presets = [next(s for s in load(PRESETS, results)["sections"] if s["source"] == name)
               for name in ("totalseg-1.5mm-organs", "resenc-l")]
    ts_original, ts_compressed = _totalseg_runs(whole)
    in_process = _by_name(whole["in_process"])
    in_original, in_compressed = in_process["original"], in_process[f"ratio {whole['config']['rank_ratio']}"]
    self_cal = _fidelity_row(fidelity, "ratio 0.3", "self-calibrated")
    folder = _fidelity_row(fidelity, "ratio 0.3", f"calibrated on {fidelity['calibration_cases']} cases")
    weights = _fidelity_row(fidelity, "ratio 0.3", "weights only")
    return "\n".join([
        f"Rank ratio 0.3, {speed['cpus']} CPU cores, fp32, `{speed['policy']}` policy (the default); rendered from "
        "the results files by `python benchmarks/render_readme.py`:",
        "",
        "| measured | original | compressed | gain | results |",
        "|---|---|---|---|---|",
        f"| one forward pass, TotalSegmentator 3 mm network ({_shape(speed['patch'])} patch), "
        f"{len(runs)} runs | {_span([r['median_s']['original'] for r in runs], 2)} s | "
        f"{_span([r['median_s']['0.3'] for r in runs], 2)} s ({speed['gmacs_kept']['0.3']} GMACs, "
        f"{speed['fewer_macs']['0.3']}× fewer) | **{_span([r['speedup']['0.3'] for r in runs], 2)}×** "
        f"(ratio 0.1: {_span([r['speedup']['0.1'] for r in runs], 2)}×) | [speed]({to_results}/{SPEED}) |",
        *[f"| one forward pass, {name} ({_shape(section['input_shape'][2:])} patch) | {original['median']:.2f} s | "
          f"{compressed['median']:.2f} s ({compressed['macs'] / 1e9:.1f} GMACs, {compressed['mac_reduction']:.1f}× "
          f"fewer) | **{compressed['speedup']:.2f}×** | [presets]({to_results}/{PRESETS}) |"
          for name, section in zip(("TotalSegmentator 1.5 mm part", "nnU-Net ResEnc L"), presets, strict=True)
          for original, compressed in [section["variants"]]],
        f"| `{ts_original['name']} -d {whole['device']}`, {_shape(whole['ct_shape_zyx'][::-1])} CT, whole process | "
        f"{ts_original['median']:.1f} s | {ts_compressed['median']:.1f} s | **{ts_compressed['speedup']:.2f}×** | "
        f"[whole run]({to_results}/{WHOLE_RUN}) |",
        f"| nnU-Net's prediction in process, {_shape(whole['identical_segmentations']['image_shape'])} at 3 mm | "
        f"{in_original['median']:.1f} s | {in_compressed['median']:.1f} s | **{in_compressed['speedup']:.2f}×** | "
        f"[whole run]({to_results}/{WHOLE_RUN}) |",
        f"| `TotalSegmentator -d cpu`, default mode (five 1.5 mm models), {_shape(total['ct_shape_zyx'][::-1])} CT, "
        f"whole process, later runs | {total_later[0]['seconds']:.0f} s | {total_later[1]['seconds']:.0f} s | "
        f"**{total_later[1]['speedup']:.2f}×** (first run, calibrating all five: {total_first[0]['seconds']:.0f} → "
        f"{total_first[1]['seconds']:.0f} s, {total_first[1]['speedup']:.2f}×; peak memory "
        f"{total_first[0]['peak_tree_mb'] / 1000:.1f} → {total_first[1]['peak_tree_mb'] / 1000:.1f} GB first, "
        f"{total_later[1]['peak_tree_mb'] / 1000:.1f} GB later{_with_huge_pages(total)}) | "
        f"[default mode]({to_results}/{WHOLE_RUN_TOTAL}) |",
        f"| `nnUNetv2_predict -device cpu --disable_tta`, nnU-Net ResEnc L, one "
        f"{_shape(predict['case_shape_zyx'][::-1])} case at 1.5 mm, whole process, later runs | "
        f"{predict_later[0]['seconds']:.1f} s | {predict_later[1]['seconds']:.1f} s | "
        f"**{predict_later[1]['speedup']:.2f}×** (first run, calibrating: {predict_first[0]['seconds']:.0f} → "
        f"{predict_first[1]['seconds']:.0f} s; peak RSS {predict_later[0]['peak_rss_mb'] / 1024:.1f} → "
        f"{predict_later[1]['peak_rss_mb'] / 1024:.1f} GB, first run {predict_first[1]['peak_rss_mb'] / 1024:.1f} GB) "
        f"| [ResEnc L]({to_results}/{WHOLE_RUN_PREDICT}) |",
        f"| first run only: calibrate on the first case, profile the CPU, fit, time the backend (once per model) | | "
        f"+{first['first_case_overhead_s']} s; later runs load it in {first['second_run_load_s']} s | | "
        f"[first run]({to_results}/{FIRST_RUN}) |",
        f"| worst-class Dice vs the original, half-width model trained on phantoms, {fidelity['held_out_cases']} "
        "held-out cases | "
        f"1.000 | {_worst(self_cal):.3f} self-calibrated ({_worst(folder):.3f} on a folder of "
        f"{fidelity['calibration_cases']} cases) | weights alone: {_worst(weights):.3f} | "
        f"[fidelity]({to_results}/{FIDELITY}) |",
    ])


# ----------------------------------------------------------------------------------------------- docs/
def speed_forward_table(to_results: str = "../benchmarks/results", results: Path = RESULTS) -> str:
    """docs/speed.md: the forward pass of the 3 mm network at three ratios, run by run."""
    speed = load(SPEED, results)
    ratios = [k for k in speed["runs"][0]["speedup"]]
    lines = [
        f"`{speed['command']}` on {speed['cpus']} CPU cores, {speed['date']} "
        f"([{SPEED}]({to_results}/{SPEED})), medians in s:",
        "",
        "| run | original | " + " | ".join(f"ratio {r}" for r in ratios) + " | "
        + " | ".join(f"{r} speed-up" for r in ratios) + " |",
        "|---" * (2 + 2 * len(ratios)) + "|",
    ]
    for run in speed["runs"]:
        lines.append(f"| {run['run']} | {run['median_s']['original']:.2f} | "
                     + " | ".join(f"{run['median_s'][r]:.2f}" for r in ratios) + " | "
                     + " | ".join(f"{run['speedup'][r]:.2f}×" for r in ratios) + " |")
    return "\n".join(lines)


def backends_table(to_results: str = "../benchmarks/results", results: Path = RESULTS) -> str:
    """docs/speed.md: the forward pass run by PyTorch and by OpenVINO, original and compressed, per network; and what
    the OpenVINO backend costs at load."""
    sections = load(BACKENDS, results)["sections"]
    loads = {row["preset"]: row for row in load(BACKEND_LOAD, results)["rows"]}
    lines = [f"Medians of {sections[0]['rounds']} interleaved rounds, {sections[0]['threads']} CPU threads, fp32, "
             f"ratio 0.3 (`profiled` ranks, timed for PyTorch) ([{BACKENDS}]({to_results}/{BACKENDS}); loads: "
             f"[{BACKEND_LOAD}]({to_results}/{BACKEND_LOAD})):", "",
             "| network, one patch | PyTorch original | OpenVINO original | PyTorch forms, compressed | OpenVINO, "
             "compressed | OpenVINO vs PyTorch forms | first load: conversion | later load: from the cache |",
             "|---|---|---|---|---|---|---|---|"]
    for section in sections:
        v = _by_name(section["variants"])
        compressed = next(name for name in v if name != "original" and not name.endswith(" openvino"))
        ov, torch_ = v[f"{compressed} openvino"], v[compressed]
        row = loads.get(section["source"])
        load_cells = (f"{row['first']['conversion_seconds']:.1f} s | {row['later']['conversion_seconds']:.1f} s"
                      if row else "— | —")
        lines.append(
            f"| {section['source']} ({_shape(section['input_shape'][2:])}) | {v['original']['median']:.2f} s | "
            f"{v['original openvino']['median']:.2f} s ({v['original openvino']['speedup']:.2f}×) | "
            f"{torch_['median']:.2f} s ({torch_['speedup']:.2f}×) | {ov['median']:.2f} s ({ov['speedup']:.2f}×) | "
            f"{torch_['median'] / ov['median']:.2f}× | {load_cells} |")
    return "\n".join(lines)


def whole_run_table(to_results: str = "../benchmarks/results", results: Path = RESULTS) -> str:
    """docs/speed.md: the whole run by stage, TotalSegmentator's CLI and nnU-Net in process."""
    whole = load(WHOLE_RUN, results)
    original, compressed = _totalseg_runs(whole)
    in_process = _by_name(whole["in_process"])
    ratio = f"ratio {whole['config']['rank_ratio']}"
    in_original, in_ours = in_process["original"], in_process[ratio]
    in_nnunet = in_process[f"{ratio}, nnU-Net's pipeline"]
    same = whole["identical_segmentations"]
    lines = [
        f"Ratio {whole['config']['rank_ratio']}, {whole['cpus']} CPU cores, medians of {whole['rounds']} timed rounds "
        f"in s ([whole_run.json]({to_results}/{WHOLE_RUN}), [whole_run.md]({to_results}/"
        f"{WHOLE_RUN.replace('.json', '.md')}); compressed: the PyTorch forms):",
        "",
        "| run | original | compressed | speed-up |",
        "|---|---|---|---|",
        f"| `{original['name']} -d {whole['device']}`, {_shape(whole['ct_shape_zyx'][::-1])} CT, whole process | "
        f"{original['median']:.1f} | {compressed['median']:.1f} | {compressed['speedup']:.2f}× |",
    ]
    lines += [f"| … {stage} | {original['stage_medians'][stage]:.1f} | {compressed['stage_medians'][stage]:.1f} | |"
              for stage in original["stage_medians"] if _shown(stage, original, compressed)]
    lines.append(f"| nnU-Net `predict_single_npy_array` in process, {_shape(same['image_shape'])} at 3 mm | "
                 f"{in_original['median']:.1f} | {in_ours['median']:.1f} (with nnU-Net's pipeline: "
                 f"{in_nnunet['median']:.1f}) | {in_ours['speedup']:.2f}× ({in_nnunet['speedup']:.2f}×) |")
    lines += [f"| … {stage} | {in_original['stage_medians'][stage]:.1f} | {in_ours['stage_medians'][stage]:.1f} "
              f"({in_nnunet['stage_medians'][stage]:.1f}) | |" for stage in in_original["stage_medians"]
              if _shown(stage, in_original, in_ours, in_nnunet)]
    lines += ["", f"Compressed segmentations from nnU-Net's pipeline and this package's: {same['voxels_differing']} of "
              f"{same['voxels']} voxels differ."]
    return "\n".join(lines)


def first_run_table(to_results: str = "../benchmarks/results", results: Path = RESULTS) -> str:
    """docs/method-and-calibration.md: what the first case of the first run waits for, by stage."""
    lines = [
        "| architecture | first case (preprocessed) | patches | waits | statistics and targets | planning "
        "(of which device profile) | fit and refit | later loads | results |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in (FIRST_RUN, FIRST_RUN_1P5MM):
        r = load(name, results)
        stages = r["stages_s"]
        lines.append(
            f"| {r['preset']} | {_shape(r['case_shape'])} | {r['patches']} | {r['first_case_overhead_s']} s | "
            f"{stages['statistics']} s | {stages['planning']} s ({r['profile_s']} s) | {stages['fitting']} s | "
            f"{r['second_run_load_s']} s | [{name}]({to_results}/{name}) |")
    return "\n".join(lines)


def fidelity_table(to_results: str = "../benchmarks/results", results: Path = RESULTS) -> str:
    """docs/method-and-calibration.md: Dice vs the uncompressed segmentation, per class, every variant."""
    fidelity = load(FIDELITY, results)
    classes = list(fidelity["rows"][0]["dice_vs_original"])
    lines = [
        f"{fidelity['model'][0].upper()}{fidelity['model'][1:]}, {fidelity['held_out_cases']} held-out cases, "
        f"Dice vs the uncompressed segmentation ([{FIDELITY}]({to_results}/{FIDELITY}), {fidelity['date']}):",
        "",
        "| target | variant | MACs kept | " + " | ".join(classes) + " | worst |",
        "|---" * (4 + len(classes)) + "|",
    ]
    for row in fidelity["rows"]:
        lines.append(f"| {row['target']} | {row['variant']} | {row['macs']:.1%} | "
                     + " | ".join(f"{row['dice_vs_original'][c]:.3f}" for c in classes)
                     + f" | **{_worst(row):.3f}** |")
    return "\n".join(lines)


def gpu_table(to_results: str = "../benchmarks/results", results: Path = RESULTS) -> str:
    """docs/gpu.md: the 3 mm network's forward pass and nnU-Net in process on the GPU."""
    forward, whole = load(GPU_FORWARD, results), load(GPU_WHOLE_RUN, results)
    variants, in_process = forward["variants"], whole["in_process"]
    folder = GPU_FORWARD.rpartition("/")[0]
    lines = [
        f"NVIDIA H200, torch {forward['torch']}, fp16 autocast ([{folder}/]({to_results}/{folder}/)):",
        "",
        "| measured | variant | GMACs | median | speed-up |",
        "|---|---|---|---|---|",
    ]
    measured = f"forward pass, one {_shape(forward['input_shape'][2:])} patch, {forward['rounds']} rounds"
    for i, v in enumerate(variants):
        lines.append(f"| {'' if i else measured} | {v['name']} | {v['macs'] / 1e9:.1f} | {v['median'] * 1e3:.1f} ms | "
                     f"{v['speedup']:.2f}× |")
    measured = (f"nnU-Net in process, {_shape(whole['identical_segmentations']['image_shape'])} at 3 mm, "
                f"{whole['rounds']} rounds")
    for i, v in enumerate(in_process):
        lines.append(f"| {'' if i else measured} | {v['name']} | | {v['median']:.1f} s | {v['speedup']:.2f}× |")
    return "\n".join(lines)


BLOCKS: dict[str, dict[str, Callable[..., str]]] = {
    "README.md": {"results": results_table},
    "docs/speed.md": {"speed-forward": speed_forward_table, "whole-run": whole_run_table,
                      "backends": backends_table},
    "docs/method-and-calibration.md": {"first-run": first_run_table, "fidelity": fidelity_table},
    "docs/gpu.md": {"gpu": gpu_table},
}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def block(text: str, name: str) -> str:
    """The text between the markers of block `name` (without the newlines next to the markers)."""
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"expected one {start} and one {end}")
    return text.split(start)[1].split(end)[0].strip("\n")


def rendered(path: str, name: str, results: Path = RESULTS, root: Path = ROOT) -> str:
    """What block `name` of the file `path` (relative to the repository) should hold."""
    to_results = Path(os.path.relpath(results, (root / path).parent)).as_posix()
    return BLOCKS[path][name](to_results, results)


def render_file(text: str, path: str, results: Path = RESULTS, root: Path = ROOT) -> str:
    """`text` (the file `path`) with every block of it rendered anew."""
    for name in BLOCKS[path]:
        start, end = markers(name)
        block(text, name)  # exactly one of each marker
        before, rest = text.split(start)
        after = rest.split(end)[1]
        text = f"{before}{start}\n{rendered(path, name, results, root)}\n{end}{after}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in BLOCKS:
        file = ROOT / path
        text = file.read_text()
        new = render_file(text, path)
        if new != text:
            stale.append(path)
            if not args.check:
                file.write_text(new)
    verb = "out of date" if args.check else "rendered"
    print(f"{verb}: {', '.join(stale)}" if stale else "every block is up to date")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
