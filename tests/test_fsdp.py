"""--shard fsdp (PyTorch's FSDP2 on gloo, 2 processes under torchrun): GRPO and SFT train the weights one process
trains, a SIGTERM mid-run saves a checkpoint and exits 143 on every rank, and resuming it replays the uninterrupted
run exactly."""
# ruff: noqa: F811  (the fixtures imported from test_grpo.py and test_sft.py)
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo
import model
import sft
from test_grpo import run_args, stand_in_accuracy, trained_state, without_time
from test_grpo import sft_ckpt  # noqa: F401  a fixture
from test_sft import ADAM_NOISE, sft_args
from test_sft import tiny_llm, vision_weights  # noqa: F401  fixtures

ROOT = Path(__file__).resolve().parents[1]
# grpo.main with the stand-in accuracy reward of test_grpo.py (rewards differ within a group); the rank named by
# SIGTERM_RANK sends itself SIGTERM while it scores its first completion, as a preemption that reaches one process
GRPO_DRIVER = f"""import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import grpo, runtime
grpo.accuracy_reward = lambda completion, answer, options=None: float(len(completion) % 3 == 0)
score, fired = grpo.format_reward, []
def format_reward(completion):
    if os.environ.get("SIGTERM_RANK") == os.environ["RANK"] and not fired:
        fired.append(os.kill(os.getpid(), signal.SIGTERM))
    return score(completion)
grpo.format_reward = format_reward
grpo.main(sys.argv[1:])
sys.exit(runtime.exit_code())
"""


def torchrun(script, args, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **env), capture_output=True,
                          text=True, timeout=600)


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_equals_one_process_and_resumes_a_sigterm_exactly(phantom_world, sft_ckpt, tmp_path, monkeypatch):
    driver = tmp_path / "driver.py"
    driver.write_text(GRPO_DRIVER)
    one = run_args(phantom_world, sft_ckpt, tmp_path / "one", "--steps", 3, "--eval-every", 3, "--eval-n", 4)

    def two(out, *more):  # 2 ranks x 1 question = 1 rank x 2 questions
        return run_args(phantom_world, sft_ckpt, out, "--steps", 3, "--batch-size", 1, "--eval-every", 3, "--eval-n",
                        4, "--shard", "fsdp", *more)
    monkeypatch.setattr(grpo, "accuracy_reward", stand_in_accuracy)
    grpo.main(one)
    run = torchrun(driver, two(tmp_path / "fsdp"))
    assert run.returncode == 0, run.stderr[-3000:]
    # the whole policy trains (ViT blocks, decoder layers and the root's embeddings, bridge, ... are sharded), and
    # generates whole for the rollout and the validation
    keys = ("reward", "r_fmt", "r_acc", "r_con", "completion_len", "zero_std_frac", "kl", "grad_norm")
    rows_one, rows_fsdp = rows(tmp_path / "one"), rows(tmp_path / "fsdp")
    assert len(rows_one) == len(rows_fsdp) > 0                              # zip below would hide a short run
    for r1, r2 in zip(rows_one, rows_fsdp):
        assert r1.get("sample") == r2.get("sample") and r1.get("val_acc") == r2.get("val_acc")
        # the step-0 validation row has none of the keys: compared as mappings, as pytest >= 9.2 refuses
        # approx(None, rel=...) (a TypeError)
        assert {k: r1[k] for k in keys if k in r1} == pytest.approx({k: r2[k] for k in keys if k in r2}, rel=1e-4,
                                                                    abs=1e-6)
    a, b = trained_state(tmp_path / "one"), trained_state(tmp_path / "fsdp")
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)  # test_grpo.py's 2-rank DDP tolerance (DDP and
    # FSDP both measured 1.6e-5: Adam magnifying float noise from another summation order)

    stopped = torchrun(driver, two(tmp_path / "resumed"), SIGTERM_RANK="1")
    log = stopped.stdout + stopped.stderr
    assert "stopped by SIGTERM after step 1" in log and "--resume" in log, log[-3000:]   # rank 0 prints it
    # torchrun's summary: each rank, the one not signalled too, exits 143 after the checkpoint is written (a
    # barrier), except that torchrun terminates a rank still shutting down (-15) once the other has exited; torchrun
    # 2.9 lists only the first rank to exit
    codes = re.findall(r"exitcode\s+:\s*(-?\d+)", log)
    assert "143" in codes and set(codes) <= {"143", "-15"} and len(codes) <= 2, log[-3000:]
    assert (tmp_path / "resumed" / "ckpt" / "step_00000001" / "state.pt").is_file()
    assert not (tmp_path / "resumed" / "vlm").exists()
    resumed = torchrun(driver, two(tmp_path / "resumed", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_time(rows(tmp_path / "resumed")) == without_time(rows(tmp_path / "fsdp"))
    c = trained_state(tmp_path / "resumed")
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.slow
def test_sft_with_lora_equals_one_process(phantom_world, tiny_llm, vision_weights, tmp_path):
    lora = ["--lora", "--lora-dropout", 0]  # no dropout: one process and two ranks draw different masks
    one = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "one", "--grad-accum", 2, *lora))
    run = torchrun(ROOT / "sft.py", sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "two", *lora,
                                             "--shard", "fsdp"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert [r["loss"] for r in rows(tmp_path / "two")] == pytest.approx(one["losses"], rel=1e-5)
    a, b = model.VLM.load(tmp_path / "one" / "vlm").state_dict(), model.VLM.load(tmp_path / "two" / "vlm").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=ADAM_NOISE) for k in a)  # test_sft.py's 2-rank DDP tolerance
    base = AutoModelForCausalLM.from_pretrained(tiny_llm).state_dict()   # LoRA trained, gathered and merged
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(b["llm." + q], base[q])
