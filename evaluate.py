"""Med3D-R1 evaluation: MMVQA (paper table 1), reports (table 2), reasoning (table 4), sentence-position bias (fig. 1).

Deliberate choices:
1. Standard text metrics, corpus-level as CT-CHAT and VLM3D report them: pycocoevalcap BLEU-1..4, METEOR 1.5 (Java),
   ROUGE-L, CIDEr-D on pycocoevalcap's own PTBTokenizer tokens (Java; without it a regex approximation, results.json
   says which); rouge-score ROUGE-1/2 F1 (stemmer); bert-score F1 from a local model directory, no rescaling.
   A metric that cannot run (no Java, no BERT dir, no judge) is null with its reason; "Mean" averages those that ran.
2. LLM judge (LLM score, reasoning quality): an OpenAI-compatible endpoint, fixed prompts, temperature 0, strict JSON,
   an on-disk cache of valid replies; the key stays in the environment. A failed reply is null and counted.
3. MMVQA answer = data.parse_answer, else (paper §4.3) the option whose embedding is most cosine-similar to the output
   (a local sentence encoder, else the LLM's mean input embeddings). An empty output is wrong. Each path is counted.
4. Accuracy also per abnormality and per scan (reconstructions of one scan share their labels: each scan counts once).
5. Significance against a reference run (default sft): paired t-test on per-report scores, exact McNemar on answers.
6. Greedy decoding; global batch k runs on rank k % world, so sharded results equal single-process ones. Every run
   is generated first; then rank 0 alone scores and judges, the other ranks done (none waits on a slow judge). On
   CUDA the LLM is held in bf16 and runs under bf16 autocast, as in training (runtime.compute_dtype); fp32 on the CPU.
7. results.json records the provenance of every number: argv, commit and files edited since, versions, input hashes.
8. Case sheets (PNG): a few questions per set, labelled scans with distinct answers first: the model's view of the
   scan, its true findings, the question, and every run's rationale and answers side by side, sft (S1) next to grpo.
9. Each run's outputs are kept in <out>/generated/<run>.json as soon as they are made. An evaluation with the same
   checkpoint files, inputs, settings and code takes them instead of generating again: after a crash or a kill only
   the unfinished run is generated again, and a rerun that adds a judge or a run generates nothing else.

Run:
  python evaluate.py                # 1 CPU, phantom world: runs/{sft,sft_noram,sft_noarw,sft_lora,grpo,grpo_nocon}/vlm
                                    # (those that exist) -> runs/eval/results.{json,md}, case sheets in runs/eval/cases/
  python evaluate.py sft grpo       # only these runs (runs/sft/vlm, runs/grpo/vlm)
  python evaluate.py --preset real --data-root /data/ct-rate --ckpt runs/grpo/vlm \\
      --bert-model /models/roberta-large --judge-base-url https://api.deepseek.com/v1 --judge-model deepseek-chat
                                    # 1 GPU, everything (key in $JUDGE_API_KEY)
  torchrun --standalone --nproc_per_node 8 evaluate.py --preset real --data-root /data/ct-rate ...
  python evaluate.py --tasks bias --bias-reports /data/ct-rate/dataset/radiology_text_reports/train_reports.csv
  python evaluate.py --compare runs/eval_a/results.json runs/eval_b/results.json:sft     # paired tests only
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from rouge_score import rouge_scorer
from scipy import stats
from tqdm import tqdm

import data
import model
from data import parse_answer, think_text
from grpo import answer_only_reward, decode, format_reward, offline_consistency
from runtime import autocast, cleanup_distributed, compute_dtype, get_rank, make_parser, parse_with_preset, print0
from runtime import at_least, json_safe, data_flags, local_dir, setup_distributed, versions, world_size
from runtime import write_atomic, writable_dir

TEXT_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-1", "ROUGE-2", "ROUGE-L", "CIDEr",
                "BERT-F1", "LLM-score"]
JUDGE_CRITERIA = ["clinical_correctness", "clarity", "differential_diagnosis", "conciseness"]
DEFAULT_RUNS = ["sft", "sft_noram", "sft_noarw", "sft_lora", "grpo", "grpo_nocon"]   # the quick start's runs
PAIRS = [("grpo", "grpo_nocon")]   # also tested against each other: GRPO with and without the consistency reward
QSETS = {"CT-RATE": ("valid_cache", "mmvqa_valid"), "RAD-ChestCT": ("radchestct_cache", "mmvqa_radchestct")}
PTB_PUNCTUATION = set("'' ' `` ` . ? ! , : - -- ... ; \"".split())   # brackets stay: -lrb- etc. are kept
PTB_BRACKETS = dict(zip("()[]{}", ["-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"]))

# ============================================ report metrics (table 2) ============================================
def tokenize(text: str) -> str:
    """A regex approximation of pycocoevalcap's PTBTokenizer: lower case, punctuation dropped, clitics split ("is
    n't", "patient 's"), brackets as -lrb- etc., "3.5", "1/2", "i.e." whole ("3.5x2" too, where PTB gives "3.5 x2")."""
    words = re.findall(r"(?:[a-z]\.){2,}|[a-z]+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[./-][a-z0-9]+)*"
                       r"|\.\.\.|--|\S", text.lower())
    return " ".join(PTB_BRACKETS.get(w, w) for w in words if w not in PTB_PUNCTUATION)


def tokenize_all(texts: list[str]) -> tuple[list[str], str]:
    """(tokens per text, which tokenizer ran): pycocoevalcap's own PTBTokenizer (Stanford CoreNLP in Java, one call
    for all texts) when `java` is on PATH, as COCO-style code feeds its scorers; else the regex `tokenize`."""
    if not shutil.which("java"):
        return [tokenize(t) for t in texts], "regex approximation of PTBTokenizer (no Java)"
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb
    # PTBTokenizer.tokenize's own Java call and punctuation filter, with its input file in a temporary folder: it
    # writes the file into its package folder, which a shared or system-wide install does not let a user write
    with tempfile.TemporaryDirectory() as tmp:
        # one line per text: a line break inside one (\r, U+2028 too) would shift every later text's tokens
        Path(tmp, "in.txt").write_text("\n".join(" ".join(t.split()) for t in texts), encoding="utf-8")
        cmd = ["java", "-cp", str(Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)),
               "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(Path(tmp, "in.txt"))]
        lines = subprocess.run(cmd, capture_output=True, check=True).stdout.decode().split("\n")
    assert len(lines) >= len(texts) and not any(lines[len(texts):]), f"PTBTokenizer: {len(lines)} lines, {len(texts)}"
    out = [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines[:len(texts)]]
    return out, f"pycocoevalcap {_version('pycocoevalcap')} PTBTokenizer (Java)"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def _meteor():
    return Meteor()   # one Java process per Python process: loading its paraphrase table takes seconds


