"""Med3D-R1 model: 3D ViT encoder, adaptive pooling + Residual Alignment bridge, the vision-language wrapper.

    volume (B, 1, X, Y, Z) -> ViT3D -> (B, N, C) -> Bridge: standardise per position, Conv3d pooling, Linear+LN, RAM
    gate eq. (2)-(3), + position embedding, LN -> (B, N_img, D), spliced in at each row's image placeholders.

Deliberate choices:
1. ViT3D (real preset: patch (16, 16, 8), width 768, depth 12) has timm parameter names: a published
   BrgSA_vision_encoder.pth loads strictly. Attention: flash-attn if installed, on CUDA in bf16/fp16, else SDPA.
2. The anchor of eq. (1), the mean input-embedding row over the real vocabulary, is computed at build: a frozen buffer.
3. Each row finds its own placeholder positions, so left and right padding are both correct; position ids come from
   the attention mask, so a left-padded row scores as the same row unpadded (up to float noise).
4. generate() is a short hand-written loop: plain temperature sampling with a KV cache, G samples per prompt from one
   image encoding, completions returned as the generated ids (never decoded and re-tokenised).
5. The chat template's turn end (<|im_end|> for ChatML models) is the EOS everywhere; pad is a different token, but
   masks are built from lengths, never from token values.
6. A checkpoint is one directory — llm/ (Hugging Face format, tokenizer included), vision.safetensors,
   bridge.safetensors (anchor and input statistics included), config.json — written atomically, rebuilt by VLM.load.
7. build/load hold the LLM in the dtype asked for (frozen copies: runtime.compute_dtype, bf16 on CUDA), the ViT and the
   bridge in fp32 (0.5 GB): encoder tokens are computed as the bridge's statistics were (fp32 weights, autocast).
   VLM.freeze(bf16) stores only the LLM's matmul weights in bf16: a frozen copy that scores like the fp32 model.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import pickle
from collections import OrderedDict
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from runtime import atomic_dir, clean_after_kill, compute_dtype, readable, versions

try:  # optional, CUDA only
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

IMAGE_TOKEN = "<im_patch>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# Tags of the targets and rewards; single tokens in the tiny LLM (ordinary text for Qwen2.5, which splits them).
TAG_TOKENS = "<think> </think> <answer> </answer> <finding> </finding> <impression> </impression>".split()

VIT_PRESETS = {
    "base": dict(img_size=(224, 224, 112), patch_size=(16, 16, 8), width=768, depth=12, heads=12, mlp_dim=3072),
    "tiny": dict(img_size=(64, 64, 32), patch_size=(16, 16, 8), width=128, depth=4, heads=4, mlp_dim=512),
}


def sincos_pos_embed_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding (gx*gy*gz, dim): a third of the channels per axis (sin half, cos half),
    tokens x-major, z fastest, like Conv3d(...).flatten(2); channels left over when 6 does not divide dim are zero."""
    per_axis = dim // 6 * 2
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / max(1, per_axis // 2))
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64) for g in grid], indexing="ij")
    emb = torch.cat([f(c.reshape(-1, 1) * omega) for c in coords for f in (torch.sin, torch.cos)], dim=1)  # per axis
    return F.pad(emb, (0, dim - emb.shape[1])).float()


