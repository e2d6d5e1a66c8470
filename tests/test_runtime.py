"""runtime.py: the command-line conventions every stage shares, the one metrics / checkpoint policy, and the layout
rule that the method never reaches into the phantom package except to build a missing world."""
import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import curve_points, torchrun
import bench
import clip3d
import data
import evaluate
import grpo
import runtime
import sft

ROOT = Path(__file__).resolve().parents[1]
METHOD = ["model.py", "data.py", "clip3d.py", "sft.py", "grpo.py", "evaluate.py", "runtime.py"]


@pytest.mark.parametrize("stage", ["sft.py", "grpo.py", "clip3d.py", "evaluate.py"])
def test_help_shows_every_default_grouped_with_run_lines(stage):
    out = subprocess.run([sys.executable, stage, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "Run:" in text and "torchrun --standalone --nproc_per_node 8" in text   # the docstring's run lines
    if stage != "evaluate.py":
        assert "optimisation:" in text and "run-time:" in text and "data:" in text
        for hidden in ("--stop-at", "--max-steps", "--inject-nan"):                 # test-only flags are hidden
            assert hidden not in text
    # every visible option line (or its continuation) carries its default, a None one said in words ("unset = ...")
    blocks = [" ".join(b.split()) for b in text.split("\n  --")[1:]]
    shown = lambda b: "default:" in b or "unset =" in b
    assert blocks and all(shown(b) for b in blocks), [b for b in blocks if not shown(b)][:3]
    assert not [b for b in blocks if "unset =" in b and "default: None" in b]     # one default, not two


def test_paper_defaults_on_the_flags_phantom_overrides_in_one_dict():
    real, phantom = sft.parse_args(["--preset", "real"]), sft.parse_args([])
    assert (real.lr, real.epochs, real.batch_size, real.vit_preset) == (1e-4, 1, 2, "base")   # the paper's SFT
    assert all(getattr(phantom, k) == v for k, v in sft.PHANTOM.items())
    assert sft.parse_args(["--lr", "0.5"]).lr == 0.5                                          # a given flag wins
    g = grpo.parse_args(["--preset", "real"])
    assert (g.lr, g.group_size, g.kl_beta, g.max_new_tokens, g.freeze_encoder) == (1e-6, 4, 0.04, 512, False)
    c = clip3d.parse_args(["--preset", "real"])
    assert (c.lr, c.batch_size, c.epochs, c.vit) == (5e-5, 64, 39, "base")
    e = evaluate.parse_args(["--preset", "real"])        # every valid question and report
    assert (e.n_mmvqa, e.n_reports, e.max_new_tokens) == (0, 0, 512) and evaluate.parse_args([]).n_reports == 32


def test_help_keeps_the_flags_own_format_and_escapes_only_the_defaults_shown():
    import argparse
    p = argparse.ArgumentParser()
    runtime.data_flags(p)
    p.add_argument("--warmup-frac", type=float, default=0.03, help="warm-up, 3 %% of the steps")
    p.add_argument("--n", type=int, default=4, help="n (%(type)s)")
    p.add_argument("--tag", default="5%", help="a tag")
    vqa = p.add_argument("--vqa", action=argparse.BooleanOptionalAction, default=True, help="VQA items")
    vqa.help = "VQA items (default: %(default)s)"   # Python 3.10's BooleanOptionalAction makes this, on any Python
    p.add_argument("--enc", help="an encoder; unset = <data-root>/enc")
    p.add_argument("--mb", type=int, help="micro-batch; unset = all", default=8)
    runtime.parse_with_preset(p, [], {"tag": "10%", "vqa": False, "mb": None})
    text = " ".join(p.format_help().split())
    assert "warm-up, 3 % of the steps (default: 0.03)" in text and "n (int) (default: 4)" in text
    assert "a tag (default: 5%; phantom: 10%)" in text and "VQA items (default: True; phantom: False)" in text
    assert "an encoder; unset = <data-root>/enc --mb" in text and "unset = all (default: 8; phantom: None)" in text


def test_method_files_import_the_phantom_package_in_one_place_only():
    """Import arrows run one way: phantom -> method. The only exception is data.paths building a missing world."""
    found = []
    for name in METHOD:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [(name, m) for m in mods if m.split(".")[0] == "phantom"]
    assert found == [("data.py", "phantom")]


def test_fresh_run_replaces_metrics_and_checkpoints_resume_keeps_rows_up_to_its_step(tmp_path):
    run = runtime.Run(tmp_path, resume=False)
    for step in (1, 2, 3):
        run.log({"step": step, "loss": float("nan") if step == 2 else 1.0 / step})
        if step == 2:
            run.save(step, {"weights": torch.ones(2)})
    run.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] is None     # valid JSON: NaN as null
    resumed = runtime.Run(tmp_path, resume=True)                                   # the newest checkpoint: step 2
    assert resumed.start == 2 and torch.equal(resumed.state["weights"], torch.ones(2))
    resumed.log({"step": 3, "loss": 0.25})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25    # step 3 once, the new one
    with pytest.raises(SystemExit, match=r"holds an earlier run \(metrics.jsonl, ckpt\): pass --resume .* --overwrite"):
        runtime.Run(tmp_path, resume=False)                                         # never mixed silently
    fresh = runtime.Run(tmp_path, resume=False, overwrite=True)
    fresh.log({"step": 1, "loss": 1.0})
    fresh.close()
    assert not (tmp_path / "ckpt").exists() and len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    # a run with metrics but no checkpoint (finished, or stopped before its first save) is not wiped by --resume
    with pytest.raises(SystemExit, match=r"holds a run \(metrics.jsonl\) but no checkpoint .* with --overwrite"):
        runtime.Run(tmp_path, resume=True)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    new = runtime.Run(tmp_path / "new", resume=True)                                 # nothing there yet: from step 0
    new.close()
    assert new.start == 0


def test_resume_refuses_other_flags_or_another_world_size_and_overwrite_clears_old_outputs(tmp_path):
    args = {"lr": 1e-3, "batch_size": 2, "out": str(tmp_path), "resume": False, "save_every": 10, "ram": True}
    run = runtime.Run(tmp_path, resume=False, args=args)
    run.save(2, {})                                                          # the run saves its flags itself
    run.close()
    again = {**args, "resume": True, "save_every": 5}                       # where and how often it saves: may change
    assert runtime.Run(tmp_path, resume=True, args=again).start == 2
    with pytest.raises(SystemExit, match=r"other settings \(--lr 0.001 -> 0.05; --ram True -> False\): resume with"):
        runtime.Run(tmp_path, resume=True, args={**again, "lr": 0.05, "ram": False})
    state = torch.load(next((tmp_path / "ckpt").glob("step_*")) / "state.pt", weights_only=True)
    runtime.save_train_state(tmp_path / "ckpt", 3, {**state, "step": 3, "rng": state["rng"] * 2})   # 2 ranks wrote it
    with pytest.raises(SystemExit, match=r"world size 2 -> 1"):
        runtime.Run(tmp_path, resume=True, args=again)
    for old in ("vlm/config.json", "curves.png", "vision_encoder.safetensors", "config.json"):
        (tmp_path / old).parent.mkdir(exist_ok=True)
        (tmp_path / old).write_text("the earlier run's")
    runtime.Run(tmp_path, resume=False, overwrite=True, args=args).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "metrics.jsonl"]   # the lock, the new run