def _bert_f1(hyps: list[str], refs: list[str], model_dir: str, layers: int | None) -> list[float]:
    import bert_score
    from bert_score.utils import model2layers
    from transformers import AutoConfig
    local_dir(model_dir)
    if layers is None:   # bert-score's own layer choice for a known model name, else the last layer
        layers = model2layers.get(Path(model_dir).name, AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    scorer = bert_score.BERTScorer(model_type=model_dir, num_layers=layers, batch_size=32)
    max_pos = getattr(scorer._model.config, "max_position_embeddings", 512)
    scorer._tokenizer.model_max_length = min(scorer._tokenizer.model_max_length, max_pos)  # dirs without the limit
    # an empty report scores 0 (bert-score's own value) without being passed on: under transformers 5 it fails there
    kept = [i for i, h in enumerate(hyps) if h.strip()]
    f1 = dict(zip(kept, scorer.score([hyps[i] for i in kept], [refs[i] for i in kept])[2].tolist() if kept else []))
    return [f1.get(i, 0.0) for i in range(len(hyps))]


def report_metrics(hyps: list[str], refs: list[str], bert_model: str | None = None, bert_layers: int | None = None,
                   judge: data.Chat | None = None) -> dict:
    """{"scores": {metric: corpus value | None}, "per_item": {metric: [value | None]}, "missing": {metric: reason},
    "implementations": {metric: what ran}, "mean_over": [the metrics in "Mean"]}."""
    assert len(hyps) == len(refs) and hyps, "need as many hypotheses as references (at least one)"
    empty = [i for i, r in enumerate(refs) if not r.strip()]
    if empty:
        raise ValueError(f"references {empty[:5]} have no text: nothing to score them against")
    tokens, tokenizer = tokenize_all(hyps + refs)                                 # one Java start for both
    res, gts = ({i: [t] for i, t in enumerate(part)} for part in (tokens[:len(hyps)], tokens[len(hyps):]))
    missing, coco = {}, f"pycocoevalcap {_version('pycocoevalcap')}"
    impl = {"tokenizer": tokenizer, **{f"BLEU-{n}": f"{coco} Bleu(4), corpus" for n in range(1, 5)},
            "ROUGE-L": f"{coco} Rouge", "CIDEr": f"{coco} Cider (CIDEr-D)", "METEOR": f"{coco} Meteor 1.5 (Java)",
            "ROUGE-1": f"rouge-score {_version('rouge-score')} F1, stemmer", "ROUGE-2": "rouge-score F1, stemmer"}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)        # corpus BLEU; per item: sentence BLEU
    scores = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    per_item = {f"BLEU-{n + 1}": [float(x) for x in bleu_items[n]] for n in range(4)}
    scorers = [("ROUGE-L", Rouge(), res)]
    if len(hyps) >= 2:
        scorers.append(("CIDEr", Cider(), res))
    else:   # its IDF over a single document is 0 for every n-gram, so CIDEr-D would always be 0
        missing["CIDEr"] = f"CIDEr-D needs at least 2 reports (IDF over the scored set); {len(hyps)} scored"
    if shutil.which("java"):   # an empty hypothesis would stall METEOR's stdin protocol: one token that matches nothing
        scorers.insert(0, ("METEOR", _meteor(), {i: [h[0] or "qzqzqz"] for i, h in res.items()}))
    else:
        missing["METEOR"] = "METEOR 1.5 needs Java: no `java` on PATH"
    for name, scorer, hyp in scorers:
        scores[name], items = scorer.compute_score(gts, hyp)
        per_item[name] = [float(x) for x in items]
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=True)
    pairs = [rouge.score(r, h) for h, r in zip(hyps, refs)]      # rouge-score tokenises itself; order (target, pred)
    per_item.update({f"ROUGE-{n}": [p[f"rouge{n}"].fmeasure for p in pairs] for n in (1, 2)})
    if bert_model:
        per_item["BERT-F1"] = _bert_f1(hyps, refs, bert_model, bert_layers)
        impl["BERT-F1"] = f"bert-score {_version('bert-score')} F1, {bert_model}, no baseline rescaling"
    else:
        missing["BERT-F1"] = "no local BERT model given (--bert-model DIR); nothing is downloaded"
    scores.update({k: np.mean(per_item[k]) for k in ("ROUGE-1", "ROUGE-2", "BERT-F1") if k in per_item})
    if judge is not None:
        llm = llm_scores(judge, hyps, refs)
        per_item["LLM-score"], scores["LLM-score"] = llm["per_item"], llm["mean"]
        impl["LLM-score"] = f"judge {judge.model} (0-100 / 100), {llm['n_valid']} of {len(hyps)} replies valid"
        if llm["mean"] is None:
            missing["LLM-score"] = f"no valid judge reply: {llm['errors'][:3]}"
    else:
        missing["LLM-score"] = "no judge endpoint configured (--judge-base-url, --judge-model)"
    scores = {k: None if scores.get(k) is None else float(scores[k]) for k in TEXT_METRICS}
    ran = [k for k in TEXT_METRICS if scores[k] is not None]
    scores["Mean"] = float(np.mean([scores[k] for k in ran]))
    per_item["Mean"] = [float(np.mean([per_item[k][i] for k in ran if per_item[k][i] is not None]))
                        for i in range(len(hyps))]
    return {"scores": scores, "per_item": per_item, "missing": missing, "mean_over": ran,
            "implementations": {k: v for k, v in impl.items() if k in ran + ["tokenizer"]}}


