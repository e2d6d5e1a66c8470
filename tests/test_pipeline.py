"""End to end at a reduced size: every stage's output loads in the next (issue 8).

warm-up -> clip3d -> sft -> grpo -> evaluate, each as the command a user types, on the small phantom world.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> None:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_whole_chain_hands_off(phantom_world, tmp_path):
    world, runs = str(phantom_world["root"]), tmp_path / "runs"
    run("-m", "phantom", "warmup", "--data-root", world, "--out", str(runs / "warmup"), "--max-steps", "3")
    run("clip3d.py", "--data-root", world, "--out", str(runs / "clip3d"), "--max-steps", "2", "--batch-size", "4")
    run("sft.py", "--data-root", world, "--llm", str(runs / "warmup"), "--out", str(runs / "sft"), "--max-steps", "2",
        "--vision-weights", str(runs / "clip3d" / "vision_encoder.safetensors"))
    run("grpo.py", "--data-root", world, "--sft", str(runs / "sft" / "vlm"), "--out", str(runs / "grpo"),
        "--steps", "1", "--batch-size", "1", "--max-new-tokens", "8", "--eval-every", "0")
    run("evaluate.py", "--data-root", world, "--runs", str(runs), "--out", str(runs / "eval"),
        "--tasks", "mmvqa,reports", "--n-mmvqa", "2", "--n-reports", "1", "--max-new-tokens", "8",
        "--max-report-tokens", "8")
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert sorted(results["runs"]) == ["grpo", "sft"]   # both stages' checkpoints were found, loaded and evaluated
    for evaluated in results["runs"].values():
        assert [s[p]["n"] for s in evaluated["mmvqa"].values() for p in ("think", "no_think")] == [2] * 4
        assert evaluated["reports"]["per_item"] and all(len(v) == 1 for v in evaluated["reports"]["per_item"].values())
    table = (runs / "eval" / "results.md").read_text()
    assert all(f"\n| {label} |" in table for label in ("sft", "grpo"))
