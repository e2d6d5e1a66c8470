"""sft.py: ARW weights, the weighted loss, what trains, DDP / accumulation / resume equivalence, the NaN policy."""
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import transformers

from conftest import curve_points
import data
import model
import runtime
from phantom.llm import build_tiny_llm, phantom_texts
import sft

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """One token per character: makes token counts per segment obvious."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_arw_weights_are_lambda_one_zero():
    segments = [("<finding>", False), ("Heart normal. ", False), ("Pleural effusion. ", True), ("</finding>", False)]
    ids, w = sft.encode(CharTokenizer(), "PROMPT", segments, arw_lambda=1.1, max_len=1000)
    expected = [0.0] * 6 + [1.0] * (9 + 14) + [1.1] * 18 + [1.0] * 10 + [1.0]  # prompt, normal, abnormal, tag, EOS
    assert w == expected and ids[-1] == 0 and len(ids) == len(w)
    input_ids, mask, weights = sft.collate([(ids, w), (ids[:10], w[:10])], pad_id=7)
    assert weights[1, 10:].eq(0).all() and mask[1, 10:].eq(0).all() and input_ids[1, 10:].eq(7).all()
    assert weights[0].tolist() == pytest.approx(expected)


def test_encode_examples_tokenises_each_distinct_text_once_and_equals_encode():
    class Counting(CharTokenizer):
        def __init__(self):
            self.seen = []

        def __call__(self, text, add_special_tokens=False):
            texts = [text] if isinstance(text, str) else text
            self.seen += texts
            ids = [[ord(c) for c in t] for t in texts]
            return {"input_ids": ids[0] if isinstance(text, str) else ids}

    same = [("<finding>", False), ("Heart normal.", False), (" Pleural effusion.", True), ("</finding>", False)]
    examples = [{"volume": f"v{i}", "user": "Write the report." if i % 2 else "Is there an effusion?",
                 "segments": same if i % 3 else [("Yes.", False)]} for i in range(30)]
    tok = Counting()
    got = sft.encode_examples(tok, lambda u: f"<u>{u}</u>", examples, arw_lambda=1.1, max_len=1000)
    assert sorted(tok.seen) == sorted(set(tok.seen)) and len(tok.seen) == 2 + 5   # two prompts, five segment texts
    for e, (ids, w) in zip(examples, got):
        want_ids, want_w = sft.encode(CharTokenizer(), f"<u>{e['user']}</u>", e["segments"], 1.1, 1000)
        assert ids.tolist() == want_ids and w.tolist() == pytest.approx(want_w)


def test_arw_weights_with_the_real_tokenizer(tiny_llm):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    segments = [("<finding>", False), ("The heart is normal. ", False), ("There is a pleural effusion.", True),
                ("</finding>", False)]
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write the report."}], tokenize=False,
                                     add_generation_prompt=True)
    ids, w = sft.encode(tok, prompt, segments, arw_lambda=1.25, max_len=4096)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert set(w[:n_prompt]) == {0.0} and w[-1] == 1.0 and ids[-1] == tok.eos_token_id
    abnormal = [i for i, x in zip(ids, w) if x == 1.25]
    assert tok.decode(abnormal) == "There is a pleural effusion."
    assert all(x == 1.0 for x in w[n_prompt:] if x != 1.25)


def test_weighted_loss_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 1, 3]])
    weights = torch.tensor([[0.0, 1.0, 1.1, 1.0], [0.0, 0.0, 1.1, 0.0]])
    by_hand = 0.0
    for b in range(2):
        for t in range(3):  # position t predicts token t + 1
            p = torch.softmax(logits[b, t], -1)[ids[b, t + 1]].item()
            by_hand += weights[b, t + 1].item() * -math.log(p)
    assert sft.weighted_ce_sum(logits, ids, weights).item() == pytest.approx(by_hand, rel=1e-6)


def test_lora_starts_at_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.q_proj = torch.nn.Linear(6, 6)
    x = torch.randn(3, 6)
    base = net.q_proj(x)
    sft.add_lora(net, rank=2, alpha=4.0)
    assert isinstance(net.q_proj, sft.LoRALinear) and torch.equal(net.q_proj(x), base)
    with torch.no_grad():
        net.q_proj.lora_b.normal_()
    adapted = net.q_proj(x)
    sft.merge_lora(net)
    assert isinstance(net.q_proj, torch.nn.Linear) and torch.allclose(net.q_proj(x), adapted, atol=1e-6)


def test_lora_a_starts_as_peft_draws_it():
    """A ~ U(±1/√in) (PEFT's kaiming_uniform with a = √5, the official run's adapters), so the adapters' first
    updates are as large as the official run's: std 1/√(3·in), not the 1/√in of a normal draw."""
    torch.manual_seed(0)
    a = sft.LoRALinear(torch.nn.Linear(1024, 8), rank=64, alpha=128.0).lora_a
    assert a.abs().max() <= 1 / 32 and a.abs().max() > 0.99 / 32
    assert abs(a.std().item() * math.sqrt(3 * 1024) - 1) < 0.02


