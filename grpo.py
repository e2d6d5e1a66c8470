"""Med3D-R1 stage 2: GRPO on multiple-choice CT questions (MMVQA) with format, accuracy and consistency rewards.

The SFT model reads a CT volume and a four-option question, reasons inside one <think>…</think> block and answers one
letter inside one <answer>…</answer> block. Each completion earns r = r_fmt + r_acc + r_con (paper §3.3); the policy
is trained with group-normalised advantages, a PPO-clipped surrogate and a k3 KL penalty to a frozen reference.

Deliberate choices:
1. G completions per question by plain temperature sampling, kept as generated ids (never decoded and re-tokenised)
   and scored at the same temperature, so the sampled and the trained distributions agree. Each question samples
   from its own generator seeded by (seed, step, question): 1 and N ranks draw the same completions (float noise aside).
2. The loss mask runs through the first EOS, built from lengths, never from token values. A completion without EOS
   within --max-new-tokens is truncated (no format reward, counted); a prompt over --max-prompt-len stops the run.
3. Advantages (r - mean_G) / (std_G + 1e-4); a group whose rewards are all equal gets exactly zero advantages.
4. Loss = PPO-clipped surrogate + beta * k3 KL to the reference, masked, averaged per sequence then over the batch.
   With one policy iteration (mu = 1) the ratio is 1 and the loss hovers near 0: watch the rewards.
5. The reference is the SFT checkpoint, frozen. The paper trains the whole policy (ViT, bridge, LLM; the RAM anchor
   stays a frozen buffer); the phantom preset freezes the ViT (--freeze-encoder).
6. r_con: the <think> text against the scan's report, in levels, by `offline` (a deterministic clinical-term scorer, the
   default), `rm:PATH` (a local reward model, the paper's RM-Mistral-7B) or `judge:MODEL` (an OpenAI-compatible
   endpoint; a failed call stops the run, or with --judge-failures exclude leaves its group out of the loss, counted).
7. CUDA: bf16 autocast, fp32 master weights for the policy (AdamW's updates at lr 1e-6 would round away in bf16), the
   reference's LLM matmul weights (VLM.freeze: it scores as the policy at step 0) and an rm: model in bf16; CPU: fp32.
   --micro-batch N: policy, reference and old-policy passes of N rows, weighted to one pass's update; --grad-ckpt.
8. --shard fsdp: FSDP2 shards the policy, its gradients and AdamW state by ViT block and LLM layer, not the reference.

Run:
  python grpo.py                                          # 1 CPU, phantom world (needs runs/sft/vlm)
  python grpo.py --preset real --data-root /data/ct-rate --sft runs/sft/vlm            # 1 GPU
  torchrun --standalone --nproc_per_node 8 grpo.py --preset real --data-root /data/ct-rate --shard fsdp   # 8 GPUs
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import data
import model
import runtime
from data import parse_answer, think_text
from runtime import all_reduce, at_least, autocast, get_rank, print0, world_size

# ==== Rewards: pure functions of (completion text, example) ===========================================================
def format_reward(completion: str) -> float:
    """r_fmt: 1.0 iff exactly one non-empty <think> block, then exactly one non-empty <answer> block, no other tags,
    nothing but white space outside them (data.well_formed)."""
    return float(data.well_formed(completion))


def answer_only_reward(completion: str) -> float:
    """r_fmt of a prompt asked without <think>: 1.0 iff the completion is one non-empty <answer> block alone."""
    m = re.fullmatch(r"\s*<answer>([^<>]*)</answer>\s*", completion)   # one group: linear time on any completion
    return float(m is not None and m.group(1).strip() != "")


def accuracy_reward(completion: str, answer: str, options: dict | None = None) -> float:
    """1.0 iff the single <answer> block names exactly one option letter and it is `answer`; else 0.0."""
    return float("<answer>" in completion and parse_answer(completion, options=options) == answer.strip().upper())


# ---- Consistency reward (paper §3.3): does the <think> rationale agree with the scan's radiology report? -------------
def offline_consistency(think: str, report: str) -> float:
    """Raw consistency in [0, 1], the F1 of precision (the rationale's stances that agree with the report: affirming
    what it affirms, denying what it does not) and recall (the report's affirmed abnormalities the rationale affirms, 1
    if it affirms none): a list of denials earns nothing against a report that affirms a finding. No clinical term: 0"""
    said = data.clinical_stances(think)
    if not said:
        return 0.0
    report_affirms = {n for n, s in data.clinical_stances(report).items() if s != "deny"}
    agree = sum((s == "affirm" and n in report_affirms) or (s == "deny" and n not in report_affirms)
                for n, s in said.items())
    found = sum(s == "affirm" and n in report_affirms for n, s in said.items())
    precision, recall = agree / len(said), found / len(report_affirms) if report_affirms else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def discretise(score: float, thresholds: list[float], levels: list[float]) -> float:
    """levels[i] where i = how many thresholds are <= score (for the RM: s<0 -> 0, <0.2 -> 0.2, ..., else 1.0)."""
    return levels[sum(t <= score for t in thresholds)]


CON_DEFAULTS = {  # scorer -> (thresholds, levels): the paper's example levels (§3.3), our thresholds
    "offline": ([0.25, 0.5, 1.0], [0.0, 0.5, 0.8, 1.0]),
    "rm": ([0.0, 0.2, 0.5, 1.0, 1.6], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),   # the official code's, on RM-Mistral-7B's score
    "judge": ([0.25, 0.5, 1.0], [0.0, 0.5, 0.8, 1.0]),                    # on the judge's grade / 10
}
RM_QUESTION = "Radiology report of this chest CT:\n{report}\n\nExplain, step by step, what the CT shows."
JUDGE_PROMPT = ("You grade a model's diagnostic reasoning about a chest CT against the radiologist's report.\n"
                "Report:\n{report}\n\nReasoning:\n{think}\n\nHow consistent is the reasoning with the report? "
                "Reply with one integer from 0 (contradicts it) to 10 (fully consistent), nothing else.")


def make_consistency_scorer(spec: str, thresholds: list[float] | None = None, levels: list[float] | None = None,
                            device: str | torch.device = "cpu",
                            judge_failures: str = "fail") -> Callable[[list[str], list[str]], list[float]]:
    """Build `score(thinks, reports) -> levels` for --consistency offline | rm:PATH | judge:MODEL | none. A completion
    without a <think> text scores 0 without consulting any model; a judge call that fails or does not return an
    integer raises (judge_failures="fail") or yields NaN (="exclude"; the trainer drops that group)."""
    if spec == "none":                                   # r_con = 0: the ablation without the consistency reward
        if thresholds is not None or levels is not None:  # never ignored silently
            raise ValueError("--con-thresholds and --con-levels grade a scorer's output: --consistency none has none")
        return lambda thinks, reports: [0.0] * len(thinks)
    kind, _, arg = spec.partition(":")
    if kind not in CON_DEFAULTS:
        raise ValueError(f"--consistency {spec!r}: use offline, rm:PATH or judge:MODEL")
    thresholds = thresholds if thresholds is not None else CON_DEFAULTS[kind][0]
    levels = levels if levels is not None else CON_DEFAULTS[kind][1]
    if len(levels) != len(thresholds) + 1 or list(thresholds) != sorted(thresholds):
        raise ValueError(f"--con-thresholds {thresholds} must ascend and be one fewer than --con-levels {levels}")

    if kind == "offline":
        raw = lambda thinks, reports: [offline_consistency(t, r) for t, r in zip(thinks, reports)]
    elif kind == "rm":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        runtime.local_dir(arg, "--consistency rm:")
        tok = AutoTokenizer.from_pretrained(arg, local_files_only=True)
        rm = AutoModelForSequenceClassification.from_pretrained(  # frozen: bf16 on CUDA (choice 7)
            arg, num_labels=1, dtype=runtime.compute_dtype(device), local_files_only=True).to(device).eval()
        tok.pad_token = tok.pad_token or tok.eos_token
        rm.config.pad_token_id = tok.pad_token_id

        @torch.no_grad()
        def raw(thinks, reports):
            texts = [tok.apply_chat_template([{"role": "user", "content": RM_QUESTION.format(report=r)},
                                              {"role": "assistant", "content": t}], tokenize=False)
                     if tok.chat_template else RM_QUESTION.format(report=r) + "\n" + t for t, r in zip(thinks, reports)]
            batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=4096,  # the template
                        add_special_tokens=not tok.chat_template).to(device)                  # holds BOS already
            return rm(**batch).logits[:, 0].float().tolist()
    else:
        if not os.environ.get("OPENAI_BASE_URL"):
            raise ValueError(f"--consistency {spec} needs the endpoint's URL in $OPENAI_BASE_URL")
        chat = data.Chat(os.environ["OPENAI_BASE_URL"], arg)

        def judge_one(think: str, report: str) -> float:
            grade, error = chat.ask(JUDGE_PROMPT.format(report=report, think=think), max_tokens=8,
                                    parse=lambda t: int(t) / 10 if re.fullmatch(r"\s*(10|\d)\s*", t or "") else None)
            if error and judge_failures == "fail":
                raise RuntimeError(f"consistency judge {arg!r} failed: {error}")
            return math.nan if error else grade
        raw = lambda thinks, reports: [judge_one(t, r) for t, r in zip(thinks, reports)]

    def score(thinks: list[str], reports: list[str]) -> list[float]:
        out = [0.0] * len(thinks)
        todo = [i for i, t in enumerate(thinks) if t.strip()]
        if todo:
            for i, s in zip(todo, raw([thinks[i] for i in todo], [reports[i] for i in todo])):
                out[i] = s if math.isnan(s) else discretise(s, thresholds, levels)
        return out
    return score


# ==== GRPO: advantages and loss =======================================================================================
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
    Per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + beta * (exp(ref - logp) - (ref - logp) - 1), masked,
    averaged over each sequence's tokens then over the batch ("sequence", the official choice) or over all tokens."""
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1)                                      # (B, 1)
    on = mask.bool()                                                   # masked positions (pad targets) never
    ratio = torch.exp(torch.where(on, logp - old_logp, 0))             # reach exp(): (B, T)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ratio_ref = torch.where(on, ref_logp - logp, 0)
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1                  # k3 estimator of KL(pi || pi_ref), >= 0
    per_token = -surrogate + kl_beta * kl                              # (B, T)

    def masked_mean(x):
        if reduction == "token":
            return (x * mask).sum() / mask.sum().clamp(min=1)
        return ((x * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()

    clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    stats = {"kl": masked_mean(kl.detach()).item(), "clip_frac": masked_mean(clipped.to(mask.dtype)).item()}
    return masked_mean(per_token), stats


def sample_seed(seed: int, step: int, question: int) -> int:
    """A question's sampling generator depends on (seed, step, question) only: the same samples on any number of
    ranks, and a resumed run replays the uninterrupted one."""
    return ((seed * 1_000_003 + step) * 1_000_033 + question) % 2**63   # within manual_seed's range


def row_logprobs(vlm, x: torch.Tensor | None, input_ids, attention_mask, rows: slice, T: int, args) -> torch.Tensor:
    """Log-probs of the last T tokens of `rows` (question-major, G per question); each volume is encoded once."""
    G, first = args.group_size, rows.start // args.group_size  # first: the first row's question
    image = None if x is None else vlm.image_embeds(x[first:(rows.stop - 1) // G + 1]).repeat_interleave(G, 0)
    image = None if x is None else image[rows.start - first * G:rows.stop - first * G]
    return vlm.token_logprobs(input_ids[rows], attention_mask[rows], image, args.temperature, last=T)


def asks_think(seed: int, step: int, question: int, no_think_frac: float) -> bool:
    """Whether a question is asked with <think> at `step`: a draw seeded like its samples, so ranks agree."""
    g = torch.Generator().manual_seed(sample_seed(seed, step, question))
    return no_think_frac == 0 or torch.rand(1, generator=g).item() >= no_think_frac


class PolicyLogprobs(torch.nn.Module):
    """row_logprobs of the policy: every trainable parameter is used inside this one forward (what DDP needs)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm

    def forward(self, *args):
        return row_logprobs(self.vlm, *args)


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


@torch.no_grad()
def validate(vlm, questions: list[dict], volumes, max_new_tokens: int, batch: int = 16) -> dict:
    """Greedy MMVQA accuracy (data.parse_answer, evaluate's first path) and format rate; each rank a share, summed."""
    mine, counts = questions[get_rank()::world_size()], torch.zeros(3, dtype=torch.float64, device=vlm.device)
    for i in range(0, len(mine), batch):
        chunk = mine[i:i + batch]
        ids, mask = vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=True)) for q in chunk])
        with autocast(vlm.device):
            image = vlm.image_embeds(volumes.batch(q["VolumeName"] for q in chunk).to(vlm.device))
            out, lengths, finished = vlm.generate(ids, mask, image, max_new_tokens=max_new_tokens, temperature=0.0)
        for text, done, q in zip(decode(vlm.tokenizer, out, lengths, finished), finished.tolist(), chunk):
            counts += torch.tensor([parse_answer(text, options=q["options"]) == q["answer"],
                                    format_reward(text) * done, 1.0], dtype=torch.float64, device=vlm.device)
    correct, formatted, n = all_reduce(counts, "sum").tolist()
    return {"val_acc": correct / n, "val_format": formatted / n} if n else {"val_acc": None, "val_format": None}


# ==== One GRPO step: rollout -> rewards -> advantages -> loss -> update ===============================================
def train_step(net, ref: model.VLM, optimizer, qs: list[dict], x: torch.Tensor | None, consistency, args, step: int,
               question_ids: list[int]) -> dict:
    """One GRPO step on this rank's questions `qs` (each with its scan's "report": data.attach_reports; volumes x:
    (Q, 1, X, Y, Z), or None for text-only prompts); `net`: PolicyLogprobs, DDP-wrapped under torchrun. Returns the
    step's logging sums (all ranks), gradient norm, whether the update applied, decoded completions, phase seconds."""
    vlm, G, t0 = getattr(net, "module", net).vlm, args.group_size, time.perf_counter()
    thinks = [asks_think(args.seed, step, i, args.no_think_frac) for i in question_ids]
    prompt_ids, prompt_mask = vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=t), with_image=x is not None)
                                            for q, t in zip(qs, thinks)])   # (Q, P), left-padded

    # 1. rollout: G samples per question from the current policy, each question with its own generator
    with torch.no_grad(), autocast(vlm.device), runtime.gathered(net):
        image = vlm.image_embeds(x) if x is not None else None              # (Q, N_img, D), once per volume
        completion, lengths, finished = vlm.generate(                       # (Q*G, T), (Q*G,), (Q*G,)
            prompt_ids, prompt_mask, image, num_samples=G, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            generator=[torch.Generator(vlm.device).manual_seed(sample_seed(args.seed, step, i)) for i in question_ids])
    t_generate = time.perf_counter() - t0
    completion, lengths, finished, mask = completion_mask(completion, lengths, finished, vlm.image_token_id,
                                                          vlm.pad_token_id)  # (Q*G, T): through the first EOS
    T = completion.shape[1]
    input_ids = torch.cat([prompt_ids.repeat_interleave(G, 0), completion], 1)  # (Q*G, P + T), ids as generated
    attention_mask = torch.cat([prompt_mask.repeat_interleave(G, 0), mask.long()], 1)

    # 2. rewards, r = r_fmt + r_acc + r_con (paper §3.3); a truncated completion earns no format reward
    texts = decode(vlm.tokenizer, completion, lengths, finished)
    row_q, row_think = [q for q in qs for _ in range(G)], [t for t in thinks for _ in range(G)]
    r_fmt = torch.tensor([(format_reward(t) if th else answer_only_reward(t)) * f
                          for t, th, f in zip(texts, row_think, finished.tolist())])
    r_acc = torch.tensor([accuracy_reward(t, q["answer"], q["options"]) for t, q in zip(texts, row_q)])
    rationales = [think_text(t) if th else "" for t, th in zip(texts, row_think)]   # none asked for: r_con 0
    r_con = torch.tensor(consistency(rationales, [q["report"] for q in row_q]))
    rewards = r_fmt + r_acc + r_con                                             # (Q*G,)

    # 3. group-normalised advantages; a group holding an excluded (NaN) judge score is left out of the loss
    excluded = rewards.view(-1, G).isnan().any(1).repeat_interleave(G).to(vlm.device)
    advantages = group_advantages(torch.nan_to_num(rewards), G).to(vlm.device)
    mask = mask * ~excluded[:, None]

    # 4. loss and update, in micro-batches (choice 7): old = the rollout policy, ref = the SFT model, both no-grad
    n = input_ids.shape[0]
    chunks = [slice(i, min(i + (args.micro_batch or n), n)) for i in range(0, n, args.micro_batch or n)]
    # share (per chunk), weight (whole batch): this rank's part of the all-rank mean, relative to the ranks' average
    if args.loss_reduction == "token":   # the mean over every rank's tokens: DDP averages the ranks' gradients
        tokens = all_reduce(mask.sum().float(), "sum").clamp(min=1) / world_size()
        share, weight = [float(mask[c].sum().clamp(min=1) / tokens) for c in chunks], float(mask.sum() / tokens)
    else:   # the mean over every rank's rows but those excluded (their mask is 0), as "token" leaves their tokens out
        rows = all_reduce((~excluded).sum().double(), "sum").clamp(min=1).item() / world_size()
        share, weight = [(c.stop - c.start) / rows for c in chunks], n / rows
    with torch.no_grad(), autocast(vlm.device):
        ref_logp = torch.cat([row_logprobs(ref, x, input_ids, attention_mask, c, T, args) for c in chunks])
    t_rollout = time.perf_counter() - t0
    old_logp, params = None, [p for p in vlm.parameters() if p.requires_grad]
    for _ in range(args.mu):
        logps = []
        for j, c in enumerate(chunks):
            with net.no_sync() if hasattr(net, "no_sync") and j < len(chunks) - 1 else nullcontext():
                with autocast(vlm.device):
                    logp = net(x, input_ids, attention_mask, c, T, args)                          # (rows, T)
                old = logp.detach() if old_logp is None else old_logp[c]                          # mu = 1: ratio = 1
                (grpo_loss(logp, old, ref_logp[c], advantages[c], mask[c], args.clip_eps, args.kl_beta,
                           args.loss_reduction)[0] * share[j]).backward()
            logps.append(logp.detach())
        logp = torch.cat(logps)                                                     # (Q*G, T), the whole batch's
        old_logp = logp if old_logp is None else old_logp
        loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, args.clip_eps, args.kl_beta,
                                args.loss_reduction)
        grad_norm, applied = runtime.optimizer_step(optimizer, params, args.grad_clip, args.nan_policy, step, loss)

    # 5. logging sums over ranks; rewards over the rows left in the loss (an excluded group's r_con is unknown)
    kept = ~excluded.cpu()
    groups = rewards.view(-1, G)[kept.view(-1, G)[:, 0]]                        # (groups left in, G)
    local = {"r_fmt": r_fmt[kept].sum(), "r_acc": r_acc[kept].sum(), "r_con": r_con[kept].sum(), "reward": groups.sum(),
             "reward_std": groups.std(1).sum(), "zero_std_frac": (groups == groups[:, :1]).all(1).sum(),
             "completion_len": lengths.sum(), "truncated": (~finished).sum(), "excluded": excluded.sum(),
             "n": len(texts), "groups": len(groups), "kl": weight * stats["kl"],
             "clip_frac": weight * stats["clip_frac"], "loss": weight * loss.item()}
    sums = all_reduce(torch.tensor(list(local.values()), dtype=torch.float64, device=vlm.device), "sum")
    return {"sums": dict(zip(local, sums.tolist())), "grad_norm": grad_norm.item(), "applied": applied,
            "texts": texts, "tokens": int(lengths.sum()), "generate_sec": t_generate, "rollout_sec": t_rollout,
            "update_sec": time.perf_counter() - t0 - t_rollout}


