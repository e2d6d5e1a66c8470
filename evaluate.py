"""Med3D-R1 evaluation: MMVQA accuracy (paper table 1), report generation (table 2), reasoning quality (table 4),
the positional bias of report sentences (figure 1), and paired significance tests — reproducible, with provenance.

Deliberate choices (SPEC §7):
 1. Text metrics are the standard implementations, corpus-level as CT-CHAT and the VLM3D challenge report them:
    pycocoevalcap BLEU-1..4 (corpus BLEU, "closest" reference length), METEOR 1.5 (Java), ROUGE-L and CIDEr-D;
    rouge-score ROUGE-1/2 F1 (stemmer on); bert-score F1 from a LOCAL model directory only (no rescaling). Text is
    lower-cased and split into words with PTB punctuation removed, in Python (no Java needed for tokenising).
    A metric that cannot run (no Java, no local BERT model, no judge endpoint) is null with its reason, never dropped.
    "Mean" is the mean of the metrics that ran; the results say which ones.
 2. LLM score and reasoning judge: an OpenAI-compatible chat-completions endpoint (--judge-base-url/--judge-model or
    JUDGE_BASE_URL/JUDGE_MODEL; the key is read from the environment variable named by --judge-api-key-env and is
    never written anywhere), fixed prompts, temperature 0, strict JSON parsing, an on-disk cache of valid replies,
    timeouts. A failed or unparseable reply makes that item null and is counted, never guessed.
 3. MMVQA answer = grpo.parse_answer (the letter in the single <answer> block, or a lone letter); otherwise the paper's
    fallback (§4.3): the option whose text embedding has the highest cosine similarity to the raw output (tags removed).
    Embeddings: a local sentence-encoder directory if given, else the evaluated LLM's own input embeddings, mean-pooled.
    An empty output stays unanswered (wrong). The results count how many answers took each path.
 4. Accuracy is also reported per abnormality (the correct option) and per scan (reconstructions of one scan share
    their labels, so each scan's mean counts once).
 5. Significance against a reference run (default `sft`, the full model of table 2): paired t-test on per-report
    scores (as the paper), exact McNemar on per-question correctness (paired right/wrong answers).
 6. Greedy decoding (temperature 0). Items are cut into global batches and batch k runs on rank k % world, so a batch
    holds the same items with or without torchrun and sharded results equal single-process ones; rank 0 gathers.

Run:
  python evaluate.py                # 1 CPU: every runs/*/vlm on subsets of the phantom world -> runs/eval/results.{json,md}
  python evaluate.py --preset real --data-root /data/ct-rate --ckpt runs/grpo/vlm --n-mmvqa 0 --n-reports 0 \\
      --bert-model /models/roberta-large --judge-base-url https://api.deepseek.com/v1 --judge-model deepseek-chat
                                    # 1 GPU, everything (key in $JUDGE_API_KEY)
  torchrun --standalone --nproc_per_node 8 evaluate.py --preset real --data-root /data/ct-rate --n-mmvqa 0 ...
  python evaluate.py --tasks bias --bias-reports /data/ct-rate/dataset/radiology_text_reports/train_reports.csv
  python evaluate.py --compare runs/eval_a/results.json runs/eval_b/results.json:sft     # paired tests only
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
from grpo import format_reward, parse_answer, think_text
from model import autocast, cleanup_distributed, get_rank, print0, setup_distributed, world_size

TEXT_METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-1", "ROUGE-2", "ROUGE-L", "CIDEr",
                "BERT-F1", "LLM-score"]
JUDGE_CRITERIA = ["clinical_correctness", "clarity", "differential_diagnosis", "conciseness"]

# =====================================================================================================================
# Report-generation metrics (paper table 2)
# =====================================================================================================================

PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}",
                   '"'}


def tokenize(text: str) -> str:
    """Lower-case words with punctuation removed, as pycocoevalcap's PTBTokenizer leaves them ("3.5", "well-defined",
    "1/2" stay whole)."""
    words = re.findall(r"[a-z0-9]+(?:[.'/-][a-z0-9]+)*|\.\.\.|--|\S", text.lower())
    return " ".join(w for w in words if w not in PTB_PUNCTUATION)


def _local_dir(path: str) -> None:
    """Model arguments are local directories only: a name that is not one would make transformers download it."""
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a local model directory (no config.json); nothing is downloaded")


@functools.cache
def _meteor():
    """One METEOR Java process per Python process (its start-up, loading the paraphrase table, takes seconds)."""
    return Meteor()


def _bert_f1(hyps: list[str], refs: list[str], model_dir: str, layers: int | None) -> list[float]:
    import bert_score
    from bert_score.utils import model2layers
    from transformers import AutoConfig
    _local_dir(model_dir)
    if layers is None:   # bert-score's own layer choice for a known model name, else the last layer
        layers = model2layers.get(Path(model_dir).name, AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    scorer = bert_score.BERTScorer(model_type=model_dir, num_layers=layers, batch_size=32)
    max_pos = getattr(scorer._model.config, "max_position_embeddings", 512)
    scorer._tokenizer.model_max_length = min(scorer._tokenizer.model_max_length, max_pos)  # dirs without the limit
    _, _, f1 = scorer.score(hyps, refs)
    return f1.tolist()


def report_metrics(hyps: list[str], refs: list[str], bert_model: str | None = None, bert_layers: int | None = None,
                   judge: "Judge | None" = None) -> dict:
    """Score generated reports against references. Returns {"scores": {metric: corpus value | None}, "per_item":
    {metric: [value | None]}, "missing": {metric: reason}, "implementations": {metric: what ran}, "mean_over"}."""
    assert len(hyps) == len(refs) and hyps, "need as many hypotheses as references (at least one)"
    res, gts = {i: [tokenize(h)] for i, h in enumerate(hyps)}, {i: [tokenize(r)] for i, r in enumerate(refs)}
    per_item, missing, coco = {}, {}, f"pycocoevalcap {_version('pycocoevalcap')}"
    impl = {**{f"BLEU-{n}": f"{coco} Bleu(4), corpus" for n in range(1, 5)}, "ROUGE-L": f"{coco} Rouge",
            "CIDEr": f"{coco} Cider (CIDEr-D)", "METEOR": f"{coco} Meteor 1.5 (Java)",
            "ROUGE-1": f"rouge-score {_version('rouge-score')} F1, stemmer", "ROUGE-2": "rouge-score F1, stemmer"}
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)        # corpus BLEU; per item: sentence BLEU
    scores = {f"BLEU-{n + 1}": float(bleu[n]) for n in range(4)}
    per_item.update({f"BLEU-{n + 1}": [float(x) for x in bleu_items[n]] for n in range(4)})
    if shutil.which("java"):   # an empty hypothesis would stall METEOR's stdin protocol, so it gets one token
        scores["METEOR"], items = _meteor().compute_score(gts, {i: [h[0] or "empty"] for i, h in res.items()})
        per_item["METEOR"] = [float(x) for x in items]
    else:
        missing["METEOR"] = "METEOR 1.5 needs Java: no `java` on PATH"
    scores["ROUGE-L"], items = Rouge().compute_score(gts, res)
    per_item["ROUGE-L"] = [float(x) for x in items]
    scores["CIDEr"], items = Cider().compute_score(gts, res)
    per_item["CIDEr"] = [float(x) for x in items]
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=True)
    pairs = [rouge.score(r, h) for h, r in zip(hyps, refs)]      # rouge-score tokenises itself; order (target, pred)
    for key, name in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2")):
        per_item[name] = [p[key].fmeasure for p in pairs]
        scores[name] = float(np.mean(per_item[name]))
    if bert_model:
        per_item["BERT-F1"] = _bert_f1(hyps, refs, bert_model, bert_layers)
        scores["BERT-F1"] = float(np.mean(per_item["BERT-F1"]))
        impl["BERT-F1"] = f"bert-score {_version('bert-score')} F1, {bert_model}, no baseline rescaling"
    else:
        missing["BERT-F1"] = "no local BERT model given (--bert-model DIR); nothing is downloaded"
    if judge is not None:
        llm = judge.llm_scores(hyps, refs)
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
            "implementations": {k: v for k, v in impl.items() if k in ran}}


def paired_test(a: dict, b: dict) -> dict:
    """Paired t-test (scipy ttest_rel) between two runs' per-item scores {item id: score | None}, on the ids scored
    in both."""
    ids = sorted(k for k in a.keys() & b.keys() if a[k] is not None and b[k] is not None)
    x, y = np.array([a[k] for k in ids], float), np.array([b[k] for k in ids], float)
    out = {"n": len(ids), "mean_a": float(x.mean()) if ids else None, "mean_b": float(y.mean()) if ids else None,
           "t": None, "p": None}
    if len(ids) >= 2 and np.any(x != y):
        t, p = stats.ttest_rel(x, y)
        out.update(t=float(t), p=float(p))
    return out


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# =====================================================================================================================
# LLM judge: LLM score (table 2) and reasoning quality (table 4) through an OpenAI-compatible endpoint
# =====================================================================================================================

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
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or set(obj) != set(keys):
        return None
    if not all(type(obj[k]) is int and lo <= obj[k] <= hi for k in keys):
        return None
    return obj


class Judge:
    """Chat-completions client with a fixed prompt, temperature 0, strict parsing, timeouts and an on-disk cache."""

    def __init__(self, base_url: str, model_name: str, api_key_env: str = "JUDGE_API_KEY", cache_dir: str | Path =
                 "runs/eval/judge_cache", timeout: float = 60.0, retries: int = 2, workers: int = 4):
        from openai import OpenAI
        self.base_url, self.model, self.workers = base_url, model_name, workers
        self.cache_dir = Path(cache_dir)
        self._key = os.environ.get(api_key_env) or "EMPTY"     # local servers accept any key; never logged or saved
        self.client = OpenAI(base_url=base_url, api_key=self._key, timeout=timeout, max_retries=retries)

    def ask(self, prompt: str, keys: list[str], lo: int, hi: int) -> tuple[dict | None, str | None]:
        """(parsed reply, None) or (None, error). Only valid replies are cached, so failures are retried next run."""
        messages = [{"role": "user", "content": prompt}]
        key = hashlib.sha256(json.dumps([self.base_url, self.model, messages], sort_keys=True).encode()).hexdigest()
        path = self.cache_dir / f"{key}.json"
        if path.is_file():
            return json.loads(path.read_text())["parsed"], None
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0)
            text = reply.choices[0].message.content
        except Exception as e:   # timeouts, connection and HTTP errors: that item is null, counted by the caller
            return None, f"{type(e).__name__}: {str(e).replace(self._key, '***')[:200]}"
        parsed = parse_judge_reply(text, keys, lo, hi)
        if parsed is None:
            return None, f"unparseable reply: {str(text)[:200]!r}"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"model": self.model, "reply": text, "parsed": parsed}))
        os.replace(tmp, path)
        return parsed, None

    def _map(self, prompts: list[str], keys: list[str], lo: int, hi: int) -> list[tuple[dict | None, str | None]]:
        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            return list(pool.map(lambda p: self.ask(p, keys, lo, hi), prompts))

    def llm_scores(self, hyps: list[str], refs: list[str]) -> dict:
        """LLM score per report in [0, 1] (the judge's 0-100 / 100) and their mean over valid replies."""
        out = self._map([LLM_SCORE_PROMPT.format(reference=r, candidate=h) for h, r in zip(hyps, refs)],
                        ["score"], 0, 100)
        per_item = [o["score"] / 100 if o else None for o, _ in out]
        valid = [s for s in per_item if s is not None]
        return {"per_item": per_item, "mean": float(np.mean(valid)) if valid else None, "n_valid": len(valid),
                "errors": [e for _, e in out if e]}

    def reasoning_scores(self, questions: list[str], thinks: list[str], reports: list[str]) -> dict:
        """Paper table 4: four 0-5 criteria per reasoning text; means over valid replies."""
        out = self._map([REASONING_PROMPT.format(question=q, think=t or "(empty)", report=r)
                         for q, t, r in zip(questions, thinks, reports)], JUDGE_CRITERIA, 0, 5)
        valid = [o for o, _ in out if o]
        return {"means": {k: float(np.mean([o[k] for o in valid])) if valid else None for k in JUDGE_CRITERIA},
                "per_item": [o for o, _ in out], "n_valid": len(valid), "n": len(out),
                "errors": [e for _, e in out if e]}


def make_judge(args) -> Judge | None:
    base_url = args.judge_base_url or os.environ.get("JUDGE_BASE_URL")
    model_name = args.judge_model or os.environ.get("JUDGE_MODEL")
    if not base_url or not model_name:
        return None
    return Judge(base_url, model_name, args.judge_api_key_env, Path(args.out) / "judge_cache", args.judge_timeout,
                 args.judge_retries, args.judge_workers)


# =====================================================================================================================
# Positional bias of normal / abnormal sentences (paper figure 1)
# =====================================================================================================================

def positional_bias(reports: str | Path, out_png: str | Path | None = None, bins: int = 10) -> dict:
    """Normalised position (i + 0.5) / n of every sentence i of an n-sentence report (findings then impressions),
    normal vs abnormal: densities per bin, means, and a KDE plot as PNG. `reports` is a reports CSV (sentences split
    and rule-labelled by data.py) or a labelled-sentences JSONL (data.py label, e.g. from an LLM labeller)."""
    if str(reports).endswith(".jsonl"):
        labelled = [sum((r[sec] or [] for sec in ("findings", "impressions")), [])
                    for r in data.read_sentence_labels(reports).values()]
    else:
        labelled = [[(s, data.rule_label(s)) for sec in ("findings", "impressions") for s in data.split_sentences(r[sec])]
                    for r in data.read_reports(reports).values()]
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
        from scipy.stats import gaussian_kde
        grid = np.linspace(0, 1, 201)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for kind, color in (("normal", "tab:blue"), ("abnormal", "tab:red")):
            p = np.array(pos[kind])
            if len(np.unique(p)) >= 2:
                ax.fill_between(grid, gaussian_kde(p)(grid), alpha=0.35, color=color, label=f"{kind} (n={len(p)})")
        ax.set(xlabel="normalised position in report", ylabel="density", xlim=(0, 1))
        ax.legend()
        fig.tight_layout()
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=150)
        plt.close(fig)
        out["png"] = str(out_png)
    return out


