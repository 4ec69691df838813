"""What `lmforge run` built, from what: `OUT/stages.json`, so a rerun skips, resumes or rebuilds each stage.

    state = StageState(out)
    action = state.begin("pretrain", config={...}, upstream=["tokenize"], outputs=[out / "pretrain"])
    ...                                  # "build", "skip", "resume" or "rebuild (...)"
    state.finish("pretrain", done=True, step=320)

A stage's key is a hash of its resolved config (budgets such as `max_seconds` and the device left
out: they change when it stops or where it runs, not what it builds) and of what its upstream
stages are now: their keys and how far they got. So a stage whose inputs changed is rebuilt, and
so is everything downstream of it, since their upstream identity changed with it; a stage that
was interrupted with the same key resumes (training stages from their last checkpoint, `data
clean` by shard); a finished stage with the same key is skipped. The record is written before a
stage starts, so a stage killed outright (`kill -9`) resumes on the next run rather than being
taken for something else's output.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from lmforge.fileio import atomic_write_json

STATE_FILE = "stages.json"
UNKEYED = ("max_seconds", "device")  # a budget or a place to run: not what the stage builds


def _strip(config):
    if isinstance(config, dict):
        return {k: _strip(v) for k, v in config.items() if k not in UNKEYED}
    return config


def _changed(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two configs."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


class StageState:
    def __init__(self, out: Path):
        self.path = Path(out) / STATE_FILE
        try:
            self.stages = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.stages = {}  # unreadable: every stage is rebuilt, as if there were no record
        self.actions: dict[str, str] = {}

    def identity(self, name: str) -> list:
        rec = self.stages.get(name, {})
        return [rec.get("key"), rec.get("done"), rec.get("step")]

    def begin(self, name: str, config: dict, upstream: list[str], outputs: list[Path]) -> str:
        """Decide what to do with stage `name` and record that it is under way; rebuilding removes `outputs`."""
        config = _strip(json.loads(json.dumps(config, default=str)))
        ups = {u: self.identity(u) for u in upstream}
        key = hashlib.sha256(json.dumps([config, ups], sort_keys=True).encode()).hexdigest()[:16]
        rec = self.stages.get(name)
        present = any(p.exists() for p in outputs)
        if rec and rec.get("key") == key and present:
            action = "skip" if rec.get("done") else "resume"
        elif present:
            if rec is None:
                why = "no record of what built it"
            else:
                what = _changed(rec.get("config", {}), config)
                what += [f"{u} changed" for u in upstream if rec.get("upstream", {}).get(u) != ups[u]]
                why = ", ".join(what) or "its inputs changed"
            for p in outputs:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            action = f"rebuild ({why})"
        else:
            action = "build"
        if action != "skip":
            self.stages[name] = {"key": key, "config": config, "upstream": ups, "done": False, "step": None}
            self._save()
        self.actions[name] = action
        return action

    def finish(self, name: str, done: bool = True, step: int | None = None, stopped: str | None = None) -> None:
        self.stages[name].update(done=done, step=step, stopped=stopped)
        self._save()

    def stopped(self) -> dict[str, str]:
        """{stage: why} for the stages that ended early in this run."""
        return {n: r["stopped"] for n, r in self.stages.items() if n in self.actions and r.get("stopped")}

    def _save(self) -> None:
        atomic_write_json(self.path, self.stages)
