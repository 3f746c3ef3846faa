"""Configs that cannot train are refused with the field named (session 26's review of the command
line): optimizer values (a zero or negative learning rate trained nothing, silently), and ``--config``
files that are missing, not JSON, or name unknown sections or fields (tracebacks before)."""

from __future__ import annotations

import json

import pytest

from models.cli import config_from_args
from models.train import main
from models.train_config import OptimConfig


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("lr", 0.0, r"optim.lr must be finite and > 0, got lr=0.0"),
        ("lr", float("nan"), r"optim.lr must be finite"),
        ("weight_decay", -0.1, r"optim.weight_decay must be finite and >= 0"),
        ("warmup_steps", -1, r"optim.warmup_steps must be finite and >= 0"),
        ("b2", 1.0, r"optim.b2 must be finite and in \[0, 1\)"),
        ("min_lr_ratio", 2.0, r"optim.min_lr_ratio must be finite and in \[0, 1\]"),
    ],
)
def test_optimizer_values_that_cannot_train_raise(field, value, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**{field: value})


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "no such file"),
        ("{not json", "is not JSON"),
        ({"bogus": {}}, r"unknown section 'bogus'"),
        ({"run": {"stepz": 3}}, r"unknown run fields \['stepz'\]"),
        ({"run": 3}, r"must hold \{section: \{field: value\}\} objects"),
    ],
    ids=["missing", "not-json", "unknown-section", "unknown-field", "not-a-section"],
)
def test_bad_config_files_raise_naming_the_problem(tmp_path, content, match, capsys):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match):
        config_from_args(["--preset", "tiny", "--config", str(path)])
    assert main(["--preset", "tiny", "--config", str(path)]) == 2
    assert "lasp-train: error: --config" in capsys.readouterr().err


def test_a_good_config_file_still_applies(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"run": {"steps": 7}, "optim": {"lr": 1e-3}}))
    config = config_from_args(["--preset", "tiny", "--config", str(path)])
    assert config.run.steps == 7 and config.optim.lr == 1e-3


def test_config_file_values_take_the_fields_types(tmp_path):
    """A JSON string "false" for a boolean was a true string: tie_embeddings went on silently."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"tie_embeddings": "false"}, "run": {"steps": "3"}, "optim": {"lr": 1}}))
    config = config_from_args(["--preset", "tiny", "--config", str(path)])
    assert config.model.tie_embeddings is False and config.run.steps == 3
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    for bad, match in [
        ({"data": {"batch_size": 8.0}}, "data.batch_size must be int, got 8.0"),
        ({"run": {"progress": "maybe"}}, "run.progress: expected a boolean"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            config_from_args(["--preset", "tiny", "--config", str(path)])


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("norm_eps", -1.0, "norm_eps must be a positive number"),
        ("init_std", -1.0, "init_std must be a positive"),
        ("mlp_chunk", -5, "mlp_chunk must be an int >= 0"),
    ],
)
def test_model_values_that_cannot_train_raise(field, value, match):
    """norm_eps=-1 trained to a NaN loss with exit code 0."""
    from models.config import get_config

    with pytest.raises(ValueError, match=match):
        get_config("tiny", **{field: value})


def test_negative_peak_flops_raise():
    from models.train_config import RunConfig

    with pytest.raises(ValueError, match="run.peak_tflops must be positive"):
        RunConfig(peak_tflops=-1.0)
