"""The run-time every stage shares: DDP set-up, rank-0 printing, all-reduce, the all-rank finite check, RNG state,
atomic checkpoints, one save / resume / stop helper (`Run`), the cosine schedule and the command-line conventions.

Small on purpose: each stage keeps its own loop and its own `train_step`; this file only holds what would otherwise
be written again, and drift, in every stage.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import glob
import json
import math
import multiprocessing.util   # registers multiprocessing's exit handler: _kill_workers must come after
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader


def setup_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device): a process group under torchrun (NCCL on CUDA, gloo on CPU), else
    rank 0 of 1 without one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if rank != 0:  # only rank 0 shows progress, transformers' own loading bars included
            import transformers
            transformers.utils.logging.disable_progress_bar()
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            # gloo's 30 minutes, not NCCL's 10: the other ranks wait in a collective while rank 0 writes a
            # checkpoint alone (tens of GB in grpo.py), and NCCL's watchdog would end the run on slow storage
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank), timeout=timedelta(minutes=30))
            return rank, local_rank, world, torch.device("cuda", local_rank)
        dist.init_process_group("gloo")
        return rank, local_rank, world, torch.device("cpu")
    return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cleanup_distributed() -> None:
    """The end of a stage, after its final saves: leave the process group and release the run folders' locks."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    while _locks:
        _locks.popitem()[1].close()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def print0(*args, **kwargs) -> None:
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group; op in {sum, min, max, avg}."""
    if world_size() > 1:
        ops = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(t, op=ops[op])
        if op == "avg":
            t /= world_size()
    return t


def all_ranks_finite(*values: torch.Tensor) -> bool:
    """True only if every value is finite on every rank, so all ranks take the same skip/step decision."""
    ok = torch.tensor([float(all(bool(torch.isfinite(v).all()) for v in values))],
                      device=values[0].device if values else "cpu")
    return bool(all_reduce(ok, "min").item() > 0)


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The one precision choice: every forward pass computes in it (autocast) and frozen weights are stored in it.
    bf16 on CUDA (tensor cores, half the memory), fp32 on the CPU (the phantom world and the tests stay exact)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def autocast(device: torch.device | str):
    """Autocast to compute_dtype(device): bf16 on CUDA; none on the CPU (plain fp32)."""
    device, dtype = torch.device(device), compute_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


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
    if torch.cuda.is_available():   # this rank's device only (setup_distributed sets it): a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    v, st, gauss = state["python"]
    random.setstate((v, tuple(st), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():   # a list: every visible GPU's (older checkpoints)
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[torch.cuda.current_device()] if isinstance(cuda, list) else cuda)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def clean_after_kill(parent: Path, name: str | None = None) -> None:
    """What a process killed inside atomic_dir (or save_vision_weights) left in `parent` beside the final `name` (None:
    beside any): its half-written temporary (a checkpoint can be gigabytes) is deleted; the previous version, if the
    kill fell between the two renames, is put back when its final is missing, else deleted."""
    for kind in ("old", "tmp"):
        for path in sorted(parent.glob(f".{'*' if name is None else glob.escape(name)}.{kind}-*")):
            hidden, _, pid = path.name.rpartition(f".{kind}-")
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            final = parent / hidden[1:]
            if kind == "old" and not final.exists():
                os.replace(path, final)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(final: str | Path):
    """Write a directory atomically: yield a temporary sibling, then swap it into place. A crash inside the block
    leaves `final` as it was (the previous complete version, or absent); an error there is raised again naming
    `final` and the free space. The files get the read permissions the umask allows (`readable`)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_after_kill(final.parent, final.name)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        readable(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        kept = f" (the earlier {final.name} stays)" if final.exists() else ""
        raise (OSError if isinstance(e, OSError) else RuntimeError)(   # torch says only "unexpected pos 704 vs 598"
            f"{final} was not written ({type(e).__name__}: {e}); nothing else was touched{kept}; "
            f"{free_space(final.parent)}") from e
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)  # two renames: the window between them has no `final`, never a half-written one
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def free_space(folder: Path) -> str:
    """What a failed write says of the disk: "0.0039 GB free there" for 3.9 MB, "412 GB free there" for many."""
    return f"{shutil.disk_usage(folder).free / 1e9:.3g} GB free there"


