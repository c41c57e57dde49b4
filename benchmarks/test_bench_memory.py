"""bench_memory's smoke tier: the projection is exact on a peak that is the fp16 model itself, and one scenario runs
end to end in its child process on a tiny checkpoint (no memory figure asserted: the machine decides them)."""

import bench_memory
import pytest


def test_a_peak_of_one_fp16_model_projects_to_the_targets_fp16_model():
    shape = bench_memory.QUICK_SHAPE
    results = []
    for layers in (2, 4):
        size = bench_memory.sizes(shape, layers)
        for scenario in ("fp16-load", "quantize-gptq"):
            results.append(dict(scenario=scenario, layers=layers, peak_anon=size["fp16"], steady_anon=size["fp16"]))
    projected = bench_memory.projections(results, shape)
    for rows in projected.values():
        fp16 = rows["sizes"]["fp16"]
        assert rows["fp16-load"]["peak_anon"] == pytest.approx(fp16, rel=1e-9)
        assert rows["gptq_parts"]["projected"] >= rows["gptq_parts"]["total"]
    assert projected["phixtral-4x2_8"]["sizes"]["fp16"] == pytest.approx(15.63e9, rel=1e-3)


def test_a_scenario_runs_in_its_child(tmp_path):
    model = bench_memory.make_checkpoint(tmp_path / "fp16", bench_memory.QUICK_SHAPE, 1)
    r = bench_memory.run_child("quantize-on-load", model, tmp_path / "out", "cpu")
    assert "error" not in r, r
    assert r["packed"] > 0 and r["cpu_packed"] == 0 and r["peak_anon"] >= r["steady_anon"]
    assert set(bench_memory.rss()) == {"anon", "file"}
