"""Med3D-R1 stage 1: supervised fine-tuning of the bridge with the Residual Alignment gate and Abnormality Re-Weighting.

The vision encoder (clip3d.py) and the LLM are frozen; the bridge (adaptive pooling + RAM gate, model.py, eq. 1-3)
learns to speak to the LLM through report generation and open and yes/no VQA (multiple choice is left to grpo.py),
under the re-weighted loss of eq. (4)-(5).

Deliberate choices:
1. Trainable: the bridge only (the paper's projection layer). `--lora` (paper table 3) adds LoRA adapters to every
   linear layer of the LLM but its output head, with the official rank 16, α 32 and dropout 0.05; they are merged
   into the LLM weights when the checkpoint is written.
2. ARW, eq. (5): a target is tokenised sentence by sentence, so every token knows its sentence's label: weight λ on
   tokens of abnormal sentences, 1 on every other target token (normal sentences, tags, VQA answers, EOS), 0 on the
   prompt, the image placeholders and padding.
3. eq. (4) normaliser: Σ w·CE / Σ w with Σ w over the whole optimizer step (every micro-batch, every rank; the
   official code divided by all tokens, padding included), so accumulation and DDP give one big batch's gradient.
4. Before the bridge, each frozen encoder token is standardised per position and channel by its mean and spread over
   up to --feature-stats training volumes (saved in the bridge; not in the paper): most of the frozen tokens'
   variance is the same in every scan (anatomy, position), and the bridge should see what differs.
5. Data order is a function of (seed, step): a seeded permutation per epoch, sorted by length within windows of 16
   batches; --resume restores weights, AdamW, RNG and step, and replays the uninterrupted run exactly.
6. --cache-features: the encoder is frozen and the crop is the centre one, so each volume is encoded once; its tokens
   are kept in pageable host memory (8.4 MB per base-ViT volume; CUDA pins in power-of-two blocks, twice that), never
   on the GPU. A run whose cache would not fit in host memory stops at the start (all of CT-RATE's training volumes:
   397 GB per rank).
7. Precision (runtime.compute_dtype): on CUDA the frozen LLM is held in bf16 and every pass runs under bf16 autocast;
   the trained bridge (and LoRA) keeps fp32 weights, so AdamW's small updates are not rounded away, and so does the
   small ViT (model.py choice 7); fp32 on the CPU.
8. --shard fsdp: FSDP2 shards what trains (bridge, LoRA), its gradients and AdamW state; frozen ViT and LLM stay whole.
9. A thread reads the next step's volumes while this step trains (numpy and torch release the GIL as they read and
   transform): at the real size, reading and transforming a volume takes host time comparable to a sample's GPU step.

Run:
  python sft.py                          # 1 CPU, phantom world -> runs/sft/vlm (needs runs/clip3d and runs/warmup)
  python sft.py --preset real --data-root /data/ct-rate --llm /models/Qwen2.5-3B \\
      --vision-weights BrgSA_vision_encoder.pth                                       # 1 GPU
  torchrun --standalone --nproc_per_node 8 sft.py --preset real --data-root /data/ct-rate \\
      --llm /models/Qwen2.5-3B --vision-weights BrgSA_vision_encoder.pth              # 8 GPUs
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

import data
import model
import runtime
from runtime import HIDDEN, all_reduce, at_least, autocast, get_rank, print0, world_size

# The phantom world's overrides of the paper's defaults: a tiny LLM and ViT on a 2-core CPU, in minutes.
PHANTOM = dict(llm="runs/warmup", vision_weights="runs/clip3d/vision_encoder.safetensors", vit_preset="tiny",
               vqa=False, cache_features=True, lr=3e-3, epochs=6, batch_size=8)


def parse_args(argv=None, phantom: dict = PHANTOM, doc: str = __doc__, prog: str | None = None, helps=None):
    """The flags with the paper's defaults, `phantom` overriding them under --preset phantom (the warm-up reuses this
    parser with its own overrides, docstring, program name and `helps`: help texts by flag, HIDDEN to hide one)."""
    p = runtime.make_parser(doc, prog)
    g = runtime.data_flags(p)
    g.add_argument("--vqa", action=argparse.BooleanOptionalAction, default=True, help="VQA items besides reports")
    g.add_argument("--max-len", type=at_least(1), default=2048, help="tokens per example")
    g = p.add_argument_group("model")
    g.add_argument("--llm", default=None, help="local HF causal-LM directory (Qwen2.5-3B)")
    g.add_argument("--vision-weights", default=None, help="encoder weights, BrgSA layout (.pth or .safetensors)")
    g.add_argument("--vit-preset", default="base", choices=list(model.VIT_PRESETS))
    g.add_argument("--no-ram", action="store_true", help="no Residual Alignment gate (table 2 ablation)")
    g.add_argument("--arw-lambda", type=at_least(0.0), default=1.10, help="eq. (5) abnormal sentences' weight, 1 = off")
    g.add_argument("--lora", action="store_true", help="also train LoRA adapters on the LLM (table 3)")
    g.add_argument("--lora-rank", type=at_least(1), default=16)
    g.add_argument("--lora-alpha", type=at_least(1e-3), default=32.0, help="the update's scale is alpha / rank")
    g.add_argument("--lora-dropout", type=at_least(0.0, 0.99), default=0.05, help="on the adapters' input in training")
    g.add_argument("--feature-stats", type=at_least(2), default=1000, help="volumes for the bridge's input statistics")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=at_least(0.0), default=1e-4, help="peak learning rate (cosine schedule)")
    g.add_argument("--epochs", type=at_least(1), default=1)
    g.add_argument("--batch-size", type=at_least(1), default=2, help="per device and micro-step")
    g.add_argument("--grad-accum", type=at_least(1), default=1, help="micro-steps per optimizer step")
    g.add_argument("--weight-decay", type=at_least(0.0), default=0.01)
    g.add_argument("--warmup-frac", type=at_least(0.0, 1.0), default=0.03, help="linear lr warm-up, share of steps")
    g.add_argument("--grad-clip", type=at_least(0.0), default=1.0, help="0 = off")
    g.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=False,
                   help="encode each volume once and reuse its encoder tokens")
    g = runtime.run_flags(p, "runs/sft", "vlm/, ckpt/", save_every=100)
    g.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute the LLM's activations in the backward pass (less memory, one more forward)")
    g.add_argument("--log-every", type=at_least(1), default=10)
    g.add_argument("--max-steps", type=at_least(1), default=None, help=HIDDEN)   # cap the schedule
    g.add_argument("--inject-nan", default=None, help=HIDDEN)            # STEP:RANK, poison that rank's input
    helps = helps or {}
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    if helps.get("preset") == HIDDEN:   # no --preset to choose (the warm-up's): its overrides are the defaults shown
        p.set_defaults(**phantom); phantom = {}
    args = runtime.parse_with_preset(p, argv, phantom)
    lora = [f"--{k.replace('_', '-')}" for k in ("lora_rank", "lora_alpha", "lora_dropout")
            if getattr(args, k) != p.get_default(k)]
    if lora and not args.lora and helps.get("lora") != HIDDEN:   # never ignored silently (the warm-up refuses all)
        p.error(f"{', '.join(lora)}: only with --lora (no LoRA adapters without it)")
    return args


# ---- examples: (volume, user text, target segments) -> token ids and ARW weights -------------------------------------

def encode(tokenizer, prompt: str, segments: list[tuple[str, bool]], arw_lambda: float, max_len: int,
           what: str = "SFT example"):
    """Token ids of prompt + target + EOS, cut at max_len; per-token weights 0 prompt, λ abnormal sentence, 1 other
    target. eq. (5)"""
    ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])   # a copy: `+=` below must not grow a table
    if len(ids) >= max_len:
        raise ValueError(f"{what}: a prompt of {len(ids)} tokens does not fit --max-len {max_len}")
    weights = [0.0] * len(ids)
    for text, abnormal in segments:  # piecewise, so each token inherits its sentence's label
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        weights += [arw_lambda if abnormal else 1.0] * len(piece)
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    return ids[:max_len], weights[:max_len]


class TextTokens(dict):
    """{text: token ids} of texts tokenised earlier, called as a tokenizer (what `encode` needs of one)."""

    def __init__(self, tokenizer, texts: list[str], batch: int = 4096):
        super().__init__()
        self.eos_token_id = tokenizer.eos_token_id
        for i in tqdm(range(0, len(texts), batch), disable=get_rank() != 0, desc=f"tokenise {len(texts)} texts"):
            self.update(zip(texts[i:i + batch], tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self[text]}


def encode_examples(tokenizer, prompt, examples: list[dict], arw_lambda: float, max_len: int) -> list[tuple]:
    """`encode` of every example as (int32 ids, float32 weights), each distinct prompt and segment text tokenised
    once, in batches: CT-RATE's reports and VQA repeat most sentences and questions, and one call per text would
    take most of an hour on 2 M examples. `prompt(user text)` is the chat-templated prompt."""
    prompts = {u: prompt(u) for u in dict.fromkeys(e["user"] for e in examples)}
    table = TextTokens(tokenizer, list(dict.fromkeys([*prompts.values(),
                                                      *(t for e in examples for t, _ in e["segments"])])))
    out = []
    for i, e in enumerate(examples):
        ids, w = encode(table, prompts[e["user"]], e["segments"], arw_lambda, max_len,
                        f"example {i} ({e['volume']}, {e['user'][:40]!r})")
        out.append((np.array(ids, np.int32), np.array(w, np.float32)))
    return out


def collate(encoded: list[tuple[list[int], list[float]]], pad_id: int):
    """Right-pad to (B, T) input_ids, attention_mask and weights (padding weight 0)."""
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    weights = torch.zeros(len(encoded), T)
    for i, (ids, w) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.as_tensor(ids)
        mask[i, :len(ids)] = 1
        weights[i, :len(w)] = torch.as_tensor(w)
    return input_ids, mask, weights


def sft_examples(paths: dict, with_vqa: bool = True, kinds=("open", "yes_no")) -> list[dict]:
    """Report generation (sentence-labelled targets) for every training volume whose report has a findings or an
    impression section, plus the training VQA's questions of `kinds` (the official SFT's: open and yes/no; multiple
    choice is the RL stage's task; None: every kind), counted what is left out."""
    sentences = data.read_sentence_labels(paths["train_sentences"])
    examples = [{"volume": name, "user": data.report_instruction(s), "segments": data.report_target(s)}
                for name, s in sorted(sentences.items()) if s["findings"] or s["impressions"]]
    skipped = Counter({f"{paths['train_sentences']}: reports with neither section": len(sentences) - len(examples)})
    if with_vqa:
        for item in data.read_vqa(paths["train_vqa"], vqa_skipped := Counter()):
            if item["kind"] == "report":  # reports come from the sentence labels above, with ARW weights
                continue
            if kinds is None or item["kind"] in kinds:
                examples.append({"volume": item["VolumeName"], "user": item["question"],
                                 "segments": [(item["answer"], False)]})
            else:
                vqa_skipped[f"{item['kind'].replace('_', '-')} questions"] += 1
        skipped.update({f"{paths['train_vqa']}: {k}": n for k, n in vqa_skipped.items()})
    for what, n in skipped.items():
        if n:
            print0(f"{what}: {n} left out")
    return examples


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of an epoch: a seeded permutation, sorted by length within windows of 16 batches (less
    padding; batches still mix the tasks), cut into batches whose order is shuffled again. A function of (seed,
    epoch) only, so the data position is the step counter."""
    n = len(lengths) // global_batch * global_batch
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm, window = torch.randperm(len(lengths), generator=g).tolist(), 16 * global_batch
    batches = []
    for w in range(0, n, window):
        chunk = sorted(perm[w:min(w + window, n)], key=lambda i: -lengths[i])
        batches += [chunk[b:b + global_batch] for b in range(0, len(chunk), global_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# ---- the frozen encoder's tokens and the bridge's input statistics (choice 4) ----------------------------------------

class EncoderTokens:
    """(B, N, C) frozen-encoder tokens of volumes by name (centre crop), computed under runtime.autocast as every
    stage's ViT forward; with cache=True each volume is encoded once and its tokens kept in host memory (choice 6).
    `prefetch` reads the next step's volumes in a thread while this step trains (choice 9)."""

    def __init__(self, vit: nn.Module, volumes: data.VolumeCache, device: torch.device, cache: bool):
        self.vit, self.volumes, self.device, self.cache, self.kept = vit, volumes, device, cache, {}
        self.reader, self.ahead = ThreadPoolExecutor(1), {}

    def prefetch(self, batches: list[list[str]]) -> None:
        """Start reading the volumes that calls on these name lists, in this order, will encode (with the cache, not
        those an earlier call of the list encodes; calls on one set of volumes share a read); what an earlier call
        read ahead and nothing used is dropped."""
        for unused in self.ahead.values():
            unused.cancel()   # if not started yet
        self.ahead, encoded = {}, set(self.kept)
        for names in batches:
            todo = tuple(sorted(set(names) - encoded))
            if todo and todo not in self.ahead:
                self.ahead[todo] = self.reader.submit(self.volumes.batch, list(todo))
            if self.cache:
                encoded.update(todo)

    @torch.no_grad()
    def encode(self, names: list[str]) -> torch.Tensor:
        ahead = self.ahead.get(tuple(names))   # kept for another call of the step on the same volumes
        x = ahead.result() if ahead is not None else self.volumes.batch(names)
        with autocast(self.device):
            tokens = self.vit(x.to(self.device)).float()
        if self.cache:
            self.kept.update(zip(names, tokens.cpu()))
        return tokens

    def __call__(self, names: list[str]) -> torch.Tensor:
        todo = sorted(set(names) - self.kept.keys())
        fresh = dict(zip(todo, self.encode(todo))) if todo else {}
        if self.cache:
            return torch.stack([self.kept[n].to(self.device) for n in names])
        return torch.stack([fresh[n] for n in names])