# ==== Vision encoder: 3D ViT with timm names ======================================================================
class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).unbind(2)  # each (B, N, H, hd)
        if flash_attn_func is not None and x.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn_func(q, k, v)  # (B, N, H, hd)
        else:
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        return self.proj(out.reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(width, mlp_dim), act=nn.GELU(),
                                             fc2=nn.Linear(mlp_dim, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """3D ViT: (B, 1, X, Y, Z) -> (B, gx*gy*gz, width), cls token dropped, after the final LayerNorm."""

    def __init__(self, img_size, patch_size, width: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.img_size, self.patch_size = tuple(img_size), tuple(patch_size)
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        self.grid, self.width = tuple(i // p for i, p in zip(self.img_size, self.patch_size)), width
        self.preset = dict(img_size=list(self.img_size), patch_size=list(self.patch_size), width=width, depth=depth,
                           heads=heads, mlp_dim=mlp_dim)
        self.grad_checkpointing = False  # True: recompute each block in the backward pass (less activation memory)
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(1, width, self.patch_size, stride=self.patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = torch.cat([torch.zeros(1, width), sincos_pos_embed_3d(width, self.grid)])  # cls row, then patches
        self.pos_embed = nn.Parameter(pos.unsqueeze(0))  # (1, 1 + N, width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)   # eps 1e-5 here, 1e-6 in the blocks: as the published BrgSA encoder
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @classmethod
    def from_preset(cls, name: str) -> "ViT3D":
        return cls(**VIT_PRESETS[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (1, *self.img_size):
            raise ValueError(f"ViT3D expects (B, 1, {', '.join(map(str, self.img_size))}), got {tuple(x.shape)}")
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, C), x-major token order
        cls = self.cls_token * 1  # its gradient a tensor of its own, not a strided view of the cat's (DDP copies those)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)[:, 1:]  # (B, N, C)


def load_vision_weights(vit: ViT3D, path: str | Path) -> ViT3D:
    """Load BrgSA-layout encoder weights with strict key matching: .pth/.pt via torch.load(weights_only=True),
    .safetensors via safetensors. A training checkpoint wrapping them under "state_dict" or "model" also works."""
    path = Path(path)
    try:
        state = (load_file(path) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except Exception as e:   # missing, truncated, or pickled objects that weights_only refuses: name the file
        why = (str(e).splitlines() or ["no message"])[0]   # a first line (an empty file's EOFError has none)
        if isinstance(e, pickle.UnpicklingError):   # torch's own text offers weights_only=False, which we never use
            obj = str(e).split("GLOBAL ")[1].split()[0] if "GLOBAL " in str(e) else None
            why = (f"it pickles {obj}, which weights_only=True refuses: from a copy you trust, save its tensors alone"
                   if obj else "no PyTorch file that weights_only=True reads; is it the encoder's weights?")
        raise RuntimeError(f"{path}: cannot load encoder weights ({type(e).__name__}: {why})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: holds a {type(state).__name__}, not a dict of encoder weights")
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as e:   # name the file and, for another width, the preset it fits; then torch's first lines
        width = state["norm.weight"].shape[0] if "norm.weight" in state else None
        fits = [n for n, p in VIT_PRESETS.items() if p["width"] == width != vit.width]
        hint = f"; it holds a width-{width} encoder: the {fits[0]!r} ViT preset, --vit-preset {fits[0]}" if fits else ""
        raise RuntimeError(f"{path} does not fit this ViT3D (width {vit.width}, depth {len(vit.blocks)}){hint}:\n"
                           + first_lines(e)) from None   # not torch's whole list above it
    return vit


def first_lines(error: Exception, n: int = 6) -> str:
    """An error's first n lines, each cut at 300 characters, and how many more there are (torch's load_state_dict
    lists every mismatched key, a line each, and every missing key on one line)."""
    lines = [line if len(line) <= 300 else line[:300] + " ..." for line in str(error).splitlines()]
    return "\n".join(lines[:n] + [f"... ({len(lines) - n} more lines)"] * (len(lines) > n))


def save_vision_weights(vit: ViT3D, path: str | Path, metadata: dict | None = None) -> Path:
    """The encoder as BrgSA/timm-named safetensors, `metadata` in its header; atomic: a crash keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_after_kill(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(_cpu_state(vit), tmp, {k: str(v) for k, v in (metadata or {}).items()})
    os.replace(readable(tmp), path)
    return path


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


# ==== Bridge: adaptive weighted pooling + Residual Alignment Mechanism (paper eq. (1)-(3)) ========================
def compute_anchor(llm: nn.Module, vocab_size: int | None = None) -> torch.Tensor:
    """eq. (1): t_anchor = mean of the input-embedding rows (the first vocab_size rows: the tokenizer's real
    vocabulary when the matrix is padded, as Qwen2.5's is). Returns a detached float32 (D,) tensor."""
    return llm.get_input_embeddings().weight[:vocab_size or None].detach().float().mean(dim=0)


class Bridge(nn.Module):
    """(B, N, C) ViT tokens on grid (gx, gy, gz) -> (B, N_img, D) LLM-space image tokens, N_img = prod(g // 2)."""

    def __init__(self, vit_width: int, grid, llm_dim: int, anchor: torch.Tensor, ram: bool = True):
        super().__init__()
        if any(g < 2 or g % 2 for g in grid):   # the 2x2x2 pooling would drop a plane of tokens, or all of them
            raise ValueError(f"ViT grid {tuple(grid)} (image size / patch size): the bridge needs even sizes >= 2")
        self.in_grid, self.grid = tuple(grid), tuple(g // 2 for g in grid)
        self.n_img = math.prod(self.grid)
        self.pool = nn.Conv3d(vit_width, llm_dim, kernel_size=2, stride=2)  # adaptive weighted pooling, 14^3 -> 7^3
        self.proj = nn.Linear(llm_dim, llm_dim)
        self.proj_norm = nn.LayerNorm(llm_dim)
        # RAM gate MLP on [x; a]: W1 2D -> D, ReLU, W2 D -> D; one gate per channel (ram=False: ablation, no gate)
        self.gate = (nn.Sequential(nn.Linear(2 * llm_dim, llm_dim), nn.ReLU(), nn.Linear(llm_dim, llm_dim))
                     if ram else None)
        self.pos_embed = nn.Parameter(sincos_pos_embed_3d(llm_dim, self.grid).unsqueeze(0))  # (1, N_img, D), learnable
        self.norm = nn.LayerNorm(llm_dim)
        self.register_buffer("anchor", anchor.detach().float().clone().reshape(llm_dim))  # frozen, saved
        # the frozen encoder's token statistics over training scans (sft.py sets them; identity until then), saved
        self.register_buffer("feat_mean", torch.zeros(math.prod(self.in_grid), vit_width))
        self.register_buffer("feat_std", torch.ones(math.prod(self.in_grid), vit_width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        tokens = (tokens - self.feat_mean.to(tokens.dtype)) / self.feat_std.to(tokens.dtype)  # per position, channel
        x = tokens.transpose(1, 2).reshape(B, C, *self.in_grid)  # (B, C, gx, gy, gz)
        x = self.pool(x).flatten(2).transpose(1, 2)  # (B, N_img, D)
        x = self.proj_norm(self.proj(x))
        if self.gate is not None:
            a = self.anchor.to(x.dtype).expand_as(x)
            g = torch.sigmoid(self.gate(torch.cat([x, a], dim=-1)))  # eq. (3), per channel
            x = g * a + (1 - g) * x  # eq. (2)
        return self.norm(x + self.pos_embed)


# ==== The vision-language model ===================================================================================
def rope_theta(config) -> float | None:
    """The LLM's RoPE base, wherever this transformers version keeps it (rope_parameters since 5.x)."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", None))


def attn_implementation(device: str | torch.device) -> str:
    """The LLM's attention: flash_attention_2 when flash-attn is installed and the device computes in bf16/fp16
    (runtime.compute_dtype: CUDA, under autocast whatever the weights' dtype), else PyTorch SDPA."""
    fa2 = flash_attn_func is not None and compute_dtype(device) in (torch.float16, torch.bfloat16)
    return "flash_attention_2" if fa2 else "sdpa"


def load_llm(llm_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A local Hugging Face causal LM on `device`, weights in `dtype` (default fp32), attention as
    attn_implementation(device) says, and its tokenizer (no downloads, no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = torch.device(device), dtype or torch.float32
    try:
        llm, info = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype, local_files_only=True,
                                                         attn_implementation=attn_implementation(device),
                                                         output_loading_info=True)
    except SafetensorError as e:   # a weights file cut short (a copy stopped midway): transformers names none
        raise ValueError(f"{llm_dir}: a weights file does not read ({e}); copy the folder again") from e
    if missing := sorted(info["missing_keys"]):   # transformers would start them at random, with a warning only
        raise ValueError(f"{llm_dir}: {len(missing)} LLM weights are not in the checkpoint (the first: {missing[0]})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    except Exception as e:  # e.g. a tokenizer.json written by a newer tokenizers / transformers than this one
        raise RuntimeError(f"{llm_dir}: cannot load its tokenizer with transformers {version('transformers')} "
                           f"({type(e).__name__}: {e})") from e
    if tokenizer.chat_template is None:
        raise ValueError(f"{llm_dir}: the tokenizer has no chat template; Med3D-R1 builds every prompt with it")
    return llm.to(device), tokenizer


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... over each row's real tokens (left pads get 0, right pads the last): padding never shifts a position."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def read_checkpoint_file(path: Path):
    """A checkpoint's .json or .safetensors file; one that does not read (cut short, edited) is an error naming it."""
    try:
        return json.loads(path.read_text()) if path.suffix == ".json" else load_file(path)
    except (SafetensorError, ValueError) as e:   # JSON's and UTF-8's decoding errors are ValueErrors; OSErrors name it
        raise ValueError(f"{path} does not read ({type(e).__name__}: {e}); copy the checkpoint again") from e


def is_vlm_dir(path: str | Path) -> bool:
    """Whether path holds a checkpoint VLM.save wrote (config.json, llm/), not a run's, an LLM's or clip3d's folder."""
    return (Path(path) / "config.json").is_file() and (Path(path) / "llm").is_dir()


class VLM(nn.Module):
    """ViT3D + Bridge + causal LM. Build with VLM.build(llm_dir, ...) or VLM.load(ckpt_dir)."""

    def __init__(self, vit: ViT3D, bridge: Bridge, llm: nn.Module, tokenizer, config: dict):
        super().__init__()
        self.vit, self.bridge, self.llm, self.tokenizer, self.config = vit, bridge, llm, tokenizer, config
        self.n_img = bridge.n_img
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self._cache_kw = "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"
        self.ckpt_layers: list[nn.Module] = []  # LLM layers to checkpoint (set_grad_checkpointing)

    # ---- construction, checkpoints -----------------------------------------------------------------------------
    @classmethod
    def build(cls, llm_dir: str | Path, vit_preset: str | dict = "tiny", vit_weights: str | Path | None = None,
              ram: bool = True, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "VLM":
        """A fresh VLM from a local HF LLM directory and (optionally) BrgSA-layout encoder weights, the LLM in `dtype`
        (choice 7); the anchor (eq. (1)) is computed before the image placeholder is added to the vocabulary."""
        llm, tokenizer = load_llm(llm_dir, device, dtype)
        embed_rows = llm.get_input_embeddings().weight.shape[0]
        anchor = compute_anchor(llm, vocab_size=min(len(tokenizer), embed_rows))  # eq. (1)
        _prepare_tokenizer(tokenizer)
        if len(tokenizer) > embed_rows:  # new special tokens need rows; start them at the anchor
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                llm.get_input_embeddings().weight[embed_rows:] = anchor.to(llm.dtype)
        llm.config.eos_token_id = llm.generation_config.eos_token_id = tokenizer.eos_token_id
        llm.config.pad_token_id = llm.generation_config.pad_token_id = tokenizer.pad_token_id
        vit = ViT3D(**(VIT_PRESETS[vit_preset] if isinstance(vit_preset, str) else vit_preset))
        if vit_weights is not None:
            load_vision_weights(vit, vit_weights)
        llm_dim = llm.get_input_embeddings().weight.shape[1]
        bridge = Bridge(vit.width, vit.grid, llm_dim, anchor, ram=ram)
        config = dict(format="med3d-r1-vlm", vit=vit.preset,
                      vit_preset=vit_preset if isinstance(vit_preset, str) else None, n_img=bridge.n_img, ram=ram,
                      llm_dim=llm_dim, image_token=IMAGE_TOKEN, llm_source=str(llm_dir),
                      vit_weights=str(vit_weights) if vit_weights else None, meta={})
        return cls(vit, bridge, llm, tokenizer, config).to(device)

    @classmethod
    def load(cls, ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> "VLM":
        """Rebuild a VLM written by vlm.save(ckpt_dir, meta), the LLM in `dtype` (choice 7); meta: config["meta"]."""
        ckpt_dir = Path(ckpt_dir)
        if not is_vlm_dir(ckpt_dir):
            raise FileNotFoundError(f"{ckpt_dir} is not a complete VLM checkpoint (config.json and llm/)")
        config = read_checkpoint_file(ckpt_dir / "config.json")
        llm, tokenizer = load_llm(ckpt_dir / "llm", device, dtype)
        written = config.get("versions", {}).get("transformers")
        if config.get("rope_theta") not in (None, rope_theta(llm.config)):  # e.g. 5.x's rope_parameters read by 4.x
            raise RuntimeError(f"{ckpt_dir}: written with transformers {written}, read with {version('transformers')}:"
                               f" the LLM's rope theta reads as {rope_theta(llm.config)}, not {config['rope_theta']}; "
                               f"load it with transformers {str(written).split('.')[0]}.x")
        vit, bridge_state = ViT3D(**config["vit"]), read_checkpoint_file(ckpt_dir / "bridge.safetensors")
        bridge = Bridge(vit.width, vit.grid, config["llm_dim"], bridge_state["anchor"], ram=config["ram"])
        try:
            vit.load_state_dict(read_checkpoint_file(ckpt_dir / "vision.safetensors"), strict=True)
            bridge.load_state_dict(bridge_state, strict=True)
        except RuntimeError as e:   # written by other model code (another commit, a fork's bridge): say which
            code = config.get("versions", {})
            edited = ", ".join(code.get("git_changed", ["not recorded"])) or "none"
            raise RuntimeError(f"{ckpt_dir} does not fit this model.py: written by commit {code.get('git_commit')} "
                               f"(edited: {edited})\n" + first_lines(e)) from None   # not torch's whole list above it
        return cls(vit, bridge, llm, tokenizer, config).to(device)

    def save(self, ckpt_dir: str | Path, meta: dict | None = None) -> Path:
        """Write the whole model into one directory, atomically (a crash mid-save leaves the previous version).
        Call it on one rank; `meta` (the stage's run config, JSON-able) comes back as vlm.config["meta"]."""
        parts = {"vit": self.vit, "bridge": self.bridge, "llm": self.llm}
        self.config = {**self.config, "meta": meta or {}, "versions": versions(),
                       "rope_theta": rope_theta(self.llm.config),
                       "trainable": {name: any(p.requires_grad for p in m.parameters()) for name, m in parts.items()}}
        with atomic_dir(ckpt_dir) as tmp:
            self.llm.save_pretrained(tmp / "llm")
            self.tokenizer.save_pretrained(tmp / "llm")
            save_file(_cpu_state(self.vit), tmp / "vision.safetensors")
            save_file(_cpu_state(self.bridge), tmp / "bridge.safetensors")
            (tmp / "config.json").write_text(json.dumps(self.config, indent=2, default=str))
        return Path(ckpt_dir)

    def freeze(self, dtype: torch.dtype) -> "VLM":
        """Eval mode, no gradients, and the LLM's matmul weights (each nn.Linear's weight and bias, except one tied to
        the input embedding) stored in `dtype`: what autocast to `dtype` rounds them to anyway. Embeddings, norms,
        buffers, the ViT and the bridge keep fp32, so under autocast this copy computes what the fp32 model computes,
        in about half its memory (choice 7)."""
        tied = {id(p) for p in self.llm.get_input_embeddings().parameters()}
        for linear in (m for m in self.llm.modules() if isinstance(m, nn.Linear)):
            for p in linear.parameters(recurse=False):
                if id(p) not in tied:
                    p.data = p.data.to(dtype)
        return self.eval().requires_grad_(False)

    def set_trainable(self, vit: bool, bridge: bool, llm: bool) -> None:
        """Freeze or unfreeze the three parts (the anchor is a buffer and always frozen)."""
        for module, flag in ((self.vit, vit), (self.bridge, bridge), (self.llm, llm)):
            module.requires_grad_(flag)

    def set_grad_checkpointing(self, on: bool) -> None:
        """With on: recompute each ViT block's and LLM decoder layer's activations in the backward pass (HF's
        checkpointing, use_reentrant=False). HF checkpoints a layer only in training mode, so forward() sets the
        layers' own flag (not their submodules', e.g. dropout) while gradients flow; generate() keeps its cache."""
        if not on:
            return
        from transformers.modeling_layers import GradientCheckpointingLayer
        self.vit.grad_checkpointing = True
        enable = getattr(self.llm, "activation_checkpointing_enable", self.llm.gradient_checkpointing_enable)
        enable({"use_reentrant": False})  # the checkpoint's kwargs: first argument of the 5.x name and of the old one
        self.ckpt_layers = [m for m in self.llm.modules() if isinstance(m, GradientCheckpointingLayer)]

    @property
    def device(self) -> torch.device:
        return self.bridge.anchor.device

    # ---- text ---------------------------------------------------------------------------------------------------
    def prompt(self, user_text: str, with_image: bool = True) -> str:
        """One user turn through the tokenizer's chat template, ending with the assistant header."""
        content = f"{VISION_START}{IMAGE_TOKEN * self.n_img}{VISION_END}\n{user_text}" if with_image else user_text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_len(self, user_text: str) -> int:
        """Tokens of `prompt(user_text)`: template, image placeholders and text."""
        return len(self.tokenizer(self.prompt(user_text), add_special_tokens=False)["input_ids"])

    def tokenize(self, prompts: list[str], padding_side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids, attention_mask), (B, T) on the model's device; the template holds every special token."""
        batch = self.tokenizer(list(prompts), padding=True, padding_side=padding_side, add_special_tokens=False,
                               return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    # ---- forward --------------------------------------------------------------------------------------------------
    def image_embeds(self, volumes: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) -> (B, N_img, D)."""
        return self.bridge(self.vit(volumes))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D), each row's N_img placeholder embeddings replaced by that row's image_embeds."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id  # (B, T), found per row
        counts = is_image.sum(1)
        if image_embeds is None:
            if bool(counts.any()):
                raise ValueError("the prompts hold image placeholders but no image_embeds were given")
            return embeds
        if image_embeds.shape[:2] != (input_ids.shape[0], self.n_img) or bool((counts != self.n_img).any()):
            raise ValueError(f"every row needs exactly {self.n_img} placeholders and image embeddings; got "
                             f"placeholders {counts.tolist()} and image_embeds {tuple(image_embeds.shape)}")
        # masked_scatter fills positions in row-major order: row b's placeholders get image_embeds[b], in order
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """-> logits (B, T, V), or of the last logits_to_keep positions only (B, logits_to_keep, V) when > 0."""
        layers = self.ckpt_layers if torch.is_grad_enabled() else []  # see set_grad_checkpointing
        modes = [layer.training for layer in layers]
        for layer in layers:
            layer.training = True
        try:
            return self.llm(inputs_embeds=self.embed(input_ids, image_embeds), attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), use_cache=False,
                            logits_to_keep=logits_to_keep).logits
        finally:
            for layer, mode in zip(layers, modes):
                layer.training = mode

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       image_embeds: torch.Tensor | None = None, temperature: float = 1.0,
                       last: int | None = None) -> torch.Tensor:
        """(B, T-1) float32: log p(input_ids[:, t+1] | ..t) under softmax(logits / temperature); with `last`, only
        the log-probs of the last `last` tokens (B, last), e.g. a completion, and the LM head runs on those
        positions only. Values at padded positions are finite and meaningless; mask them by position."""
        if temperature <= 0:
            raise ValueError("token_logprobs needs a temperature > 0")
        keep = 0 if last is None else last + 1
        logits = self.forward(input_ids, attention_mask, image_embeds, logits_to_keep=keep)[:, :-1].float()
        logits = self.block_unsampled(logits / temperature)
        targets = input_ids[:, 1:] if last is None else input_ids[:, input_ids.shape[1] - last:]
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    def block_unsampled(self, logits: torch.Tensor) -> torch.Tensor:
        """Give the image placeholder, the vision markers and pad a (finite) -1e9 logit: a completion can never
        contain them, and sampling and scoring (token_logprobs) see the same distribution."""
        ids = [self.image_token_id, self.pad_token_id] + [i for i in self.tokenizer.convert_tokens_to_ids(
            [VISION_START, VISION_END]) if i is not None and i != self.tokenizer.unk_token_id]
        logits = logits.clone()
        logits[..., [i for i in ids if i != self.eos_token_id]] = -1e9
        return logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor | None = None,
                 num_samples: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 generator: torch.Generator | list[torch.Generator] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample num_samples completions per left-padded prompt (temperature 0 = greedy), rows prompt-major, the image
        embeddings repeated. `generator`: one for the batch, or one per prompt, whose samples then do not depend on
        its batch mates (up to float noise from padding). -> (completion_ids (B*G, T_new) padded with the pad id,
        lengths (B*G,) counting the EOS when produced, finished (B*G,) True where EOS came)."""
        per_prompt = isinstance(generator, (list, tuple))
        if per_prompt and len(generator) != input_ids.shape[0]:
            raise ValueError(f"{len(generator)} generators for {input_ids.shape[0]} prompts")
        ids, mask = input_ids.repeat_interleave(num_samples, 0), attention_mask.repeat_interleave(num_samples, 0)
        images = image_embeds.repeat_interleave(num_samples, dim=0) if image_embeds is not None else None
        n = ids.shape[0]
        out = self.llm(inputs_embeds=self.embed(ids, images), attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=True, logits_to_keep=1)
        next_pos = mask.long().sum(1, keepdim=True)  # (n, 1) position of each row's first new token
        completion = torch.full((n, max_new_tokens), self.pad_token_id, dtype=torch.long, device=ids.device)
        lengths, finished = ids.new_zeros(n, dtype=torch.long), ids.new_zeros(n, dtype=torch.bool)
        for t in range(max_new_tokens):
            logits = self.block_unsampled(out.logits[:, -1].float())  # (n, V)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                # per prompt: prompt j's rows draw from generator j, in row order; else all rows from `generator`
                draws = zip(probs.split(num_samples), generator) if per_prompt else [(probs, generator)]
                token = torch.cat([torch.multinomial(p, 1, generator=g).squeeze(1) for p, g in draws])
            else:
                token = logits.argmax(-1)
            token = torch.where(finished, self.pad_token_id, token)
            completion[:, t] = token
            lengths += (~finished).long()
            finished |= token == self.eos_token_id
            if t == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            out = self.llm(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos + t, use_cache=True,
                           **{self._cache_kw: out.cache if hasattr(out, "cache") else out.past_key_values})
        return completion[:, :int(lengths.max())], lengths, finished


def _prepare_tokenizer(tokenizer) -> None:
    """Add the image placeholder (and vision start/end if missing) as special tokens; make the chat template's
    turn end the EOS when the vocabulary has <|im_end|>; make sure a pad token other than EOS exists."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
    new = [t for t in (VISION_START, VISION_END, IMAGE_TOKEN) if t not in vocab]
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        pad = "<|endoftext|>" if "<|endoftext|>" in vocab and tokenizer.eos_token != "<|endoftext|>" else "<|pad|>"
        tokenizer.pad_token = pad
        if pad not in vocab:
            new.append(pad)
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
