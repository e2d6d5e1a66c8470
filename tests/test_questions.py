"""Question files: one validator (data.read_questions, data.read_vqa) run before any model work, each item's own
option letters in rewards and scoring, and an empty evaluation set reported as "no items", never as accuracy 0."""
import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data
import evaluate as E
import grpo
import model
from phantom.llm import build_tiny_llm, phantom_texts

OPTIONS4 = {"A": "Emphysema", "B": "Atelectasis", "C": "Pleural effusion", "D": "Cardiomegaly"}
OPTIONS5 = {**OPTIONS4, "E": "Hiatal hernia"}


def item(name="valid_1_a_1.nii.gz", options=OPTIONS4, answer="C") -> dict:
    return {"VolumeName": name, "question": "What abnormality is present in this CT scan?", "options": options,
            "answer": answer}


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def world_with(world: dict, tmp: Path, **mmvqa) -> Path:
    """A data root sharing the phantom world's files (symlinks), with its own mmvqa/ files: mmvqa={name: items}."""
    root = tmp / "root"
    root.mkdir()
    shutil.copy(world["root"] / "phantom.json", root)
    for sub in ("dataset", "cache", "sentences", "tiny_llm", "text_encoder"):
        (root / sub).symlink_to(world["root"] / sub)
    shutil.copytree(world["root"] / "mmvqa", root / "mmvqa")
    for name, items in mmvqa.items():
        write(root / "mmvqa" / f"{name}.json", items)
    return root


# ------------------------------------------------ the validator ------------------------------------------------

def drop(key):
    return lambda q: {k: v for k, v in q.items() if k != key}


BAD_ITEMS = [  # (how item 1 is spoiled, the message after "<file> item 1: ")
    (drop("answer"), '"answer" is missing'),
    (drop("options"), '"options" is missing'),
    (drop("VolumeName"), '"VolumeName" is missing'),
    (lambda q: {**q, "options": list(OPTIONS4.values())}, '"options" must be a dict, got list'),
    (lambda q: {**q, "answer": 2}, '"answer" must be a str, got int'),
    (lambda q: {**q, "question": None}, '"question" must be a str, got NoneType'),
    (lambda q: {**q, "options": {"C": "x", "b": "y"}}, 'option letter "b" is not a single capital letter'),
    (lambda q: {**q, "options": {"C": "x", "AB": "y"}}, 'option letter "AB" is not a single capital letter'),
    (lambda q: {**q, "options": {**OPTIONS4, "B": 7}}, 'option "B" must be a str, got int'),
    (lambda q: {**q, "options": {"C": "Pleural effusion"}}, "needs at least 2 options, has 1"),
    (lambda q: {**q, "answer": "E"}, 'answer "E" is not one of its options A, B, C, D'),
    (lambda q: {**q, "answer": "c"}, 'answer "c" is not one of its options A, B, C, D'),
    (lambda q: "C", "must be an object, got str"),
]


@pytest.mark.parametrize("spoil, message", BAD_ITEMS)
def test_read_questions_names_file_item_and_field(tmp_path, spoil, message):
    path = write(tmp_path / "mmvqa" / "valid.json", [item(), spoil(item()), item()])
    with pytest.raises(ValueError) as e:
        data.read_questions(path)
    assert str(e.value) == f"{path} item 1: {message}"


def test_read_questions_accepts_good_files(tmp_path, phantom_world):
    five = [item(), item(options=OPTIONS5, answer="E"), item(options={"A": "yes", "B": "no"}, answer="B")]
    assert data.read_questions(write(tmp_path / "q.json", five)) == five
    with pytest.raises(ValueError, match=r"q2.json: must be a list of questions, got dict"):
        data.read_questions(write(tmp_path / "q2.json", {"items": five}))
    for key in ("mmvqa_train", "mmvqa_rl", "mmvqa_valid", "mmvqa_radchestct"):   # every phantom file is valid
        assert data.read_questions(phantom_world[key]) == json.loads(phantom_world[key].read_text())


def test_read_vqa_names_file_item_and_field(tmp_path, phantom_world):
    med3d = {"Image Path": "valid_1_a_1.nii.gz", "Question": "Is there an effusion?", "Answer": "Yes"}
    path = write(tmp_path / "vqa.json", [med3d, {k: v for k, v in med3d.items() if k != "Answer"}])
    with pytest.raises(ValueError, match=f'^{path} item 1: "Answer" is missing$'):
        data.read_vqa(path)
    llava = {"image": "valid_1_a_1.nii.gz", "conversations": [{"from": "human", "value": "<image> Effusion?"},
                                                               {"from": "gpt"}]}
    path = write(tmp_path / "llava.json", [llava])
    with pytest.raises(ValueError, match=f'^{path} item 0 turn 1: "value" is missing$'):
        data.read_vqa(path)
    assert data.read_vqa(phantom_world["train_vqa"])                      # the phantom VQA file still reads