def check_feature_cache(vit: nn.Module, n_volumes: int) -> None:
    """--cache-features keeps the tokens of every volume a rank meets in host memory, and over an epoch each rank of
    the node meets nearly all of them: stop now, with the numbers, where that would not fit in 80 % of the memory
    available (rather than run out late in the epoch)."""
    need = n_volumes * math.prod(vit.grid) * vit.width * 4 * int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else ""
    found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    available = int(found[1]) * 1024 if found else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * available:
        raise SystemExit(f"--cache-features would keep {n_volumes} volumes' encoder tokens in host memory, "
                         f"{need / 1e9:.0f} GB on this node ({math.prod(vit.grid)} x {vit.width} fp32 per volume "
                         f"and rank), against {available / 1e9:.0f} GB available: run with --no-cache-features")


def set_feature_statistics(bridge: model.Bridge, tokens: EncoderTokens, names: list[str]) -> None:
    """The bridge's feat_mean / feat_std: per position and channel over these volumes, in fixed batches of 8 (the
    same numbers for any batch size and world size). Spreads are floored at a fifth of their median: at real width
    about a third of position-channels (air, padding) vary across scans no more than the tokens' bf16 rounding, and
    dividing by so small a spread would magnify rounding noise and small encoder updates; a fifth of the median lies
    between those and the rest, and keeps that rounding under one standardised unit (docs/NOTES.md)."""
    total = total_sq = 0.0
    for i in tqdm(range(0, len(names), 8), disable=get_rank() != 0, desc="feature statistics"):
        t = tokens.encode(names[i:i + 8]).double()
        total, total_sq = total + t.sum(0), total_sq + (t * t).sum(0)
    mean = total / len(names)
    std = (total_sq / len(names) - mean * mean).clamp(min=0).sqrt()
    if not std.median() > 0:
        raise ValueError(f"the encoder tokens of the {len(names)} volumes for the bridge's statistics "
                         f"(--feature-stats) do not vary: at least two different training volumes are needed")
    std = std.clamp(min=0.2 * float(std.median()))
    bridge.feat_mean.copy_(mean.float())
    bridge.feat_std.copy_(std.float())


