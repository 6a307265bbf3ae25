"""What the OpenVINO backend costs at load: the first load of a compressed model (conversion, check, compile) and
every later one (from the cache), and what `auto` adds to time both backends once.

    python benchmarks/backend_load.py [--presets totalseg-3mm totalseg-1.5mm-organs resenc-l] [--ratio 0.3]
                                      [--out FILE] [--work-dir DIR]

Per preset: writes it as a model folder (random weights, one fold), then loads it with a `TuckerPredictor` asking
for `TuckerConfig(ratio, calibration="none")` (weights alone: calibration is not what is measured) three times in
one process, on a fresh cache: ``TUCKER_BACKEND=openvino`` (first load: decomposition, conversion, check against
PyTorch on one patch, compile), again (from the cache), and ``auto`` (the converted model from the cache, both
backends timed on one patch). Writes one JSON object to ``--out`` (default
``benchmarks/results/backend_load_cpu_<threads>cores.json``) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnunet_tucker import TuckerConfig
from nnunet_tucker.nnunet.predictor import TuckerPredictor
from nnunet_tucker.tools.presets import write_preset_model_folder

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = ("totalseg-3mm", "totalseg-1.5mm-organs", "resenc-l")


def load(model: Path, config: TuckerConfig) -> tuple[dict, float]:
    """The report's backend record and the seconds of one load of `model` compressed as `config` says."""
    start = time.perf_counter()
    predictor = TuckerPredictor(device=torch.device("cpu"), tucker_config=config, use_mirroring=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    return predictor.tucker_report.extra["backend"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=RESULTS / f"backend_load_cpu_{torch.get_num_threads()}cores.json")
    parser.add_argument("--work-dir", type=Path, help="keep the model folders and the cache here")
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="nnunet_tucker_backend_load_"))
    rows = []
    for preset in args.presets:
        os.environ["TUCKER_CACHE_DIR"] = str(work / "cache" / preset)  # fresh per preset
        model = write_preset_model_folder(preset, work / "models")
        row = {"preset": preset}
        for label, backend in (("first", "openvino"), ("later", "openvino"), ("auto", "auto")):
            choice, seconds = load(model, TuckerConfig(args.ratio, calibration="none", backend=backend))
            row[label] = {"load_seconds": round(seconds, 2), **choice}
            print(f"{preset} {label}: load {seconds:.1f} s, {choice}", file=sys.stderr, flush=True)
        rows.append(row)
    result = {
        "command": "python benchmarks/backend_load.py " + shlex.join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "openvino": __import__("openvino").__version__, "ratio": args.ratio,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
