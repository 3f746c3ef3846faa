"""Checkpoints of ``lasp-train`` runs (orbax): the train state and the config that produced it.

Every saved step holds two items: ``state``, the train state ``{params, opt_state, step, skipped}``
(``models.train.make_init_fn``), and ``config``, the ``TrainConfig`` as JSON (``config_to_json``).
Training saves and restores the whole state (``save``, asynchronous unless asked to wait;
``restore_state``); generation restores the parameters only (``load_model``), so it builds neither
the optimizer nor its moments. A run on a ``lasp-tokenize`` folder keeps its ``tokenizer.json`` in
the checkpoint folder too (``store_tokenizer``), so ``lasp-generate`` needs only the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from models.config import ModelConfig
from models.dataset import TOKENIZER_FILE
from models.model import LanguageModel
from models.sharding import build_mesh, tree_shardings
from models.train_config import SECTIONS, TrainConfig

ITEMS = ("state", "config")


def config_to_json(config: TrainConfig) -> dict:
    """The config as nested JSON-ready dicts ``{section: {field: value}}``."""
    return dataclasses.asdict(config)


def model_from_json(saved_model: dict) -> ModelConfig:
    """The ``ModelConfig`` of a saved config's ``model`` section."""
    model = dict(saved_model)
    if model.get("layer_types") is not None:
        model["layer_types"] = tuple(model["layer_types"])  # JSON has lists only
    return ModelConfig(**model)


def config_from_json(saved: dict) -> TrainConfig:
    """The inverse of ``config_to_json``."""
    return TrainConfig(
        model=model_from_json(saved["model"]), **{name: cls(**saved[name]) for name, cls in SECTIONS.items()}
    )


def open_manager(ckpt_dir: str, *, keep: int) -> ocp.CheckpointManager:
    """A manager that writes: asynchronous saves, the newest ``keep`` steps kept, the directory created.

    ``close()`` waits for a write still in progress."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.abspath(ckpt_dir), options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, step: int, state, config: TrainConfig, *, wait: bool = True) -> None:
    """Write ``state`` and ``config`` as step ``step``; with ``wait`` return once they are on disk.

    Without ``wait`` the write goes on in a background thread: orbax copies the arrays to host
    memory before ``manager.save`` returns (so the caller may donate or overwrite them), and the
    next save (or ``close``) waits for this one to finish.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_json(config)))
    manager.save(step, args=args, force=True)
    store_tokenizer(str(manager.directory), config)
    if wait:
        manager.wait_until_finished()


def store_tokenizer(ckpt_dir: str, config: TrainConfig) -> None:
    """Copy the data folder's ``tokenizer.json`` (a ``lasp-tokenize`` folder) into ``ckpt_dir`` (process 0)."""
    data = config.data
    if data.source != "bin" or not data.path or not os.path.isdir(data.path) or jax.process_index() != 0:
        return
    source, target = os.path.join(data.path, TOKENIZER_FILE), os.path.join(ckpt_dir, TOKENIZER_FILE)
    if os.path.exists(source) and not os.path.exists(target):
        shutil.copyfile(source, target)


def saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON config saved with step ``step``."""
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def restore_target(abstract_tree, shardings):
    """ShapeDtypeStructs with shardings: what orbax restores into."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_tree, shardings)


# how the model computes, not which parameters it has: a resumed run may change them
PARAMETER_FREE_FIELDS = ("split_projections", "mlp_chunk", "dtype")


def _differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``name saved -> current`` for each field whose value differs."""
    return [f"{prefix}{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]


def changed_settings(saved: dict, config: TrainConfig) -> list[str]:
    """The optimizer, data and run settings of ``config`` that differ from a saved config's."""
    current = config_to_json(config)
    return [
        d for name in ("optim", "data", "run") for d in _differences(saved.get(name, {}), current[name], f"{name}.")
    ]