# ---- LoRA (paper table 3): y = W x + (α / r) · B A dropout(x) with W frozen and B = 0 at the start -------------------

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.scale, self.dropout = base, alpha / rank, nn.Dropout(dropout)
        bound = 1 / math.sqrt(base.in_features)     # A ~ U(±1/√in), B = 0: PEFT's init, as the official run had it
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features).uniform_(-bound, bound))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype)
        return self.base(x) + update * self.scale

    def merged(self) -> nn.Linear:
        """W + (α / r) B A, added in fp32 and rounded once to W's dtype (bf16 on CUDA)."""
        with torch.no_grad():
            self.base.weight.copy_(self.base.weight.float() + self.lora_b.float() @ self.lora_a.float() * self.scale)
        return self.base


def add_lora(llm: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> list[LoRALinear]:
    """Wrap every nn.Linear of the LLM but its output head (attention and MLP projections) -> the adapters."""
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    adapters = []
    for module in list(llm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                adapters.append(LoRALinear(child, rank, alpha, dropout))
                setattr(module, child_name, adapters[-1])
    return adapters


def merge_lora(llm: nn.Module) -> None:
    for module in list(llm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


# ---- the loss, one optimizer step, the loop --------------------------------------------------------------------------

def weighted_ce_sum(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """eq. (4) before normalisation: Σ_t α_t · (−log p(y_t | y_<t)); position t predicts token t+1."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    return (ce * weights[:, 1:].flatten()).sum()


class WeightedLM(nn.Module):
    """Σ w·CE of a micro-batch, with every trainable parameter inside one forward (what DDP needs to see).
    `image` turns the batch's image input into image embeddings (the bridge, or the phantom warm-up's label code)."""

    def __init__(self, vlm: model.VLM, image: nn.Module):
        super().__init__()
        self.vlm, self.image = vlm, image

    def forward(self, input_ids, attention_mask, weights, image_input):
        logits = self.vlm(input_ids, attention_mask, self.image(image_input))  # (B, T, V)
        return weighted_ce_sum(logits, input_ids, weights)


def train_step(net: nn.Module, optimizer, micro_batches: list[tuple], params: list, args, step: int,
               device: torch.device) -> tuple[float, float, bool]:
    """One optimizer step over this rank's micro-batches of (input_ids, attention_mask, weights, image_input):
    loss = Σ w·CE / Σ w with Σ w all-reduced over every micro-batch of every rank before the backward (eq. 4,
    choice 3). Returns (loss, gradient norm, whether the update was applied)."""
    weight_total = all_reduce(sum(w[:, 1:].sum() for _, _, w, _ in micro_batches).to(device).double(), "sum").float()
    loss_sum = torch.zeros((), device=device)
    for j, (input_ids, mask, weights, image_input) in enumerate(micro_batches):
        with net.no_sync() if hasattr(net, "no_sync") and j < len(micro_batches) - 1 else nullcontext():
            with autocast(device):
                s = net(input_ids.to(device), mask.to(device), weights.to(device), image_input)
            (s * world_size() / weight_total).backward()  # DDP averages over ranks -> Σ_all w·CE / Σ_all w
        loss_sum += s.detach()
    loss = all_reduce(loss_sum.clone(), "sum") / weight_total
    grad_norm, applied = runtime.optimizer_step(optimizer, params, args.grad_clip, args.nan_policy, step, loss_sum)
    return loss.item(), grad_norm.item(), applied


def train(args, net: WeightedLM, examples: list[dict], image_input, device: torch.device, desc: str) -> dict:
    """Encode the examples, then the loop: cosine schedule, AdamW, resume, one train_step per global batch,
    metrics, resumable checkpoints. `image_input(volume names)` gives a micro-batch's image input."""
    rank, world, tokenizer = get_rank(), world_size(), net.vlm.tokenizer
    encoded = encode_examples(tokenizer, net.vlm.prompt, examples, args.arw_lambda, args.max_len)
    cut = sum(ids[-1] != tokenizer.eos_token_id for ids, _ in encoded)   # targets longer than --max-len
    wrapped = runtime.wrap(net, device, args.shard)
    params = [p for p in net.parameters() if p.requires_grad]  # after wrap: FSDP's shards
    print0(f"{len(examples)} examples ({cut} cut at --max-len {args.max_len}), "
           f"{sum(p.numel() for p in params):,} trainable parameters, world {world}")
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(examples)} examples < one global batch of {global_batch}")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    optimizer = runtime.adamw(params, args.lr, args.weight_decay)
    run = runtime.Run(args.out, args.resume, args.overwrite, args.stop_at, args=vars(args),
                      curves=("loss", "lr", "grad_norm"), save_every=args.save_every,
                      inputs=(args.llm, args.vision_weights))
    if run.state is not None:
        runtime.load_train_state(wrapped, optimizer, run.state)
        run.state = None
    lengths = [len(ids) for ids, _ in encoded]
    epoch_order = functools.lru_cache(2)(lambda epoch: epoch_batches(lengths, global_batch, args.seed, epoch))

    def micro_batches(step: int) -> list[list[int]]:   # this rank's examples in `step`, micro-batch by micro-batch
        mine = epoch_order(step // steps_per_epoch)[step % steps_per_epoch][rank::world]
        return [mine[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.grad_accum)]
    inject_step, inject_rank = map(int, args.inject_nan.split(":")) if args.inject_nan else (-1, -1)
    bar = tqdm(total=total_steps, initial=run.start, disable=rank != 0, desc=desc)
    losses, t_epoch, t0 = [], time.time(), time.time()
    for step in range(run.start, total_steps):
        lr = runtime.cosine_lr(step, total_steps, int(args.warmup_frac * total_steps), args.lr)
        runtime.set_lr(optimizer, lr)
        micro = []
        for idx in micro_batches(step):
            image = image_input([examples[i]["volume"] for i in idx])
            if (step, rank) == (inject_step, inject_rank):
                image = image * float("nan")
            micro.append(collate([encoded[i] for i in idx], tokenizer.pad_token_id) + (image,))
        if hasattr(image_input, "prefetch") and step + 1 < total_steps:
            image_input.prefetch([[examples[i]["volume"] for i in idx] for idx in micro_batches(step + 1)])
        loss, grad_norm, applied = train_step(wrapped, optimizer, micro, params, args, step, device)
        run.skipped += not applied
        losses.append(loss)
        bar.update(1)
        row = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped": run.skipped,
               "sec": round(time.time() - t0, 2)}
        if (step + 1) % steps_per_epoch == 0:
            row["epoch_sec"], t_epoch = round(time.time() - t_epoch, 2), time.time()
        if (step + 1) % args.log_every == 0 or "epoch_sec" in row or step + 1 == total_steps:
            run.log(row)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}")
        done = step + 1
        if run.end_step(done, total_steps, lambda: runtime.train_state(wrapped, optimizer), device):
            break
    bar.close()
    run.close()
    done = run.start + len(losses)
    if done == total_steps:
        runtime.unshard_for_saving(wrapped)
    return {"losses": losses, "step": done, "interrupted": done < total_steps, "net": net, "examples": len(examples),
            "skipped": run.skipped}


def main(argv=None) -> dict:
    args = parse_args(argv)
    runtime.earlier_run(Path(args.out), args.resume, args.overwrite)   # before any work; Run checks it again
    for flag in ("llm", "vision_weights"):
        if getattr(args, flag) is None:
            raise SystemExit(f"--{flag.replace('_', '-')} is required with --preset real")
    llm_dir, vision = Path(args.llm), Path(args.vision_weights)
    if not (llm_dir / "config.json").is_file():
        raise SystemExit(f"{llm_dir} is not an LLM directory (no config.json): " + (
            "run `python -m phantom warmup` first (or pass --llm)" if args.preset == "phantom" else "check --llm"))
    if model.is_vlm_dir(llm_dir):   # transformers would say only "Unrecognized model"
        raise SystemExit(f"--llm {llm_dir} is a VLM checkpoint, not an LLM directory (its LLM: {llm_dir / 'llm'})")
    if not vision.is_file():
        raise SystemExit(f"{vision} is missing: run `python clip3d.py` first (or pass --vision-weights)")
    earlier = {k: data.read_json(p) for k, p in (("warmup", llm_dir / "warmup_meta.json"),
                                                 ("clip3d", vision.parent / "config.json")) if p.is_file()}
    if vision.suffix == ".safetensors":   # clip3d's encoder says how far its run got
        try:
            with safe_open(vision, "pt") as f:
                made = earlier["vision_weights"] = f.metadata() or {}
        except SafetensorError as e:   # cut short (a copy stopped midway): name it
            raise SystemExit(f"--vision-weights {vision} does not read ({e})") from None
        if int(made.get("step", 0)) < int(made.get("total_steps", 0)):
            print0(f"note: {vision} is clip3d's encoder after step {made['step']} of {made['total_steps']}, an "
                   f"unfinished run (`python clip3d.py --resume`)")
    _, _, _, device = runtime.setup_distributed()
    paths = data.paths(args.data_root, args.preset)

    runtime.seed_everything(args.seed)  # right before the model: a seed always gives the same initial bridge
    vlm = model.VLM.build(llm_dir, vit_preset=args.vit_preset, vit_weights=vision, ram=not args.no_ram,
                          device=str(device), dtype=runtime.compute_dtype(device))  # frozen: choice 7
    vlm.set_trainable(vit=False, bridge=True, llm=False)  # the anchor is a buffer: frozen, eq. (1)
    adapters = add_lora(vlm.llm, args.lora_rank, args.lora_alpha, args.lora_dropout) if args.lora else []
    vlm.llm.to(device)  # the adapters are built on the CPU
    vlm.eval()  # the frozen parts
    for trained in [vlm.bridge, *adapters]:
        trained.train()  # the LoRA dropout is on while training
    vlm.set_grad_checkpointing(args.grad_ckpt)
    volumes = data.VolumeCache(paths["train_cache"])
    examples = volumes.keep_cached(sft_examples(paths, args.vqa), "volume", "training examples", print0)
    if args.cache_features:
        check_feature_cache(vlm.vit, len({e["volume"] for e in examples}))
    tokens = EncoderTokens(vlm.vit, volumes, device, args.cache_features)
    set_feature_statistics(vlm.bridge, tokens, sorted({e["volume"] for e in examples})[:args.feature_stats])

    result = train(args, WeightedLM(vlm, vlm.bridge), examples, tokens, device, "sft")
    if not result["interrupted"] and get_rank() == 0:
        meta = {"stage": "sft", "args": vars(args), "steps": result["step"],
                "final_loss": result["losses"][-1] if result["losses"] else None, "skipped_steps": result["skipped"],
                **earlier}
        if args.lora:
            merge_lora(vlm.llm)
        vlm.save(Path(args.out) / "vlm", meta=meta)
        print0(f"wrote {Path(args.out) / 'vlm'}")
    runtime.cleanup_distributed()
    return result


if __name__ == "__main__":
    main()
    sys.exit(runtime.exit_code())