def test_resume_drops_a_torn_metrics_line_and_refuses_overwrite(tmp_path, capsys):
    run = runtime.Run(tmp_path, resume=False)
    for step in (1, 2, 3):
        run.log({"step": step, "loss": 1.0 / step})
        if step == 2:
            run.save(step, {})
    run.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.2')                                          # killed mid-write
    resumed = runtime.Run(tmp_path, resume=True)
    resumed.close()
    assert resumed.start == 2 and "dropped 1 line(s) that are not valid JSON" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(SystemExit, match="--resume and --overwrite exclude each other"):
        runtime.Run(tmp_path, resume=True, overwrite=True)


FINITE_SCRIPT = """
import json, sys, torch, runtime
rank = runtime.setup_distributed()[0]
value = lambda on_rank_1, on_rank_0=1.0: torch.tensor(on_rank_1 if rank == 1 else on_rank_0)
seen = {"finite on both": runtime.all_ranks_finite(value(2.0)),
        "nan on rank 1": runtime.all_ranks_finite(value(float("nan"))),
        "inf on rank 0": runtime.all_ranks_finite(value(1.0, float("inf"))),
        "two values, one nan on rank 1": runtime.all_ranks_finite(value(1.0), value(float("nan")))}
json.dump(seen, open(f"{sys.argv[1]}.{rank}", "w"))
runtime.cleanup_distributed()
"""


@pytest.mark.slow
def test_a_non_finite_value_on_one_rank_is_seen_by_every_rank(tmp_path):
    """runtime.all_ranks_finite under torchrun (2 processes): one rank's NaN or inf makes every rank skip the step,
    so that no rank steps while another does not."""
    (tmp_path / "finite.py").write_text(FINITE_SCRIPT)
    torchrun(2, tmp_path / "finite.py", tmp_path / "seen")
    expected = {"finite on both": True, "nan on rank 1": False, "inf on rank 0": False,
                "two values, one nan on rank 1": False}
    assert [json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in (0, 1)] == [expected, expected]


