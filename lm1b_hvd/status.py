"""`python -m lm1b_hvd.status --logdir L [--json]`

Where a training run stands, from its log directory alone: whether a run holds the directory
now (host, pid, since when), the newest checkpoint and its step, the latest progress line's
step, loss and words/s, the ETA when the run has a limit, and the best heldout perplexity with
its checkpoint. It reads small files and takes no lock, so it runs on a login node while the
job trains elsewhere, as often as you like; --json prints the same as one JSON object.

Examples:
  python -m lm1b_hvd.status --logdir runs/demo
  watch -n 60 python -m lm1b_hvd.status --logdir /shared/runs/lstm-2048-512
  python -m lm1b_hvd.status --logdir runs/demo --json | jq .progress.step
"""
import dataclasses
import datetime
import json
import os
import re
import sys
import time

from lm1b_hvd import console
from lm1b_hvd.run import lock as run_lock
from lm1b_hvd.console import option
from lm1b_hvd.run.logdir_files import BEST_DIR, BEST_FILE, CHECKPOINT_STATE_FILE, HPARAMS_FILE, PROGRESS_FILE


@dataclasses.dataclass(frozen=True)
class StatusConfig:
    logdir: str = option("", "the training run's log directory (required)")
    json: bool = option(False, "print one JSON object instead of the screen")


def _read_json(path):
    try:
        with open(path) as handle:
            value = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise console.UserError(f"{path}: unreadable ({err})") from None
    return value if isinstance(value, dict) else None


def newest_checkpoint(directory):
    """{path, step, written} of the checkpoint the `checkpoint` file names, or None."""
    try:
        with open(os.path.join(directory, CHECKPOINT_STATE_FILE)) as handle:
            text = handle.read()
    except FileNotFoundError:
        return None
    match = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', text, re.MULTILINE)
    if not match:
        return None
    path = match.group(1) if os.path.isabs(match.group(1)) else os.path.join(directory, match.group(1))
    step = re.search(r"-(\d+)$", path)
    index = path + ".index"
    return {"path": path, "step": int(step.group(1)) if step else None,
            "written": os.path.getmtime(index) if os.path.exists(index) else None}


def collect(logdir):
    """The status of `logdir` as a dict (what --json prints)."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise console.UserError(f"{logdir}: a file, not a log directory")
    if not os.path.isdir(logdir):
        raise console.UserError(f"{logdir}: no such log directory")
    if not os.path.exists(os.path.join(logdir, HPARAMS_FILE)):
        raise console.UserError(f"{logdir}: no {HPARAMS_FILE} here; is it a training log directory?")
    held, holder = run_lock.read_holder(logdir)
    progress = _read_json(os.path.join(logdir, PROGRESS_FILE))
    best = _read_json(os.path.join(logdir, BEST_DIR, BEST_FILE))
    if best:
        best = {**best, "path": os.path.join(logdir, BEST_DIR, f"ckpt-{best.get('step')}")}
    eta = None
    if held and progress and progress.get("eta_seconds") is not None:
        eta = max(progress["eta_seconds"] - (time.time() - progress["time"]), 0.0)
    return {"logdir": logdir, "running": held, "holder": holder, "checkpoint": newest_checkpoint(logdir),
            "progress": progress, "eta_seconds": eta, "best": best, "now": time.time()}


def _when(timestamp, now):
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({console.format_seconds(max(now - timestamp, 0))} ago)"


def render(status):
    """The screen: one line per question."""
    now = status["now"]
    holder = run_lock.describe_holder(status["holder"])
    lines = [f"log directory {status['logdir']}"]
    if status["running"]:
        lines.append(f"run         running: {holder}")
    elif status["holder"]:
        lines.append(f"run         none holds it (the last one was {holder})")
    else:
        lines.append("run         none holds it (no run has taken it yet)")
    checkpoint = status["checkpoint"]
    if checkpoint:
        written = f", written {_when(checkpoint['written'], now)}" if checkpoint["written"] else " (its files are missing)"
        lines.append(f"checkpoint  step {checkpoint['step']}: {checkpoint['path']}{written}")
    else:
        lines.append("checkpoint  none yet")
    progress = status["progress"]
    if progress:
        lines.append(f"progress    step {progress['step']} | loss {progress['loss']:.3f} | "
                     f"{progress['words_per_sec']:,.0f} words/s | logged {_when(progress['time'], now)}")
    else:
        lines.append("progress    no progress line logged yet")
    if status["eta_seconds"] is not None:
        limit = (f"--max_steps {progress['max_steps']}" if progress["max_steps"]
                 else f"--max_time {progress['max_time']:.0f} s")
        lines.append(f"eta         {console.format_seconds(status['eta_seconds'])} to {limit}")
    elif status["running"]:
        lines.append("eta         none: the run has no --max_steps or --max_time")
    best = status["best"]
    if best:
        lines.append(f"best        heldout perplexity {best['perplexity']:.2f} at step {best['step']}: {best['path']}")
    else:
        lines.append("best        no heldout evaluation yet (train with --eval_every)")
    return "\n".join(lines)


def main(argv=None):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.status")
    console.add_options(parser, StatusConfig)
    config = console.from_options(StatusConfig, parser.parse_args(argv))
    if not config.logdir:
        parser.error("--logdir is required")

    def show():
        status = collect(config.logdir)
        console.say(json.dumps(status) if config.json else render(status))

    return console.run_main(show)


if __name__ == "__main__":
    sys.exit(main())
