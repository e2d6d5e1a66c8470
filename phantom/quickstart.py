"""The whole method on the phantom world in one command, then the time and results tables.

It runs the stage commands README lists, each as its own process under runs/, two at a time where neither reads the
other's output, each on one CPU thread (the tiny models keep one core busy, and one thread gives the same numbers on
any number of cores); each stage writes its output to runs/logs/<stage>.log. Run again after an interruption, it
goes on: finished stages are skipped, one with a checkpoint resumes, any other starts afresh. Ctrl-C or SIGTERM stops
the running stages after their current step, with resumable checkpoints.

Run:
  python -m phantom quickstart              # about 15 minutes on 2 idle CPU cores
  python -m phantom quickstart --fresh      # forget earlier runs and redo every stage
  python -m phantom quickstart --long       # every validation question and table 4's GRPO run
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import runtime

# (name, command after `python`, output folder or None); a stage reads every stage before it, or what NEEDS lists.
# The quick recipe scores the first 100 questions of each set. LANES: stages running at once.
STAGES = [
    ("world", ["-m", "phantom", "world"], None),
    ("warmup", ["-m", "phantom", "warmup"], "runs/warmup"),
    ("clip3d", ["clip3d.py"], "runs/clip3d"),
    ("sft", ["sft.py"], "runs/sft"),
    ("grpo", ["grpo.py"], "runs/grpo"),
    ("sft_noram", ["sft.py", "--no-ram", "--out", "runs/sft_noram"], "runs/sft_noram"),
    ("sft_noarw", ["sft.py", "--arw-lambda", "1.0", "--out", "runs/sft_noarw"], "runs/sft_noarw"),
    ("sft_lora", ["sft.py", "--lora", "--out", "runs/sft_lora"], "runs/sft_lora"),
    ("evaluate", ["evaluate.py", "--n-mmvqa", "100"], None),
]
NEEDS = {"clip3d": ["world"], "grpo": ["sft"], "grpo_nocon": ["sft"],
         **{name: ["warmup", "clip3d"] for name in ("sft_noram", "sft_noarw", "sft_lora")}}
LANES = 2
# --long: GRPO at lr 2e-5, 160 steps, half its questions without <think>; the same without r_con (table 4); all items
LONG_GRPO = ["--lr", "2e-5", "--steps", "160", "--no-think-frac", "0.5"]
LONG_STAGES = [*STAGES[:4], ("grpo", ["grpo.py", *LONG_GRPO], "runs/grpo"),
               ("grpo_nocon", ["grpo.py", *LONG_GRPO, "--consistency", "none", "--out", "runs/grpo_nocon"],
                "runs/grpo_nocon"), *STAGES[5:-1], ("evaluate", ["evaluate.py"], None)]
RECORD = Path("runs/quickstart.json")


def cpu_name() -> str:
    """The CPU model and the vector instructions torch uses on it: float results are reproducible per CPU type."""
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}"


def launch(name: str, full: list[str]) -> subprocess.Popen:
    """Start one stage, its output in runs/logs/<name>.log, on one thread unless OMP_NUM_THREADS says otherwise."""
    log = Path("runs/logs", f"{name}.log")
    print(f"== {name}: python {' '.join(full)}   (output: {log})", flush=True)
    with log.open("w") as out:   # the stage holds its own copy of the file
        return subprocess.Popen([sys.executable, *full], stdout=out, stderr=subprocess.STDOUT,
                                env={"OMP_NUM_THREADS": "1", **os.environ})


def main(argv=None) -> int:
    ap = runtime.make_parser(__doc__, "python -m phantom quickstart")
    ap.add_argument("--fresh", action="store_true", help="redo every stage, replacing earlier runs")
    ap.add_argument("--long", action="store_true", help="the longer recipe; the stages it shares are kept")
    args = ap.parse_args(argv)
    runtime.lock_folder("runs/logs", "quick start", flag="working folder")   # one at a time: its logs and record
    record = {} if args.fresh or not RECORD.is_file() else json.loads(RECORD.read_text())
    stages = LONG_STAGES if args.long else STAGES
    names = [name for name, _, _ in stages]
    needs = {name: set(NEEDS.get(name, names[:i])) for i, name in enumerate(names)}
    todo, ran, running, failed, t_start, cpu = list(stages), set(), {}, 0, time.time(), cpu_name()
    handlers = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),  # Ctrl-C reaches the stages directly
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: [  # a SIGTERM is passed on to them
                    proc.send_signal(signum) for proc, _ in running.values()])}
    try:
        while running or todo and not failed:   # after a failure, only the running stages finish
            for name, cmd, out in list(todo):        # start what is ready, in order, LANES at a time
                if failed or needs[name] & ({n for n, _, _ in todo} | set(running)):
                    continue
                same = record.get(name, {}).get("stage", cmd) == cmd     # the same command as the recorded run
                skip = record.get(name, {}).get("done") and same and not ran & needs[name]
                if not skip and len(running) == LANES:
                    continue
                todo.remove((name, cmd, out))
                if skip:
                    print(f"== {name}: done before ({record[name]['seconds']:.0f} s), skipped")
                    continue
                ran.add(name)                        # every stage that reads this one runs again too
                resume = out is not None and not args.fresh and same and any(Path(out, "ckpt").glob("step_*/state.pt"))
                full = cmd + (["--resume"] if resume else ["--overwrite"] if out else [])
                running[name] = (launch(name, full), time.time())
                record[name] = {"command": "python " + " ".join(full), "stage": cmd, "done": False,
                                "seconds": record.get(name, {}).get("seconds", 0) if resume else 0}
                RECORD.write_text(json.dumps({**record, "cpu": cpu}, indent=1))
            time.sleep(0.2)
            for name, (proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    seconds = round(record[name]["seconds"] + time.time() - t0, 1)
                    record[name].update(seconds=seconds, done=proc.returncode == 0)
                    failed = failed or proc.returncode
                    print(f"== {name}: {'done' if proc.returncode == 0 else f'stopped (exit {proc.returncode})'} "
                          f"after {seconds:.0f} s", flush=True)
                    RECORD.write_text(json.dumps({**record, "cpu": cpu}, indent=1))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if todo or failed:
        print(f"== stopped: run `python -m phantom quickstart{' --long' * args.long}` again to go on (logs: runs/logs)")
        return failed or 1
    print(f"\n## Time per stage ({cpu}; {LANES} stages at a time, one thread each; total = wall clock)\n\n"
          "| stage | seconds |\n|---|---|\n" + "\n".join(f"| {n} | {record[n]['seconds']:.0f} |" for n in names)
          + f"\n| total | {time.time() - t_start:.0f} |\n")
    print(Path("runs/eval/results.md").read_text())
    return 0