def test_resume_restores_this_ranks_rng_state(tmp_path):
    torch.manual_seed(123)
    run = runtime.Run(tmp_path, resume=False)
    run.save(1, {})
    expected = torch.rand(3)
    torch.manual_seed(999)
    runtime.Run(tmp_path, resume=True)
    assert torch.equal(torch.rand(3), expected)


def test_optimizer_step_skips_a_non_finite_loss(capsys):
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    (w.sum() * float("nan")).backward()
    norm, applied = runtime.optimizer_step(opt, [w], 1.0, "skip", 7, torch.tensor(float("nan")))
    assert not applied and torch.equal(w.detach(), torch.ones(2)) and w.grad is None and math.isnan(norm)
    assert "non-finite loss or gradient at step 8: skipping" in capsys.readouterr().out   # loop index 7: step 8
    (w.sum()).backward()
    _, applied = runtime.optimizer_step(opt, [w], 1.0, "skip", 8, torch.tensor(1.0))
    assert applied and not torch.equal(w.detach(), torch.ones(2))


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_floor():
    """Linear warm-up reaching base_lr at the last warm-up step (never 0 at step 0: the first update counts), then
    base * (r + (1 - r) * (1 + cos(pi * progress)) / 2), held at the floor past the last step; by hand, 4 + 8 steps."""
    lr = lambda step, ratio=0.0: runtime.cosine_lr(step, 12, 4, 2.0, ratio)
    assert [lr(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    for step, progress in ((4, 0.0), (6, 0.25), (8, 0.5), (10, 0.75), (12, 1.0), (20, 1.0)):
        assert lr(step) == pytest.approx(2.0 * (1 + math.cos(math.pi * progress)) / 2, abs=1e-12)
        assert lr(step, 0.1) == pytest.approx(2.0 * (0.1 + 0.9 * (1 + math.cos(math.pi * progress)) / 2))
    assert lr(8) == pytest.approx(1.0) and lr(12) == pytest.approx(0.0, abs=1e-12) and lr(12, 0.1) == pytest.approx(0.2)
    assert runtime.cosine_lr(0, 10, 0, 3.0) == 3.0                         # no warm-up: start at the peak


def test_optimizer_step_clips_to_the_norm_and_zero_means_no_clipping(capsys):
    """--grad-clip c rescales the gradient to norm c when it is larger; 0 turns clipping off (the full step). The norm
    returned is the one before clipping. Gradient (3, 4): norm 5."""
    for clip, moved in ((1.0, [0.06, 0.08]), (10.0, [0.3, 0.4]), (0.0, [0.3, 0.4])):
        w = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([w], lr=0.1)
        (-(w * torch.tensor([3.0, 4.0])).sum()).backward()
        norm, applied = runtime.optimizer_step(opt, [w], clip, "skip", 0, torch.tensor(1.0))
        assert applied and norm.item() == pytest.approx(5.0)
        assert w.detach().tolist() == pytest.approx(moved), clip


def test_optimizer_step_skips_a_non_finite_gradient_under_a_finite_loss(capsys):
    """An overflowing backward can leave inf / NaN gradients under a finite loss: the update is skipped, the weights
    keep their values."""
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("inf")])
    norm, applied = runtime.optimizer_step(opt, [w], 1.0, "skip", 3, torch.tensor(0.5))
    assert not applied and not math.isfinite(norm) and torch.equal(w.detach(), torch.ones(2))
    assert "non-finite loss or gradient at step 4: skipping" in capsys.readouterr().out


