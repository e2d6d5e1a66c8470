"""Med3D-R1 benchmarks: speed and memory against the alternatives a user would pick, measured in one run.

What it measures (every figure is the median of --repeats runs; ratios are alternative / ours, > 1 = we are faster):
 1. preprocess  one CT-RATE-sized int16 .nii.gz (512x512x300, 0.7x0.7x1.0 mm, synthesised in a temp dir):
                (a) one-time preprocessing, data.py vs a CT-CLIP-style pipeline (float64 get_fdata + trilinear
                torch resample + crop/pad) vs the equivalent MONAI transforms: seconds, peak RSS, max HU difference
                of the outputs, and the share of our time spent decoding the gzip;
                (b) what a training step pays per sample: our int16 cache (memmap + online_transform) vs loading the
                .nii.gz on the fly the CT-CLIP way.
 2. sft         one SFT optimizer step (bridge trainable; ViT and LLM frozen) with the tiny and base ViT presets,
                with and without --cache-features (the frozen ViT's tokens computed once and reused): sft.train_step.
 3. grpo        one GRPO update on the same tiny LLM, text-only prompts, same G, lengths, beta, lr, AdamW and grad
                clip: ours (grpo.train_step) vs TRL's GRPOTrainer (transformers generate, no vLLM).
 4. cuda        (only when torch.cuda.is_available()) SFT samples/s, GRPO generated tokens/s, peak GPU memory and
                model-FLOPs utilisation with the base ViT and a randomly initialised LLM of Qwen2.5-3B's shape,
                through the same sft.train_step and grpo.train_step.

Run:
  pip install -r requirements-bench.txt        # MONAI, TRL (benchmark only; keeps the installed torch)
  python bench.py                              # all, a few minutes on 2 CPU cores -> runs/bench/bench.json
  python bench.py --which preprocess --repeats 5
  python bench.py --which cuda                 # 1 GPU
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

import data
import grpo
import model
import runtime
import sft

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # what and where
    p.add_argument("--which", default="all", choices=["preprocess", "sft", "grpo", "cuda", "all"])
    p.add_argument("--out", default="runs/bench/bench.json")
    p.add_argument("--repeats", type=int, default=3, help="N of every median-of-N")
    p.add_argument("--workdir", default=None, help="keep the synthetic volume here (default: a temp dir)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = the cores)")
    # 1. preprocessing
    p.add_argument("--shape", default="512,512,300", help="synthetic volume X,Y,Z")
    p.add_argument("--spacing", default="0.7,0.7,1.0", help="synthetic volume spacing x,y,z mm")
    p.add_argument("--preset", default="real", help="data.PRESETS key the volume is preprocessed to")
    # 2. SFT
    p.add_argument("--sft-presets", default="tiny,base", help="ViT presets to time")
    p.add_argument("--sft-batch", type=int, default=2)
    p.add_argument("--sft-steps", type=int, default=3, help="steps per setting (median; the first includes warm-up)")
    # 3. GRPO
    p.add_argument("--grpo-prompts", type=int, default=2, help="prompts per step")
    p.add_argument("--grpo-g", type=int, default=4, help="G completions per prompt")
    p.add_argument("--grpo-new-tokens", type=int, default=48)
    p.add_argument("--grpo-steps", type=int, default=4, help="timed steps per side (after one untimed)")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--llm", default=None, help="HF LLM dir for the GRPO/SFT runs (default: the phantom tiny LLM)")
    p.add_argument("--data-root", default="runs/phantom", help="phantom world (built if missing) for texts and MCQs")
    # 4. CUDA
    p.add_argument("--cuda-llm-layers", type=int, default=36, help="Qwen2.5-3B has 36")
    p.add_argument("--cuda-new-tokens", type=int, default=256, help="completion length of the GRPO rollout")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    return p.parse_args(argv)


# =====================================================================================================================
# Measurement helpers: median wall time, peak resident memory (Linux VmHWM, reset through /proc/self/clear_refs)
# =====================================================================================================================

def _status_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def measure(fn, repeats: int) -> dict:
    """Run fn() `repeats` times: median seconds, max peak RSS above the RSS before the call (MB), last output."""
    times, peaks, out = [], [], None
    for _ in range(repeats):
        out = None
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")               # resets VmHWM (peak RSS) to the current RSS
            before = _status_mb("VmRSS")
        except OSError:
            before = float("nan")
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        peaks.append(_status_mb("VmHWM") - before)
    return {"sec": statistics.median(times), "sec_all": [round(t, 4) for t in times], "peak_mb": max(peaks), "out": out}


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
    """The CT-CLIP way: float64 get_fdata, trilinear torch resample to the target spacing, crop/pad, clamp."""
    hu = nib.load(path).get_fdata()                                     # float64, v2 volumes are already HU
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
    runs = {"ours": measure(ours, n), "ctclip": measure(lambda: ctclip_preprocess(path, spacing, preset), n)}
    try:
        runs["monai"] = measure(monai_preprocess(path, spacing, preset), n)
    except ImportError as e:
        res["monai_skipped"] = f"MONAI not installed ({e}); pip install -r requirements-bench.txt"
    decode = measure(lambda: np.asanyarray(nib.load(path).dataobj), n)  # gzip + NIfTI decode of the int16 voxels
    ref = runs["ours"]["out"]
    for k, r in runs.items():
        res[k] = {"sec_per_volume": r["sec"], "sec_all": r["sec_all"], "peak_mb": r["peak_mb"],
                  "max_hu_diff_vs_ours": max_hu_diff(r["out"], ref), "ratio_vs_ours": r["sec"] / runs["ours"]["sec"]}
    res["decode"] = {"sec": decode["sec"], "share_of_ours": decode["sec"] / runs["ours"]["sec"]}
    del runs, decode, ref
    gc.collect()

    # (b) per-sample cost in a training step: our cache (memmap + online transform) vs CT-CLIP-style on-the-fly
    csv = workdir / "metadata.csv"
    csv.write_text(",".join(meta) + "\n" + ",".join(f'"{v}"' for v in meta.values()) + "\n")
    data.preprocess_dir(workdir / "dataset" / "valid_fixed", workdir / "cache", metadata=csv, preset=preset,
                        progress=False)
    cache, rng = data.VolumeCache(workdir / "cache"), np.random.default_rng(0)
    cached = measure(lambda: data.online_transform(cache.load(meta["VolumeName"]), preset, train=True, rng=rng), n * 3)

    def on_the_fly():
        vol = ctclip_preprocess(path, spacing, preset)                  # CT-CLIP decodes + resamples per sample
        return data.online_transform(vol, preset, train=True, rng=rng)

    fly = measure(on_the_fly, n)
    res["per_sample"] = {"cache_sec": cached["sec"], "cache_peak_mb": cached["peak_mb"], "on_the_fly_sec": fly["sec"],
                         "on_the_fly_peak_mb": fly["peak_mb"], "ratio": fly["sec"] / cached["sec"]}
    return res


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
    """int16 volumes by name, read like a data.VolumeCache (load, preset), so that sft.EncoderTokens encodes them."""

    def __init__(self, volumes: dict, preset):
        super().__init__(volumes)
        self.preset = preset

    load = dict.__getitem__


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
    examples = sft.sft_examples(paths, with_vqa=True)[: B * steps]
    res = {"batch": B}
    for name in args.sft_presets.split(","):
        vlm = model.VLM.build(llm_dir, vit_preset=name)
        preset, encoded, volumes = sft_setup(vlm, examples)
        opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
        batches = [list(zip(encoded, volumes))[k * B:(k + 1) * B] for k in range(steps)]
        it, feats = iter(batches), []                                   # feats: what epoch 1 leaves in the cache
        plain = measure(lambda: feats.append(sft_step(vlm, opt, preset, next(it))), steps)
        it = iter(zip(batches, feats))
        cached = measure(lambda: sft_step(vlm, opt, preset, *next(it)), steps)
        res[name] = {"sec_per_step": plain["sec"], "steps_per_s": 1 / plain["sec"], "sec_all": plain["sec_all"],
                     "cached_sec_per_step": cached["sec"], "cached_steps_per_s": 1 / cached["sec"],
                     "cached_sec_all": cached["sec_all"], "speedup": plain["sec"] / cached["sec"],
                     "vit_params_m": sum(p.numel() for p in vlm.vit.parameters()) / 1e6}
        del vlm, opt, feats
        gc.collect()
    return res


# =====================================================================================================================
# 3. GRPO update step, text-only, on one tiny LLM: ours vs TRL's GRPOTrainer
# =====================================================================================================================

def report_texts(paths: dict) -> dict:
    return {k: " ".join(s for s in (r["findings"], r["impressions"]) if s)
            for k, r in data.read_reports(paths["train_reports"]).items()}


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


def our_grpo_step(vlm, ref, optimizer, qs: list[dict], reports: dict, consistency, grpo_args, step: int,
                  x: torch.Tensor | None = None) -> dict:
    """One step of grpo.py (grpo.train_step: rollout -> rewards -> advantages -> loss -> update); text-only prompts
    when x is None."""
    out = grpo.train_step(grpo.PolicyLogprobs(vlm), ref, optimizer, qs, x, reports, consistency, grpo_args, step,
                          list(range(len(qs))))
    if vlm.device.type == "cuda":
        torch.cuda.synchronize()
    return {"generate_sec": out["generate_sec"], "rollout_sec": out["rollout_sec"], "update_sec": out["update_sec"],
            "completion_len": out["sums"]["completion_len"] / out["sums"]["n"], "tokens": out["tokens"]}


def trl_grpo(args, hf_dir: Path, items: list[dict], reports: dict, consistency, out_dir: Path) -> dict:
    """The same update with TRL's GRPOTrainer: same LLM, prompts, rewards, G, lengths, beta, lr, AdamW, clip."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):                                  # rollout + scoring + update, like ours
        def __init__(self): self.t0, self.times = 0.0, []
        def on_step_begin(self, *a, **k): self.t0 = time.perf_counter()
        def on_step_end(self, *a, **k): self.times.append(time.perf_counter() - self.t0)

    def reward(completions, answer, options, report, **_):
        texts = [c[0]["content"] for c in completions]                  # TRL strips the EOS; count all as finished
        qs = [{"answer": a, "options": json.loads(o)} for a, o in zip(answer, options)]
        return grpo_rewards(texts, [True] * len(texts), qs, list(report), consistency).tolist()

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": data.mmvqa_prompt(q, think=True)}],
                             "answer": q["answer"], "options": json.dumps(q["options"]),
                             "report": reports[q["VolumeName"]]} for q in items])
    cfg = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=args.grpo_prompts * args.grpo_g,
                     num_generations=args.grpo_g, max_completion_length=args.grpo_new_tokens, temperature=1.0,
                     top_p=1.0, top_k=0, beta=args.beta, epsilon=0.2, num_iterations=1, loss_type="grpo",
                     learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch",
                     max_grad_norm=1.0, max_steps=args.grpo_steps + 1, use_cpu=True, bf16=False, report_to="none",
                     save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    timer = StepTimer()
    trainer = GRPOTrainer(model=str(hf_dir), reward_funcs=[reward], args=cfg, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(hf_dir), callbacks=[timer])
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
            "update_sec": statistics.median(t - r for t, r in zip(tot, rollout_times[1:])),
            "completion_len": statistics.mean(h["completions/mean_length"] for h in trainer.state.log_history
                                              if "completions/mean_length" in h)}


