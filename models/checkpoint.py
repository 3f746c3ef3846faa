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


def restore_state(manager: ocp.CheckpointManager, step: int, config: TrainConfig, abstract_state, shardings):
    """The whole train state of step ``step``, laid out by ``shardings``.

    Raises ValueError when the checkpoint was trained with another model config than ``config.model``.
    """
    saved = model_from_json(saved_config(manager, step)["model"])  # tuples again (hybrids' layer_types)
    if saved != config.model:
        raise ValueError(
            f"checkpoint in {config.run.ckpt_dir} was trained with a different model config: {saved} != {config.model}"
        )
    target = restore_target(abstract_state, shardings)
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def read_config(ckpt_dir: str, step: int | None = None) -> tuple[TrainConfig, int]:
    """The ``TrainConfig`` saved with a checkpoint (default: the latest step) and that step."""
    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=ITEMS)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint found in ckpt_dir={ckpt_dir!r}")
        return config_from_json(saved_config(manager, step)), step
    finally:
        manager.close()


def restore_params(ckpt_dir: str, shardings_for, *, step: int | None = None):
    """(parameters, train config) of a checkpoint (default: the latest step); the optimizer state is not read.

    ``shardings_for(abstract_params)`` gives the parameters' layout.
    """
    config, step = read_config(ckpt_dir, step)
    manager = ocp.CheckpointManager(os.path.abspath(ckpt_dir), item_names=ITEMS)
    try:
        abstract = nnx.state(nnx.eval_shape(lambda: LanguageModel(config.model, rngs=nnx.Rngs(0))), nnx.Param)
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