def test_latest_train_state_is_the_newest_complete_checkpoint(tmp_path):
    for step in (1, 2, 3, 10):
        runtime.save_train_state(tmp_path, step, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000010"]
    (tmp_path / "step_00000011").mkdir()                                   # a directory without its state.pt
    assert runtime.latest_train_state(tmp_path)["step"] == 10
    assert runtime.latest_train_state(tmp_path / "none") is None


def test_a_checkpoint_is_mapped_from_its_file_not_copied_into_each_ranks_memory(tmp_path):
    """Every rank of a resume loads the whole checkpoint and keeps it (run.state) for the run: mapped from the file,
    the ranks of a node share one copy in the page cache (a GRPO train state of the real preset is ~37 GB; eight
    private copies would hold ~300 GB of host memory for the whole run)."""
    runtime.save_train_state(tmp_path, 1, {"w": torch.arange(50_000_000, dtype=torch.float32)})   # 200 MB
    state = runtime.latest_train_state(tmp_path)
    assert state["w"][-1] == 49_999_999 and float(state["w"].sum()) > 0     # every page read
    file = str((tmp_path / "step_00000001" / "state.pt").resolve())
    spans = [[int(a, 16) for a in line.split()[0].split("-")]                  # this process's mappings of the file
             for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(" " + file)]
    start, end = state["w"].data_ptr(), state["w"].data_ptr() + state["w"].nbytes
    assert any(a <= start and end <= b for a, b in spans)                     # the tensor's bytes are the file's pages


def test_an_unreadable_checkpoint_is_named_with_the_older_one_to_fall_back_on(tmp_path):
    for step in (1, 2):
        runtime.save_train_state(tmp_path, step, {"step": step})
    newest = tmp_path / "step_00000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])                            # cut short by a full disk
    with pytest.raises(RuntimeError, match=rf"{newest} cannot be read .*; delete {newest.parent} to resume from "
                                           rf"{tmp_path / 'step_00000001'}"):
        runtime.latest_train_state(tmp_path)


def test_a_checkpoint_records_the_code_and_package_versions(tmp_path):
    run = runtime.Run(tmp_path, resume=False)
    run.save(1, {})
    run.close()
    saved = runtime.latest_train_state(tmp_path / "ckpt")["versions"]
    assert saved["torch"] == str(torch.__version__) and saved["transformers"] and len(saved["git_commit"]) == 40


def test_versions_name_the_files_changed_since_the_commit(tmp_path, monkeypatch):
    """A fork's edits are recorded: a checkpoint or results.json made from changed tracked files names them."""
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *a],
                                    check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    for name in ("grpo.py", "model.py"):
        (tmp_path / name).write_text("r = 1\n")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(runtime, "__file__", str(tmp_path / "runtime.py"))   # versions() asks git where the code is
    assert runtime.versions()["git_commit"] == git("rev-parse", "HEAD").strip()
    assert runtime.versions()["git_changed"] == []
    (tmp_path / "grpo.py").write_text("r = 2\n")                               # edited
    (tmp_path / "new.py").write_text("")                                      # untracked: not the code that ran
    assert runtime.versions()["git_changed"] == ["grpo.py"]
    md = evaluate.markdown({"runs": {}, "reference": None, "significance": {}, "provenance": runtime.versions()})
    assert f"(commit {git('rev-parse', 'HEAD').strip()}, with uncommitted changes to grpo.py)." in md


