"""Precision and attention kernels: what each stage asks transformers for on CUDA and on the CPU, bf16 compute with
fp32 master weights, and the encoder precision the bridge's statistics share with GRPO (no GPU needed)."""
import pytest
import torch
import transformers

import bench
import data
import evaluate
import grpo
import model
import runtime
import sft
from phantom.llm import build_tiny_llm, phantom_texts


class Requested(Exception):
    """Stops a stage at its first LLM load: on this machine (no GPU, no flash-attn) only the request can be checked."""


@pytest.fixture(scope="module")
def parts(phantom_world, tmp_path_factory):
    """A tiny LLM, encoder weights and an (untrained) SFT checkpoint built from them."""
    tmp = tmp_path_factory.mktemp("precision")
    llm = build_tiny_llm(phantom_texts(phantom_world), tmp / "llm", vocab_size=512, hidden=64, layers=2)
    torch.manual_seed(0)
    vit = model.save_vision_weights(model.ViT3D.from_preset("tiny"), tmp / "vit.safetensors")
    ckpt = model.VLM.build(llm, vit_preset="tiny", vit_weights=vit).save(tmp / "runs" / "sft" / "vlm",
                                                                         meta={"stage": "sft"})
    return {"llm": str(llm), "vit": str(vit), "ckpt": str(ckpt)}


def stage_run(stage: str, world: dict, parts: dict, out, *extra):
    root = ["--data-root", str(world["root"]), "--out", str(out)]
    argv = {"sft": ["--llm", parts["llm"], "--vision-weights", parts["vit"], "--batch-size", "2", "--max-steps", "1"],
            "grpo": ["--sft", parts["ckpt"], "--steps", "1", "--batch-size", "2", "--max-new-tokens", "8",
                     "--eval-every", "0", "--save-every", "0", "--no-freeze-encoder"],
            "evaluate": ["--ckpt", parts["ckpt"], "--tasks", "mmvqa", "--n-mmvqa", "2"]}[stage]
    return {"sft": sft.main, "grpo": grpo.main, "evaluate": evaluate.main}[stage](root + argv + [*map(str, extra)])


@pytest.mark.parametrize("cuda", [True, False])
@pytest.mark.parametrize("stage", ["sft", "grpo", "evaluate"])
def test_each_stage_requests_flash_attention_2_on_cuda_and_sdpa_on_the_cpu(stage, cuda, phantom_world, parts,
                                                                           tmp_path, monkeypatch):
    """With flash-attn installed (a stand-in kernel), each stage's own code path asks for flash_attention_2 when its
    device is CUDA, whatever the weights' dtype (the GRPO policy keeps fp32 weights and computes under bf16 autocast),
    and for SDPA on the CPU; a frozen LLM (SFT, evaluation) is requested in bf16 on CUDA."""
    requests = []

    def spy(path, **kw):
        requests.append(kw)
        raise Requested

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(model, "flash_attn_func", lambda q, k, v: q)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a stand-in GPU")   # evaluate's kept key
    with pytest.raises(Requested):
        stage_run(stage, phantom_world, parts, tmp_path)
    assert requests[0]["attn_implementation"] == ("flash_attention_2" if cuda else "sdpa")
    assert requests[0]["dtype"] == (torch.bfloat16 if cuda and stage != "grpo" else torch.float32)


@pytest.mark.parametrize("device,dtype", [("cuda", torch.bfloat16), ("cpu", torch.float32)])
def test_the_rm_reward_model_is_held_in_bf16_on_cuda(parts, device, dtype, monkeypatch):
    requests = []

    def spy(path, **kw):
        requests.append(kw)
        raise Requested

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", spy)
    with pytest.raises(Requested):
        grpo.make_consistency_scorer(f"rm:{parts['llm']}", device=device)
    assert requests[0]["dtype"] == dtype


@pytest.fixture
def bf16_device(monkeypatch):
    """The CPU treated as a device that computes in bf16, as CUDA does: runtime.autocast(cpu) becomes bf16 autocast
    and frozen LLMs are held in bf16. Records the dtype of every LLM requested from transformers."""
    for module in (runtime, model, evaluate):
        monkeypatch.setattr(module, "compute_dtype", lambda device: torch.bfloat16)
    requested, load = [], transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **kw: requested.append(kw["dtype"]) or load(path, **kw))
    return requested


