"""The whole method on the phantom world in one command: every stage as its own process, then the time table and the
results tables.

It runs exactly the stage commands README lists, under runs/. Run it again after an interruption and it goes on:
stages that finished are skipped, a stage with a resumable checkpoint continues with --resume, any other stage starts
afresh. Ctrl-C (or SIGTERM) stops the running stage after its current step, with a resumable checkpoint.

Run:
  python -m phantom quickstart              # about 13 minutes on 2 idle CPU cores
  python -m phantom quickstart --fresh      # forget earlier runs and redo every stage
  python -m phantom quickstart --long       # every validation question and table 4's GRPO run (about 25 minutes)
"""
from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

# (name, command after `python`, its output folder or None): the order matters, each stage reads the one before.
# The quick recipe scores the first 100 questions of each MMVQA set: its GRPO gain is within their noise.
STAGES = [
    ("world", ["-m", "phantom", "world"], None),
    ("warmup", ["-m", "phantom", "warmup"], "runs/warmup"),
    ("clip3d", ["clip3d.py"], "runs/clip3d"),
    ("sft", ["sft.py"], "runs/sft"),
    ("sft_noram", ["sft.py", "--no-ram", "--out", "runs/sft_noram"], "runs/sft_noram"),
    ("sft_noarw", ["sft.py", "--arw-lambda", "1.0", "--out", "runs/sft_noarw"], "runs/sft_noarw"),
    ("sft_lora", ["sft.py", "--lora", "--out", "runs/sft_lora"], "runs/sft_lora"),
    ("grpo", ["grpo.py"], "runs/grpo"),
    ("evaluate", ["evaluate.py", "--n-mmvqa", "100"], None),
]
# --long: GRPO at lr 2e-5 for 160 steps with half of its questions asked without <think>, the same without the
# consistency reward (table 4), and every validation question (about 320 per set)
LONG_GRPO = ["--lr", "2e-5", "--steps", "160", "--no-think-frac", "0.5"]
LONG_STAGES = STAGES[:-2] + [
    ("grpo", ["grpo.py", *LONG_GRPO], "runs/grpo"),
    ("grpo_nocon", ["grpo.py", *LONG_GRPO, "--consistency", "none", "--out", "runs/grpo_nocon"], "runs/grpo_nocon"),
    ("evaluate", ["evaluate.py"], None),
]
RECORD = Path("runs/quickstart.json")


def cpu_name() -> str:
    """The CPU model and the vector instructions torch uses on it: float results are reproducible per CPU type."""
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def run_stage(cmd: list[str]) -> int:
    """Run one stage; Ctrl-C reaches it from the terminal, a SIGTERM sent to this process is passed on."""
    proc = subprocess.Popen([sys.executable, *cmd])
    handlers = {sig: signal.signal(sig, lambda signum, _: proc.send_signal(signum) if signum == signal.SIGTERM
                                   else None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phantom quickstart", description=__doc__.split("\n")[0],
                                 epilog=__doc__[__doc__.index("Run:"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fresh", action="store_true", help="redo every stage, replacing earlier runs")
    ap.add_argument("--long", action="store_true", help="the longer recipe; the stages it shares are kept")
    args = ap.parse_args(argv)
    record = {} if args.fresh or not RECORD.is_file() else json.loads(RECORD.read_text())
    redo = False                                       # once a stage runs, every later stage runs again
    stages = LONG_STAGES if args.long else STAGES
    for name, cmd, out in stages:
        same = record.get(name, {}).get("stage", cmd) == cmd     # the same command as the recorded run
        if record.get(name, {}).get("done") and same and not redo:
            print(f"== {name}: done before ({record[name]['seconds']:.0f} s), skipped")
            continue
        redo = True
        resume = out is not None and not args.fresh and same and any(Path(out, "ckpt").glob("step_*/state.pt"))
        full = cmd + (["--resume"] if resume else ["--overwrite"] if out else [])
        print(f"== {name}: python {' '.join(full)}", flush=True)
        t0 = time.time()
        code = run_stage(full)
        seconds = time.time() - t0 + (record.get(name, {}).get("seconds", 0) if resume else 0)
        record[name] = {"command": "python " + " ".join(full), "stage": cmd, "seconds": round(seconds, 1),
                        "done": code == 0}
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps({**record, "cpu": cpu_name()}, indent=1))
        if code != 0:
            print(f"== {name} stopped (exit {code}); run `python -m phantom quickstart{' --long' * args.long}` again "
                  "to go on")
            return code
    stages = [name for name, _, _ in stages]
    print(f"\n## Time per stage ({cpu_name()})\n\n| stage | seconds |\n|---|---|")
    print("\n".join(f"| {name} | {record[name]['seconds']:.0f} |" for name in stages))
    print(f"| total | {sum(record[name]['seconds'] for name in stages):.0f} |\n")
    print(Path("runs/eval/results.md").read_text())
    return 0
