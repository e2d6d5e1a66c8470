"""bench.py --which memory: the per-GPU plan of the real presets, its options, its inputs and its measuring tools.
(The plan against a measured real-width pass: tests/test_realwidth.py.)"""
import json

import pytest
import torch

import bench
import grpo
import model
from phantom.llm import build_tiny_llm

COLUMNS = ["sft ddp", "sft fsdp", "grpo ddp", "grpo fsdp"]


def plan(tmp_path, *flags) -> dict:
    return bench.main(["--which", "memory", "--out", str(tmp_path / "bench.json"), *map(str, flags)])["memory"]["plan"]


def test_default_presets_fit_on_eight_80gb_gpus(tmp_path, capsys):
    """What README promises: the real presets as they are, bf16 on 8 GPUs, under 90 % of an 80 GB card."""
    got = plan(tmp_path)
    assert all(got[c]["peak"] <= 72e9 for c in COLUMNS), {c: got[c]["peak"] / 1e9 for c in COLUMNS}
    assert json.loads((tmp_path / "bench.json").read_text())["memory"]["plan"]["grpo ddp"]["peak"] == got["grpo ddp"][
        "peak"]
    table = capsys.readouterr().out
    assert "| **peak** (budget 72) |" in table and table.count("fits") == 4
    g = grpo.parse_args(["--preset", "real"])
    assert f"= {g.batch_size * g.group_size} rows" in got["setup"]["grpo"]
    assert f"+ {g.max_new_tokens} completion tokens" in got["setup"]["grpo"]


