"""The phantom package: the world and its command line (phantom/world.py, phantom/__main__.py), the tiny LLM it builds
and the warm-up that teaches it (phantom/llm.py, phantom/warmup.py), the quick start."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from conftest import group
import data
import model
import phantom
from phantom import warmup
from phantom.llm import build_tiny_llm, phantom_texts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_llm(phantom_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm") / "tiny_llm"
    return str(build_tiny_llm(phantom_texts(phantom_world), out, vocab_size=512, hidden=64, layers=2))


def test_warmup_trains_the_llm_to_read_labels_and_writes_an_llm_dir(phantom_world, tiny_llm, tmp_path):
    """The warm-up trains the whole LLM and the label code (no encoder, no bridge) and writes an HF directory that
    sft.py builds its VLM from; the code turns different label vectors into different image embeddings."""
    from safetensors.torch import load_file

    initial = {n: p.clone() for n, p in model.load_llm(tiny_llm)[0].named_parameters()}
    result = warmup.main(["--data-root", str(phantom_world["root"]), "--llm", tiny_llm, "--out",
                       str(tmp_path), "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3"])
    trained = {n.split(".", 1)[1]: p for n, p in result["net"].named_parameters() if p.requires_grad}
    assert {n.split(".")[0] for n in trained} == {"llm", "code", "pos", "norm"}
    written = dict(model.load_llm(tmp_path)[0].named_parameters())
    assert any(not torch.equal(initial[n], written[n]) for n in initial)
    code = warmup.FindingCode(result["net"].vlm.n_img, written["model.embed_tokens.weight"].shape[1])
    code.load_state_dict(load_file(tmp_path / "finding_code.safetensors"))
    y = torch.zeros(2, len(data.ABNORMALITIES))
    y[1, 3] = 1
    e = code(y)
    assert e.shape == (2, code.pos.shape[0], code.pos.shape[1]) and not torch.allclose(e[0], e[1])


def test_warmup_mmvqa_questions_ask_about_drawn_labels(phantom_world):
    labels = data.read_labels(phantom_world["train_labels"])
    examples, read = warmup.warmup_examples(phantom_world, labels, seed=0, think_per_scan=3, no_think_per_scan=1)
    drawn = [e for e in examples if e["volume"].startswith("drawn-")]
    assert len({e["volume"] for e in drawn}) > 3 * len(labels)  # new label vectors, not the training scans'
    assert all(e["volume"] in read for e in examples)
    for e in drawn:  # every drawn question's key is present in its drawn labels, the distractors are not
        target = e["segments"][0][0]
        key = target.split("<answer>")[1][0]
        options = dict(re.findall(r"([A-D])\) (.*?)(?= [A-D]\) |$)", e["user"].split("\n")[0]))
        present = {n for n, v in zip(data.ABNORMALITIES, read[e["volume"]]) if v}
        assert len(options) == 4 and options[key] in present
        assert not {v for k, v in options.items() if k != key} & present
    assert sum("<think>" in e["segments"][0][0] for e in drawn) > 2 * sum("<think>" not in e["segments"][0][0]
                                                                          for e in drawn)
    copies = [e for e in examples if e["volume"] == warmup.BLANK]
    assert len(copies) == 6 * len(labels) and not read[warmup.BLANK].any()  # copy exercises sit on a blank image
    for e in copies:  # the target is the list of the prompt, verbatim, in order
        listed = e["user"].removeprefix("Repeat this list: ")
        assert e["segments"] == [(listed, False)] and 3 <= len(re.findall(r"[A-D]\) ", listed)) <= 8
    assert len({e["user"] for e in copies}) == len(copies)  # each exercise is new


def test_warmup_refuses_the_sft_flags_it_does_not_read(tmp_path):
    """The warm-up takes sft.py's parser; a flag it would ignore (or the real preset, which would drop its defaults
    and train into runs/sft) stops it before any work, each named."""
    for argv, named in ((["--preset", "real"], "--preset"), (["--no-vqa", "--lora-rank", "8"], "--vqa, --lora-rank"),
                        (["--no-ram", "--grad-ckpt"], "--no-ram, --grad-ckpt")):
        with pytest.raises(SystemExit, match=f"does not read {named}: leave them out"):
            warmup.main([*argv, "--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "none").exists() and not (tmp_path / "out").exists()


def test_warmup_help_lists_the_flags_it_reads_and_none_it_refuses(capsys):
    """`python -m phantom warmup --help` shows sft.py's flags that the warm-up reads, with the warm-up's defaults
    (there is no --preset to choose), and none of those it refuses (it would stop on them)."""
    with pytest.raises(SystemExit) as stop:
        warmup.main(["--help"])
    shown = capsys.readouterr().out
    assert stop.value.code == 0 and shown.startswith("usage: python -m phantom warmup")
    refused = {f"--{k.replace('_', '-')}" for k in warmup.NOT_READ} | {"--no-ram", "--no-vqa", "--no-grad-ckpt"}
    assert not {f for f in re.findall(r"--[a-z-]+", shown) if f in refused}
    for flag in ("--data-root", "--llm", "--lr", "--epochs", "--arw-lambda", "--out", "--resume", "--seed"):
        assert f"  {flag} " in shown or f"  {flag}\n" in shown, flag
    flags = " ".join(shown[shown.index("options:"):].split())
    default = lambda k: re.search(rf"--{k.replace('_', '-')} \S+ (?:(?! --).)*?\(default: ([^)]*)\)", flags)[1]
    assert "phantom:" not in shown and all(default(k) == str(warmup.WARMUP[k]) for k in ("out", "lr", "vit_preset"))
    out_help = re.search(r"--out OUT (.*?) \(default", flags)[1]   # what the warm-up writes, not sft.py's vlm/
    assert out_help == warmup.HELPS["out"] and "vlm/" not in out_help
    llm_help = re.search(r"--llm LLM (.*?) --", flags)[1]         # unset: the tiny LLM, not sft.py's Qwen2.5-3B
    assert llm_help == warmup.HELPS["llm"] and "Qwen" not in llm_help and "default" not in llm_help


def test_ensure_world_builds_the_tiny_llm_once_and_it_learns_the_phantom_language(phantom_world):
    out = phantom_world["tiny_llm"]
    assert out == Path(phantom_world["root"]) / "tiny_llm"
    stamp = (out / "config.json").stat().st_mtime_ns
    again = phantom.ensure_world(phantom_world["root"])["tiny_llm"]
    assert again == out and (out / "config.json").stat().st_mtime_ns == stamp
    tok = AutoTokenizer.from_pretrained(out)
    report = next(r["findings"] for r in data.read_reports(phantom_world["valid_reports"]).values() if r["findings"])
    n_tokens = len(tok(report, add_special_tokens=False)["input_ids"])
    assert n_tokens < len(report) / 3  # whole words and phrases, not bytes
    assert tok.decode(tok(report, add_special_tokens=False)["input_ids"]) == report


def test_ensure_world_in_a_script_without_the_main_guard_fails_with_the_fix_not_a_hang(tmp_path):
    """A user's script that calls ensure_world at module level, unguarded: the volume workers import the script
    again and would wait forever for the lock the building parent holds. It must end within seconds, naming the
    guard, and leave no worker behind."""
    script = tmp_path / "build.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport phantom\n"
                      f"phantom.ensure_world({str(tmp_path / 'world')!r}, n_train=4, n_valid=2, n_rad=2)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, out[-2000:]
    assert "call it under `if __name__ == '__main__':`" in out
    assert group(proc.pid, wait=10) == []   # the workers end within seconds of their parent (init reaps them)


def test_a_phantom_json_left_empty_is_named_not_a_bare_decoder_error(tmp_path):
    """phantom.json records what a world was built with, and is now written atomically; one that an older build left
    empty (killed, or a full disk) stops the next build naming the file, before anything is generated."""
    (tmp_path / "phantom.json").write_text("")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'phantom.json'}: not valid JSON"):
        phantom.ensure_world(tmp_path, n_train=4, n_valid=2, n_rad=2)
    assert not (tmp_path / "dataset").exists()


@pytest.mark.parametrize("argv, message", [
    (["world", "--n-train", "0"], "argument --n-train: must be at least 1, not 0"),
    (["world", "--n-rad", "-2"], "argument --n-rad: must be at least 1, not -2"),
    (["dataset", "--out", "x", "--seed", "-1"], "argument --seed: must be at least 0, not -1")])
def test_the_world_commands_refuse_sizes_no_world_can_have(tmp_path, monkeypatch, capsys, argv, message):
    """--n-train 0 used to stop deep in preprocessing ("source folder .../train_fixed does not exist")."""
    from phantom.__main__ import main
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_complete_world_shared_read_only_serves_a_user_who_cannot_write_it(phantom_world, tmp_path):
    """One phantom world shared by a class, read-only: another user's stage uses it as it is and changes nothing in
    it (ensure_world opened its lock file for writing first and stopped with a PermissionError)."""
    world = tmp_path / "world"
    shutil.copytree(phantom_world["root"], world, symlinks=True)

    def files():
        return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in world.rglob("*")}
    before, as_another_user = files(), []
    if os.geteuid() == 0:   # root writes anywhere: drop the capabilities that let it, which another user lacks
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux) to drop the capability to write anywhere")
        as_another_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]
    subprocess.run(["chmod", "-R", "a-w", world], check=True)
    try:
        r = subprocess.run([*as_another_user, sys.executable, str(REPO / "clip3d.py"), "--data-root", str(world),
                            "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "1",
                            "--eval-every", "1000"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["chmod", "-R", "u+w", world], check=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "run" / "vision_encoder.safetensors").is_file()
    assert files() == before


STAGE = """import sys
from pathlib import Path
Path("calls.txt").open("a").write(" ".join(sys.argv[1:]) + "\\n")
if "--flaky" in sys.argv and not Path("failed_once").exists():
    Path("failed_once").touch()
    sys.exit(3)
