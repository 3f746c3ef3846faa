"""``lasp-train`` / ``python -m models.train``: train a linear-attention LM on a (dp, sp) mesh.

One jit-compiled step: micro-batches (gradient accumulation) scanned inside the step, optax AdamW
with warmup + cosine decay and global-norm clipping, a remat policy per block, and rejection of
steps whose loss or gradient is not finite (parameters and optimizer state stay as they were).
Batches are a pure function of (seed, step), so a run restored from an orbax checkpoint
(``models.checkpoint``) continues with exactly the losses of an uninterrupted run. Checkpoints are
written every ``ckpt_every`` steps (in the background: the arrays are copied to host memory, then
training goes on while orbax writes them), at the end, and on SIGTERM (exit code 143 after the save;
those two wait for the write). Flags: ``models.cli``; configs: ``models.train_config``.

Multi-host: set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or pass
``--distributed`` on a cluster jax detects) and start the same command on every host. A SIGTERM (or
the time limit) on any process stops them all at the same step: they agree at the steps whose
metrics are fetched anyway (every ``log_every`` steps), not with a host round trip every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lasp_jax import STRATEGIES
from lasp_jax.delta_rule import STRATEGIES as DELTA_RULE_STRATEGIES
from lasp_jax.softmax import STRATEGIES as SOFTMAX_STRATEGIES
from models import checkpoint
from models.cli import (
    config_from_args,
    decode_text,
    folder_tokenizer,
    initialize_distributed,
    profile_window_from_args,
    set_default_xla_flags,
    text_prompt,
)
from models.config import ModelConfig
from models.dataset import TokenData
from models.flops import mfu, model_flops_per_token, param_count, peak_flops_per_device
from models.generate import generate
from models.layer_scan import matrix_mask
from models.layers import LaspContext
from models.model import REMAT_POLICIES, LanguageModel, lm_loss
from models.profile import ProfileWindow, StepProfiler
from models.progress import RunLog
from models.sharding import activation_sharding, build_mesh, train_state_shardings, update_shardings, update_slices
from models.train_config import MeshConfig, OptimConfig, RunConfig, TrainConfig

# the configs live in models.train_config; the README and the notebooks import them from here
__all__ = [
    "MeshConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "check_config",
    "main",
    "make_init_fn",
    "make_optimizer",
]


def make_optimizer(optim: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (decay on matrices only) after global-norm clipping, and its warmup + cosine learning-rate schedule."""
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
        mask=matrix_mask,  # matrices per layer, also when stacked (models.layer_scan)
    )
    chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
    return optax.chain(*chain, adamw), schedule


def check_config(config: TrainConfig, n_devices: int) -> tuple[int, int]:
    """Raise ValueError naming the fields for configs that cannot run; return (dp, sp) (tp is ``mesh.tp``)."""
    m, d, r = config.mesh, config.data, config.run
    if m.sp <= 0 or m.tp <= 0 or (m.dp is not None and m.dp <= 0):
        raise ValueError(f"mesh sizes must be positive, got dp={m.dp}, sp={m.sp}, tp={m.tp}")
    if n_devices % m.sp:
        raise ValueError(f"sp={m.sp} must divide the number of devices ({n_devices})")
    if n_devices % (m.sp * m.tp):
        raise ValueError(f"sp * tp = {m.sp} * {m.tp} must divide the number of devices ({n_devices})")
    dp = n_devices // (m.sp * m.tp) if m.dp is None else m.dp
    if dp * m.sp * m.tp != n_devices:
        raise ValueError(
            f"dp * sp must equal the number of devices / tp: dp={dp}, sp={m.sp}, tp={m.tp}, devices={n_devices}"
        )
    check_tensor_parallel(config.model, m.tp, sp=m.sp, strategy=m.strategy)
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
    if m.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got strategy={m.strategy!r}")
    if config.model.is_delta_rule and m.strategy not in DELTA_RULE_STRATEGIES:
        raise ValueError(
            f"strategy must be one of {DELTA_RULE_STRATEGIES} for the delta-rule family "
            f"{config.model.family!r}, got strategy={m.strategy!r}"
        )
    if m.softmax_strategy not in SOFTMAX_STRATEGIES:
        raise ValueError(
            f"softmax_strategy must be one of {SOFTMAX_STRATEGIES}, got softmax_strategy={m.softmax_strategy!r}"
        )
    return dp, m.sp


