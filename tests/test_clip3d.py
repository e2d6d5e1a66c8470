"""clip3d.py: the InfoNCE loss, gradients through gathered negatives, world-size invariance, exact resume."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import curve_points, group, torchrun
import clip3d
import model as M

ROOT = Path(__file__).resolve().parents[1]


def test_loss_equals_reference_on_fixed_embeddings():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scale = torch.tensor(1 / 0.07)
    loss = clip3d.clip_loss(image, text, scale).item()
    # reference: centre each modality on the batch mean, L2-normalise, then -log of the softmax probability of the
    # matching pair in both directions, averaged
    def unit(x):
        x = x.double().numpy() - x.double().numpy().mean(0)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    s = scale.item() * unit(image) @ unit(text).T
    i2t = -np.mean([s[i, i] - math.log(np.exp(s[i]).sum()) for i in range(5)])
    t2i = -np.mean([s[i, i] - math.log(np.exp(s[:, i]).sum()) for i in range(5)])
    assert loss == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    aligned = torch.eye(5, 8)                             # matching pairs identical, others far apart: loss ~ 0
    assert clip3d.clip_loss(aligned, aligned, torch.tensor(100.0)).item() < 1e-6
    assert clip3d.clip_loss(text, image, scale).item() == pytest.approx(loss, rel=1e-6)   # symmetric


def test_auc_and_recall_helpers():
    assert clip3d.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert clip3d.auc(np.array([1.0, 1.0]), np.array([0, 1])) == pytest.approx(0.5)   # ties count half
    assert math.isnan(clip3d.auc(np.array([0.1, 0.2]), np.array([1, 1])))
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.1, 0.5]])
    assert clip3d.recall_at(sim, np.eye(3, dtype=bool), (1, 2)) == pytest.approx({1: 2 / 3, 2: 1.0})
    # a collapsed model (every similarity tied) scores about chance, whatever the order of the columns; 50 of the
    # 100 reports are one text, so column order would hand half the rows a hit
    same = np.eye(100, dtype=bool)
    same[:50, :50] = True
    chance = (50 * 50 / 100 + 50 * 1 / 100) / 100
    assert abs(clip3d.recall_at(np.zeros((100, 100)), same, (1,))[1] - chance) < 0.1
    assert math.isnan(clip3d.recall_at(np.full((3, 3), np.nan), np.eye(3, dtype=bool), (1,))[1])   # a diverged model
    tied = np.random.default_rng(1).integers(0, 3, (50, 50)).astype(float)   # every k as when asked alone
    np.fill_diagonal(tied, 2)                                                 # the match ties with about 16 others
    alone = {k: clip3d.recall_at(tied, same[50:, 50:], (k,))[k] for k in (1, 5, 10)}
    assert clip3d.recall_at(tied, same[50:, 50:], (1, 5, 10)) == alone and 0 < alone[1] < alone[10] < 1


def test_micro_batches_split_each_global_batch_over_ranks_and_micro_steps():
    """Step s takes global batch s of the epoch's seeded permutation; micro-step m on rank r takes its slice
    m * world + r, so 2 ranks x 2 micro-batches see the samples 1 rank x 4 micro-batches sees, in order; each epoch
    is a new permutation without repeats, and a resumed run continues the same sequence."""
    from types import SimpleNamespace
    n, steps = 20, 6                                                # 2 steps of 8 per epoch, 4 samples left over
    one_args = SimpleNamespace(seed=0, batch_size=8, accum=4, micro_batch=2)
    two_args = SimpleNamespace(seed=0, batch_size=8, accum=2, micro_batch=2)
    one = list(clip3d.micro_batches(n, 0, steps, one_args, 0, 1))
    two = [list(clip3d.micro_batches(n, 0, steps, two_args, r, 2)) for r in range(2)]
    assert len(one) == steps * 4 and all(len(mb) == 2 for mb in one) and [len(t) for t in two] == [steps * 2] * 2
    for s in range(steps):
        for m in range(2):
            for r in range(2):
                assert two[r][s * 2 + m] == one[s * 4 + m * 2 + r]
    epochs = [[k for mb in one[e * 8:(e + 1) * 8] for k in mb] for e in range(3)]
    for e, keys in enumerate(epochs):
        assert {k[0] for k in keys} == {e} and len({k[1] for k in keys}) == 16
    assert [k[1] for k in epochs[0]] != [k[1] for k in epochs[1]]   # reshuffled every epoch
    assert list(clip3d.micro_batches(n, 3, steps, one_args, 0, 1)) == one[3 * 4:]


def test_training_steps_use_dropout_and_validation_does_not(phantom_world, tmp_path, monkeypatch):
    """Every training step runs the whole model in train mode, the text encoder included (from_pretrained returns it
    in eval mode, and a real encoder such as CXR-BERT has dropout), from the first step on, so that a resumed run
    trains as the run it continues; validate() switches to eval for every pass and back to train after."""
    modes, encode, steps, step = [], clip3d.encode_texts, [], clip3d.train_step
    monkeypatch.setattr(clip3d, "encode_texts", lambda net, *a, **k: modes.append(net.training) or encode(net, *a, **k))
    monkeypatch.setattr(clip3d, "train_step", lambda ddp, net, *a, **k: steps.append(
        {m.training for m in net.modules()}) or step(ddp, net, *a, **k))
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path, "--max-steps", 2, "--eval-every", 1)])
    assert steps == [{True}, {True}]
    assert modes == [False, False] * 2                             # reports, then the zero-shot prompts


GRAD_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
import clip3d
dist.init_process_group("gloo"); rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
encoder = torch.nn.Linear(6, 4)                        # the same weights on both ranks
x, y = torch.randn(8, 6), torch.randn(8, 4)            # global batch 8: rank r holds rows [4r, 4r + 4)
local = slice(4 * rank, 4 * rank + 4)
def grad(gather_fn):
    encoder.zero_grad()
    clip3d.gather = gather_fn
    image, text = F.normalize(encoder(x[local]), dim=-1), F.normalize(y[local], dim=-1)
    clip3d.clip_loss(image, text, torch.tensor(10.0)).backward()
    g = encoder.weight.grad.clone(); dist.all_reduce(g); return g / world   # DDP's gradient averaging
def detached(t):
    parts = [torch.empty_like(t) for _ in range(world)]; dist.all_gather(parts, t.detach())
    parts[rank] = t; return torch.cat(parts)           # a plain all_gather: other ranks' rows carry no gradient
with_grad, without = grad(clip3d.GatherWithGrad.apply), grad(detached)
if rank == 0:
    torch.save({"with_grad": with_grad, "without": without}, sys.argv[1])
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_gradients_flow_through_gathered_negatives(tmp_path):
    script = tmp_path / "grad.py"
    script.write_text(GRAD_SCRIPT)
    torchrun(2, script, tmp_path / "grads.pt")
    got = torch.load(tmp_path / "grads.pt")
    torch.manual_seed(0)                                  # one process holding the whole batch of 8
    encoder = torch.nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    clip3d.clip_loss(F.normalize(encoder(x), dim=-1), F.normalize(y, dim=-1), torch.tensor(10.0)).backward()
    torch.testing.assert_close(got["with_grad"], encoder.weight.grad, rtol=1e-5, atol=1e-6)
    # without the gradient path the result is measurably different: the test can tell the two apart
    assert (got["without"] - encoder.weight.grad).abs().max() > 1e-3


def run_args(world: dict, out: Path, *extra) -> list[str]:
    return ["--data-root", world["root"], "--out", out, "--batch-size", "4", "--eval-every", "1000",
            "--save-every", "2", "--lr", "1e-3", *map(str, extra)]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_same_global_batch(phantom_world, tmp_path):
    torchrun(1, ROOT / "clip3d.py", *run_args(phantom_world, tmp_path / "one", "--max-steps", 3))
    torchrun(2, ROOT / "clip3d.py", *run_args(phantom_world, tmp_path / "two", "--max-steps", 3))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two[0] == pytest.approx(one[0], rel=1e-5)      # same weights, same samples: same loss
    np.testing.assert_allclose(two, one, rtol=2e-3)       # later steps: float rounding (all-reduce order) only
    assert one[0] != one[2]                              # the steps did train
    # Weights: the final LayerNorm's bias has a zero gradient in exact arithmetic (the test below), so Adam turns float
    # noise into steps of up to lr (|m/sqrt(v)| <= 1.005 in the first 3 steps) with a random sign in each run: two runs
    # may differ by up to 2 x steps x lr. A weight elsewhere whose gradient is near zero may flip sign too: every
    # element stays within that bound, and all but a few in 10,000 of each other tensor within 1e-3.
    a, b = (load_file(tmp_path / run / "vision_encoder.safetensors") for run in ("one", "two"))
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= 2 * 3 * 1e-3 * 1.005, k
        assert k == "norm.bias" or (diff > 1e-3).float().mean() < 1e-4, k


@pytest.mark.slow
def test_two_ranks_of_micro_batches_equal_one_rank_with_the_whole_batch(phantom_world, tmp_path):
    """Gradient caching under DDP: 2 ranks x 2 micro-batches of 1 (DDP syncing on the last) train like one process
    with batch 4, whose InfoNCE sees all 4 pairs."""
    torchrun(1, ROOT / "clip3d.py", *run_args(phantom_world, tmp_path / "one", "--max-steps", 2))
    torchrun(2, ROOT / "clip3d.py", *run_args(phantom_world, tmp_path / "two", "--max-steps", 2, "--micro-batch", 1))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert two[0] == pytest.approx(one[0], rel=1e-5) and two[1] == pytest.approx(one[1], rel=2e-3)
    a, b = (load_file(tmp_path / run / "vision_encoder.safetensors") for run in ("one", "two"))
    for k in a:   # tolerances as in the test above (Adam on float noise: up to 2 x steps x lr)
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= 2 * 2 * 1e-3 * 1.005, k
        assert k == "norm.bias" or (diff > 1e-3).float().mean() < 1e-4, k


def test_the_final_layernorm_bias_gets_no_gradient_through_centred_embeddings(phantom_world):
    """clip_loss centres each modality on its batch mean, and the final norm's bias shifts every volume's mean token by
    the same vector: its gradient is float noise. This is why two runs may differ there by Adam's lr per step."""
    from transformers import AutoModel, AutoTokenizer
    torch.manual_seed(0)
    text = AutoModel.from_pretrained(phantom_world["text_encoder"])
    net = clip3d.CLIP3D(M.ViT3D.from_preset("tiny"), text, 32)
    tok = AutoTokenizer.from_pretrained(phantom_world["text_encoder"])(["a b c", "d e", "f", "g h i j"], padding=True,
                                                                        return_tensors="pt")
    clip3d.clip_loss(*net(torch.randn(4, 1, 64, 32 * 2, 32), tok["input_ids"], tok["attention_mask"])).backward()
    grads = dict((k, p.grad.abs().max().item()) for k, p in net.vit.named_parameters())
    assert grads["norm.bias"] < 1e-3 * grads["norm.weight"] and grads["norm.weight"] > 1e-3