def log_row(step: int, out: dict) -> dict:
    """Per-completion and per-group means of train_step's sums (kl, clip_frac and loss: the mean over ranks)."""
    s = out["sums"]
    kept, groups = s["n"] - s["excluded"] or math.nan, s["groups"] or math.nan   # rows, groups left in the loss
    return {"step": step, **{k: s[k] / kept for k in ("reward", "r_fmt", "r_acc", "r_con")},
            **{k: s[k] / s["n"] for k in ("completion_len", "truncated", "excluded")},
            **{k: s[k] / groups for k in ("reward_std", "zero_std_frac")},
            **{k: s[k] / world_size() for k in ("kl", "clip_frac", "loss")}, "grad_norm": out["grad_norm"]}


# ==== Command line and the loop =======================================================================================
# The phantom world's overrides of the paper's defaults: the tiny LLM moves within minutes at a larger lr, keeps its
# tag format at temperature 0.7, answers in fewer tokens; the ViT stays frozen.
PHANTOM = dict(lr=1e-5, steps=120, batch_size=4, max_new_tokens=96, temperature=0.7, eval_n=100,
               freeze_encoder=True, eval_every=40, grad_ckpt=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = runtime.make_parser(__doc__)
    g = runtime.data_flags(p)
    g.add_argument("--sft", default="runs/sft/vlm", help="SFT checkpoint: the initial policy and the reference")
    g.add_argument("--eval-n", type=at_least(0), default=500, help="validation questions (the first n with a volume)")
    g = p.add_argument_group("rewards")
    g.add_argument("--consistency", default="offline",
                   help="offline | rm:PATH | judge:MODEL (endpoint, key: OPENAI_BASE_URL, OPENAI_API_KEY) | none")
    g.add_argument("--con-thresholds", type=float, nargs="+", help="raw-score thresholds; unset = CON_DEFAULTS's")
    g.add_argument("--con-levels", type=float, nargs="+", help="one more than thresholds; unset = CON_DEFAULTS's")
    g.add_argument("--judge-failures", default="fail", choices=["fail", "exclude"],
                   help="a failed judge call stops the run, or its group is left out of the loss and counted")
    g = p.add_argument_group("GRPO")
    g.add_argument("--group-size", type=at_least(2), default=4, help="G completions per question")
    g.add_argument("--batch-size", type=at_least(1), default=2, help="questions per rank and step")
    g.add_argument("--max-prompt-len", type=at_least(1), default=1024, help="prompt tokens with image; longer: error")
    g.add_argument("--max-new-tokens", type=at_least(1), default=512)
    g.add_argument("--temperature", type=at_least(0.01), default=1.0, help="sampling temperature = scoring temperature")
    g.add_argument("--clip-eps", type=at_least(0.0), default=0.2)
    g.add_argument("--kl-beta", type=at_least(0.0), default=0.04)
    g.add_argument("--no-think-frac", type=at_least(0.0, 1.0), default=0.0,
                   help="share of the questions asked without <think> (format reward: one answer block alone)")
    g.add_argument("--mu", type=at_least(1), default=1, help="policy iterations per rollout batch")
    g.add_argument("--loss-reduction", default="sequence", choices=["sequence", "token"])
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=at_least(0.0), default=1e-6, help="peak lr (after the warm-up, cosine decay to 0)")
    g.add_argument("--steps", type=at_least(1), default=1000)
    g.add_argument("--warmup-frac", type=at_least(0.0, 1.0), default=0.0, help="linear lr warm-up, share of --steps")
    g.add_argument("--weight-decay", type=at_least(0.0), default=0.0)
    g.add_argument("--grad-clip", type=at_least(0.0), default=1.0, help="0 = off")
    g.add_argument("--freeze-encoder", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the ViT frozen (the paper trains the whole model)")
    g = runtime.run_flags(p, "runs/grpo", "vlm/, ckpt/", save_every=20)
    g.add_argument("--micro-batch", type=at_least(0), default=0, help="rows per policy/ref. pass, 0 = all (choice 7)")
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=True, help="less memory (choice 7)")
    g.add_argument("--eval-every", type=at_least(0), default=10, help="steps between validation accuracies; 0 = off")
    return runtime.parse_with_preset(p, argv, PHANTOM)