def bench_grpo(args, paths: dict, llm_dir, workdir: Path) -> dict:
    torch.manual_seed(0)
    Q, n = args.grpo_prompts, args.grpo_steps + 1
    items = json.loads(Path(paths["mmvqa_rl"]).read_text())[: Q * n]
    reports = report_texts(paths)
    consistency = grpo.make_consistency_scorer("offline")
    vlm = model.VLM.build(llm_dir, vit_preset="tiny")                  # the LLM + tokenizer with our special tokens
    vlm.eval()
    hf_dir = workdir / "grpo_llm"
    vlm.llm.save_pretrained(hf_dir)
    vlm.tokenizer.save_pretrained(hf_dir)                              # TRL loads exactly this LLM
    ref = copy.deepcopy(vlm).requires_grad_(False)
    vlm.set_trainable(vit=False, bridge=False, llm=True)               # text only: the LLM is the policy
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gargs = grpo_args(args, args.grpo_new_tokens, "--no-grad-ckpt")   # as TRL runs it
    ours = [our_grpo_step(vlm, ref, opt, items[k * Q:(k + 1) * Q], reports, consistency, gargs, k)
            for k in range(n)][1:]
    tot = [o["rollout_sec"] + o["update_sec"] for o in ours]
    res = {"prompts": Q, "G": args.grpo_g, "max_new_tokens": args.grpo_new_tokens, "beta": args.beta,
           "ours": {"sec_per_step": statistics.median(tot), "sec_all": [round(t, 4) for t in tot],
                    "update_sec": statistics.median(o["update_sec"] for o in ours),
                    "completion_len": statistics.mean(o["completion_len"] for o in ours)}}
    del vlm, ref, opt
    try:
        res["trl"] = trl_grpo(args, hf_dir, items, reports, consistency, workdir / "trl_out")
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
    opt = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-4)
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
    sec, fl = statistics.median(secs[1:]), statistics.median(flops[1:])
    res = {"sft": {"batch": B, "sec_per_step": sec, "samples_per_s": B / sec, "tflops_per_s": fl / sec / 1e12,
                   "mfu": fl / sec / (args.peak_tflops * 1e12), "peak_gpu_mb": peak_mb()}}
    del opt

    # GRPO: the whole model trains (grpo.py choice 5); G samples per question with its image, then the update
    items = json.loads(Path(paths["mmvqa_rl"]).read_text())
    reports = report_texts(paths)
    ref = copy.deepcopy(vlm).requires_grad_(False)                     # frozen LLM in compute_dtype, as grpo.py
    vlm.llm.float()                                                    # the policy's fp32 master weights
    vlm.requires_grad_(True)
    gargs = grpo_args(args, args.cuda_new_tokens)
    vlm.set_grad_checkpointing(gargs.grad_ckpt)
    opt = torch.optim.AdamW(vlm.parameters(), lr=args.lr, weight_decay=0.0)
    Q, R = args.grpo_prompts, args.grpo_prompts * args.grpo_g
    x = torch.stack([data.online_transform(v, preset) for v in volumes[:Q]]).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        for k in range(2):                                             # the first step warms up
            qs = items[k * Q:(k + 1) * Q]
            r = our_grpo_step(vlm, ref, opt, qs, reports, grpo.make_consistency_scorer("offline"), gargs, k, x)
        P = vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=True)) for q in qs])[0].shape[1]
        step_sec = r["rollout_sec"] + r["update_sec"]
        fl = (2 * n_llm * (R * P + r["tokens"]) + 8 * n_llm * R * (P + r["completion_len"])  # rollout; ref + policy
              + 10 * n_vit * n_tok * Q)                                # ViT: rollout, reference, policy fwd + bwd
        res["grpo"] = {"generated_tokens_per_s": r["tokens"] / r["generate_sec"], "sec_per_step": step_sec,
                       **r, "prompt_len": P, "mfu": fl / step_sec / (args.peak_tflops * 1e12),
                       "peak_gpu_mb": peak_mb(), "grad_ckpt": gargs.grad_ckpt, "micro_batch": gargs.micro_batch}
    except torch.cuda.OutOfMemoryError as e:
        res["grpo"] = {"error": f"out of memory (whole model + AdamW fp32 + reference): {e}"}
    return res


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
                 f"per sample: cache {p['per_sample']['cache_sec'] * 1e3:.0f} ms, on the fly "
                 f"{p['per_sample']['on_the_fly_sec']:.2f} s ({p['per_sample']['ratio']:.0f}x)"]
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
    which = ["preprocess", "sft", "grpo", "cuda"] if args.which == "all" else [args.which]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="med3d_bench_")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    res, world = {"machine": machine(), "args": vars(args)}, None
    for w in which:
        print(f"== {w}", flush=True)
        if w == "cuda" and not torch.cuda.is_available():
            res[w] = {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
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