def check_tensor_parallel(model: ModelConfig, tp: int, *, sp: int, strategy: str) -> None:
    """Raise ValueError unless every head count and the MLP hidden size divide over ``tp`` devices
    (each keeps whole query groups with their key/value heads; ``ulysses`` then splits the local heads over sp)."""
    if tp == 1:
        return
    counts = {"n_heads": model.n_heads}
    if not model.is_delta_rule or "softmax" in model.types:
        counts["n_kv_heads"] = model.kv_heads  # linear-attention and softmax layers' key/value heads
    if model.is_delta_rule:
        counts["n_v_heads"] = model.v_heads
    bad = {name: n for name, n in counts.items() if n % tp}
    if bad:
        raise ValueError(f"tensor parallelism splits the heads over tp={tp}: {bad} must be multiples of it")
    if model.hidden_dim % tp:
        raise ValueError(f"tensor parallelism splits the MLP over tp={tp}: hidden_dim={model.hidden_dim} must divide")
    if strategy == "ulysses" and any((n // tp) % sp for n in counts.values()):
        raise ValueError(f"strategy='ulysses' with tp={tp}: each rank's heads ({counts} / {tp}) must divide by {sp=}")


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


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


class Trainer:
    """Builds the mesh, the sharded train state and the jitted steps; ``fit`` runs the loop."""

    def __init__(self, config: TrainConfig, devices=None, *, log=print):
        self.config = config
        self.log = log if jax.process_index() == 0 else (lambda *a, **k: None)
        devices = list(jax.devices() if devices is None else devices)
        dp, sp = check_config(config, len(devices))
        self.mesh = build_mesh(dp, sp, devices, tp=config.mesh.tp)
        self.n_devices = len(devices)
        self.ctx = LaspContext(
            mesh=self.mesh,
            seq_axis="sp",
            batch_axis="dp",
            head_axis="tp" if config.mesh.tp > 1 else None,
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
        zero1 = dict(fsdp=config.mesh.fsdp, shard_optimizer=config.mesh.shard_optimizer_over_data)
        self.state_shardings = train_state_shardings(self.abstract_state, self.mesh, **zero1)
        self.update_shardings = update_shardings(self.abstract_state["params"], self.mesh, **zero1)  # ZeRO-1 or None
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
        self.multi_process = jax.process_count() > 1  # stop requests are agreed on (``_agree``)

    # ---- state ----
    def init_state(self):
        """A fresh state from ``run.seed``, or from ``run.init_from``'s parameters with a fresh optimizer."""
        key = jax.random.key(self.config.run.seed)
        if not self.config.run.init_from:
            return jax.jit(self._init_fn, out_shardings=self.state_shardings)(key)
        init_from, shardings = self.config.run.init_from, self.state_shardings["params"]
        params, _ = checkpoint.restore_params(init_from, lambda _: shardings, model=self.config.model)

        def start_from(params):
            return self._init_fn(key) | {"params": params, "opt_state": self.optimizer.init(params)}

        return jax.jit(start_from, out_shardings=self.state_shardings)(params)

    def model(self, params) -> LanguageModel:
        return nnx.merge(self.graphdef, params)

    # ---- steps ----
    def loss_sum(self, params, inputs, targets):
        """``(Σ loss, token count)`` of one batch under the run's remat, loss chunks and documents."""
        run = self.config.run
        loss, count = lm_loss(
            self.model(params),
            inputs,
            targets,
            self.ctx,
            remat=run.remat,
            loss_chunks=run.loss_chunks,
            eod_token=self.data.eod,
        )
        return loss * count, count

    def _update_slices(self, tree):
        """ZeRO-1: each device's slice of a tree shaped as the parameters (``update_slices``); as is without it."""
        return update_slices(tree, self.state_shardings["params"], self.update_shardings)

    def _mean_grads(self, params, inputs, targets):
        """Mean loss and gradients over every counted target of the micro-batches ``inputs[i]``."""
        grad_fn = jax.value_and_grad(self.loss_sum, has_aux=True)

        def micro(carry, batch):
            grads, total, count = carry
            (loss_sum, n), g = grad_fn(params, *batch)
            g = self._update_slices(g)  # ZeRO-1: each micro-batch's gradients reduce-scattered
            return (jax.tree.map(jnp.add, grads, g), total + loss_sum, count + n), None

        if inputs.shape[0] == 1:  # no accumulation: no gradient buffer beyond the gradients themselves
            (total, count), grads = grad_fn(params, inputs[0], targets[0])
            grads = self._update_slices(grads)  # ZeRO-1: reduce-scattered (before the division: the pattern XLA finds)
        else:
            zeros = self._update_slices(jax.tree.map(jnp.zeros_like, params))
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
            (grads, total, count), _ = jax.lax.scan(micro, init, (inputs, targets))
        count = jnp.maximum(count, 1).astype(jnp.float32)
        return total / count, jax.tree.map(lambda g: g / count, grads)

    def _train_step(self, state, inputs, targets):
        """One optimizer step; a step whose loss or gradient is not finite leaves params and moments as they were."""
        params = state["params"]
        loss, grads = self._mean_grads(params, inputs, targets)
        params = self._update_slices(params)  # ZeRO-1: each device updates its slice, the new params all-gathered
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
            loss_sum, n = self.loss_sum(params, *batch)
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
        return checkpoint.open_manager(self.config.run.ckpt_dir, keep=self.config.run.keep)

    def save(self, manager, state, *, wait: bool = True) -> int:
        """Checkpoint ``state`` with this run's config; returns its step. ``wait=False``: the write
        goes on in the background (``checkpoint.save``)."""
        step = int(_scalar(state["step"]))
        checkpoint.save(manager, step, state, self.config, wait=wait)
        return step

    def restore(self, manager, step: int | None = None):
        """The train state of ``step`` (default: the latest), laid out as this trainer's state."""
        layout = (self.abstract_state, self.state_shardings)
        return checkpoint.restore_state(manager, step, self.config, *layout, log=self.log)

    # ---- loop ----
    def request_stop(self, reason: str = "sigterm") -> None:
        self._stop_reason = reason

    def fit(
        self, *, stop_after: int | None = None, on_step=None, profile: ProfileWindow | None = None
    ) -> dict[str, Any]:
        """Train until ``run.steps`` (or ``stop_after`` steps in this call, or SIGTERM, or the time limit).

        Returns ``{"losses": {step: loss}, "eval": [...], "state": ..., "stopped": reason or None,
        "train_time": seconds, "profile": ProfileSummary or None}``. ``on_step(step, trainer)`` is
        called after every step. ``profile``: trace those steps and log their device time by
        category (``models.profile``).
        """
        run = self.config.run
        manager = self.checkpoint_manager() if run.ckpt_dir else None
        state = self._initial_state(manager)
        start = step = int(_scalar(state["step"]))
        self._log_header(start)
        log = RunLog(
            run.steps,
            metrics_path=run.metrics,
            progress=run.progress,
            enabled=jax.process_index() == 0,
            start=start,
            tensorboard=run.tensorboard,
        )
        clock = StepClock(start)
        profiler = StepProfiler(profile, log=log.report)
        losses, evals, pending = {}, [], []
        try:
            with _sigterm_requests_stop(self.request_stop):
                while step < run.steps:
                    profiler.before_step(step, state)
                    state, metrics = self.train_step(state, *self.data.batch("train", step, self.batch_sharding))
                    step += 1
                    if step == start + 1:  # compiled and ran: throughput windows start after it
                        jax.block_until_ready(metrics["loss"])
                        clock.exclude_first_step(step)
                    profiler.after_step(step, state)
                    pending.append((step, metrics))
                    if on_step is not None:
                        on_step(step, self)
                    stop = self._stop_reason_after(step, step - start, stop_after, clock.elapsed())
                    last = step == run.steps or stop is not None
                    if last or step % run.log_every == 0:
                        losses |= self._report_steps(pending, clock, log)
                        pending = []
                    if manager is not None and self._wants_checkpoint(step, last):  # saved before an eval can fail
                        self._checkpoint(manager, state, stop, log, wait=last)
                        clock.resume()
                    if self._wants_eval(step, last, stop):
                        evals.append(self._report_eval(step, state["params"], log))
                        clock.resume()
                    if stop is not None:
                        self._stop_reason = stop
                        break
            profiler.finish(state, step)  # a window past the last step ends with the run
        finally:
            profiler.close()
            log.close()
            if manager is not None:
                manager.close()
        stopped, train_time = self._stop_reason, clock.train_time
        return {
            "losses": losses,
            "eval": evals,
            "state": state,
            "stopped": stopped,
            "train_time": train_time,
            "profile": profiler.summary,
        }

    def _initial_state(self, manager):
        """The latest checkpoint's state if ``manager`` holds one, else a fresh state from ``run.seed``."""
        if manager is None or manager.latest_step() is None:
            return self.init_state()
        state = self.restore(manager)
        self.log(f"resumed from {self.config.run.ckpt_dir} at step {int(_scalar(state['step']))}")
        return state

    def _log_header(self, start: int) -> None:
        cfg, data = self.config, self.config.data
        self.log(
            f"model {cfg.model.family} {self.n_params / 1e6:.2f}M params | mesh dp={self.mesh.shape['dp']} "
            f"sp={self.mesh.shape['sp']} tp={self.mesh.shape['tp']} fsdp={cfg.mesh.fsdp} "
            f"zero1={self.update_shardings is not None} "
            f"strategy={cfg.mesh.strategy} | "
            f"batch {data.batch_size}x{data.seq_len} accum {data.grad_accum} | steps {start}->{cfg.run.steps}"
        )

    def _stop_reason_after(self, step: int, steps_done: int, stop_after: int | None, elapsed: float) -> str | None:
        """Why to stop after this step (a request, the time limit, ``stop_after``), the same on every process.

        With several processes a request or the time limit (each process's own) is agreed on only
        at the steps whose metrics are fetched anyway (every ``log_every`` steps and the last), so
        the other steps need no host round trip; a SIGTERM then takes effect within ``log_every`` steps.
        """
        run = self.config.run
        stop = self._stop_reason or ("time_limit" if run.time_limit_s and elapsed > run.time_limit_s else None)
        if self.multi_process:
            synced = step % run.log_every == 0 or step == run.steps
            stop = _agree(stop) if synced else None
        if stop_after is not None and steps_done >= stop_after:
            stop = stop or "stop_after"
        return stop

    def _report_steps(self, pending: list, clock: StepClock, log: RunLog) -> dict[int, float]:
        """Fetch the ``(step, metrics)`` of the steps since the last report, report the last one with
        throughput and MFU; returns ``{step: loss}`` of them all."""
        fetched = [(s, {k: _scalar(v) for k, v in m.items()}) for s, m in pending]
        step, metrics = fetched[-1]
        seconds, steps, time_s = clock.lap(step)
        tok_s = self.config.data.batch_size * self.config.data.seq_len * steps / max(seconds, 1e-9)
        record = {
            "step": step,
            "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"]),
            "lr": float(metrics["lr"]),
            "skipped": int(sum(not bool(m["accepted"]) for _, m in fetched)),
            "tokens_per_s": tok_s,
            "tokens_per_s_per_device": tok_s / self.n_devices,
            "mfu": mfu(tok_s / self.n_devices, self.flops_per_token, self.peak_flops),
            "time_s": time_s,
        }
        log.step(record)
        clock.resume()
        return {s: float(m["loss"]) for s, m in fetched}

    def _wants_eval(self, step: int, last: bool, stop: str | None) -> bool:
        """Every ``eval_every`` steps and after the last step (unless stopped by SIGTERM, to exit promptly)."""
        run = self.config.run
        periodic = run.eval_every and step % run.eval_every == 0
        return run.eval_batches > 0 and bool(periodic or (last and stop != "sigterm"))

    def _report_eval(self, step: int, params, log: RunLog) -> dict:
        record = {"step": step, **self.evaluate(params)}
        log.eval(record)
        return record

    def _wants_checkpoint(self, step: int, last: bool) -> bool:
        """Every ``ckpt_every`` steps and after the last step (the end, a stop request or the time limit)."""
        every = self.config.run.ckpt_every
        return last or bool(every and step % every == 0)

    def _checkpoint(self, manager, state, stop: str | None, log: RunLog, *, wait: bool) -> None:
        """Periodic saves write in the background; the last one (the end, a stop) waits for the write."""
        saved = self.save(manager, state, wait=wait)
        if stop:
            log.message(f"saved checkpoint at step {saved} ({stop})")


class StepClock:
    """Training time between reports: what evaluating, checkpointing and reporting take is left out,
    and so is the first step of a run (compilation) from the throughput of the first report."""

    def __init__(self, step: int):
        self.start = self.last = time.perf_counter()
        self.last_step = step
        self.train_time = 0.0
        self.first_window: tuple[float, int] | None = None  # (seconds, steps) of the compiling first step

    def exclude_first_step(self, step: int) -> None:
        """The first step is done (compiled and run): the next lap measures from now.

        A report at the first step itself (nothing else to measure) still gets its time."""
        now = time.perf_counter()
        self.first_window = (now - self.last, step - self.last_step)
        self.train_time += now - self.last
        self.last, self.last_step = now, step

    def elapsed(self) -> float:
        """Seconds since the clock started, everything included (for the time limit)."""
        return time.perf_counter() - self.start

    def lap(self, step: int) -> tuple[float, int, float]:
        """(seconds, steps) since the previous lap or ``resume``, and the seconds since the start."""
        now = time.perf_counter()
        seconds, steps = now - self.last, step - self.last_step
        self.train_time += seconds
        self.last, self.last_step = now, step
        if steps == 0 and self.first_window is not None:  # the window held the compiling step only
            seconds, steps = self.first_window
        return seconds, steps, now - self.start

    def resume(self) -> None:
        """Training goes on from now: the time since the last lap was spent on something else."""
        self.last = time.perf_counter()


@contextlib.contextmanager
def _sigterm_requests_stop(request_stop):
    """SIGTERM calls ``request_stop("sigterm")`` inside the block (handlers exist only on the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: request_stop("sigterm"))
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _scalar(x):
    """A replicated scalar as a numpy value (works on multi-host arrays)."""
    if isinstance(x, jax.Array):
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def _agree(stop: str | None) -> str | None:
    """Every process stops at the same step if any one of them was asked to (multi-host SIGTERM):
    one all-gather of a flag, at the steps ``Trainer._stop_reason_after`` syncs on."""
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(stop is not None, np.int32))
    return (stop or "peer_stop") if np.any(flags) else None


# ---------------------------------------------------------------- the lasp-train command


def main(argv: list[str] | None = None) -> int:
    """``lasp-train``: train with the flags' config (``models.cli``); exit code 143 after a SIGTERM save."""
    argv = sys.argv[1:] if argv is None else argv
    set_default_xla_flags()
    initialize_distributed(force="--distributed" in argv)
    try:
        config = config_from_args(argv)
        profile = profile_window_from_args(argv)
        trainer = Trainer(config)
    except (ValueError, TypeError) as e:  # a config that cannot run, a --config value of the wrong type
        print(f"lasp-train: error: {e}", file=sys.stderr)
        return 2
    result = trainer.fit(profile=profile)
    if result["losses"]:
        steps = sorted(result["losses"])
        first, last = result["losses"][steps[0]], result["losses"][steps[-1]]
        trainer.log(f"loss {first:.4f} (step {steps[0]}) -> {last:.4f} (step {steps[-1]})")
    if config.run.sample_tokens and jax.process_count() == 1 and result["stopped"] != "sigterm":
        _log_sample(trainer, result["state"]["params"])
    return 143 if result["stopped"] == "sigterm" else 0


def _log_sample(trainer: Trainer, params) -> None:
    """Continue ``run.sample_prompt`` by ``run.sample_tokens`` tokens and log the text."""
    run = trainer.config.run
    tokenizer = folder_tokenizer(trainer.config.data.path) if trainer.data.meta else None
    out = generate(
        trainer.model(params),
        text_prompt(run.sample_prompt, tokenizer),
        max_new_tokens=run.sample_tokens,
        ctx=dataclasses.replace(trainer.ctx, batch_axis=None),
        temperature=0.7,
        top_k=20,
        seed=run.seed,
    )
    trainer.log("sample (prefill sequence-parallel, then token-by-token decode):")
    trainer.log(decode_text(np.asarray(out[0]), tokenizer))


if __name__ == "__main__":
    raise SystemExit(main())