class GradRecorder(torch.optim.Optimizer):
    """An optimizer whose step keeps a copy of every gradient and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads = None

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def clip_net(text_encoder: str, dropout: float) -> tuple[clip3d.CLIP3D, object]:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(text_encoder, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    text = AutoModel.from_pretrained(text_encoder, config=config)
    text.pooler = None                                      # as clip3d.main: masked mean instead
    net = clip3d.CLIP3D(M.ViT3D.from_preset("tiny"), text, 32)
    return net.train(), AutoTokenizer.from_pretrained(text_encoder)


def step_grads(net, tokenizer, batches: list[tuple]) -> tuple[float, list[torch.Tensor]]:
    """(loss, gradients) of one clip3d.train_step on these micro-batches; the weights are left as they were."""
    from types import SimpleNamespace
    opt = GradRecorder(net.parameters())
    args = SimpleNamespace(seed=0, max_text_len=64, grad_clip=0.0, nan_policy="stop")
    out = clip3d.train_step(net, net, opt, batches, tokenizer, args, 0, torch.device("cpu"))
    return out["loss"], opt.grads


def relative_difference(a: list, b: list) -> float:
    """|a - b| / |b| over all gradients as one vector: tensors whose exact gradient is 0 (the final norms' biases under
    centring, attention key biases) hold float noise only, so tensor by tensor they may differ wholly."""
    flat = [torch.cat([x.flatten() for x in g]) for g in (a, b)]
    return ((flat[0] - flat[1]).norm() / flat[1].norm()).item()


TEXTS = ["mild emphysema in both upper lobes.", "no nodule.", "a small pleural effusion on the left side.",
         "atelectasis in the right lower lobe and a calcified nodule."]


def test_micro_batches_give_the_loss_and_gradient_of_the_whole_batch(phantom_world):
    """--micro-batch saves memory only (gradient caching): 2 x 2 gives one batch of 4's InfoNCE and gradient, where
    separate micro-batch losses (each its own negatives) would not."""
    net, tok = clip_net(phantom_world["text_encoder"], dropout=0.0)
    volumes = torch.randn(4, 1, 64, 64, 32, generator=torch.Generator().manual_seed(1))
    whole_loss, whole = step_grads(net, tok, [(volumes, TEXTS)])
    split_loss, split = step_grads(net, tok, [(volumes[:2], TEXTS[:2]), (volumes[2:], TEXTS[2:])])
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)   # padding lengths differ: float rounding only
    assert relative_difference(split, whole) < 1e-4               # measured: 3e-6
    own = []   # each micro-batch with its own InfoNCE (its own negatives): measurably another loss and gradient
    for i in (0, 2):
        t = tok(TEXTS[i:i + 2], padding=True, return_tensors="pt")
        loss = clip3d.clip_loss(*net(volumes[i:i + 2], t["input_ids"], t["attention_mask"])) / 2
        loss.backward()
        own.append(loss.item())
    assert abs(sum(own) - whole_loss) > 1e-2 and relative_difference([p.grad for p in net.parameters()], whole) > 0.1


def test_the_learned_temperature_stays_between_0_01_and_1(phantom_world):
    """logit_scale is the log of the logits' scale: after each step it is clamped to [0, log 100], so the temperature
    stays within [0.01, 1] (a clamp at 100 would let the scale reach e^100 and the logits overflow)."""
    from types import SimpleNamespace
    net, tok = clip_net(phantom_world["text_encoder"], dropout=0.0)
    volumes = torch.randn(2, 1, 64, 64, 32, generator=torch.Generator().manual_seed(1))
    args = SimpleNamespace(seed=0, max_text_len=64, grad_clip=0.0, nan_policy="stop")
    for start, end in ((6.0, math.log(100)), (-1.0, 0.0)):
        with torch.no_grad():
            net.logit_scale.fill_(start)
        out = clip3d.train_step(net, net, GradRecorder(net.parameters()), [(volumes, TEXTS[:2])], tok, args, 0,
                                torch.device("cpu"))
        assert net.logit_scale.item() == pytest.approx(end) and out["temperature"] == pytest.approx(1 / math.exp(end))


def test_gradient_caching_replays_the_dropout_of_the_first_pass(phantom_world, monkeypatch):
    """With dropout on, the second (gradient) pass of each micro-batch draws the same masks as the first: the
    gradient is that of the loss train_step reports, computed here in one graph from the same RNG state."""
    net, tok = clip_net(phantom_world["text_encoder"], dropout=0.3)
    volumes = torch.randn(4, 1, 64, 64, 32, generator=torch.Generator().manual_seed(1))
    batches = [(volumes[:2], TEXTS[:2]), (volumes[2:], TEXTS[2:])]
    states, rng_state = [], clip3d.runtime.rng_state
    monkeypatch.setattr(clip3d.runtime, "rng_state", lambda: states.append(rng_state()) or states[-1])
    loss, grads = step_grads(net, tok, batches)
    clip3d.runtime.set_rng_state(states[0])                  # the RNG as the step's first forward pass found it
    embeds = []
    for v, texts in batches:
        t = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        embeds.append(net(v, t["input_ids"], t["attention_mask"]))
    image, text = (torch.cat([e[i] for e in embeds]) for i in (0, 1))
    reference = clip3d.clip_loss(image, text, net.logit_scale.exp())
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    assert relative_difference(grads, [p.grad for p in net.parameters()]) < 1e-4


def test_resume_continues_exactly(phantom_world, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    m_full = clip3d.main([str(a) for a in run_args(phantom_world, full, "--max-steps", 4)])
    # the interrupted run: the same run stopped after step 2 (its newest complete checkpoint), then --resume
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "ckpt" / "step_00000004")
    (resumed / "metrics.jsonl").write_text("".join(open(full / "metrics.jsonl").readlines()[:2]))
    (resumed / "vision_encoder.safetensors").unlink()
    m_resumed = clip3d.main([str(a) for a in run_args(phantom_world, resumed, "--max-steps", 4, "--resume")])
    assert losses(resumed) == losses(full)               # bit-identical steps 3 and 4
    points = curve_points(resumed / "curves.png")
    assert points["loss"] == points["lr"] == 4 and points["zs_auc_mean"] >= 1 and points["v2r_R@1"] >= 1
    assert json.dumps(m_resumed["zs_auc"]) == json.dumps(m_full["zs_auc"])   # NaN-safe
    a, b = load_file(full / "vision_encoder.safetensors"), load_file(resumed / "vision_encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    vit = M.ViT3D.from_preset("tiny")                     # the output loads in the BrgSA layout, strictly
    M.load_vision_weights(vit, resumed / "vision_encoder.safetensors")
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"} <= a.keys()


def test_stop_request_saves_then_resume_replays_the_uninterrupted_run(phantom_world, tmp_path):
    """--stop-at stands in for SIGTERM (the same Run.end_step path): the run saves its step and the encoder, stops;
    --resume then gives the uninterrupted run's losses and weights."""
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    clip3d.main([str(a) for a in run_args(phantom_world, full, "--max-steps", 3)])
    clip3d.main([str(a) for a in run_args(phantom_world, stopped, "--max-steps", 3, "--stop-at", 1)])
    assert [p.name for p in (stopped / "ckpt").iterdir()] == ["step_00000001"]   # saved although --save-every 2
    assert len(losses(stopped)) == 1 and (stopped / "vision_encoder.safetensors").is_file()
    step = lambda: safe_open(stopped / "vision_encoder.safetensors", "pt").metadata()   # the encoder says how far
    assert step() == {"step": "1", "total_steps": "3"}                                   # its run got
    clip3d.main([str(a) for a in run_args(phantom_world, stopped, "--max-steps", 3, "--resume")])
    assert losses(stopped) == losses(full) and step() == {"step": "3", "total_steps": "3"}
    a, b = load_file(full / "vision_encoder.safetensors"), load_file(stopped / "vision_encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_augmented_crops_do_not_depend_on_the_data_workers_or_a_resume(phantom_world, tmp_path):
    """Choice 4: random crops are keyed by (seed, epoch, index), not drawn from a worker's RNG, so --workers 2 with a
    resume after step 1 (then --workers 1) trains exactly as --workers 0 uninterrupted; and the crops do move."""
    flags = ("--max-steps", 3, "--augment", "--save-every", 1)
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "a", *flags, "--workers", 0)])
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "b", *flags, "--workers", 2, "--stop-at", 1)])
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "b", *flags, "--workers", 1, "--resume")])
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "c", "--max-steps", 3, "--no-augment")])
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")
    a, b = (load_file(tmp_path / x / "vision_encoder.safetensors") for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_reads_its_volumes_in_the_data_workers(phantom_world, tmp_path, monkeypatch):
    """Validation reads its volumes through the --workers DataLoader workers, as training does (at CT-RATE's size a
    serial read would take longer than the encoder's passes), and its metrics do not depend on how many there are."""
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "a", "--max-steps", 1, "--workers", 0)])

    class InWorkers(clip3d.PairDataset):
        def __getitem__(self, key):
            assert torch.utils.data.get_worker_info() is not None, "a volume read on the main process"
            return super().__getitem__(key)
    monkeypatch.setattr(clip3d, "PairDataset", InWorkers)
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "b", "--max-steps", 1, "--workers", 2)])
    a, b = ({k: v for k, v in json.loads(open(tmp_path / x / "metrics.jsonl").readline()).items() if k != "time_s"}
            for x in "ab")
    assert "zs_auc_mean" in a and a == b