def test_options_change_what_they_should(tmp_path):
    base, rows = plan(tmp_path), grpo.parse_args(["--preset", "real"]).batch_size * 4
    micro = plan(tmp_path, "--micro-batch", rows // 4)
    assert micro["grpo ddp"]["logits"] == pytest.approx(base["grpo ddp"]["logits"] / 4)
    assert micro["grpo ddp"]["activations"] < base["grpo ddp"]["activations"]
    assert micro["sft ddp"] == base["sft ddp"]                                 # a GRPO option
    full = plan(tmp_path, "--no-grad-ckpt")
    assert full["grpo ddp"]["activations"] > 5 * base["grpo ddp"]["activations"]
    assert full["sft ddp"]["activations"] == base["sft ddp"]["activations"]      # SFT's preset is off already
    rm = plan(tmp_path, "--rm-params", 7.11)
    assert rm["grpo ddp"]["reward model (rm:)"] == pytest.approx(2 * 7.11e9)
    assert rm["sft ddp"]["reward model (rm:)"] == 0
    assert rm["grpo ddp"]["peak"] > base["grpo ddp"]["peak"] + 14e9
    for k in ("trainable weights (fp32)", "gradients (fp32)", "AdamW state (fp32)"):
        assert base["grpo fsdp"][k] == pytest.approx(base["grpo ddp"][k] / 8)
    fp32 = plan(tmp_path, "--precision", "fp32", "--world", 4)
    llm = bench.param_counts(bench.llm_config(bench.QWEN25_CONFIG), "base")["llm"]   # the ViT stays fp32 either way
    assert fp32["sft ddp"]["frozen weights"] == pytest.approx(base["sft ddp"]["frozen weights"] + 2 * llm)
    assert fp32["grpo ddp"]["autocast bf16 weight copies"] == 0
    assert fp32["grpo fsdp"]["AdamW state (fp32)"] == pytest.approx(base["grpo ddp"]["AdamW state (fp32)"] / 4)


def test_parameter_counts_are_the_models(tmp_path):
    """Counted on the meta device from the config: Qwen2.5-3B's 3.09 B, and the ViT and bridge model.py builds."""
    c = bench.param_counts(bench.llm_config(bench.QWEN25_CONFIG), "tiny")
    assert 3.08e9 < c["llm"] < 3.10e9 and c["embed"] == 151936 * 2048
    vit = model.ViT3D.from_preset("tiny")
    assert c["vit"] == sum(p.numel() for p in vit.parameters()) and c["n_img"] == 8
    bridge = model.Bridge(vit.width, vit.grid, 2048, torch.zeros(2048))
    assert c["bridge"] == sum(p.numel() for p in bridge.parameters())


def test_the_planned_reference_is_the_frozen_models_bytes(tmp_path):
    """GRPO's reference as grpo.py holds it (VLM.freeze in bf16), built at real width on the meta device: the plan
    counts its bytes within 0.5 % (the bridge's buffers, the anchor and input statistics, are left out)."""
    llm = build_tiny_llm(["A lung nodule. No pleural effusion."] * 8, tmp_path / "llm", vocab_size=300, hidden=64)
    vlm = bench.big_vlm(llm, bench.QWEN25_3B, "base", "meta").freeze(torch.bfloat16)
    held = {id(t): t.numel() * t.element_size() for t in [*vlm.parameters(), *vlm.buffers()]}
    assert plan(tmp_path)["grpo ddp"]["reference policy"] == pytest.approx(sum(held.values()), rel=5e-3)


def test_bad_inputs_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--llm-config .*missing.json: no such file"):
        plan(tmp_path, "--llm-config", tmp_path / "missing.json")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": 100}))
    with pytest.raises(SystemExit, match="no intermediate_size, num_hidden_layers, num_attention_heads"):
        plan(tmp_path, "--llm-config", tmp_path / "cfg")
    with pytest.raises(SystemExit):
        bench.parse_args(["--micro-batch", "-1"])
    assert "--micro-batch: must be at least 0, not -1" in capsys.readouterr().err


def test_live_bytes_counts_storages_once_and_leaves_out_gradients():
    w = torch.ones(1000, requires_grad=True)
    with bench.LiveBytes(ignore=[w]) as live:
        a = torch.ones(1000)                          # 4000 bytes
        view = a[:10]                                 # the same storage: not counted again
        b = (w * 2).sum()                             # 4000 bytes for w * 2 (freed) and 4 for the sum
        del a, view
        w.register_hook(lambda g: live.grad(g))       # w's gradient: left out
        b.backward()
        c = torch.ones(500)                           # 2000 bytes, after a was freed
    assert live.peak() == 8004 and w.grad is not None and c.numel() == 500


def test_qwen25_layout_tokenizer_through_vlm_build(tmp_path):
    """Qwen2.5's added tokens at Qwen2.5's ids, its chat template, EOS = pad = <|endoftext|>; VLM.build then adds only
    the image placeholder (inside the 151,936-row embedding: no resize), with EOS <|im_end|> and pad <|endoftext|>."""
    cfg = dict(bench.llm_config(bench.QWEN25_CONFIG), hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2)
    llm, tok = bench.qwen25_like(cfg, 1, ["the chest CT shows a small nodule"])
    assert len(tok) == 151665 and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert [tok.convert_tokens_to_ids(t) for t in bench.QWEN25_ADDED] == list(range(151643, 151665))
    assert tok.decode(tok("a nodule <|im_end|>")["input_ids"]) == "a nodule <|im_end|>"
    llm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    vlm = model.VLM.build(tmp_path, vit_preset="tiny")
    assert vlm.image_token_id == 151665 and vlm.llm.get_input_embeddings().weight.shape[0] == 151936
    assert (vlm.eos_token_id, vlm.pad_token_id) == (151645, 151643)
    assert vlm.prompt("Hi").startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                                       "helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><im_patch>")


def test_measure_activations_at_tiny_width(tmp_path):
    """The measuring path that wrote bench.MEASURED, on a narrow LLM and the tiny ViT: every figure is there and they
    order as they must (checkpointing keeps a layer's input only; frozen layers keep less than trained ones)."""
    cfg = dict(bench.llm_config(bench.QWEN25_CONFIG), hidden_size=64, intermediate_size=128, num_attention_heads=4,
               num_key_value_heads=2)
    got = bench.measure_activations(tmp_path, cfg, "tiny")
    assert {k: set(v) for k, v in got.items()} == {k: set(v) for k, v in bench.MEASURED.items()}
    for key in ("grpo/fp32", "grpo/bf16", "sft/fp32"):
        assert got["llm_layer"][key + "/ckpt"] == 64 * 4                # the fp32 residual stream: hidden x 4 bytes
        assert got["llm_layer"][key] > 4 * got["llm_layer"][key + "/ckpt"]
    assert got["llm_layer"]["sft/bf16/ckpt"] == 64 * 2                 # a bf16-held LLM's residual stream
    assert got["llm_layer"]["sft/fp32"] < got["llm_layer"]["grpo/fp32"]
    assert got["vit_block"]["fp32/ckpt"] == 128 * 4 < got["vit_block"]["bf16"] < got["vit_block"]["fp32"]
    assert got["logits"]["grpo/fp32"] >= 4 * 151936                    # at least one fp32 row of the vocabulary
