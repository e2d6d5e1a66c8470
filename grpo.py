"""Stage 2 of Med3D-R1: GRPO on multiple-choice CT questions with format, accuracy and consistency rewards.

The SFT model (runs/sft/vlm) reads a CT volume and a four-option question (MMVQA, SPEC §6), reasons inside one
<think>…</think> block and answers one letter inside one <answer>…</answer> block. Each completion earns
r = r_fmt + r_acc + r_con (paper §3.3) and the policy is trained with GRPO against a frozen copy of the SFT model.

Choices, deliberately (SPEC §6):
 1. G completions per question (default 4) sampled with plain temperature sampling; the completion ids are kept as
    generated (never decoded and re-tokenised) and scored at the same temperature, so sampled = scored distribution.
 2. Each question's volume is encoded once per pass and its image embeddings are shared by its G rows: once without
    gradients for sampling, once by the reference, once with gradients in the policy pass (the encoder trains). The
    first policy pass, detached, is the "old" policy (mu = 1: ratio = 1, exactly on-policy).
 3. The loss mask runs from the first completion token up to and including the first EOS, built from lengths, never
    from token values. A completion that hits --max-new-tokens without EOS is "truncated": format reward 0, counted.
    (So is one that samples the image placeholder: it is cut there, since it cannot be scored as text.)
 4. Advantages are group-normalised, (r - mean_G) / (std_G + 1e-4); a group whose rewards are all equal gets
    exactly zero advantages (it teaches nothing and is counted in the logs as zero-std).
 5. Loss = PPO-clipped surrogate + beta * k3 KL to the reference, masked, averaged per sequence then over the batch.
    With one policy iteration (mu = 1, the default) ratio = 1, so the loss value hovers near 0: watch the rewards.
 6. The reference model is the SFT checkpoint in eval mode. With --preset real the whole policy is trained (ViT,
    bridge, LLM; the RAM anchor is a frozen buffer), as the official code does; the phantom preset keeps the ViT
    frozen (--freeze-encoder / --no-freeze-encoder override either). The bridge standardises the ViT's tokens by
    their spread over the training scans (sft.py choice 8), which on the phantom world is as small as 0.01 for some
    channels, so a small change of the ViT is a large change of the bridge's input: with the ViT trained, the KL to
    the reference climbed to 0.35 by step 30 even at lr 1e-5 and validation accuracy fell (0.36 -> 0.32).
 7. Consistency reward: the <think> text against the scan's radiology report, discretised into levels. Scorers:
    `offline` (default, a deterministic clinical-term scorer, no model), `rm:PATH` (a local sequence-classification
    reward model such as RM-Mistral-7B, SPEC §6 thresholds), `judge:MODEL` (an OpenAI-compatible endpoint; a failed
    call fails the step, or with --judge-failures exclude its group is left out of the loss and counted).
 8. Raw DDP: each rank rolls out whole groups, all its questions in one batched generate call (the phantom run:
    252 s instead of 457 s with one call per question); each question samples from its own generator seeded by
    (seed, step, question), so 1 and N ranks draw the same completions (up to float noise from the padding); the
    finite check is agreed by all ranks; --resume restores model, optimizer, data position and RNGs, so a resumed
    run replays the uninterrupted one exactly.

Run (needs the SFT checkpoint, runs/sft/vlm from `python sft.py`):
    python grpo.py                                   # 1 CPU (or 1 GPU when present): phantom world, ~3 min on 2 cores
    python grpo.py --preset real --data-root /data/ct-rate-cache --sft runs/sft/vlm          # 1 GPU, paper settings
    torchrun --standalone --nproc_per_node 8 grpo.py --preset real --data-root /data/ct-rate-cache   # 8 GPUs
Phantom defaults (DEFAULTS) differ from the paper's: the tiny phantom LLM needs an lr above the paper's 1e-6 (which
is for a 3B LLM) to move within minutes (1e-5 for 120 steps with the ViT frozen; measured on the 2.7 M-parameter LLM,
validation accuracy 0.385 -> 0.43; with 160 steps 0.43 and 0.45 with seeds 0 and 1, 0.41 at 5e-6, 0.385 and 0.44 at
2e-5; on the earlier 3.4 M-parameter LLM 2e-5 gave 0.36 -> 0.48, 4e-5 fell to 0.22-0.28, and at 1e-4 the KL passed
0.5 and the rationale collapsed to chance), its answers are short (96 new tokens), it samples at temperature 0.7
because at 1.0 half of its samples break the tag format, and it validates every 40 steps (a pass over the 91
questions takes about 4 s).
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model
from model import (SigtermFlag, all_ranks_finite, all_reduce, any_rank, cleanup_distributed, cosine_lr, get_rank,
                   latest_train_state, print0, rng_state, save_train_state, seed_everything, set_rng_state,
                   setup_distributed, world_size)

# =====================================================================================================================
# Rewards: pure functions of (completion text, example)
# =====================================================================================================================

TAG = re.compile(r"</?[A-Za-z_|][^<>\s]*>")            # any tag-like token: <think>, </answer>, <finding>, <|im_end|>
BLOCK = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def format_reward(completion: str) -> float:
    """1.0 iff exactly one non-empty <think> block, then exactly one non-empty <answer> block, no other tags,
    nothing but white space outside them."""
    m = BLOCK.fullmatch(completion)
    return float(m is not None and all(part.strip() and not TAG.search(part) for part in m.groups()))


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def parse_answer(completion: str, letters: str = "ABCD", options: dict | None = None) -> str | None:
    """The chosen option letter, or None. Shared with evaluate.py.

    Reads the single <answer> block (several blocks -> None); without any answer tag, what is left outside a <think>
    block. Accepts case, spaces, brackets ("c", " (C) ", "[C]", "C)") and a trailing option text ("C) Pleural
    effusion"), which must match options[letter] when `options` is given and may never name another option letter
    ("A or B", "B, C" -> None).
    """
    if "<answer>" in completion or "</answer>" in completion:
        blocks = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
        if len(blocks) != 1 or completion.count("<answer>") != 1:
            return None
        text = blocks[0]
    else:                                                     # no answer tags: what is left outside <think>
        text = TAG.sub(" ", re.sub(r"<think>.*?</think>", " ", completion, flags=re.DOTALL))
    m = re.fullmatch(rf"\s*[(\[]?\s*([{letters}])\s*[)\].:]?\s*(.*?)\s*", text, re.DOTALL | re.IGNORECASE)
    if m is None:
        return None
    letter, rest = m.group(1).upper(), m.group(2)
    if rest:
        if text[m.end(1)] not in " \t\n)].:-":
            return None                                       # "AB", "B, C", "Cardiomegaly": not a lone letter
        if options is not None:                               # trailing text must be this letter's option
            return letter if _norm(rest) == _norm(options.get(letter, "")) else None
        if re.search(rf"(?<![A-Za-z])[{letters}](?![A-Za-z])", rest, re.IGNORECASE):
            return None                                       # "A or B": another option letter
    return letter


def accuracy_reward(completion: str, answer: str, options: dict | None = None) -> float:
    """1.0 iff the single <answer> block names exactly one option letter and it is `answer`; else 0.0."""
    if "<answer>" not in completion:
        return 0.0
    return float(parse_answer(completion, options=options) == answer.strip().upper())


# --------------------------------------------------------------------------------------------------------------------
# Consistency reward (paper §3.3): does the <think> rationale agree with the scan's radiology report?
# --------------------------------------------------------------------------------------------------------------------

# Clinical terms for the 18 CT-RATE abnormalities (data.ABNORMALITIES order). Each name also matches itself.
TERMS = {
    "Medical material": [r"medical material", r"catheter", r"pacemaker", r"stent", r"prosthe\w*", r"surgical clips?"],
    "Arterial wall calcification": [r"arterial wall calcification", r"aortic (?:wall )?calcification", r"atheroscl\w*"],
    "Cardiomegaly": [r"cardiomegaly", r"enlarged heart", r"heart is enlarged"],
    "Pericardial effusion": [r"pericardial effusion", r"pericardial fluid"],
    "Coronary artery wall calcification": [r"coronary (?:artery )?(?:wall )?calcifications?"],
    "Hiatal hernia": [r"hiatal hernia", r"hiatus hernia"],
    "Lymphadenopathy": [r"lymphadenopathy", r"enlarged (?:\w+ )?lymph nodes?"],
    "Emphysema": [r"emphysema\w*"],
    "Atelectasis": [r"atelectasis", r"atelectatic"],
    "Lung nodule": [r"(?:lung |pulmonary )?nodules?", r"nodular"],
    "Lung opacity": [r"(?:lung |pulmonary )?opacit(?:y|ies)", r"ground[- ]glass"],
    "Pulmonary fibrotic sequela": [r"(?:pulmonary )?fibrotic sequelae?", r"fibrosis", r"fibrotic"],
    "Pleural effusion": [r"pleural effusions?", r"pleural fluid"],
    "Mosaic attenuation pattern": [r"mosaic attenuation(?: pattern)?"],
    "Peribronchial thickening": [r"peribronchial (?:wall )?thickening", r"bronchial wall thickening"],
    "Consolidation": [r"consolidations?", r"consolidated"],
    "Bronchiectasis": [r"bronchiectasis", r"bronchiectatic"],
    "Interlobular septal thickening": [r"(?:interlobular )?septal thickening"],
}
TERM_RE = {name: re.compile(r"\b(?:" + "|".join(pats) + r")\b", re.IGNORECASE) for name, pats in TERMS.items()}
NEG_BEFORE = re.compile(r"\b(?:no|not|without|absence of|absent|negative for|free of|neither|nor|rule out|ruled out)\b",
                        re.IGNORECASE)
NEG_AFTER = re.compile(r"^[^.;]*?\b(?:not (?:seen|present|detected|observed|identified|shown)|absent|ruled out)\b",
                       re.IGNORECASE)
CLAUSE = re.compile(r"[.;!?\n]+|\bbut\b|\bhowever\b|\bwhereas\b|\bwhile\b", re.IGNORECASE)


def clinical_stances(text: str) -> dict[str, str]:
    """{abnormality: "affirm" | "deny" | "both"} for each of the 18 abnormalities the text mentions.

    A mention is denied when a negation cue precedes it in its clause ("no pleural effusion") or a post-negation
    follows it ("pleural effusion is not seen"); clauses are split at sentence ends and at but/however/whereas/while.
    """
    stance: dict[str, set] = {}
    for clause in CLAUSE.split(text):
        spans = sorted((m.start(), m.end(), name) for name, rx in TERM_RE.items() for m in rx.finditer(clause))
        taken = -1
        for start, end, name in spans:
            if start < taken:                                # "coronary artery wall calcification" is not also
                continue                                     # an "arterial wall calcification" mention
            taken = end
            denied = bool(NEG_BEFORE.search(clause[:start])) or bool(NEG_AFTER.match(clause[end:]))
            stance.setdefault(name, set()).add("deny" if denied else "affirm")
    return {name: s.pop() if len(s) == 1 else "both" for name, s in stance.items()}


def offline_consistency(think: str, report: str) -> float:
    """Raw consistency in [0, 1]: mentioned-and-agreeing abnormalities / (abnormalities the rationale mentions plus
    those the report affirms). Agreeing = the rationale affirms what the report affirms or denies what it does not.
    A rationale with no clinical terms scores 0."""
    said = clinical_stances(think)
    if not said:
        return 0.0
    report_affirms = {n for n, s in clinical_stances(report).items() if s != "deny"}
    agree = sum((s == "affirm" and n in report_affirms) or (s == "deny" and n not in report_affirms)
                for n, s in said.items())
    return agree / len(set(said) | report_affirms)


def discretise(score: float, thresholds: list[float], levels: list[float]) -> float:
    """levels[i] where i = how many thresholds are <= score (SPEC §6: s<0 -> 0, <0.2 -> 0.2, ..., else 1.0)."""
    assert len(levels) == len(thresholds) + 1
    return levels[bisect.bisect_right(thresholds, score)]


CON_DEFAULTS = {  # scorer -> (thresholds, levels)
    "offline": ([0.25, 0.5, 1.0], [0.0, 0.5, 0.8, 1.0]),
    "rm": ([0.0, 0.2, 0.5, 1.0, 1.6], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),          # SPEC §6, RM-Mistral-7B raw scores
    "judge": ([0.25, 0.5, 1.0], [0.0, 0.5, 0.8, 1.0]),                            # judge grade / 10
}
RM_QUESTION = "Radiology report of this chest CT:\n{report}\n\nExplain, step by step, what the CT shows."
JUDGE_PROMPT = ("You grade a model's diagnostic reasoning about a chest CT against the radiologist's report.\n"
                "Report:\n{report}\n\nReasoning:\n{think}\n\nHow consistent is the reasoning with the report? "
                "Reply with one integer from 0 (contradicts it) to 10 (fully consistent), nothing else.")


def think_text(completion: str) -> str:
    m = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    return m.group(1).strip() if m else ""


def make_consistency_scorer(spec: str, thresholds: list[float] | None = None, levels: list[float] | None = None,
                            device: str | torch.device = "cpu", judge_failures: str = "fail",
                            client=None) -> Callable[[list[str], list[str]], list[float]]:
    """Build `score(thinks, reports) -> levels` for --consistency offline | rm:PATH | judge:MODEL.

    A completion without a <think> text scores 0 without consulting any model. A judge call that fails or does not
    return an integer raises (judge_failures="fail") or yields NaN (="exclude"; the trainer drops that group)."""
    kind, _, arg = spec.partition(":")
    if kind not in CON_DEFAULTS:
        raise ValueError(f"--consistency {spec!r}: use offline, rm:PATH or judge:MODEL")
    thresholds = thresholds if thresholds is not None else CON_DEFAULTS[kind][0]
    levels = levels if levels is not None else CON_DEFAULTS[kind][1]

    if kind == "offline":
        raw = lambda thinks, reports: [offline_consistency(t, r) for t, r in zip(thinks, reports)]
    elif kind == "rm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(arg)
        rm = AutoModelForSequenceClassification.from_pretrained(arg, num_labels=1).to(device).eval()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        rm.config.pad_token_id = tok.pad_token_id

        @torch.no_grad()
        def raw(thinks, reports):
            texts = [tok.apply_chat_template([{"role": "user", "content": RM_QUESTION.format(report=r)},
                                              {"role": "assistant", "content": t}], tokenize=False)
                     if tok.chat_template else RM_QUESTION.format(report=r) + "\n" + t for t, r in zip(thinks, reports)]
            batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=4096).to(device)
            return rm(**batch).logits[:, 0].float().tolist()
    else:
        if client is None:
            import openai
            client = openai.OpenAI(base_url=os.environ.get("OPENAI_BASE_URL"), api_key=os.environ.get("OPENAI_API_KEY"))

        def judge_one(think: str, report: str) -> float:
            try:
                reply = client.chat.completions.create(model=arg, temperature=0.0, max_tokens=8, messages=[
                    {"role": "user", "content": JUDGE_PROMPT.format(report=report, think=think)}])
                grade = int(reply.choices[0].message.content.strip())
                if not 0 <= grade <= 10:
                    raise ValueError(f"grade {grade} outside 0..10")
                return grade / 10
            except Exception as err:
                if judge_failures == "fail":
                    raise RuntimeError(f"consistency judge {arg!r} failed: {err}") from err
                return math.nan
        raw = lambda thinks, reports: [judge_one(t, r) for t, r in zip(thinks, reports)]

    def score(thinks: list[str], reports: list[str]) -> list[float]:
        out = [0.0] * len(thinks)
        todo = [i for i, t in enumerate(thinks) if t.strip()]
        if todo:
            for i, s in zip(todo, raw([thinks[i] for i in todo], [reports[i] for i in todo])):
                out[i] = s if math.isnan(s) else discretise(s, thresholds, levels)
        return out
    return score


# =====================================================================================================================
# GRPO: advantages and loss
# =====================================================================================================================

def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean_G) / (std_G + eps) per group of G consecutive rows; exactly 0 for a group whose rewards are equal."""
    r = rewards.view(-1, group_size)                                   # (B, G)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)
    adv = torch.where((r == r[:, :1]).all(1, keepdim=True), torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_beta: float = 0.04,
              reduction: str = "sequence") -> tuple[torch.Tensor, dict]:
    """PPO-clipped GRPO objective with the k3 KL penalty. logp/old_logp/ref_logp/mask: (B, T); advantages: (B,).

    Per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + beta * (exp(ref - logp) - (ref - logp) - 1).
    Masked, averaged over each sequence's tokens then over the batch ("sequence", SPEC §6) or over all tokens ("token").
    """
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1)                                      # (B, 1)
    ratio = torch.exp(logp - old_logp)                                 # (B, T)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ratio_ref = ref_logp - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1                  # k3 estimator of KL(pi || pi_ref), >= 0
    per_token = -surrogate + kl_beta * kl                              # (B, T)

    def masked_mean(x):
        if reduction == "token":
            return (x * mask).sum() / mask.sum().clamp(min=1)
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats = {"kl": masked_mean(kl.detach()).item(), "clip_frac": masked_mean(clipped.to(mask.dtype)).item()}
    return masked_mean(per_token), stats