def test_a_resume_may_change_the_micro_batch(phantom_world, tmp_path):
    """--micro-batch is a memory option (gradient caching keeps the loss of the whole batch): a resume may change it,
    although the number of micro-steps it sets is saved with the run's settings."""
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path, "--max-steps", 2, "--stop-at", 1)])
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path, "--max-steps", 2, "--resume", "--micro-batch", 2)])
    assert len(losses(tmp_path)) == 2 and all(math.isfinite(x) for x in losses(tmp_path))
    with pytest.raises(SystemExit, match="micro-batch x world"):
        clip3d.main([str(a) for a in run_args(phantom_world, tmp_path / "odd", "--micro-batch", 3)])


def clip3d_process(args: list) -> subprocess.Popen:
    """clip3d.py in a session of its own (its pid is the process group's), one thread, output in proc.stdout."""
    return subprocess.Popen([sys.executable, str(ROOT / "clip3d.py"), *map(str, args)], cwd=ROOT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits(phantom_world, tmp_path):
    """SIGTERM sent to the whole process group (Slurm's cancel or time limit), DataLoader workers included: the workers
    ignore it, the loop finishes its step, saves a resumable checkpoint and exits 143, leaving no worker behind."""
    import signal
    import time
    proc = clip3d_process(run_args(phantom_world, tmp_path, "--epochs", 400, "--workers", 2, "--eval-every", 0,
                                   "--save-every", 0))
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").is_file() or not (tmp_path / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.2)
    assert len(group(proc.pid)) == 3, group(proc.pid)                      # the main process and its two workers
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in out, out[-2000:]
    step = int(out.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert (tmp_path / "ckpt" / f"step_{step:08d}" / "state.pt").is_file()
    assert group(proc.pid, wait=30) == []                                  # no orphan


def test_an_error_with_loader_workers_alive_ends_the_process(phantom_world, tmp_path):
    """A volume that does not load fails in a DataLoader worker and ends the run with that error and a non-zero
    status. The error's traceback keeps the workers' iterator alive, and the workers ignore SIGTERM (above), so at exit
    multiprocessing would wait for them forever: runtime.data_loader's workers are killed there instead."""
    root = Path(shutil.copytree(phantom_world["root"], tmp_path / "world"))
    cache = root / Path(phantom_world["train_cache"]).relative_to(phantom_world["root"])
    for f in cache.glob("*.npy"):
        np.save(f, np.zeros((2, 2, 2), np.int16))
    proc = clip3d_process(run_args({"root": root}, tmp_path / "out", "--max-steps", 2, "--workers", 2))
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        raise AssertionError("clip3d.py hung after its error") from None
    assert proc.returncode == 1 and "not the int16" in out and "preprocess it again" in out, out[-2000:]
    assert group(proc.pid, wait=30) == []                                  # no orphan


def test_a_skipped_step_is_counted_in_the_checkpoint(phantom_world, tmp_path, monkeypatch):
    """A step skipped for a non-finite loss is logged and counted in the resumable checkpoint (runtime.Run.skipped)."""
    step_once = clip3d.runtime.optimizer_step
    monkeypatch.setattr(clip3d.runtime, "optimizer_step", lambda opt, params, clip, policy, step, loss:
                        step_once(opt, params, clip, policy, step, loss * float("nan") if step == 0 else loss))
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path, "--max-steps", 2, "--eval-every", 0)])
    assert [json.loads(line)["skipped"] for line in open(tmp_path / "metrics.jsonl")] == [True, False]
    assert clip3d.runtime.latest_train_state(tmp_path / "ckpt")["skipped"] == 1


def test_zero_eval_and_save_intervals_mean_at_the_end_only(phantom_world, tmp_path):
    clip3d.main([str(a) for a in run_args(phantom_world, tmp_path, "--max-steps", 2, "--eval-every", 0,
                                          "--save-every", 0)])
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert ["zs_auc_mean" in r for r in rows] == [False, True]                   # validated at the last step only
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_00000002"]


def test_a_batch_of_one_pair_is_refused_before_any_work(phantom_world, tmp_path):
    """A pair's negatives are the other reports of its batch: with one pair the loss is 0 at every step, and the run
    wrote an untrained encoder with exit status 0."""
    with pytest.raises(SystemExit, match="--batch-size 1: the contrastive loss needs at least 2 pairs per batch"):
        clip3d.main([str(a) for a in run_args(phantom_world, tmp_path, "--batch-size", 1)])
    assert not any(tmp_path.iterdir())
