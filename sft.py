"""Med3D-R1 stage 1: supervised fine-tuning of the bridge with the Residual Alignment gate and Abnormality Re-Weighting.

The vision encoder (from clip3d.py) and the LLM are frozen; the bridge (adaptive pooling + RAM gate, model.py) learns
to speak to the LLM through report generation mixed with open / yes-no / multiple-choice VQA (paper §4, SPEC §5).
`--warmup` is a second, smaller job for the phantom world. It trains the untrained tiny LLM on the phantom texts
(reports, VQA answers, MMVQA answers with and without <think>, and list-copy exercises for in-context copying), with
each scan's findings handed to it as image embeddings by a label code (FindingCode: one learned vector per
abnormality, no volume). So the LLM learns its language, the answer format, and to read findings from the image
positions, before bridge-only SFT asks the bridge to write there. It stands in for the LLM's own pretraining
(Qwen2.5 needs no warm-up); the code is then discarded.

Deliberate choices:
1. Trainable: the bridge only (the paper's "projection layer"); ViT, LLM and the text anchor stay frozen.
   `--lora` adds LoRA adapters on the LLM's attention projections (paper table 3); they are merged into the LLM
   weights when the checkpoint is written, so the output loads like any other.
2. ARW, eq. (4)-(5): a target is tokenised segment by segment (data.report_target gives (text, abnormal) pieces),
   so every target token knows its sentence: weight λ on tokens of abnormal sentences, 1 on every other target token
   (normal sentences, section tags, VQA answers, EOS), 0 on prompt, image placeholders and padding.
3. Loss = Σ w·CE / Σ w, where Σ w is the weight sum of the whole optimizer step over all micro-batches and ranks
   (all-reduced before the forward), so gradient accumulation and DDP give the gradient of one big batch.
   (The official code divided by all tokens, padding included.)
4. Every rank takes the same path: the finite check on loss and gradient norm is all-reduced before the optimizer
   step; `--nan-policy skip` drops that step on every rank, `stop` ends every rank with an error.
5. Data order: one seeded permutation per epoch, grouped by length (less padding), cut into global batches; rank r
   takes every world-th example of each batch. The data position is therefore the step counter, and `--resume`
   restores the exact run (trainable weights, AdamW state, step, RNG states; the learning rate is a function of
   the step).
6. `--cache-features`: the encoder is frozen and the crop deterministic (centre crop), so each volume's ViT output
   is computed once, kept in memory, and reused in later epochs (see the README for the measured speed-up).
7. One prompt format everywhere: the tokenizer's chat template through vlm.prompt (the same as grpo.py/evaluate.py).
8. Before the bridge, each encoder token is standardised per position and channel by its mean and standard deviation
   over (up to --feature-stats) training volumes, computed once at the start and saved in the bridge (model.Bridge
   feat_mean / feat_std; not in the paper). Most of the frozen tokens' variance is the same in every scan (anatomy,
   position); without this the phantom bridge learned nothing scan-specific (measured: the rationale named the MMVQA
   key of 23 % of the validation questions without, 46 % with, 300 report-only steps at lr 3e-3; README "Status").

Phantom defaults differ from the paper's (SPEC §5: reports + VQA, lr 1e-4, 1 epoch, batch 2, bf16, max length 2048)
only to fit a 2-core CPU in minutes: SFT trains on report generation alone, with each volume's encoder output computed
once (--cache-features), at lr 3e-3 for 6 epochs, batch 8; the warm-up (the whole tiny LLM, from scratch) uses lr
3e-4, 2 epochs, batch 8 (at 1e-3 it never learned to copy, at 2e-3 not even to read the code). Measured with the
earlier 3.4 M-parameter tiny LLM: `--vqa` (the phantom VQA items too) made an SFT take 220 s instead of 94 s, and its
rationale named the MMVQA key of 46 % of the validation questions against 44 % without, think accuracy 36 % against
38 %; 3 epochs instead of 6 named the key of 35 %.
`--preset real` restores the paper's values (DEFAULTS). On a busy shared CPU, OMP_NUM_THREADS=1 was
several times faster than two threads.

Run:
  python sft.py --warmup                     # phantom world: tiny LLM learns its language -> runs/warmup
  python sft.py                              # 1 CPU, phantom world -> runs/sft/vlm  (needs runs/clip3d, runs/warmup)
  python sft.py --preset real --llm /models/Qwen2.5-3B --vit-preset base \\
      --vision-weights BrgSA_vision_encoder.pth --data-root /data/ct-rate-cache    # 1 GPU, real data
  torchrun --standalone --nproc_per_node 8 sft.py --preset real --llm /models/Qwen2.5-3B --vit-preset base \\
      --vision-weights BrgSA_vision_encoder.pth --data-root /data/ct-rate-cache    # 8 GPUs
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from safetensors.torch import save_file
from tqdm import tqdm

import data
import model
from model import (all_ranks_finite, all_reduce, any_rank, atomic_dir, autocast, cosine_lr, latest_train_state,
                   print0, rng_state, save_train_state, seed_everything, set_rng_state, setup_distributed,
                   cleanup_distributed, SigtermFlag)

# Defaults that differ between the phantom world (2-core CPU, minutes) and the paper's CT-RATE run (SPEC §5).
DEFAULTS = {"real": dict(lr=1e-4, epochs=1, batch_size=2, vqa=True, cache_features=False),
            "phantom": dict(lr=3e-3, epochs=6, batch_size=8, vqa=False, cache_features=True),
            "warmup": dict(lr=3e-4, epochs=2, batch_size=8)}  # its examples: warmup_examples; no encoder


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # mode and paths
    p.add_argument("--warmup", action="store_true", help="phantom tiny LLM warm-up (texts + label code) -> runs/warmup")
    p.add_argument("--preset", choices=["phantom", "real"], default="phantom", help="phantom world or CT-RATE defaults")
    p.add_argument("--data-root", default="runs/phantom", help="phantom root (built if absent) or real data root")
    p.add_argument("--llm", default=None, help="HF causal-LM dir (default: runs/warmup; warm-up: the phantom tiny LLM)")
    p.add_argument("--vision-weights", default="runs/clip3d/vision_encoder.safetensors", help="or 'none' (tests)")
    p.add_argument("--vit-preset", default="tiny", choices=list(model.VIT_PRESETS))
    p.add_argument("--out", default=None, help="output root (default runs/sft; warm-up: runs/warmup)")
    # method
    p.add_argument("--arw-lambda", type=float, default=1.10, help="eq. (5) weight of abnormal-sentence tokens; 1.0 = no ARW")
    p.add_argument("--no-ram", action="store_true", help="bridge without the Residual Alignment gate (table 2)")
    p.add_argument("--lora", action="store_true", help="also train LoRA adapters on the LLM (table 3)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--vqa", action=argparse.BooleanOptionalAction, default=None,
                   help="train on the VQA items besides report generation (default: real yes, phantom no)")
    p.add_argument("--mmvqa", action="store_true", help="also train on the MMVQA training questions (not in the paper)")
    # optimisation (None = the preset's default, see DEFAULTS)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per device and micro-step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-frac", type=float, default=0.03, help="cosine schedule warm-up fraction")
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 = off")
    p.add_argument("--max-len", type=int, default=2048)
    p.add_argument("--cache-features", action=argparse.BooleanOptionalAction, default=None,
                   help="compute each volume's ViT output once and reuse it (default: phantom yes, real no)")
    p.add_argument("--feature-stats", type=int, default=1000,
                   help="training volumes (the first, by name) whose encoder tokens give the bridge's input statistics")
    # robustness and bookkeeping
    p.add_argument("--nan-policy", default="skip", choices=["skip", "stop"], help="on a non-finite loss/grad, on all ranks")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under <out>/ckpt")
    p.add_argument("--save-every", type=int, default=100, help="optimizer steps between resumable checkpoints")
    p.add_argument("--stop-at", type=int, default=None, help="save and exit after this step (time-boxed jobs, tests)")
    p.add_argument("--max-steps", type=int, default=None, help="cap the schedule length (tests)")
    p.add_argument("--inject-nan", default=None, help="STEP:RANK, make that rank's loss NaN at that step (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args(argv)
    defaults = DEFAULTS["warmup" if args.warmup and args.preset == "phantom" else args.preset]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or ("runs/warmup" if args.warmup else "runs/sft")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Examples: (volume, user text, target segments) -> token ids and ARW weights
# ---------------------------------------------------------------------------------------------------------------------

def encode(tokenizer, prompt: str, segments: list[tuple[str, bool]], arw_lambda: float, max_len: int):
    """Token ids of prompt + target + EOS, and per-token weights: 0 prompt, λ abnormal sentence, 1 other target. eq. (5)"""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) >= max_len:
        raise ValueError(f"prompt of {len(ids)} tokens does not fit --max-len {max_len}")
    weights = [0.0] * len(ids)
    for text, abnormal in segments:  # piecewise, so each token inherits its sentence's label
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        weights += [arw_lambda if abnormal else 1.0] * len(piece)
    ids.append(tokenizer.eos_token_id)
    weights.append(1.0)
    return ids[:max_len], weights[:max_len]


def collate(encoded: list[tuple[list[int], list[float]]], pad_id: int):
    """Right-pad to (B, T) input_ids, attention_mask and weights (padding weight 0)."""
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    weights = torch.zeros(len(encoded), T)
    for i, (ids, w) in enumerate(encoded):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
        weights[i, :len(w)] = torch.tensor(w)
    return input_ids, mask, weights


def weighted_ce_sum(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """eq. (4) before normalisation: Σ_t α_t · (−log p(y_t | y_<t)); position t predicts token t+1."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    return (ce * weights[:, 1:].flatten()).sum()