# =====================================================================================================================
# MMVQA answers: parser first, then the paper's cosine-similarity fallback
# =====================================================================================================================

def strip_tags(text: str) -> str:
    return re.sub(r"</?[A-Za-z_|][^<>\s]*>", " ", text).strip()


def resolve_answer(output: str, options: dict, embed=None) -> tuple[str | None, str]:
    """(letter | None, path): path is "parsed" (grpo.parse_answer), "similarity" (highest cosine similarity of the
    option texts to the raw output, paper §4.3) or "none" (empty output, or no embedder)."""
    letter = parse_answer(output, options=options)
    if letter in options:
        return letter, "parsed"
    text = strip_tags(output)
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
        rows = []
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"] or [tokenizer.pad_token_id]
            rows.append(table[torch.tensor(ids, device=table.device)].float().mean(0))
        return torch.stack(rows)
    return embed


def encoder_embedder(model_dir: str, device: str = "cpu"):
    """Mean-pooled last hidden states of a local sentence-encoder directory (e.g. a sentence-transformers model)."""
    from transformers import AutoModel, AutoTokenizer
    _local_dir(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    enc = AutoModel.from_pretrained(model_dir, local_files_only=True).to(device).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
        hidden = enc(**batch).last_hidden_state                                  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return embed


# =====================================================================================================================
# Model-driven evaluation: batched greedy generation, sharded over ranks
# =====================================================================================================================

def scan_id(name: str) -> str:
    """'valid_12_a_2.nii.gz' -> 'valid_12_a' (reconstructions of one scan); other names ('trn123.npz') -> stem."""
    key = data.volume_key(name)
    return "_".join(key.split("_")[:3]) if re.fullmatch(r"(train|valid)_\d+_[a-z]+_\d+", key) else key


def generate_all(vlm, cache, jobs: list[tuple[str, str]], batch_size: int, max_new_tokens: int, desc: str) -> list[str]:
    """Greedy completions for (VolumeName, user text) jobs, in job order, on every rank. Global batch k runs on rank
    k % world, so each batch (and its padding) is the same with or without torchrun."""
    rank, world = get_rank(), world_size()
    batches = [list(range(i, min(i + batch_size, len(jobs)))) for i in range(0, len(jobs), batch_size)]
    mine = {}
    for k in tqdm(range(rank, len(batches), world), desc=desc, disable=rank != 0, leave=False):
        idx = batches[k]
        volumes = torch.stack([data.online_transform(np.asarray(cache.load(jobs[i][0])), cache.preset) for i in idx])
        input_ids, attention_mask = vlm.tokenize([vlm.prompt(jobs[i][1]) for i in idx])
        with torch.no_grad(), autocast(vlm.device):
            image_embeds = vlm.image_embeds(volumes.to(vlm.device))                      # (B, N_img, D)
            completion, lengths, _ = vlm.generate(input_ids, attention_mask, image_embeds,
                                                  max_new_tokens=max_new_tokens, temperature=0.0)
        for row, i in enumerate(idx):
            mine[i] = vlm.tokenizer.decode(completion[row, :lengths[row]].tolist(), skip_special_tokens=True)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, mine)
        mine = {i: text for part in parts for i, text in part.items()}
    return [mine[i] for i in range(len(jobs))]


