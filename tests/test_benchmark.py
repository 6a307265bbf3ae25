import json

from networks import build

from nnunet_tucker import TuckerConfig
from nnunet_tucker.benchmark import benchmark, to_table, write_outputs


def test_interleaved_timings_and_outputs(tmp_path):
    net, shape = build("plain3d")
    timings = benchmark(net, shape, [TuckerConfig(0.5, rank_min=2), TuckerConfig(0.3, rank_min=2)], rounds=2)
    assert [t.name for t in timings] == ["original", "auto 0.5", "auto 0.3"]
    assert all(len(t.seconds) == 2 for t in timings) and timings[0].speedup == 1.0
    assert timings[2].macs < timings[1].macs < timings[0].macs and timings[2].mac_reduction > 1
    assert "speed-up" in to_table(timings)
    write_outputs(timings, {"title": "t"}, tmp_path / "b.json", tmp_path / "b.png")
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["variants"][1]["median"] > 0 and (tmp_path / "b.png").stat().st_size > 1000