def rank_questions(n: int, global_batch: int, seed: int, step: int) -> list[int]:
    """This rank's question indices at `step`: a seeded permutation per epoch, cut into global batches."""
    epoch, k = divmod(step, n // global_batch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[k * global_batch:(k + 1) * global_batch][get_rank()::world_size()].tolist()


def main(argv=None) -> dict:
    args = parse_args(argv)
    runtime.earlier_run(Path(args.out), args.resume, args.overwrite)   # before any work; Run checks it again
    if not model.is_vlm_dir(args.sft):
        hint = f"{Path(args.sft) / 'vlm'} is one" if model.is_vlm_dir(Path(args.sft) / "vlm") else "run sft.py first"
        raise SystemExit(f"--sft {args.sft} is not a VLM checkpoint (config.json and llm/): {hint}")
    rank, _, world, device = runtime.setup_distributed()
    paths = data.paths(args.data_root, args.preset)
    volumes, val_volumes = data.VolumeCache(paths["train_cache"]), data.VolumeCache(paths["valid_cache"])
    questions = volumes.keep_cached(data.read_questions(paths["mmvqa_rl"]), "VolumeName", "RL questions", print0)
    questions = data.attach_reports(questions, paths["train_reports"], "RL questions", print0)   # r_con's reference
    val_items = data.read_questions(paths["mmvqa_valid"])
    val_questions = [q for q in val_items if q["VolumeName"] in val_volumes][:args.eval_n]
    eval_every = args.eval_every if val_questions else 0
    if args.eval_every and not val_questions:
        cached = sum(q["VolumeName"] in val_volumes for q in val_items)
        print0(f"no validation: no question selected from {paths['mmvqa_valid']} ({len(val_items)} questions, "
               f"{cached} with a cached volume, --eval-n {args.eval_n})")
    consistency = make_consistency_scorer(args.consistency, args.con_thresholds, args.con_levels, device,
                                          args.judge_failures)

    # policy and frozen reference, both from the SFT checkpoint
    runtime.seed_everything(args.seed)
    vlm = model.VLM.load(args.sft, device=device).eval()     # eval: no dropout, sampled = trained distribution
    data.check_prompt_lengths(questions, vlm.prompt_len, args.max_prompt_len, paths["mmvqa_rl"], args.no_think_frac)
    ref = model.VLM.load(args.sft, device=device).freeze(runtime.compute_dtype(device))    # choice 7: KL 0 at step 0
    vlm.set_trainable(vit=not args.freeze_encoder, bridge=True, llm=True)   # the RAM anchor is a buffer: frozen
    vlm.set_grad_checkpointing(args.grad_ckpt)
    net = runtime.wrap(PolicyLogprobs(vlm), device, args.shard)
    params = [p for p in vlm.parameters() if p.requires_grad]               # after wrap: FSDP's shards
    print0(f"{len(questions)} RL questions, {len(val_questions)} validation questions, "
           f"{sum(p.numel() for p in params):,} trainable parameters, world {world}, G {args.group_size}")

    global_batch = args.batch_size * world
    if len(questions) < global_batch:
        raise SystemExit(f"{len(questions)} RL questions < one global batch of {global_batch}")
    optimizer = runtime.adamw(params, args.lr, args.weight_decay)
    run = runtime.Run(args.out, args.resume, args.overwrite, args.stop_at, args=vars(args),
                      curves=("reward", "r_fmt", "r_acc", "r_con", "reward_std", "kl", "completion_len", "truncated",
                              "val_acc"), save_every=args.save_every, inputs=(args.sft,))
    if run.state is not None:
        runtime.load_train_state(net, optimizer, run.state)
        run.state = None
    history, t0 = [], time.time()
    if run.start == 0 and eval_every:
        with runtime.gathered(net):
            history.append({"step": 0, **validate(vlm, val_questions, val_volumes, args.max_new_tokens)})
        run.log(history[-1])
        print0(f"step 0 (SFT model): validation accuracy {history[-1]['val_acc']:.3f}, "
               f"format {history[-1]['val_format']:.3f}")
    bar = tqdm(total=args.steps, initial=run.start, disable=rank != 0, desc="grpo")

    for step in range(run.start, args.steps):
        lr = runtime.cosine_lr(step, args.steps, int(args.warmup_frac * args.steps), args.lr)
        runtime.set_lr(optimizer, lr)
        idx = rank_questions(len(questions), global_batch, args.seed, step)
        qs = [questions[i] for i in idx]
        x = volumes.batch(q["VolumeName"] for q in qs).to(device)
        out = train_step(net, ref, optimizer, qs, x, consistency, args, step, idx)
        run.skipped += not out["applied"]
        done = step + 1
        row = {**log_row(done, out), "lr": lr, "skipped": run.skipped, "sec": round(time.time() - t0, 1),
               "sample": out["texts"][0]}
        if eval_every and (done % eval_every == 0 or done == args.steps):
            with runtime.gathered(net):
                row.update(validate(vlm, val_questions, val_volumes, args.max_new_tokens))
            print0(f"\nstep {done}: validation accuracy {row['val_acc']:.3f}, format {row['val_format']:.3f}; "
                   f"sample {row['sample']!r}")
        history.append(row)
        run.log(row)
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['r_acc']:.2f}", fmt=f"{row['r_fmt']:.2f}",
                        kl=f"{row['kl']:.3f}")
        if run.end_step(done, args.steps, lambda: runtime.train_state(net, optimizer), device):
            break
    bar.close()
    run.close()
    done = run.start + sum(r["step"] > 0 for r in history)
    if done == args.steps:
        runtime.unshard_for_saving(net)
    if done == args.steps and rank == 0:  # a self-contained checkpoint; the run config goes into its meta
        final = {k: v for k, v in history[-1].items() if k != "sample"} if history else {}
        vlm.save(Path(args.out) / "vlm", meta={"stage": "grpo", "args": vars(args), "skipped_steps": run.skipped,
                                              "final": final, "sft": vlm.config.get("meta", {})})
        print0(f"wrote {Path(args.out) / 'vlm'}")
    runtime.cleanup_distributed()
    return {"history": history, "step": done, "interrupted": done < args.steps, "vlm": vlm}


if __name__ == "__main__":
    main()
    sys.exit(runtime.exit_code())
