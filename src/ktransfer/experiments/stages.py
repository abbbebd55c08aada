"""``reproduce``'s stage bookkeeping: ``RUN/stages.json`` (which stage is done, its wall time), the exceptions that
end a run early, and the two ways a stage runs (on rank 0 alone; a training that a signal leaves unfinished).

A stage is marked done only after its body returned; a rerun of the same command skips the stages done and runs the
one that was cut short again (a training stage resumes from its ``checkpoints/last`` through ``train``'s resume).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ktransfer.runtime import distributed
from ktransfer.training.config import RunConfig


class Stages:
    """``RUN/stages.json``: per stage, whether it is done and its wall time (all sessions together)."""

    def __init__(self, run_dir: Path, log):
        self.path, self.log = run_dir / "stages.json", log
        self.data: dict[str, dict] = on_main(lambda: json.loads(self.path.read_text()) if self.path.exists() else {})

    def done(self, name: str, key: Any = None) -> bool:
        entry = self.data.get(name, {})
        return bool(entry.get("done")) and (key is None or entry.get("key") == key)

    def run(self, name: str, fn, *, index: str = "", key: Any = None) -> Any:
        """Run ``fn()`` as stage ``name`` unless it is done; record its wall time.

        ``key`` (JSON data) names what the stage was computed from (e.g. the runs a significance stage compares): a
        stage done with another key is redone, so that a rerun with more seeds or prefix sources updates it.
        """
        if self.done(name, key):
            self.log(f"---- {index} {name}: done already, skipped")
            return None
        if self.data.get(name, {}).get("done"):
            self.log(f"---- {index} {name}: done for other runs ({self.data[name].get('key')}), redone")
        self.log(f"==== {index} {name} " + "=" * max(4, 60 - len(name)))
        entry = self.data.setdefault(name, {"done": False, "wall_s": 0.0, "sessions": 0})
        entry["done"] = False
        if key is not None:
            entry["key"] = key
        t0 = time.time()
        try:
            result = fn()
        finally:
            entry["wall_s"] = round(entry["wall_s"] + time.time() - t0, 2)
            entry["sessions"] += 1
            self._save()
        entry["done"], entry["finished"] = True, time.strftime("%Y-%m-%d %H:%M:%S")
        self._save()
        self.log(f"---- {name}: done in {time.time() - t0:.1f}s")
        distributed.barrier()  # several processes: none starts the next stage before rank 0 wrote this one's files
        return result

    def _save(self) -> None:
        if not distributed.is_main():
            return
        tmp = self.path.with_name(".stages.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)


class StopAfter(Exception):
    """Raised internally when ``stop_after`` is reached."""


class Interrupted(Exception):
    """A training stage stopped by SIGINT/SIGTERM: it saved ``checkpoints/last`` but is not done; the same
    ``reproduce`` command resumes it."""


def on_main(fn):
    """``fn()`` on rank 0 alone (files that one process writes: BPE, analyses, significance, report); every process
    waits for it and gets its result. One process: just ``fn()``."""
    if not distributed.is_distributed():
        return fn()
    result = fn() if distributed.is_main() else None
    return distributed.broadcast(result)


def train_stage(cfg: RunConfig, **kwargs) -> dict:
    """``train.train``, except that a run stopped by a signal raises ``Interrupted`` (so its stage is not marked
    done)."""
    from ktransfer.training.train import train

    result = train(cfg, **kwargs)
    if str(result.get("stopped") or "").startswith("signal:"):
        raise Interrupted(f"{cfg.train.out_dir}: stopped by {result['stopped'][7:]} at epoch {result['epoch']}, "
                          f"step {result['step']}")
    return result
