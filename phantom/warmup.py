"""The phantom world's LLM warm-up: it stands in for the pretraining that Qwen2.5 brings and the tiny LLM lacks.

In one run of sft.py's training loop (sft.train) the fresh tiny LLM learns its language (training reports, VQA
answers), the MMVQA answer format with and without <think>, and to read findings from the image positions: a label
code (FindingCode: a learned vector per abnormality, no volume) writes each scan there, so that bridge-only SFT later
finds an LLM that reads what a bridge writes. MMVQA questions are about drawn label vectors (their answers cannot be
memorised per scan) and list-copy exercises stand in for the in-context copying the rationale needs.

Run:
  python -m phantom warmup                  # -> runs/warmup, an HF directory (sft.py's default --llm)
  python -m phantom warmup --help           # sft.py's training and run-time flags, with the warm-up's defaults
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

import data
import model
import runtime
import sft
from phantom.llm import mmvqa_target

# The warm-up's defaults on top of sft.py's (the whole tiny LLM trains from scratch: lr 3e-4, docs/NOTES.md).
WARMUP = dict(llm=None, vision_weights=None, vit_preset="tiny", lr=3e-4, epochs=2, batch_size=8, out="runs/warmup")
BLANK = "blank"  # the label vector of the copy exercises: no finding
NOT_READ = ("preset", "vqa", "no_ram", "vision_weights", "lora", "lora_rank", "lora_alpha", "lora_dropout",
            "feature_stats", "cache_features", "grad_ckpt")   # sft.py flags it refuses: phantom world, whole LLM
HELPS = {**dict.fromkeys(NOT_READ, runtime.HIDDEN), "llm": "HF LLM directory (unset = the phantom world's tiny LLM)",
         "out": "the LLM's HF files (config.json, model.safetensors, tokenizer), ckpt/, metrics.jsonl, curves.png"}


class FindingCode(nn.Module):
    """Stand-in for encoder + bridge: a scan's 18 labels -> N_img image embeddings, the sum of a learned vector per
    finding present plus one per image position, layer-normed like the bridge's output."""

    def __init__(self, n_img: int, dim: int, n_labels: int = len(data.ABNORMALITIES)):
        super().__init__()
        self.code = nn.Parameter(torch.randn(n_labels, dim))
        self.pos = nn.Parameter(torch.randn(n_img, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B, 18) 0/1 -> (B, N_img, D)
        return self.norm((labels.float() @ self.code)[:, None] + self.pos)


def mmvqa_examples(items: list[dict], labels: dict, think: bool) -> list[dict]:
    """MMVQA questions with mmvqa_target answers, with or without <think>."""
    present = lambda item: [n for n, y in zip(data.ABNORMALITIES, labels[item["VolumeName"]]) if y]
    return [{"volume": item["VolumeName"], "user": data.mmvqa_prompt(item, think),
             "segments": [(mmvqa_target(item, present(item), think), False)]} for item in items]


def drawn_labels(labels: dict, n: int, seed: int) -> dict:
    """n made-up label vectors ("drawn-0", ...), each abnormality drawn independently at its training prevalence."""
    prevalence = np.mean(np.stack(list(labels.values())), axis=0)
    rng = np.random.default_rng(seed)
    return {f"drawn-{i}": (rng.random(len(prevalence)) < prevalence).astype(np.int64) for i in range(n)}


def copy_examples(n: int, seed: int) -> list[dict]:
    """n list-copy exercises on a blank image ("Repeat this list: D) Emphysema A) Atelectasis ..." -> the list)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        picks = rng.integers(0, len(data.ABNORMALITIES), int(rng.integers(3, 9)))
        text = " ".join(f"{'ABCD'[rng.integers(4)]}) {data.ABNORMALITIES[k]}" for k in picks)
        examples.append({"volume": BLANK, "user": "Repeat this list: " + text, "segments": [(text, False)]})
    return examples


def warmup_examples(paths: dict, labels: dict, seed: int, think_per_scan: int = 6, no_think_per_scan: int = 1,
                    copy_per_scan: int = 6) -> tuple[list[dict], dict]:
    """The warm-up's examples and the label vectors they read: the training reports and VQA answers (multiple choice
    too) with their scans' labels, MMVQA questions about drawn label vectors (per training scan: think_per_scan with
    <think>, no_think_per_scan without), and copy_per_scan list-copy exercises per training scan."""
    n_think, n_plain = think_per_scan * len(labels), no_think_per_scan * len(labels)
    drawn = drawn_labels(labels, n_think + n_plain, seed)
    items = data.build_mmvqa(drawn, seed)
    examples = (sft.sft_examples(paths, kinds=None) + mmvqa_examples(items[:n_think], drawn, think=True)
                + mmvqa_examples(items[n_think:], drawn, think=False)
                + copy_examples(copy_per_scan * len(labels), seed))
    return examples, {**labels, **drawn, BLANK: np.zeros(len(data.ABNORMALITIES), dtype=np.int64)}


def save_llm_dir(vlm: model.VLM, code: FindingCode, out: Path, meta: dict) -> None:
    """The trained LLM as an HF directory beside ckpt/ and metrics.jsonl; config.json is moved in last = complete."""
    with runtime.atomic_dir(out / "tmp_llm") as tmp:
        vlm.llm.save_pretrained(tmp)
        vlm.tokenizer.save_pretrained(tmp)
        (tmp / "warmup_meta.json").write_text(json.dumps(meta, indent=1))
        save_file({k: v.detach().cpu().contiguous() for k, v in code.state_dict().items()},
                  tmp / "finding_code.safetensors")  # diagnostics only
    (out / "config.json").unlink(missing_ok=True)
    for f in sorted((out / "tmp_llm").iterdir(), key=lambda f: f.name == "config.json"):
        f.replace(out / f.name)
    (out / "tmp_llm").rmdir()


def main(argv=None) -> dict:
    args, default = (sft.parse_args(a, WARMUP, __doc__, "python -m phantom warmup", HELPS) for a in (argv, []))
    if given := [f"--{k.replace('_', '-')}" for k in NOT_READ if getattr(args, k) != getattr(default, k)]:
        raise SystemExit(f"python -m phantom warmup does not read {', '.join(given)}: leave them out")
    _, _, _, device = runtime.setup_distributed()
    paths = data.paths(args.data_root, "phantom")
    runtime.seed_everything(args.seed)
    vlm = model.VLM.build(Path(args.llm or paths["tiny_llm"]), vit_preset=args.vit_preset, device=str(device))
    vlm.set_trainable(vit=False, bridge=False, llm=True)  # the whole tiny LLM; no encoder, no bridge
    vlm.train()
    net = sft.WeightedLM(vlm, FindingCode(vlm.n_img, vlm.config["llm_dim"]).to(device))
    examples, labels = warmup_examples(paths, data.read_labels(paths["train_labels"]), args.seed)
    examples = [e for e in examples if e["volume"] in labels]
    label_input = lambda names: torch.tensor(np.stack([labels[n] for n in names])).to(device)

    result = sft.train(args, net, examples, label_input, device, "warmup")
    if not result["interrupted"] and runtime.get_rank() == 0:
        meta = {"stage": "warmup", "args": vars(args), "steps": result["step"],
                "final_loss": result["losses"][-1] if result["losses"] else None, "skipped_steps": result["skipped"]}
        save_llm_dir(vlm, net.image, Path(args.out), meta)
        runtime.print0(f"wrote {args.out}")
    runtime.cleanup_distributed()
    return result