def readable(path: Path) -> Path:
    """Give the files under path (or the file) the read permissions the umask allows: safetensors writes its files
    0600, which another user (a colleague evaluating a shared runs folder) cannot read."""
    mask = os.umask(0o022)
    os.umask(mask)
    for f in [path] if path.is_file() else path.rglob("*"):
        if f.is_file():
            f.chmod(f.stat().st_mode | (0o444 & ~mask))
    return path


def write_atomic(path: str | Path, text) -> None:
    """Write a UTF-8 text file atomically: a temporary file in the same folder (a rename across file systems fails),
    renamed over `path`. A failed write (a full disk) removes the temporary and leaves the earlier file as it was.
    `text` may instead be a function that writes the file at the path it is given (a figure's savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:200]}.tmp-{os.getpid()}-{threading.get_ident()}")   # threads may share a path
    try:
        text(tmp) if callable(text) else tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_appended(path: str | Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of a JSON-lines file that is only ever appended to (metrics, a cache manifest, a
    reply cache). A line cut short by a kill or a full disk is dropped and said, and the file rewritten without it,
    so that the next append starts a line of its own."""
    path = Path(path)
    text, rows, torn = path.read_text("utf-8") if path.exists() else "", [], 0
    for line in filter(str.strip, text.split("\n")):
        try:
            rows.append((line, json.loads(line)))
        except json.JSONDecodeError:
            torn += 1
    if torn or text[-1:] not in ("", "\n"):
        print(f"{path}: dropped {torn} line(s) that are not valid JSON (a write cut short)", flush=True)
        write_atomic(path, "".join(line + "\n" for line, _ in rows))
    return rows