def test_a_save_clears_what_killed_saves_left_in_the_ckpt_root(tmp_path):
    """A kill inside atomic_dir at a step never saved again: its temporary goes at the next save of any step; an old
    version whose final is missing is put back; a live process's temporary stays."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()                                                             # its pid is no process's now
    root = tmp_path / "ckpt"
    leftovers = {f".step_00000013.tmp-{dead.pid}": "half", f".step_00000005.old-{dead.pid}": "previous",
                 f".step_00000007.old-{dead.pid}": "stale", f".step_00000009.tmp-{os.getpid()}": "live"}
    for name, text in leftovers.items():
        (root / name).mkdir(parents=True)
        (root / name / "state.pt").write_text(text)
    (root / "step_00000007").mkdir()
    runtime.save_train_state(root, 10, {"step": 10}, keep=5)
    assert sorted(p.name for p in root.iterdir()) == [f".step_00000009.tmp-{os.getpid()}",
                                                     "step_00000005", "step_00000007", "step_00000010"]
    assert (root / "step_00000005/state.pt").read_text() == "previous"


def test_end_step_saves_when_due_and_on_a_stop_request(tmp_path, capsys):
    """The loop tail every stage shares: save when due, and on a stop request save, say how to resume, stop."""
    run, built = runtime.Run(tmp_path, resume=False, stop_at=3, save_every=2), []
    state = lambda: built.append(1) or {"w": torch.ones(1)}            # built on every rank only when a save is due
    assert not run.end_step(1, 4, state) and not built and not (tmp_path / "ckpt").exists()
    assert not run.end_step(2, 4, state) and len(built) == 1
    assert run.end_step(3, 4, state) and len(built) == 2                   # --stop-at 3: saved although not due
    run.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000002", "step_00000003"]
    assert f"stopped after step 3: saved a resumable checkpoint in {tmp_path / 'ckpt'}" in capsys.readouterr().out
    # the last step: no periodic save (sft and grpo write vlm/ instead), unless save_last (clip3d)
    for save_last, expected in ((False, []), (True, ["step_00000004"])):
        last = runtime.Run(tmp_path / str(save_last), resume=False, save_every=2, save_last=save_last)
        assert not last.end_step(4, 4, state)
        last.close()
        assert sorted(p.name for p in (tmp_path / str(save_last)).glob("ckpt/*")) == expected


def test_a_stop_request_during_the_last_step_lets_the_run_finish(tmp_path, capsys):
    """SIGTERM (a time limit) or --stop-at at the last step: nothing is left to stop, so the run finishes as one, exit
    status 0, and no line says to resume it (a resume would rewrite its final outputs from nothing)."""
    run = runtime.Run(tmp_path, resume=False, stop_at=4)
    runtime._on_stop_signal(signal.SIGTERM, None)
    assert not run.end_step(4, 4, lambda: {}) and runtime.exit_code() == 0
    run.close()
    assert "stopped" not in capsys.readouterr().out and not (tmp_path / "ckpt").exists()


def test_a_run_writing_where_its_input_lies_is_refused_and_a_path_spelled_otherwise_resumes(tmp_path, monkeypatch):
    """grpo.py --sft D/vlm --out D (or sft.py --llm D --out D) would replace, and with --overwrite delete, the run's
    own input: refused before anything is touched. A resume may name a path otherwise ("../x/" for "/tmp/x")."""
    (sft_vlm := tmp_path / "D" / "vlm").mkdir(parents=True)
    for out, given in ((tmp_path / "D", sft_vlm), (tmp_path / "D", tmp_path / "D"), (tmp_path / "D", sft_vlm / "llm")):
        with pytest.raises(SystemExit, match=rf"^{given} is an input of this run, and {out} is where the run writes"):
            runtime.Run(out, resume=False, overwrite=True, inputs=(None, str(given)))
        runtime.unlock_folder(out)
    assert sft_vlm.is_dir()
    runtime.Run(tmp_path / "E", resume=False, inputs=(str(sft_vlm),)).close()   # beside it: fine
    runtime.unlock_folder(tmp_path / "E")
    run = runtime.Run(tmp_path / "r", resume=False, args={"data_root": str(tmp_path / "D"), "lr": 1.0})
    run.save(1, {})
    run.close()
    runtime.unlock_folder(tmp_path / "r")
    monkeypatch.chdir(tmp_path / "D" / "vlm")
    assert runtime.Run(tmp_path / "r", resume=True, args={"data_root": "../../D/", "lr": 1.0}).start == 1
    runtime.unlock_folder(tmp_path / "r")
    with pytest.raises(SystemExit, match=r"other settings \(--lr 1.0 -> 2.0\)"):
        runtime.Run(tmp_path / "r", resume=True, args={"data_root": "../../D/", "lr": 2.0})


def test_every_training_stage_has_the_shared_run_time_flags():
    shared = {"preset", "data_root", "out", "resume", "overwrite", "save_every", "nan_policy", "seed", "stop_at"}
    for stage in (clip3d, sft, grpo):
        args = vars(stage.parse_args(["--stop-at", "2", "--save-every", "5"]))
        assert shared <= set(args) and (args["stop_at"], args["save_every"]) == (2, 5), stage.__name__
    assert (sft.parse_args([]).out, grpo.parse_args([]).out, clip3d.parse_args([]).out) == \
        ("runs/sft", "runs/grpo", "runs/clip3d")


def test_a_fresh_run_into_an_earlier_runs_folder_stops_before_any_work(tmp_path):
    """Forgetting --resume (or --overwrite) stops at once, not after the models are built and the data read."""
    (tmp_path / "metrics.jsonl").write_text("")
    for main, argv in ((clip3d.main, ["--preset", "real", "--data-root", str(tmp_path / "none")]),
                       (sft.main, ["--preset", "real"]), (grpo.main, ["--sft", str(tmp_path / "none")])):
        with pytest.raises(SystemExit, match=rf"^{tmp_path} holds an earlier run \(metrics.jsonl\)"):
            main([*argv, "--out", str(tmp_path)])


def test_input_statistics_over_one_volume_stop_at_the_command_line(capsys):
    with pytest.raises(SystemExit):   # a spread over one volume is 0: before, a ValueError after the whole set-up
        sft.parse_args(["--feature-stats", "1"])
    assert "--feature-stats: must be at least 2, not 1" in capsys.readouterr().err


def test_resume_and_overwrite_together_stop_at_the_command_line(capsys):
    for stage in (clip3d, sft, grpo):   # before the models are built, not after
        with pytest.raises(SystemExit):
            stage.parse_args(["--resume", "--overwrite"])
        assert "argument --overwrite: not allowed with argument --resume" in capsys.readouterr().err


@pytest.mark.parametrize("stage, argv, said", [
    ("clip3d", ["--batch-size", "0"], "--batch-size: must be at least 1, not 0"),
    ("sft", ["--seed", "-1"], "--seed: must be at least 0 and at most 2147483647, not -1"),
    ("grpo", ["--temperature", "0"], "--temperature: must be at least 0.01, not 0"),
    ("clip3d", ["--warmup-frac", "1.5"], "--warmup-frac: must be at least 0.0 and at most 1.0, not 1.5"),
    ("sft", ["--epochs", "0"], "--epochs: must be at least 1, not 0"),
    ("sft", ["--lr", "-0.001"], "--lr: must be at least 0.0, not -0.001"),
    ("sft", ["--grad-accum", "0"], "--grad-accum: must be at least 1, not 0"),
    ("grpo", ["--steps", "0"], "--steps: must be at least 1, not 0"),
    ("grpo", ["--no-think-frac", "2"], "--no-think-frac: must be at least 0.0 and at most 1.0, not 2"),
    ("grpo", ["--eval-n", "-5"], "--eval-n: must be at least 0, not -5"),
    ("evaluate", ["--max-new-tokens", "0"], "--max-new-tokens: must be at least 1, not 0"),
    ("evaluate", ["--n-mmvqa", "-2"], "--n-mmvqa: must be at least 0, not -2"),
    ("sft", ["--batch-size", "two"], "--batch-size: invalid int value: 'two'"),
    ("bench", ["--repeats", "0"], "--repeats: must be at least 1, not 0"),              # a median of no runs
    ("bench", ["--grpo-g", "1"], "--grpo-g: must be at least 2, not 1"),                # nothing to compare
    ("bench", ["--sft-steps", "-3"], "--sft-steps: must be at least 1, not -3"),
    ("bench", ["--peak-tflops", "0"], "--peak-tflops: must be at least 1.0, not 0"),    # MFU divides by it
    ("bench", ["--gpu-gb", "-80"], "--gpu-gb: must be at least 1.0, not -80"),
    ("bench", ["--prompt-text-tokens", "-1"], "--prompt-text-tokens: must be at least 0, not -1"),
])
def test_numeric_flags_refuse_values_no_run_can_use(stage, argv, said, capsys):
    """A batch of 0, a negative learning rate or count, a share above 1: each stops at the command line with the
    flag's name (before, some trained nothing and wrote a model, others failed deep inside the run); bench.py's too."""
    parse = {"clip3d": clip3d.parse_args, "sft": sft.parse_args, "grpo": grpo.parse_args,
             "evaluate": evaluate.parse_args, "bench": bench.parse_args}[stage]
    with pytest.raises(SystemExit):
        parse(argv)
    assert said in capsys.readouterr().err
    low = re.search(r"at least ([-\d.e]+)", said)                          # the smallest value in range parses
    value = low[1] if low else "1"
    assert float(getattr(parse([argv[0], value]), argv[0][2:].replace("-", "_"))) == float(value)


def test_lora_settings_need_lora_and_a_scale_and_dropout_that_let_the_adapters_train(capsys):
    """--lora-rank, --lora-alpha or --lora-dropout without --lora were ignored (the run trained the bridge alone, as
    if they had not been given); alpha 0 (a zero update) or dropout 1 (a zero input) made adapters that never train."""
    for argv, said in ((["--lora-rank", "4", "--lora-dropout", "0.1"], "--lora-rank, --lora-dropout: only with --lora"),
                       (["--lora", "--lora-alpha", "0"], "--lora-alpha: must be at least 0.001, not 0"),
                       (["--lora", "--lora-dropout", "1"], "--lora-dropout: must be at least 0.0 and at most 0.99")):
        with pytest.raises(SystemExit):
            sft.parse_args(argv)
        assert said in capsys.readouterr().err
    args = sft.parse_args(["--lora", "--lora-rank", "4", "--lora-alpha", "0.001", "--lora-dropout", "0.99"])
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout) == (4, 0.001, 0.99)


def test_data_commands_refuse_a_spacing_or_share_no_run_can_use(capsys):
    import data
    for argv, said in ((["preprocess", "--src", "s", "--out", "o", "--spacing", "0", "1", "1"], "--spacing: must be "
                        "at least 0.001, not 0"), (["mmvqa", "--labels", "l", "--out", "o", "--rl-frac", "-0.5"],
                                                   "--rl-frac: must be at least 0.0 and at most 1.0, not -0.5")):
        with pytest.raises(SystemExit):
            data.main(argv)
        assert said in capsys.readouterr().err


def test_a_group_of_one_sample_is_refused(capsys):
    """GRPO's advantages compare a group's samples: a group of one has nothing to compare."""
    with pytest.raises(SystemExit):
        grpo.parse_args(["--group-size", "1"])
    assert "--group-size: must be at least 2, not 1" in capsys.readouterr().err
    assert grpo.parse_args(["--group-size", "2"]).group_size == 2


HOLDER = """import sys, runtime
runtime.Run(sys.argv[1], resume=False) if sys.argv[2] == "run" else runtime.lock_folder(sys.argv[1], sys.argv[2])
print("holding", flush=True)
sys.stdin.read()
"""


def hold(folder: Path, what: str) -> subprocess.Popen:
    """Another process that holds `folder` (a Run there, or the lock alone) until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), what], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "holding\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_second_process_in_a_run_folder_is_refused_before_it_changes_anything(tmp_path, monkeypatch):
    """--overwrite (the quick start passes it for every fresh stage) would delete a live run's metrics and
    checkpoints under it, and --resume would repeat its steps: a second run, or quick start, stops naming the pid."""
    proc = hold(tmp_path, "run")
    runtime.save_train_state(tmp_path / "ckpt", 2, {"step": 2})
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    try:
        for resume, overwrite in ((False, True), (True, False)):
            with pytest.raises(SystemExit, match=rf"{tmp_path} is in use by another run \(pid {proc.pid}\)"):
                runtime.Run(tmp_path, resume=resume, overwrite=overwrite)
        assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n' and (tmp_path / "ckpt").is_dir()
    finally:
        release(proc)
    runtime.Run(tmp_path, resume=False, overwrite=True).close()             # free again: its own run replaces it
    runtime.cleanup_distributed()
    assert not (tmp_path / "ckpt").exists()
    from phantom import quickstart
    monkeypatch.chdir(tmp_path)
    proc = hold(tmp_path / "runs" / "logs", "quick start")
    try:
        with pytest.raises(SystemExit, match=rf"runs/logs is in use by another quick start \(pid {proc.pid}\)"):
            quickstart.main([])
    finally:
        release(proc)


