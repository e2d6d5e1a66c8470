"""Tests for evaluate.py: standard metrics on fixed strings, answer parsing + fallback, the judge against a real local
HTTP server, positional bias, and (slow) sharded == single-process evaluation under torchrun."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from scipy import stats

from conftest import ChatEndpoint
import data
import evaluate as E
import grpo
import model

JAVA = shutil.which("java") is not None

# one hand-checkable pair, one identical pair, three report-like pairs (the last with what PTB splits its own way)
HYPS = ["the cat sat on the mat", "no pleural effusion.",
        "Mild emphysema in both upper lobes. A 4 mm nodule in the right lower lobe. No pleural effusion.",
        "Heart size is normal. Atelectasis in the left lower lobe.",
        "The patient's nodule (RUL) isn't larger, i.e. 3.5x2 cm."]
REFS = ["the cat is on the mat", "No pleural effusion.",
        "There is mild centrilobular emphysema. A 3.5 mm nodule is seen in the right lower lobe.",
        "Cardiomegaly. Left lower lobe atelectasis and a small pleural effusion.",
        "The patient's RUL nodule is 3.5x2 cm, i.e. stable."]
ISSUE_STRINGS = ["patient's", "isn't", "(RUL)", "i.e.", "3.5x2"]


@pytest.fixture(scope="module")
def metrics():
    return E.report_metrics(HYPS, REFS)


def test_tokenize_matches_ptb_punctuation_rules():
    assert E.tokenize("No pleural effusion; 3.5 cm, well-defined 1/2...") == \
        "no pleural effusion 3.5 cm well-defined 1/2"
    assert E.tokenize("The patient's (RUL) isn't, i.e. clear") == "the patient 's -lrb- rul -rrb- is n't i.e. clear"


@pytest.mark.skipif(not JAVA, reason="PTBTokenizer runs in Java")
def test_java_tokens_are_ptbtokenizer_own(metrics):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    texts = ISSUE_STRINGS + ["Nodule\rin the\u2028RUL.", "No effusion."]      # line breaks inside one text
    tokens, name = E.tokenize_all(texts)
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(ISSUE_STRINGS + ["No effusion."])})
    assert tokens[:5] == [ptb[i][0] for i in range(5)] == ["patient 's", "is n't", "-lrb- rul -rrb-", "i.e.", "3.5 x2"]
    assert tokens[5:] == ["nodule in the rul", ptb[5][0]]                      # the next text's tokens stay its own
    assert name.endswith("PTBTokenizer (Java)")
    assert [E.tokenize(t) for t in ISSUE_STRINGS[:4]] == tokens[:4]            # the fallback agrees on these four
    assert metrics["implementations"]["tokenizer"] == name


def test_regex_tokens_without_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))                                  # no java on PATH
    tokens, name = E.tokenize_all(ISSUE_STRINGS)
    assert tokens == [E.tokenize(t) for t in ISSUE_STRINGS] and name == "regex approximation of PTBTokenizer (no Java)"
    out = E.report_metrics(HYPS, REFS)
    assert out["implementations"]["tokenizer"] == name
    from pycocoevalcap.bleu.bleu import Bleu
    res, gts = ({i: [E.tokenize(t)] for i, t in enumerate(texts)} for texts in (HYPS, REFS))
    assert out["scores"]["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], rel=1e-12)


def test_known_scores_on_fixed_strings(metrics):
    s = metrics["per_item"]
    # "the cat sat on the mat" vs "the cat is on the mat": 5/6 unigrams and 3/5 bigrams match, equal lengths
    assert s["BLEU-1"][0] == pytest.approx(5 / 6, abs=1e-6)
    assert s["BLEU-2"][0] == pytest.approx(math.sqrt(5 / 6 * 3 / 5), abs=1e-6)
    assert s["ROUGE-L"][0] == pytest.approx(5 / 6, abs=1e-6)      # LCS 5 of 6 both ways
    assert s["ROUGE-1"][0] == pytest.approx(5 / 6, abs=1e-6)
    assert s["ROUGE-2"][0] == pytest.approx(3 / 5, abs=1e-6)
    # identical after tokenisation (case and the full stop do not count)
    assert s["BLEU-1"][1] == pytest.approx(1.0) and s["ROUGE-L"][1] == pytest.approx(1.0)
    assert s["ROUGE-1"][1] == pytest.approx(1.0) and s["ROUGE-2"][1] == pytest.approx(1.0)
    if JAVA:
        assert s["METEOR"][1] > 0.99 and s["METEOR"][0] < s["METEOR"][1]
    sc = metrics["scores"]
    assert sc["Mean"] == pytest.approx(sum(sc[k] for k in metrics["mean_over"]) / len(metrics["mean_over"]))
    assert sc["BERT-F1"] is None and "local BERT" in metrics["missing"]["BERT-F1"]
    assert sc["LLM-score"] is None and "judge" in metrics["missing"]["LLM-score"]


def test_scores_equal_pycocoevalcap_own_output(metrics):
    """Corpus scores equal pycocoevalcap's scorers fed by its own (Java) PTBTokenizer, as COCO-style code does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    if JAVA:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        ptb = PTBTokenizer()
        res = ptb.tokenize({i: [{"caption": h}] for i, h in enumerate(HYPS)})
        gts = ptb.tokenize({i: [{"caption": r}] for i, r in enumerate(REFS)})
        assert res[4] != [E.tokenize(HYPS[4])]                  # "3.5 x2": a score on regex tokens would differ
    else:
        res, gts = {i: [E.tokenize(h)] for i, h in enumerate(HYPS)}, {i: [E.tokenize(r)] for i, r in enumerate(REFS)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    sc = metrics["scores"]
    for n in range(4):
        assert sc[f"BLEU-{n + 1}"] == pytest.approx(bleu[n], rel=1e-12)
    assert sc["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert sc["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], rel=1e-12)
    if JAVA:
        meteor = E._meteor()                                     # pycocoevalcap's Meteor (one JVM per process)
        assert sc["METEOR"] == pytest.approx(meteor.compute_score(gts, res)[0], rel=1e-9)
        assert "Meteor" in metrics["implementations"]["METEOR"]


@pytest.mark.skipif(not JAVA, reason="METEOR 1.5 runs in Java")
def test_an_empty_report_scores_no_meteor_even_against_the_word_empty():
    out = E.report_metrics(["", "The lungs are clear."], ["The gallbladder is empty.", "The lungs are clear."])
    assert out["per_item"]["METEOR"][0] == 0 and out["per_item"]["METEOR"][1] > 0.9


def test_meteor_without_java_is_null_with_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))            # no java on PATH
    out = E.report_metrics(HYPS[:2], REFS[:2])
    assert out["scores"]["METEOR"] is None and "Java" in out["missing"]["METEOR"]
    assert "METEOR" not in out["mean_over"] and out["scores"]["BLEU-1"] is not None


