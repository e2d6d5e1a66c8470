"""3D CLIP pretraining of the CT vision encoder (BrgSA-style): ViT3D + a text encoder, symmetric InfoNCE.

The paper pretrains its 3D ViT on CT-RATE reports following BrgSA (no code released) and keeps only the vision encoder;
this script writes it as <out>/vision_encoder.safetensors, BrgSA/timm names (loads with model.load_vision_weights).

Deliberate choices:
1. Loss: symmetric InfoNCE with a learnable temperature, log(1/0.07) at start, scale clamped to <= 100.
2. Negatives come from every rank: embeddings are all-gathered with gradient, so W ranks x B equal one process with
   batch W*B. --micro-batch saves memory only: with several micro-batches per step, gradient caching (Gao et al.
   2021) embeds them all without gradient, takes InfoNCE over the global batch, then re-runs each with gradient (one
   extra forward pass), so every step's negatives are the whole global batch, as in one big batch.
3. Pooling: mean of the ViT tokens and masked mean of the text tokens, linear projections, then each modality is
   centred on its global-batch mean (in validation: the validation set's) before the L2 norm. Scans share anatomy and
   reports most sentences, so uncentred embeddings start nearly parallel and InfoNCE sits at log(B), gradients ~0.
4. Determinism: a seeded permutation per epoch, augmentation keyed by (seed, epoch, index), torch's RNG re-seeded
   from (seed, step, rank) each step: --resume continues exactly, whatever the number of data workers.
5. Validation: zero-shot AUC per abnormality, score = sim(volume, "X is present.") - sim(volume, "X is not
   present."), and volume <-> report recall@1/5/10 (reconstructions share a report, so any equal text counts).

Run:
  python clip3d.py                                               # 1 CPU, phantom world -> runs/clip3d
  python clip3d.py --preset real --data-root /data/ct-rate --text-encoder /models/CXR-BERT-general # 1 GPU
  torchrun --standalone --nproc_per_node 8 clip3d.py --preset real --data-root /data/ct-rate \\
      --text-encoder /models/CXR-BERT-general                    # 8 GPUs: 8 x 8 = global batch 64
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import rankdata
from torch.utils.data import Dataset
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer

import data
import model as M
import runtime
from runtime import HIDDEN, at_least, autocast, get_rank, print0, world_size

# The phantom world's overrides of BrgSA's settings (lr 5e-5, batch 64, 39 epochs, base ViT).
PHANTOM = dict(vit="tiny", lr=1e-3, batch_size=16, micro_batch=0, epochs=12, warmup_frac=0.1, max_text_len=256,
               eval_every=100, save_every=100, workers=0, augment=False)


def parse_args(argv=None) -> argparse.Namespace:
    p = runtime.make_parser(__doc__)
    g = runtime.data_flags(p)
    g.add_argument("--max-text-len", type=at_least(1), default=512, help="tokens of a report (findings + impressions)")
    g.add_argument("--workers", type=at_least(0), default=8, help="DataLoader workers per rank")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True, help="random training crops")
    g = p.add_argument_group("model")
    g.add_argument("--vit", default="base", choices=list(M.VIT_PRESETS), help="ViT3D preset")
    g.add_argument("--vit-init", default=None, help="ViT3D weights to start from (.pth/.safetensors, BrgSA layout)")
    g.add_argument("--text-encoder", help="local HF encoder dir, e.g. CXR-BERT; unset = <data-root>/text_encoder")
    g.add_argument("--embed-dim", type=at_least(1), default=256, help="shared embedding width")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=at_least(0.0), default=5e-5, help="peak learning rate (cosine schedule)")
    g.add_argument("--weight-decay", type=at_least(0.0), default=0.05)
    g.add_argument("--batch-size", type=at_least(1), default=64, help="global batch per optimizer step")
    g.add_argument("--micro-batch", type=at_least(0), default=8,
                   help="per-rank micro-batch, 0 = all of it (memory only: InfoNCE sees the global batch, choice 2)")
    g.add_argument("--epochs", type=at_least(1), default=39)
    g.add_argument("--warmup-frac", type=at_least(0.0, 1.0), default=0.03)
    g.add_argument("--grad-clip", type=at_least(0.0), default=1.0)
    g = runtime.run_flags(p, "runs/clip3d", "vision_encoder.safetensors, config.json, ckpt/", 1000, shard=False)
    g.add_argument("--eval-every", type=at_least(0), default=1000, help="steps between validations; 0 = at the end")
    g.add_argument("--max-steps", type=at_least(0), default=0, help=HIDDEN)  # stop after N steps (0: all epochs)
    return runtime.parse_with_preset(p, argv, PHANTOM)


# ---- Loss: symmetric InfoNCE over negatives gathered from every rank ---------------------------------------------
class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 with gradient: backward sums the gathered gradient over ranks, each keeps its slice."""

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
    return GatherWithGrad.apply(x) if world_size() > 1 else x


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE for this rank's pairs. image, text: (B, E) projections; logit_scale: exp(learned log-scale).
    Each modality is centred on its global-batch mean, then L2-normalised; rows are this rank's samples, columns the
    world's (W*B), so the mean over ranks is the loss (with DDP, the gradient too) of one process with all W*B pairs."""
    all_image, all_text = gather(image), gather(text)                       # (W*B, E)
    image_mean, text_mean = all_image.mean(0), all_text.mean(0)
    image, all_image = F.normalize(image - image_mean, dim=-1), F.normalize(all_image - image_mean, dim=-1)
    text, all_text = F.normalize(text - text_mean, dim=-1), F.normalize(all_text - text_mean, dim=-1)
    labels = torch.arange(image.shape[0], device=image.device) + get_rank() * image.shape[0]
    logits_image = logit_scale * image @ all_text.T                          # (B, W*B) image -> reports
    logits_text = logit_scale * text @ all_image.T                           # (B, W*B) report -> images
    return (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels)) / 2