@pytest.mark.parametrize("name, index, spoil, message", [
    ("valid", 3, drop("answer"), '"answer" is missing'),
    ("train_rl", 4, lambda q: {**q, "answer": "E"}, 'answer "E" is not one of its options A, B, C, D'),
])
def test_grpo_refuses_a_bad_file_before_loading_a_model(phantom_world, tmp_path, name, index, spoil, message):
    items = json.loads(phantom_world[f"mmvqa_{'rl' if name == 'train_rl' else name}"].read_text())
    items[index] = spoil(items[index])
    root = world_with(phantom_world, tmp_path, **{name: items})
    write(tmp_path / "not_a_model" / "config.json", {})                   # loading it would fail differently
    (tmp_path / "not_a_model" / "llm").mkdir()
    with pytest.raises(ValueError) as e:
        grpo.main(["--data-root", str(root), "--sft", str(tmp_path / "not_a_model"), "--out", str(tmp_path / "o")])
    assert str(e.value) == f"{root / 'mmvqa' / name}.json item {index}: {message}"


@pytest.mark.parametrize("flag", ["--mmvqa-ctrate", "--mmvqa-radchestct"])
def test_evaluate_refuses_a_bad_file_before_loading_a_model(phantom_world, tmp_path, flag):
    bad = write(tmp_path / "bad.json", [item(), item(options={"A": "x", "B": "y"}, answer="D")])
    (tmp_path / "no_model").mkdir()
    (tmp_path / "no_model" / "config.json").write_text("{}")   # passes evaluate's first look; loading it would fail
    (tmp_path / "no_model" / "llm").mkdir()
    with pytest.raises(ValueError, match=f'^{bad} item 1: answer "D" is not one of its options A, B$'):
        E.main(["--data-root", str(phantom_world["root"]), "--ckpt", str(tmp_path / "no_model"), "--tasks", "mmvqa",
                flag, str(bad), "--out", str(tmp_path / "o")])


# --------------------------------------- each item's own option letters ---------------------------------------

def test_five_option_answer_scores_in_rewards_and_evaluation():
    good_e = "<think>a hernia at the hiatus</think><answer>E</answer>"
    assert grpo.accuracy_reward(good_e, "E", OPTIONS5) == 1.0
    assert grpo.accuracy_reward("<think>x</think><answer>E) Hiatal hernia</answer>", "E", OPTIONS5) == 1.0
    assert grpo.accuracy_reward(good_e, "E", OPTIONS4) == 0.0             # E is no option of an A-D item
    assert E.resolve_answer(good_e, OPTIONS5) == ("E", "parsed")
    assert E.resolve_answer(good_e, OPTIONS4) == (None, "none")           # no embedder: unresolved, as before
    for letter in "ABCD":                                                 # A-D items: unchanged
        out = f"<think>x</think><answer>{letter}</answer>"
        assert grpo.accuracy_reward(out, letter, OPTIONS4) == grpo.accuracy_reward(out, letter, OPTIONS5) == 1.0
        assert data.parse_answer(out, options=OPTIONS4) == data.parse_answer(out) == letter


class ScriptedVLM:
    """Stands in for model.VLM in grpo.validate: each question's completion is scripted (grpo.decode is patched)."""
    device = torch.device("cpu")
    tokenizer = None

    def prompt(self, text):
        return text

    def tokenize(self, prompts):
        return torch.zeros(len(prompts), 1, dtype=torch.long), None

    def image_embeds(self, x):
        return x

    def generate(self, ids, mask, image, **kw):
        return None, None, torch.ones(len(ids), dtype=torch.bool)


def test_validate_scores_five_option_items_and_empty_is_none(tmp_path, monkeypatch):
    qs = data.read_questions(write(tmp_path / "valid.json", [item(options=OPTIONS5, answer="E"), item(answer="C"),
                                                              item(answer="A")]))
    replies = ["<think>x</think><answer>E</answer>", "<think>x</think><answer>C</answer>", "<answer>B</answer>"]
    monkeypatch.setattr(grpo, "decode", lambda tokenizer, out, lengths, finished: replies[:len(finished)])
    volumes = SimpleNamespace(batch=lambda names: torch.zeros(len(list(names))))
    assert grpo.validate(ScriptedVLM(), qs, volumes, 8) == {"val_acc": 2 / 3, "val_format": 2 / 3}
    assert grpo.validate(ScriptedVLM(), [], volumes, 8) == {"val_acc": None, "val_format": None}