def test_a_file_system_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    runtime.Run(tmp_path, resume=False).close()
    runtime.cleanup_distributed()
    assert f"{tmp_path}: cannot be locked ([Errno 37] No locks available)" in capsys.readouterr().out


def test_preprocessing_waits_for_another_in_its_cache_then_clears_what_a_killed_one_left(tmp_path):
    """Two preprocessing runs into one cache would rename each other's files away: the second waits, then skips
    what the first wrote; temporary files a killed run left behind are removed."""
    import numpy as np
    src, out = tmp_path / "rad", tmp_path / "cache"
    src.mkdir()
    hu = np.full((12, 10, 8), -1000, np.int16)
    hu[3:9, 3:7, 2:6] = 40
    for i in (1, 2):
        np.savez(src / f"trn{i}.npz", ct=hu)
    proc = hold(out, "preprocessing")
    (out / "trn9.tmp.npy").write_bytes(b"cut short by a kill")
    cmd = [sys.executable, "data.py", "preprocess", "--src", str(src), "--format", "radchestct", "--out", str(out),
           "--preset", "phantom"]
    waiting = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert f"{out} is in use by another preprocessing (pid {proc.pid}): waiting" in waiting.stdout.readline()
        assert not (out / "preset.json").exists()                            # nothing written while it waits
    finally:
        release(proc)
    said, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, said
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "bad_files.jsonl", "manifest.jsonl", "preset.json", "trn1.npy", "trn2.npy"]


