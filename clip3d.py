"""3D CLIP pretraining of the CT vision encoder (BrgSA-style): ViT3D + a text encoder, symmetric InfoNCE.

The paper pretrains its 3D ViT against CT-RATE reports following BrgSA and keeps only the vision encoder; the authors
released no code for this stage. This script trains the pair and writes the encoder in the published BrgSA layout.

Run (defaults = the phantom world, generated if absent; tiny ViT, tiny BERT-style text encoder):
    python clip3d.py                                                      # 1 CPU, a few minutes
    python clip3d.py --preset real --data-root /data/ctrate --text-encoder /models/CXR-BERT   # 1 GPU
    torchrun --standalone --nproc_per_node 8 clip3d.py --preset real --data-root /data/ctrate \\
        --text-encoder /models/CXR-BERT                                   # 8 GPUs: 8 x 8 = global batch 64
    python clip3d.py --resume                                             # continue the latest complete checkpoint
Real data layout: <data-root>/dataset/... (CT-RATE, DATA.md) and <data-root>/cache/{train,valid} written by
`python data.py preprocess`. Output: <out>/vision_encoder.safetensors (BrgSA timm names, model.load_vision_weights),
<out>/ckpt/step_*/state.pt (resumable), <out>/metrics.jsonl, <out>/config.json.

Deliberate choices:
1. Loss: symmetric InfoNCE (CLIP) with a learnable temperature, log(1/0.07) at start, scale clamped to <= 100.
2. Negatives come from every rank: embeddings are all-gathered with gradient (backward all-reduces the gradient of the
   gathered tensor and keeps this rank's slice), so a world of W x B equals one process with batch W*B.
3. Gradient accumulation sums gradients of micro-steps; the negatives of a micro-step are its micro_batch x world
   samples (no gradient caching). BrgSA's batch 64 is 8 GPUs x 8 without accumulation.
4. Pooling: mean of the ViT tokens (cls is dropped by ViT3D) and masked mean of the text tokens, linear projections,
   then each modality is centred on its mean over the global batch (in validation: over the validation set) before
   the L2 norm. Without centring the tiny models collapse at the start: all scans share the anatomy and most report
   sentences, embeddings start ~0.999 cosine-similar and InfoNCE sits at log(B) with vanishing gradients.
5. Determinism: the sample order is a seeded permutation per epoch and each sample's augmentation RNG is keyed by
   (seed, epoch, index), and torch's RNG is re-seeded from (seed, step, rank) each step, so --resume continues exactly
   and a run is independent of the number of data workers.
6. Zero-shot validation: for each of the 18 abnormalities, score = sim(volume, "X is present.") - sim(volume,
   "X is not present.") (monotone in the 2-way softmax), AUC per class and mean; volume<->report recall@1/5/10
   (a retrieved report counts if its text equals the volume's report: reconstructions share a report).
7. Text = whole report (findings + impressions). --sentences K trains on K random report sentences instead (an
   experiment for text encoders trained from scratch, which must learn negation for the zero-shot prompts).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import rankdata
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

import data
import model as M

# Defaults that differ between the phantom world and CT-RATE (real: BrgSA's lr 5e-5, batch 64, 39 epochs).
DEFAULTS = {
    "phantom": dict(vit="tiny", lr=1e-3, batch_size=16, micro_batch=None, epochs=12, warmup_frac=0.1,
                    max_text_len=256, eval_every=100, save_every=100, workers=0, augment=False, sentences=0),
    "real": dict(vit="base", lr=5e-5, batch_size=64, micro_batch=8, epochs=39, warmup_frac=0.03,
                 max_text_len=512, eval_every=1000, save_every=1000, workers=8, augment=True, sentences=0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # data
    p.add_argument("--preset", choices=list(DEFAULTS), default="phantom", help="phantom world or real CT-RATE defaults")
    p.add_argument("--data-root", default="runs/phantom", help="phantom root (built if absent) or real data root")
    p.add_argument("--max-text-len", type=int, help="text tokens (findings + impressions) kept per report")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random training crops (phantom: off)")
    p.add_argument("--sentences", type=int, help="train on this many random report sentences (0: the whole report)")
    # model
    p.add_argument("--vit", choices=list(M.VIT_PRESETS), help="ViT3D preset")
    p.add_argument("--vit-init", help="optional ViT3D weights to start from (.pth/.safetensors, BrgSA layout)")
    p.add_argument("--text-encoder", help="local HF encoder dir (e.g. CXR-BERT); phantom default: built tiny BERT")
    p.add_argument("--embed-dim", type=int, default=256, help="shared embedding width")
    # optimisation
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, help="global batch per optimizer step")
    p.add_argument("--micro-batch", type=int, help="per-rank micro-batch (default: batch_size / world)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--warmup-frac", type=float)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    # evaluation, checkpoints, output
    p.add_argument("--eval-every", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--out", default="runs/clip3d")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in <out>/ckpt")
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Loss: symmetric InfoNCE over negatives gathered from every rank
# ---------------------------------------------------------------------------------------------------------------------

class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 that passes gradients back: every rank's loss depends on every rank's embeddings, so the
    gradient of the gathered tensor is summed over ranks and each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather(x: torch.Tensor) -> torch.Tensor:
    return GatherWithGrad.apply(x) if M.world_size() > 1 else x


def center_normalize(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    return F.normalize(x - mean, dim=-1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE for this rank's pairs on centred embeddings. image, text: (B, E) projected features;
    logit_scale: exp(learned log-scale).

    Each modality is centred on the mean of the global batch (all ranks), then L2-normalised. Rows are this rank's
    samples, columns the whole world's (W*B); the mean over ranks equals the loss of one process holding all W*B
    pairs, and DDP's gradient averaging makes the gradients equal too.
    """
    all_image, all_text = gather(image), gather(text)                       # (W*B, E)
    image_mean, text_mean = all_image.mean(0), all_text.mean(0)
    image, all_image = center_normalize(image, image_mean), center_normalize(all_image, image_mean)
    text, all_text = center_normalize(text, text_mean), center_normalize(all_text, text_mean)
    labels = torch.arange(image.shape[0], device=image.device) + M.get_rank() * image.shape[0]
    logits_image = logit_scale * image @ all_text.T                          # (B, W*B) image -> reports
    logits_text = logit_scale * text @ all_image.T                           # (B, W*B) report -> images
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Model: ViT3D + text encoder + projections + temperature
# ---------------------------------------------------------------------------------------------------------------------