def test_single_report_has_no_cider_and_an_empty_reference_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))            # no java on PATH
    out = E.report_metrics(HYPS[:1], REFS[:1])           # CIDEr-D's IDF over one report is 0 for every n-gram
    assert out["scores"]["CIDEr"] is None and "at least 2 reports" in out["missing"]["CIDEr"]
    assert "CIDEr" not in out["mean_over"] and "CIDEr" not in out["per_item"]
    assert out["scores"]["Mean"] == pytest.approx(sum(out["scores"][k] for k in out["mean_over"]) / 7)   # BLEU, ROUGE
    with pytest.raises(ValueError, match=r"references \[1\] have no text"):
        E.report_metrics(HYPS[:2], [REFS[0], "  "])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT with a word-level vocabulary, saved as a local HF directory."""
    from transformers import BertConfig, BertModel, BertTokenizer
    path = tmp_path_factory.mktemp("bert")
    words = "no pleural effusion mild emphysema the cat sat on mat is hiatal hernia atelectasis".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, "."]) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 6, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(path)
    return str(path)


def test_bertscore_from_local_dir_only(tiny_bert):
    f1 = E._bert_f1(["no pleural effusion.", "the cat sat on the mat"], ["no pleural effusion.", "mild emphysema"],
                    tiny_bert, None)
    assert f1[0] == pytest.approx(1.0, abs=1e-5) and f1[1] < 0.999
    # a generated report left empty (only tags or special tokens) scores 0, the others as they would alone
    assert E._bert_f1(["", "the cat sat on the mat", " \n"], ["mild emphysema"] * 3, tiny_bert, None) == [
        0.0, pytest.approx(E._bert_f1(["the cat sat on the mat"], ["mild emphysema"], tiny_bert, None)[0]), 0.0]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        E._bert_f1(["a"], ["a"], "roberta-large", None)                # a hub name is never fetched


def test_sentence_encoder_fallback(tiny_bert):
    embed = E.encoder_embedder(tiny_bert)
    assert embed(["no pleural effusion", "mild emphysema"]).shape == (2, 16)
    options = {"A": "hiatal hernia", "B": "pleural effusion", "C": "atelectasis", "D": "emphysema"}
    assert E.resolve_answer("<answer>pleural effusion</answer>", options, embed) == ("B", "similarity")


def test_paired_test_matches_scipy():
    from scipy import stats
    a = {"x": 0.1, "y": 0.5, "z": 0.3, "w": None, "only_a": 1.0}
    b = {"x": 0.2, "y": 0.9, "z": 0.35, "w": 0.4}
    out = E.paired_test(a, b)
    t, p = stats.ttest_rel([0.1, 0.5, 0.3], [0.2, 0.9, 0.35])   # ids x, y, z; "w" has a null, "only_a" no pair
    assert out["n"] == 3 and out["p"] == pytest.approx(p) and out["t"] == pytest.approx(t)
    assert E.paired_test(a, a)["p"] is None                   # identical runs: no test, not NaN


def test_paired_test_skips_a_constant_difference():
    a = {"v1": 0.5, "v2": 0.7, "v3": 0.6}
    for b in ({"v1": 0.4, "v2": 0.6, "v3": 0.5}, {k: v - 0.25 for k, v in a.items()}):   # rounded, exact shift
        out = E.paired_test(a, b)
        assert out["n"] == 3 and out["t"] is None and out["p"] is None              # not t = inf, p = 0
        assert out["mean_a"] - out["mean_b"] == pytest.approx(a["v1"] - b["v1"])


def test_mcnemar_and_compare(tmp_path):
    from scipy import stats
    t = E.mcnemar([True, True, True, False, True], [False, False, False, False, True])
    assert (t["a_only"], t["b_only"]) == (3, 0) and t["p"] == pytest.approx(stats.binomtest(3, 3).pvalue)
    assert E.mcnemar([True, False], [True, False])["p"] == 1.0    # no discordant pair: no evidence of a difference
    recs = lambda flags: {"records": [{"correct": f} for f in flags]}
    for name, flags, bleu in (("a", [True, True, False], {"v1": 0.5, "v2": 0.7}),
                              ("b", [False, True, False], {"v1": 0.1, "v2": 0.2})):
        run = {"mmvqa": {"CT-RATE": {"think": recs(flags)}}, "reports": {"per_item": {"BLEU-1": bleu}}}
        (tmp_path / f"{name}.json").write_text(json.dumps({"runs": {"sft": run}}))
    tests = E.main(["--compare", str(tmp_path / "a.json"), f"{tmp_path / 'b.json'}:sft"])
    (pair,) = tests.values()
    assert pair["reports/BLEU-1"]["n"] == 2 and pair["reports/BLEU-1"]["mean_a"] == pytest.approx(0.6)
    assert pair["mmvqa/CT-RATE/think"]["a_only"] == 1


def test_compare_specs(tmp_path):
    """RESULTS_JSON[:LABEL]: the file is the whole spec or its first ':'-prefix that is a file; labels may hold ':'."""
    recs = lambda flags: {"records": [{"VolumeName": "valid_1_a_1.nii.gz", "answer": "A", "correct": f}
                                      for f in flags]}
    run = lambda flags: {"mmvqa": {"CT-RATE": {"think": recs(flags)}}}
    (tmp_path / "x:y").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({"runs": {"grpo:lr=1e-5": run([1, 1, 0]), "sft": run([0, 0, 0])}}))
    (tmp_path / "x:y/b.json").write_text(json.dumps({"runs": {"sft": run([0, 1, 0])}}))
    a, b = str(tmp_path / "a.json"), str(tmp_path / "x:y/b.json")
    tests = E.compare([f"{a}:grpo:lr=1e-5", f"{b}:sft"])
    assert tests[f"{a}:grpo:lr=1e-5 vs {b}:sft"]["mmvqa/CT-RATE/think"]["a_only"] == 1
    assert E.compare([f"{a}:sft", b])[f"{a}:sft vs {b}"]["mmvqa/CT-RATE/think"]["b_only"] == 1
    with pytest.raises(SystemExit, match=r"a.json has no run 'nosuch' \(its runs: grpo:lr=1e-5, sft\)"):
        E.compare([f"{a}:nosuch", b])
    with pytest.raises(SystemExit, match="names the same run twice"):
        E.compare([b, b])
    with pytest.raises(SystemExit, match="no results file"):
        E.compare([str(tmp_path / "none.json:sft"), b])
    for other in ({"a": 1}, [{"VolumeName": "x"}]):   # e.g. a question file: named, not a KeyError
        (tmp_path / "q.json").write_text(json.dumps(other))
        with pytest.raises(SystemExit, match=r"q.json is not an evaluate.py results.json"):
            E.compare([str(tmp_path / "q.json"), b])


def test_an_out_that_is_a_file_and_reasoning_without_mmvqa_stop_before_any_work(phantom_world, tmp_path):
    """The positional-bias figure was written first, so --out naming a file failed with a FileExistsError traceback;
    table 4 grades task mmvqa's rationales, and alone it wrote nothing and said nothing."""
    (file := tmp_path / "file").write_text("")
    (tmp_path / "runs" / "sft" / "vlm").mkdir(parents=True)     # a run to evaluate: the figure comes after the runs
    (tmp_path / "runs" / "sft" / "vlm" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=rf"^{file}: cannot write there \(.+\): choose another --out$"):
        E.main(["--data-root", str(phantom_world["root"]), "--runs", str(tmp_path / "runs"), "--out", str(file)])
    with pytest.raises(SystemExit, match="--tasks reasoning grades the rationales of task mmvqa: add mmvqa"):
        E.main(["--data-root", str(phantom_world["root"]), "--tasks", "reports,reasoning", "--out", str(tmp_path)])


def test_mcnemar_only_pairs_the_same_questions():
    def run(names, flags):
        records = [{"VolumeName": n, "answer": "A", "correct": f, "key_option": "Emphysema", "path": "parsed",
                    "output": "<answer>A</answer>", "n_options": 4} for n, f in zip(names, flags)]
        return {"mmvqa": {"CT-RATE": {"think": E.summarize_mmvqa(records, think=True)}}}
    same, other = [f"valid_{i}_a_1.nii.gz" for i in range(6)], [f"valid_{i}_a_1.nii.gz" for i in range(10, 16)]
    runs = {"sft": run(same, [False] * 6), "grpo": run(same, [True] * 6), "grpo_nocon": run(other, [True] * 6)}
    tests = E.significance(runs, "sft")
    assert tests["grpo vs sft"]["mmvqa/CT-RATE/think"]["a_only"] == 6
    skipped = tests["grpo_nocon vs sft"]["mmvqa/CT-RATE/think"]
    assert set(skipped) == {"skipped"} and "other questions" in skipped["skipped"]     # not a bogus paired p
    md = E.markdown({"runs": runs, "reference": "sft", "significance": tests, "provenance": {"git_commit": "x"}})
    assert "| grpo_nocon | 100.00 | — | — | — |" in md


# ---------------------------------------------------------------------------------------------------------------------
# MMVQA answer resolution
# ---------------------------------------------------------------------------------------------------------------------

