"""``lasp-train`` / ``python -m models.train``: train a linear-attention LM on a (dp, sp) mesh.

One jit-compiled step: micro-batches (gradient accumulation) scanned inside the step, optax AdamW
with warmup + cosine decay and global-norm clipping, a remat policy per block, and rejection of
steps whose loss or gradient is not finite (parameters and optimizer state stay as they were).
Batches are a pure function of (seed, step), so a run restored from an orbax checkpoint continues
with exactly the losses of an uninterrupted run. Checkpoints are written every ``ckpt_every``
steps, at the end, and on SIGTERM (exit code 143 after the save).

Multi-host: set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or pass
``--distributed`` on a cluster jax detects) and start the same command on every host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.config import ModelConfig, get_config
from models.dataset import DataConfig, TokenData
from models.layers import LaspContext
from models.model import REMAT_POLICIES, LanguageModel, lm_loss
from models.sharding import activation_sharding, build_mesh, tree_shardings


@dataclass(frozen=True)
class MeshConfig:
    dp: int | None = None  # None: every device not used by sp
    sp: int = 1
    fsdp: bool = False  # shard parameters and optimizer state over dp
    strategy: str = "ring"  # lasp_attention strategy (linear layers)
    impl: str = "auto"  # single-device kernel: "auto" | "pallas" | "xla"
    softmax_strategy: str = "allgather"  # softmax layers of hybrid models: "allgather" (LASP-2H) | "ring"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio at the last step
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (ndim ≥ 2)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off


@dataclass(frozen=True)
class RunConfig:
    steps: int = 1000
    seed: int = 0
    remat: str = "none"  # "none" | "full" | "dots"
    loss_chunks: int = 1  # >1: the [B, T, V] logits are computed in this many strided chunks
    ckpt_dir: str | None = None
    ckpt_every: int = 0  # 0: only at the end and on SIGTERM
    keep: int = 3
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4  # 0: no evaluation
    metrics: str | None = None  # JSONL file
    progress: bool = True
    peak_tflops: float | None = None  # per device, for MFU; default: looked up from the device kind
    time_limit_s: float | None = None  # stop (and checkpoint) after this much training time
    sample_tokens: int = 0  # print a sample of this many tokens at the end
    sample_prompt: str = "The "


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> TrainConfig:
        model = dict(d["model"])
        if model.get("layer_types") is not None:
            model["layer_types"] = tuple(model["layer_types"])
        return TrainConfig(
            model=ModelConfig(**model),
            mesh=MeshConfig(**d["mesh"]),
            optim=OptimConfig(**d["optim"]),
            data=DataConfig(**d["data"]),
            run=RunConfig(**d["run"]),
        )


# ---------------------------------------------------------------- FLOPs and MFU

PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "h800": 989.0,
    "gh200": 989.0,
    "a100": 312.0,
    "l40s": 362.0,
    "b200": 2250.0,
}


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward, no recomputation counted).

    ``6·N`` for the weight matmuls (N counts every matrix, the output head included, not the
    embedding lookup) plus ``3 · 4·H·D'·E'`` per linear layer for the recurrence (state update
    ``kᵀv`` and readout ``q S``, 2·D'·E' multiply-adds each, ×3 for the backward), and per softmax
    layer ``3 · 2·H·(D'+E)·T/2``: logits and weighted values over the T/2 keys a causal query sees
    on average. Only softmax layers make the cost per token depend on ``seq_len``.
    """
    d, f, h = config.d_model, config.hidden_dim, config.n_heads
    dh, hk = config.head_dim, config.kv_heads
    proj = d * (h * dh + 2 * hk * dh + (d if config.attn_output_norm == "srms_gate" else 0)) + h * dh * d
    mlp = d * f * (1 if config.mlp == "gelu" else 2) + f * d
    head = d * config.vocab_size
    d_state = 2 * dh if config.position == "lrpe" else dh
    e_state = dh + 1 if config.attn_output_norm == "denominator" else dh
    recurrence = 4 * h * d_state * e_state
    n_softmax = config.types.count("softmax")
    attention = 2 * h * (d_state + dh) * seq_len / 2  # softmax layers project like linear ones
    return (
        6.0 * (config.n_layers * (proj + mlp) + head)
        + 3.0 * (config.n_layers - n_softmax) * recurrence
        + 3.0 * n_softmax * attention
    )


