"""The benchmark code runs (its --quick smoke mode), so it cannot rot; its figures are not asserted."""

from __future__ import annotations

import json

from conftest import run_cli


def test_quick_benchmark_writes_every_section(tmp_path):
    result = run_cli("benchmarks/run.py", "--quick", "--out", tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    sections = results["sections"]
    assert {"guidance", "encode", "training_loop", "train_py_cache", "end_to_end"} <= set(sections)
    assert sections["train_py_cache"]["first"]["images_encoded"] == 8
    assert sections["train_py_cache"]["rerun"]["images_encoded"] == 0
    assert set(sections["end_to_end"]["seconds"]) == {"fake_dataset", "train", "inference"}
    for name in ("stock", "ours_g0", "ours_guided"):
        assert sections["guidance"]["seconds"][name]["median"] > 0
    report = (tmp_path / "results.md").read_text()
    for heading in ("## Guidance overhead", "## Latent cache", "## Training loop", "## End to end", "## GPU"):
        assert heading in report
