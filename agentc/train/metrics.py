"""What a training run logs: one JSON line per step and per validation in OUT/metrics.jsonl, the
same values to W&B (offline by default, no login; rank 0 only), and the newest value of each for
the compiled agent's agent.json."""
from __future__ import annotations

import json
import os

from agentc.util import write_text


class NoWandb:
    """Stands in for a W&B run: rank > 0, --wandb=disabled, or wandb not installed."""
    id = None

    def log(self, *a, **k):
        pass

    def finish(self):
        pass


class Metrics:
    """metrics.jsonl and the W&B run of OUT. On resume (step > 0) the lines logged after the
    checkpoint are dropped (those steps run again), and a line a crash tore; the same W&B run
    continues (wandb_id), which ignores the re-run steps: its step only moves forward, and resumed
    losses are equal anyway. Only rank 0 (master) writes."""

    def __init__(self, out: str, step: int, master: bool, wandb: str = "disabled", wandb_id: str | None = None,
                 **wandb_init):
        self.path, self.master, self.last = os.path.join(out, "metrics.jsonl"), master, {}
        self.run = NoWandb()
        os.makedirs(out, exist_ok=True)
        if not master:
            return
        if wandb != "disabled":
            try:
                import wandb as wb
            except ImportError:
                print("WARNING: wandb is not installed; logging to the console and metrics.jsonl only", flush=True)
            else:
                self.run = wb.init(mode=wandb, dir=out, id=wandb_id, resume="allow", **wandb_init)
        kept = []
        if step and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["step"] <= step:
                            kept.append(line)
                    except (ValueError, KeyError):
                        pass
        write_text(self.path, "".join(kept))

    def record(self, entry: dict) -> None:
        """entry: {"step": N, "train/loss": ..., ...}."""
        values = {k: v for k, v in entry.items() if k != "step"}
        self.last.update(values)
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            self.run.log(values, step=entry["step"])

    def finish(self) -> None:
        self.run.finish()