def test_records_correct_iff_pred_is_answer_and_none_never_correct(tmp_path, monkeypatch):
    qs = data.read_questions(write(tmp_path / "valid.json", [item(options=OPTIONS5, answer="E")] * 3 +
                                   [item(answer="C")] * 3))
    outputs = ["<answer>E</answer>", "<think>E</think>", "", "C) Pleural effusion", "<answer>C or D</answer>", "A"]
    monkeypatch.setattr(E, "generate_all", lambda vlm, cache, jobs, *a: [(o, True) for o in outputs][:len(jobs)])
    args = type("Args", (), {"batch_size": 2, "max_new_tokens": 8})
    orthogonal = lambda texts: torch.eye(8)[:len(texts)]                  # every option equally far: picks A
    for embed, preds in ((None, ["E", None, None, "C", None, "A"]), (orthogonal, ["E", "A", None, "C", "A", "A"])):
        res = E.evaluate_mmvqa(None, None, qs, embed, args, "scripted")
        for summary in res.values():
            recs = summary["records"]
            assert [r["pred"] for r in recs] == preds
            assert all(r["correct"] == (r["pred"] == r["answer"]) for r in recs)
            assert not any(r["correct"] for r in recs if r["path"] == "none")
            assert summary["accuracy"] == sum(r["correct"] for r in recs) / len(recs)
        assert res["think"]["paths"]["none"] == (3 if embed is None else 1)


# ------------------------------------ empty sets: "no items", never 0.000 ------------------------------------

@pytest.fixture(scope="module")
def sft_ckpt(phantom_world, tmp_path_factory):
    """A small untrained VLM saved like runs/sft/vlm, LLM matrices re-drawn large so greedy outputs vary."""
    tmp = tmp_path_factory.mktemp("questions_sft")
    vlm = model.VLM.build(build_tiny_llm(phantom_texts(phantom_world), tmp / "llm", vocab_size=512, hidden=64,
                                         layers=2), "tiny")
    with torch.no_grad():
        torch.manual_seed(0)
        for name, p in vlm.llm.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                torch.nn.init.normal_(p, std=0.5)
    return vlm.save(tmp / "sft" / "vlm", meta={"stage": "sft", "args": {"arw_lambda": 1.1}})


def test_evaluate_reports_an_empty_set_as_no_items(phantom_world, sft_ckpt, tmp_path, capsys):
    empty = write(tmp_path / "empty.json", [])
    res = E.main(["--data-root", str(phantom_world["root"]), "--ckpt", str(sft_ckpt), "--tasks", "mmvqa",
                  "--mmvqa-ctrate", str(empty), "--n-mmvqa", "6", "--max-new-tokens", "12", "--batch-size", "2",
                  "--out", str(tmp_path / "o")])
    assert f"CT-RATE: no items to evaluate ({empty}: 0 questions, none with a cached volume)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    for prompt in ("think", "no_think"):
        s = saved["runs"]["sft"]["mmvqa"]["CT-RATE"][prompt]
        assert s["n"] == 0 and s["accuracy"] is None and s["note"] == "no items" and s["records"] == []
        rad = res["runs"]["sft"]["mmvqa"]["RAD-ChestCT"][prompt]                # the other set: real records
        assert rad["n"] == 6 and "note" not in rad
        assert all(r["correct"] == (r["pred"] == r["answer"]) for r in rad["records"])
        assert not any(r["correct"] for r in rad["records"] if r["path"] == "none")
    row = next(line for line in (tmp_path / "o" / "results.md").read_text().splitlines() if line.startswith("| sft"))
    assert row.split(" | ")[1:3] == ["no items", "no items"]              # CT-RATE w / w/o think


def test_evaluate_says_which_question_set_it_cannot_score(phantom_world, sft_ckpt, tmp_path, capsys):
    """A question file that is not there: named on --mmvqa-* it is an error before any model loads; at its default
    place (the mmvqa step skipped) the set is left out, said and recorded in results.json. (--preset real: the phantom
    preset would rebuild the missing file.)"""
    root = world_with(phantom_world, tmp_path)
    argv = ["--preset", "real", "--data-root", str(root), "--ckpt", str(sft_ckpt), "--tasks", "mmvqa", "--n-mmvqa", "2",
            "--max-new-tokens", "4", "--batch-size", "2", "--case-sheets", "0", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match=f"--mmvqa-radchestct {tmp_path / 'typo.json'}: no such file"):
        E.main(argv + ["--mmvqa-radchestct", str(tmp_path / "typo.json")])
    assert not (tmp_path / "o").exists()
    (root / "mmvqa" / "radchestct.json").unlink()
    res = E.main(argv)
    missing = str(root / "mmvqa" / "radchestct.json")
    assert f"RAD-ChestCT: no MMVQA accuracy: {missing} missing (data.py preprocess / mmvqa)" in capsys.readouterr().out
    assert res["runs"]["sft"]["mmvqa"].keys() == {"CT-RATE"}
    saved = json.loads((tmp_path / "o" / "results.json").read_text())["provenance"]["question_files"]
    assert saved["RAD-ChestCT"]["missing"] == [missing] and saved["CT-RATE"]["n_evaluated"] == 2