# =====================================================================================================================
# Training
# =====================================================================================================================

DEFAULTS = {  # --preset: the paper's settings (SPEC §6; lr 1e-6 is for a 3B LLM) or the phantom world's tiny LLM
    "real": dict(lr=1e-6, steps=1000, batch_size=2, max_new_tokens=512, temperature=1.0, eval_n=500,
                 freeze_encoder=False, eval_every=10),
    "phantom": dict(lr=1e-5, steps=120, batch_size=4, max_new_tokens=96, temperature=0.7, eval_n=100,
                    freeze_encoder=True, eval_every=40),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data and checkpoints
    p.add_argument("--preset", choices=["phantom", "real"], default="phantom", help="phantom world or CT-RATE defaults")
    p.add_argument("--data-root", default="runs/phantom", help="phantom root (built if absent) or real data root")
    p.add_argument("--sft", default="runs/sft/vlm", help="SFT checkpoint: the initial policy and the frozen reference")
    p.add_argument("--out", default="runs/grpo", help="output root: vlm/, ckpt/, metrics.jsonl")
    # rewards
    p.add_argument("--consistency", default="offline", help="offline | rm:PATH | judge:MODEL (OPENAI_BASE_URL/_API_KEY)")
    p.add_argument("--con-thresholds", type=float, nargs="+", default=None, help="raw-score thresholds of the levels")
    p.add_argument("--con-levels", type=float, nargs="+", default=None, help="one more level than thresholds")
    p.add_argument("--judge-failures", default="fail", choices=["fail", "exclude"],
                   help="a failed judge call stops the run, or its group is left out of the loss and counted")
    # GRPO (None = the preset's default)
    p.add_argument("--group-size", type=int, default=4, help="G completions per question")
    p.add_argument("--batch-size", type=int, default=None, help="questions per rank and step")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature = scoring temperature")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--kl-beta", type=float, default=0.04)
    p.add_argument("--mu", type=int, default=1, help="policy iterations per rollout batch")
    p.add_argument("--loss-reduction", default="sequence", choices=["sequence", "token"])
    # optimisation
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup-frac", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the ViT frozen (default: real trains the whole model, phantom freezes the ViT)")
    # validation, robustness, bookkeeping
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between validation MMVQA accuracies (default: real 10, phantom 40); 0 = off")
    p.add_argument("--eval-n", type=int, default=None, help="validation questions (the first n of the file)")
    p.add_argument("--nan-policy", default="skip", choices=["skip", "stop"], help="on a non-finite loss, on all ranks")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under <out>/ckpt")
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--stop-at", type=int, default=None, help="save and exit after this step (time-boxed jobs, tests)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.group_size < 2:
        p.error("--group-size must be at least 2: advantages compare the samples of a group")
    for k, v in DEFAULTS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def data_paths(args, world: int) -> dict:
    """RL questions, training cache and reports, validation questions and cache."""
    if args.preset == "phantom":
        if get_rank() == 0:  # an existing world keeps its size (e.g. the tests' small one)
            data.ensure_phantom(args.data_root)
        if world > 1:
            torch.distributed.barrier()
        return data.ensure_phantom(args.data_root)
    root = Path(args.data_root)  # real CT-RATE: `python data.py preprocess / label / mmvqa` wrote these
    return dict(train_cache=root / "cache/train", valid_cache=root / "cache/valid", mmvqa_rl=root / "mmvqa/train_rl.json",
                mmvqa_valid=root / "mmvqa/valid.json",
                train_reports=root / "dataset/radiology_text_reports/train_reports.csv")