def mmvqa_examples(items: list[dict], labels: dict, modes=(True, False)) -> list[dict]:
    """MMVQA questions with data.mmvqa_target answers, each with (True) and / or without (False) <think>."""
    examples = []
    for item in items:
        present = [n for n, y in zip(data.ABNORMALITIES, labels[item["VolumeName"]]) if y]
        for think in modes:
            examples.append({"volume": item["VolumeName"], "user": data.mmvqa_prompt(item, think),
                             "segments": [(data.mmvqa_target(item, present, think), False)]})
    return examples


def sft_examples(paths: dict, with_vqa: bool = True, with_mmvqa: bool = False) -> list[dict]:
    """Report generation (sentence-labelled targets) for every training volume, plus the training VQA items."""
    sentences = data.read_sentence_labels(paths["train_sentences"])
    examples = [{"volume": name, "user": data.report_instruction(s), "segments": data.report_target(s)}
                for name, s in sorted(sentences.items())]
    if with_vqa:
        for item in data.read_vqa(paths["train_vqa"]):
            if item["kind"] != "report":  # reports come from the sentence labels above, with ARW weights
                examples.append({"volume": item["VolumeName"], "user": item["question"],
                                 "segments": [(item["answer"], False)]})
    if with_mmvqa:
        examples += mmvqa_examples(json.load(open(paths["mmvqa_train"])), data.read_labels(paths["train_labels"]))
    return examples