def follows_format(output: str, think: bool) -> bool:
    """The prompt's format: <think>…</think><answer>…</answer> (grpo.format_reward), or one answer block alone."""
    return format_reward(output) == 1.0 if think else re.fullmatch(r"\s*<answer>[^<>]+</answer>\s*", output) is not None


def summarize_mmvqa(records: list[dict], think: bool) -> dict:
    """Accuracy, answer paths, format compliance, per abnormality (the key option) and per scan (mean over a scan's
    items, then over scans)."""
    by_abn, by_scan = {}, {}
    for r in records:
        by_abn.setdefault(r["key_option"], []).append(r["correct"])
        by_scan.setdefault(scan_id(r["VolumeName"]), []).append(r["correct"])
    paths = {p: sum(r["path"] == p for r in records) for p in ("parsed", "similarity", "none")}
    return {"n": len(records), "accuracy": float(np.mean([r["correct"] for r in records])) if records else None,
            "paths": paths, "format_ok": float(np.mean([follows_format(r["output"], think) for r in records]))
            if records else None,
            "per_scan_accuracy": float(np.mean([np.mean(v) for v in by_scan.values()])) if by_scan else None,
            "n_scans": len(by_scan),
            "per_abnormality": {k: {"n": len(v), "accuracy": float(np.mean(v))} for k, v in sorted(by_abn.items())},
            "records": records}


