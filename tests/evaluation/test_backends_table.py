"""The table of benchmarks/backends.py (three backends, one run), on made-up rows."""

from __future__ import annotations

import pytest
from helpers import load_script


def _bench():
    return load_script("benchmarks/backends.py", "backends_bench")


def _row(hf_s: float, vllm_s: float, same: bool = True) -> dict:
    cell = {"items": 200.0, "merge": 0.01, "same_items": True, "same_correct": True,
            "max_diff": 0.0}
    return {"hf": cell | {"evaluate": hf_s}, "vllm": cell | {"evaluate": vllm_s,
                                                              "same_correct": same}}


def test_rates_are_medians_after_the_first_candidate_and_checks_count_every_one():
    bench = _bench()
    res = {"backends": ["hf", "vllm"], "candidates": 4, "limit": 50, "batch_size": 64,
           "threads": 1, "start": {"hf": 0.1, "vllm": 60.0}, "versions": {"vllm": "x"},
           "rows": [_row(100.0, 100.0, same=False), _row(1.0, 0.5), _row(2.0, 0.5),
                    _row(4.0, 1.0)]}
    text = bench.markdown(res)
    assert "| hf | 200 | 100.0 (50.0-200.0) | 2.00 |" in text  # the first row left out
    assert "| vllm | 200 | 400.0 (200.0-400.0) | 0.50 |" in text
    assert "| 4/4 | 3/4 |" in text  # same items 4/4, same answers 3/4 (the first differed)
    assert "vllm 4.00x" in text


def test_bad_backend_names_are_refused(capsys: pytest.CaptureFixture[str]):
    assert _bench().main(["--backends", "hf,tgi"]) == 2
    assert "--backends" in capsys.readouterr().err