def writable_dir(folder: str | Path, flag: str = "--out") -> Path:
    """folder, made if missing; one that cannot be written (read-only, another user's, a file) stops the process
    naming it and the flag, before any work that would be lost."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise SystemExit(f"{folder}: cannot write there ({e.strerror}): choose another {flag}") from None
    return folder


_locks: dict[Path, object] = {}   # folder -> this process's open <folder>/.lock


def lock_folder(folder: str | Path, what: str, wait: bool = False, flag: str = "--out") -> None:
    """Hold <folder>/.lock until unlock_folder(folder) or cleanup_distributed (or the process ends), so that no other
    process writes there meanwhile: one that holds it stops this one naming its pid (wait=True: waits for it). A
    folder this process holds already stays held."""
    folder = Path(folder).resolve()
    if folder in _locks:
        return
    f = open(writable_dir(folder, flag) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f"{folder} is in use by another {what} (pid {f.read().strip() or '?'})"
        if not wait:
            f.close()
            raise SystemExit(f"{holder}: let it finish, or choose another folder") from None
        print(f"{holder}: waiting for it", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
    except OSError as e:   # a file system without locks (some network ones): go on unguarded, and say so
        print(f"{folder}: cannot be locked ({e}); nothing keeps a second process from writing here", flush=True)
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[folder] = f


def unlock_folder(folder: str | Path) -> None:
    if (f := _locks.pop(Path(folder).resolve(), None)) is not None:
        f.close()


def save_train_state(ckpt_root: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """<ckpt_root>/step_<step>/state.pt, atomically; keeps the newest `keep`. `state` holds tensors, numbers,
    strings and dicts / lists of them, so that it loads with weights_only=True."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / f"step_{step:08d}"
    clean_after_kill(ckpt_root)   # also a killed save of a step that is never saved again
    with atomic_dir(final) as tmp:
        torch.save(state, tmp / "state.pt")
    for old in sorted(ckpt_root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_train_state(ckpt_root: str | Path) -> dict | None:
    """Load the newest complete training state under ckpt_root, or None if there is none. Mapped from the file, not
    read into memory: every rank loads it, and the ranks of a node share one copy in the page cache."""
    done = sorted(p for p in Path(ckpt_root).glob("step_*") if (p / "state.pt").is_file())
    try:
        return torch.load(done[-1] / "state.pt", map_location="cpu", weights_only=True, mmap=True) if done else None
    except Exception as e:   # cut short or overwritten: name it, and the older one a resume can fall back on
        older = f"; delete {done[-1]} to resume from {done[-2]}" if len(done) > 1 else ""
        raise RuntimeError(f"{done[-1] / 'state.pt'} cannot be read ({type(e).__name__}: {e}){older}") from e


def local_dir(path, what: str = "") -> None:
    """Model arguments are local directories only: any other name would make transformers download it."""
    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{what}{path} is not a local model directory (no config.json); nothing is downloaded")


def versions() -> dict:
    """What wrote a checkpoint: the git commit of this code, the tracked files changed since that commit (a fork's
    edits), and the versions that change numerics or formats."""
    from importlib.metadata import version
    git = lambda *a: subprocess.run(["git", *a], cwd=Path(__file__).parent, capture_output=True, text=True,
                                    timeout=10).stdout
    try:
        commit, changed = git("rev-parse", "HEAD").strip() or None, git("diff", "HEAD", "--name-only").split()
    except (OSError, subprocess.SubprocessError):
        commit, changed = None, []
    return {"git_commit": commit, "git_changed": changed, "python": sys.version.split()[0],
            "torch": str(torch.__version__), "transformers": version("transformers"),
            "safetensors": version("safetensors")}


_stop_signal: int | None = None  # the SIGINT / SIGTERM that asked this process to stop


def _on_stop_signal(signum, frame) -> None:
    global _stop_signal
    if _stop_signal is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
    _stop_signal = signum  # the loop finishes its step, saves a checkpoint and stops


def _ignore_stop_signals(worker_id: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@atexit.register   # after multiprocessing's exit handler, so it runs before it (atexit runs the last first)
def _kill_workers() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # torch's handler would report each kill as a worker failure
    for worker in multiprocessing.active_children():
        if worker.daemon:
            worker.kill()


def data_loader(dataset, **kwargs) -> DataLoader:
    """A DataLoader whose workers leave SIGINT and SIGTERM sent to the whole process group (Slurm's cancel or time
    limit, `kill -- -PGID`) to the main process, which finishes its step and saves; a worker killed by one would end
    the run without a checkpoint. When an error ends the process with workers still alive (a traceback keeps their
    iterator), they are killed at exit: multiprocessing would send them SIGTERM, which they ignore, and wait forever."""
    return DataLoader(dataset, worker_init_fn=_ignore_stop_signals, **kwargs)


def exit_code() -> int:
    """The process's exit status: 128 + the signal that stopped a run (130 Ctrl-C, 143 SIGTERM), else 0."""
    return 128 + _stop_signal if _stop_signal is not None else 0


def wrap_ddp(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel under torchrun (one device per process), the module itself otherwise; the gradients
    are views into DDP's all-reduce buckets, so no second copy of them is kept."""
    if world_size() == 1:
        return net
    return DDP(net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def wrap(net: torch.nn.Module, device: torch.device, shard: str = "ddp") -> torch.nn.Module:
    """DDP ("ddp") or FSDP2 ("fsdp", in place) under torchrun, else the module itself. FSDP shards what trains, its
    gradients and AdamW state: one group per ModuleList member holding a trainable parameter (ViT block, LLM decoder
    layer), then the root. Frozen parameters stay whole on every rank: sharding them would add an all-gather."""
    if world_size() == 1:
        return net
    if shard == "ddp":
        return wrap_ddp(net, device)
    from torch.distributed.fsdp import fully_shard
    frozen = {p for p in net.parameters() if not p.requires_grad}
    blocks = [b for m in net.modules() if isinstance(m, torch.nn.ModuleList) for b in m]
    for block in reversed(blocks):  # bottom-up, as fully_shard asks
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, ignored_params=frozen)
    return fully_shard(net, ignored_params=frozen)


def _fsdp_modules(net: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in net.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(net: torch.nn.Module):
    """Under FSDP, every parameter whole on every rank inside the block (one all-gather per group, not one per layer
    and token of a generation loop), resharded on exit; nothing otherwise. Call it on every rank."""
    groups = _fsdp_modules(net)
    if not groups:
        yield
        return
    net._get_fsdp_state()._lazy_init()  # FSDP2 takes the first module to run forward as root: make it `net`
    for m in groups:
        m.unshard()
    net.set_reshard_after_forward(False)
    try:
        yield
    finally:
        net.set_reshard_after_forward(True)
        net.set_reshard_after_forward(False, recurse=False)  # FSDP2's defaults: the root stays whole for backward
        for m in groups:
            m.reshard()


def train_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"model", "optimizer"}: trainable parameters, buffers and optimizer state, whole, on the CPU, keyed by name: one
    layout under one process, DDP or FSDP. A collective under FSDP; only rank 0's is complete."""
    import torch.distributed.checkpoint.state_dict as dsd
    opts = dsd.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    inner = getattr(net, "module", net)
    names = {n for n, _ in inner.named_parameters()} | {n for n, _ in inner.named_buffers()}  # a shared one once
    return {"model": {k: v for k, v in dsd.get_model_state_dict(net, options=opts).items() if k in names},
            "optimizer": dsd.get_optimizer_state_dict(net, optimizer, options=opts)}


def load_train_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load what train_state saved into the (possibly sharded) model and optimizer, on every rank."""
    import torch.distributed.checkpoint.state_dict as dsd
    inner = getattr(net, "module", net)
    missing = sorted(n for n, p in inner.named_parameters() if p.requires_grad and n not in state["model"])
    if missing:
        raise SystemExit(f"the checkpoint holds no {missing[0]} (and {len(missing) - 1} more trainable parameters): "
                         f"resume with the options it was written with")
    opts = dsd.StateDictOptions(full_state_dict=True, strict=False)  # frozen parameters are not in a checkpoint
    dsd.set_model_state_dict(net, state["model"], options=opts)
    dsd.set_optimizer_state_dict(net, optimizer, state["optimizer"], options=opts)


def unshard_for_saving(net: torch.nn.Module) -> None:
    """Under FSDP, put the whole parameters in place of the shards on every rank (a collective), so that the model
    is written as usual (Module.state_dict, save_pretrained); it trains no further. Nothing otherwise."""
    if not _fsdp_modules(net):
        return
    import torch.distributed.checkpoint.state_dict as dsd
    from torch.distributed.tensor import DTensor
    whole = {}  # by shard: tied weights (embeddings and LM head) stay one parameter
    for name, value in dsd.get_model_state_dict(net, options=dsd.StateDictOptions(full_state_dict=True)).items():
        owner, _, attr = name.rpartition(".")
        shard = getattr(net.get_submodule(owner), attr)
        if isinstance(shard, DTensor):  # FSDP registers the shards only while they are resharded
            whole.setdefault(id(shard), torch.nn.Parameter(value, requires_grad=shard.requires_grad))
            setattr(net.get_submodule(owner), attr, whole[id(shard)])


def adamw(params: list, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW that decays matrices, convolution kernels and embeddings but not biases, norm weights or scalars
    (ndim < 2): the rule of Hugging Face's Trainer, which ran the official SFT and RL."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, grad_clip: float, nan_policy: str, step: int,
                   *values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Clip, then step only if `values` and the gradient norm are finite on every rank; otherwise every rank skips the
    update (nan_policy "skip") or stops ("stop"). -> (gradient norm before clipping, whether the update was applied)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor, the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    finite = all_ranks_finite(*values, grad_norm)
    if finite:
        optimizer.step()
    else:
        action, what = "skipping the update" if nan_policy == "skip" else "stopping", "non-finite loss or gradient"
        print(f"[rank {get_rank()}] {what} at step {step + 1}: {action} (--nan-policy {nan_policy})", flush=True)
        if nan_policy == "stop":   # step + 1: as metrics.jsonl and the checkpoints count
            raise SystemExit(f"{what} at step {step + 1} on some rank (--nan-policy stop)")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def json_safe(value):
    """NaN and infinities as null, so that metrics.jsonl stays valid JSON Lines."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


# Flags a resumed run may change: where and how often it writes, how it stops, memory and speed options (and clip3d's
# accum, which follows from micro_batch).
RESUME_MAY_CHANGE = {"out", "resume", "overwrite", "stop_at", "save_every", "nan_policy", "workers", "eval_every",
                     "log_every", "grad_ckpt", "micro_batch", "accum", "cache_features"}


# What a stage writes in its --out, in the order --overwrite deletes it: the run's record (metrics, checkpoints) last.
RUN_OUTPUTS = ("vlm", "curves.png", "vision_encoder.safetensors", "config.json", "metrics.jsonl", "ckpt")


def earlier_run(out: Path, resume: bool, overwrite: bool) -> list[str]:
    """What an earlier run left in `out`; a fresh run (neither resume nor overwrite) stops there, naming it."""
    earlier = [p.name for p in (out / "metrics.jsonl", out / "ckpt") if p.exists()]
    if earlier and not resume and not overwrite:
        raise SystemExit(f"{out} holds an earlier run ({', '.join(earlier)}): pass --resume to continue it "
                         f"or --overwrite to start afresh (or choose another --out)")
    return earlier


class Run:
    """A stage's output folder: metrics.jsonl, resumable checkpoints under ckpt/, and stop requests.

    A fresh run starts a new metrics.jsonl and removes an earlier run's checkpoints (with --overwrite also its other
    RUN_OUTPUTS). With resume=True the newest complete checkpoint is loaded (`run.state`, or None; set it to None once
    loaded: it maps the checkpoint's file, which a later save may delete), this rank's RNG state restored, and
    metrics.jsonl keeps the rows up to the step resumed from; a checkpoint written with other flags (`args`, except
    RESUME_MAY_CHANGE) or another world size is refused: the run would not continue as it began. `skipped` counts the
    optimizer steps the loop skipped (a non-finite loss or gradient), over the whole run: it is saved with each
    checkpoint and resumed. An input of the run (`inputs`: a checkpoint, a model folder) where the run writes is
    refused. Create it after the model is built (building consumes RNG), before the loop. The folder is locked until
    cleanup_distributed: a second process running there (an --overwrite would wipe the first's outputs) is refused."""

    def __init__(self, out: str | Path, resume: bool, overwrite: bool = False, stop_at: int | None = None,
                 keep: int = 2, curves: tuple[str, ...] = (), save_every: int = 0, save_last: bool = False,
                 args: dict | None = None, inputs: tuple = ()):
        global _stop_signal
        if resume and overwrite:
            raise SystemExit("--resume and --overwrite exclude each other: continue the earlier run or start afresh")
        self.out, self.stop_at, self.keep, self.curves = Path(out), stop_at, keep, curves
        for given in (Path(i).resolve() for i in inputs if i):   # e.g. grpo.py --sft D/vlm --out D
            if given == self.out.resolve() or any((self.out / n).resolve() in (given, *given.parents)
                                                  for n in RUN_OUTPUTS):
                raise SystemExit(f"{given} is an input of this run, and {self.out} is where the run writes (and with "
                                 f"--overwrite deletes) its outputs: choose another --out")
        self.save_every, self.save_last, self.args = save_every, save_last, args
        self.rank, self.world = get_rank(), world_size()
        if self.rank == 0:
            lock_folder(self.out, "run")   # before anything here is read or changed; released by cleanup_distributed
        earlier = earlier_run(self.out, resume, overwrite)
        if self.world > 1:
            dist.barrier()  # every rank has looked at the folder before rank 0 changes it
        self.state = latest_train_state(self.out / "ckpt") if resume else None
        self.start, self.skipped = 0, 0
        if self.state is not None:
            self.start, self.skipped = self.state["step"], self.state.get("skipped", 0)
            rngs, saved = self.state["rng"], self.state.get("args") or {}
            same = lambda a, b: a == b or isinstance(a, str) and isinstance(b, str) and \
                os.path.realpath(a) == os.path.realpath(b)   # a path spelled otherwise: "../x/" for "/tmp/x"
            changed = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in (args or {}).items()
                       if k in saved and k not in RESUME_MAY_CHANGE and not same(saved[k], v)]
            changed += [f"world size {len(rngs)} -> {self.world}"] if len(rngs) != self.world else []
            if changed:
                raise SystemExit(f"{self.out}: its checkpoint was written with other settings ({'; '.join(changed)}): "
                                 f"resume with the checkpoint's, or start afresh with --overwrite")
            set_rng_state(rngs[self.rank])
            print0(f"resumed from step {self.start}")
        elif resume and earlier:   # a finished run saved no checkpoint after its last step, or none was written yet
            raise SystemExit(f"{self.out} holds a run ({', '.join(earlier)}) but no checkpoint to resume from: start "
                             f"afresh with --overwrite (or choose another --out)")
        elif resume:
            print0(f"no checkpoint under {self.out / 'ckpt'}: starting from step 0")
        _stop_signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C and SIGTERM alike: finish the step, save, exit
            signal.signal(sig, _on_stop_signal)
        self._log = None
        if self.rank == 0:
            metrics = self.out / "metrics.jsonl"
            if self.state is None:   # with --overwrite the earlier run's outputs go too: none may pass for this run's;
                # metrics and checkpoints last, so that a kill in between leaves a folder a fresh run still refuses
                for path in (self.out / name for name in (RUN_OUTPUTS if overwrite else RUN_OUTPUTS[-2:])):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
            elif metrics.exists():
                rows = read_appended(metrics)
                kept = [line for line, row in rows if row.get("step", 0) <= self.start]
                write_atomic(metrics, "".join(line + "\n" for line in kept))   # a kill here keeps the rows
            self._log = open(metrics, "a")

    def log(self, row: dict) -> None:
        """Append one row to metrics.jsonl (rank 0)."""
        if self._log is not None:
            try:
                self._log.write(json.dumps(json_safe(row)) + "\n")
                self._log.flush()
            except OSError as e:   # a full disk: name the file and the space left
                raise OSError(f"{self.out / 'metrics.jsonl'}: cannot append ({e.strerror}); "
                              f"{free_space(self.out)}") from e

    def save(self, step: int, state: dict) -> None:
        """Save a resumable checkpoint: `state`, the step, the skipped-step count, every rank's RNG state and the run's
        flags (`args`, which a resume compares). Call it on every rank."""
        rngs = [rng_state()] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rngs[0])  # every rank's own state in its slot
        if self.rank == 0:
            state = {**state, "step": step, "skipped": self.skipped, "rng": rngs, "args": self.args,
                     "versions": versions()}
            save_train_state(self.out / "ckpt", step, state, keep=self.keep)

    def end_step(self, step: int, total: int, state, device: torch.device | str = "cpu") -> bool:
        """After optimizer step `step` of `total`, on every rank: save a resumable checkpoint of `state()` (a collective
        under FSDP) every `save_every` steps before the last (0: none), at the last with `save_last`, and when a stop
        was requested; True when the run stops here (its message printed)."""
        global _stop_signal
        stop = self.should_stop(step, device)
        if stop and step == total:   # nothing is left to stop: the run ends as a finished one (exit status 0)
            _stop_signal, stop = None, False
        due = step < total and self.save_every and step % self.save_every == 0
        if stop or due or (self.save_last and step == total):
            self.save(step, state())
        if stop:
            self.stopped(step)
        return stop

    def should_stop(self, step: int, device: torch.device | str = "cpu") -> bool:
        """True on every rank once any rank received SIGINT or SIGTERM, or at --stop-at. A rank that was not signalled
        takes on the signal, so that every rank reports it and exits with its status (exit_code)."""
        global _stop_signal
        signum = int(all_reduce(torch.tensor([float(_stop_signal or 0)], device=device), "max").item())
        _stop_signal = _stop_signal or signum or None
        return bool(signum) or step == self.stop_at

    def stopped(self, step: int) -> None:
        """The one line a stopped run prints after saving its checkpoint."""
        why = f"stopped by {signal.Signals(_stop_signal).name}" if _stop_signal is not None else "stopped"
        print0(f"{why} after step {step}: saved a resumable checkpoint in {self.out / 'ckpt'}; continue with the "
               f"same command and --resume")

    def close(self) -> None:
        """Restore the signal handlers, close metrics.jsonl and plot its curves (also after a stop request)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self._log is not None:
            self._log.close()
            self._log = None
            if self.curves:
                plot_curves(self.out / "metrics.jsonl", self.curves, self.out / "curves.png")


def plot_curves(metrics: str | Path, series: tuple[str, ...], png: str | Path) -> None:
    """One panel per series of a metrics.jsonl against the step; rows without a (finite) value are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in Path(metrics).read_text().split("\n") if line.strip()]
    n_rows = math.ceil(len(series) / 3)
    fig, axes = plt.subplots(n_rows, 3, figsize=(12, 2.6 * n_rows), squeeze=False)
    counts = {}
    for ax, key in zip(axes.flat, series):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        counts[key] = len(points)
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, markersize=3)
        ax.set(title=key, xlabel="step")
    for ax in axes.flat[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    write_atomic(png, lambda tmp: fig.savefig(tmp, format="png", dpi=100,   # metadata: what each panel holds
                                              metadata={"Description": json.dumps({"points": counts})}))
    plt.close(fig)


# ==== Command lines: the paper's defaults on the flags, the phantom world's overrides in one dict per stage ========
HIDDEN = argparse.SUPPRESS  # help text of flags only tests use (--stop-at, --max-steps, --inject-nan) or a caller hides


def at_least(low: int | float, high: float = math.inf):
    """An argparse type: a number of low's type (int or float) in [low, high], so that a value no run can use (a
    batch of 0, a negative learning rate, a share above 1) stops at the command line, not deep inside the run or in
    a run that seems to succeed."""
    def number(text: str):
        value = type(low)(text)
        if not low <= value <= high:
            upper = f" and at most {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"must be at least {low}{upper}, not {text}")
        return value
    number.__name__ = type(low).__name__   # argparse's message for text that is no number: "invalid int value"
    return number


def make_parser(doc: str, prog: str | None = None) -> argparse.ArgumentParser:
    """A stage's parser: the docstring's first line as description, its run lines (from "Run:") as epilog."""
    return argparse.ArgumentParser(prog=prog, description=doc.strip().split("\n")[0], epilog=doc[doc.index("Run:"):],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def data_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "data" group with the flags every stage shares; the stage adds its own to the group returned."""
    g = parser.add_argument_group("data")
    g.add_argument("--preset", default="phantom", choices=["phantom", "real"], help="phantom world or the paper's run")
    g.add_argument("--data-root", default="runs/phantom", help="data root (data.paths); a phantom one is built")
    return g


def run_flags(parser: argparse.ArgumentParser, out: str, outputs: str, save_every: int,
              shard: bool = True) -> argparse._ArgumentGroup:
    """The "run-time" group with the flags of `Run` and the loop every training stage shares; the stage adds its own
    to the group returned."""
    g = parser.add_argument_group("run-time")
    g.add_argument("--out", default=out, help=f"{outputs}, metrics.jsonl, curves.png")
    either = g.add_mutually_exclusive_group()   # refused at the command line, before any work
    either.add_argument("--resume", action="store_true", help="continue from the newest checkpoint under <out>/ckpt")
    either.add_argument("--overwrite", action="store_true", help="start afresh over an earlier run in <out>")
    g.add_argument("--save-every", type=at_least(0), default=save_every,
                   help="optimizer steps between resumable checkpoints; 0 = none in between")
    g.add_argument("--nan-policy", default="skip", choices=["skip", "stop"],
                   help="on a non-finite loss or gradient norm, on all ranks")
    if shard:
        g.add_argument("--shard", default="ddp", choices=["ddp", "fsdp"], help="under torchrun: replicate what "
                       "trains (DDP) or shard it, its gradients and AdamW state (FSDP2)")
    g.add_argument("--seed", type=at_least(0, 2**31 - 1), default=0)
    g.add_argument("--stop-at", type=at_least(1), default=None, help=HIDDEN)   # save and exit after this step
    return g


def parse_with_preset(parser: argparse.ArgumentParser, argv, phantom: dict) -> argparse.Namespace:
    """Parse with the flags' own defaults (the paper's); under --preset phantom the stage's overrides replace the
    defaults of the flags not given on the command line. --help shows both."""
    for a in parser._actions:
        if a.option_strings and a.help is not argparse.SUPPRESS and a.dest != "help":
            own = (a.help or "").removesuffix(" (default: %(default)s)")   # BooleanOptionalAction's on Python 3.10
            shown = [f"default: {a.default}"] if a.default is not None or "unset =" not in own else []  # help says
            shown += [f"phantom: {phantom[a.dest]}"] if a.dest in phantom else []
            a.help = (f"{own} ({'; '.join(shown).replace('%', '%%')})" if shown else own).strip()   # `shown` escaped
    known, _ = parser.parse_known_args(argv)
    if known.preset == "phantom":
        parser.set_defaults(**phantom)
    return parser.parse_args(argv)
