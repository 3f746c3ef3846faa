"""Where a training run reports: a one-line progress bar and a JSONL metrics file."""

from __future__ import annotations

import json
import sys
import time


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


class RunLog:
    """The progress bar and the JSONL metrics file of one ``Trainer.fit`` call.

    ``enabled=False`` (every process but the first of a multi-host job) reports nothing.
    """

    def __init__(self, total_steps: int, *, metrics_path: str | None, progress: bool, enabled: bool):
        self.bar = Progress(total_steps, enabled=progress and enabled)
        self.enabled = enabled
        self.file = open(metrics_path, "a") if (metrics_path and enabled) else None  # noqa: SIM115

    def step(self, record: dict) -> None:
        """A training record (``step``, ``loss``, ``tokens_per_s``, ``mfu``, ...): the bar and the file."""
        self.bar.update(record["step"], record)
        self._write(record)

    def eval(self, record: dict) -> None:
        """An evaluation record (``step``, ``eval_loss``, ``eval_ppl``): a message and the file."""
        self.bar.message(f"eval step {record['step']}: loss {record['eval_loss']:.4f} ppl {record['eval_ppl']:.2f}")
        self._write(record)

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

    def _write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s"