# ---- Model: ViT3D + text encoder + projections + temperature -----------------------------------------------------
class CLIP3D(nn.Module):
    def __init__(self, vit: nn.Module, text: nn.Module, embed_dim: int):
        super().__init__()
        self.vit, self.text = vit, text
        self.image_proj = nn.Linear(vit.width, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.vit(volumes).mean(1))                   # (B, N, C) -> (B, E), not normalised yet

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.text_proj((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))  # masked mean -> (B, E)

    def forward(self, volumes, input_ids, attention_mask):
        return self.encode_image(volumes), self.encode_text(input_ids, attention_mask), self.logit_scale.exp()


# ---- Data: (volume, report text) pairs from the preprocessed cache, in a deterministic order ---------------------
def pairs(cache: data.VolumeCache, reports_csv) -> tuple[list[str], list[str]]:
    """(volume names, report texts) for the cached volumes that have a report; counts what was dropped."""
    texts = {n: " ".join(data.split_sentences(r["findings"]) + data.split_sentences(r["impressions"]))
             for n, r in data.read_reports(reports_csv).items()}
    names = [n for n in cache.names if texts.get(n)]
    print0(f"{reports_csv}: {len(names)} volume-report pairs ({len(cache.names) - len(names)} cached volumes "
           f"without a report dropped)")
    return names, [texts[n] for n in names]


class PairDataset(Dataset):
    """Item key (epoch, index) -> (volume (1, X, Y, Z), report text); crops use an RNG keyed by (seed, epoch, index)."""

    def __init__(self, cache, names, texts, train: bool, seed: int, augment: bool = False):
        self.cache, self.names, self.texts, self.seed, self.augment = cache, names, texts, seed, train and augment

    def __len__(self):
        return len(self.names)

    def __getitem__(self, key):
        epoch, i = key
        volume = data.online_transform(np.asarray(self.cache.load(self.names[i])), self.cache.preset,
                                       train=self.augment, rng=np.random.default_rng([self.seed, epoch, i]))
        return volume, self.texts[i]


def collate(items):
    return torch.stack([v for v, _ in items]), [t for _, t in items]