def evaluate_mmvqa(vlm, cache, items: list[dict], embed, args, desc: str) -> dict:
    """Table 1: accuracy with the think and the no-think prompt on one question set."""
    out = {}
    for think in (True, False):
        texts = generate_all(vlm, cache, [(q["VolumeName"], data.mmvqa_prompt(q, think=think)) for q in items],
                             args.batch_size, args.max_new_tokens, f"{desc} {'think' if think else 'no-think'}")
        records = []
        for q, text in zip(items, texts):
            letter, path = resolve_answer(text, q["options"], embed)
            records.append({"VolumeName": q["VolumeName"], "answer": q["answer"], "pred": letter, "path": path,
                            "correct": letter == q["answer"], "key_option": q["options"][q["answer"]], "output": text})
        out["think" if think else "no_think"] = summarize_mmvqa(records, think)
    return out


def evaluate_reports(vlm, cache, reports: dict, names: list[str], args, judge, desc: str) -> dict:
    """Table 2: generated reports (section tags removed) against the reference findings + impressions."""
    texts = generate_all(vlm, cache, [(n, data.report_instruction(reports[n])) for n in names], args.batch_size,
                         args.max_report_tokens, desc)
    hyps = [" ".join(strip_tags(t).split()) for t in texts]
    refs = [" ".join(s for s in (reports[n]["findings"], reports[n]["impressions"]) if s) for n in names]
    if get_rank() != 0:
        return {}
    out = report_metrics(hyps, refs, args.bert_model, args.bert_layers, judge)
    out["per_item"] = {m: dict(zip(names, v)) for m, v in out["per_item"].items()}
    out["samples"] = [{"VolumeName": n, "generated": h, "reference": r} for n, h, r in zip(names, hyps, refs)][:5]
    return out