if "--results" in sys.argv:
    Path("runs/eval").mkdir(parents=True, exist_ok=True)
    Path("runs/eval/results.md").write_text("| Method | CT-RATE w think |\\n")
"""


def test_quickstart_runs_every_stage_and_goes_on_after_a_failure(tmp_path, monkeypatch, capsys):
    from phantom import quickstart
    monkeypatch.chdir(tmp_path)
    Path("stage.py").write_text(STAGE)
    Path("runs/b/ckpt/step_00000002").mkdir(parents=True)
    Path("runs/b/ckpt/step_00000002/state.pt").touch()                     # b left a resumable checkpoint
    stages = [("a", ["stage.py"], "runs/a"), ("b", ["stage.py", "--flaky"], "runs/b"),
              ("evaluate", ["stage.py", "--results"], None)]
    monkeypatch.setattr(quickstart, "STAGES", stages)
    assert quickstart.main([]) == 3                                        # b failed: stop, say how to go on
    assert "run `python -m phantom quickstart` again" in capsys.readouterr().out
    record = json.loads(Path("runs/quickstart.json").read_text())
    assert record["a"]["done"] and not record["b"]["done"] and "evaluate" not in record and record["cpu"]
    assert quickstart.main([]) == 0                                        # a is skipped, b resumes
    out = capsys.readouterr().out
    assert "== a: done before" in out and "| total |" in out and out.rstrip().endswith("| Method | CT-RATE w think |")
    assert Path("calls.txt").read_text().splitlines() == [
        "--overwrite", "--flaky --resume", "--flaky --resume", "--results"]
    assert quickstart.main(["--fresh"]) == 0                               # --fresh: every stage again, afresh
    assert Path("calls.txt").read_text().splitlines()[4:] == ["--overwrite", "--flaky --overwrite", "--results"]
    long = [stages[0], ("b", ["stage.py", "--flaky", "--long"], "runs/b"), stages[2]]
    monkeypatch.setattr(quickstart, "LONG_STAGES", long)
    assert quickstart.main(["--long"]) == 0                    # --long: a changed stage and every later one run again
    assert Path("calls.txt").read_text().splitlines()[7:] == ["--flaky --long --overwrite", "--results"]
    assert quickstart.main([]) == 0                            # back to the quick recipe: b's command changed again
    assert Path("calls.txt").read_text().splitlines()[9:] == ["--flaky --overwrite", "--results"]