def sample_seed(seed: int, step: int, question: int) -> int:
    """A question's sampling generator depends on (seed, step, question) only: the same samples on any number of
    ranks, and a resumed run replays the uninterrupted one."""
    return (seed * 1_000_003 + step) * 1_000_033 + question


class PolicyLogprobs(torch.nn.Module):
    """Encode each question's volume once, share its image embeddings with the G rows, return completion log-probs.
    Every trainable parameter is used inside this one forward (what DDP needs)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, volumes, input_ids, attention_mask, group_size: int, completion_len: int, temperature: float):
        image = self.vlm.image_embeds(volumes).repeat_interleave(group_size, 0)       # (Q*G, N_img, D)
        return self.vlm.token_logprobs(input_ids, attention_mask, image, temperature, last=completion_len)


def completion_mask(completion: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor, image_token_id: int,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) loss mask from the lengths: 1 up to and including the first EOS. A completion that sampled the image
    placeholder is cut before it (it cannot be scored as text: the model would splice an image embedding there)
    and counts as truncated. Returns the completion (padded after the cut), lengths, finished and the mask."""
    placeholder = completion == image_token_id
    cut = torch.where(placeholder.any(1), placeholder.int().argmax(1), lengths)
    finished, lengths = finished & ~placeholder.any(1), torch.minimum(lengths, cut)
    mask = (torch.arange(completion.shape[1], device=completion.device)[None] < lengths[:, None]).float()
    return completion.masked_fill(mask == 0, pad_id), lengths, finished, mask