# =====================================================================================================================
# Runs, significance, provenance, tables
# =====================================================================================================================

def find_checkpoints(args) -> list[tuple[str, Path]]:
    """(label, dir) of --ckpt dirs, or of every complete runs/*/vlm (sft first, then grpo, then the rest)."""
    if args.ckpt:
        return [(Path(c).parent.name if Path(c).name == "vlm" else Path(c).name, Path(c)) for c in args.ckpt]
    found = [p.parent for p in sorted(Path(args.runs).glob("*/vlm/config.json"))]
    order = {"sft": 0, "grpo": 1}
    return [(p.parent.name, p) for p in sorted(found, key=lambda p: (order.get(p.parent.name, 2), p.parent.name))]


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact McNemar test for paired right/wrong answers (binomial test on the discordant pairs)."""
    a_only, b_only = sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b))
    p = stats.binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else None
    return {"n": len(a), "acc_a": float(np.mean(a)), "acc_b": float(np.mean(b)), "a_only": a_only, "b_only": b_only,
            "p": p}


def significance(runs: dict, reference: str) -> dict:
    """Every run against the reference run: paired t-tests on per-report scores (paper table 2), exact McNemar on
    per-question correctness (the same question files, so questions pair by position)."""
    out, ref = {}, runs[reference]
    for label, run in runs.items():
        if label == reference:
            continue
        tests = {f"reports/{m}": paired_test(items, ref["reports"]["per_item"][m])
                 for m, items in run.get("reports", {}).get("per_item", {}).items()
                 if m in ref.get("reports", {}).get("per_item", {})}
        for qset, prompts in run.get("mmvqa", {}).items():
            for prompt, summary in prompts.items():
                other = ref.get("mmvqa", {}).get(qset, {}).get(prompt)
                if other and len(other["records"]) == len(summary["records"]):
                    tests[f"mmvqa/{qset}/{prompt}"] = mcnemar([r["correct"] for r in summary["records"]],
                                                              [r["correct"] for r in other["records"]])
        out[f"{label} vs {reference}"] = tests
    return out


def sha256(path) -> str | None:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path and Path(path).is_file() else None


def provenance(args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    pkgs = ["torch", "transformers", "pycocoevalcap", "rouge-score", "bert-score", "scipy", "openai", "numpy"]
    return {"argv": sys.argv, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": commit,
            "python": sys.version.split()[0], "versions": {p: _version(p) for p in pkgs}, "world_size": world_size(),
            "java": shutil.which("java") is not None, "data_root": args.data_root, "preset": args.preset,
            "question_files": {},
            "judge_prompts_sha256": hashlib.sha256((LLM_SCORE_PROMPT + REASONING_PROMPT).encode()).hexdigest(),
            "decoding": "greedy", "max_new_tokens": args.max_new_tokens, "max_report_tokens": args.max_report_tokens,
            "answer_fallback_embedding": args.sentence_encoder or "the evaluated LLM's input embeddings"}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _mark(test: dict | None) -> str:
    p = (test or {}).get("p")
    return "" if p is None else "†" if p < 0.005 else "*" if p < 0.05 else ""


def markdown(results: dict) -> str:
    runs, ref = results["runs"], results.get("reference")
    lines = ["# Med3D-R1 evaluation", "", f"Provenance: `results.json` (commit {results['provenance']['git_commit']})."]
    if any("mmvqa" in run for run in runs.values()):
        lines += ["", "## MMVQA accuracy (%), paper table 1", "", f"\\* p < 0.05, † p < 0.005 vs. `{ref}` (exact "
                  "McNemar).", "", "| Method | CT-RATE w think | CT-RATE w/o think | RAD-ChestCT w think | "
                  "RAD-ChestCT w/o think | answers parsed / similarity / none |", "|---" * 6 + "|"]
    for label, run in runs.items():
        cells, paths, tests = [], [], results["significance"].get(f"{label} vs {ref}", {})
        for qset in ("CT-RATE", "RAD-ChestCT"):
            for prompt in ("think", "no_think"):
                summary = run.get("mmvqa", {}).get(qset, {}).get(prompt)
                cells.append(_pct(summary and summary["accuracy"]) + _mark(tests.get(f"mmvqa/{qset}/{prompt}")))
                if summary:
                    paths.append("/".join(str(summary["paths"][k]) for k in ("parsed", "similarity", "none")))
        if "mmvqa" in run:
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {', '.join(paths)} |")
    names = ["B-1", "B-2", "B-3", "B-4", "METEOR", "R-1", "R-2", "R-L", "CIDEr", "BERT_F1", "LLM_Score", "Mean"]
    if any("reports" in run for run in runs.values()):
        lines += ["", "## Report generation (%), paper table 2", "", f"\\* p < 0.05, † p < 0.005 vs. `{ref}` (paired "
                  "t-test); — = not computed (reason in results.json `missing`).", "",
                  "| Run | RAM | ARW λ | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
    for label, run in runs.items():
        if run.get("reports"):
            tests = results["significance"].get(f"{label} vs {ref}", {})
            cells = [_pct(run["reports"]["scores"][m]) + _mark(tests.get(f"reports/{m}")) for m in TEXT_METRICS + ["Mean"]]
            lines.append(f"| {label} | {'✓' if run['ram'] else '✗'} | {run['arw_lambda']} | " + " | ".join(cells) + " |")
    judged = {k: r["reasoning"] for k, r in runs.items() if r.get("reasoning", {}).get("means")}
    if judged:
        lines += ["", "## Reasoning quality (0-5, LLM judge), paper table 4", "",
                  "| Run | Clinical | Clarity | Diff. Dx | Concis | judged |", "|---|---|---|---|---|---|"]
        for label, r in judged.items():
            cells = ["—" if r["means"][k] is None else f"{r['means'][k]:.2f}" for k in JUDGE_CRITERIA]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {r['n_valid']}/{r['n']} |")
    if "positional_bias" in results:
        b = results["positional_bias"]
        lines += ["", "## Positional bias, paper figure 1", "", "Mean normalised sentence position: " + ", ".join(
            f"{k} {b[k]['mean_position'] or float('nan'):.3f} (n={b[k]['n_sentences']})" for k in ("normal", "abnormal"))
            + f"; plot `{b.get('png')}`."]
    return "\n".join(lines) + "\n"


# =====================================================================================================================
# CLI
# =====================================================================================================================

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # ---- what to evaluate ----
    p.add_argument("--ckpt", action="append", help="VLM checkpoint dir, repeatable (default: every <runs>/*/vlm)")
    p.add_argument("--runs", default="runs", help="where the default checkpoints are looked for")
    p.add_argument("--reference", default=None, help="run label the others are tested against (default: sft, or first)")
    p.add_argument("--tasks", default="mmvqa,reports,reasoning,bias", help="comma list of mmvqa,reports,reasoning,bias")
    p.add_argument("--compare", nargs=2, metavar="RESULTS_JSON[:LABEL]", help="only paired tests between two results")
    # ---- data ----
    p.add_argument("--preset", choices=["phantom", "real"], default="phantom", help="phantom world or CT-RATE layout")
    p.add_argument("--data-root", default="runs/phantom", help="phantom root (built if absent) or real data root")
    p.add_argument("--mmvqa-ctrate", default=None, help="MCQ JSON (official format; default <root>/mmvqa/valid.json)")
    p.add_argument("--mmvqa-radchestct", default=None, help="MCQ JSON (default <root>/mmvqa/radchestct.json)")
    p.add_argument("--n-mmvqa", type=int, default=0, help="questions per set, first N of the file (0 = all)")
    p.add_argument("--n-reports", type=int, default=32, help="valid reports to generate (0 = all)")
    p.add_argument("--bias-reports", default=None, help="figure 1 input: reports CSV or labelled-sentences JSONL "
                   "(default: the train reports CSV)")
    # ---- generation ----
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--max-new-tokens", type=int, default=128, help="MMVQA completions")
    p.add_argument("--max-report-tokens", type=int, default=320, help="phantom reports are <= 253 tokens")
    # ---- metrics ----
    p.add_argument("--bert-model", default=None, help="LOCAL dir of the BERTScore model (e.g. roberta-large)")
    p.add_argument("--bert-layers", type=int, default=None, help="default: bert-score's choice for the dir name")
    p.add_argument("--sentence-encoder", default=None, help="local dir for the MMVQA similarity fallback")
    # ---- judge (OpenAI-compatible; the key is read from the environment only) ----
    p.add_argument("--judge-base-url", default=None, help="or $JUDGE_BASE_URL, e.g. https://api.deepseek.com/v1")
    p.add_argument("--judge-model", default=None, help="or $JUDGE_MODEL, e.g. deepseek-chat")
    p.add_argument("--judge-api-key-env", default="JUDGE_API_KEY", help="NAME of the env variable holding the key")
    p.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--judge-retries", type=int, default=2)
    p.add_argument("--judge-workers", type=int, default=4, help="concurrent requests")
    # ---- output ----
    p.add_argument("--out", default="runs/eval", help="results.json, results.md, positional_bias.png, judge_cache/")
    return p.parse_args(argv)


def eval_paths(args) -> dict:
    if args.preset == "phantom":
        if get_rank() == 0:  # an existing world keeps its size (e.g. the tests' small one)
            data.ensure_phantom(args.data_root)
        if world_size() > 1:
            dist.barrier()
        paths = dict(data.ensure_phantom(args.data_root))
    else:
        root = Path(args.data_root)   # written by `python data.py preprocess / label / mmvqa`
        paths = dict(valid_cache=root / "cache/valid", radchestct_cache=root / "cache/radchestct",
                     mmvqa_valid=root / "mmvqa/valid.json", mmvqa_radchestct=root / "mmvqa/radchestct.json",
                     valid_reports=root / "dataset/radiology_text_reports/validation_reports.csv",
                     train_reports=root / "dataset/radiology_text_reports/train_reports.csv")
    paths["mmvqa_valid"] = args.mmvqa_ctrate or paths["mmvqa_valid"]
    paths["mmvqa_radchestct"] = args.mmvqa_radchestct or paths["mmvqa_radchestct"]
    return paths


def compare(specs: list[str]) -> dict:
    """--compare A.json[:label] B.json[:label]: paired tests of run A against run B (a file's first run by default)."""
    runs = {}
    for spec in specs:
        path, _, label = (spec, "", "") if Path(spec).is_file() else spec.rpartition(":")
        loaded = json.loads(Path(path).read_text())["runs"]
        runs[spec] = loaded[label or next(iter(loaded))]
    return significance(runs, specs[1])


def questions_and_reports(args, tasks: set, paths: dict, caches: dict, prov: dict) -> tuple[dict, dict, list]:
    """The question sets (first --n-mmvqa items whose volume is cached) and the report subset (first --n-reports
    volumes, covering distinct scans first: reconstructions of one scan share their report)."""
    questions = {}
    for qset, qfile in (("CT-RATE", paths["mmvqa_valid"]), ("RAD-ChestCT", paths["mmvqa_radchestct"])):
        if "mmvqa" in tasks and Path(qfile).is_file() and qset in caches:
            items = json.loads(Path(qfile).read_text())
            usable = [q for q in items if q["VolumeName"] in caches[qset]]
            questions[qset] = usable[:args.n_mmvqa or None]
            prov["question_files"][qset] = {"path": str(qfile), "sha256": sha256(qfile), "n_items": len(items),
                                            "n_with_volume": len(usable), "n_evaluated": len(questions[qset])}
    reports = data.read_reports(paths["valid_reports"]) if tasks & {"reports", "reasoning"} else {}
    nth, order = Counter(), []
    for n in sorted(n for n in reports if "CT-RATE" in caches and n in caches["CT-RATE"]):
        order.append((nth[scan_id(n)], n))
        nth[scan_id(n)] += 1
    return questions, reports, [n for _, n in sorted(order)][:args.n_reports or None]


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    tasks, out_dir = set(args.tasks.split(",")), Path(args.out)
    if args.compare:
        tests = compare(args.compare)
        print(json.dumps(tests, indent=1))
        return tests
    rank, local_rank, world, device = setup_distributed()   # cuda:LOCAL_RANK when there is a GPU, else cpu
    model_tasks = tasks & {"mmvqa", "reports", "reasoning"}
    paths = eval_paths(args) if model_tasks or not args.bias_reports else {}
    results = {"provenance": provenance(args), "runs": {}}
    if "bias" in tasks and rank == 0:
        results["positional_bias"] = positional_bias(args.bias_reports or paths["train_reports"],
                                                     out_dir / "positional_bias.png")
    ckpts = find_checkpoints(args) if model_tasks else []
    if model_tasks and not ckpts:
        raise SystemExit(f"no checkpoint under {args.runs}/*/vlm: run `python sft.py` (then grpo.py) or pass --ckpt")
    if model_tasks:   # a missing cache (e.g. no RAD-ChestCT) drops its set, and says so in the provenance
        caches = {qset: data.VolumeCache(paths[key]) for qset, key in (("CT-RATE", "valid_cache"),
                  ("RAD-ChestCT", "radchestct_cache")) if (Path(paths[key]) / "preset.json").is_file()}
        results["provenance"]["missing_caches"] = {q: str(paths[k]) for q, k in (("CT-RATE", "valid_cache"),
                                                   ("RAD-ChestCT", "radchestct_cache")) if q not in caches}
        questions, reports, report_names = questions_and_reports(args, tasks, paths, caches, results["provenance"])
    judge = make_judge(args) if rank == 0 else None
    sentence_encoder = encoder_embedder(args.sentence_encoder, device) if args.sentence_encoder else None

    for label, ckpt in ckpts:   # ---- every checkpoint ----
        print0(f"evaluating {label}: {ckpt}")
        vlm = model.VLM.load(ckpt, device=device).eval()
        meta = vlm.config.get("meta", {})
        sft_args = meta.get("args", {}) if meta.get("stage") == "sft" else meta.get("sft", {}).get("args", {})
        run = {"checkpoint": str(ckpt), "config_sha256": sha256(Path(ckpt) / "config.json"), "stage": meta.get("stage"),
               "ram": vlm.config.get("ram"), "arw_lambda": sft_args.get("arw_lambda")}
        embed = sentence_encoder or llm_embedder(vlm.llm, vlm.tokenizer)
        if "mmvqa" in tasks:
            run["mmvqa"] = {qset: evaluate_mmvqa(vlm, caches[qset], items, embed, args, f"{label} {qset}")
                            for qset, items in questions.items() if items}
        if "reasoning" in tasks and rank == 0:   # table 4: the think outputs of CT-RATE questions with a report
            recs = [r for r in run.get("mmvqa", {}).get("CT-RATE", {}).get("think", {}).get("records", [])
                    if r["VolumeName"] in reports]
            if judge is None or not recs:
                run["reasoning"] = {"means": None, "missing": "no judge endpoint configured" if judge is None else
                                    "needs think outputs (task mmvqa) of CT-RATE questions with reports"}
            else:
                question = {q["VolumeName"]: q["question"] for q in questions["CT-RATE"]}
                run["reasoning"] = judge.reasoning_scores(
                    [question[r["VolumeName"]] for r in recs], [think_text(r["output"]) for r in recs],
                    [" ".join(s for s in reports[r["VolumeName"]].values() if s) for r in recs])
        if "reports" in tasks and report_names:
            run["reports"] = evaluate_reports(vlm, caches["CT-RATE"], reports, report_names, args, judge, label)
        results["runs"][label] = run
        del vlm

    if rank == 0:   # ---- significance and output ----
        labels = list(results["runs"])
        results["reference"] = args.reference or ("sft" if "sft" in labels else labels[0] if labels else None)
        if results["reference"] is not None and results["reference"] not in labels:
            raise SystemExit(f"--reference {args.reference} is not one of the runs {labels}")
        results["significance"] = significance(results["runs"], results["reference"]) if labels else {}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (out_dir / "results.md").write_text(markdown(results))
        print0(markdown(results))
        print0(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    cleanup_distributed()
    return results if rank == 0 else None


if __name__ == "__main__":
    main()