OPTIONS = {"A": "Hiatal hernia", "B": "Atelectasis", "C": "Pleural effusion", "D": "Emphysema"}
VOCAB = "hiatal hernia atelectasis pleural effusion emphysema lung the there is a".split()


def bag_of_words(texts):
    return torch.tensor([[float(t.lower().count(w)) for w in VOCAB] for t in texts])


@pytest.mark.parametrize("output, letter, path", [
    ("<think>fluid at the base</think><answer>C</answer>", "C", "parsed"),
    ("<think>x</think>\n<answer> (c) </answer>", "C", "parsed"),
    ("D", "D", "parsed"),                                       # lone letter without tags
    ("<think>x</think><answer>B", "B", "parsed"),              # an answer tag left open (EOS came first)
    ("B) Atelectasis", "B", "parsed"),
    ("<think>…</think><answer>Pleural effusion</answer>", "C", "similarity"),   # option text, no letter
    ("<answer>A or B</answer> there is a hiatal hernia", "A", "similarity"),   # two letters: parser refuses
    ("<answer>A</answer><answer>B</answer> emphysema", "D", "similarity"),     # two answer blocks
    ("A lung with emphysema", "D", "similarity"),                # article "A", not a letter
    ("", None, "none"),
    ("<think></think><answer></answer>", None, "none"),
])
def test_resolve_answer(output, letter, path):
    assert E.resolve_answer(output, OPTIONS, bag_of_words) == (letter, path)


def test_format_compliance_per_prompt():
    assert E.follows_format("<think>effusion at the base</think><answer>C</answer>", think=True)
    assert not E.follows_format("<answer>C</answer>", think=True)
    assert E.follows_format(" <answer>C</answer>\n", think=False)
    assert not E.follows_format("<think>x</think><answer>C</answer>", think=False)
    assert not E.follows_format("C", think=False)


def test_llm_embedder_mean_pools_input_embeddings():
    emb = torch.nn.Embedding(50, 8)

    class Tok:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1 + (ord(c) % 49) for c in text.replace(" ", "")]}

    llm = torch.nn.Module()
    llm.get_input_embeddings = lambda: emb
    vecs = E.llm_embedder(llm, Tok())(["ab", "ba", "c"])
    assert vecs.shape == (3, 8)
    assert torch.allclose(vecs[0], (emb.weight[1 + ord("a") % 49] + emb.weight[1 + ord("b") % 49]) / 2)
    assert torch.allclose(vecs[0], vecs[1])                      # order-free mean
    assert E.resolve_answer("the ccc", {"A": "ab", "B": "c"}, E.llm_embedder(llm, Tok())) == ("B", "similarity")


# ---------------------------------------------------------------------------------------------------------------------
# The judge against a real HTTP server speaking /v1/chat/completions
# ---------------------------------------------------------------------------------------------------------------------

def judge_reply(body) -> tuple[int, str]:
    """Replies by a marker in the prompt: GOOD -> valid JSON, BAD -> prose, SLOW -> sleeps past the client timeout."""
    prompt = body["messages"][-1]["content"]
    if "SLOW" in prompt:
        time.sleep(2.0)
    if "BAD" in prompt:
        return 200, "I would give this report a score of about 70."
    if "clinical_correctness" in prompt:
        return 200, ('```json\n{"clinical_correctness": 4, "clarity": 3, "differential_diagnosis": 2, '
                     '"conciseness": 5}\n```')
    return 200, '{"score": 80}'


@pytest.fixture
def server():
    s = ChatEndpoint(judge_reply)
    yield s
    s.close()


def test_judge_scores_bad_reply_timeout_and_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-secret-123")
    judge = data.Chat(server.url, "judge-model", "MY_JUDGE_KEY", tmp_path / "cache", timeout=0.5, retries=0, workers=3)
    hyps = ["GOOD report", "BAD report", "SLOW report"]
    out = E.llm_scores(judge, hyps, ["ref one", "ref two", "ref three"])
    assert out["per_item"] == [0.8, None, None] and out["mean"] == pytest.approx(0.8) and out["n_valid"] == 1
    assert any("unparseable" in e for e in out["errors"]) and any("Timeout" in e for e in out["errors"])
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions" and first["body"]["temperature"] == 0
    assert first["body"]["model"] == "judge-model" and first["auth"] == "Bearer sk-test-secret-123"
    # only the valid reply is cached; the key never reaches the disk
    cached = list((tmp_path / "cache").glob("*.json"))
    assert len(cached) == 1 and "sk-test-secret" not in cached[0].read_text()
    n = len(server.requests)
    again = E.llm_scores(judge, hyps[:1], ["ref one"])
    assert again["per_item"] == [0.8] and len(server.requests) == n   # served from the cache

    r = E.reasoning_scores(judge, ["Q? A) x B) y"], ["the effusion is on the left"], ["Left pleural effusion."])
    assert r["means"] == {"clinical_correctness": 4.0, "clarity": 3.0, "differential_diagnosis": 2.0,
                          "conciseness": 5.0} and r["n_valid"] == 1


def test_report_metrics_with_judge(server, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))            # skip METEOR's Java start-up here
    judge = data.Chat(server.url, "m", "NO_SUCH_ENV_VAR", tmp_path / "c", timeout=5, retries=0)
    out = E.report_metrics(["GOOD a", "BAD b"], ["a", "b"], judge=judge)
    assert out["per_item"]["LLM-score"] == [0.8, None] and out["scores"]["LLM-score"] == pytest.approx(0.8)
    assert "LLM-score" in out["mean_over"]


@pytest.mark.parametrize("reply, ok", [
    ('{"score": 42}', True), ('  ```json\n{"score": 0}\n```  ', True), ('{"score": 101}', False),
    ('{"score": 4.5}', False), ('{"score": true}', False), ('{"score": "42"}', False), ('Score: 42', False),
    ('{"score": 42, "why": "x"}', False), ('{"score": 42} thanks', False), ("", False), (None, False),
    ('{"score": ' + "[" * 100000 + "]" * 100000 + "}", False), ('{"score": ' + "9" * 5000 + "}", False),  # no raise
])
def test_parse_judge_reply_is_strict(reply, ok):
    assert (E.parse_judge_reply(reply, ["score"], 0, 100) is not None) == ok


# ---------------------------------------------------------------------------------------------------------------------
# Positional bias (paper figure 1)
# ---------------------------------------------------------------------------------------------------------------------

def test_positional_bias_normal_first(tmp_path):
    import csv
    rows = [["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"],
            ["valid_1_a_1.nii.gz", "", "", "Trachea is patent. Heart size is normal. No pleural effusion. "
             "A 5 mm nodule in the right upper lobe.", "Lung nodule."],
            ["valid_2_a_1.nii.gz", "", "", "Mediastinal structures are unremarkable. Emphysema in both lungs.",
             "Not given."]]
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = E.positional_bias(tmp_path / "reports.csv", tmp_path / "bias.png", bins=4)
    assert out["normal"]["n_sentences"] == 4 and out["abnormal"]["n_sentences"] == 3
    # report 1: five sentences, abnormal at 3.5/5 and 4.5/5; report 2: two sentences, abnormal at 1.5/2
    assert out["abnormal"]["mean_position"] == pytest.approx((0.7 + 0.9 + 0.75) / 3)
    assert out["normal"]["mean_position"] == pytest.approx((0.1 + 0.3 + 0.5 + 0.25) / 4)
    assert sum(d * 0.25 for d in out["normal"]["density"]) == pytest.approx(1.0)   # densities integrate to 1
    assert (tmp_path / "bias.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "labelled.jsonl", "w") as f:            # the same sentences, labelled elsewhere
        f.write(json.dumps({"VolumeName": "v1", "findings": [["a", False], ["b", False], ["c", False], ["d", True]],
                            "impressions": [["e", True]]}) + "\n")
        f.write(json.dumps({"VolumeName": "v2", "findings": [["a", False], ["b", True]], "impressions": None}) + "\n")
    assert E.positional_bias(tmp_path / "labelled.jsonl", bins=4)["abnormal"] == out["abnormal"]
    res = E.main(["--tasks", "bias", "--bias-reports", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "o")])
    assert res["positional_bias"]["abnormal"]["mean_position"] == out["abnormal"]["mean_position"]
    assert "Positional bias" in (tmp_path / "o/results.md").read_text() and res["runs"] == {}