def peak_flops_per_device(override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device, from ``override_tflops`` or the device kind; None if unknown."""
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind.lower()
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------- optimizer and steps


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.lr * optim.min_lr_ratio,
    )
    adamw = optax.adamw(
        schedule,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
    )
    chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    return optax.chain(*chain, adamw), schedule


def check_config(config: TrainConfig, n_devices: int) -> tuple[int, int]:
    """Raise ValueError naming the fields for configs that cannot run; return (dp, sp)."""
    m, d, r = config.mesh, config.data, config.run
    if m.sp <= 0 or (m.dp is not None and m.dp <= 0):
        raise ValueError(f"mesh sizes must be positive, got dp={m.dp}, sp={m.sp}")
    if n_devices % m.sp:
        raise ValueError(f"sp={m.sp} must divide the number of devices ({n_devices})")
    dp = n_devices // m.sp if m.dp is None else m.dp
    if dp * m.sp != n_devices:
        raise ValueError(f"dp * sp must equal the number of devices: dp={dp}, sp={m.sp}, devices={n_devices}")
    if d.micro_batch % dp:
        raise ValueError(
            f"the micro-batch (batch_size / grad_accum = {d.batch_size} / {d.grad_accum} = {d.micro_batch}) "
            f"must be a multiple of dp={dp}"
        )
    if d.seq_len % m.sp:
        raise ValueError(f"seq_len={d.seq_len} must be a multiple of sp={m.sp}")
    if r.loss_chunks > 1 and d.seq_len % (r.loss_chunks * m.sp):
        raise ValueError(f"seq_len={d.seq_len} must be a multiple of loss_chunks * sp = {r.loss_chunks} * {m.sp}")
    if r.remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got remat={r.remat!r}")
    if r.steps <= 0:
        raise ValueError(f"steps must be positive, got steps={r.steps}")
    if d.source == "text" and config.model.vocab_size < 256:
        raise ValueError(f"text data is byte-level and needs vocab_size >= 256, got {config.model.vocab_size}")
    from lasp_jax import STRATEGIES

    if m.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={m.strategy!r}")
    from lasp_jax.softmax import STRATEGIES as SOFTMAX_STRATEGIES

    if m.softmax_strategy not in SOFTMAX_STRATEGIES:
        raise ValueError(
            f"softmax_strategy must be one of {SOFTMAX_STRATEGIES}, got softmax_strategy={m.softmax_strategy!r}"
        )
    return dp, m.sp


def make_init_fn(model_config: ModelConfig, optimizer: optax.GradientTransformation):
    """``key -> train state`` ({params, opt_state, step, skipped}); jit it with out_shardings to init sharded."""

    def init(key):
        params = nnx.state(LanguageModel(model_config, rngs=nnx.Rngs(params=key)), nnx.Param)
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32),
        }

    return init


def restore_target(abstract_state, shardings):
    """ShapeDtypeStructs with shardings: what orbax restores into."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


class Trainer:
    """Builds the mesh, the sharded train state and the jitted steps; ``fit`` runs the loop."""

    def __init__(self, config: TrainConfig, devices=None, *, log=print):
        self.config = config
        self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
        devices = list(jax.devices() if devices is None else devices)
        dp, sp = check_config(config, len(devices))
        self.mesh = build_mesh(dp, sp, devices)
        self.n_devices = len(devices)
        self.ctx = LaspContext(
            mesh=self.mesh,
            seq_axis="sp",
            batch_axis="dp",
            strategy=config.mesh.strategy,
            impl=config.mesh.impl,
            softmax_strategy=config.mesh.softmax_strategy,
        )
        self.data = TokenData(config.data, config.model.vocab_size)
        self.optimizer, self.schedule = make_optimizer(config.optim, config.run.steps)
        self.batch_sharding = activation_sharding(self.mesh, 3, leading=1)
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        model_cfg = config.model
        self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: LanguageModel(model_cfg, rngs=nnx.Rngs(0))))
        self._init_fn = make_init_fn(model_cfg, self.optimizer)
        self.abstract_state = jax.eval_shape(self._init_fn, jax.random.key(0))
        self.state_shardings = tree_shardings(self.abstract_state, self.mesh, fsdp=config.mesh.fsdp)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            self._eval_step,
            in_shardings=(self.state_shardings["params"], self.batch_sharding, self.batch_sharding),
            out_shardings=self.replicated,
        )
        self.n_params = param_count(self.abstract_state["params"])
        self.flops_per_token = model_flops_per_token(model_cfg, config.data.seq_len)
        self.peak_flops = peak_flops_per_device(config.run.peak_tflops)
        self._stop_reason: str | None = None

    # ---- state ----
    def init_state(self):
        key = jax.random.key(self.config.run.seed)
        return jax.jit(self._init_fn, out_shardings=self.state_shardings)(key)

    def model(self, params) -> LanguageModel:
        return nnx.merge(self.graphdef, params)

    # ---- steps ----
    def _loss_sum(self, params, inputs, targets):
        run = self.config.run
        loss, count = lm_loss(
            self.model(params),
            inputs,
            targets,
            self.ctx,
            remat=run.remat,
            loss_chunks=run.loss_chunks,
            eod_token=self.config.data.eod,
        )
        return loss * count, count

    def _train_step(self, state, inputs, targets):
        params = state["params"]
        grad_fn = jax.value_and_grad(self._loss_sum, has_aux=True)

        def micro(carry, batch):
            grads, total, count = carry
            (loss_sum, n), g = grad_fn(params, *batch)
            return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

        if inputs.shape[0] == 1:  # no accumulation: no gradient buffer beyond the gradients themselves
            (total, count), grads = grad_fn(params, inputs[0], targets[0])
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, total, count), _ = jax.lax.scan(micro, init, (inputs, targets))
        count = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss = total / count
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {
            "params": _select(ok, new_params, params),
            "opt_state": _select(ok, opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "skipped": state["skipped"] + (~ok).astype(jnp.int32),
        }
        metrics = {"loss": loss, "grad_norm": grad_norm, "accepted": ok, "lr": self.schedule(state["step"])}
        return new_state, metrics

    def _eval_step(self, params, inputs, targets):
        def micro(carry, batch):
            total, count = carry
            loss_sum, n = self._loss_sum(params, *batch)
            return (total + loss_sum, count + n), None

        (total, count), _ = jax.lax.scan(
            micro, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), (inputs, targets)
        )
        return {"loss_sum": total, "count": count}

    def evaluate(self, params) -> dict:
        total, count = 0.0, 0
        for i in range(self.config.run.eval_batches):
            out = self.eval_step(params, *self.data.batch("eval", i, self.batch_sharding))
            total += float(_scalar(out["loss_sum"]))
            count += int(_scalar(out["count"]))
        loss = total / max(count, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # ---- checkpoints ----
    def checkpoint_manager(self):
        import orbax.checkpoint as ocp

        run = self.config.run
        options = ocp.CheckpointManagerOptions(max_to_keep=run.keep, enable_async_checkpointing=False, create=True)
        return ocp.CheckpointManager(os.path.abspath(run.ckpt_dir), options=options, item_names=("state", "config"))

    def save(self, manager, state) -> int:
        import orbax.checkpoint as ocp

        step = int(_scalar(state["step"]))
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.config.to_json())
            ),
            force=True,
        )
        manager.wait_until_finished()
        return step

    def restore(self, manager, step: int | None = None):
        import orbax.checkpoint as ocp

        step = manager.latest_step() if step is None else step
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        if saved["model"] != self.config.to_json()["model"]:
            raise ValueError(
                f"checkpoint in {self.config.run.ckpt_dir} was trained with a different model config: "
                f"{saved['model']} != {self.config.to_json()['model']}"
            )
        target = restore_target(self.abstract_state, self.state_shardings)
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    # ---- loop ----
    def request_stop(self, reason: str = "sigterm") -> None:
        self._stop_reason = reason

    def fit(self, *, stop_after: int | None = None, on_step=None) -> dict[str, Any]:
        """Train until ``run.steps`` (or ``stop_after`` steps in this call, or SIGTERM, or the time limit).

        Returns ``{"losses": {step: loss}, "eval": [...], "state": ..., "stopped": reason or None}``.
        """
        cfg, run = self.config, self.config.run
        manager = self.checkpoint_manager() if run.ckpt_dir else None
        if manager is not None and manager.latest_step() is not None:
            state = self.restore(manager)
            self.log(f"resumed from {run.ckpt_dir} at step {int(_scalar(state['step']))}")
        else:
            state = self.init_state()
        start = int(_scalar(state["step"]))
        self.log(
            f"model {cfg.model.family} {self.n_params / 1e6:.2f}M params | mesh dp={self.mesh.shape['dp']} "
            f"sp={self.mesh.shape['sp']} fsdp={cfg.mesh.fsdp} strategy={cfg.mesh.strategy} | "
            f"batch {cfg.data.batch_size}x{cfg.data.seq_len} accum {cfg.data.grad_accum} | steps {start}->{run.steps}"
        )
        metrics_file = open(run.metrics, "a") if (run.metrics and jax.process_index() == 0) else None  # noqa: SIM115
        bar = Progress(run.steps, enabled=run.progress and jax.process_index() == 0)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        losses, evals, pending = {}, [], []
        previous = signal.getsignal(signal.SIGTERM) if _main_thread() else None
        if _main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.request_stop("sigterm"))
        t_start = t_last = time.perf_counter()
        last_logged, train_time = start, 0.0
        step = start
        try:
            while step < run.steps:
                batch = self.data.batch("train", step, self.batch_sharding)
                state, m = self.train_step(state, *batch)
                step += 1
                pending.append((step, m))
                if on_step is not None:
                    on_step(step, self)
                stop = self._stop_reason or (
                    "time_limit" if run.time_limit_s and time.perf_counter() - t_start > run.time_limit_s else None
                )
                if stop_after is not None and step - start >= stop_after:
                    stop = stop or "stop_after"
                stop = _agree(stop)
                last = step == run.steps or stop is not None
                if step % run.log_every == 0 or last:
                    fetched = [(s, {k: _scalar(v) for k, v in mm.items()}) for s, mm in pending]
                    pending = []
                    now = time.perf_counter()
                    dt = now - t_last
                    train_time += dt
                    tok_s = tokens_per_step * (step - last_logged) / max(dt, 1e-9)
                    t_last, last_logged = now, step
                    for s, mm in fetched:
                        losses[s] = float(mm["loss"])
                    s, mm = fetched[-1]
                    record = {
                        "step": s,
                        "loss": float(mm["loss"]),
                        "grad_norm": float(mm["grad_norm"]),
                        "lr": float(mm["lr"]),
                        "skipped": int(sum(not bool(x["accepted"]) for _, x in fetched)),
                        "tokens_per_s": tok_s,
                        "tokens_per_s_per_device": tok_s / self.n_devices,
                        "mfu": (
                            tok_s / self.n_devices * self.flops_per_token / self.peak_flops if self.peak_flops else None
                        ),
                        "time_s": now - t_start,
                    }
                    bar.update(s, record)
                    if metrics_file:
                        metrics_file.write(json.dumps(record) + "\n")
                        metrics_file.flush()
                    t_last = time.perf_counter()
                wants_eval = (run.eval_every and step % run.eval_every == 0) or (last and stop != "sigterm")
                if run.eval_batches > 0 and wants_eval:
                    ev = {"step": step, **self.evaluate(state["params"])}
                    evals.append(ev)
                    bar.message(f"eval step {step}: loss {ev['eval_loss']:.4f} ppl {ev['eval_ppl']:.2f}")
                    if metrics_file:
                        metrics_file.write(json.dumps(ev) + "\n")
                        metrics_file.flush()
                    t_last = time.perf_counter()
                if manager is not None and (last or (run.ckpt_every and step % run.ckpt_every == 0)):
                    saved = self.save(manager, state)
                    if stop:
                        bar.message(f"saved checkpoint at step {saved} ({stop})")
                    t_last = time.perf_counter()
                if stop is not None:
                    self._stop_reason = stop
                    break
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
            if _main_thread() and previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if manager is not None:
                manager.close()
        return {"losses": losses, "eval": evals, "state": state, "stopped": self._stop_reason, "train_time": train_time}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _scalar(x):
    """A replicated scalar as a numpy value (works on multi-host arrays)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _agree(stop: str | None) -> str | None:
    """Every process stops at the same step if any one of them was asked to (multi-host SIGTERM)."""
    if jax.process_count() == 1:
        return stop
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(stop is not None, np.int32))
    return (stop or "peer_stop") if np.any(flags) else None


class Progress:
    """A one-line progress bar (redrawn in place on a terminal, one line per update otherwise)."""

    def __init__(self, total: int, *, enabled: bool = True, width: int = 24):
        self.total, self.enabled, self.width = total, enabled, width
        self.tty = sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self._open = False

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        frac = step / self.total
        filled = int(self.width * frac)
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(frac, 1e-9) - elapsed
        mfu = f" | MFU {100 * record['mfu']:.1f}%" if record.get("mfu") else ""
        line = (
            f"step {step:>6}/{self.total} [{'#' * filled}{'.' * (self.width - filled)}] "
            f"loss {record['loss']:.4f} | {_si(record['tokens_per_s'])} tok/s{mfu} | eta {_hms(eta)}"
        )
        if self.tty:
            print("\r" + line, end="", flush=True)
            self._open = True
        else:
            print(line, flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._open:
            print()
            self._open = False
        print(text, flush=True)

    def close(self) -> None:
        if self.enabled and self._open:
            print(flush=True)
            self._open = False


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------- command line


def initialize_distributed(force: bool = False) -> None:
    """``jax.distributed.initialize`` from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.

    With ``force`` and none of them set, jax's own cluster detection (SLURM, Open MPI, ...) is used.
    """
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif force:
        jax.distributed.initialize()


DEMO = dict(
    data=dict(source="text", path=None, batch_size=16, seq_len=256),
    mesh=dict(dp=2, sp=4),
    optim=dict(lr=3e-3, warmup_steps=20, weight_decay=0.01, min_lr_ratio=0.1),
    run=dict(steps=300, log_every=20, eval_batches=2, sample_tokens=300, time_limit_s=120.0),
)


def _parse_value(text: str, annotation: str, current):
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    if "tuple" in annotation:
        return tuple(x for x in text.split(",") if x)
    if "bool" in annotation:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if annotation.startswith("int"):
        return int(text)
    if annotation.startswith("float"):
        return float(text)
    return text


_SECTIONS = {"mesh": MeshConfig, "optim": OptimConfig, "data": DataConfig, "run": RunConfig}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lasp-train",
        description="Train a linear-attention LM (TNL, Linear Transformer, Linear-Llama3) with LASP on a dp x sp mesh.",
        epilog="Every config field is a flag, --section.field or its short form where unambiguous: --steps 500 "
        "--lr 1e-3 --seq-len 4096 --sp 4 --fsdp true --data.seed 1 --model.d_model 256. "
        "Model presets: see models.config.PRESETS.",
    )
    p.add_argument("--preset", default="tiny", help="model preset, e.g. tiny, tnl-1b, linear-llama3-0.4b")
    p.add_argument("--demo", action="store_true", help="the make-demo settings: embedded corpus, dp 2 x sp 4")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() by cluster detection")
    p.add_argument("--config", help="a JSON file of overrides {section: {field: value}}")
    p.add_argument(
        "--softmax-every",
        type=int,
        default=None,
        help="hybrid model: every k-th layer softmax attention (0: all linear); hybrid presets default to 4",
    )
    names = [f.name for cls in _SECTIONS.values() for f in dataclasses.fields(cls)]
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            flags = [f"--{section}.{f.name}"]
            if names.count(f.name) == 1:  # short form when unambiguous: --seq-len, --sp, --lr
                flags.insert(0, f"--{f.name.replace('_', '-')}")
            p.add_argument(*flags, dest=f"{section}.{f.name}", default=None, metavar=f.type)
    for f in dataclasses.fields(ModelConfig):
        if f.name != "family":
            p.add_argument(f"--model.{f.name}", dest=f"model.{f.name}", default=None, metavar=f.type)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict] = {s: {} for s in ("model", *_SECTIONS)}
    if args.demo:
        for section, values in DEMO.items():
            overrides[section].update(values)
    if args.config:
        with open(args.config) as fh:
            for section, values in json.load(fh).items():
                overrides[section].update(values)
    types = {f"{s}.{f.name}": f.type for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    types |= {f"model.{f.name}": f.type for f in dataclasses.fields(ModelConfig)}
    for dest, text in vars(args).items():
        if "." in dest and text is not None:
            section, name = dest.split(".", 1)
            overrides[section][name] = _parse_value(text, str(types[dest]), None)
    model = get_config(args.preset, softmax_every=args.softmax_every, **overrides["model"])
    sections = {s: cls(**overrides[s]) for s, cls in _SECTIONS.items()}
    return TrainConfig(model=model, **sections)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    initialize_distributed(force="--distributed" in argv)
    try:
        config = config_from_args(argv)
        trainer = Trainer(config)
    except ValueError as e:
        print(f"lasp-train: error: {e}", file=sys.stderr)
        return 2
    result = trainer.fit()
    if result["losses"]:
        steps = sorted(result["losses"])
        first, last = result["losses"][steps[0]], result["losses"][steps[-1]]
        trainer.log(f"loss {first:.4f} (step {steps[0]}) -> {last:.4f} (step {steps[-1]})")
    if config.run.sample_tokens and jax.process_count() == 1 and result["stopped"] != "sigterm":
        from models.generate import decode_bytes, generate

        prompt = np.frombuffer(config.run.sample_prompt.encode(), np.uint8).astype(np.int32)[None]
        ctx = dataclasses.replace(trainer.ctx, batch_axis=None)
        out = generate(
            trainer.model(result["state"]["params"]),
            prompt,
            max_new_tokens=config.run.sample_tokens,
            ctx=ctx,
            temperature=0.7,
            top_k=20,
            seed=config.run.seed,
        )
        trainer.log("sample (prefill sequence-parallel, then token-by-token decode):")
        trainer.log(decode_bytes(np.asarray(out[0])))
    return 143 if result["stopped"] == "sigterm" else 0


if __name__ == "__main__":
    raise SystemExit(main())