def test_grpo_computes_in_bf16_with_fp32_master_weights_and_the_statistics_precision(
        bf16_device, phantom_world, parts, tmp_path, monkeypatch):
    """On a bf16 device the policy keeps fp32 weights, so AdamW's updates at the paper's lr 1e-6 land (in bf16
    storage nearly all would round away), the reference holds its LLM's matmul weights in bf16 and scores exactly as
    the policy does before its first update (KL 0), and the rollout, reference and policy passes see exactly the
    encoder tokens sft.py's statistics are computed from (the same autocast)."""
    monkeypatch.setattr(grpo, "accuracy_reward", lambda completion, answer, options=None: float(len(completion) % 2))
    names, seen, batch, vit_forward = [], [], data.VolumeCache.batch, model.ViT3D.forward
    refs, step = [], grpo.train_step
    monkeypatch.setattr(grpo, "train_step", lambda net, ref, *a: refs.append(ref) or step(net, ref, *a))

    def recorded_batch(self, volume_names):
        names.extend(volume_names := list(volume_names))
        return batch(self, volume_names)
    monkeypatch.setattr(data.VolumeCache, "batch", recorded_batch)
    monkeypatch.setattr(model.ViT3D, "forward", lambda self, x: seen.append(vit_forward(self, x)) or seen[-1])
    out = stage_run("grpo", phantom_world, parts, tmp_path, "--lr", "1e-6")
    monkeypatch.setattr(model.ViT3D, "forward", vit_forward)
    monkeypatch.setattr(data.VolumeCache, "batch", batch)
    assert len(seen) == 3 and bf16_device == [torch.float32, torch.float32]            # policy, reference
    assert all(p.dtype == torch.float32 for p in out["vlm"].parameters())
    ref_llm = refs[0].llm
    matmul = {n: p.dtype for m, mod in ref_llm.named_modules() if isinstance(mod, torch.nn.Linear)
              for n, p in mod.named_parameters(prefix=m) if p is not ref_llm.get_input_embeddings().weight}
    assert matmul and set(matmul.values()) == {torch.bfloat16} and ref_llm.get_input_embeddings().weight.dtype == \
        torch.float32 and not any(p.requires_grad for p in refs[0].parameters())
    assert out["history"][-1]["kl"] == 0.0   # one policy iteration: the KL is taken before the update
    start, after = model.VLM.load(parts["ckpt"]).state_dict(), out["vlm"].state_dict()
    llm = [n for n in start if n.startswith("llm.") and n.endswith("proj.weight")]
    moved = torch.cat([(after[n] != start[n]).flatten() for n in llm]).float().mean()
    moved_in_bf16 = torch.cat([(after[n].bfloat16() != start[n].bfloat16()).flatten() for n in llm]).float().mean()
    assert moved > 0.9 and moved_in_bf16 < 0.1
    volumes = data.VolumeCache(phantom_world["train_cache"])
    vit = model.VLM.load(parts["ckpt"]).vit
    stats_tokens = sft.EncoderTokens(vit, volumes, torch.device("cpu"), cache=False).encode(names)
    with torch.no_grad():
        fp32_tokens = vit(volumes.batch(names))
    assert not torch.allclose(stats_tokens, fp32_tokens, atol=1e-3)                     # autocast matters here
    assert all(torch.equal(t.float(), stats_tokens) for t in seen)                      # rollout, reference, policy


def test_sft_holds_the_frozen_llm_in_bf16_and_trains_an_fp32_bridge(bf16_device, phantom_world, parts, tmp_path):
    runtime.seed_everything(0)  # as sft.py does right before it builds the model: the same initial bridge
    start = model.VLM.build(parts["llm"], vit_preset="tiny", vit_weights=parts["vit"]).bridge.state_dict()
    out = stage_run("sft", phantom_world, parts, tmp_path)
    vlm = out["net"].vlm
    assert bf16_device == [torch.float32, torch.bfloat16] and vlm.llm.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in [*vlm.vit.parameters(), *vlm.bridge.parameters()])
    assert out["skipped"] == 0 and all(not torch.equal(p.detach(), start[n]) for n, p in vlm.bridge.named_parameters())


def test_the_gpu_benchmark_times_the_stages_own_steps_in_their_precision(bf16_device, phantom_world, parts,
                                                                          monkeypatch):
    """bench.py's CUDA benchmark, run here on a bf16 CPU with a tiny LLM shape: it times sft.train_step and
    grpo.train_step themselves, SFT with its frozen LLM in bf16, GRPO with an fp32 policy beside a reference whose
    matmul weights are bf16."""
    seen, sft_step, grpo_step = [], sft.train_step, grpo.train_step
    monkeypatch.setattr(sft, "train_step", lambda net, *a: seen.append(("sft", net.vlm.llm.dtype)) or sft_step(net, *a))
    monkeypatch.setattr(grpo, "train_step", lambda net, ref, *a: seen.append(
        ("grpo", net.vlm.llm.dtype, ref.llm.model.layers[0].mlp.down_proj.weight.dtype)) or grpo_step(net, ref, *a))
    args = bench.parse_args(["--sft-steps", "1", "--grpo-prompts", "1", "--cuda-new-tokens", "4"])
    shape = dict(bench.QWEN25_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 vocab_size=128)
    res = bench.bench_cuda(args, phantom_world, parts["llm"], device="cpu", llm_shape=shape, vit_preset="tiny")
    bf16, fp32 = torch.bfloat16, torch.float32
    assert seen == [("sft", bf16)] * 2 + [("grpo", fp32, bf16)] * 2
    assert res["sft"]["samples_per_s"] > 0 and res["grpo"]["sec_per_step"] > 0 and 0 < res["grpo"]["mfu"] < 1
    assert res["grpo"]["grad_ckpt"] and res["grpo"]["tokens"] <= 4 * 4
