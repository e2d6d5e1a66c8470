"""Med3D-R1 model: 3D ViT encoder, adaptive pooling + Residual Alignment bridge, LLM wrapper, checkpoints.

(The model sections are written above the runtime section below.)
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


# =====================================================================================================================
# Training runtime shared by the stages (clip3d.py, sft.py, grpo.py, evaluate.py)
# Small on purpose: DDP set-up, rank-0 printing, the cosine schedule, the all-ranks finite check, RNG state and
# atomic checkpoint directories. Each stage keeps its own loop.
# =====================================================================================================================

def setup_distributed() -> tuple[int, int, int, torch.device]:
    """Start torch.distributed when launched by torchrun; returns (rank, local_rank, world_size, device).

    Plain `python stage.py` runs as rank 0 of 1 without a process group. NCCL on CUDA, gloo on CPU.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
            return rank, local_rank, world, torch.device("cuda", local_rank)
        dist.init_process_group("gloo")
        return rank, local_rank, world, torch.device("cpu")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return 0, 0, 1, device


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group; op in {sum, min, max, avg}."""
    if world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        if op == "avg":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= world_size()
        else:
            dist.all_reduce(t, op=ops[op])
    return t


def all_ranks_finite(*values: torch.Tensor) -> bool:
    """True only if every value is finite on every rank, so all ranks take the same skip/step decision."""
    ok = torch.tensor([float(all(bool(torch.isfinite(v).all()) for v in values))],
                      device=values[0].device if values else "cpu")
    return bool(all_reduce(ok, "min").item() > 0)


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True if `flag` is true on any rank (used for stop requests such as SIGTERM)."""
    return bool(all_reduce(torch.tensor([float(flag)], device=device), "max").item() > 0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, plain fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float = 0.0) -> float:
    """Linear warm-up to base_lr over warmup_steps, then cosine decay to min_ratio * base_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, st, gauss = state["python"]
    random.setstate((v, tuple(st), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def atomic_dir(final: str | Path):
    """Write a directory atomically: yield a temporary sibling, then swap it into place.

    A crash inside the block leaves `final` as it was (the previous complete version, or absent). Readers treat a
    directory as valid only if it exists under its final name.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)  # two renames: the window between them has no `final`, never a half-written one
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def save_train_state(ckpt_root: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save a resumable training state as <ckpt_root>/step_<step>/state.pt atomically; keep the newest `keep`.

    `state` holds tensors, numbers, strings and dicts/lists of them (model state_dicts of the trainable parameters,
    optimizer.state_dict(), rng_state(), the data position, the args) so that it loads with weights_only=True.
    """
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_train_state(ckpt_root: str | Path) -> dict | None:
    """Load the newest complete training state under ckpt_root, or None if there is none."""
    done = sorted(p for p in Path(ckpt_root).glob("step_*") if (p / "state.pt").is_file())
    return torch.load(done[-1] / "state.pt", map_location="cpu", weights_only=True) if done else None


class SigtermFlag:
    """Turns SIGTERM into a flag the loop polls (then saves a checkpoint and exits cleanly)."""

    def __init__(self):
        self.raised = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.raised = True