def test_a_kill_while_a_run_clears_or_rewrites_its_folder_loses_nothing_a_rerun_relies_on(tmp_path, monkeypatch):
    """--overwrite deletes the earlier outputs one by one: stopped after any of them, an earlier model never sits
    beside a folder a fresh run (no flag) would accept. A resume that fails while cutting metrics.jsonl back to its
    step (a kill, a full disk) keeps the rows."""
    import shutil
    real_rmtree, real_unlink = shutil.rmtree, Path.unlink
    for k in range(6):
        folder = tmp_path / f"k{k}"
        for name in ("vlm", "ckpt"):
            (folder / name).mkdir(parents=True)
        for name in ("metrics.jsonl", "curves.png", "vision_encoder.safetensors", "config.json"):
            (folder / name).write_text("earlier")
        done = []

        def delete(real, path, *args, **kwargs):
            if Path(path).parent == folder and len(done) == k:
                raise KeyboardInterrupt("killed")                     # the kill, before the k-th deletion
            done.append(Path(path).name)
            return real(path, *args, **kwargs)
        monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **kw: delete(real_rmtree, p, *a, **kw))
        monkeypatch.setattr(Path, "unlink", lambda p, *a, **kw: delete(real_unlink, p, *a, **kw))
        try:
            runtime.Run(folder, resume=False, overwrite=True).close()
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
        runtime.cleanup_distributed()
        if (folder / "vlm").exists() or (folder / "vision_encoder.safetensors").exists():
            with pytest.raises(SystemExit, match="holds an earlier run"):
                runtime.Run(folder, resume=False)
    run = runtime.Run(tmp_path / "r", resume=False)
    for step in (1, 2, 3):
        run.log({"step": step})
    run.save(2, {})
    run.close()
    runtime.cleanup_distributed()
    real_write = Path.write_text

    def full_disk(path, *args, **kwargs):
        if "metrics.jsonl" in path.name:   # the file or its temporary
            raise OSError(28, "No space left on device")
        return real_write(path, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        runtime.Run(tmp_path / "r", resume=True)
    monkeypatch.undo()
    runtime.cleanup_distributed()
    assert [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_saving_the_encoder_clears_what_a_killed_save_left(tmp_path):
    import model
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (stale := tmp_path / f".vision_encoder.safetensors.tmp-{dead}").write_bytes(b"cut short")
    (live := tmp_path / f".vision_encoder.safetensors.tmp-{os.getppid()}").write_bytes(b"another process's save")
    model.save_vision_weights(model.ViT3D.from_preset("tiny"), tmp_path / "vision_encoder.safetensors")
    assert not stale.exists() and live.exists()


WRITES_LIMITED = """
import json, math, os, resource, sys
import torch
import data, runtime
os.chdir(sys.argv[1])
runtime.save_train_state("ckpt", 1, {"w": torch.zeros(10)})
data.write_json("out/results.json", {"earlier": 1})
open("out/m.jsonl", "w").write(json.dumps({"step": 1, "loss": 1.0}) + "\\n")
runtime.plot_curves("out/m.jsonl", ("loss",), "out/curves.png")
rows = [{"step": i, "loss": math.sin(i * i), "lr": math.cos(3 * i * i), "acc": math.sin(7 * i)} for i in range(300)]
open("out/m.jsonl", "w").write("".join(json.dumps(r) + "\\n" for r in rows))   # a figure of ~90 kB
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))   # bytes per file (EFBIG)
for write in (lambda: runtime.save_train_state("ckpt", 2, {"w": torch.zeros(10_000)}),
              lambda: data.write_json("out/results.json", list(range(10_000))),
              lambda: runtime.plot_curves("out/m.jsonl", ("loss", "lr", "acc"), "out/curves.png")):
    try:
        write()
    except Exception as e:
        print(json.dumps(f"{type(e).__name__}: {e}"))
"""


def test_writes_cut_short_by_a_full_disk_keep_the_earlier_files_and_leave_no_temporary(tmp_path):
    """A file-size limit (EFBIG, as a full disk gives ENOSPC) in a real process: the checkpoint save fails naming the
    step folder and the free space, the earlier checkpoint loads, a JSON file keeps its earlier content, and no
    temporary is left (write_json left its .tmp, and torch said only "unexpected pos 704 vs 598")."""
    run = subprocess.run([sys.executable, "-c", WRITES_LIMITED, str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(runtime.__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    ckpt, results, curves = map(json.loads, run.stdout.splitlines())
    assert ckpt.startswith("RuntimeError: ckpt/step_00000002 was not written ("), ckpt
    assert "nothing else was touched" in ckpt and "GB free there" in ckpt
    assert results == curves == "OSError: [Errno 27] File too large"
    assert runtime.latest_train_state(tmp_path / "ckpt")["w"].shape == (10,)
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"earlier": 1}
    assert curve_points(tmp_path / "out" / "curves.png") == {"loss": 1}                  # the earlier figure, whole
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ckpt", "curves.png", "m.jsonl", "out", "results.json",
                                                           "state.pt", "step_00000001"]


def test_an_out_folder_that_cannot_be_written_stops_the_run_naming_it_and_the_flag(tmp_path):
    """--out an existing file, or (as a user other than root, whom permissions do not stop) a read-only folder: a
    stage and preprocessing stop naming the folder and --out (a FileExistsError or PermissionError traceback before;
    evaluate.py's --out is tested in test_evaluate.py)."""
    (tmp_path / "file").write_text("")
    bad = [tmp_path / "file", tmp_path / "file" / "sub"]
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        bad.append(tmp_path / "ro" / "sft")
    for out in bad:
        with pytest.raises(SystemExit, match=rf"^{out}: cannot write there \(.+\): choose another --out$"):
            runtime.Run(out, resume=False)
        with pytest.raises(SystemExit, match=rf"^{out}: cannot write there \(.+\): choose another --out$"):
            data.preprocess_dir(tmp_path, out, "radchestct", progress=False)