@pytest.mark.parametrize("tied", [True, False])
def test_lora_adapts_every_linear_layer_of_the_llm_but_its_head(tied):
    """The official table-3 run put adapters on every linear layer of the language model (attention and MLP)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))
    linears = [n for n, m in llm.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    adapters = sft.add_lora(llm, rank=16, alpha=32.0, dropout=0.05)
    adapted = [n for n, m in llm.named_modules() if isinstance(m, sft.LoRALinear)]
    assert adapted == linears and len(adapters) == len(linears) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in adapted} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
    assert type(llm.lm_head) is torch.nn.Linear
    assert adapters[0].scale == 2.0 and adapters[0].dropout.p == 0.05


def test_lora_dropout_acts_on_the_adapter_input_only_while_training():
    torch.manual_seed(0)
    layer = sft.LoRALinear(torch.nn.Linear(32, 8), rank=4, alpha=8.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 32)
    full = layer.base(x) + x @ layer.lora_a.T @ layer.lora_b.T * layer.scale
    layer.eval()
    assert torch.allclose(layer(x), full, atol=1e-6)
    layer.train()
    torch.manual_seed(1)
    dropped = layer(x)
    torch.manual_seed(1)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5)   # the same draw: kept inputs scaled by 1 / (1 - p)
    assert torch.allclose(dropped, layer.base(x) + (x * mask) @ layer.lora_a.T @ layer.lora_b.T * layer.scale,
                          atol=1e-5)
    assert not torch.allclose(dropped, full, atol=1e-3)


def test_lora_merges_into_bf16_weights_with_one_rounding():
    """On CUDA the frozen LLM is bf16: the small update B A must be added in fp32 and rounded once, not rounded to
    bf16 on its own first (which loses most of an update far below W's bf16 step)."""
    torch.manual_seed(0)
    net = torch.nn.Module()
    net.q_proj = torch.nn.Linear(64, 64).to(torch.bfloat16)
    weight = net.q_proj.weight.detach().float().clone()
    sft.add_lora(net, rank=4, alpha=8.0)
    with torch.no_grad():
        net.q_proj.lora_b.normal_(std=1e-4)
    delta = (net.q_proj.lora_b @ net.q_proj.lora_a * net.q_proj.scale).detach()
    sft.merge_lora(net)
    assert torch.equal(net.q_proj.weight, (weight + delta).to(torch.bfloat16))


def test_epoch_batches_are_full_disjoint_reshuffled_each_epoch_and_length_sorted_within_windows():
    """Choice 5: every global batch is full, no example repeats within an epoch, batches are cut from length-sorted
    windows of 16 batches but come in a shuffled order, and each epoch has its own permutation (a function of
    (seed, epoch) only)."""
    lengths = [(i * 37) % 101 for i in range(203)]                     # 203 = 50 batches of 4 and 3 left over
    gb = 4
    batches = sft.epoch_batches(lengths, gb, seed=0, epoch=0)
    assert len(batches) == len(lengths) // gb and all(len(b) == gb for b in batches)
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == len(flat)
    for b in batches:                                                  # longest first inside a batch
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert sft.epoch_batches(lengths, gb, 0, 0) == batches             # deterministic
    assert sft.epoch_batches(lengths, gb, 0, 1) != batches             # a new order in the next epoch
    # the batches of one window of 16 hold the window's examples sorted by length: consecutive batches of the
    # unshuffled order would be non-increasing in length; the shuffled order is not
    maxima = [max(lengths[i] for i in b) for b in batches]
    assert any(a < b for a, b in zip(maxima[:16], maxima[1:16]))


def test_feature_statistics_are_exact_for_any_count_and_finite_on_near_constant_channels():
    """set_feature_statistics: the mean and spread over every named volume (the last, partial batch of 8 included),
    as a direct computation gives them, floored at a fifth of the median spread; channels that barely vary (air,
    padding) get the floor, never NaN from a rounding-negative variance."""
    g = torch.Generator().manual_seed(0)
    n, N, C = 41, 8, 64                                                # 41 = 5 batches of 8 and one of 1
    all_tokens = (torch.randn(1, N, C, generator=g) * 3 + torch.randn(n, N, C, generator=g)).float()
    air = all_tokens[:, :, -C // 4:]                                   # a quarter of the channels: the same in
    air[:] = air[1:2]                                                  # every volume but one, one float32
    air[0] = torch.nextafter(air[1], torch.full_like(air[1], math.inf))  # step above (rounding noise)
    names = [f"v{i}" for i in range(n)]

    class Tokens:
        def encode(self, batch_names):
            return all_tokens[[names.index(b) for b in batch_names]]

    bridge = model.Bridge(C, (2, 2, 2), 16, torch.zeros(16))
    sft.set_feature_statistics(bridge, Tokens(), names)
    t = all_tokens.double()
    mean, std = t.mean(0), t.std(0, unbiased=False)
    floor = 0.2 * std.median()
    assert torch.isfinite(bridge.feat_std).all() and (bridge.feat_std > 0).all()
    torch.testing.assert_close(bridge.feat_mean, mean.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bridge.feat_std, std.clamp(min=floor).float(), rtol=1e-4, atol=1e-7)
    assert torch.allclose(bridge.feat_std[..., -C // 4:], floor.float())  # the near-constant channels: the floor


def test_a_merged_lora_llm_saves_and_reloads_as_the_adapted_model(tmp_path):
    """What sft.main writes with --lora: merge_lora replaces every adapter by its merged linear layer, and the saved
    LLM, read back by transformers, computes what the adapted model computed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1)).eval()
    adapters = sft.add_lora(llm, rank=4, alpha=8.0)
    with torch.no_grad():
        for adapter in adapters:
            adapter.lora_b.normal_(std=0.5)
    ids = torch.randint(0, 32, (2, 7))
    with torch.no_grad():
        adapted = llm(ids).logits
    sft.merge_lora(llm)
    assert not any(isinstance(m, sft.LoRALinear) for m in llm.modules())
    llm.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(Qwen2ForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, adapted,
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# runs of sft.main on the small phantom world with the untrained tiny LLM and a random encoder
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_llm(phantom_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("llm") / "tiny_llm"
    return str(build_tiny_llm(phantom_texts(phantom_world), out, vocab_size=512, hidden=64, layers=2))


@pytest.fixture(scope="session")
def vision_weights(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("vit") / "vision_encoder.safetensors"
    model.save_vision_weights(model.ViT3D.from_preset("tiny"), path)
    return str(path)


def sft_args(world, llm, vit, out, *extra):
    return ["--data-root", str(world["root"]), "--llm", llm, "--vision-weights", vit, "--out", str(out),
            "--batch-size", "2", "--max-steps", "3", "--log-every", "1", "--lr", "1e-3", *map(str, extra)]


def trainable_state(result):
    return {n: p.detach().clone() for n, p in result["net"].named_parameters() if p.requires_grad}


def test_only_the_bridge_changes(phantom_world, tiny_llm, vision_weights, tmp_path):
    runtime.seed_everything(0)
    ref = model.VLM.build(tiny_llm, vit_preset="tiny", vit_weights=vision_weights)
    result = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path, "--max-steps", 1))
    after = dict(result["net"].vlm.named_parameters())
    changed = {n for n, p in ref.named_parameters() if not torch.equal(p, after[n])}
    assert changed and all(n.startswith("bridge.") for n in changed)
    assert all(torch.equal(p, after[n]) for n, p in ref.named_parameters() if n.startswith(("llm.", "vit.")))
    loaded = model.VLM.load(tmp_path / "vlm")  # the written checkpoint holds the trained bridge
    assert all(torch.equal(p, after[n]) for n, p in loaded.named_parameters())


def test_lora_run_trains_every_llm_linear_layer_with_dropout(phantom_world, tiny_llm, vision_weights, tmp_path):
    from transformers import AutoModelForCausalLM
    plain = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", "--max-steps", 2, "--lora",
                              "--lora-dropout", 0))
    dropped = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", "--max-steps", 2, "--lora",
                                "--lora-dropout", 0.5))
    assert plain["losses"][0] == dropped["losses"][0]  # B = 0: the adapters add nothing before the first update
    assert plain["losses"][1] != dropped["losses"][1]  # the dropout is on while training: another first update
    base = AutoModelForCausalLM.from_pretrained(tiny_llm).state_dict()
    merged = {k[4:]: v for k, v in model.VLM.load(tmp_path / "b" / "vlm").state_dict().items() if k.startswith("llm.")}
    linear = [k for k in base if k.endswith("proj.weight")]
    assert len(linear) == 2 * 7 and not any(torch.equal(merged[k], base[k]) for k in linear)
    assert all(torch.equal(merged[k], base[k]) for k in base if k not in linear)   # embeddings, norms, biases


def test_weight_decay_spares_biases_and_norm_weights(phantom_world, tiny_llm, vision_weights, tmp_path):
    """AdamW's decay groups as Hugging Face's Trainer forms them for the official run: matrices, kernels and the
    position embedding decay; biases and LayerNorm weights do not."""
    sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path, "--max-steps", 2, "--save-every", 1,
                      "--weight-decay", 0.1))
    state = torch.load(tmp_path / "ckpt" / "step_00000001" / "state.pt", weights_only=True)
    groups = {g["weight_decay"]: set(g["params"]) for g in state["optimizer"]["param_groups"]}
    bridge = model.VLM.load(tmp_path / "vlm").bridge
    named = {"vlm.bridge." + n: p for n, p in bridge.named_parameters()}
    assert groups[0.1] | groups[0.0] == set(named) and not groups[0.1] & groups[0.0]
    assert groups[0.1] == {n for n, p in named.items() if p.ndim >= 2} and "vlm.bridge.pos_embed" in groups[0.1]
    norms = {f"vlm.bridge.{n}.weight" for n, m in bridge.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert groups[0.0] == {n for n in named if n.endswith(".bias")} | norms and len(norms) == 2


def test_bridge_standardises_encoder_tokens_over_training_volumes(phantom_world, tiny_llm, vision_weights, tmp_path):
    result = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path, "--max-steps", 1,
                               "--feature-stats", 5))
    vlm = result["net"].vlm
    volumes = data.VolumeCache(phantom_world["train_cache"])
    names = sorted({e["volume"] for e in sft.sft_examples(phantom_world)} & set(volumes.names))[:5]
    with torch.no_grad():  # the first 5 training volumes by name, centre crop, frozen encoder
        t = vlm.vit(torch.stack([data.online_transform(volumes.load(v), volumes.preset) for v in names])).double()
    assert torch.allclose(vlm.bridge.feat_mean, t.mean(0).float(), atol=1e-5)
    spread, floor = t.std(0, unbiased=False).float(), 0.2 * t.std(0, unbiased=False).median().float()
    assert 0 < (spread < floor).sum() < spread.numel() // 2       # this encoder has near-constant channels
    assert torch.allclose(vlm.bridge.feat_std[spread >= floor], spread[spread >= floor], rtol=1e-4)
    assert torch.allclose(vlm.bridge.feat_std[spread < floor], floor, rtol=1e-4)     # raised to a fifth of the median
    loaded = model.VLM.load(tmp_path / "vlm")  # the statistics travel with the checkpoint
    assert torch.equal(loaded.bridge.feat_mean, vlm.bridge.feat_mean)
    assert torch.equal(loaded.bridge.feat_std, vlm.bridge.feat_std)
    x = torch.stack([data.online_transform(volumes.load(v), volumes.preset) for v in names[:2]])
    with torch.no_grad():
        assert torch.allclose(loaded.image_embeds(x), vlm.image_embeds(x), atol=1e-5)


# Adam's first steps move each weight by about lr * sign(grad), so a gradient component within float noise of zero can
# move a small fraction of lr under another summation order (measured: 2e-6 at lr 1e-3). Normalising each micro-batch
# by its own weights instead of the step's total moved the weights by 2e-3 to 4e-3.
ADAM_NOISE = 1e-5


def test_grad_accumulation_equals_one_big_batch(phantom_world, tiny_llm, vision_weights, tmp_path):
    big = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", "--batch-size", 4))
    acc = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", "--batch-size", 2,
                            "--grad-accum", 2))
    assert big["losses"] == pytest.approx(acc["losses"], rel=1e-5)
    a, b = trainable_state(big), trainable_state(acc)
    assert all(torch.allclose(a[n], b[n], atol=ADAM_NOISE) for n in a)


def test_the_next_steps_volumes_are_read_in_a_thread_while_this_step_trains(phantom_world, tiny_llm, vision_weights,
                                                                            tmp_path, monkeypatch):
    """Without --cache-features every step reads its volumes: from the second step on, each micro-batch's were read
    in the reader thread during the step before, and the run equals one that reads them when it needs them."""
    readers, batch = [], data.VolumeCache.batch
    monkeypatch.setattr(data.VolumeCache, "batch", lambda self, names: readers.append(
        threading.current_thread() is threading.main_thread()) or batch(self, names))
    flags = ("--max-steps", 3, "--grad-accum", 2, "--no-cache-features", "--feature-stats", 2)
    ahead = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", *flags))
    assert readers == [True] * 3 + [False] * 4   # on the main thread: the statistics, step 1's two; then read ahead
    monkeypatch.delattr(sft.EncoderTokens, "prefetch")
    alone = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", *flags))
    assert ahead["losses"] == alone["losses"] and len(readers) == 7 + 7
    a, b = trainable_state(ahead), trainable_state(alone)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_is_exact(phantom_world, tiny_llm, vision_weights, tmp_path):
    straight = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", "--max-steps", 4))
    first = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", "--max-steps", 4,
                              "--stop-at", 2))
    assert first["interrupted"] and first["step"] == 2
    assert curve_points(tmp_path / "b" / "curves.png") == {"loss": 2, "lr": 2, "grad_norm": 2}   # the curves so far
    second = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", "--max-steps", 4,
                               "--resume"))
    assert first["losses"] + second["losses"] == straight["losses"]
    a, b = trainable_state(straight), trainable_state(second)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_resumed_run_keeps_counting_the_steps_skipped_before_its_stop(phantom_world, tiny_llm, vision_weights,
                                                                        tmp_path):
    """A step skipped for a non-finite loss before a stop still counts after --resume: the skipped column of
    metrics.jsonl and the final checkpoint's skipped_steps equal the uninterrupted run's."""
    nan = ["--max-steps", 4, "--inject-nan", "0:0"]
    sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", *nan))
    sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", *nan, "--stop-at", 2))
    resumed = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", *nan, "--resume"))
    assert resumed["skipped"] == 1
    for out in ("a", "b"):
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        assert [(r["step"], r["skipped"]) for r in rows] == [(1, 1), (2, 1), (3, 1), (4, 1)]
        assert json.loads((tmp_path / out / "vlm" / "config.json").read_text())["meta"]["skipped_steps"] == 1


def test_phantom_sft_trains_on_reports_unless_vqa_is_asked(phantom_world, tiny_llm, vision_weights, tmp_path):
    reports = len(data.read_sentence_labels(phantom_world["train_sentences"]))
    plain = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", "--max-steps", 1))
    with_vqa = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", "--max-steps", 1, "--vqa"))
    assert plain["examples"] == reports
    vqa = sum(v["kind"] in ("open", "yes_no") for v in data.read_vqa(phantom_world["train_vqa"]))  # no multiple choice
    assert with_vqa["examples"] == reports + vqa
    assert sft.parse_args(["--preset", "real"]).vqa and not sft.parse_args(["--preset", "real"]).cache_features


def test_sft_examples_are_reports_with_a_section_and_open_or_yes_no_questions(tmp_path, capsys):
    sentences = tmp_path / "sentences.jsonl"
    sentences.write_text("".join(json.dumps(r) + "\n" for r in [
        {"VolumeName": "train_1_a_1.nii.gz", "findings": [["Cardiomegaly.", 1]], "impressions": None},
        {"VolumeName": "train_2_a_1.nii.gz", "findings": None, "impressions": None}]))       # "Not given." twice
    vqa = tmp_path / "vqa.json"
    turn = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    vqa.write_text(json.dumps([
        {"id": "long_answer_0", "image": "train_1_a_1.nii.gz", "conversations": turn("Why? <long_answer>", "Because.")},
        {"id": "short_answer_1", "image": "train_1_a_1.nii.gz", "conversations": turn("Any? <short_answer>", "Yes.")},
        {"id": "multiple_choice_2", "image": "train_1_a_1.nii.gz",
         "conversations": turn("Which? (a) X (b) Y <multiple_choice>", "(b) Y")},
        {"id": "report_generation_3", "image": "train_1_a_1.nii.gz",
         "conversations": turn("Report. <report_generation>", "Findings: ...")}]))
    paths = {"train_sentences": sentences, "train_vqa": vqa}
    got = sft.sft_examples(paths)
    assert [(e["volume"], e["user"]) for e in got] == [
        ("train_1_a_1.nii.gz", "Write the findings of this chest CT scan inside <finding></finding>."),
        ("train_1_a_1.nii.gz", "Why?"), ("train_1_a_1.nii.gz", "Any?")]
    out = capsys.readouterr().out
    assert f"{sentences}: reports with neither section: 1 left out" in out
    assert f"{vqa}: multiple-choice questions: 1 left out" in out
    assert [e["user"] for e in sft.sft_examples(paths, with_vqa=False)] == [got[0]["user"]]
    assert len(sft.sft_examples(paths, kinds=None)) == 4                                    # the phantom warm-up's


def test_targets_cut_at_max_len_are_counted_and_a_prompt_too_long_names_its_example(phantom_world, tiny_llm,
                                                                                    vision_weights, tmp_path, capsys):
    result = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", "--max-steps", 1,
                               "--max-len", 400))
    vlm, examples = result["net"].vlm, sft.sft_examples(phantom_world, with_vqa=False)
    full = [sft.encode(vlm.tokenizer, vlm.prompt(e["user"]), e["segments"], 1.1, 10 ** 6)[0] for e in examples]
    longer = sum(len(ids) > 400 for ids in full)
    assert 0 < longer < len(full) and f"{len(full)} examples ({longer} cut at --max-len 400)" in capsys.readouterr().out
    shortest = min(len(vlm.tokenizer(vlm.prompt(e["user"]), add_special_tokens=False)["input_ids"]) for e in examples)
    with pytest.raises(ValueError, match=r"example 0 \(train_.*\.nii\.gz, 'Write the .*does not fit --max-len"):
        sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", "--max-len", shortest))


def test_a_missing_llm_directory_or_a_vlm_checkpoint_as_llm_is_named(tmp_path):
    vit, out = tmp_path / "vision.safetensors", str(tmp_path / "out")   # not runs/sft: a user's run may be there
    vit.touch()
    for preset, remedy in (("phantom", "run `python -m phantom warmup` first"), ("real", "check --llm")):
        with pytest.raises(SystemExit, match=f"{tmp_path}/none is not an LLM directory .no config.json.: {remedy}"):
            sft.main(["--preset", preset, "--llm", str(tmp_path / "none"), "--vision-weights", str(vit), "--out", out])
    (tmp_path / "vlm" / "llm").mkdir(parents=True)       # a VLM checkpoint given as --llm: transformers said only
    (tmp_path / "vlm" / "config.json").write_text("{}")   # "Unrecognized model in ..."
    with pytest.raises(SystemExit, match=f"--llm {tmp_path / 'vlm'} is a VLM checkpoint, not an LLM directory "
                                         f".its LLM: {tmp_path / 'vlm' / 'llm'}.$"):
        sft.main(["--llm", str(tmp_path / "vlm"), "--vision-weights", str(vit), "--out", out])


def test_a_feature_cache_too_big_for_host_memory_stops_at_the_start():
    vit = model.ViT3D.from_preset("base")
    sft.check_feature_cache(vit, 100)   # 0.8 GB
    with pytest.raises(SystemExit, match=r"10000000 volumes' encoder tokens in host memory, 84296 GB on this node "
                                         r"\(2744 x 768 fp32 per volume and rank\), against \d+ GB available: run "
                                         r"with --no-cache-features"):
        sft.check_feature_cache(vit, 10**7)


def test_cached_features_train_the_same(phantom_world, tiny_llm, vision_weights, tmp_path):
    more = ["--batch-size", 8, "--max-steps", 2, "--vqa"]  # 16 of ~120 examples over 24 volumes: volumes repeat
    plain = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", *more, "--no-cache-features"))
    cached = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", *more, "--cache-features"))
    assert plain["losses"] == pytest.approx(cached["losses"], rel=1e-5)


def test_feature_statistics_of_identical_volumes_stop_with_a_clear_error():
    class Same:
        def encode(self, names):
            return torch.ones(len(names), 8, 4)
    bridge = model.Bridge(4, (2, 2, 2), 16, torch.zeros(16))
    with pytest.raises(ValueError, match="--feature-stats"):
        sft.set_feature_statistics(bridge, Same(), ["a", "b", "c"])


def test_cached_features_are_kept_in_host_memory(phantom_world, vision_weights):
    """--cache-features: a volume is encoded once, its tokens kept on the CPU (not pinned), never on the GPU, and
    handed back on the encoder's device with the values a fresh encoding gives."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vit = model.load_vision_weights(model.ViT3D.from_preset("tiny"), vision_weights).to(device).eval()
    volumes = data.VolumeCache(phantom_world["train_cache"])
    names, batches = sorted(volumes.names)[:3], []
    vit.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    cached = sft.EncoderTokens(vit, volumes, device, cache=True)
    cached([names[0], names[1], names[0]])
    tokens = cached(names)
    assert batches == [2, 1] and tokens.device.type == device.type                   # only the new volume encoded
    assert sorted(cached.kept) == names
    assert all(t.device.type == "cpu" and not t.is_pinned() for t in cached.kept.values())
    assert torch.equal(tokens, sft.EncoderTokens(vit, volumes, device, cache=False)(names))


def test_cached_features_of_a_device_encoder_are_not_pinned(monkeypatch):
    """CUDA pins host memory in power-of-two blocks (c10's CachingHostAllocator rounds each request up), so pinned
    tokens of a base-ViT volume (8.4 MB) or batch take twice what check_feature_cache counts: the cache keeps them
    pageable. A device encoder is emulated on the CPU: .cpu() returns a copy, as it does from CUDA."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **kw: self.clone())
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **kw: pinned.append(self) or self)

    class Volumes:
        def batch(self, names):
            return torch.arange(len(names) * 6.0).view(len(names), 2, 3)
    cached = sft.EncoderTokens(torch.nn.Identity(), Volumes(), torch.device("cpu"), cache=True)
    assert torch.equal(cached(["a", "b"]), Volumes().batch(["a", "b"])) and sorted(cached.kept) == ["a", "b"]
    assert pinned == []


def read_ahead_reads(cache: bool, first: list[str], step: list[list[str]]) -> list[tuple[bool, list[str]]]:
    """(on the main thread?, names) of each volume read by EncoderTokens: a call on `first`, then the micro-batches of
    `step` read ahead and called in order."""
    reads = []

    class Volumes:
        def batch(self, names):
            reads.append((threading.current_thread() is threading.main_thread(), names))
            return torch.zeros(len(names), 2, 3)
    tokens = sft.EncoderTokens(torch.nn.Identity(), Volumes(), torch.device("cpu"), cache=cache)
    tokens(first)
    tokens.prefetch(step)
    for names in step:
        tokens(names)
    return reads


def test_read_ahead_with_cached_features_reads_what_each_call_will_encode():
    """--cache-features: a volume in two micro-batches of a step is encoded by the first, so the second call encodes
    only the rest; the read-ahead asks for exactly that, and every call is served from the reader thread."""
    assert read_ahead_reads(True, ["a"], [["a", "b"], ["b", "c"], ["c", "d"]]) == [
        (True, ["a"]), (False, ["b"]), (False, ["c"]), (False, ["d"])]


def test_read_ahead_without_the_cache_reads_a_set_of_volumes_once_for_the_calls_on_it():
    """Without --cache-features, two micro-batches of a step on the same volumes (batch size 1, two questions about one
    scan) share one read from the reader thread, rather than one read each and a third on the main thread."""
    assert read_ahead_reads(False, ["x"], [["a"], ["b"], ["a"]]) == [(True, ["x"]), (False, ["a"]), (False, ["b"])]


def test_nan_step_is_skipped_or_stops(phantom_world, tiny_llm, vision_weights, tmp_path):
    two = ["--max-steps", 2]
    skipped = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "a", *two, "--inject-nan", "1:0"))
    one_step = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "b", *two, "--stop-at", 1))
    assert math.isnan(skipped["losses"][1])
    a, b = trainable_state(skipped), trainable_state(one_step)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the poisoned step changed nothing
    with pytest.raises(SystemExit, match="non-finite"):
        sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "c", *two, "--inject-nan", "1:0",
                          "--nan-policy", "stop"))


# ---------------------------------------------------------------------------------------------------------------------
# two processes under torchrun (gloo)
# ---------------------------------------------------------------------------------------------------------------------

def torchrun(nproc, args, timeout=300, log_dir=None):
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []   # each rank's output in its own files
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *logs,
           str(ROOT / "sft.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(out):
    return [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]


@pytest.mark.slow
def test_two_processes_equal_one(phantom_world, tiny_llm, vision_weights, tmp_path):
    one = sft.main(sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "one", "--grad-accum", 2))
    run = torchrun(2, sft_args(phantom_world, tiny_llm, vision_weights, tmp_path / "two"), log_dir=tmp_path / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(one["losses"], rel=1e-5)
    out = {rank: "".join(p.read_text() for p in (tmp_path / "logs").rglob(f"attempt_0/{rank}/std*.log"))
           for rank in "01"}
    assert "sft: " in out["0"]                                             # rank 0: our bars
    # transformers 5 shows a bar while loading weights (4.x shows none for a one-file checkpoint): on rank 0 only
    assert ("Loading weights" in out["0"]) == (int(transformers.__version__.split(".")[0]) >= 5)
    assert "%|" not in out["1"] and "Loading weights" not in out["1"]      # rank 1: no progress output at all
    two = model.VLM.load(tmp_path / "two" / "vlm")
    mine = dict(one["net"].vlm.named_parameters())
    assert all(torch.allclose(p, mine[n], atol=ADAM_NOISE) for n, p in two.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_on_one_rank_is_handled_by_all(phantom_world, tiny_llm, vision_weights, tmp_path, policy):
    run = torchrun(2, sft_args(phantom_world, tiny_llm, vision_weights, tmp_path, "--inject-nan", "1:1",
                               "--nan-policy", policy))
    log = run.stdout + run.stderr
    for rank in (0, 1):
        action = "skipping" if policy == "skip" else "stopping"        # --inject-nan counts from 0, the logs from 1
        assert f"[rank {rank}] non-finite loss or gradient at step 2: {action}" in log
    assert (run.returncode == 0) == (policy == "skip"), log[-3000:]
    if policy == "skip":
        assert "step 3:" not in log  # only the poisoned step was dropped


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_and_sigterm_save_say_how_to_resume_and_exit_non_zero(phantom_world, tiny_llm, vision_weights, tmp_path,
                                                                      sig, code):
    import signal
    import time
    args = sft_args(phantom_world, tiny_llm, vision_weights, tmp_path, "--max-steps", 400)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "sft.py"), *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").is_file() or not (tmp_path / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out[-2000:]
    assert f"stopped by {sig} after step" in out and "--resume" in out and "Traceback" not in out
    step = int(out.split(f"stopped by {sig} after step ")[1].split(":")[0])
    assert (tmp_path / "ckpt" / f"step_{step:08d}" / "state.pt").is_file() and not (tmp_path / "vlm").exists()
    rows = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, step + 1))


def test_an_unfinished_encoder_is_said_and_recorded_and_a_torn_clip3d_config_stops_before_training(
        phantom_world, tiny_llm, tmp_path, capsys):
    """clip3d writes its encoder with each checkpoint, so a killed clip3d leaves one that looks finished: its header
    says the step, sft says so and keeps it in the checkpoint's meta. A clip3d config.json cut short is named before
    any training step, not after the last one, and so is an encoder file cut short."""
    from safetensors import safe_open
    clip = tmp_path / "clip3d"
    torch.manual_seed(1)
    vit = model.save_vision_weights(model.ViT3D.from_preset("tiny"), clip / "vision_encoder.safetensors",
                                    {"step": 71, "total_steps": 300})
    with safe_open(vit, "pt") as f:
        assert f.metadata() == {"step": "71", "total_steps": "300"}
    (clip / "config.json").write_text('{"epochs": 12')
    with pytest.raises(ValueError, match=rf"{clip / 'config.json'}: not valid JSON"):
        sft.main(sft_args(phantom_world, tiny_llm, str(vit), tmp_path / "a"))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    runtime.cleanup_distributed()
    (clip / "config.json").write_text('{"epochs": 12}')
    whole = vit.read_bytes()                                   # an encoder cut short is named too
    (clip / "torn.safetensors").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(SystemExit, match=f"--vision-weights {clip / 'torn.safetensors'} does not read"):
        sft.main(sft_args(phantom_world, tiny_llm, str(clip / "torn.safetensors"), tmp_path / "a"))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    sft.main(sft_args(phantom_world, tiny_llm, str(vit), tmp_path / "b"))
    assert (f"note: {vit} is clip3d's encoder after step 71 of 300, an unfinished run (`python clip3d.py --resume`)"
            in capsys.readouterr().out)
    meta = model.VLM.load(tmp_path / "b" / "vlm").config["meta"]
    assert meta["clip3d"] == {"epochs": 12} and meta["vision_weights"] == {"step": "71", "total_steps": "300"}