def restore_state(
    manager: ocp.CheckpointManager, step: int | None, config: TrainConfig, abstract_state, shardings, *, log=None
):
    """The whole train state of step ``step`` (None: the latest), laid out by ``shardings``; ``log``
    gets a line naming the optimizer / data / run settings that differ from the checkpoint's (this
    run's values apply), and one when the checkpoint is already at or past ``run.steps``.

    Raises ValueError naming the fields when the checkpoint's model has other parameters than
    ``config.model`` (fields in ``PARAMETER_FREE_FIELDS`` may differ), and naming the step's folder
    when it cannot be read (a damaged write, or a setting that changes the optimizer state's layout).
    """
    step = manager.latest_step() if step is None else step
    where = os.path.join(str(manager.directory), str(step))
    saved = saved_config(manager, step)
    model = model_from_json(saved["model"])  # tuples again (hybrids' layer_types)
    as_saved = {f: getattr(model, f) for f in PARAMETER_FREE_FIELDS}  # these may differ
    differ = _differences(dataclasses.asdict(model), dataclasses.asdict(dataclasses.replace(config.model, **as_saved)))
    if differ:
        raise ValueError(f"the checkpoint in {where} was trained with another model: {', '.join(differ)} (model.)")
    changed = changed_settings(saved, config)
    if changed and log is not None:
        log(f"resuming {where} with settings other than the checkpoint's (this run's apply): {', '.join(changed)}")
    if step >= config.run.steps and log is not None:
        log(f"nothing to train: the checkpoint is at step {step}, run.steps={config.run.steps}")
    target = restore_target(abstract_state, shardings)
    try:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as err:  # orbax / tensorstore errors name neither the step nor what to do
        earlier = [s for s in manager.all_steps() if s < step]
        hint = f"remove {where} to resume from step {max(earlier)}" if earlier else "remove it to start afresh"
        raise ValueError(
            f"cannot restore the train state of {where} ({type(err).__name__}: {str(err)[:300]}). Settings that "
            f"differ from the checkpoint's: {', '.join(changed) or 'none'}. If the step was damaged (a write "
            f"cut short), {hint}"
        ) from err


def _checkpoint_dir(ckpt_dir: str) -> str:
    """``ckpt_dir`` made absolute; a folder that does not exist raises (orbax would create it)."""
    if not os.path.isdir(ckpt_dir):
        raise ValueError(f"no checkpoint found in ckpt_dir={ckpt_dir!r} (not a folder)")
    return os.path.abspath(ckpt_dir)


def read_config(ckpt_dir: str, step: int | None = None) -> tuple[TrainConfig, int]:
    """The ``TrainConfig`` saved with a checkpoint (default: the latest step) and that step."""
    manager = ocp.CheckpointManager(_checkpoint_dir(ckpt_dir), item_names=ITEMS)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint found in ckpt_dir={ckpt_dir!r}")
        if step not in manager.all_steps():
            raise ValueError(f"no step {step} in ckpt_dir={ckpt_dir!r}; its steps: {sorted(manager.all_steps())}")
        return config_from_json(saved_config(manager, step)), step
    finally:
        manager.close()


def abstract_params(model: ModelConfig):
    """The parameters of a ``LanguageModel(model)`` as shapes (nothing allocated)."""
    return nnx.state(nnx.eval_shape(lambda: LanguageModel(model, rngs=nnx.Rngs(0))), nnx.Param)


def parameter_differences(saved: ModelConfig, model: ModelConfig) -> list[str]:
    """``path: saved shape -> shape`` of each parameter the two models do not share with one shape."""
    leaves = [
        {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params(m))}
        for m in (saved, model)
    ]
    paths = sorted(set(leaves[0]) | set(leaves[1]))
    return [f"{p}: {leaves[0].get(p)} -> {leaves[1].get(p)}" for p in paths if leaves[0].get(p) != leaves[1].get(p)]


def restore_params(ckpt_dir: str, shardings_for, *, step: int | None = None, model: ModelConfig | None = None):
    """(parameters, train config) of a checkpoint (default: the latest step); the optimizer state is not read.

    ``shardings_for(abstract_params)`` gives the parameters' layout. ``model``: the model the
    parameters are for (``run.init_from``): raises ValueError naming the parameters whose shapes
    differ from the checkpoint's.
    """
    config, step = read_config(ckpt_dir, step)
    differ = [] if model is None else parameter_differences(config.model, model)
    if differ:
        shown = "; ".join(differ[:6]) + (f"; ... ({len(differ)} in all)" if len(differ) > 6 else "")
        raise ValueError(f"init_from={ckpt_dir!r} holds parameters of another shape than this model's: {shown}")
    manager = ocp.CheckpointManager(_checkpoint_dir(ckpt_dir), item_names=ITEMS)
    try:
        abstract = abstract_params(config.model)
        target = {"params": restore_target(abstract, shardings_for(abstract))}
        restore = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        params = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]
    finally:
        manager.close()
    return params, config


def load_model(ckpt_dir: str, *, step: int | None = None, sp: int = 1) -> tuple[LanguageModel, TrainConfig, Mesh]:
    """(model, train config, mesh): the parameters of a checkpoint (default: the latest step),
    replicated on a ``(1, sp)`` mesh of the first ``sp`` devices. The optimizer state is not read."""
    mesh = build_mesh(1, sp, jax.devices()[:sp])
    params, config = restore_params(ckpt_dir, lambda abstract: tree_shardings(abstract, mesh), step=step)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params), config, mesh