@pytest.mark.parametrize("how", ["--eval-n 0", "empty file"])
def test_grpo_without_validation_questions_logs_no_accuracy(phantom_world, sft_ckpt, tmp_path, capsys, how):
    root = world_with(phantom_world, tmp_path, **({"valid": []} if how == "empty file" else {}))
    eval_n = "0" if how == "--eval-n 0" else "4"
    out = grpo.main(["--data-root", str(root), "--sft", str(sft_ckpt), "--out", str(tmp_path / "o"), "--steps", "1",
                     "--batch-size", "2", "--max-new-tokens", "4", "--eval-every", "1", "--eval-n", eval_n,
                     "--save-every", "0"])
    n_file = 0 if how == "empty file" else len(json.loads(phantom_world["mmvqa_valid"].read_text()))
    assert (f"no validation: no question selected from {root / 'mmvqa' / 'valid.json'} ({n_file} questions, "
            f"{n_file} with a cached volume, --eval-n {eval_n})") in capsys.readouterr().out
    logged = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1] and out["step"] == 1
    assert not any("val_acc" in r for r in logged + out["history"])


def official_path(name: str) -> str:
    """'train_3_a_1.nii.gz' -> 'dataset/train/train_3/train_3_a/train_3_a_1.nii.gz', as official MCQ items name it."""
    split, patient, scan = name.split("_")[:3]
    return f"dataset/{split}/{split}_{patient}/{split}_{patient}_{scan}/{name}"


def test_rl_questions_get_their_scans_report_by_volume_key(phantom_world, tmp_path, capsys):
    """data.attach_reports: each question gets its own scan's findings + impressions, whether its VolumeName is a
    bare name or an official path; a question whose scan has no row in the reports CSV, or a row without text (both
    sections "Not given."), is left out, counted."""
    reports_csv = data.paths(phantom_world["root"])["train_reports"]
    reports = data.read_reports(reports_csv)
    qs = json.loads(phantom_world["mmvqa_rl"].read_text())[:4]
    official = [{**q, "VolumeName": official_path(q["VolumeName"])} for q in qs]
    for items in (qs, official):
        got = data.attach_reports(items, reports_csv, "RL questions")
        assert [q["VolumeName"] for q in got] == [q["VolumeName"] for q in items]
        for q, plain in zip(got, qs):
            r = reports[plain["VolumeName"]]
            assert q["report"] == " ".join(s for s in (r["findings"], r["impressions"]) if s) and q["report"]
    lines = reports_csv.read_text().splitlines(keepends=True)
    dropped = next(i for i, line in enumerate(lines) if line.startswith(qs[1]["VolumeName"]))
    short_csv = tmp_path / "reports.csv"
    header = next(csv.reader(lines[:1]))
    empty = next(i for i, line in enumerate(lines) if line.startswith(qs[2]["VolumeName"]))
    with open(short_csv, "w", newline="") as f:                     # qs[1]: no row; qs[2]: both sections "Not given."
        f.write("".join(line for i, line in enumerate(lines) if i not in (dropped, empty)))
        csv.DictWriter(f, header).writerow({**dict.fromkeys(header, "Not given."), "VolumeName": qs[2]["VolumeName"]})
    assert data.read_reports(short_csv)[qs[2]["VolumeName"]] == {"findings": None, "impressions": None}
    capsys.readouterr()
    got = data.attach_reports(official, short_csv, "RL questions")
    assert [q["VolumeName"] for q in got] == [official[i]["VolumeName"] for i in (0, 3)]
    assert capsys.readouterr().out == f"left out 2 of 4 RL questions: their scan has no report text in {short_csv}\n"


def test_grpo_trains_on_official_items_whose_volume_is_a_path(phantom_world, sft_ckpt, tmp_path, capsys):
    """Official MCQ items name their volume by path: grpo.py finds the volume and the scan's report for each (it
    stopped with a KeyError at the first step when reports were looked up by the raw VolumeName)."""
    rl = [{**q, "VolumeName": official_path(q["VolumeName"])}
          for q in json.loads(phantom_world["mmvqa_rl"].read_text())]
    root = world_with(phantom_world, tmp_path, train_rl=rl)
    out = grpo.main(["--data-root", str(root), "--sft", str(sft_ckpt), "--out", str(tmp_path / "o"), "--steps", "2",
                     "--batch-size", "2", "--max-new-tokens", "8", "--eval-every", "0", "--save-every", "0"])
    assert out["step"] == 2 and f"{len(rl)} RL questions" in capsys.readouterr().out