class CLIP3D(nn.Module):
    def __init__(self, vit: nn.Module, text: nn.Module, embed_dim: int):
        super().__init__()
        self.vit, self.text = vit, text
        self.image_proj = nn.Linear(vit.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, volumes: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(volumes)                                           # (B, N, C)
        return self.image_proj(tokens.mean(1))                               # (B, E), not normalised yet

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.text_proj((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # masked mean -> (B, E)

    def forward(self, volumes, input_ids, attention_mask):
        return self.encode_image(volumes), self.encode_text(input_ids, attention_mask), self.logit_scale.exp()


def ensure_tiny_text_encoder(paths: dict) -> Path:
    """A randomly initialised BERT-style encoder with the phantom tokenizer, saved as an HF dir (built once)."""
    root = Path(paths["root"])
    out, llm_dir = root / "text_encoder", root / "tiny_llm"
    if (out / "config.json").is_file():
        return out
    if not (llm_dir / "config.json").is_file():           # = model.ensure_tiny_llm, for a world of any size
        M.build_tiny_llm(M.phantom_texts(paths), llm_dir)
    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # no dropout: world-size invariant
    torch.manual_seed(0)
    encoder = BertModel(config)                                          # pooler kept so AutoModel loads quietly
    with M.atomic_dir(out) as tmp:
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Data: (volume, report text) pairs from the preprocessed cache, in a deterministic order
# ---------------------------------------------------------------------------------------------------------------------

def data_paths(args) -> dict:
    """Paths of caches, reports and labels; the phantom world is generated (rank 0 first) if absent."""
    if args.preset == "phantom":
        if M.get_rank() == 0:  # an existing world keeps the sizes it was built with
            ensure_tiny_text_encoder(data.ensure_phantom(args.data_root))
        if M.world_size() > 1:
            dist.barrier()
        paths = data.ensure_phantom(args.data_root)
        args.text_encoder = args.text_encoder or str(Path(args.data_root) / "text_encoder")
        return paths
    root = Path(args.data_root)
    if not args.text_encoder:
        raise SystemExit("--preset real needs --text-encoder DIR (a local HF encoder, e.g. CXR-BERT)")
    return dict(train_cache=root / "cache/train", valid_cache=root / "cache/valid",
                train_reports=root / "dataset/radiology_text_reports/train_reports.csv",
                valid_reports=root / "dataset/radiology_text_reports/validation_reports.csv",
                valid_labels=root / "dataset/multi_abnormality_labels/valid_predicted_labels.csv")


def report_sentences(report: dict) -> list[str]:
    return data.split_sentences(report.get("findings")) + data.split_sentences(report.get("impressions"))


def pairs(cache: data.VolumeCache, reports_csv) -> tuple[list[str], list[list[str]]]:
    """(volume names, report sentences) for the cached volumes that have a report; counts what was dropped."""
    reports = data.read_reports(reports_csv)
    names = [n for n in cache.names if n in reports and report_sentences(reports[n])]
    M.print0(f"{reports_csv}: {len(names)} volume-report pairs ({len(cache.names) - len(names)} cached volumes "
             f"without a report dropped)")
    return names, [report_sentences(reports[n]) for n in names]


class PairDataset(Dataset):
    """Item key (epoch, index) -> (volume (1, X, Y, Z), text). The text is the report (findings + impressions), or
    for training with n_sentences > 0 that many of its sentences drawn at random, kept in report order. Crops and
    sentence draws use an RNG keyed by (seed, epoch, index)."""

    def __init__(self, cache, names, sentences, train: bool, seed: int, augment: bool = False, n_sentences: int = 0):
        self.cache, self.names, self.sentences, self.seed = cache, names, sentences, seed
        self.augment, self.n_sentences = train and augment, n_sentences if train else 0
        self.texts = [" ".join(s) for s in sentences]                     # the whole reports

    def __len__(self):
        return len(self.names)

    def __getitem__(self, key):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        volume = data.online_transform(np.asarray(self.cache.load(self.names[i])), self.cache.preset,
                                       train=self.augment, rng=rng)
        sentences = self.sentences[i]
        if 0 < self.n_sentences < len(sentences):
            sentences = [sentences[j] for j in sorted(rng.choice(len(sentences), self.n_sentences, replace=False))]
        return volume, " ".join(sentences)


def collate(items):
    return torch.stack([v for v, _ in items]), [t for _, t in items]


def micro_batches(n: int, start_step: int, total_steps: int, args, rank: int, world: int):
    """This rank's micro-batches of keys, step after step. Step s takes the global batch s of a seeded permutation
    of the epoch; micro-step m on rank r takes the slice (m * world + r): one process with micro-batch W*B sees the
    same samples, in the same order, as W ranks with B each."""
    steps_per_epoch = n // args.batch_size
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, steps_per_epoch)
        order = np.random.default_rng([args.seed, epoch]).permutation(n)[k * args.batch_size:(k + 1) * args.batch_size]
        for m in range(args.accum):
            s = (m * world + rank) * args.micro_batch
            yield [(epoch, int(i)) for i in order[s:s + args.micro_batch]]


# ---------------------------------------------------------------------------------------------------------------------
# Validation: zero-shot abnormality AUC and volume <-> report retrieval
# ---------------------------------------------------------------------------------------------------------------------

def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged; NaN when a class has one label value only."""
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((rankdata(scores)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def recall_at(sim: np.ndarray, same: np.ndarray, k: int) -> float:
    """Fraction of rows whose top-k columns contain a correct one (same[i, j] = True)."""
    top = np.argsort(-sim, axis=1)[:, :k]
    return float(np.take_along_axis(same, top, axis=1).any(axis=1).mean())


@torch.no_grad()
def encode_texts(net: CLIP3D, tokenizer, texts: list[str], max_len: int, device, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        tok = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with M.autocast(device):
            out.append(net.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def validate(net: CLIP3D, tokenizer, val: PairDataset, labels: dict, args, device) -> dict:
    """Every rank embeds a shard of the validation volumes; rank 0 computes the metrics (other ranks get {})."""
    net.eval()
    rank, world = M.get_rank(), M.world_size()
    shard = list(range(rank, len(val), world))
    image = []
    for i in range(0, len(shard), args.micro_batch):
        volumes, _ = collate([val[(0, j)] for j in shard[i:i + args.micro_batch]])
        with M.autocast(device):
            image.append(net.encode_image(volumes.to(device)).float().cpu())
    image = torch.cat(image) if image else torch.zeros(0, args.embed_dim)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (shard, image))
        order = [i for s, _ in parts for i in s]
        image = torch.cat([e for _, e in parts])[np.argsort(order)]
    net.train()
    if rank != 0:
        return {}
    text = encode_texts(net, tokenizer, val.texts, args.max_text_len, device)
    prompts = encode_texts(net, tokenizer, [f"{a} is present." for a in data.ABNORMALITIES]
                           + [f"{a} is not present." for a in data.ABNORMALITIES], args.max_text_len, device)
    text_mean = text.mean(0)                       # centre as in training: on the evaluated set's means
    image, text, prompts = (center_normalize(image, image.mean(0)), center_normalize(text, text_mean),
                            center_normalize(prompts, text_mean))
    n_cls = len(data.ABNORMALITIES)
    score = (image @ prompts[:n_cls].T - image @ prompts[n_cls:].T).numpy()          # (N, 18)
    y = np.stack([labels[n] for n in val.names])                                     # (N, 18)
    per_class = {a: auc(score[:, c], y[:, c]) for c, a in enumerate(data.ABNORMALITIES)}
    sim = (image @ text.T).numpy()                                                   # (N volumes, N reports)
    same = np.array(val.texts, dtype=object)[:, None] == np.array(val.texts, dtype=object)[None, :]
    metrics = {"zs_auc_mean": float(np.nanmean(list(per_class.values()))), "zs_auc": per_class}
    for k in (1, 5, 10):
        metrics[f"v2r_R@{k}"] = recall_at(sim, same, k)
        metrics[f"r2v_R@{k}"] = recall_at(sim.T, same.T, k)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, local_rank, world, device = M.setup_distributed()
    out = Path(args.out)
    if args.micro_batch is None:
        args.micro_batch = args.batch_size // world
    args.accum = args.batch_size // (args.micro_batch * world)
    if args.accum * args.micro_batch * world != args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of micro-batch x world "
                         f"({args.micro_batch} x {world})")

    paths = data_paths(args)
    train_cache, valid_cache = data.VolumeCache(paths["train_cache"]), data.VolumeCache(paths["valid_cache"])
    train = PairDataset(train_cache, *pairs(train_cache, paths["train_reports"]), train=True, seed=args.seed,
                        augment=args.augment, n_sentences=args.sentences)
    val = PairDataset(valid_cache, *pairs(valid_cache, paths["valid_reports"]), train=False, seed=args.seed)
    labels = data.read_labels(paths["valid_labels"])
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train)} training pairs < one global batch of {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = int(args.warmup_frac * total_steps)

    # model: ViT3D (optionally from BrgSA weights) + text encoder; the BERT pooler is unused (masked mean instead)
    M.seed_everything(args.seed)
    vit = M.ViT3D.from_preset(args.vit)
    if args.vit_init:
        M.load_vision_weights(vit, args.vit_init)
    tokenizer = AutoTokenizer.from_pretrained(args.text_encoder)
    text = AutoModel.from_pretrained(args.text_encoder)
    if getattr(text, "pooler", None) is not None:
        text.pooler = None
    net = CLIP3D(vit, text, args.embed_dim).to(device)
    ddp = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if world > 1 else net
    decay = [p for p in net.parameters() if p.ndim >= 2]                 # no decay on norms, biases, temperature
    no_decay = [p for p in net.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    # resume: model, optimizer, RNG and the step (the step fixes the schedule and the data position)
    start_step = 0
    state = M.latest_train_state(out / "ckpt") if args.resume else None
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        M.set_rng_state(state["rng"])
        start_step = state["step"]
        M.print0(f"resumed from step {start_step} (epoch {state['epoch']})")
    elif rank == 0:
        shutil.rmtree(out / "ckpt", ignore_errors=True)                # a fresh run never mixes with old states
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(args), indent=2, default=str))
    M.print0(f"{len(train)} train / {len(val)} valid pairs, world {world} x micro-batch {args.micro_batch} x accum "
             f"{args.accum} = batch {args.batch_size}, {total_steps} steps ({steps_per_epoch}/epoch), device {device}")

    loader = DataLoader(train, batch_sampler=micro_batches(len(train), start_step, total_steps, args, rank, world),
                        num_workers=args.workers, collate_fn=collate, pin_memory=device.type == "cuda")
    batches = iter(loader)
    sigterm = M.SigtermFlag()
    log = open(out / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0)
    metrics, t0 = {}, time.time()

    def checkpoint(step: int) -> None:
        if rank == 0:
            M.save_train_state(out / "ckpt", step, {"model": net.state_dict(), "optimizer": opt.state_dict(),
                                                    "rng": M.rng_state(), "step": step,
                                                    "epoch": step // steps_per_epoch, "args": vars(args)})
            M.save_vision_weights(net.vit, out / "vision_encoder.safetensors")   # atomic, BrgSA names

    for step in bar:
        lr = M.cosine_lr(step, total_steps, warmup, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)    # dropout etc.: a function of (step, rank)
        loss_sum = torch.zeros((), device=device)
        for m in range(args.accum):
            volumes, texts = next(batches)
            tok = tokenizer(texts, padding=True, truncation=True, max_length=args.max_text_len, return_tensors="pt")
            sync_now = m == args.accum - 1 or world == 1
            with (ddp.no_sync() if not sync_now else nullcontext()), M.autocast(device):
                image, report, scale = ddp(volumes.to(device), tok["input_ids"].to(device),
                                           tok["attention_mask"].to(device))
                loss = clip_loss(image.float(), report.float(), scale.float()) / args.accum
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        finite = M.all_ranks_finite(loss_sum, grad_norm)                     # every rank takes the same branch
        if finite:
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        loss_mean = M.all_reduce(loss_sum.clone(), "avg").item()           # = the loss over the global batch
        record = {"step": step + 1, "loss": loss_mean, "lr": lr, "temperature": 1 / net.logit_scale.exp().item(),
                  "grad_norm": grad_norm.item(), "skipped": not finite, "time_s": round(time.time() - t0, 2)}
        done = step + 1 == total_steps
        if (step + 1) % args.eval_every == 0 or done:
            metrics = validate(net, tokenizer, val, labels, args, device)
            record.update(metrics)
            M.print0(f"step {step + 1}: zero-shot AUC {metrics.get('zs_auc_mean', float('nan')):.3f}, "
                     f"R@1/5/10 v->r {metrics.get('v2r_R@1', 0):.3f}/{metrics.get('v2r_R@5', 0):.3f}/"
                     f"{metrics.get('v2r_R@10', 0):.3f}")
        if rank == 0:
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_mean:.3f}", lr=f"{lr:.1e}", T=f"{record['temperature']:.3f}")
        stop = M.any_rank(sigterm.raised, device)
        if (step + 1) % args.save_every == 0 or done or stop:
            checkpoint(step + 1)
        if stop:
            M.print0(f"SIGTERM: saved step {step + 1}, exiting; continue with --resume")
            break
    bar.close()
    if rank == 0:
        log.close()
        M.print0(f"done in {time.time() - t0:.0f}s; vision encoder: {out / 'vision_encoder.safetensors'}")
    M.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