def micro_batches(n: int, start_step: int, total_steps: int, args, rank: int, world: int):
    """This rank's micro-batches of keys, step after step: step s takes global batch s of the epoch's seeded
    permutation, micro-step m on rank r its slice m * world + r, so 1 x W*B and W x B see the same samples in order."""
    for step in range(start_step, total_steps):
        epoch, k = divmod(step, n // args.batch_size)
        order = np.random.default_rng([args.seed, epoch]).permutation(n)[k * args.batch_size:(k + 1) * args.batch_size]
        for m in range(args.accum):
            s = (m * world + rank) * args.micro_batch
            yield [(epoch, int(i)) for i in order[s:s + args.micro_batch]]


# ---- Validation: zero-shot abnormality AUC and volume <-> report retrieval ---------------------------------------
def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged; NaN when a class has one label value only."""
    pos = labels == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((rankdata(scores)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def recall_at(sim: np.ndarray, same: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """{k: fraction of rows whose top-k columns contain a correct one (same[i, j] = True)}, every k from one sort of
    the rows; NaN if a similarity is not finite. Ties are broken at random (seeded): a collapsed model scores about
    chance, not by column order."""
    if not np.isfinite(sim).all():
        return {k: float("nan") for k in ks}
    top = np.lexsort((np.random.default_rng(0).random(sim.shape), -sim))[:, :max(ks)]   # by -sim, then the random key
    hit = np.take_along_axis(same, top, axis=1)
    return {k: float(hit[:, :k].any(axis=1).mean()) for k in ks}


def encode_texts(net: CLIP3D, tokenizer, texts: list[str], max_len: int, device, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        tok = tokenizer(texts[i:i + batch], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with autocast(device):
            out.append(net.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def validate(net: CLIP3D, tokenizer, val: PairDataset, labels: dict, args, device) -> dict:
    """Every rank embeds a shard of the validation volumes; rank 0 computes the metrics (other ranks get {})."""
    net.eval()
    rank, world = get_rank(), world_size()
    shard = list(range(rank, len(val), world))
    keys = [[(0, j) for j in shard[i:i + args.micro_batch]] for i in range(0, len(shard), args.micro_batch)]
    image = []
    for volumes, _ in runtime.data_loader(val, batch_sampler=keys, num_workers=args.workers, collate_fn=collate):
        with autocast(device):
            image.append(net.encode_image(volumes.to(device)).float().cpu())
    image = torch.cat(image) if image else torch.zeros(0, args.embed_dim)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (shard, image))
        image = torch.cat([e for _, e in parts])[np.argsort([i for s, _ in parts for i in s])]  # back in val order
    if rank != 0:
        net.train()
        return {}
    text = encode_texts(net, tokenizer, val.texts, args.max_text_len, device)
    prompts = encode_texts(net, tokenizer, [f"{a} is{no} present." for no in ("", " not") for a in data.ABNORMALITIES],
                           args.max_text_len, device)                      # 18 "present", then 18 "not present"
    net.train()                                    # after the text encoder's passes: no dropout in validation
    text_mean = text.mean(0)                       # centre as in training: on the evaluated set's means
    image, text, prompts = (F.normalize(image - image.mean(0), dim=-1), F.normalize(text - text_mean, dim=-1),
                            F.normalize(prompts - text_mean, dim=-1))
    n_cls = len(data.ABNORMALITIES)
    score = (image @ prompts[:n_cls].T - image @ prompts[n_cls:].T).numpy()          # (N, 18)
    y = np.stack([labels[n] for n in val.names])                                     # (N, 18)
    per_class = {a: auc(score[:, c], y[:, c]) for c, a in enumerate(data.ABNORMALITIES)}
    sim = (image @ text.T).numpy()                                                   # (N volumes, N reports)
    same = np.array(val.texts, dtype=object)[:, None] == np.array(val.texts, dtype=object)[None, :]
    metrics = {"zs_auc_mean": float(np.nanmean(list(per_class.values()))), "zs_auc": per_class}
    for direction, (s, t) in (("v2r", (sim, same)), ("r2v", (sim.T, same.T))):   # volume -> report, report -> volume
        metrics.update({f"{direction}_R@{k}": r for k, r in recall_at(s, t).items()})
    return metrics


# ---- One optimizer step and the loop -----------------------------------------------------------------------------
def train_step(ddp: nn.Module, net: CLIP3D, optimizer, micro_batches: list[tuple], tokenizer, args, step: int,
               device: torch.device) -> dict:
    """One optimizer step on this rank's (volumes, texts) micro-batches, one finite-checked update, temperature
    clamped. Several micro-batches use gradient caching (choice 2): embed them all without gradient, take InfoNCE over
    the whole batch and its gradient w.r.t. the embeddings, then re-run each micro-batch (same RNG) with gradient and
    back-propagate its rows of that gradient. Returns the global batch's loss and more."""
    world = world_size()
    torch.manual_seed(args.seed * 1_000_003 + step * world + get_rank())  # dropout etc.: a function of (step, rank)
    inputs = []
    for volumes, texts in micro_batches:
        tok = tokenizer(texts, padding=True, truncation=True, max_length=args.max_text_len, return_tensors="pt")
        inputs.append((volumes.to(device), tok["input_ids"].to(device), tok["attention_mask"].to(device)))
    last = len(inputs) - 1

    def forward(m: int) -> list[torch.Tensor]:   # (image, text, scale) in fp32; DDP syncs gradients on the last
        with (nullcontext() if m == last or world == 1 else ddp.no_sync()), autocast(device):
            return [x.float() for x in ddp(*inputs[m])]

    if last == 0:
        loss = clip_loss(*forward(0))
        loss.backward()
    else:   # gradient caching: the loss of the whole batch, whatever the micro-batch
        states, cached = [], []
        with torch.no_grad():
            for m in range(len(inputs)):
                states.append(runtime.rng_state())
                cached.append(forward(m)[:2])
        image, text = (torch.cat(x).requires_grad_() for x in zip(*cached))          # (accum * B, E) each
        scale = net.logit_scale.exp().detach().requires_grad_()
        loss = clip_loss(image, text, scale)
        loss.backward()                                              # d loss / d embeddings, d loss / d scale
        sizes = [len(x) for x, _ in cached]
        for m, grads in enumerate(zip(image.grad.split(sizes), text.grad.split(sizes))):
            runtime.set_rng_state(states[m])                         # the same dropout as in the first pass
            torch.autograd.backward(forward(m), [*grads, scale.grad / len(inputs)])
    params = [p for p in net.parameters() if p.requires_grad]
    grad_norm, applied = runtime.optimizer_step(optimizer, params, args.grad_clip, args.nan_policy, step, loss.detach())
    with torch.no_grad():
        net.logit_scale.clamp_(0, math.log(100))
    return {"loss": runtime.all_reduce(loss.detach().clone(), "avg").item(),
            "temperature": 1 / net.logit_scale.exp().item(), "grad_norm": grad_norm.item(), "skipped": not applied}


def main(argv=None) -> dict:
    args = parse_args(argv)
    runtime.earlier_run(Path(args.out), args.resume, args.overwrite)   # before any work; Run checks it again
    rank, _, world, device = runtime.setup_distributed()
    args.micro_batch = args.micro_batch or max(1, args.batch_size // world)
    args.accum = args.batch_size // (args.micro_batch * world)
    if args.batch_size < 2:   # a pair's negatives are the batch's other reports: with none the loss is always 0
        raise SystemExit("--batch-size 1: the contrastive loss needs at least 2 pairs per batch")
    if args.accum * args.micro_batch * world != args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of micro-batch x world "
                         f"({args.micro_batch} x {world})")
    paths = data.paths(args.data_root, args.preset)
    args.text_encoder = args.text_encoder or str(paths["text_encoder"])
    if not (Path(args.text_encoder) / "config.json").is_file():
        raise SystemExit(f"{args.text_encoder} is not a text encoder directory: pass --text-encoder DIR (CXR-BERT)")
    train_cache, valid_cache = data.VolumeCache(paths["train_cache"]), data.VolumeCache(paths["valid_cache"])
    train = PairDataset(train_cache, *pairs(train_cache, paths["train_reports"]), train=True, seed=args.seed,
                        augment=args.augment)
    val = PairDataset(valid_cache, *pairs(valid_cache, paths["valid_reports"]), train=False, seed=args.seed)
    labels = data.read_labels(paths["valid_labels"])
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(train)} training pairs < one global batch of {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # model: ViT3D (optionally from BrgSA weights) + text encoder; the BERT pooler is unused (masked mean instead)
    runtime.seed_everything(args.seed)
    vit = M.ViT3D.from_preset(args.vit)
    if args.vit_init:
        M.load_vision_weights(vit, args.vit_init)
    tokenizer = AutoTokenizer.from_pretrained(args.text_encoder)
    text = AutoModel.from_pretrained(args.text_encoder)
    if getattr(text, "pooler", None) is not None:
        text.pooler = None
    net = CLIP3D(vit, text, args.embed_dim).to(device).train()   # from_pretrained gave the text encoder eval mode
    ddp = runtime.wrap_ddp(net, device)
    opt = runtime.adamw(list(net.parameters()), args.lr, args.weight_decay, betas=(0.9, 0.95))
    run = runtime.Run(args.out, args.resume, args.overwrite, args.stop_at, args=vars(args),
                      curves=("loss", "lr", "zs_auc_mean", "v2r_R@1", "v2r_R@5", "r2v_R@5"),
                      save_every=args.save_every, save_last=True,   # the encoder file is written with each save
                      inputs=(args.text_encoder, args.vit_init))
    if run.state is not None:
        net.load_state_dict(run.state["model"])
        opt.load_state_dict(run.state["optimizer"])
        run.state = None
    if rank == 0:
        data.write_json(Path(args.out) / "config.json", vars(args))
    print0(f"{len(train)} train / {len(val)} valid pairs, world {world} x micro-batch {args.micro_batch} x accum "
           f"{args.accum} = batch {args.batch_size}, {total_steps} steps ({steps_per_epoch}/epoch), device {device}")

    sampler = micro_batches(len(train), run.start, total_steps, args, rank, world)
    batches = iter(runtime.data_loader(train, batch_sampler=sampler, num_workers=args.workers, collate_fn=collate,
                                       pin_memory=device.type == "cuda"))

    def snapshot() -> dict:   # a resumable state, and the encoder alone beside it (atomic, BrgSA names, its step)
        if rank == 0:
            M.save_vision_weights(net.vit, Path(args.out) / "vision_encoder.safetensors",
                                  {"step": n, "total_steps": total_steps})
        return {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": n // steps_per_epoch}

    metrics, t0 = {}, time.time()
    for step in tqdm(range(run.start, total_steps), initial=run.start, total=total_steps, disable=rank != 0):
        lr = runtime.cosine_lr(step, total_steps, int(args.warmup_frac * total_steps), args.lr)
        runtime.set_lr(opt, lr)
        n = step + 1   # steps done; --eval-every 0: validate at the end only
        record = {"step": n, **train_step(ddp, net, opt, [next(batches) for _ in range(args.accum)], tokenizer,
                                          args, step, device), "lr": lr, "time_s": round(time.time() - t0, 2)}
        run.skipped += record["skipped"]   # saved with each checkpoint, as in sft.py and grpo.py
        if n == total_steps or args.eval_every and n % args.eval_every == 0:
            metrics = validate(net, tokenizer, val, labels, args, device)
            record.update(metrics)
            print0(f"step {n}: zero-shot AUC {metrics.get('zs_auc_mean', float('nan')):.3f}, R@1/5/10 v->r "
                   + "/".join(f"{metrics.get(f'v2r_R@{k}', 0):.3f}" for k in (1, 5, 10)))
        run.log(record)
        if run.end_step(n, total_steps, snapshot, device):
            break
    else:
        print0(f"done in {time.time() - t0:.0f}s; vision encoder: {Path(args.out) / 'vision_encoder.safetensors'}")
    run.close()
    runtime.cleanup_distributed()
    return metrics


if __name__ == "__main__":
    main()
    sys.exit(runtime.exit_code())