def decode(tokenizer, ids: torch.Tensor, lengths: torch.Tensor, finished: torch.Tensor) -> list[str]:
    """Each completion up to its first EOS (excluded); special tokens kept, so that stray tags stay visible."""
    return [tokenizer.decode(row[:n - int(f)].tolist(), skip_special_tokens=False)
            for row, n, f in zip(ids, lengths.tolist(), finished.tolist())]


def load_volumes(volumes, questions: list[dict]) -> torch.Tensor:
    return torch.stack([data.online_transform(volumes.load(q["VolumeName"]), volumes.preset) for q in questions])


@torch.no_grad()
def validate(vlm, questions: list[dict], volumes, max_new_tokens: int, batch: int = 16) -> dict:
    """Greedy MMVQA accuracy (grpo.parse_answer, as evaluate.py) and format rate; each rank a share, summed."""
    mine, counts = questions[get_rank()::world_size()], torch.zeros(3, dtype=torch.float64, device=vlm.device)
    for i in range(0, len(mine), batch):
        chunk = mine[i:i + batch]
        ids, mask = vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=True)) for q in chunk])
        image = vlm.image_embeds(load_volumes(volumes, chunk).to(vlm.device))
        out, lengths, finished = vlm.generate(ids, mask, image, max_new_tokens=max_new_tokens, temperature=0.0)
        for text, done, q in zip(decode(vlm.tokenizer, out, lengths, finished), finished.tolist(), chunk):
            counts += torch.tensor([parse_answer(text, options=q["options"]) == q["answer"],
                                    format_reward(text) * done, 1.0], dtype=torch.float64, device=vlm.device)
    correct, formatted, n = all_reduce(counts, "sum").tolist()
    return {"val_acc": correct / max(n, 1), "val_format": formatted / max(n, 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (Path(args.sft) / "config.json").is_file():
        raise SystemExit(f"{args.sft} is missing: run `python sft.py` first (or pass --sft)")
    rank, local_rank, world, device = setup_distributed()
    out, G = Path(args.out), args.group_size

    # ---- data -----------------------------------------------------------------------------------------------------
    paths = data_paths(args, world)
    volumes, val_volumes = data.VolumeCache(paths["train_cache"]), data.VolumeCache(paths["valid_cache"])
    questions = [q for q in json.loads(Path(paths["mmvqa_rl"]).read_text()) if q["VolumeName"] in volumes]
    val_questions = [q for q in json.loads(Path(paths["mmvqa_valid"]).read_text())
                     if q["VolumeName"] in val_volumes][:args.eval_n]
    reports = {name: " ".join(s for s in (r["findings"], r["impressions"]) if s)
               for name, r in data.read_reports(paths["train_reports"]).items()}
    consistency = make_consistency_scorer(args.consistency, args.con_thresholds, args.con_levels, device,
                                          args.judge_failures)

    # ---- policy and frozen reference, both from the SFT checkpoint -----------------------------------------------
    seed_everything(args.seed)
    vlm = model.VLM.load(args.sft, device=device).eval()     # eval: no dropout, sampled = trained distribution
    ref = model.VLM.load(args.sft, device=device).eval().requires_grad_(False)
    vlm.set_trainable(vit=not args.freeze_encoder, bridge=True, llm=True)   # the RAM anchor is a buffer: frozen
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    net = PolicyLogprobs(vlm)
    ddp = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else None
    print0(f"{len(questions)} RL questions, {len(val_questions)} validation questions, "
           f"{sum(p.numel() for p in trainable):,} trainable parameters, world {world}, G {G}")

    # ---- optimizer, data order, resume ----------------------------------------------------------------------------
    global_batch = args.batch_size * world
    steps_per_epoch = len(questions) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(questions)} RL questions < one global batch of {global_batch}")
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    start, state = 0, latest_train_state(out / "ckpt") if args.resume else None
    if state is not None:
        vlm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank])
        start = state["step"]
        print0(f"resumed from step {start}")

    def save(step: int) -> None:
        rngs = [rng_state()] * world                             # every rank's RNG state, gathered on rank 0
        if world > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        if rank == 0:
            save_train_state(out / "ckpt", step, {"step": step, "model": vlm.state_dict(), "rng": rngs,
                                                  "optimizer": optimizer.state_dict(), "args": vars(args)})

    def my_questions(step: int) -> list[int]:
        """This rank's question indices at `step`: a seeded permutation per epoch, cut into global batches."""
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(questions), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        return perm[k * global_batch:(k + 1) * global_batch][rank::world].tolist()

    sigterm = SigtermFlag()
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    history, skipped, t0 = [], 0, time.time()

    def log_row(row: dict) -> None:
        history.append(row)
        if rank == 0:
            log.write(json.dumps(row) + "\n")
            log.flush()

    if start == 0 and args.eval_every:
        log_row({"step": 0, **validate(vlm, val_questions, val_volumes, args.max_new_tokens)})
        print0(f"step 0 (SFT model): validation accuracy {history[-1]['val_acc']:.3f}, "
               f"format {history[-1]['val_format']:.3f}")
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, desc="grpo")

    # ---- the loop -------------------------------------------------------------------------------------------------
    for step in range(start, args.steps):
        lr = cosine_lr(step, args.steps, int(args.warmup_frac * args.steps), args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = my_questions(step)
        qs = [questions[i] for i in idx]
        x = load_volumes(volumes, qs).to(device)                                    # (Q, 1, X, Y, Z)
        prompt_ids, prompt_mask = vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=True)) for q in qs])  # (Q, P)

        # 1. rollout: G samples per question from the current policy, each question with its own generator
        with torch.no_grad():
            image = vlm.image_embeds(x)                                             # (Q, N_img, D), once per volume
            completion, lengths, finished = vlm.generate(                           # (Q*G, T), (Q*G,), (Q*G,)
                prompt_ids, prompt_mask, image, num_samples=G, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                generator=[torch.Generator(device).manual_seed(sample_seed(args.seed, step, i)) for i in idx])
        completion, lengths, finished, mask = completion_mask(completion, lengths, finished, vlm.image_token_id,
                                                              vlm.pad_token_id)  # (Q*G, T): through the first EOS
        T = completion.shape[1]
        input_ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion], 1)  # (Q*G, P + T), ids as generated
        attention_mask = torch.cat([prompt_mask.repeat_interleave(G, 0), mask.long()], 1)

        # 2. rewards, r = r_fmt + r_acc + r_con (paper §3.3); a truncated completion earns no format reward
        texts = decode(vlm.tokenizer, completion, lengths, finished)
        row_q = [q for q in qs for _ in range(G)]
        r_fmt = torch.tensor([format_reward(t) * f for t, f in zip(texts, finished.tolist())])
        r_acc = torch.tensor([accuracy_reward(t, q["answer"], q["options"]) for t, q in zip(texts, row_q)])
        r_con = torch.tensor(consistency([think_text(t) for t in texts], [reports[q["VolumeName"]] for q in row_q]))
        rewards = r_fmt + r_acc + r_con                                             # (Q*G,)

        # 3. group-normalised advantages; a group holding an excluded (NaN) judge score is left out of the loss
        excluded = rewards.view(-1, G).isnan().any(1).repeat_interleave(G).to(device)
        advantages = group_advantages(torch.nan_to_num(rewards), G).to(device)
        mask = mask * ~excluded[:, None]

        # 4. loss and update: old = the rollout policy, ref = the SFT model, neither with gradients
        with torch.no_grad():
            ref_image = ref.image_embeds(x).repeat_interleave(G, 0)
            ref_logp = ref.token_logprobs(input_ids, attention_mask, ref_image, args.temperature, last=T)
        old_logp = None
        for _ in range(args.mu):
            logp = (ddp or net)(x, input_ids, attention_mask, G, T, args.temperature)   # (Q*G, T)
            old_logp = logp.detach() if old_logp is None else old_logp                  # mu = 1: ratio = 1
            loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, args.clip_eps, args.kl_beta,
                                    args.loss_reduction)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip if args.grad_clip > 0 else math.inf)
            if all_ranks_finite(loss.detach(), grad_norm):
                optimizer.step()
            elif args.nan_policy == "stop":
                raise SystemExit(f"non-finite loss or gradient at step {step} on some rank (--nan-policy stop)")
            else:
                skipped += 1
                print(f"[rank {rank}] non-finite loss at step {step}: update skipped on every rank", flush=True)
            optimizer.zero_grad(set_to_none=True)

        # 5. log: sums over ranks, then means (the loss itself hovers near 0 with mu = 1; watch the rewards)
        groups = torch.nan_to_num(rewards).view(-1, G)
        sums = all_reduce(torch.tensor([
            r_fmt.sum(), r_acc.sum(), torch.nan_to_num(r_con).sum(), groups.sum(), groups.std(1).sum(),
            (groups == groups[:, :1]).all(1).sum(), lengths.sum(), (~finished).sum(), excluded.sum(), len(texts),
            len(groups), stats["kl"], stats["clip_frac"], loss.item()], dtype=torch.float64, device=device), "sum")
        s = dict(zip(["r_fmt", "r_acc", "r_con", "reward", "reward_std", "zero_std_frac", "completion_len",
                      "truncated", "excluded", "n", "groups", "kl", "clip_frac", "loss"], sums.tolist()))
        done = step + 1
        row = {"step": done, **{k: s[k] / s["n"] for k in ("reward", "r_fmt", "r_acc", "r_con", "completion_len",
                                                            "truncated", "excluded")},
               "reward_std": s["reward_std"] / s["groups"], "zero_std_frac": s["zero_std_frac"] / s["groups"],
               **{k: s[k] / world for k in ("kl", "clip_frac", "loss")}, "grad_norm": grad_norm.item(), "lr": lr,
               "skipped": skipped, "sec": round(time.time() - t0, 1), "sample": texts[0]}
        if args.eval_every and (done % args.eval_every == 0 or done == args.steps):
            row.update(validate(vlm, val_questions, val_volumes, args.max_new_tokens))
            print0(f"\nstep {done}: validation accuracy {row['val_acc']:.3f}, format {row['val_format']:.3f}; "
                   f"sample {texts[0]!r}")
        log_row(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['r_acc']:.2f}", fmt=f"{row['r_fmt']:.2f}",
                        kl=f"{row['kl']:.3f}")
        if any_rank(sigterm.raised, device) or done == args.stop_at:
            save(done)
            print0(f"saved a resumable checkpoint at step {done}; continue with --resume")
            cleanup_distributed()
            return {"history": history, "step": done, "interrupted": True, "vlm": vlm}
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done)
    bar.close()

    # ---- output: a self-contained checkpoint (evaluate.py reads it); the run config goes into its meta ------------
    if rank == 0:
        final = {k: v for k, v in history[-1].items() if k != "sample"} if history else {}
        vlm.save(out / "vlm", meta={"stage": "grpo", "args": vars(args), "skipped_steps": skipped, "final": final,
                                    "sft": vlm.config.get("meta", {})})
        print0(f"wrote {out / 'vlm'}")
    cleanup_distributed()
    return {"history": history, "step": args.steps, "interrupted": False, "vlm": vlm}


if __name__ == "__main__":
    main()
