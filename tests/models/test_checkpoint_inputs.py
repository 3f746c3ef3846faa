"""Resuming with changed settings or from a damaged checkpoint: what may change does, what may not
is refused naming the fields, and nothing fails with a bare orbax / pytree error (a helper's review
of checkpoint / resume, session 26)."""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from models.checkpoint import read_config
from models.train import Trainer
from models.train_config import RunConfig
from tests.models.common import replace, small_model, train_config


def _run(config, lines=None, **fit):
    log = (lambda *a: lines.append(" ".join(map(str, a)))) if lines is not None else (lambda *a: None)
    return Trainer(config, devices=jax.devices()[:1], log=log).fit(**fit)


@pytest.fixture
def saved(tmp_path):
    """A 2-step run checkpointed at steps 1 and 2; its config."""
    config = train_config(steps=2, model=small_model(n_layers=1), run=dict(ckpt_dir=str(tmp_path / "ck"), ckpt_every=1))
    _run(config)
    return config


def _with(config, *, model=None, steps=None, **optim):
    """``config`` with another model, run.steps or optimizer fields."""
    config = dataclasses.replace(config, model=model or config.model)
    if steps is not None:
        config = replace(config, "run", steps=steps)
    return replace(config, "optim", **optim) if optim else config


def test_settings_that_keep_the_parameters_may_change_at_resume(saved):
    """README: a run can switch split_projections when it resumes; it was refused as "another model"."""
    model = saved.model.replace(split_projections=not saved.model.split_projections, mlp_chunk=8)
    resumed = _run(_with(saved, model=model, steps=3))
    assert sorted(resumed["losses"]) == [3] and np.isfinite(resumed["losses"][3])


def test_another_model_is_refused_naming_the_fields(saved):
    with pytest.raises(ValueError, match=r"another model: d_model 32 -> 64 \(model\.\)"):
        _run(_with(saved, model=saved.model.replace(d_model=64), steps=3))


def test_changed_optimizer_and_data_settings_are_logged(saved):
    lines = []
    _run(_with(saved, steps=3, lr=5e-3), lines)
    line = next(x for x in lines if "settings other than the checkpoint's" in x)
    assert "optim.lr 0.01 -> 0.005" in line and "run.steps 2 -> 3" in line


def test_steps_below_the_checkpoint_say_nothing_is_trained(saved):
    lines = []
    result = _run(_with(saved, steps=1), lines)
    assert result["losses"] == {} and any(
        "nothing to train: the checkpoint is at step 2, run.steps=1" in x for x in lines
    )


def test_damaged_newest_step_names_its_folder_and_the_way_back(saved):
    ckpt = saved.run.ckpt_dir
    shutil.rmtree(os.path.join(ckpt, "2", "state"))
    with pytest.raises(
        ValueError, match=r"cannot restore the train state of .*ck/2 .*remove .*ck/2 to resume from step 1"
    ):
        _run(_with(saved, steps=3))
    shutil.rmtree(os.path.join(ckpt, "2"))
    assert sorted(_run(_with(saved, steps=3))["losses"]) == [2, 3]


def test_init_from_another_shape_names_the_parameters(saved):
    wider = _with(saved, model=saved.model.replace(d_model=64))
    config = replace(wider, "run", ckpt_dir=None, init_from=saved.run.ckpt_dir, steps=1)
    with pytest.raises(
        ValueError, match=r"init_from=.*ck' holds parameters of another shape than this model's: .*\(32, "
    ):
        _run(config)


def test_missing_checkpoint_folder_raises_and_is_not_created(tmp_path):
    missing = tmp_path / "typo"
    with pytest.raises(ValueError, match=r"no checkpoint found in ckpt_dir=.*typo"):
        read_config(str(missing))
    assert not missing.exists()


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("keep", 0, "run.keep must be >= 1"),
        ("log_every", 0, "run.log_every must be >= 1"),
        ("ckpt_every", -2, "run.ckpt_every must be >= 0"),
        ("time_limit_s", 0.0, "run.time_limit_s must be positive"),
    ],
)
def test_run_settings_that_cannot_work_are_refused(field, value, match):
    """keep=0 deleted every checkpoint (the final one too); log_every=0 crashed after the first step."""
    with pytest.raises(ValueError, match=match):
        RunConfig(**{field: value})