def drawn_labels(labels: dict, n: int, seed: int) -> dict:
    """n made-up label vectors ("drawn-0", ...), each abnormality drawn independently at its training prevalence."""
    prevalence = np.mean(np.stack(list(labels.values())), axis=0)
    rng = np.random.default_rng(seed)
    return {f"drawn-{i}": (rng.random(len(prevalence)) < prevalence).astype(np.int64) for i in range(n)}


BLANK = "blank"  # the label vector of the copy exercises: no finding


def copy_examples(n: int, seed: int) -> list[dict]:
    """n list-copy exercises on a blank image ("Repeat this list: D) Emphysema A) Atelectasis ..." -> the list). They
    stand in for the in-context copying that a pretrained LLM brings from its web text, which the MMVQA walk needs.
    Measured on the phantom world: without them the warm-up LLM copied 0 of 40 such lists exactly (it wrote the
    right names in the wrong order), with 6 per training scan 38 of 40."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        picks = rng.integers(0, len(data.ABNORMALITIES), int(rng.integers(3, 9)))
        text = " ".join(f"{'ABCD'[rng.integers(4)]}) {data.ABNORMALITIES[k]}" for k in picks)
        examples.append({"volume": BLANK, "user": "Repeat this list: " + text, "segments": [(text, False)]})
    return examples


def warmup_examples(paths: dict, labels: dict, seed: int, think_per_scan: int = 6, no_think_per_scan: int = 1,
                    copy_per_scan: int = 6) -> tuple[list[dict], dict]:
    """The warm-up's examples and the labels they read: the training reports and VQA answers with their scans'
    labels, MMVQA questions about drawn label vectors (per training scan: think_per_scan with <think>,
    no_think_per_scan without), and copy_per_scan list-copy exercises per training scan. Each question has a vector
    of its own, so the LLM must learn the look-up rules instead of memorising 400 scans' answers (measured: with the
    training scans' own questions the walk's present / not-seen marks stayed at their base rate)."""
    n_think, n_plain = think_per_scan * len(labels), no_think_per_scan * len(labels)
    drawn = drawn_labels(labels, n_think + n_plain, seed)
    items = data.build_mmvqa(drawn, seed)
    examples = (sft_examples(paths, with_vqa=True) + mmvqa_examples(items[:n_think], drawn, modes=(True,))
                + mmvqa_examples(items[n_think:], drawn, modes=(False,))
                + copy_examples(copy_per_scan * len(labels), seed))
    return examples, {**labels, **drawn, BLANK: np.zeros(len(data.ABNORMALITIES), dtype=np.int64)}


# ---------------------------------------------------------------------------------------------------------------------
# LoRA (paper table 3 ablation): y = W x + (α / r) · B A x with W frozen and B = 0 at the start
# ---------------------------------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T.to(x.dtype)) @ self.lora_b.T.to(x.dtype) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a * self.scale).to(self.base.weight.dtype)
        return self.base


def add_lora(llm: nn.Module, rank: int, alpha: float, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> None:
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))


def merge_lora(llm: nn.Module) -> None:
    for module in list(llm.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())


class FindingCode(nn.Module):
    """Warm-up stand-in for the encoder: a scan's 18 labels -> N_img image embeddings, one learned vector per
    abnormality summed over the findings present (plus a learned vector per image position), layer-normed like the
    bridge's output. It teaches the tiny LLM to read findings from image embeddings, as Qwen2.5 reads meaning from
    the embeddings it was pretrained on; it is discarded after the warm-up and never sees a volume."""

    def __init__(self, n_img: int, dim: int, n_labels: int = len(data.ABNORMALITIES)):
        super().__init__()
        self.code = nn.Parameter(torch.randn(n_labels, dim))
        self.pos = nn.Parameter(torch.randn(n_img, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B, 18) 0/1 -> (B, N_img, D)
        return self.norm((labels.float() @ self.code)[:, None] + self.pos)


class WeightedLM(nn.Module):
    """Σ w·CE of a micro-batch, with every trainable parameter inside one forward (what DDP needs to see).
    `image` turns the batch's image input into image embeddings: vlm.bridge (SFT) or a FindingCode (warm-up)."""

    def __init__(self, vlm, image: nn.Module):
        super().__init__()
        self.vlm, self.image = vlm, image

    def forward(self, input_ids, attention_mask, weights, image_input):
        logits = self.vlm(input_ids, attention_mask, self.image(image_input))  # (B, T, V)
        return weighted_ce_sum(logits, input_ids, weights)