def paired_test(a: dict, b: dict) -> dict:
    """Paired t-test between two runs' per-item scores {item id: score | None}, on the ids scored in both."""
    ids = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)
    x, y = np.array([a[k] for k in ids], float), np.array([b[k] for k in ids], float)
    out = {"n": len(ids), "mean_a": float(x.mean()) if ids else None, "mean_b": float(y.mean()) if ids else None,
           "t": None, "p": None}
    d = x - y
    # a constant difference (identical scores included, up to rounding) has no spread: no test, not NaN or inf
    if len(ids) >= 2 and not np.allclose(d, d[0], rtol=1e-12, atol=1e-12):
        t, p = stats.ttest_rel(x, y)
        out.update(t=float(t), p=float(p))
    return out


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test for paired right/wrong answers (binomial test on the discordant pairs; none: p = 1)."""
    a_only, b_only = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    p = stats.binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0
    return {"n": len(a), "acc_a": float(np.mean(a)), "acc_b": float(np.mean(b)), "a_only": a_only, "b_only": b_only,
            "p": p}


# ============================ LLM judge: LLM score (table 2), reasoning quality (table 4) ============================
LLM_SCORE_PROMPT = (
    "You are a board-certified radiologist grading an automatically generated chest CT report against the reference "
    "report written by a radiologist.\n\nReference report:\n{reference}\n\nGenerated report:\n{candidate}\n\n"
    "Score how well the generated report agrees with the reference in clinical content (which findings are present "
    "or absent, their location and severity), from 0 (no agreement) to 100 (the same clinical content). "
    'Reply with only a JSON object: {{"score": <integer 0-100>}}')
REASONING_PROMPT = (
    "You are a board-certified radiologist grading a model's reasoning about a chest CT scan.\n\nQuestion:\n"
    "{question}\n\nReference radiology report of the scan:\n{report}\n\nThe model's reasoning:\n{think}\n\n"
    "Rate the reasoning on four criteria, each an integer from 0 (worst) to 5 (best): clinical_correctness "
    "(agrees with the report and medical knowledge), clarity (logical, easy to follow), differential_diagnosis "
    "(weighs the candidate findings against each other), conciseness (no padding or repetition). Reply with only a "
    'JSON object: {{"clinical_correctness": n, "clarity": n, "differential_diagnosis": n, "conciseness": n}}')


def parse_judge_reply(text: str, keys: list[str], lo: int, hi: int) -> dict | None:
    """Strict: one JSON object (optionally in a ```json fence) with exactly `keys`, each an integer in [lo, hi]."""
    m = re.fullmatch(r"\s*(?:```(?:json)?\s*)?(\{.*?\})\s*(?:```)?\s*", text or "", re.DOTALL)
    try:
        obj = json.loads(m.group(1)) if m else None
    except (ValueError, RecursionError):   # not JSON; a number or nesting too deep for the parser
        return None
    ok = isinstance(obj, dict) and set(obj) == set(keys)
    return obj if ok and all(type(obj[k]) is int and lo <= obj[k] <= hi for k in keys) else None


def llm_scores(judge: data.Chat, hyps: list[str], refs: list[str]) -> dict:
    """LLM score per report in [0, 1] (the judge's 0-100 / 100) and their mean over valid replies."""
    replies, errors = judge.ask_all([LLM_SCORE_PROMPT.format(reference=r, candidate=h) for h, r in zip(hyps, refs)],
                                    lambda text: parse_judge_reply(text, ["score"], 0, 100))
    per_item = [o["score"] / 100 if o else None for o in replies]
    valid = [s for s in per_item if s is not None]
    return {"per_item": per_item, "mean": float(np.mean(valid)) if valid else None, "n_valid": len(valid),
            "errors": errors}


def reasoning_scores(judge: data.Chat, questions: list[str], thinks: list[str], reports: list[str]) -> dict:
    """Four 0-5 criteria per reasoning text; means over valid replies."""
    replies, errors = judge.ask_all([REASONING_PROMPT.format(question=q, think=t or "(empty)", report=r)
                                     for q, t, r in zip(questions, thinks, reports)],
                                    lambda text: parse_judge_reply(text, JUDGE_CRITERIA, 0, 5))
    valid = [o for o in replies if o]
    return {"means": {k: float(np.mean([o[k] for o in valid])) if valid else None for k in JUDGE_CRITERIA},
            "per_item": replies, "n_valid": len(valid), "n": len(replies), "errors": errors}


# ============================================ positional bias (figure 1) ============================================
def positional_bias(reports: str | Path, out_png: str | Path | None = None, bins: int = 10) -> dict:
    """Position (i + 0.5) / n of sentence i of an n-sentence report (findings, then impressions), normal vs abnormal:
    densities per bin, means, a KDE plot. `reports`: a CSV (rule-labelled by data.py) or a labelled-sentences JSONL."""
    if str(reports).endswith(".jsonl"):
        labelled = [sum((r[sec] or [] for sec in ("findings", "impressions")), [])
                    for r in data.read_sentence_labels(reports).values()]
    else:
        labelled = [[(s, data.rule_label(s)) for sec in ("findings", "impressions")
                     for s in data.split_sentences(r[sec])] for r in data.read_reports(reports).values()]
    pos = {"normal": [], "abnormal": []}
    for sentences in labelled:
        for i, (_, abnormal) in enumerate(sentences):
            pos["abnormal" if abnormal else "normal"].append((i + 0.5) / len(sentences))
    edges = np.linspace(0, 1, bins + 1)
    out = {"reports": str(reports), "bin_edges": edges.round(4).tolist()}
    for kind, p in pos.items():
        hist = np.histogram(p, bins=edges, density=True)[0] if p else np.zeros(bins)
        out[kind] = {"n_sentences": len(p), "mean_position": float(np.mean(p)) if p else None,
                     "density": hist.round(4).tolist()}
    if out_png is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        grid = np.linspace(0, 1, 201)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for kind, color in (("normal", "tab:blue"), ("abnormal", "tab:red")):
            p = np.array(pos[kind])
            if len(np.unique(p)) >= 2:   # a KDE needs two distinct points
                kde = stats.gaussian_kde(p)(grid)
                ax.fill_between(grid, kde, alpha=0.35, color=color, label=f"{kind} (n={len(p)})")
        ax.set(xlabel="normalised position in report", ylabel="density", xlim=(0, 1))
        ax.legend()
        fig.tight_layout()
        write_atomic(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=150))
        plt.close(fig)
        out["png"] = str(out_png)
    return out


# ================================================ case sheets (PNG) ================================================
LABEL_FILES = {"CT-RATE": (data.read_labels, "valid_labels"), "RAD-ChestCT": (data.read_radchestct_labels,
                                                                             "radchestct_labels")}


def case_sheets(runs: dict, questions: dict, caches: dict, paths: dict, n: int, out_dir: Path) -> list[dict]:
    """Per question set, n evaluated questions whose scan has labels (first those with a new correct option on a new
    scan): one PNG each, from the records evaluate_mmvqa kept. [{set, index, VolumeName, answer, png}]."""
    sheets, order = [], sorted(runs, key=lambda k: {"sft": 0, "grpo": 1}.get(k, 2))   # S1 next to S2, then the rest
    for qset, items in questions.items():
        read, key = LABEL_FILES[qset]
        labels = {data.volume_key(k): v for k, v in read(paths[key]).items()} if Path(paths[key]).is_file() else {}
        usable, firsts, seen = [i for i, q in enumerate(items) if data.volume_key(q["VolumeName"]) in labels], [], set()
        for i in usable:                     # first a new correct option on a new scan each, then the rest in order
            new = {("key", items[i]["options"][items[i]["answer"]]), ("scan", scan_id(items[i]["VolumeName"]))}
            if not new & seen:
                firsts.append(i)
                seen |= new
        chosen = sorted((firsts + [i for i in usable if i not in firsts])[:n])
        if not chosen:
            print0(f"{qset}: no case sheets: none of its {len(items)} questions has a scan labelled in {paths[key]}")
        for i in chosen:
            q, png = items[i], out_dir / f"{qset}_{i:04d}_{data.volume_key(items[i]['VolumeName'])}.png"
            truth = labels[data.volume_key(q["VolumeName"])]                  # RAD-ChestCT: NaN = unmapped, skipped
            recs = {label: [runs[label]["mmvqa"][qset][p]["records"][i] for p in ("think", "no_think")]
                    for label in order}
            case_sheet(png, caches[qset], q, [a for a, y in zip(data.ABNORMALITIES, truth) if y == 1], recs, qset)
            sheets.append({"set": qset, "index": i, "VolumeName": q["VolumeName"], "answer": q["answer"],
                           "png": str(png)})
    return sheets


def case_sheet(png: Path, cache, q: dict, findings: list[str], recs: dict, qset: str) -> None:
    """The crop the model sees in its HU window [-1000, 1000] as axial, coronal and sagittal mid-slices, oriented as
    radiologists read them (volume axes X, Y, Z = R->L, A->P, I->S), the true findings, the question, then one column
    per run: its answers (think, no-think prompt) and its rationale."""
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vol = data.online_transform(np.asarray(cache.load(q["VolumeName"])), cache.preset)[0].numpy()
    vol = vol * data.NORM_STD + data.NORM_MEAN                                   # HU / 1000, (X, Y, Z)
    (cx, cy, cz), (sx, sy, sz) = (n // 2 for n in vol.shape), cache.preset.spacing
    views = [("axial", cz, vol[:, :, cz].T, "upper", sy / sx, "RLAP"),     # from the feet: rows A->P, columns R->L
             ("coronal", cy, vol[:, cy, :].T, "lower", sz / sx, "RLSI"),   # from the front: S up, patient's R left
             ("sagittal", cx, vol[cx, :, :].T, "lower", sz / sy, "APSI")]  # from the patient's left: A left, S up
    col_in = max(12.0, 3.8 * len(recs)) / len(recs)
    fig = plt.figure(figsize=(col_in * len(recs), 11))
    grid = fig.add_gridspec(3, 1, height_ratios=[4, 2, 5], left=0.03, right=0.98, top=0.97, bottom=0.01, hspace=0.15)
    for ax, (name, k, img, origin, aspect, (left, right, top, bottom)) in zip(grid[0].subgridspec(1, 3).subplots(),
                                                                               views):
        ax.imshow(img, cmap="gray", vmin=-1, vmax=1, origin=origin, aspect=aspect)
        ax.set_title(f"{name} (slice {k})", fontsize=10)
        ax.set_xticks([]), ax.set_yticks([])
        for x, y, t in ((0.02, 0.5, left), (0.98, 0.5, right), (0.5, 0.97, top), (0.5, 0.03, bottom)):
            ax.text(x, y, t, color="yellow", ha="center", va="center", fontsize=10, transform=ax.transAxes)
    inline = " ".join(f"{k}) {v}" for k, v in q["options"].items())         # options written into the question text
    head = [f"{qset} · {q['VolumeName']} · model input: centre crop {'×'.join(map(str, vol.shape))}, window "
            f"[-1000, 1000] HU", f"True findings: {', '.join(findings) or 'none'}", "",
            *textwrap.wrap("Q: " + q["question"].removesuffix(inline).strip(), 130),
            *(f"    {k}) {v}" + ("   ← correct" if k == q["answer"] else "") for k, v in q["options"].items())]
    ax = fig.add_subplot(grid[1])
    ax.axis("off")
    ax.text(0, 1, "\n".join(head), va="top", fontsize=10, transform=ax.transAxes, parse_math=False)   # "$" is text

    def mark(r: dict) -> str:   # the letter, right or wrong, and how it was read
        return f"{r['pred'] or '—'} {'✓' if r['correct'] else '✗'}{' (by similarity)' * (r['path'] == 'similarity')}"
    for ax, (label, (think, plain)) in zip(np.atleast_1d(grid[2].subgridspec(1, len(recs)).subplots()), recs.items()):
        ax.axis("off")
        ax.set_title(label + {"sft": " (S1)", "grpo": " (S2)"}.get(label, ""), loc="left", fontweight="bold",
                     parse_math=False)
        rationale = think_text(think["output"]) or "(no <think> block) " + think["output"]
        rationale = "".join(c if c.isprintable() or c.isspace() else "�" for c in rationale)  # control characters
        text = textwrap.fill(textwrap.shorten(rationale, int(col_in * 12) * 24, placeholder=" […]"), int(col_in * 12))
        ax.text(0, 1, f"answer: {mark(think)}\nw/o think: {mark(plain)}\n\nrationale:\n{text}", va="top", fontsize=9,
                transform=ax.transAxes, parse_math=False)     # a model's $\boxed{B}$ is no formula to typeset
    with warnings.catch_warnings():   # a character the font lacks (e.g. CJK from the LLM) is drawn as a box
        warnings.filterwarnings("ignore", "Glyph .* missing from font")
        write_atomic(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# =============================== MMVQA answers: the parser, then cosine similarity ===============================
def resolve_answer(output: str, options: dict, embed=None) -> tuple[str | None, str]:
    """(letter | None, path): "parsed" (data.parse_answer: the <answer> block, else a lone option letter, which is
    also what an answer tag left unclosed holds), "similarity" (the option text most cosine-similar to the output,
    tags removed; paper §4.3) or "none" (empty output, or no embedder)."""
    letter = parse_answer(output, options=options)
    if letter is None and "answer>" in output:   # e.g. "<answer>B", ended before its tag closed: read without tags
        letter = parse_answer(output.replace("<answer>", " ").replace("</answer>", " "), options=options)
    if letter in options:
        return letter, "parsed"
    text = data.TAG.sub(" ", output).strip()
    if not text or embed is None:
        return None, "none"
    keys = sorted(options)
    vecs = embed([text] + [options[k] for k in keys])                            # (1 + n_options, D)
    sims = torch.nn.functional.cosine_similarity(vecs[:1], vecs[1:], dim=-1)      # (n_options,)
    return keys[int(sims.argmax())], "similarity"


def llm_embedder(llm, tokenizer):
    """Mean of the LLM's input-embedding rows over each text's tokens (no forward pass)."""
    table = llm.get_input_embeddings().weight

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id] for t in texts]
        return torch.stack([table[torch.tensor(i, device=table.device)].float().mean(0) for i in ids])
    return embed


def encoder_embedder(model_dir: str, device: str = "cpu"):
    """Mean-pooled last hidden states of a local sentence-encoder directory (e.g. a sentence-transformers model)."""
    from transformers import AutoModel, AutoTokenizer
    local_dir(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
        hidden = enc(**batch).last_hidden_state                                  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return embed


def follows_format(output: str, think: bool) -> bool:
    """The prompt's format: <think>…</think><answer>…</answer>, or one answer block alone (no-think prompt)."""
    return (format_reward(output) if think else answer_only_reward(output)) == 1.0


def scan_id(name: str) -> str:
    """'valid_12_a_2.nii.gz' -> 'valid_12_a' (reconstructions of one scan); other names ('trn123.npz') -> stem."""
    key = data.volume_key(name)
    return "_".join(key.split("_")[:3]) if re.fullmatch(r"(train|valid)_\d+_[a-z]+_\d+", key) else key


def summarize_mmvqa(records: list[dict], think: bool) -> dict:
    """Accuracy and its one-sided binomial p-value against guessing (chance = mean of 1 / options), answer paths,
    format compliance, accuracy per abnormality and per scan (the mean of scan means)."""
    by_abn, by_scan = {}, {}
    for r in records:
        by_abn.setdefault(r["key_option"], []).append(r["correct"])
        by_scan.setdefault(scan_id(r["VolumeName"]), []).append(r["correct"])
    right, chance = sum(r["correct"] for r in records), float(np.mean([1 / r["n_options"] for r in records] or [0]))
    return {"n": len(records), "accuracy": right / len(records) if records else None, "chance": chance,
            "p_above_chance": stats.binomtest(right, len(records), chance, "greater").pvalue if records else None,
            "paths": {p: sum(r["path"] == p for r in records) for p in ("parsed", "similarity", "none")},
            "truncated": sum(r.get("truncated", False) for r in records),      # cut at --max-new-tokens
            "format_ok": float(np.mean([follows_format(r["output"], think) for r in records])) if records else None,
            "per_scan_accuracy": float(np.mean([np.mean(v) for v in by_scan.values()])) if by_scan else None,
            "n_scans": len(by_scan),
            "per_abnormality": {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_abn.items())},
            "records": records, **({} if records else {"note": "no items"})}


# ================================ model-driven evaluation: greedy, batched, sharded ================================
def generate_all(vlm, cache, jobs: list[tuple[str, str]], batch_size: int, max_new_tokens: int,
                 desc: str) -> list[tuple[str, bool]]:
    """Greedy (completion, ended with EOS) for (VolumeName, user text) jobs, in job order, on every rank; completions
    read as GRPO's rewards read them (grpo.decode: special tokens kept). Global batch k runs on rank k % world, so
    each batch (and its padding) is the same with or without torchrun."""
    rank, world = get_rank(), world_size()
    batches = [list(range(i, min(i + batch_size, len(jobs)))) for i in range(0, len(jobs), batch_size)]
    mine = {}
    for k in tqdm(range(rank, len(batches), world), desc=desc, disable=rank != 0, leave=False):
        idx = batches[k]
        volumes = cache.batch(jobs[i][0] for i in idx)
        input_ids, attention_mask = vlm.tokenize([vlm.prompt(jobs[i][1]) for i in idx])
        with torch.no_grad(), autocast(vlm.device):
            image_embeds = vlm.image_embeds(volumes.to(vlm.device))                      # (B, N_img, D)
            completion, lengths, finished = vlm.generate(input_ids, attention_mask, image_embeds,
                                                         max_new_tokens=max_new_tokens, temperature=0.0)
        texts = decode(vlm.tokenizer, completion, lengths, finished)
        mine.update({i: (texts[row], bool(finished[row])) for row, i in enumerate(idx)})
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {i: text for part in parts for i, text in part.items()}
    return [mine[i] for i in range(len(jobs))]


def evaluate_mmvqa(vlm, cache, items: list[dict], embed, args, desc: str) -> dict:
    """Table 1: accuracy with the think and the no-think prompt on one question set."""
    out = {}
    for think in (True, False):
        outputs = generate_all(vlm, cache, [(q["VolumeName"], data.mmvqa_prompt(q, think=think)) for q in items],
                               args.batch_size, args.max_new_tokens, f"{desc} {'think' if think else 'no-think'}")
        records = []
        for q, (text, finished) in zip(items, outputs):
            letter, path = resolve_answer(text, q["options"], embed)
            records.append({"VolumeName": q["VolumeName"], "answer": q["answer"], "pred": letter, "path": path,
                            "correct": letter == q["answer"], "key_option": q["options"][q["answer"]], "output": text,
                            "n_options": len(q["options"]), "truncated": not finished})
        out["think" if think else "no_think"] = summarize_mmvqa(records, think)
    return out


def generate_reports(vlm, cache, reports: dict, names: list[str], args, desc: str) -> list[tuple[str, bool]]:
    """Table 2's generated reports, tags and special tokens removed, and whether each ended with EOS, in `names`
    order (every rank)."""
    outputs = generate_all(vlm, cache, [(n, data.report_instruction(reports[n])) for n in names], args.batch_size,
                           args.max_report_tokens, desc)
    special = re.compile("|".join(map(re.escape, vlm.tokenizer.all_special_tokens)))
    return [(" ".join(special.sub(" ", data.TAG.sub(" ", t)).split()), finished) for t, finished in outputs]


def score_reports(generated: list[tuple[str, bool]], reports: dict, names: list[str], args, judge) -> dict:
    """Table 2: the generated reports against the reference findings + impressions."""
    hyps = [h for h, _ in generated]
    refs = [data.report_text(reports[n]) for n in names]
    out = report_metrics(hyps, refs, args.bert_model, args.bert_layers, judge)
    out["truncated"] = sum(not finished for _, finished in generated)   # cut at --max-report-tokens
    out["per_item"] = {m: dict(zip(names, v)) for m, v in out["per_item"].items()}
    out["samples"] = [{"VolumeName": n, "generated": h, "reference": r} for n, h, r in zip(names, hyps, refs)][:5]
    return out


def evaluate_reasoning(judge, mmvqa: dict, questions: list[dict], reports: dict) -> dict:
    """Table 4: the think outputs of CT-RATE questions whose scan has a report text, graded against it offline
    (grpo.offline_consistency, 0-1) and, when an endpoint is configured, by the judge; per question index. Record i
    answers questions[i]; scans match reports by data.volume_key (an MCQ item's VolumeName may be a path)."""
    by_key = {data.volume_key(k): v for k, v in reports.items()}
    recs = [(i, r) for i, r in enumerate(mmvqa.get("CT-RATE", {}).get("think", {}).get("records", []))
            if any(by_key.get(data.volume_key(r["VolumeName"]), {}).values())]   # a report with text
    if not recs:
        return {"means": None, "missing": "needs think outputs (task mmvqa) of CT-RATE questions with reports"}
    thinks = [think_text(r["output"]) for _, r in recs]
    texts = [data.report_text(by_key[data.volume_key(r["VolumeName"])]) for _, r in recs]
    offline = {str(i): offline_consistency(t, text) for (i, _), t, text in zip(recs, thinks, texts)}
    out = {"offline": {"scorer": "grpo.offline_consistency", "mean": float(np.mean(list(offline.values()))),
                       "per_item": offline}, "means": None, "missing": "no judge endpoint configured"}
    if judge is not None:
        asked = [questions[i] for i, _ in recs]
        assert all(q["VolumeName"] == r["VolumeName"] for q, (_, r) in zip(asked, recs)), "records != questions"
        judged = reasoning_scores(judge, [q["question"] for q in asked], thinks, texts)
        judged["per_item"] = {str(i): grades for (i, _), grades in zip(recs, judged["per_item"])}
        out = {**out, **judged}
        out.pop("missing")
    return out


def output_key(ckpt, caches: dict, questions: dict, reports: dict, report_names: list, tasks: set, args, device) -> str:
    """What a run's generated outputs depend on: the files of its checkpoint, of the sentence encoder and of the volume
    caches' indexes (by size and mtime), the questions and report prompts, the generation settings, this code, the
    libraries that generate and the device."""
    dirs = [ckpt, *([args.sentence_encoder] if args.sentence_encoder else [])]    # symbolic links followed
    files = [*(Path(d, f) for top in dirs for d, _, fs in os.walk(top, followlinks=True) for f in fs),
             *(c.dir / n for c in caches.values() for n in ("preset.json", "manifest.jsonl"))]
    code = [sha256(Path(__file__).with_name(f"{m}.py")) for m in ("evaluate", "model", "data", "grpo", "runtime")]
    return hashlib.sha256(json.dumps([
        [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(files) if f.is_file()],
        questions if "mmvqa" in tasks else None, code, args.batch_size,
        [(n, data.report_instruction(reports[n])) for n in report_names] if "reports" in tasks else None,
        args.max_new_tokens, args.max_report_tokens, torch.__version__,
        [_version(p) for p in ("transformers", "tokenizers", "flash-attn")], device.type,
        torch.cuda.get_device_name(device) if device.type == "cuda" else None],
        default=str).encode()).hexdigest()


def kept_outputs(path: Path, key: str) -> dict | None:
    """The outputs an earlier evaluation kept at `path` under the same key, else None (a file that does not read is
    said and replaced). Rank 0 reads it and tells the other ranks, which then skip the run's generation too ({})."""
    kept = None
    if get_rank() == 0 and path.is_file():
        try:
            kept = data.read_json(path)
        except ValueError as e:
            print0(f"{e}: generating again")
    kept = kept if isinstance(kept, dict) and kept.get("key") == key else None
    if world_size() > 1:
        found = [kept is not None]
        dist.broadcast_object_list(found)
        kept = kept if get_rank() == 0 else {} if found[0] else None
    return kept


# ====================================== significance, provenance, tables ======================================
def unpaired(a: dict, b: dict) -> dict | None:
    """{"skipped": reason} when two MMVQA summaries did not answer the same questions in the same order (pairing by
    position would compare different questions), else None."""
    asked = [[(r.get("VolumeName"), r.get("answer")) for r in s["records"]] for s in (a, b)]
    if asked[0] != asked[1]:
        return {"skipped": f"no paired test: the runs answered other questions ({len(asked[0])} vs {len(asked[1])} "
                           "items, their (VolumeName, answer) lists differ)"}
    return None


def significance(runs: dict, reference: str) -> dict:
    """Every run against the reference, and the PAIRS against each other: paired t-tests on per-report scores and
    rationale grades, exact McNemar on per-question correctness (only when both runs answered the same questions, in
    the same order: {"skipped": reason} otherwise)."""
    out, ref = {}, runs[reference]
    for a, b in PAIRS:
        if a in runs and b in runs and reference not in (a, b):
            out.update(significance({a: runs[a], b: runs[b]}, b))
    ref_items = ref.get("reports", {}).get("per_item", {})
    for label, run in runs.items():
        if label == reference:
            continue
        tests = {f"reports/{m}": paired_test(items, ref_items[m])
                 for m, items in run.get("reports", {}).get("per_item", {}).items() if m in ref_items}
        reasoning = [x.get("reasoning", {}) for x in (run, ref)]
        if all("offline" in r for r in reasoning):                  # per_item keyed by question index
            think = [x.get("mmvqa", {}).get("CT-RATE", {}).get("think", {"records": []}) for x in (run, ref)]
            grades = {"offline": [r["offline"]["per_item"] for r in reasoning]}
            if all(r.get("means") for r in reasoning):              # both judged: each criterion as well
                grades.update({f"judge/{k}": [{i: g and g[k] for i, g in r["per_item"].items()} for r in reasoning]
                               for k in JUDGE_CRITERIA})
            tests.update({f"reasoning/{name}": unpaired(*think) or paired_test(*pair) for name, pair in grades.items()})
        for qset, prompts in run.get("mmvqa", {}).items():
            for prompt, summary in prompts.items():
                other = ref.get("mmvqa", {}).get(qset, {}).get(prompt)
                if other and summary["records"]:
                    tests[f"mmvqa/{qset}/{prompt}"] = unpaired(summary, other) or mcnemar(
                        [r["correct"] for r in summary["records"]], [r["correct"] for r in other["records"]])
        out[f"{label} vs {reference}"] = tests
    return out


def compare(specs: list[str]) -> dict:
    """--compare A.json[:label] B.json[:label]: paired tests of run A against run B (a file's first run by default).
    The file is the whole spec if that is a file, else its shortest ':'-prefix that is (labels may hold ':')."""
    if specs[0] == specs[1]:
        raise SystemExit(f"--compare names the same run twice ({specs[0]}): nothing to compare")
    runs = {}
    for spec in specs:
        cuts = [len(spec)] + [i for i, c in enumerate(spec) if c == ":"]
        path = next((spec[:i] for i in cuts if Path(spec[:i]).is_file()), None)
        if path is None:
            raise SystemExit(f"--compare {spec}: no results file (RESULTS_JSON[:LABEL])")
        loaded = data.read_json(path)
        if not (isinstance(loaded, dict) and isinstance(loaded.get("runs"), dict)):
            raise SystemExit(f"--compare {spec}: {path} is not an evaluate.py results.json (no \"runs\")")
        loaded = loaded["runs"]
        label = spec[len(path) + 1:] or next(iter(loaded), None)
        if label not in loaded:
            raise SystemExit(f"--compare {spec}: {path} has no run {label!r} "
                             f"(its runs: {', '.join(loaded) or 'none'})")
        runs[spec] = loaded[label]
    tests = significance(runs, specs[1])
    print0(json.dumps(tests, indent=1))
    return tests


def sha256(path) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def provenance(args, argv: list[str]) -> dict:
    """`argv`: the arguments main parsed into `args`; both are recorded."""
    code = versions()   # the commit of this code, wherever evaluate.py is run from
    pkgs = ["torch", "transformers", "pycocoevalcap", "rouge-score", "bert-score", "scipy", "openai", "numpy"]
    return {"argv": list(argv), "args": dict(vars(args)),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": code["git_commit"],
            "git_changed": code["git_changed"], "python": code["python"], "versions": {p: _version(p) for p in pkgs},
            "world_size": world_size(), "java": shutil.which("java") is not None, "data_root": args.data_root,
            "preset": args.preset, "question_files": {},
            "judge_prompts_sha256": hashlib.sha256((LLM_SCORE_PROMPT + REASONING_PROMPT).encode()).hexdigest(),
            "decoding": "greedy", "max_new_tokens": args.max_new_tokens, "max_report_tokens": args.max_report_tokens,
            "answer_fallback_embedding": args.sentence_encoder or "the evaluated LLM's input embeddings"}


def markdown(results: dict) -> str:
    runs, ref = results["runs"], results.get("reference")
    tests = {label: results["significance"].get(f"{label} vs {ref}", {}) for label in runs}
    pval = lambda p: "—" if p is None else f"{p:.2g}"
    row = lambda *cells: "| " + " | ".join(map(str, cells)) + " |"

    def cell(x: float | None, test: dict | None, scale: float = 100) -> str:   # * for p < 0.05, † for p < 0.005
        p = (test or {}).get("p")
        mark = "" if p is None else "†" if p < 0.005 else "*" if p < 0.05 else ""
        return ("—" if x is None else f"{scale * x:.2f}") + mark

    def table(title: str | None, note: str | None, columns: list[str]) -> list[str]:   # blank lines between blocks
        blocks = [f"## {title}"] * bool(title) + [note] * bool(note) + [row(*columns)]
        return [line for block in blocks for line in ("", block)] + ["|---" * len(columns) + "|"]

    changed = ", ".join(results["provenance"].get("git_changed") or [])
    lines = ["# Med3D-R1 evaluation", "", f"Provenance: `results.json` (commit {results['provenance']['git_commit']}"
             + (f", with uncommitted changes to {changed}" if changed else "") + ")."]
    if any("mmvqa" in run for run in runs.values()):
        columns = ["Method"] + [f"{q} {w} think" for q in QSETS for w in ("w", "w/o")]
        accuracy = table("MMVQA accuracy (%), paper table 1", f"\\* p < 0.05, † p < 0.005 vs. `{ref}` (exact "
                         "McNemar).", columns + ["answers parsed / similarity / none"])
        pvalues = table(None, f"p-values: one-sided binomial against guessing · exact McNemar against `{ref}`.",
                        columns)
        for label, run in runs.items():
            if "mmvqa" in run:
                summaries = {f"{q}/{p}": run["mmvqa"].get(q, {}).get(p) for q in QSETS for p in ("think", "no_think")}
                t = {k: tests[label].get(f"mmvqa/{k}", {}) for k in summaries}
                acc = ["no items" if s and not s["n"] else cell(s and s["accuracy"], t[k])
                       for k, s in summaries.items()]
                ps = [f"{pval((s or {}).get('p_above_chance'))} · {pval(t[k].get('p'))}" for k, s in summaries.items()]
                paths = ["/".join(str(s["paths"][k]) for k in ("parsed", "similarity", "none"))
                         for s in summaries.values() if s]
                accuracy.append(row(label, *acc, ", ".join(paths)))
                pvalues.append(row(label, *ps))
        lines += accuracy + pvalues
    names = ["B-1", "B-2", "B-3", "B-4", "METEOR", "R-1", "R-2", "R-L", "CIDEr", "BERT_F1", "LLM_Score", "Mean"]
    if any("reports" in run for run in runs.values()):
        lines += table("Report generation (%), paper table 2", f"\\* p < 0.05, † p < 0.005 vs. `{ref}` (paired t-test);"
                       " — = not computed (reason in results.json `missing`).", ["Run", "RAM", "ARW λ", *names])
    for label, run in runs.items():
        if run.get("reports"):
            scores = run["reports"]["scores"]
            lines.append(row(label, "✓" if run["ram"] else "✗", run["arw_lambda"],
                             *[cell(scores[m], tests[label].get(f"reports/{m}")) for m in TEXT_METRICS + ["Mean"]]))
    graded = {k: r["reasoning"]["offline"] for k, r in runs.items() if "offline" in r.get("reasoning", {})}
    if graded:
        lines += table("Rationales against the scan's report (offline clinical-term consistency, 0-1), paper table 4",
                       f"p: paired t-test against `{ref}`.", ["Run", "consistency", "n", "p"])
        for label, g in graded.items():
            p = tests[label].get("reasoning/offline", {}).get("p")
            lines.append(row(label, f"{g['mean']:.3f}", len(g["per_item"]), pval(p)))
        for a, b in PAIRS:
            t = results["significance"].get(f"{a} vs {b}", {}).get("reasoning/offline")
            if t and t["n"]:
                lines.append(f"\n`{a}` − `{b}`: {t['mean_a'] - t['mean_b']:+.3f} over {t['n']} questions, paired "
                             f"t-test p = {pval(t['p'])}.")
    judged = {k: r["reasoning"] for k, r in runs.items() if r.get("reasoning", {}).get("means")}
    if judged:
        lines += table("Reasoning quality (0-5, LLM judge), paper table 4", f"\\* p < 0.05, † p < 0.005 vs. `{ref}` "
                       "(paired t-test).", ["Run", "Clinical", "Clarity", "Diff. Dx", "Concis", "judged"])
        for label, r in judged.items():
            cells = [cell(r["means"][k], tests[label].get(f"reasoning/judge/{k}"), 1) for k in JUDGE_CRITERIA]
            lines.append(row(label, *cells, f"{r['n_valid']}/{r['n']}"))
        for a, b in PAIRS:
            pair = results["significance"].get(f"{a} vs {b}", {})
            if f"reasoning/judge/{JUDGE_CRITERIA[0]}" in pair:
                lines.append(f"\n`{a}` vs `{b}`, paired t-test p: " + ", ".join(
                    f"{k} {pval(pair[f'reasoning/judge/{k}'].get('p'))}" for k in JUDGE_CRITERIA) + ".")
    if "positional_bias" in results:
        b = results["positional_bias"]
        means = [f"{k} {b[k]['mean_position'] or float('nan'):.3f} (n={b[k]['n_sentences']})"
                 for k in ("normal", "abnormal")]
        lines += ["", "## Positional bias, paper figure 1", "",
                  f"Mean normalised sentence position: {', '.join(means)}; plot `{b.get('png')}`."]
    return "\n".join(lines) + "\n"


# ================================================== command line ==================================================
# The phantom world's overrides: its tiny models answer and report in fewer tokens (reports <= 253), and an untrained
# one that never emits EOS would otherwise generate up to the real limits.
PHANTOM = dict(max_new_tokens=128, max_report_tokens=320, n_reports=32)

def parse_args(argv=None):
    p = make_parser(__doc__)
    g = p.add_argument_group("what to evaluate")
    g.add_argument("run", nargs="*", metavar="RUN", help="runs to evaluate, <runs>/RUN/vlm (also a comma list); "
                   f"none named = those of {', '.join(DEFAULT_RUNS)} that exist (unless --ckpt)")
    g.add_argument("--ckpt", action="append", help="any VLM checkpoint dir, repeatable, evaluated after the named runs")
    g.add_argument("--runs", default="runs", help="the folder holding the runs")
    g.add_argument("--reference", default=None, help="run label the others are tested against; unset = sft, or first")
    g.add_argument("--tasks", default="mmvqa,reports,reasoning,bias", help="comma list of mmvqa,reports,reasoning,bias")
    g.add_argument("--compare", nargs=2, metavar="RESULTS_JSON[:LABEL]", help="only paired tests between two results")
    g = data_flags(p)
    g.add_argument("--mmvqa-ctrate", default=None, help="MCQ JSON, official format; unset = <root>/mmvqa/valid.json")
    g.add_argument("--mmvqa-radchestct", default=None, help="MCQ JSON; unset = <root>/mmvqa/radchestct.json")
    g.add_argument("--n-mmvqa", type=at_least(0), default=0, help="first N per set (with a cached scan); 0 = all")
    g.add_argument("--n-reports", type=at_least(0), default=0, help="valid reports to generate (0 = all)")
    g.add_argument("--bias-reports", help="figure 1: a reports CSV or labelled-sentences JSONL; unset = train CSV")
    g = p.add_argument_group("generation")
    g.add_argument("--batch-size", type=at_least(1), default=32, help="per rank")
    g.add_argument("--max-new-tokens", type=at_least(1), default=512, help="MMVQA completion tokens")
    g.add_argument("--max-report-tokens", type=at_least(1), default=1024, help="generated reports")
    g = p.add_argument_group("metrics")
    g.add_argument("--bert-model", default=None, help="LOCAL dir of the BERTScore model (e.g. roberta-large)")
    g.add_argument("--bert-layers", type=at_least(1), default=None, help="unset = bert-score's choice for the dir name")
    g.add_argument("--sentence-encoder", default=None, help="local dir for the MMVQA similarity fallback")
    g = p.add_argument_group("judge", "an OpenAI-compatible endpoint; the key is read from the environment only")
    g.add_argument("--judge-base-url", default=None, help="or $JUDGE_BASE_URL, e.g. https://api.deepseek.com/v1")
    g.add_argument("--judge-model", default=None, help="or $JUDGE_MODEL, e.g. deepseek-chat")
    g.add_argument("--judge-api-key-env", default="JUDGE_API_KEY", help="NAME of the env variable holding the key")
    g.add_argument("--judge-timeout", type=at_least(0.0), default=60.0, help="seconds per request")
    g.add_argument("--judge-retries", type=at_least(0), default=2)
    g.add_argument("--judge-workers", type=at_least(1), default=4, help="concurrent requests")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/eval", help="results.{json,md}, generated/, cases/, positional_bias.png, "
                   "judge_cache/")
    g.add_argument("--case-sheets", type=at_least(0), default=4, help="questions per set drawn in <out>/cases/*.png")
    return parse_with_preset(p, argv, PHANTOM)


def eval_paths(args) -> dict:
    if args.preset == "real" and not Path(args.data_root).is_dir():
        raise SystemExit(f"--data-root {args.data_root} is not a directory (CT-RATE's layout, see data.paths)")
    paths = data.paths(args.data_root, args.preset)
    return {**paths, "mmvqa_valid": args.mmvqa_ctrate or paths["mmvqa_valid"],
            "mmvqa_radchestct": args.mmvqa_radchestct or paths["mmvqa_radchestct"]}


def find_checkpoints(args) -> tuple[list[tuple[str, Path]], dict]:
    """(label, dir) of the runs named (<runs>/<name>/vlm; by default those of the quick start's runs that exist), then
    of the --ckpt dirs, and the selection as results.json records it. A named run without a checkpoint is an error."""
    named = [n for spec in args.run for n in spec.split(",") if n]
    names = named or ([] if args.ckpt else DEFAULT_RUNS)
    where = {n: Path(args.runs, n, "vlm") for n in names}
    missing = {n: str(d) for n, d in where.items() if not (d / "config.json").is_file()}
    if named and missing:
        present = sorted(p.parent.parent.name for p in Path(args.runs).glob("*/vlm/config.json"))
        raise SystemExit(f"no checkpoint for run {', '.join(missing)}: "
                         + ", ".join(f"{d}/config.json does not exist" for d in missing.values())
                         + f" (runs with a checkpoint under {args.runs}: {', '.join(present) or 'none'}; any "
                         "checkpoint dir: --ckpt DIR)")
    found = [(n, d) for n, d in where.items() if n not in missing]
    for c in map(Path, args.ckpt or []):   # each checked now: a bad one found after the first run's work loses it
        if not model.is_vlm_dir(c):
            hint = f"; {c / 'vlm'} is one" if model.is_vlm_dir(c / "vlm") else ""
            raise SystemExit(f"--ckpt {c} is not a VLM checkpoint (config.json and llm/){hint}")
        found.append((c.parent.name if c.name == "vlm" else c.name, c))   # <run>/vlm is labelled <run>
    first = {}
    for label, d in found:   # results.json keys runs by label: one would overwrite the other
        if label in first:
            raise SystemExit(f"two checkpoints would both be labelled {label!r}: {first[label]} and {d}; evaluate them "
                             "in separate runs (--out) or rename one's folder")
        first[label] = d
    if found:
        print0(f"evaluating {', '.join(f'{label} ({d})' for label, d in found)}"
               + (f"; not found: {', '.join(f'{n} ({d})' for n, d in missing.items())}" if missing else ""))
    return found, {"runs_dir": args.runs, "named": named or None, "ckpt": args.ckpt, "not_found": missing,
                   "evaluated": {label: str(d) for label, d in found}}


def load_inputs(args, tasks: set, paths: dict, prov: dict) -> tuple[dict, dict, dict, list]:
    """The volume caches and the question sets (the first --n-mmvqa items whose volume is cached; a set without its
    cache or default question file is left out and said, a --mmvqa-* file that is not there is an error), the
    reports and the report subset (the first --n-reports volumes whose report has findings or impressions, distinct
    scans first: reconstructions of one scan share their report)."""
    caches = {q: data.VolumeCache(paths[c]) for q, (c, _) in QSETS.items() if Path(paths[c], "preset.json").is_file()}
    prov["missing_caches"] = {q: str(paths[c]) for q, (c, _) in QSETS.items() if q not in caches}
    for flag, path in (("--mmvqa-ctrate", args.mmvqa_ctrate), ("--mmvqa-radchestct", args.mmvqa_radchestct)):
        if "mmvqa" in tasks and path and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file")
    questions = {}
    for qset, (cache_key, qkey) in QSETS.items():
        missing = [str(p) for p in (paths[qkey], Path(paths[cache_key], "preset.json")) if not Path(p).is_file()]
        if "mmvqa" in tasks and missing:   # e.g. no RAD-ChestCT: said, and recorded in results.json
            print0(f"{qset}: no MMVQA accuracy: {' and '.join(missing)} missing (data.py preprocess / mmvqa)")
            prov["question_files"][qset] = {"path": str(paths[qkey]), "missing": missing}
        elif "mmvqa" in tasks:
            items = data.read_questions(paths[qkey])
            usable = [q for q in items if q["VolumeName"] in caches[qset]]
            questions[qset] = usable[:args.n_mmvqa or None]
            if not usable:
                print0(f"{qset}: no items to evaluate ({paths[qkey]}: {len(items)} questions, "
                       f"none with a cached volume)")
            prov["question_files"][qset] = {"path": str(paths[qkey]), "sha256": sha256(paths[qkey]),
                                            "n_items": len(items), "n_with_volume": len(usable),
                                            "n_evaluated": len(questions[qset])}
    reports = {}
    if tasks & {"reports", "reasoning"}:
        reports = data.read_reports(paths["valid_reports"])
        prov["reports_file"] = {"path": str(paths["valid_reports"]), "sha256": sha256(paths["valid_reports"])}
    if "reports" in tasks and "CT-RATE" not in caches:
        print0(f"no report generation: {prov['missing_caches']['CT-RATE']} holds no volume cache (data.py preprocess)")
    cached = [n for n in sorted(reports) if "CT-RATE" in caches and n in caches["CT-RATE"]]
    has_text = [n for n in cached if reports[n]["findings"] or reports[n]["impressions"]]
    prov["reports_without_text"] = len(cached) - len(has_text)   # nothing to score a generated report against
    nth, order = Counter(), []
    for n in has_text:
        order.append((nth[scan_id(n)], n))
        nth[scan_id(n)] += 1
    return caches, questions, reports, [n for _, n in sorted(order)][:args.n_reports or None]


def main(argv=None) -> dict | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare)
    tasks, out_dir = set(args.tasks.split(",")), Path(args.out)
    if unknown := tasks - {"mmvqa", "reports", "reasoning", "bias"}:
        raise SystemExit(f"--tasks: no task {', '.join(sorted(unknown))} (mmvqa, reports, reasoning, bias)")
    if "reasoning" in tasks and "mmvqa" not in tasks:
        raise SystemExit("--tasks reasoning grades the rationales of task mmvqa: add mmvqa")
    rank, _, _, device = setup_distributed()   # cuda:LOCAL_RANK when there is a GPU, else cpu
    model_tasks = tasks & {"mmvqa", "reports", "reasoning"}
    paths = eval_paths(args) if model_tasks or not args.bias_reports else {}
    results = {"provenance": provenance(args, argv), "runs": {}}
    ckpts, results["selection"] = find_checkpoints(args) if model_tasks else ([], None)
    if model_tasks and not ckpts:
        raise SystemExit(f"none of the runs {', '.join(DEFAULT_RUNS)} has a checkpoint under {args.runs} (<run>/vlm): "
                         "run `python sft.py` (then grpo.py), name runs (python evaluate.py NAME ...) or pass --ckpt")
    labels = [label for label, _ in ckpts]
    if args.reference is not None and args.reference not in labels:   # before any model work
        raise SystemExit(f"--reference {args.reference} is not one of the runs {labels}")
    if "bias" in tasks and rank == 0:   # its figure is written first, once the runs are known to be there
        writable_dir(out_dir)
        results["positional_bias"] = positional_bias(args.bias_reports or paths["train_reports"],
                                                     out_dir / "positional_bias.png")
    if model_tasks:
        caches, questions, reports, report_names = load_inputs(args, tasks, paths, results["provenance"])
    if rank == 0:
        writable_dir(out_dir)   # now, not after hours of generation
    judge_url = args.judge_base_url or os.environ.get("JUDGE_BASE_URL")
    judge_model = args.judge_model or os.environ.get("JUDGE_MODEL")
    judge = data.Chat(judge_url, judge_model, args.judge_api_key_env, out_dir / "judge_cache", args.judge_timeout,
                      args.judge_retries, args.judge_workers) if rank == 0 and judge_url and judge_model else None
    sentence_encoder = encoder_embedder(args.sentence_encoder, device) if args.sentence_encoder else None

    generated = {}   # each run's generated reports, scored after the last collective
    for label, ckpt in ckpts:
        kept_file = out_dir / "generated" / f"{label}.json"    # written as soon as made: a crash loses one run at most
        key = output_key(ckpt, caches, questions, reports, report_names, tasks, args, device)
        if (kept := kept_outputs(kept_file, key)) is not None:
            print0(f"{label}: outputs kept in {kept_file} (same checkpoint files, inputs, settings and code)")
            if rank == 0:
                results["runs"][label] = kept["run"]
                if kept["reports"] is not None:
                    generated[label] = [tuple(r) for r in kept["reports"]]
            continue
        print0(f"evaluating {label}: {ckpt}")
        try:
            vlm = model.VLM.load(ckpt, device=device, dtype=compute_dtype(device)).eval()  # frozen: bf16 on CUDA
        except Exception as e:   # gone since the start (a run started afresh there): the other runs' work stays
            if (Path(ckpt) / "config.json").is_file():
                raise
            print0(f"skipped {label}: {ckpt} is gone since the evaluation began ({type(e).__name__}: {e})")
            results["selection"]["not_found"][label] = results["selection"]["evaluated"].pop(label)
            continue
        meta = vlm.config.get("meta", {})
        sft_args = meta.get("args", {}) if meta.get("stage") == "sft" else meta.get("sft", {}).get("args", {})
        run = {"checkpoint": str(ckpt), "config_sha256": sha256(Path(ckpt) / "config.json"), "stage": meta.get("stage"),
               "ram": vlm.config.get("ram"), "arw_lambda": sft_args.get("arw_lambda")}
        embed = sentence_encoder or llm_embedder(vlm.llm, vlm.tokenizer)
        if "mmvqa" in tasks:
            run["mmvqa"] = {qset: evaluate_mmvqa(vlm, caches[qset], items, embed, args, f"{label} {qset}")
                            for qset, items in questions.items()}
        if "reports" in tasks and report_names:
            generated[label] = generate_reports(vlm, caches["CT-RATE"], reports, report_names, args, label)
        results["runs"][label] = run
        if rank == 0:
            write_atomic(kept_file, json.dumps({"key": key, "run": run, "reports": generated.get(label)}, default=str))
        del vlm
    # the last collective: rank 0 scores alone from here (a judge may take hours; no rank waits on it) and the
    # others are done
    cleanup_distributed()
    if rank != 0:
        return None

    for label, run in results["runs"].items():
        if "reasoning" in tasks:
            run["reasoning"] = evaluate_reasoning(judge, run.get("mmvqa", {}), questions.get("CT-RATE", []), reports)
        if label in generated:
            print0(f"{label}: scoring {len(report_names)} generated reports")   # minutes for CT-RATE's 3,039
            run["reports"] = score_reports(generated[label], reports, report_names, args, judge)
    labels = list(results["runs"])
    results["reference"] = (args.reference if args.reference in labels else None) or (
        "sft" if "sft" in labels else labels[0] if labels else None)
    results["significance"] = significance(results["runs"], results["reference"]) if labels else {}
    if "mmvqa" in tasks and args.case_sheets:
        results["case_sheets"] = case_sheets(results["runs"], questions, caches, paths, args.case_sheets,
                                             out_dir / "cases")
    print0(tables := markdown(results))   # first: the log keeps the tables if the files cannot be written
    # NaN / inf as null: results.json stays standard JSON
    write_atomic(out_dir / "results.json", json.dumps(json_safe(results), indent=1, default=str, allow_nan=False))
    write_atomic(out_dir / "results.md", tables)
    sheets = f", {len(results['case_sheets'])} case sheets in {out_dir}/cases" if results.get("case_sheets") else ""
    print0(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}{sheets}")
    return results


if __name__ == "__main__":
    main()