def test_results_json_is_strict_json_and_records_the_parsed_argv(tmp_path, monkeypatch):
    import sys
    (tmp_path / "reports.csv").write_text("VolumeName,Findings_EN,Impressions_EN\n"
                                          "valid_1_a_1.nii.gz,Heart size is normal. Emphysema.,Emphysema.\n")
    bias = E.positional_bias
    monkeypatch.setattr(E, "positional_bias", lambda *a: {**bias(*a), "spread": float("inf"), "x": float("nan")})
    argv = ["--tasks", "bias", "--bias-reports", str(tmp_path / "reports.csv"), "--out", str(tmp_path / "o")]

    def strict(c):
        raise ValueError(f"non-standard JSON token {c}")
    E.main(argv)
    saved = json.loads((tmp_path / "o/results.json").read_text(), parse_constant=strict)
    assert saved["positional_bias"]["spread"] is None and saved["positional_bias"]["x"] is None
    assert saved["provenance"]["argv"] == argv                                   # what main parsed, not sys.argv
    assert saved["provenance"]["args"]["tasks"] == "bias" and saved["provenance"]["args"]["n_reports"] == 32
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *argv[:-1], str(tmp_path / "p")])
    E.main()
    assert json.loads((tmp_path / "p/results.json").read_text())["provenance"]["argv"] == sys.argv[1:]


# ---------------------------------------------------------------------------------------------------------------------
# Model-driven evaluation on the small phantom world with an untrained tiny VLM
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eval_setup(phantom_world, tmp_path_factory):
    """A tiny VLM checkpoint at <root>/runs/sft/vlm; its LLM matrices are re-drawn large so that greedy decoding of
    the untrained model emits varied tokens (letters, tags, words) instead of one repeated token."""
    import model
    from phantom.llm import build_tiny_llm, phantom_texts
    root = tmp_path_factory.mktemp("eval")
    llm_dir = build_tiny_llm(phantom_texts(phantom_world), root / "llm", vocab_size=512, hidden=64, layers=2)
    vlm = model.VLM.build(llm_dir, "tiny")
    with torch.no_grad():
        torch.manual_seed(0)
        for name, p in vlm.llm.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                torch.nn.init.normal_(p, std=0.5)
    vlm.save(root / "runs/sft/vlm", meta={"stage": "sft", "args": {"arw_lambda": 1.1}})
    return phantom_world, root


def eval_argv(world, root, out, *extra):
    return ["--runs", str(root / "runs"), "--data-root", str(world["root"]), "--n-mmvqa", "6", "--n-reports", "3",
            "--max-new-tokens", "12", "--max-report-tokens", "16", "--batch-size", "2", "--out", str(out), *extra]