def data_paths(args, world: int) -> dict:
    """Paths of the training cache, sentence labels, VQA, labels and MMVQA; the phantom world is built (rank 0) if absent."""
    if args.preset == "phantom":
        if model.get_rank() == 0:  # an existing world keeps its size (e.g. the tests' small one)
            data.ensure_phantom(args.data_root)
            if args.warmup and args.llm is None:
                model.ensure_tiny_llm(args.data_root)
        if world > 1:
            torch.distributed.barrier()
        return data.ensure_phantom(args.data_root)
    root = Path(args.data_root)  # real CT-RATE: `python data.py preprocess / label / mmvqa` wrote these
    return dict(train_cache=root / "cache/train", train_sentences=root / "sentences/train.jsonl",
                train_vqa=root / "dataset/vqa/train_vqa.json", mmvqa_train=root / "mmvqa/train.json",
                train_labels=root / "dataset/multi_abnormality_labels/train_predicted_labels.csv")


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, local_rank, world, device = setup_distributed()
    out = Path(args.out)

    # ---- data and model -------------------------------------------------------------------------------------------
    paths = data_paths(args, world)
    seed_everything(args.seed)  # right before the model, so a given seed always gives the same initial bridge
    labels = None
    if args.warmup:  # the whole tiny LLM trains (float32; bf16 autocast on GPU); no encoder, no bridge
        llm_dir = Path(args.llm or model.ensure_tiny_llm(args.data_root))
        vlm = model.VLM.build(llm_dir, vit_preset=args.vit_preset, device=str(device))
        vlm.set_trainable(vit=False, bridge=False, llm=True)
        vlm.train()
        net = WeightedLM(vlm, FindingCode(vlm.n_img, vlm.config["llm_dim"]).to(device))
        examples, labels = warmup_examples(paths, data.read_labels(paths["train_labels"]), args.seed)
        examples = [e for e in examples if e["volume"] in labels]
        prev_meta = {}
    else:
        llm_dir = Path(args.llm or "runs/warmup")
        if not (llm_dir / "config.json").is_file():
            raise SystemExit(f"{llm_dir} is missing: run `python sft.py --warmup` first (or pass --llm)")
        vision = None if args.vision_weights == "none" else Path(args.vision_weights)
        if vision is not None and not vision.is_file():
            raise SystemExit(f"{vision} is missing: run `python clip3d.py` first (or pass --vision-weights)")
        vlm = model.VLM.build(llm_dir, vit_preset=args.vit_preset, vit_weights=vision, ram=not args.no_ram,
                              device=str(device))
        vlm.set_trainable(vit=False, bridge=True, llm=False)  # the anchor is a buffer: frozen, eq. (1)
        if args.lora:
            add_lora(vlm.llm, args.lora_rank, args.lora_alpha)
            vlm.llm.to(device)
        vlm.eval()
        vlm.bridge.train()
        net = WeightedLM(vlm, vlm.bridge)
        volumes = data.VolumeCache(paths["train_cache"])
        examples = [e for e in sft_examples(paths, args.vqa, args.mmvqa) if e["volume"] in volumes]
        # inherit the earlier stages' run configs (warm-up meta beside the LLM, clip3d's config beside the encoder)
        earlier = {"warmup": llm_dir / "warmup_meta.json", "clip3d": vision and vision.parent / "config.json"}
        prev_meta = {k: json.loads(p.read_text()) for k, p in earlier.items() if p and p.is_file()}
    tokenizer = vlm.tokenizer
    prompts = [vlm.prompt(e["user"]) for e in examples]
    encoded = [encode(tokenizer, p, e["segments"], args.arw_lambda, args.max_len) for p, e in zip(prompts, examples)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trainable = [p for p in net.parameters() if p.requires_grad]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    print0(f"{len(examples)} examples, {sum(p.numel() for p in trainable):,} trainable parameters, world {world}")
    ddp = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else None
    forward = ddp or net

    # ---- schedule, optimizer, resume ------------------------------------------------------------------------------
    global_batch = args.batch_size * args.grad_accum * world
    steps_per_epoch = len(examples) // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(examples)} examples < one global batch of {global_batch}")
    total_steps = min(args.epochs * steps_per_epoch, args.max_steps or 10**12)
    warmup_steps = int(args.warmup_frac * total_steps)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    start = 0
    state = latest_train_state(out / "ckpt") if args.resume else None
    if state is not None:
        with torch.no_grad():
            for n, p in zip(names, trainable):
                p.copy_(state["trainable"][n])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        start = state["step"]
        print0(f"resumed from step {start}")
    elif args.resume:
        print0(f"no checkpoint under {out / 'ckpt'}: starting from step 0")

    def save(step: int) -> None:
        rngs = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if rank == 0:
            save_train_state(out / "ckpt", step, {
                "step": step, "trainable": {n: p.detach().cpu() for n, p in zip(names, trainable)},
                "optimizer": optimizer.state_dict(), "rng": rngs, "args": vars(args)})

    @functools.lru_cache(maxsize=1)
    def epoch_batches(epoch: int) -> list[list[int]]:
        """The global batches of an epoch: a seeded permutation, sorted by length within windows of 16 batches (less
        padding, batches still mix the tasks), cut into batches whose order is shuffled again. A function of (seed, epoch) only."""
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        perm, window = torch.randperm(len(examples), generator=g).tolist(), 16 * global_batch
        batches = []
        for w in range(0, steps_per_epoch * global_batch, window):
            chunk = sorted(perm[w:min(w + window, steps_per_epoch * global_batch)], key=lambda i: -len(encoded[i][0]))
            batches += [chunk[b:b + global_batch] for b in range(0, len(chunk), global_batch)]
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def micro_batches(step: int) -> list[list[int]]:
        """This rank's example indices of optimizer step `step`, split into grad_accum micro-batches."""
        epoch, k = divmod(step, steps_per_epoch)
        mine = epoch_batches(epoch)[k][rank::world]
        return [mine[i * args.batch_size:(i + 1) * args.batch_size] for i in range(args.grad_accum)]

    features: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encoder_tokens(names: list[str]) -> torch.Tensor:
        """(B, N, C) frozen-encoder tokens of these volumes (centre crop)."""
        x = torch.stack([data.online_transform(volumes.load(v), volumes.preset, train=False) for v in names])
        with autocast(device):
            return vlm.vit(x.to(device)).float()

    def vit_tokens(idx: list[int]) -> torch.Tensor:
        """(B, N, C) frozen-encoder tokens of the examples' volumes, from the cache when enabled."""
        todo = sorted({examples[i]["volume"] for i in idx} - features.keys())
        fresh = dict(zip(todo, encoder_tokens(todo))) if todo else {}  # volume -> (N, C)
        if args.cache_features:
            features.update(fresh)
        return torch.stack([features.get(examples[i]["volume"], fresh.get(examples[i]["volume"])) for i in idx])

    if not args.warmup:  # standardise the frozen encoder's tokens before the bridge (choice 8); every rank alike
        stats_names = sorted({e["volume"] for e in examples})[:args.feature_stats]
        total = total_sq = 0.0
        for i in tqdm(range(0, len(stats_names), 8), disable=rank != 0, desc="feature statistics"):
            batch = stats_names[i:i + 8]  # fixed batches of 8: the same numbers for any batch size and world
            t = encoder_tokens(batch)
            if args.cache_features:  # epoch 1 reuses them instead of encoding these volumes again
                features.update(zip(batch, t))
            t = t.double()
            total, total_sq = total + t.sum(0), total_sq + (t * t).sum(0)
        mean = total / len(stats_names)
        std = (total_sq / len(stats_names) - mean * mean).clamp(min=0).sqrt() + 1e-3
        vlm.bridge.feat_mean.copy_(mean.float()); vlm.bridge.feat_std.copy_(std.float())

    inject_step, inject_rank = map(int, args.inject_nan.split(":")) if args.inject_nan else (-1, -1)
    sigterm = SigtermFlag()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=total_steps, initial=start, disable=rank != 0, desc="warmup" if args.warmup else "sft")
    history, skipped, t_epoch, t0 = [], 0, time.time(), time.time()

    # ---- the loop -------------------------------------------------------------------------------------------------
    for step in range(start, total_steps):
        lr = cosine_lr(step, total_steps, warmup_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [collate([encoded[i] for i in idx], pad_id) + (idx,) for idx in micro_batches(step)]
        # eq. (4) normaliser: Σ w over every micro-batch of this step on every rank
        weight_total = all_reduce(sum(w[:, 1:].sum() for _, _, w, _ in batches).to(device).double(), "sum").float()
        loss_sum = torch.zeros((), device=device)
        for j, (input_ids, mask, weights, idx) in enumerate(batches):
            last = j == len(batches) - 1
            with (ddp.no_sync() if ddp is not None and not last else nullcontext()):
                image_input = (torch.tensor(np.stack([labels[examples[i]["volume"]] for i in idx])).to(device)
                               if args.warmup else vit_tokens(idx))
                with autocast(device):
                    s = forward(input_ids.to(device), mask.to(device), weights.to(device), image_input)
                if step == inject_step and rank == inject_rank:
                    s = s * float("nan")
                (s * world / weight_total).backward()  # DDP averages over ranks -> Σ_all w·CE / Σ_all w
            loss_sum += s.detach()
        grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip) if args.grad_clip > 0
                     else torch.norm(torch.stack([p.grad.norm() for p in trainable if p.grad is not None])))
        loss = all_reduce(loss_sum.clone(), "sum") / weight_total
        if all_ranks_finite(loss_sum, grad_norm):
            optimizer.step()
        elif args.nan_policy == "stop":
            print(f"[rank {rank}] non-finite loss at step {step}: stopping (--nan-policy stop)", flush=True)
            raise SystemExit(f"non-finite loss at step {step} on some rank (--nan-policy stop)")
        else:
            skipped += 1
            print(f"[rank {rank}] non-finite loss at step {step}: skipping the update (--nan-policy skip)", flush=True)
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
        bar.update(1)
        row = {"step": step + 1, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm.item(), "skipped": skipped,
               "sec": round(time.time() - t0, 2)}
        if (step + 1) % steps_per_epoch == 0:
            row["epoch_sec"] = round(time.time() - t_epoch, 2)
            t_epoch = time.time()
        if rank == 0 and ((step + 1) % args.log_every == 0 or "epoch_sec" in row or step + 1 == total_steps):
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.1e}")
        done = step + 1
        if any_rank(sigterm.raised, device) or done == args.stop_at:
            save(done)
            print0(f"saved a resumable checkpoint at step {done}; continue with --resume")
            cleanup_distributed()
            return {"losses": history, "step": done, "interrupted": True, "net": net, "examples": len(examples)}
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            save(done)
    bar.close()

    # ---- output ---------------------------------------------------------------------------------------------------
    meta = {"stage": "warmup" if args.warmup else "sft", "args": vars(args), "steps": total_steps,
            "final_loss": history[-1] if history else None, "skipped_steps": skipped, **prev_meta}
    if rank == 0:
        if args.warmup:  # an HF dir beside ckpt/ and metrics.jsonl; config.json is moved in last = complete
            with atomic_dir(out / "tmp_llm") as tmp:
                vlm.llm.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                (tmp / "warmup_meta.json").write_text(json.dumps(meta, indent=1))
                save_file(model._cpu_state(net.image), tmp / "finding_code.safetensors")  # diagnostics only
            (out / "config.json").unlink(missing_ok=True)
            for f in sorted((out / "tmp_llm").iterdir(), key=lambda f: f.name == "config.json"):
                f.replace(out / f.name)
            (out / "tmp_llm").rmdir()
            print0(f"wrote {out}")
        else:
            if args.lora:
                merge_lora(vlm.llm)
            vlm.save(out / "vlm", meta=meta)
            print0(f"wrote {out / 'vlm'}")
    cleanup_distributed()
    return {"losses": history, "step": total_steps, "interrupted": False, "net": net, "examples": len(examples)}


if __name__ == "__main__":
    main()
