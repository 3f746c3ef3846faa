"""``benchmarks/train_step.py --search-longest --search-only`` on the CPU: the search alone, without
the throughput rows at the searched length (the form issue 20's 1M-token search runs in on an H200)."""

import importlib.util
import json
import pathlib

_ROOT = pathlib.Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("train_step_benchmark", _ROOT / "benchmarks" / "train_step.py")
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


def test_search_only_doubles_to_the_cap_without_throughput_rows(tmp_path, capsys):
    out = tmp_path / "longest.json"
    argv = ["--smoke", "--sp", "1", "--search-longest", "--search-only", "--search-remat", "offload"]
    argv += ["--tokens-per-device", "128", "--max-tokens", "256", "--granularity", "128", "--json", str(out)]
    assert train_step.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == []  # no throughput row compiled at the searched length
    (longest,) = result["longest"]
    assert longest["preset"] == "tnl-tiny" and longest["remat"] == "offload"
    assert [t["tokens_per_device"] for t in longest["tried"]] == [128, 256]
    assert all(t["ok"] and t["step_ms"] > 0 for t in longest["tried"])
    assert longest["longest_tokens_per_device"] == 256 and longest["capped_by_max_tokens"]
    printed = capsys.readouterr().out
    assert "tnl-tiny sp=1: 256 tokens per device" in printed and "MFU" not in printed
