"""Where a training run reports: a one-line progress bar, a JSONL metrics file and TensorBoard events.

TensorBoard event files (``tensorboardX``) get every numeric field of each record as a scalar,
``train/<name>`` for steps and ``eval/<name>`` for evaluations, at the record's step.
"""

from __future__ import annotations

import json
import math
import sys
import time


class Progress:
    """A one-line progress bar (redrawn in place on a terminal, one line per update otherwise).

    The ETA is the steps left over the rate of this process's steps (since ``start``, the step a
    resumed run began at), so a resume does not count the steps a previous run did as fast ones.
    """

    def __init__(self, total: int, *, start: int = 0, enabled: bool = True, width: int = 24):
        self.total, self.start, self.enabled, self.width = total, start, enabled, width
        self.tty = sys.stdout.isatty()
        self.t0 = time.perf_counter()
        self._open = False

    def eta(self, step: int, elapsed: float) -> float:
        """Seconds left: ``(total − step)`` at the rate ``(step − start) / elapsed``."""
        rate = (step - self.start) / max(elapsed, 1e-9)
        return (self.total - step) / rate if rate > 0 else float("inf")

    def update(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        filled = int(self.width * step / self.total)
        eta = self.eta(step, time.perf_counter() - self.t0)
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


class RunLog:
    """The progress bar and the JSONL metrics file of one ``Trainer.fit`` call.

    ``enabled=False`` (every process but the first of a multi-host job) reports nothing.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        metrics_path: str | None,
        progress: bool,
        enabled: bool,
        start: int = 0,
        tensorboard: str | None = None,
    ):
        self.bar = Progress(total_steps, start=start, enabled=progress and enabled)
        self.enabled = enabled
        self.file = open(metrics_path, "a") if (metrics_path and enabled) else None  # noqa: SIM115
        self.events = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter  # imported only when asked for

            self.events = SummaryWriter(tensorboard)

    def step(self, record: dict) -> None:
        """A training record (``step``, ``loss``, ``tokens_per_s``, ``mfu``, ...): the bar and the file."""
        self.bar.update(record["step"], record)
        self._write(record)
        self._scalars("train", record)

    def eval(self, record: dict) -> None:
        """An evaluation record (``step``, ``eval_loss``, ``eval_ppl``): a message and the file."""
        self.bar.message(f"eval step {record['step']}: loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}")
        self._write(record)
        self._scalars("eval", record)

    def message(self, text: str) -> None:
        self.bar.message(text)

    def report(self, text: str) -> None:
        """A block of text (the profile table): printed with or without the progress bar."""
        if self.enabled:
            self.bar.close()  # ends a line the bar redraws in place
            print(text, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()
        if self.events is not None:
            self.events.close()

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def _scalars(self, tag: str, record: dict) -> None:
        if self.events is None:
            return
        for name, value in record.items():
            if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.events.add_scalar(f"{tag}/{name}", value, record["step"])
        self.events.flush()


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"
