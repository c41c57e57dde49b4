"""bench_serve end to end on a small workload (one server, 3 clients, one round, the fault checks): the harness stays
alive in CI. One mode only, since a server takes seconds to start on a busy machine. No timing is asserted."""

import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

import bench_serve  # noqa: E402


def test_bench_serve_runs_end_to_end_with_the_faults(tmp_path, capsys):
    argv = ["--quick", "--clients", "3", "--rounds", "1", "--modes", "continuous", "--faults", "--backend", "torch",
            "--out", str(tmp_path)]  # fmt: skip
    result = bench_serve.main(argv)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["same_answers"] is True
    assert [r["mode"] for r in result["rounds"]] == ["continuous"] and result["rounds"][0]["tokens"] > 0
    statuses = {name: row["status"] for name, row in result["faults"].items()}
    assert statuses == {"10MB prompt": 400, "2000 stop strings of 800 chars": 400, "200 prompts": 400,
                        "Content-Type: text/plain": 415, "foreign Host": 403, "foreign Origin": 403,
                        "health after": 200}  # fmt: skip
    assert (tmp_path / "bench_serve.json").exists()