def test_evaluate_end_to_end(eval_setup, server, tmp_path):
    """No-argument-style run on a checkpoint: table 1 and 2 numbers, provenance, the judge for LLM score and table 4."""
    import hashlib
    import model
    world, root = eval_setup
    res = E.main(eval_argv(world, root, tmp_path, "--tasks", "mmvqa,reports,reasoning", "--judge-base-url",
                           server.url, "--judge-model", "m"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"].keys() == {"sft"} and saved["reference"] == "sft"
    qfile = saved["provenance"]["question_files"]["CT-RATE"]
    assert qfile["sha256"] == hashlib.sha256(open(world["mmvqa_valid"], "rb").read()).hexdigest()
    assert qfile["n_evaluated"] == 6 and saved["provenance"]["versions"]["pycocoevalcap"]
    run = res["runs"]["sft"]
    assert run["ram"] is True and run["arw_lambda"] == 1.1
    vlm = model.VLM.load(root / "runs/sft/vlm")
    embed = E.llm_embedder(vlm.llm, vlm.tokenizer)
    for qset, key in (("CT-RATE", "mmvqa_valid"), ("RAD-ChestCT", "mmvqa_radchestct")):
        options = {q["VolumeName"]: q["options"] for q in json.loads(open(world[key]).read())}
        for prompt in ("think", "no_think"):
            s = run["mmvqa"][qset][prompt]
            assert s["n"] == 6 and sum(s["paths"].values()) == 6
            assert s["accuracy"] == pytest.approx(sum(r["correct"] for r in s["records"]) / 6)
            assert sum(v["n"] for v in s["per_abnormality"].values()) == 6 and 1 <= s["n_scans"] <= 6
            for r in s["records"]:                      # every answer is re-derivable from its raw output
                assert (r["pred"], r["path"]) == E.resolve_answer(r["output"], options[r["VolumeName"]], embed)
    rep = run["reports"]
    assert len(rep["per_item"]["BLEU-1"]) == 3 and "BERT-F1" in rep["missing"] and rep["scores"]["BLEU-1"] is not None
    assert rep["implementations"]["tokenizer"].endswith("PTBTokenizer (Java)" if JAVA else "(no Java)")
    assert rep["scores"]["LLM-score"] == pytest.approx(0.8)              # the test server always answers 80
    assert run["reasoning"]["n_valid"] == 6 and run["reasoning"]["means"]["clarity"] == 3.0
    md = (tmp_path / "results.md").read_text()
    assert "| Method | CT-RATE w think | CT-RATE w/o think | RAD-ChestCT w think | RAD-ChestCT w/o think" in md
    assert "| sft | ✓ | 1.1 |" in md and "| Run | Clinical | Clarity | Diff. Dx | Concis |" in md


def test_outputs_are_read_as_grpo_reads_them(eval_setup, monkeypatch):
    """A completion with a stray special token: its format is broken, as GRPO's format reward (which sees special
    tokens) has it, and never counted well-formed; the report text leaves the token and the tags out."""
    import data
    import model
    world, root = eval_setup
    vlm, cache = model.VLM.load(root / "runs/sft/vlm"), data.VolumeCache(world["valid_cache"])
    tok = vlm.tokenizer
    ids = tok("<think>x</think><|vision_start|><answer>A</answer>", add_special_tokens=False)["input_ids"]
    row = torch.tensor(ids + [tok.eos_token_id, tok.pad_token_id])
    monkeypatch.setattr(vlm, "generate", lambda input_ids, *a, **k: (row.repeat(len(input_ids), 1), torch.full(
        (len(input_ids),), len(ids) + 1), torch.ones(len(input_ids), dtype=torch.bool)))   # the EOS counted
    (text, finished), = E.generate_all(vlm, cache, [(cache.names[0], "Which?")], 1, 8, "test")
    assert text == "<think>x</think><|vision_start|><answer>A</answer>" and finished
    assert not E.follows_format(text, think=True) and E.resolve_answer(text, {"A": "a", "B": "b"}) == ("A", "parsed")
    reports = {cache.names[0]: {"findings": "x", "impressions": None}}
    args = SimpleNamespace(batch_size=1, max_report_tokens=8)
    assert E.generate_reports(vlm, cache, reports, cache.names[:1], args, "test") == [("x A", True)]


def test_run_selection(phantom_world, tmp_path, capsys):
    """Default: the quick start's runs that exist, never a stray folder; a named run that does not exist is an error."""
    runs = tmp_path / "runs"
    for name in ("sft", "grpo", "test_run"):
        (runs / name / "vlm").mkdir(parents=True)
        (runs / name / "vlm" / "config.json").write_text("{}")
    found, selection = E.find_checkpoints(E.parse_args(["--runs", str(runs)]))
    assert found == [("sft", runs / "sft/vlm"), ("grpo", runs / "grpo/vlm")]          # the quick start's order
    assert selection["not_found"] == {n: str(runs / n / "vlm") for n in ("sft_noram", "sft_noarw", "sft_lora",
                                                                           "grpo_nocon")}
    assert f"; not found: sft_noram ({runs / 'sft_noram/vlm'}), sft_noarw" in capsys.readouterr().out
    assert [r for r, _ in E.find_checkpoints(E.parse_args(["test_run,sft", "--runs", str(runs)]))[0]] == \
        ["test_run", "sft"]                                                            # named: exactly those
    argv = ["--data-root", str(phantom_world["root"]), "--runs", str(runs), "--tasks", "mmvqa", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=f"run sft_noram: {runs / 'sft_noram/vlm'}/config.json does not exist"):
        E.main(["sft", "sft_noram"] + argv[:4] + ["--out", str(tmp_path / "out")])     # every task, bias's figure too
    assert not (tmp_path / "out").exists()                                 # nothing written before the runs are found
    with pytest.raises(SystemExit, match="none of the runs sft, sft_noram, sft_noarw, sft_lora, grpo, grpo_nocon has"):
        E.main(argv[:2] + ["--runs", str(tmp_path / "empty")] + argv[4:])
    with pytest.raises(SystemExit, match=f"--data-root {tmp_path / 'nowhere'} is not a directory"):
        E.main(["--preset", "real", "--data-root", str(tmp_path / "nowhere")])          # before any traceback


def test_two_checkpoints_with_one_label_are_an_error(tmp_path):
    for d in ("runs/sft/vlm", "other/sft/vlm"):
        (tmp_path / d / "llm").mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
    args = E.parse_args(["sft", "--runs", str(tmp_path / "runs"), "--ckpt", str(tmp_path / "other/sft/vlm")])
    with pytest.raises(SystemExit, match=f"both be labelled 'sft': {tmp_path / 'runs/sft/vlm'} and "
                                         f"{tmp_path / 'other/sft/vlm'}"):
        E.find_checkpoints(args)


def test_a_misspelled_task_or_a_bad_ckpt_stops_before_any_work(tmp_path):
    """Both used to cost results: unknown tasks were ignored (an empty results.json replaced the earlier one), and a
    bad --ckpt after a good one stopped the run after the good one's work, with nothing written."""
    for d in ("good", "run/vlm"):
        (tmp_path / d / "llm").mkdir(parents=True)
        (tmp_path / d / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"--tasks: no task mmvq, report \(mmvqa, reports, reasoning, bias\)"):
        E.main(["--tasks", "mmvq,report", "--out", str(tmp_path / "out")])
    args = E.parse_args(["--ckpt", str(tmp_path / "good"), "--ckpt", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match=f"--ckpt {tmp_path / 'run'} is not a VLM checkpoint .config.json and llm/.; "
                                         f"{tmp_path / 'run' / 'vlm'} is one"):
        E.find_checkpoints(args)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_vlm_checkpoint_is_named_before_any_work(tmp_path):
    """clip3d's output or an LLM's folder (each with a config.json) as --sft, --ckpt or VLM.load's folder is named as
    no checkpoint (it passed the first look, and loading said "Repo id must be in the form ..." about <dir>/llm); a
    run's folder is named with the checkpoint inside it."""
    clip, run = tmp_path / "clip3d", tmp_path / "sft"
    clip.mkdir()
    (clip / "config.json").write_text('{"epochs": 12}')
    (run / "vlm" / "llm").mkdir(parents=True)
    (run / "vlm" / "config.json").write_text("{}")
    no = re.escape(f"{clip} is not a VLM checkpoint (config.json and llm/)")
    with pytest.raises(SystemExit, match=f"^--sft {no}: run sft.py first$"):
        grpo.main(["--sft", str(clip), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "world")])
    with pytest.raises(SystemExit, match=re.escape(f"--sft {run} is not a VLM checkpoint (config.json and llm/): "
                                                   f"{run / 'vlm'} is one")):
        grpo.main(["--sft", str(run), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path / "world")])
    with pytest.raises(SystemExit, match=f"^--ckpt {no}$"):
        E.find_checkpoints(E.parse_args(["--ckpt", str(clip)]))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{clip} is not a complete VLM checkpoint")):
        model.VLM.load(clip)
    assert not (tmp_path / "out").exists() and not (tmp_path / "world").exists()


def test_report_subset_leaves_out_reports_without_text(phantom_world, tmp_path):
    import csv
    import hashlib
    args = E.parse_args(["--data-root", str(phantom_world["root"]), "--n-reports", "0", "--tasks", "reports"])
    paths = E.eval_paths(args)
    _, _, _, names = E.load_inputs(args, {"reports"}, paths, {"question_files": {}})
    with open(paths["valid_reports"], newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:                                           # one scored volume's report: no findings, no impressions
        if r["VolumeName"] == names[0]:
            r["Findings_EN"], r["Impressions_EN"] = "", "Not given."
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writeheader()
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(rows)
    prov = {"question_files": {}}
    _, _, _, kept = E.load_inputs(args, {"reports"}, {**paths, "valid_reports": tmp_path / "reports.csv"}, prov)
    assert sorted(kept) == sorted(names[1:]) and prov["reports_without_text"] == 1
    assert prov["reports_file"] == {"path": str(tmp_path / "reports.csv"),
                                    "sha256": hashlib.sha256((tmp_path / "reports.csv").read_bytes()).hexdigest()}


def test_case_sheets(eval_setup, tmp_path, monkeypatch):
    """Default selection on a runs folder with sft, grpo and a stray run: the stray is not evaluated; one PNG per
    chosen question of each set, showing the scan's labelled findings and each run's answer."""
    import matplotlib.text
    from matplotlib.figure import Figure
    from PIL import Image
    import model
    world, root = eval_setup
    runs = tmp_path / "runs"
    (runs / "sft").mkdir(parents=True)
    (runs / "sft" / "vlm").symlink_to(root / "runs/sft/vlm")
    (runs / "test_run").mkdir()
    (runs / "test_run" / "vlm").symlink_to(root / "runs/sft/vlm")
    vlm = model.VLM.load(root / "runs/sft/vlm")
    with torch.no_grad():                                    # a second, different policy for the grpo column
        torch.manual_seed(1)
        for name, p in vlm.llm.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                torch.nn.init.normal_(p, std=0.5)
    vlm.save(runs / "grpo/vlm", meta={"stage": "grpo"})
    texts, savefig = {}, Figure.savefig

    def spy(fig, path, *a, **kw):                             # each saved figure's text, then the real savefig
        final = E.Path(path).with_name(E.Path(path).name[1:].split(".tmp-")[0])   # write_atomic's temporary
        texts[str(final)] = "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        return savefig(fig, path, *a, **kw)
    monkeypatch.setattr(Figure, "savefig", spy)
    res = E.main(eval_argv(world, tmp_path, tmp_path / "out", "--tasks", "mmvqa", "--case-sheets", "3"))
    saved = json.loads((tmp_path / "out/results.json").read_text())
    assert list(saved["runs"]) == ["sft", "grpo"] and "test_run" not in json.dumps(saved["selection"])
    assert saved["selection"]["evaluated"] == {"sft": str(runs / "sft/vlm"), "grpo": str(runs / "grpo/vlm")}
    labels = {"CT-RATE": data.read_labels(world["valid_labels"]),
              "RAD-ChestCT": data.read_radchestct_labels(world["radchestct_labels"])}
    assert [c["set"] for c in saved["case_sheets"]] == ["CT-RATE"] * 3 + ["RAD-ChestCT"] * 3
    for case in saved["case_sheets"]:
        png = E.Path(case["png"])
        assert png.parent == tmp_path / "out/cases" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 1200 and im.height >= 1000
        text, truth = texts[case["png"]], labels[case["set"]][case["VolumeName"]]
        findings = [a for a, y in zip(data.ABNORMALITIES, truth) if y == 1]     # RAD-ChestCT's NaN: unmapped
        assert f"True findings: {', '.join(findings) or 'none'}" in text and "axial" in text and "sagittal" in text
        for label, tag in (("sft", "sft (S1)"), ("grpo", "grpo (S2)")):
            rec = res["runs"][label]["mmvqa"][case["set"]]["think"]["records"][case["index"]]
            assert rec["VolumeName"] == case["VolumeName"] and tag in text
            assert f"answer: {rec['pred'] or '—'} {'✓' if rec['correct'] else '✗'}" in text
    keys = [res["runs"]["sft"]["mmvqa"]["CT-RATE"]["think"]["records"][c["index"]]["key_option"]
            for c in saved["case_sheets"][:3]]
    assert len(set(keys)) == 3                                # different correct answers when the set has them


def test_a_case_sheet_draws_dollar_signs_in_model_and_question_text_as_text(phantom_world, tmp_path, monkeypatch):
    """Qwen-family models write $\\boxed{B}$ or $\\le$, and matplotlib reads text between two $ as a formula: an
    invalid one stopped the evaluation at its case sheets, before results.json was written, and a rerun stopped
    there again. Every text drawn from a model, a question or a run's name is drawn as it is."""
    import matplotlib.text
    from matplotlib.figure import Figure
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (drawn.extend(
        t for t in fig.findobj(matplotlib.text.Text) if "$" in t.get_text()), savefig(fig, *a, **kw))[1])
    cache = data.VolumeCache(phantom_world["valid_cache"])
    q = {"VolumeName": cache.names[0], "question": "Costs $5 or $6?", "options": {"A": "$\\frac{1$", "B": "Effusion"},
         "answer": "B"}
    rec = {"output": "<think>So $\\boxed{B}$, $\\le$ 3 mm, $_$</think><answer>B</answer>", "pred": "B", "correct": True,
           "path": "parsed"}
    E.case_sheet(tmp_path / "case.png", cache, q, ["Pleural effusion"], {"run$1": (rec, rec)}, "CT-RATE")
    assert (tmp_path / "case.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(drawn) == 3 and not any(t.get_parse_math() for t in drawn)     # question, rationale, run name


def test_p_values_against_guessing_and_the_consistency_ablation_pair():
    records = [{"VolumeName": f"valid_{i}_a_1.nii.gz", "correct": i < 6, "key_option": "Emphysema", "path": "parsed",
                "output": "<answer>A</answer>", "n_options": 4} for i in range(10)]
    s = E.summarize_mmvqa(records, think=False)
    assert s["chance"] == 0.25 and s["p_above_chance"] == pytest.approx(stats.binomtest(6, 10, 0.25, "greater").pvalue)
    report = {"findings": "Pleural effusion on the left.", "impressions": None}
    questions = [{"VolumeName": r["VolumeName"], "question": "Q?"} for r in records]

    def run(thinks, judge=None):       # a run whose rationales are `thinks`, graded offline against the report
        recs = [{**r, "output": f"<think>{t}</think><answer>A</answer>"} for r, t in zip(records, thinks)]
        mmvqa = {"CT-RATE": {"think": E.summarize_mmvqa(recs, think=True)}}
        return {"mmvqa": mmvqa, "ram": True, "arw_lambda": 1.1,
                "reasoning": E.evaluate_reasoning(judge, mmvqa, questions, {r["VolumeName"]: report for r in records})}
    agree, deny = "Pleural effusion is present.", "No pleural effusion."
    runs = {"sft": run([deny] * 10), "grpo": run([agree] * 8 + [deny] * 2), "grpo_nocon": run([agree] * 2 + [deny] * 8)}
    g = runs["grpo"]["reasoning"]
    assert g["offline"]["per_item"]["0"] == grpo.offline_consistency(agree, "Pleural effusion on the left.") == 1.0
    assert g["offline"]["mean"] == pytest.approx(0.8) and g["missing"] == "no judge endpoint configured"
    tests = E.significance(runs, "sft")
    pair = tests["grpo vs grpo_nocon"]["reasoning/offline"]
    assert pair["n"] == 10 and pair["mean_a"] - pair["mean_b"] == pytest.approx(0.6)
    assert pair["p"] == pytest.approx(stats.ttest_rel([1] * 8 + [0] * 2, [1] * 2 + [0] * 8).pvalue)
    for label in ("grpo", "grpo_nocon"):
        assert "mmvqa/CT-RATE/think" in tests[f"{label} vs sft"] and "reasoning/offline" in tests[f"{label} vs sft"]
    md = E.markdown({"runs": runs, "reference": "sft", "significance": tests, "provenance": {"git_commit": "x"}})
    assert "| grpo | 0.800 | 10 |" in md and "`grpo` − `grpo_nocon`: +0.600 over 10 questions" in md

    class Judge:   # grades a rationale that agrees with the report 4 on every criterion, one that denies it 1
        model = "stub"

        def ask_all(self, prompts, parse):
            return [{k: 4 if agree in p else 1 for k in E.JUDGE_CRITERIA} for p in prompts], []
    judged = {"sft": run([deny] * 10, Judge()), "grpo": run([agree] * 8 + [deny] * 2, Judge()),
              "grpo_nocon": run([agree] * 2 + [deny] * 8, Judge())}
    tests = E.significance(judged, "sft")
    for k in E.JUDGE_CRITERIA:   # each criterion tested by question, as the offline grade, for table 4's claim
        pair = tests["grpo vs grpo_nocon"][f"reasoning/judge/{k}"]
        expected = stats.ttest_rel([4] * 8 + [1] * 2, [4] * 2 + [1] * 8).pvalue
        assert pair["n"] == 10 and pair["p"] == pytest.approx(expected)
        assert tests["grpo vs sft"][f"reasoning/judge/{k}"]["mean_a"] == pytest.approx(3.4)
    md = E.markdown({"runs": judged, "reference": "sft", "significance": tests, "provenance": {"git_commit": "x"}})
    assert "| grpo | 3.40† | 3.40† | 3.40† | 3.40† | 10/10 |" in md and "`grpo` vs `grpo_nocon`, paired t-test p" in md
    # runs that answered other questions (here: the same scans, another order) are not paired by question index
    shuffled = run([agree] * 8 + [deny] * 2)
    shuffled["mmvqa"]["CT-RATE"]["think"]["records"].reverse()
    tests = E.significance({"sft": runs["sft"], "grpo": shuffled}, "sft")["grpo vs sft"]
    for key in ("reasoning/offline", "mmvqa/CT-RATE/think"):
        assert set(tests[key]) == {"skipped"} and "answered other questions" in tests[key]["skipped"]


def test_reasoning_grades_each_record_against_its_own_question_and_the_scans_report():
    """Two questions on one scan, named by path as official MCQ items may be; the reports CSV is keyed by file name.
    A third question's scan has a report without text: there is nothing to grade its rationale against."""
    path = "dataset/valid_fixed/valid_1/valid_1_a/valid_1_a_1.nii.gz"
    questions = [{"VolumeName": path, "question": f"Q{i}: which is present?"} for i in range(2)]
    records = [{"VolumeName": path, "output": f"<think>pleural effusion, question {i}</think><answer>A</answer>"}
               for i in range(2)]
    questions.append({"VolumeName": "valid_2_a_1.nii.gz", "question": "Q2: which is present?"})
    records.append({"VolumeName": "valid_2_a_1.nii.gz", "output": "<think>nothing</think><answer>A</answer>"})
    reports = {"valid_1_a_1.nii.gz": {"findings": "Pleural effusion is seen.", "impressions": None},
               "valid_2_a_1.nii.gz": {"findings": None, "impressions": None}}
    seen = []

    class Judge:
        model = "stub"

        def ask_all(self, prompts, parse):
            seen.extend(p.split("Question:\n")[1].split("\n")[0] + " | " + p.split("reasoning:\n")[1].split("\n")[0]
                        for p in prompts)
            return [{k: 3 for k in E.JUDGE_CRITERIA} for _ in prompts], []
    out = E.evaluate_reasoning(Judge(), {"CT-RATE": {"think": {"records": records}}}, questions, reports)
    assert seen == ["Q0: which is present? | pleural effusion, question 0",
                    "Q1: which is present? | pleural effusion, question 1"]
    assert out["offline"]["per_item"] == {"0": 1.0, "1": 1.0} and out["n_valid"] == 2


def test_summary_accuracy_per_scan_and_per_abnormality():
    """Per-scan accuracy is the mean of the scans' own accuracies, reconstructions of one scan counted together, so a
    scan asked three times weighs as much as a scan asked once; per abnormality: count and accuracy of its items."""
    rec = lambda name, ok, key: {"VolumeName": name, "correct": ok, "key_option": key, "path": "parsed",
                                 "output": "<answer>A</answer>", "n_options": 4}
    records = [rec("valid_1_a_1.nii.gz", True, "Emphysema"), rec("valid_1_a_2.nii.gz", True, "Emphysema"),
               rec("valid_1_a_2.nii.gz", True, "Atelectasis"), rec("valid_2_a_1.nii.gz", False, "Atelectasis")]
    s = E.summarize_mmvqa(records, think=False)
    assert s["accuracy"] == 0.75 and s["n_scans"] == 2
    assert s["per_scan_accuracy"] == pytest.approx((1.0 + 0.0) / 2)
    assert s["per_abnormality"] == {"Atelectasis": {"n": 2, "accuracy": 0.5}, "Emphysema": {"n": 2, "accuracy": 1.0}}
    five = E.summarize_mmvqa(records[:2] + [{**r, "n_options": 5} for r in records[2:]], think=False)
    assert five["chance"] == pytest.approx((2 / 4 + 2 / 5) / 4)          # chance: the mean of 1 / options
    wrong = E.summarize_mmvqa([{**r, "correct": False} for r in records], think=False)
    assert wrong["p_above_chance"] == pytest.approx(1.0)             # one-sided: below chance is no evidence


def test_mcnemar_reports_each_runs_own_accuracy():
    t = E.mcnemar([True, True, True, False], [False, True, False, False])
    assert (t["acc_a"], t["acc_b"], t["a_only"], t["b_only"], t["n"]) == (0.75, 0.25, 2, 0, 4)


@pytest.mark.parametrize("reply, ok", [('{"score": 100}', True), ('{"score": 0}', True), ('{"score": -1}', False)])
def test_parse_judge_reply_accepts_both_ends_of_the_scale(reply, ok):
    assert (E.parse_judge_reply(reply, ["score"], 0, 100) is not None) == ok


def test_positional_bias_densities_integrate_to_one_for_each_kind(tmp_path):
    """Densities per bin, not counts: each kind's histogram integrates to 1 whatever its number of sentences."""
    with open(tmp_path / "labelled.jsonl", "w") as f:
        f.write(json.dumps({"VolumeName": "v1", "findings": [["a", False], ["b", True], ["c", True]],
                            "impressions": [["d", True]]}) + "\n")
    out = E.positional_bias(tmp_path / "labelled.jsonl", bins=4)
    assert out["abnormal"]["n_sentences"] == 3 and out["normal"]["n_sentences"] == 1
    for kind in ("normal", "abnormal"):                                   # densities are rounded to 4 places
        assert sum(d * 0.25 for d in out[kind]["density"]) == pytest.approx(1.0, abs=1e-4)


def test_scan_id_groups_reconstructions():
    assert E.scan_id("valid_12_a_2.nii.gz") == E.scan_id("/x/valid_12_a_1.nii.gz") == "valid_12_a"
    assert E.scan_id("trn24737.npz") == "trn24737"


@pytest.mark.slow
def test_sharded_equals_single_process(eval_setup, server, tmp_path):
    """2-process gloo torchrun gives exactly the single-process results (outputs, answers, scores, judge grades), and
    takes the outputs a single process kept (both ranks skip the generation)."""
    import os
    import subprocess
    import sys
    world, root = eval_setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": str(tmp_path)}  # no METEOR JVM
    runs = {"single": [sys.executable, "evaluate.py"],
            "sharded": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "evaluate.py"]}
    out = {}
    for name, cmd, folder in (*((n, c, n) for n, c in runs.items()), ("kept", runs["sharded"], "single")):
        argv = eval_argv(world, root, tmp_path / folder, "--tasks", "mmvqa,reports,reasoning", "--n-mmvqa", "5",
                         "--judge-base-url", server.url, "--judge-model", "m")
        proc = subprocess.run(cmd + argv, cwd=E.Path(E.__file__).parent, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("evaluating sft (") == 1 and proc.stdout.count("wrote ") == 1   # rank 0 prints
        assert proc.stdout.count("sft: outputs kept in") == (name == "kept")
        out[name] = json.loads((tmp_path / folder / "results.json").read_text())
    assert {k: v for k, v in out["kept"].items() if k != "provenance"} == {
        k: v for k, v in out["single"].items() if k != "provenance"}
    assert out["sharded"]["provenance"]["world_size"] == 2 and out["single"]["provenance"]["world_size"] == 1
    a, b = out["single"]["runs"]["sft"], out["sharded"]["runs"]["sft"]
    assert a["mmvqa"] == b["mmvqa"]
    assert a["reports"]["per_item"] == b["reports"]["per_item"] and a["reports"]["scores"] == b["reports"]["scores"]
    assert a["reasoning"] == b["reasoning"] and a["reasoning"]["n_valid"] == a["reasoning"]["n"] > 0
    assert b["reports"]["scores"]["LLM-score"] == pytest.approx(0.8)


def test_rank_0_judges_and_scores_after_the_last_collective(eval_setup, server, tmp_path, monkeypatch):
    """Every generation (a collective under torchrun) of every run comes before the first judge request and report
    score: the other ranks never wait on the judge, which takes hours on a full set (NCCL's timeout is 10 minutes).
    A --reference that names no evaluated run stops before any model loads."""
    world, root = eval_setup
    shutil.copytree(root / "runs" / "sft" / "vlm", tmp_path / "other" / "vlm")
    events, generate, ask, metrics = [], E.generate_all, data.Chat.ask, E.report_metrics
    monkeypatch.setattr(E, "generate_all", lambda *a, **k: events.append("generate") or generate(*a, **k))
    monkeypatch.setattr(data.Chat, "ask", lambda *a, **k: events.append("judge") or ask(*a, **k))
    monkeypatch.setattr(E, "report_metrics", lambda *a, **k: events.append("score") or metrics(*a, **k))
    argv = lambda out, *extra: eval_argv(world, root, tmp_path / out, "sft", "--ckpt", str(tmp_path / "other" / "vlm"),
                                         "--tasks", "mmvqa,reports,reasoning", "--judge-base-url", server.url,
                                         "--judge-model", "m", *extra)
    res = E.main(argv("out"))
    assert res["runs"].keys() == {"sft", "other"} and all(r["reasoning"]["n_valid"] > 0 for r in res["runs"].values())
    assert events.count("generate") == 2 * 5 and events.count("score") == 2 and "judge" in events
    assert events[:10] == ["generate"] * 10                       # 2 runs x (2 sets x 2 prompts + reports)
    events.clear()
    with pytest.raises(SystemExit, match=r"--reference grpo is not one of the runs \['sft', 'other'\]"):
        E.main(argv("out2", "--reference", "grpo"))
    assert events == [] and not (tmp_path / "out2").exists()


def test_generation_limits_follow_the_preset_and_cut_outputs_are_counted(monkeypatch):
    """The real preset generates as long as GRPO trained (512 MMVQA tokens) and 1024 report tokens; the phantom world
    keeps 128 / 320. Outputs cut at the limit (no EOS) are counted per set and prompt, and for the reports."""
    real, phantom = E.parse_args(["--preset", "real"]), E.parse_args([])
    assert (real.max_new_tokens, real.max_report_tokens) == (512, 1024)
    assert (phantom.max_new_tokens, phantom.max_report_tokens) == (128, 320)
    assert E.parse_args(["--max-new-tokens", "64"]).max_new_tokens == 64
    options = {"A": "Emphysema", "B": "Atelectasis"}
    items = [{"VolumeName": f"valid_{i}_a_1.nii.gz", "question": "Which?", "options": options, "answer": "A"}
             for i in range(4)]
    outputs = [("<think>x</think><answer>A</answer>", True), ("<think>a long rationale that", False),
               ("<answer>B</answer>", True), ("<think>also cut", False)]
    monkeypatch.setattr(E, "generate_all", lambda vlm, cache, jobs, *a: outputs[:len(jobs)])
    out = E.evaluate_mmvqa(None, None, items, None, phantom, "test")
    assert out["think"]["truncated"] == out["no_think"]["truncated"] == 2
    assert [r["truncated"] for r in out["think"]["records"]] == [False, True, False, True]
    reports = {f"valid_{i}_a_1.nii.gz": {"findings": "Emphysema in both lungs.", "impressions": None} for i in range(4)}
    scored = E.score_reports([("Emphysema.", True), ("Emphysema in", False)], reports, sorted(reports)[:2],
                             phantom, None)
    assert scored["truncated"] == 1


def test_a_checkpoint_gone_during_the_evaluation_is_skipped_and_the_others_kept(eval_setup, tmp_path, monkeypatch):
    """Another run started afresh in a run folder deletes its vlm/ while evaluate works on an earlier run: that run
    is listed as not found, and what was evaluated is still scored and written."""
    import shutil
    import model
    world, root = eval_setup
    runs = tmp_path / "runs"
    for name in ("sft", "grpo"):
        shutil.copytree(root / "runs/sft/vlm", runs / name / "vlm")
    load = model.VLM.load

    def load_after_grpo_is_gone(ckpt, *a, **k):
        shutil.rmtree(runs / "grpo" / "vlm", ignore_errors=True)
        return load(ckpt, *a, **k)
    monkeypatch.setattr(model.VLM, "load", load_after_grpo_is_gone)
    res = E.main(eval_argv(world, root, tmp_path / "eval", "--runs", str(runs), "--tasks", "mmvqa",
                           "--case-sheets", "0"))
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(res["runs"]) == list(saved["runs"]) == ["sft"] and saved["reference"] == "sft"
    assert saved["selection"]["not_found"]["grpo"] == str(runs / "grpo" / "vlm")
    assert list(saved["selection"]["evaluated"]) == ["sft"]


def test_each_runs_outputs_are_kept_and_a_rerun_generates_only_what_is_missing(eval_setup, tmp_path, monkeypatch,
                                                                               capsys):
    """An error in the second run (its checkpoint fails to load: CUDA out of memory, say) keeps the first run's outputs
    in <out>/generated/; the rerun loads only the second checkpoint and writes what a fresh evaluation writes. A
    checkpoint written again (a new mtime), a kept file that does not read (named), or another generation setting is
    generated again."""
    world, root = eval_setup
    for name in ("sft", "grpo"):
        shutil.copytree(root / "runs/sft/vlm", tmp_path / "runs" / name / "vlm")
    monkeypatch.setenv("PATH", str(tmp_path))   # no METEOR JVM: quicker, and the same for every evaluation here
    argv = lambda out, *extra: eval_argv(world, root, tmp_path / out, "--runs", str(tmp_path / "runs"), "--tasks",
                                         "mmvqa,reports", "--case-sheets", "0", *extra)
    saved = lambda out: {k: v for k, v in json.loads((tmp_path / out / "results.json").read_text()).items()
                         if k != "provenance"}
    E.main(argv("fresh"))
    loads, load, fail = [], E.model.VLM.load, ["grpo"]

    def load_or_fail(ckpt, *a, **k):
        loads.append(Path(ckpt).parent.name)
        if loads[-1] in fail:
            raise RuntimeError("CUDA out of memory")
        return load(ckpt, *a, **k)
    monkeypatch.setattr(E.model.VLM, "load", load_or_fail)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        E.main(argv("eval"))
    assert [f.name for f in (tmp_path / "eval" / "generated").iterdir()] == ["sft.json"]
    assert not (tmp_path / "eval" / "results.json").exists()
    fail.clear()
    sft_written_again = lambda: os.utime(tmp_path / "runs" / "sft" / "vlm" / "config.json")
    grpo_kept_torn = lambda: (tmp_path / "eval" / "generated" / "grpo.json").write_text('{"key": "0')
    steps = [(None, [], ["grpo"]), (None, [], []), (sft_written_again, [], ["sft"]), (grpo_kept_torn, [], ["grpo"]),
             (None, ["--max-new-tokens", "10"], ["sft", "grpo"])]   # (change, flags, checkpoints loaded)
    for change, flags, generated in steps:
        loads.clear()
        if change:
            change()
        capsys.readouterr()
        E.main(argv("eval", *flags))
        assert loads == generated
        assert ("grpo.json: not valid JSON" in capsys.readouterr().out) == (change is grpo_kept_torn)
        if not change and not flags:
            assert saved("eval") == saved("fresh")


def test_the_kept_outputs_key_sees_every_file_the_outputs_depend_on(tmp_path):
    """A file rewritten anywhere under the checkpoint (a symbolic link to a shared LLM folder included) or under the
    sentence encoder changes the key; the same files and settings give the same key."""
    (tmp_path / "shared_llm").mkdir()
    (tmp_path / "shared_llm" / "model.safetensors").write_bytes(b"a")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "ckpt" / "llm").symlink_to(tmp_path / "shared_llm")
    (tmp_path / "encoder").mkdir()
    (tmp_path / "encoder" / "model.safetensors").write_bytes(b"e")
    args = SimpleNamespace(sentence_encoder=str(tmp_path / "encoder"), batch_size=2, max_new_tokens=8,
                           max_report_tokens=8)
    key = lambda: E.output_key(tmp_path / "ckpt", {}, {}, {}, [], {"mmvqa"}, args, torch.device("cpu"))
    first = key()
    assert key() == first
    for rewritten in (tmp_path / "shared_llm" / "model.safetensors", tmp_path / "encoder" / "model.safetensors"):
        rewritten.write_bytes(b"bb")
        assert key() != first
        first = key()


def test_an_out_folder_that_cannot_be_written_stops_before_any_model_loads(eval_setup, tmp_path, monkeypatch):
    """--out an existing file (a read-only folder alike): the whole evaluation ran and its results were lost at the
    end (NotADirectoryError: .../cases). It now stops first, naming the folder and --out."""
    world, root = eval_setup
    (tmp_path / "file").write_text("")
    loads = []
    monkeypatch.setattr(E.model.VLM, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(SystemExit, match=r"file/eval: cannot write there \(Not a directory\): choose another --out"):
        E.main(eval_argv(world, root, tmp_path / "file" / "eval", "--tasks", "mmvqa"))
    assert loads == []


PTB_WRITES = """
import json, os, sys
import evaluate
from pycocoevalcap.tokenizer import ptbtokenizer
package = os.path.dirname(os.path.dirname(ptbtokenizer.__file__))
writes = []
def hook(event, args):
    if event != "open" or not isinstance(args[0], str):
        return
    flags, mode = args[2] if isinstance(args[2], int) else 0, args[1] or ""   # os.open's flags, open()'s mode
    if flags & (os.O_WRONLY | os.O_RDWR) or set(mode) & set("wax+"):
        writes.append(args[0])
sys.addaudithook(hook)
tokens, _ = evaluate.tokenize_all(json.loads(sys.argv[1]))
print(json.dumps({"tokens": tokens, "in_package": [w for w in writes if os.path.abspath(w).startswith(package)]}))
"""


@pytest.mark.skipif(not JAVA, reason="PTBTokenizer runs in Java")
def test_ptb_tokens_need_no_write_into_the_installed_package():
    """pycocoevalcap's PTBTokenizer writes its input file into its own package folder: evaluating as a user who may
    not write the (shared, system-wide) install failed with PermissionError after all generation. The same Java call
    now reads a file in a temporary folder; the tokens are PTBTokenizer's own."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    texts = HYPS + REFS + ["Ünïcode naïve café.", "", "x"]
    run = subprocess.run([sys.executable, "-c", PTB_WRITES, json.dumps(texts)], capture_output=True, text=True,
                         cwd=Path(E.__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout)
    assert out["in_package"] == []
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert out["tokens"] == [ptb[i][0] for i in range(len(texts))]
