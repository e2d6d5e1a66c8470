"""Med3D-R1 benchmarks: speed and memory against the alternatives a user would pick, measured in one run.

What it measures (every figure is the median of --repeats runs; ratios are alternative / ours, > 1 = we are faster):
 1. preprocess  one CT-RATE-sized int16 .nii.gz (512x512x300, 0.7x0.7x1.0 mm, synthesised in a temp dir):
                (a) one-time preprocessing, data.py vs CT-CLIP's script (float64 get_fdata, float32 trilinear
                torch resample, crop/pad) vs the equivalent MONAI transforms: seconds, peak RSS, max HU difference
                of the outputs, and the share of our time spent decoding the gzip;
                (b) what a training step pays per sample: our int16 cache (memmap + online_transform) vs CT-CLIP's
                training input (a float32 .npz) and vs decoding and resampling the .nii.gz on the fly;
                (c) sft.py's reading of a step's volumes around a GPU step (emulated by a wait, --gpu-ms-per-sample):
                in the step, or read ahead in its thread during the step before.
 2. sft         one SFT optimizer step (bridge trainable; ViT and LLM frozen) with the tiny and base ViT presets,
                with and without --cache-features (the frozen ViT's tokens computed once and reused): sft.train_step.
 3. grpo        one GRPO update on the same tiny LLM, text-only prompts, same G, lengths, beta, lr, AdamW and grad
                clip, neither with activation checkpointing: ours (grpo.train_step) vs TRL's GRPOTrainer
                (transformers generate, no vLLM).
 4. cuda        (only when torch.cuda.is_available()) SFT samples/s, GRPO generated tokens/s, peak GPU memory and
                model-FLOPs utilisation with the base ViT and a randomly initialised LLM of Qwen2.5-3B's shape,
                through the same sft.train_step and grpo.train_step.
 5. memory      a per-GPU plan of the real presets' SFT and GRPO steps by component, under DDP and FSDP, for an LLM
                config.json, the ViT preset, precision, world size, grad-ckpt, GRPO micro-batch and a reward model,
                from per-token activation figures measured on the CPU at real width (MEASURED; --measure redoes it).

Run:
  pip install -r requirements-bench.txt        # MONAI, TRL (benchmark only; keeps the installed torch)
  python bench.py                              # all, a few minutes on 2 CPU cores -> runs/bench/bench.json
  python bench.py --which preprocess --repeats 5
  python bench.py --which cuda                 # 1 GPU
  python bench.py --which memory --rm-params 7.11   # the plan, with RM-Mistral-7B as the consistency reward model
"""
from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import math
import os
import platform
import re
import statistics
import tempfile
import threading
import time
import weakref
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import data
import grpo
import model
import runtime
import sft
from runtime import at_least

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what and where
    p.add_argument("--which", default="all", choices=["preprocess", "sft", "grpo", "cuda", "memory", "all"])
    p.add_argument("--out", default="runs/bench/bench.json")
    p.add_argument("--repeats", type=at_least(1), default=3, help="N of every median-of-N")
    p.add_argument("--workdir", default=None, help="keep the synthetic volume here (default: a temp dir)")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="torch CPU threads (default: torch's, = the cores)")
    # 1. preprocessing
    p.add_argument("--shape", default="512,512,300", help="synthetic volume X,Y,Z")
    p.add_argument("--spacing", default="0.7,0.7,1.0", help="synthetic volume spacing x,y,z mm")
    p.add_argument("--preset", default="real", help="data.PRESETS key the volume is preprocessed to")
    p.add_argument("--gpu-ms-per-sample", type=at_least(0.0), default=24.0,
                   help="GPU time of an SFT sample that volume reading can hide behind (docs/NOTES.md: H100 estimate)")
    # 2. SFT
    p.add_argument("--sft-presets", default="tiny,base", help="ViT presets to time")
    p.add_argument("--sft-batch", type=at_least(1), default=2)
    p.add_argument("--sft-steps", type=at_least(1), default=3,
                   help="steps per setting (median; the first includes warm-up)")
    # 3. GRPO
    p.add_argument("--grpo-prompts", type=at_least(1), default=2, help="prompts per step")
    p.add_argument("--grpo-g", type=at_least(2), default=4, help="G completions per prompt")
    p.add_argument("--grpo-new-tokens", type=at_least(1), default=48)
    p.add_argument("--grpo-steps", type=at_least(1), default=4, help="timed steps per side (after one untimed)")
    p.add_argument("--beta", type=at_least(0.0), default=0.04)
    p.add_argument("--lr", type=at_least(0.0), default=1e-6)
    p.add_argument("--llm", default=None, help="HF LLM dir for the GRPO/SFT runs (default: the phantom tiny LLM)")
    p.add_argument("--data-root", default="runs/phantom", help="phantom world (built if missing) for texts and MCQs")
    # 4. CUDA
    p.add_argument("--cuda-llm-layers", type=at_least(1), default=36, help="Qwen2.5-3B has 36")
    p.add_argument("--cuda-new-tokens", type=at_least(1), default=256, help="completion length of the GRPO rollout")
    p.add_argument("--peak-tflops", type=at_least(1.0), default=989.0,
                   help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    # 5. memory plan of the real presets
    p.add_argument("--llm-config", default=str(QWEN25_CONFIG), help="the LLM's config.json (default: Qwen2.5-3B's)")
    p.add_argument("--vit-preset", default="base", choices=list(model.VIT_PRESETS))
    p.add_argument("--world", type=at_least(1), default=8,
                   help="GPUs, one process each (FSDP shards over them)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                   help="bf16: CUDA's (bf16 autocast, fp32 trained weights, frozen ones held in bf16); fp32: the CPU's")
    p.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default: each stage's real preset, SFT off, GRPO on)")
    p.add_argument("--micro-batch", type=at_least(0), default=None,
                   help="GRPO rows per pass, 0 = all (default: grpo.py's)")
    p.add_argument("--rm-params", type=at_least(0.0), default=0.0,
                   help="billions of parameters of an rm: reward model, held like frozen weights (RM-Mistral-7B 7.11)")
    p.add_argument("--prompt-text-tokens", type=at_least(0), default=128,
                   help="GRPO prompt tokens besides the image's (Qwen2.5 template + MMVQA question: ~440 characters)")
    p.add_argument("--sft-tokens", type=at_least(1), default=None,
                   help="tokens per SFT example (default: sft.py's --max-len)")
    p.add_argument("--gpu-gb", type=at_least(1.0), default=80.0, help="GPU memory; a plan fits under 90 %% of it")
    p.add_argument("--measure", action="store_true", help="measure the per-token figures again first (minutes)")
    return p.parse_args(argv)


# =====================================================================================================================
# Measurement helpers: median wall time, peak resident memory (the larger of Linux's VmHWM, reset through
# /proc/self/clear_refs, and VmRSS sampled every millisecond, so a kernel whose VmHWM misses the peak still gives one)
# =====================================================================================================================

def _status_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


@contextmanager
def rss_peak_mb():
    """Yields a dict whose "mb" is, after the block, the peak resident memory during it above the RSS before it: the
    larger of VmHWM (reset on entry) and the highest RSS a thread read every millisecond; nan where /proc is absent."""
    out, done = {"mb": float("nan")}, threading.Event()
    try:
        statm = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        yield out
        return
    page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
    rss = lambda: int(os.pread(statm, 128, 0).split()[1]) * page_mb   # ~2 us a read
    before = highest = rss()
    try:
        Path("/proc/self/clear_refs").write_text("5")                # resets VmHWM (peak RSS) to the current RSS
        hwm = lambda: _status_mb("VmHWM")
    except OSError:
        hwm = rss

    def sample():
        nonlocal highest
        while not done.wait(0.001):
            highest = max(highest, rss())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        done.set()
        sampler.join()
        out["mb"] = max(highest, rss(), hwm()) - before
        os.close(statm)


def measure(fn, repeats: int, warmup: int = 1) -> dict:
    """Run fn() `warmup` times untimed (first-call costs: lazy imports, allocator growth, caches), then `repeats`
    times: median seconds, median peak RSS above the RSS before the call (MB, `rss_peak_mb`), last output."""
    return measure_each({"fn": fn}, repeats, warmup)["fn"]


def measure_each(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """measure() of each function, their repeats taken in turn (one of each per round, the order rotated from round to
    round), so that neither a slow phase of the machine nor what the function before left in memory (this VM's page
    faults cost 2-6x more after some functions than after others) falls on one side more than on another."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times, peaks, outs = ({k: [] for k in fns} for _ in range(3))
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            fn, outs[k] = fns[k], None
            gc.collect()
            with rss_peak_mb() as peak:
                t0 = time.perf_counter()
                outs[k] = fn()
                times[k].append(time.perf_counter() - t0)
            peaks[k].append(peak["mb"])
    return {k: {"sec": statistics.median(times[k]), "sec_all": [round(t, 4) for t in times[k]],
                "peak_mb": statistics.median(peaks[k]), "out": outs[k]} for k in fns}


def max_hu_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute HU difference of two preprocessed volumes; inf when the shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


def numbers(text: str, kind=float) -> tuple:
    return tuple(kind(v) for v in text.split(","))


# =====================================================================================================================
# 1. Preprocessing
# =====================================================================================================================

def synth_ctrate_volume(root: Path, shape=(512, 512, 300), spacing=(0.7, 0.7, 1.0), seed: int = 0):
    """Write a CT-RATE v2-like int16 HU volume (air, body, two lungs, spine, noise) in the CT-RATE folder layout;
    returns its path and its metadata-CSV row (strings as the real CSV holds them)."""
    name = "valid_1_a_1.nii.gz"
    path = root / "dataset" / "valid_fixed" / "valid_1" / "valid_1_a" / name
    meta = {"VolumeName": name, "XYSpacing": f"[{spacing[0]}, {spacing[1]}]", "ZSpacing": spacing[2],
            "RescaleSlope": 1.0, "RescaleIntercept": -1024.0, "Manufacturer": "PHILIPS",
            "Rows": shape[1], "Columns": shape[0]}
    if path.is_file():
        return path, meta
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    vol = np.empty(shape, np.int16)
    for z in range(shape[2]):
        r = 0.25 + 0.1 * np.sin(np.pi * z / shape[2])           # lungs widen towards mid-chest
        s = np.full(shape[:2], -1024.0, np.float32)
        s[(x / 0.85) ** 2 + (y / 0.6) ** 2 < 1] = 40.0          # soft tissue
        s[((np.abs(x) - 0.42) / r) ** 2 + (y / (1.6 * r)) ** 2 < 1] = -850.0
        s[x ** 2 + (y - 0.45) ** 2 < 0.08 ** 2] = 700.0        # spine
        s += rng.normal(0, 20, shape[:2]).astype(np.float32)
        vol[..., z] = np.clip(s, -1024, 3071).astype(np.int16)
    img = nib.Nifti1Image(vol, np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]))  # LPS voxel order, as CT-RATE
    img.header.set_data_dtype(np.int16)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, path)
    return path, meta


def resampled_size(shape, spacing, target_spacing) -> list[int]:
    return [int(round(n * s / t)) for n, s, t in zip(shape, spacing, target_spacing)]


def crop_or_pad(x: torch.Tensor, shape, fill: float) -> torch.Tensor:
    """Centre crop each axis to `shape`, padding with `fill` where the volume is smaller."""
    for axis, n in enumerate(shape):
        size = x.shape[axis]
        if size > n:
            x = x.narrow(axis, (size - n) // 2, n)
        elif size < n:
            pad = [0, 0] * x.dim()
            before = (n - size) // 2
            pad[2 * (x.dim() - 1 - axis)], pad[2 * (x.dim() - 1 - axis) + 1] = before, n - size - before
            x = F.pad(x, pad, value=fill)
    return x


def ctclip_preprocess(path: Path, spacing, preset) -> np.ndarray:
    """CT-CLIP's preprocessing script in its dtypes: float64 get_fdata, float32 trilinear torch resample to the target
    spacing, crop/pad, clamp (after the resample, as ours: CT-CLIP clamps before, which moves edges by up to ~24 HU)."""
    hu = nib.load(path).get_fdata().astype(np.float32)                 # float64 decode; v2 volumes are already HU
    x = torch.from_numpy(hu)[None, None]                                # (1, 1, X, Y, Z)
    x = F.interpolate(x, size=resampled_size(hu.shape, spacing, preset.spacing), mode="trilinear", align_corners=False)
    x = crop_or_pad(x[0, 0], preset.shape, -1024.0)
    return x.clamp(-1000, 1000).round().to(torch.int16).numpy()


def monai_preprocess(path: Path, spacing, preset):
    """The same steps as MONAI transforms; returns path -> int16 array. (Resize, not Spacing: Spacing keeps the first
    voxel centre fixed where torch's interpolate keeps the outer edges fixed, a half-voxel grid shift.)"""
    import monai.transforms as mt
    t = mt.Compose([mt.LoadImage(image_only=True, dtype=np.float32), mt.EnsureChannelFirst(),
                    mt.Resize(resampled_size(nib.load(path).shape, spacing, preset.spacing), mode="trilinear"),
                    mt.ResizeWithPadOrCrop(preset.shape, mode="constant", constant_values=-1024),
                    mt.ScaleIntensityRange(-1000, 1000, -1000, 1000, clip=True)])
    return lambda: torch.as_tensor(t(str(path))[0]).round().to(torch.int16).numpy()


def bench_preprocess(args, workdir: Path) -> dict:
    preset = data.PRESETS[args.preset]
    shape, spacing, n = numbers(args.shape, int), numbers(args.spacing), args.repeats
    path, meta = synth_ctrate_volume(workdir, shape, spacing)

    def ours():
        hu, sp = data.read_ctrate_volume(path, meta)
        return data.preprocess_volume(hu, sp, preset)

    res = {"volume": {"shape": list(shape), "spacing_mm": list(spacing), "preset": preset.name,
                      "nii_gz_mb": round(path.stat().st_size / 2**20, 1)}}
    fns = {"ours": ours, "ctclip": lambda: ctclip_preprocess(path, spacing, preset),
           "decode": lambda: np.asanyarray(nib.load(path).dataobj)}   # gzip + NIfTI decode of the int16 voxels
    try:
        fns["monai"] = monai_preprocess(path, spacing, preset)
    except ImportError as e:
        res["monai_skipped"] = f"MONAI not installed ({e}); pip install -r requirements-bench.txt"
    runs = measure_each(fns, n)
    decode = runs.pop("decode")
    ref = runs["ours"]["out"]
    for k, r in runs.items():
        res[k] = {"sec_per_volume": r["sec"], "sec_all": r["sec_all"], "peak_mb": r["peak_mb"],
                  "max_hu_diff_vs_ours": max_hu_diff(r["out"], ref), "ratio_vs_ours": r["sec"] / runs["ours"]["sec"]}
    res["decode"] = {"sec": decode["sec"], "share_of_ours": decode["sec"] / runs["ours"]["sec"]}
    del runs, decode, ref
    gc.collect()

    # (b) per-sample cost in a training step: our cache (memmap + online transform) vs CT-CLIP's training input (a
    # float32 .npz its preprocessing wrote: HU / 1000, (Z, X, Y); here of our preset's grid, CT-CLIP's own at 0.75 x
    # 0.75 x 1.5 mm holds 8x the voxels) and vs decoding and resampling the .nii.gz per sample
    csv = workdir / "metadata.csv"
    csv.write_text(",".join(meta) + "\n" + ",".join(f'"{v}"' for v in meta.values()) + "\n")
    data.preprocess_dir(workdir / "dataset" / "valid_fixed", workdir / "cache", metadata=csv, preset=preset,
                        progress=False)
    cache, rng = data.VolumeCache(workdir / "cache"), np.random.default_rng(0)
    npz = workdir / "ctclip_train.npz"
    np.savez(npz, (np.asarray(cache.load(meta["VolumeName"]), np.float32) / 1000).transpose(2, 0, 1))

    def ctclip_npz():   # CT-CLIP's training loader: load, back to (X, Y, Z) and HU, clip; our crop and normalisation
        vol = np.clip(np.load(npz)["arr_0"].transpose(1, 2, 0) * 1000, -1000, 1000)
        return data.online_transform(vol, preset, train=True, rng=rng)

    cached, npz_run = measure_each({"cache": lambda: data.online_transform(cache.load(meta["VolumeName"]), preset,
                                                                          train=True, rng=rng),
                                    "npz": ctclip_npz}, n * 3).values()

    def on_the_fly():
        vol = ctclip_preprocess(path, spacing, preset)                  # CT-CLIP decodes + resamples per sample
        return data.online_transform(vol, preset, train=True, rng=rng)

    fly = measure(on_the_fly, n)
    res["per_sample"] = {"cache_sec": cached["sec"], "cache_peak_mb": cached["peak_mb"], "npz_sec": npz_run["sec"],
                         "npz_peak_mb": npz_run["peak_mb"], "npz_ratio": npz_run["sec"] / cached["sec"],
                         "on_the_fly_sec": fly["sec"], "on_the_fly_peak_mb": fly["peak_mb"],
                         "ratio": fly["sec"] / cached["sec"]}

    # (c) sft.py's volume reading around a GPU step: in the step (serial) or read ahead in its thread
    gpu, steps = args.gpu_ms_per_sample / 1e3, 8
    res["read_ahead"] = {"gpu_ms_per_sample": args.gpu_ms_per_sample}
    for k, ahead in (("serial", False), ("read_ahead", True)):
        sec = measure(lambda: sft_reading(cache, meta["VolumeName"], gpu, ahead, steps), n)["sec"]
        res["read_ahead"][f"{k}_ms_per_sample"] = 1e3 * sec / steps
    return res


def sft_reading(cache, name: str, gpu_s: float, ahead: bool, steps: int) -> None:
    """`steps` steps of one volume each, as sft.train reads them (sft.EncoderTokens; the ViT's work is the GPU's,
    so a strided view stands in for it); the GPU's step is a wait that holds no GIL, as a CUDA synchronisation does.
    With `ahead` each step after the first has its volume read in sft's reader thread during the step before."""
    tokens = sft.EncoderTokens(lambda x: x[:, :, ::16, ::16, ::8].flatten(2), cache, torch.device("cpu"), cache=False)
    for step in range(steps):
        tokens([name])
        if ahead and step + 1 < steps:
            tokens.prefetch([[name]])
        time.sleep(gpu_s)


# =====================================================================================================================
# 2. SFT step: bridge trainable, ViT and LLM frozen; the ViT forward is what --cache-features saves
# =====================================================================================================================

def sft_setup(vlm, examples: list[dict]):
    """Set the VLM up as sft.py does; the encoded examples and one random int16 volume of the ViT's preset each."""
    vlm.requires_grad_(False)
    vlm.bridge.requires_grad_(True)
    vlm.vit.eval(), vlm.llm.eval(), vlm.bridge.train()
    preset = next(p for p in data.PRESETS.values() if tuple(p.crop) == tuple(vlm.vit.img_size))
    encoded = [sft.encode(vlm.tokenizer, vlm.prompt(e["user"]), e["segments"], 1.10, 2048) for e in examples]
    rng = np.random.default_rng(0)
    volumes = [rng.integers(-1000, 1000, preset.shape, dtype=np.int16) for _ in examples]
    return preset, encoded, volumes


class InMemoryVolumes(dict):
    """int16 volumes by name, read like a data.VolumeCache (load, batch, preset), so that sft.EncoderTokens encodes
    them."""

    def __init__(self, volumes: dict, preset):
        super().__init__(volumes)
        self.preset = preset

    load = dict.__getitem__
    batch = data.VolumeCache.batch


def sft_step(vlm, optimizer, preset, batch: list, vit_tokens=None) -> torch.Tensor:
    """One optimizer step of sft.py (sft.train_step); vit_tokens = the cached frozen-encoder output, or None to
    encode as sft.py does (sft.EncoderTokens). Returns the ViT tokens (what --cache-features keeps)."""
    device = vlm.device
    input_ids, mask, weights = sft.collate([enc for enc, _ in batch], vlm.tokenizer.pad_token_id)
    if vit_tokens is None:
        names = [str(i) for i in range(len(batch))]
        volumes = InMemoryVolumes({n: vol for n, (_, vol) in zip(names, batch)}, preset)
        vit_tokens = sft.EncoderTokens(vlm.vit, volumes, device, cache=False)(names)   # (B, N, C)
    params = [p for p in vlm.parameters() if p.requires_grad]
    step_args = argparse.Namespace(grad_clip=1.0, nan_policy="skip")
    sft.train_step(sft.WeightedLM(vlm, vlm.bridge), optimizer, [(input_ids, mask, weights, vit_tokens)], params,
                   step_args, 0, device)
    return vit_tokens


def bench_sft(args, paths: dict, llm_dir) -> dict:
    B, steps = args.sft_batch, args.sft_steps
    examples = sft.sft_examples(paths, with_vqa=True)[: B * (steps + 1)]   # + the untimed first step
    res = {"batch": B}
    for name in args.sft_presets.split(","):
        vlm = model.VLM.build(llm_dir, vit_preset=name)
        preset, encoded, volumes = sft_setup(vlm, examples)
        opt = runtime.adamw([p for p in vlm.parameters() if p.requires_grad], 1e-4, 0.01)   # as sft.py
        batches = [list(zip(encoded, volumes))[k * B:(k + 1) * B] for k in range(steps + 1)]
        it, feats = iter(batches), []                                   # feats: what epoch 1 leaves in the cache
        plain = measure(lambda: feats.append(sft_step(vlm, opt, preset, next(it))), steps)
        it = iter(zip(batches, feats))
        cached = measure(lambda: sft_step(vlm, opt, preset, *next(it)), steps)
        res[name] = {"sec_per_step": plain["sec"], "steps_per_s": 1 / plain["sec"], "sec_all": plain["sec_all"],
                     "cached_sec_per_step": cached["sec"], "cached_steps_per_s": 1 / cached["sec"],
                     "cached_sec_all": cached["sec_all"], "speedup": plain["sec"] / cached["sec"],
                     "vit_params_m": sum(p.numel() for p in vlm.vit.parameters()) / 1e6}
        vlm = opt = feats = None   # freed before the next preset's model is built
        gc.collect()
    return res


# =====================================================================================================================
# 3. GRPO update step, text-only, on one tiny LLM: ours vs TRL's GRPOTrainer
# =====================================================================================================================

def grpo_rewards(texts: list[str], finished: list[bool], qs: list[dict], reports: list[str], consistency):
    """r = r_fmt + r_acc + r_con with grpo.py's reward functions (truncated completions get no format reward)."""
    r_fmt = [grpo.format_reward(t) * f for t, f in zip(texts, finished)]
    r_acc = [grpo.accuracy_reward(t, q["answer"], q["options"]) for t, q in zip(texts, qs)]
    r_con = consistency([grpo.think_text(t) for t in texts], reports)
    return torch.tensor(r_fmt) + torch.tensor(r_acc) + torch.tensor(r_con)


def grpo_args(args, new_tokens: int, *extra: str) -> argparse.Namespace:
    """grpo.py's real-preset flags with the benchmark's G, completion length and beta."""
    return grpo.parse_args(["--preset", "real", "--group-size", str(args.grpo_g), "--max-new-tokens", str(new_tokens),
                            "--temperature", "1.0", "--kl-beta", str(args.beta), *extra])


def our_grpo_step(vlm, ref, optimizer, qs: list[dict], consistency, grpo_args, step: int,
                  x: torch.Tensor | None = None) -> dict:
    """One step of grpo.py (grpo.train_step: rollout -> rewards -> advantages -> loss -> update); text-only prompts
    when x is None."""
    out = grpo.train_step(grpo.PolicyLogprobs(vlm), ref, optimizer, qs, x, consistency, grpo_args, step,
                          list(range(len(qs))))
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()
    return {"generate_sec": out["generate_sec"], "rollout_sec": out["rollout_sec"], "update_sec": out["update_sec"],
            "completion_len": out["sums"]["completion_len"] / out["sums"]["n"], "tokens": out["tokens"]}


def trl_grpo(args, hf_dir: Path, items: list[dict], consistency, out_dir: Path) -> dict:
    """The same update with TRL's GRPOTrainer: same LLM, prompts, rewards, G, lengths, beta, lr, AdamW, clip, and
    no activation checkpointing."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):                                  # rollout + scoring + update, like ours
        def __init__(self): self.t0, self.times = 0.0, []
        def on_step_begin(self, *a, **k): self.t0 = time.perf_counter()
        def on_step_end(self, *a, **k): self.times.append(time.perf_counter() - self.t0)

    def reward(completions, completion_ids, answer, options, report, **_):
        texts = [c[0]["content"] for c in completions]                  # decoded without the EOS, which the ids
        finished = [bool(ids) and ids[-1] == eos for ids in completion_ids]   # keep: truncated ones as ours read them
        qs = [{"answer": a, "options": json.loads(o)} for a, o in zip(answer, options)]
        return grpo_rewards(texts, finished, qs, list(report), consistency).tolist()

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": data.mmvqa_prompt(q, think=True)}],
                             "answer": q["answer"], "options": json.dumps(q["options"]),
                             "report": q["report"]} for q in items])
    cfg = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.grpo_prompts * args.grpo_g,
                     num_generations=args.grpo_g, max_completion_length=args.grpo_new_tokens, temperature=1.0,
                     top_p=1.0, top_k=0, beta=args.beta, epsilon=0.2, num_iterations=1, loss_type="grpo",
                     learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch",
                     max_grad_norm=1.0, max_steps=args.grpo_steps + 1, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
                     use_bias_correction_kl=False,       # TRL's default multiplies the KL by the ratio; ours: k3
                     **{ckpt_name(GRPOConfig): False})   # TRL's default is on; ours runs --no-grad-ckpt
    timer, tokenizer = StepTimer(), AutoTokenizer.from_pretrained(hf_dir)
    eos = tokenizer.eos_token_id
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[reward], args=cfg, train_dataset=ds,
                          processing_class=tokenizer, callbacks=[timer])
    rollout, rollout_times = trainer._generate_and_score_completions, []   # generate + rewards + reference log-probs

    def timed_rollout(*a, **k):
        t0 = time.perf_counter()
        out = rollout(*a, **k)
        rollout_times.append(time.perf_counter() - t0)
        return out
    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    tot = timer.times[1:]
    return {"sec_per_step": statistics.median(tot), "sec_all": [round(t, 4) for t in tot],
            "grad_ckpt": bool(getattr(trainer.model, f"is_{ckpt_name(trainer.model)}")),
            "update_sec": statistics.median(t - r for t, r in zip(tot, rollout_times[1:])),
            "completion_len": statistics.mean(h["completions/mean_length"] for h in trainer.state.log_history
                                              if "completions/mean_length" in h)}


def bench_grpo(args, paths: dict, llm_dir, workdir: Path) -> dict:
    torch.manual_seed(0)
    Q, n = args.grpo_prompts, args.grpo_steps + 1
    items = data.attach_reports(data.read_questions(paths["mmvqa_rl"])[: Q * n], paths["train_reports"], "questions")
    consistency = grpo.make_consistency_scorer("offline")
    vlm = model.VLM.build(llm_dir, vit_preset="tiny")                  # the LLM + tokenizer with our special tokens
    vlm.eval()
    hf_dir = workdir / "grpo_llm"
    vlm.llm.save_pretrained(hf_dir)
    vlm.tokenizer.save_pretrained(hf_dir)                              # TRL loads exactly this LLM
    ref = copy.deepcopy(vlm).requires_grad_(False)
    vlm.set_trainable(vit=False, bridge=False, llm=True)               # text only: the LLM is the policy
    opt = runtime.adamw([p for p in vlm.parameters() if p.requires_grad], args.lr, 0.0)
    gargs = grpo_args(args, args.grpo_new_tokens, "--no-grad-ckpt")   # as trl_grpo runs TRL
    vlm.set_grad_checkpointing(gargs.grad_ckpt)
    ours = [our_grpo_step(vlm, ref, opt, items[k * Q:(k + 1) * Q], consistency, gargs, k)
            for k in range(n)][1:]
    tot = [o["rollout_sec"] + o["update_sec"] for o in ours]
    res = {"prompts": Q, "G": args.grpo_g, "max_new_tokens": args.grpo_new_tokens, "beta": args.beta,
           "ours": {"sec_per_step": statistics.median(tot), "sec_all": [round(t, 4) for t in tot],
                    "grad_ckpt": bool(vlm.ckpt_layers), "update_sec": statistics.median(o["update_sec"] for o in ours),
                    "completion_len": statistics.mean(o["completion_len"] for o in ours)}}
    del vlm, ref, opt
    try:
        res["trl"] = trl_grpo(args, hf_dir, items, consistency, workdir / "trl_out")
        res["ratio_trl_over_ours"] = res["trl"]["sec_per_step"] / res["ours"]["sec_per_step"]
    except ImportError as e:
        res["trl_skipped"] = f"TRL not installed ({e}); pip install -r requirements-bench.txt"
    return res


# =====================================================================================================================
# 4. CUDA: the base ViT + a randomly initialised LLM of Qwen2.5-3B's shape, held and run as sft.py and grpo.py do
# =====================================================================================================================

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768)


def big_vlm(llm_dir, llm_shape: dict, vit_preset: str, device):
    """Our tokenizer (with <im_patch>), a fresh ViT and bridge, and a random Qwen2 LLM of llm_shape with the
    attention the stages' load_llm chooses on this device (flash_attention_2 on CUDA with flash-attn)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    small = model.VLM.build(llm_dir, vit_preset=vit_preset)
    tok = small.tokenizer
    cfg = Qwen2Config(**{**llm_shape, "vocab_size": max(llm_shape["vocab_size"], len(tok))}, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      attn_implementation=model.attn_implementation(device))
    with torch.device(device):
        llm = Qwen2ForCausalLM(cfg)
    bridge = model.Bridge(small.vit.width, small.vit.grid, cfg.hidden_size, model.compute_anchor(llm))
    return model.VLM(small.vit, bridge, llm, tok, dict(small.config, llm_dim=cfg.hidden_size)).to(device)


def bench_cuda(args, paths: dict, llm_dir, device="cuda", llm_shape=None, vit_preset="base") -> dict:
    """SFT samples/s and GRPO rollout tokens/s, step time, peak GPU memory and MFU (decoder layers and ViT, at
    --peak-tflops), through sft.train_step and grpo.train_step with the stages' precision: SFT's frozen LLM in
    runtime.compute_dtype, GRPO's policy in fp32 with a frozen reference, the real presets' --grad-ckpt."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak_mb = (lambda: torch.cuda.max_memory_allocated() / 2**20) if cuda else (lambda: float("nan"))
    vlm = big_vlm(llm_dir, llm_shape or dict(QWEN25_3B, num_hidden_layers=args.cuda_llm_layers), vit_preset, device)
    n_llm = sum(p.numel() for p in vlm.llm.model.layers.parameters())  # matmul weights, embeddings excluded
    n_vit, n_tok, B = sum(p.numel() for p in vlm.vit.parameters()), math.prod(vlm.vit.grid), args.sft_batch

    # SFT samples/s; MFU counts the ViT forward and the LLM forward + activation backward (frozen: no weight grads)
    examples = sft.sft_examples(paths, with_vqa=True)[: B * (args.sft_steps + 1)]
    preset, encoded, volumes = sft_setup(vlm, examples)
    vlm.llm.to(runtime.compute_dtype(device))                          # frozen, as sft.py holds it
    opt = runtime.adamw([p for p in vlm.parameters() if p.requires_grad], 1e-4, 0.01)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    secs, flops = [], []
    for k in range(args.sft_steps + 1):
        batch = list(zip(encoded, volumes))[k * B:(k + 1) * B]
        sync()
        t0 = time.perf_counter()
        sft_step(vlm, opt, preset, batch)
        sync()
        secs.append(time.perf_counter() - t0)
        flops.append(2 * n_vit * n_tok * B + 4 * n_llm * sum(len(ids) for (ids, _), _ in batch))
    sec, rate = statistics.median(secs[1:]), sum(flops[1:]) / sum(secs[1:])   # FLOP/s over the same timed steps
    res = {"sft": {"batch": B, "sec_per_step": sec, "samples_per_s": B / sec, "tflops_per_s": rate / 1e12,
                   "mfu": rate / (args.peak_tflops * 1e12), "peak_gpu_mb": peak_mb()}}
    del opt

    # GRPO: the whole model trains (grpo.py choice 5); G samples per question with its image, then the update
    items = data.attach_reports(data.read_questions(paths["mmvqa_rl"]), paths["train_reports"], "questions")
    vlm.llm.float()                                                    # the policy's fp32 master weights
    ref = copy.deepcopy(vlm).freeze(runtime.compute_dtype(device))     # matmul weights in compute_dtype, as grpo.py
    vlm.requires_grad_(True)
    gargs = grpo_args(args, args.cuda_new_tokens)
    vlm.set_grad_checkpointing(gargs.grad_ckpt)
    opt = runtime.adamw(list(vlm.parameters()), args.lr, 0.0)
    Q, R = args.grpo_prompts, args.grpo_prompts * args.grpo_g
    x = torch.stack([data.online_transform(v, preset) for v in volumes[:Q]]).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        for k in range(2):                                             # the first step warms up
            qs = items[k * Q:(k + 1) * Q]
            r = our_grpo_step(vlm, ref, opt, qs, grpo.make_consistency_scorer("offline"), gargs, k, x)
        P = vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=True)) for q in qs])[0].shape[1]
        step_sec = r["rollout_sec"] + r["update_sec"]
        fl = (2 * n_llm * (R * P + r["tokens"]) + 8 * n_llm * R * (P + r["completion_len"])  # rollout; ref + policy
              + 10 * n_vit * n_tok * Q)                                # ViT: rollout, reference, policy fwd + bwd
        # the step's total is synchronised (its loss .item()), its rollout / update split is not: left out on CUDA
        r = {k: v for k, v in r.items() if k not in ("rollout_sec", "update_sec")}
        res["grpo"] = {"generated_tokens_per_s": r["tokens"] / r["generate_sec"], "sec_per_step": step_sec,
                       **r, "prompt_len": P, "mfu": fl / step_sec / (args.peak_tflops * 1e12),
                       "peak_gpu_mb": peak_mb(), "grad_ckpt": gargs.grad_ckpt, "micro_batch": gargs.micro_batch}
    except torch.cuda.OutOfMemoryError as e:
        res["grpo"] = {"error": f"out of memory (whole model + AdamW fp32 + reference): {e}"}
    return res


# =====================================================================================================================
# 5. memory: a per-GPU plan of the real run, from per-token activation figures measured on the CPU at real width
# =====================================================================================================================

QWEN25_CONFIG = Path(__file__).resolve().parent / "docs" / "qwen2.5-3b-config.json"  # Qwen2.5-3B's own config.json
QWEN25_VOCAB = 151643  # Qwen2.5's byte-level BPE ids; its 22 added tokens follow, the embedding has 151,936 rows
QWEN25_ADDED = ("<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> <|box_start|> "
                "<|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> <|image_pad|> "
                "<|video_pad|> <tool_call> </tool_call> <|fim_prefix|> <|fim_middle|> <|fim_suffix|> <|fim_pad|> "
                "<|repo_name|> <|file_sep|>").split()  # the first 14 are special tokens
QWEN25_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # Qwen2.5's pre-tokenizer split
QWEN25_TEMPLATE = (  # Qwen2.5's ChatML template without its tool-calling branch
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message['role'] == 'system' and "
    "loop.first) %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Measured by measure_activations() on the CPU (torch 2.13.0+cpu, transformers 5.24), bytes per token: what autograd
# saves in one decoder layer ("llm_layer") and in the final norm ("llm_norm") of a random Qwen2.5-3B-shaped LLM cut to
# 2 layers, and in one base-ViT block at 224x224x112 ("vit_block"), a storage counted once, parameters excluded; keys
# stage/precision[/ckpt], where "grpo" trains the layer and "sft" passes gradients through it frozen (held in bf16
# under bf16). "logits": peak live bytes per scored position of the stage's own loss path (lm_head, fp32 copies,
# log-softmax, their backward); "llm_backward": a trained layer's backward workspace per token.
MEASURED = {
    "llm_layer": {"grpo/fp32": 244808, "grpo/fp32/ckpt": 8192, "grpo/bf16": 151624, "grpo/bf16/ckpt": 8192,
                  "sft/fp32": 168008, "sft/fp32/ckpt": 8192, "sft/bf16": 92232, "sft/bf16/ckpt": 4096},
    "llm_norm": {"grpo/fp32": 16388, "grpo/bf16": 16388, "sft/fp32": 8196, "sft/bf16": 8196},
    "logits": {"grpo/fp32": 2430992, "grpo/bf16": 2430992, "sft/fp32": 1830401, "sft/bf16": 1826817},
    "llm_backward": {"grpo/fp32": 70648, "grpo/bf16": 7169},
    "vit_block": {"fp32": 49216, "fp32/ckpt": 3072, "bf16": 27712, "bf16/ckpt": 3072}}


def llm_config(path) -> dict:
    """An LLM's config.json (the file or its directory) as a dict."""
    path = Path(path)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"--llm-config {path}: no such file")
    cfg = json.loads(path.read_text())
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise SystemExit(f"--llm-config {path}: no {', '.join(missing)}: not a decoder LLM's config.json")
    return cfg


def qwen2_config(config: dict, layers: int | None = None):
    from transformers import Qwen2Config
    keep = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return Qwen2Config(**{**keep, "num_hidden_layers": layers or config["num_hidden_layers"]})


def qwen25_tokenizer(texts: list[str]):
    """A tokenizer in Qwen2.5's layout, built here: byte-level BPE with Qwen2.5's pre-tokenizer and merges learnt from
    `texts`, filler entries up to id 151,642, then Qwen2.5's 22 added tokens at Qwen2.5's ids (151,643-151,664); its
    chat template; EOS and pad <|endoftext|>, as in the base model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN25_SPLIT), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    learnt = Tokenizer(models.BPE())
    learnt.pre_tokenizer = split
    learnt.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = json.loads(learnt.to_str())["model"]
    vocab = {**bpe["vocab"], **{f"ĠĠfiller{i}": i for i in range(len(bpe["vocab"]), QWEN25_VOCAB)}}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizers.NFC(), split, decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, special=i < 14, normalized=False) for i, t in enumerate(QWEN25_ADDED)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=QWEN25_ADDED[1:14], model_max_length=131072)
    tokenizer.chat_template = QWEN25_TEMPLATE
    return tokenizer


def qwen25_like(config: dict, layers: int, texts: list[str], seed: int = 0):
    """(llm, tokenizer): a random-weight Qwen2 LLM of `config` cut to `layers` decoder layers and qwen25_tokenizer."""
    from transformers import Qwen2ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = Qwen2ForCausalLM(qwen2_config(config, layers))
    return llm, qwen25_tokenizer(texts)


class LiveBytes(TorchDispatchMode):
    """Records when each tensor storage created inside it is allocated and freed (a storage once, whatever its views;
    never `ignore`'s); peak() replays that and gives the most bytes alive at once, leaving out the storages passed to
    grad() (parameter gradients, which the plan counts apart)."""

    def __init__(self, ignore=()):
        super().__init__()
        self.alive, self.events, self.grads, self.refs = {}, [], set(), []
        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}

    def grad(self, g: torch.Tensor) -> None:
        self.grads.add(self.alive[g.untyped_storage().data_ptr()][0])

    def _free(self, k, _ref) -> None:
        uid, n = self.alive.pop(k)
        self.events.append((uid, -n))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                k = s.data_ptr()
                if k and k not in self.alive and k not in self.ignore:
                    self.alive[k] = (len(self.events), s.nbytes())
                    self.events.append(self.alive[k])
                    self.refs.append(weakref.ref(s, functools.partial(self._free, k)))
        return out

    def peak(self) -> int:
        now = best = 0
        for uid, n in self.events:
            if uid not in self.grads:
                now += n
                best = max(best, now)
        return best


def autocast_cpu(precision: str):
    """On the CPU, what runtime.autocast does on CUDA: bf16 autocast (or none for fp32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def ckpt_name(obj) -> str:
    """transformers' name for activation checkpointing on a model or a training config: activation_checkpointing
    where it has it (5.25+; the gradient_checkpointing names warn there), else gradient_checkpointing."""
    return "activation_checkpointing" if hasattr(obj, "activation_checkpointing") or hasattr(
        obj, "activation_checkpointing_enable") else "gradient_checkpointing"


def set_llm_ckpt(llm, on: bool) -> None:
    """Activation checkpointing of an HF model on or off, under ckpt_name's names."""
    name = ckpt_name(llm)
    if on:
        getattr(llm, f"{name}_enable")({"use_reentrant": False})
    elif getattr(llm, f"is_{name}"):
        getattr(llm, f"{name}_disable")()


@contextmanager
def saved_by(spans: dict, ignore=()):
    """{name: bytes autograd saves from the end of module a's forward through the end of module b's} for spans
    {name: (a, b)}, a storage counted once, `ignore` never (a checkpointed b saves its input in that span)."""
    counts, where, seen = dict.fromkeys(spans, 0), [None], {t.untyped_storage().data_ptr() for t in ignore}
    hooks = [b.register_forward_hook(lambda *_: where.__setitem__(0, None)) for _, b in spans.values()]
    hooks += [a.register_forward_hook(lambda *_, k=k: where.__setitem__(0, k)) for k, (a, _) in spans.items()]

    def pack(x):
        k = x.untyped_storage().data_ptr()
        if where[0] and k not in seen:
            seen.add(k)
            counts[where[0]] += x.untyped_storage().nbytes()
        return x
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield counts
    finally:
        for h in hooks:
            h.remove()


def pass_bytes(vlm, stage: str, precision: str, ckpt: bool, rows: int, n: int, t: int, backward: bool = True) -> dict:
    """One forward (+ backward) of the stage's loss path on `rows` random rows of n tokens: GRPO scores the last t
    with VLM.token_logprobs (decoder layers trained; the tied embedding frozen, so that its 151,936-row gradient does
    not hide the activations), SFT all n with sft.WeightedLM (LLM frozen, gradients to the image embeddings). Returns
    the bytes autograd saved in the last decoder layer and the final norm, and the peak live non-gradient bytes."""
    llm, grpo_stage = vlm.llm, stage == "grpo"
    llm.requires_grad_(grpo_stage).get_input_embeddings().requires_grad_(False)
    llm.to(torch.bfloat16 if precision == "bf16" and not grpo_stage else torch.float32).train()
    set_llm_ckpt(llm, ckpt)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, QWEN25_VOCAB, (rows, n), generator=g)
    ids[:, 1:1 + vlm.n_img] = vlm.image_token_id
    mask = torch.ones_like(ids)
    image = torch.randn(rows, vlm.n_img, llm.config.hidden_size, generator=g, requires_grad=not grpo_stage)
    fixed = [*vlm.parameters(), *vlm.buffers(), ids, mask, image]
    live = LiveBytes(ignore=fixed)
    hooks = [p.register_hook(lambda grad: live.grad(grad) or grad) for p in fixed[:-3] if p.requires_grad]
    with live:
        spans = {"layer": llm.model.layers[-2:], "norm": (llm.model.layers[-1], llm.model.norm)}
        with saved_by(spans, fixed) as saved, autocast_cpu(precision):
            if grpo_stage:
                logp = vlm.token_logprobs(ids, mask, image, 1.0, last=t)
                loss = grpo.grpo_loss(logp, logp.detach(), logp.detach() - 0.1, torch.linspace(-1, 1, rows),
                                      torch.ones_like(logp))[0]
            else:
                loss = sft.WeightedLM(vlm, torch.nn.Identity())(ids, mask, torch.ones(rows, n), image)
        if backward:
            loss.backward()
        del loss
    for h in hooks:
        h.remove()
    set_llm_ckpt(llm, False)
    llm.float().requires_grad_(False).zero_grad(set_to_none=True)
    return {**saved, "peak": live.peak(), "n": n}


def vit_tokens(preset: str) -> int:
    """Tokens per volume through the ViT's blocks: the patches and the cls token."""
    p = model.VIT_PRESETS[preset]
    return math.prod(i // k for i, k in zip(p["img_size"], p["patch_size"])) + 1


def vit_saved(preset: str, precision: str, ckpt: bool, volumes: int) -> int:
    """Bytes autograd saves in the last block of the `preset` ViT cut to 2 blocks, trained, on `volumes` volumes."""
    vit = model.ViT3D(**dict(model.VIT_PRESETS[preset], depth=2)).train()
    vit.grad_checkpointing = ckpt
    x = torch.randn(volumes, 1, *vit.img_size)
    with saved_by({"block": vit.blocks[-2:]}, [*vit.parameters(), x]) as saved, autocast_cpu(precision):
        vit(x)
    return saved["block"]


def measure_activations(workdir, config: dict | None = None, vit_preset: str = "base") -> dict:
    """MEASURED, measured again: a random LLM of `config` (default Qwen2.5-3B's) cut to 2 decoder layers, written as
    a local HF dir under workdir and built into a VLM, and the `vit_preset` ViT cut to 2 blocks; each per-token figure
    from two token counts."""
    llm, tok = qwen25_like(config or llm_config(QWEN25_CONFIG), 2, [data.THINK_FORMAT, data.REPORT_INSTRUCTION])
    llm.save_pretrained(Path(workdir) / "llm2")
    tok.save_pretrained(Path(workdir) / "llm2")
    del llm
    vlm = model.VLM.build(Path(workdir) / "llm2", vit_preset="tiny")
    out = {"llm_layer": {}, "llm_norm": {}, "logits": {}, "llm_backward": {}, "vit_block": {}}
    n1, n2, t1, t2 = 128, 256, 32, 96
    for key in ("grpo/fp32", "grpo/bf16", "sft/fp32", "sft/bf16"):
        stage, precision = key.split("/")
        run = functools.partial(pass_bytes, vlm, stage, precision, False, 1)
        if stage == "grpo":  # logits t1 -> t2 at n1 (they make the peak); layers n2 -> 2 n2 with 8 scored (they do)
            a, b = run(n1, t1), run(n1, t2)
            out["logits"][key] = (b["peak"] - a["peak"]) / (t2 - t1)
            a, b = run(n2, 8), run(2 * n2, 8)
        else:  # SFT scores every position: the logits make the peak
            a, b = run(n1, t1), run(n2, t1)
        for name in ("layer", "norm"):
            out[f"llm_{name}"][key] = (b[name] - a[name]) / (b["n"] - a["n"])
        rest = (b["peak"] - a["peak"]) / (b["n"] - a["n"]) - 2 * out["llm_layer"][key] - out["llm_norm"][key]
        out["logits" if stage == "sft" else "llm_backward"][key] = rest
        a, b = (pass_bytes(vlm, stage, precision, True, 1, n, t1, backward=False) for n in (n1, n2))
        out["llm_layer"][key + "/ckpt"] = (b["layer"] - a["layer"]) / (n2 - n1)
    for key in ("fp32", "fp32/ckpt", "bf16", "bf16/ckpt"):
        a, b = (vit_saved(vit_preset, key[:4], key.endswith("ckpt"), v) for v in (1, 2))
        out["vit_block"][key] = (b - a) / vit_tokens(vit_preset)
    return {k: {kk: round(vv) for kk, vv in v.items()} for k, v in out.items()}


def param_counts(config: dict, vit_preset: str) -> dict:
    """Parameters of the LLM (a Qwen2-architecture model of `config`), one decoder layer, the input embedding, the ViT,
    one ViT block and the bridge (counted on the meta device), and the bridge's image tokens."""
    from transformers import Qwen2ForCausalLM
    with torch.device("meta"):
        llm, vit = Qwen2ForCausalLM(qwen2_config(config)), model.ViT3D(**model.VIT_PRESETS[vit_preset])
        bridge = model.Bridge(vit.width, vit.grid, config["hidden_size"], torch.zeros(config["hidden_size"]))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"llm": n(llm), "layer": n(llm.model.layers[0]), "embed": n(llm.get_input_embeddings()), "vit": n(vit),
            "block": n(vit.blocks[0]), "bridge": n(bridge), "n_img": bridge.n_img}


def llm_activations(m: dict, stage: str, precision: str, ckpt: bool, layers: int, rows: int, n: int, t: int):
    """(activations, logits) bytes of one pass of `rows` rows of n tokens (GRPO scores the last t, SFT all n), from
    the per-token figures m (MEASURED) scaled to `layers` decoder layers. All layers' saved tensors live until the
    backward reaches them; on top comes the larger of the head's logits and one layer's backward (with grad-ckpt,
    that layer's activations recomputed, too)."""
    key = f"{stage}/{precision}"
    saved = layers * m["llm_layer"][key + "/ckpt" * ckpt] + m["llm_norm"][key]
    layer_bwd = m["llm_backward"].get(key, 0) + ckpt * m["llm_layer"][key]
    logits = rows * (t if stage == "grpo" else n) * m["logits"][key]
    return rows * n * saved + max(0, rows * n * layer_bwd - logits), logits


def plan_memory(args, m: dict | None = None) -> dict:
    """Per-GPU bytes of the real presets' SFT and GRPO steps, by component, under DDP and FSDP (world args.world),
    and their phases: what is alive during the rollout, at the start of a backward pass, at its end, and in the
    optimizer step; the peak is the largest phase."""
    m, cfg, bf16 = m or MEASURED, llm_config(args.llm_config), args.precision == "bf16"
    c, L, W = param_counts(cfg, args.vit_preset), cfg["num_hidden_layers"], args.world
    s_args, g_args = sft.parse_args(["--preset", "real"]), grpo.parse_args(["--preset", "real"])
    held = 2 if bf16 else 4                                              # bytes per frozen weight
    kv = 2 * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * cfg.get(
        "head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) * L * held   # KV-cache bytes per token
    grpo_ckpt = getattr(g_args, "grad_ckpt", True) if args.grad_ckpt is None else args.grad_ckpt
    sft_ckpt = getattr(s_args, "grad_ckpt", False) if args.grad_ckpt is None else args.grad_ckpt
    micro = getattr(g_args, "micro_batch", 0) if args.micro_batch is None else args.micro_batch
    rows = g_args.batch_size * g_args.group_size
    per_pass = min(micro or rows, rows)
    grpo_tokens = c["n_img"] + args.prompt_text_tokens + g_args.max_new_tokens
    sft_tokens = args.sft_tokens or s_args.max_len
    vit_train = not g_args.freeze_encoder
    out = {"setup": {"sft": f"{s_args.batch_size} examples x {sft_tokens} tokens per GPU, ViT and LLM frozen, "
                            f"grad-ckpt {'on' if sft_ckpt else 'off'}",
                     "grpo": f"{g_args.batch_size} questions x G {g_args.group_size} = {rows} rows x ({c['n_img']} "
                             f"image + {args.prompt_text_tokens} text + {g_args.max_new_tokens} completion tokens), "
                             f"{per_pass} rows per pass, grad-ckpt {'on' if grpo_ckpt else 'off'}, "
                             f"ViT {'trained' if vit_train else 'frozen'}"}}
    for stage in ("sft", "grpo"):
        grpo_stage = stage == "grpo"
        trained = c["llm"] + c["bridge"] + (c["vit"] if vit_train else 0) if grpo_stage else c["bridge"]
        frozen = c["vit"] * (not vit_train) * 4 if grpo_stage else c["llm"] * held + c["vit"] * 4   # ViT: fp32
        if grpo_stage:
            n_pass, t_pass, ckpt = per_pass, g_args.max_new_tokens, grpo_ckpt
            acts, logits = llm_activations(m, stage, args.precision, ckpt, L, n_pass, grpo_tokens, t_pass)
            volumes = math.ceil(n_pass / g_args.group_size) * vit_train
            block = m["vit_block"]
            acts += volumes * vit_tokens(args.vit_preset) * (model.VIT_PRESETS[args.vit_preset]["depth"] * block[
                args.precision + "/ckpt" * ckpt] + ckpt * block[args.precision])
            passes = math.ceil(rows / n_pass)
        else:
            acts, logits = llm_activations(m, stage, args.precision, sft_ckpt, L, s_args.batch_size, sft_tokens, 0)
            passes = s_args.grad_accum
        unit = max(c["layer"] if grpo_stage else 0, c["block"] if grpo_stage and vit_train else 0)
        root = trained - (c["layer"] * L if grpo_stage else 0) - (
            c["block"] * model.VIT_PRESETS[args.vit_preset]["depth"] if grpo_stage and vit_train else 0)
        for shard in ("ddp", "fsdp"):
            w = W if shard == "fsdp" else 1
            comp = {"trainable weights (fp32)": 4 * trained / w, "frozen weights": frozen,
                    "gradients (fp32)": 4 * trained / w, "AdamW state (fp32)": 8 * trained / w,
                    "AdamW step temporary (foreach)": 4 * trained / w,
                    "DDP buckets (gradient_as_bucket_view: none)": 0,
                    "FSDP whole root + 2 groups, and their grads": (8 * root + 8 * unit + 4 * unit) * (w > 1),
                    "reference policy": (held * (c["llm"] - c["embed"]) + 4 * (c["embed"] + c["vit"] + c["bridge"]))
                    * grpo_stage,   # VLM.freeze: the LLM's matmul weights held, the rest fp32
                    "reward model (rm:)": held * args.rm_params * 1e9 * grpo_stage,
                    "autocast bf16 weight copies": 2 * trained * bf16, "activations": acts, "logits": logits,
                    "KV cache (rollout)": kv * rows * grpo_tokens * grpo_stage}
            keep = sum(comp[k] for k in ("trainable weights (fp32)", "frozen weights", "AdamW state (fp32)",
                                         "reference policy", "reward model (rm:)"))
            grads, work = comp["gradients (fp32)"], comp["FSDP whole root + 2 groups, and their grads"]
            tied = 8 * c["embed"] * bool(cfg.get("tie_word_embeddings")) * grpo_stage  # two halves, then their sum
            phases = {"forward/backward": keep + work + comp["autocast bf16 weight copies"] + acts + logits + (
                          grads if passes > 1 else 0),
                      "end of backward": keep + work + grads + tied,
                      "optimizer step": keep + grads + comp["AdamW step temporary (foreach)"]}
            if grpo_stage:  # generation: the policy whole (FSDP gathers it), its autocast copies, the KV cache
                phases["rollout"] = keep + comp["autocast bf16 weight copies"] + comp["KV cache (rollout)"] + (
                    4 * trained * (1 - 1 / w))
            out[f"{stage} {shard}"] = {**comp, "phases": phases, "peak": max(phases.values()),
                                       "phase": max(phases, key=phases.get)}
    return out


def memory_table(plan: dict, args) -> str:
    """The plan as a markdown table in GB (10^9 bytes), one column per stage and sharding."""
    cols = [k for k in plan if k != "setup"]
    head = f"| per GPU, GB ({args.precision}, {args.world} GPUs) | " + " | ".join(cols) + " |"
    rows = [head, "|" + "---|" * (len(cols) + 1)]
    for k in [k for k in plan[cols[0]] if k not in ("phases", "peak", "phase")]:
        rows.append(f"| {k} | " + " | ".join(f"{plan[c][k] / 1e9:.1f}" for c in cols) + " |")
    for ph in ("rollout", "forward/backward", "end of backward", "optimizer step"):
        rows.append(f"| phase: {ph} | " + " | ".join(f"{plan[c]['phases'][ph] / 1e9:.1f}" if ph in plan[c]["phases"]
                                                     else "" for c in cols) + " |")
    budget = args.gpu_gb * 0.9
    rows.append(f"| **peak** (budget {budget:.0f}) | " + " | ".join(f"**{plan[c]['peak'] / 1e9:.1f}** " + (
        "fits" if plan[c]["peak"] / 1e9 <= budget else "OVER") for c in cols) + " |")
    return "\n".join(rows + [f"{k.upper()}: {v}" for k, v in plan["setup"].items()])


# =====================================================================================================================
# Main: run, print a table, write JSON
# =====================================================================================================================

def machine() -> dict:
    cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
    return {"cpu": cpu.group(1) if cpu else platform.processor(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_avg_1m_at_start": os.getloadavg()[0]}      # > cores: other jobs were running, numbers are noisy


def table(res: dict) -> str:
    rows, p, g, c = [], res.get("preprocess", {}), res.get("grpo", {}), res.get("cuda", {})
    for k in ("ours", "ctclip", "monai"):
        if k in p:
            rows.append(f"preprocess {k:<7}{p[k]['sec_per_volume']:7.2f} s/volume  peak {p[k]['peak_mb']:5.0f} MB  "
                        f"max|dHU| vs ours {p[k]['max_hu_diff_vs_ours']:.0f}  {p[k]['ratio_vs_ours']:.2f}x our time")
    if p:
        rows += [f"preprocess gzip+NIfTI decode {p['decode']['sec']:.2f} s "
                 f"= {p['decode']['share_of_ours']:.0%} of ours",
                 f"per sample: cache {p['per_sample']['cache_sec'] * 1e3:.0f} ms, CT-CLIP's .npz "
                 f"{p['per_sample']['npz_sec'] * 1e3:.0f} ms ({p['per_sample']['npz_ratio']:.1f}x), on the fly "
                 f"{p['per_sample']['on_the_fly_sec']:.2f} s ({p['per_sample']['ratio']:.0f}x)",
                 f"sft per sample around a {p['read_ahead']['gpu_ms_per_sample']:.0f} ms GPU step: reading in the step "
                 f"{p['read_ahead']['serial_ms_per_sample']:.1f} ms, read ahead "
                 f"{p['read_ahead']['read_ahead_ms_per_sample']:.1f} ms"]
    rows += [f"sft {k:<5} batch {res['sft']['batch']}: {v['steps_per_s']:.3f} steps/s, with --cache-features "
             f"{v['cached_steps_per_s']:.3f} ({v['speedup']:.1f}x)" for k, v in res.get("sft", {}).items()
             if k != "batch"]
    rows += [f"grpo {k:<4} {g[k]['sec_per_step']:.3f} s/step (update {g[k]['update_sec']:.3f} s), mean completion "
             f"{g[k]['completion_len']:.1f} tokens" for k in ("ours", "trl") if k in g]
    rows += [f"grpo TRL/ours {g['ratio_trl_over_ours']:.2f}x"] if "ratio_trl_over_ours" in g else []
    rows += [f"cuda {k}: {v}" for k, v in c.items() if k != "llm_shape"]
    return "\n".join(rows)


def phantom(args) -> tuple[dict, Path]:
    """The phantom world's paths (built if missing, with the parameters it was built with) and the LLM dir."""
    paths = data.paths(args.data_root, "phantom")  # an existing world keeps the size it was built with
    return paths, Path(args.llm or paths["tiny_llm"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    which = ["preprocess", "sft", "grpo", "cuda", "memory"] if args.which == "all" else [args.which]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="med3d_bench_")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    res, world = {"machine": machine(), "args": vars(args)}, None
    for w in which:
        print(f"== {w}", flush=True)
        if w == "cuda" and not torch.cuda.is_available():
            res[w] = {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
            continue
        if w == "memory":
            figures = measure_activations(workdir) if args.measure else MEASURED
            res[w] = {"measured": figures, "plan": plan_memory(args, figures)}
            print(memory_table(res[w]["plan"], args))
            continue
        if w != "preprocess" and world is None:
            world = phantom(args)
        if w == "preprocess":
            res[w] = bench_preprocess(args, workdir)
        elif w == "sft":
            res[w] = bench_sft(args, *world)
        elif w == "grpo":
            res[w] = bench_grpo(args, *world, workdir)
        else:
            res[w] = bench_cuda(args, *world)
    print(table(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {out}")
    if tmp is not None:
        tmp.cleanup()
    return res


if __name__ == "__main__":
    main()
