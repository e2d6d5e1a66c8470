"""model.py: encoder layout, bridge, splice, generation, checkpoints. Tiny models on the CPU, a few seconds each."""
import argparse
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import model as M
import runtime
from phantom.llm import CHATML_TEMPLATE, build_tiny_llm

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "No pleural effusion. Heart size is normal. The trachea and both main bronchi are open.",
    "There is a 5 mm nodule in the right upper lobe. Emphysematous changes in both lungs.",
    "What abnormality is present in this CT scan? A) Emphysema B) Atelectasis C) Lung nodule D) Pleural effusion",
    "<think>The scan shows lung nodule. The answer is C.</think><answer>C</answer>",
    "<finding>Mediastinal lymph nodes are not enlarged.</finding><impression>Normal chest CT.</impression>",
] * 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices run fastest on one thread (and don't fight other test processes for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return build_tiny_llm(TEXTS, tmp_path_factory.mktemp("llm") / "tiny_llm", vocab_size=600, hidden=64, layers=2,
                            heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def vlm(tiny_llm):
    torch.manual_seed(0)
    return M.VLM.build(tiny_llm, vit_preset="tiny").eval()


def volumes(n, seed=0):
    return torch.randn(n, 1, 64, 64, 32, generator=torch.Generator().manual_seed(seed))


# ---- vision encoder ------------------------------------------------------------------------------------------------

def brgsa_layout(width=768, depth=12, mlp=3072, patch=(16, 16, 8), tokens=2744):
    """The published BrgSA_vision_encoder.pth layout (timm names), written out independently of model.py."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, tokens + 1, width),
              "patch_embed.proj.weight": (width, 1, *patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "norm.bias": (width,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (width,), b + "norm1.bias": (width,),
                       b + "attn.qkv.weight": (3 * width, width), b + "attn.qkv.bias": (3 * width,),
                       b + "attn.proj.weight": (width, width), b + "attn.proj.bias": (width,),
                       b + "norm2.weight": (width,), b + "norm2.bias": (width,),
                       b + "mlp.fc1.weight": (mlp, width), b + "mlp.fc1.bias": (mlp,),
                       b + "mlp.fc2.weight": (width, mlp), b + "mlp.fc2.bias": (width,)})
    return shapes


def test_base_preset_matches_published_layout():
    with torch.device("meta"):
        vit = M.ViT3D.from_preset("base")
    assert vit.grid == (14, 14, 14) and vit.width == 768
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert got == brgsa_layout()
    n_params = sum(p.numel() for p in vit.parameters())
    assert n_params == sum(torch.Size(s).numel() for s in brgsa_layout().values())
    assert abs(n_params - 88.7e6) < 0.1e6, n_params
    # the published encoder normalises with eps 1e-6 in its blocks and PyTorch's default 1e-5 at the end
    assert {m.eps for b in vit.blocks for m in (b.norm1, b.norm2)} == {1e-6} and vit.norm.eps == 1e-5


def test_brgsa_pth_loads_strictly(tmp_path):
    # a fake published file: plain torch.save of a timm-named state dict
    cfg = M.VIT_PRESETS["tiny"]
    shapes = brgsa_layout(cfg["width"], cfg["depth"], cfg["mlp_dim"], cfg["patch_size"], 4 * 4 * 4)  # tiny grid
    fake = {k: torch.randn(s) for k, s in shapes.items()}
    torch.save(fake, tmp_path / "BrgSA_vision_encoder.pth")
    vit = M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "BrgSA_vision_encoder.pth")
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in fake.items())
    # our own safetensors export round-trips
    M.save_vision_weights(vit, tmp_path / "vision_encoder.safetensors")
    again = M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "vision_encoder.safetensors")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in fake.items())
    # strict: a missing or an extra key is an error, never silently ignored
    torch.save({**fake, "head.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(RuntimeError, match="head.weight"):
        M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "extra.pth")
    torch.save({k: v for k, v in fake.items() if k != "norm.bias"}, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="norm.bias"):
        M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "missing.pth")
    # another preset's weights: the error names the file and the preset they fit, not 100 lines of shapes
    with pytest.raises(RuntimeError, match=r"BrgSA_vision_encoder.pth does not fit this ViT3D \(width 768, depth 12\); "
                       r"it holds a width-128 encoder: the 'tiny' ViT preset, --vit-preset tiny") as err:
        M.load_vision_weights(M.ViT3D.from_preset("base"), tmp_path / "BrgSA_vision_encoder.pth")
    assert len(str(err.value).splitlines()) <= 8 and err.value.__cause__ is None and err.value.__suppress_context__
    assert max(map(len, str(err.value).splitlines())) <= 304       # torch's one line of 8 missing blocks' keys: cut
    # a file that is no dict of weights, or pickles objects weights_only refuses: the error names the file
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(RuntimeError, match="list.pth: holds a list, not a dict of encoder weights"):
        M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "list.pth")
    torch.save({"args": argparse.Namespace(lr=1.0), "model": fake}, tmp_path / "trainer.pth")
    with pytest.raises(RuntimeError, match="trainer.pth: cannot load encoder weights .UnpicklingError: it pickles "
                       "argparse.Namespace, which weights_only=True refuses: from a copy you trust, save its tensors "
                       "alone") as err:
        M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "trainer.pth")
    assert "weights_only` set to `False" not in str(err.value) and "\x1b" not in str(err.value)   # torch's advice,
    assert err.value.__cause__ is None and err.value.__suppress_context__   # nor printed above it, as its cause
    (tmp_path / "metrics.pth").write_text('{"step": 1, "loss": 2.5}\n')           # another file given by mistake
    with pytest.raises(RuntimeError, match="metrics.pth: cannot load encoder weights .UnpicklingError: no PyTorch "
                       "file that weights_only=True reads; is it the encoder's weights"):
        M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "metrics.pth")
    (tmp_path / "empty.pth").write_bytes(b"")                     # an interrupted copy: torch.load's EOFError('')
    with pytest.raises(RuntimeError, match="empty.pth: cannot load encoder weights .EOFError: no message"):
        M.load_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path / "empty.pth")


def test_encoder_and_bridge_shapes():
    vit = M.ViT3D.from_preset("tiny")
    tokens = vit(volumes(2))
    assert tokens.shape == (2, 64, 128)  # (16, 16, 8) patches on 64 x 64 x 32: a 4 x 4 x 4 grid
    anchor = torch.randn(96)
    bridge = M.Bridge(vit.width, vit.grid, 96, anchor)
    assert bridge.n_img == 8 and bridge(tokens).shape == (2, 8, 96)
    assert torch.equal(bridge.anchor, anchor) and "anchor" in bridge.state_dict()
    assert not any(p is bridge.anchor for p in bridge.parameters())  # frozen: a buffer, not a parameter
    with pytest.raises(ValueError, match="expects"):
        vit(torch.zeros(1, 1, 64, 64, 16))
    # base geometry: 14^3 ViT tokens pool to the paper's 343 image tokens
    with torch.device("meta"):
        assert M.Bridge(768, (14, 14, 14), 2048, torch.zeros(2048)).n_img == 343
    for grid in ((7, 7, 7), (4, 3, 4), (4, 4, 1)):   # the 2x2x2 pooling would drop a plane of tokens, or all
        with pytest.raises(ValueError, match=rf"ViT grid \({grid[0]}, {grid[1]}, {grid[2]}\) .* even sizes >= 2"):
            M.Bridge(32, grid, 48, torch.zeros(48))


def test_ram_gate_interpolates_towards_anchor():
    """eq. (2)-(3): gate ~1 gives the anchor, gate ~0 gives the plain projection (= the no-RAM bridge)."""
    torch.manual_seed(0)
    tokens, anchor = torch.randn(2, 512, 32), torch.randn(48)
    bridge, plain = M.Bridge(32, (8, 8, 8), 48, anchor), M.Bridge(32, (8, 8, 8), 48, anchor, ram=False)
    assert not any(k.startswith("gate") for k in plain.state_dict())
    plain.load_state_dict({k: v for k, v in bridge.state_dict().items() if not k.startswith("gate")})
    with torch.no_grad():
        bridge.gate[2].weight.zero_()
        bridge.gate[2].bias.fill_(30.0)  # sigmoid -> 1: z = anchor
        to_anchor = bridge(tokens)
        expected = bridge.norm(anchor + bridge.pos_embed).expand(2, -1, -1)
        torch.testing.assert_close(to_anchor, expected, atol=1e-5, rtol=0)
        bridge.gate[2].bias.fill_(-30.0)  # sigmoid -> 0: z = x
        torch.testing.assert_close(bridge(tokens), plain(tokens), atol=1e-5, rtol=0)


def test_sincos_position_embedding_follows_its_formula_and_token_order():
    """A third of the channels per axis, sin(p * w_i) then cos(p * w_i) with w_i = 10000^(-i / (dim/6)), tokens
    x-major with z fastest (Conv3d(...).flatten(2)), left-over channels zero; written out here on a 2 x 3 x 4 grid."""
    dim, grid = 14, (2, 3, 4)                                     # 14 // 6 * 2 = 4 channels per axis, 2 left over
    emb = M.sincos_pos_embed_3d(dim, grid)
    assert emb.shape == (24, dim) and emb.dtype == torch.float32
    omega = [1.0, 1.0 / 100]                                      # 10000^(-0/2), 10000^(-1/2)
    for x in range(2):
        for y in range(3):
            for z in range(4):
                row = []
                for p in (x, y, z):
                    row += [math.sin(p * w) for w in omega] + [math.cos(p * w) for w in omega]
                expected = torch.tensor(row + [0.0, 0.0])
                torch.testing.assert_close(emb[(x * 3 + y) * 4 + z], expected, atol=1e-6, rtol=0)


def test_vit_tokens_are_the_patches_in_conv3d_order_without_the_cls_token():
    """ViT3D's output token i is patch (x, y, z) with i = (x * gy + y) * gz + z, after the patch projection, its own
    position embedding (row 1 + i: row 0 belongs to the cls token) and the final norm. With no blocks, each token is
    computed here from its patch directly, on a grid of unequal sides."""
    torch.manual_seed(0)
    vit = M.ViT3D(img_size=(32, 48, 16), patch_size=(16, 16, 8), width=24, depth=0, heads=4, mlp_dim=48).eval()
    with torch.no_grad():
        vit.pos_embed.normal_()
        vit.cls_token.normal_()
        vit.norm.weight.normal_()
        vit.norm.bias.normal_()
    assert vit.grid == (2, 3, 2)
    x = torch.randn(2, 1, 32, 48, 16)
    patches = x[:, 0].reshape(2, 2, 16, 3, 16, 2, 8).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 12, 16 * 16 * 8)
    w = vit.patch_embed.proj.weight.reshape(24, -1)
    tokens = patches @ w.T + vit.patch_embed.proj.bias + vit.pos_embed[0, 1:]
    expected = torch.nn.functional.layer_norm(tokens, (24,), vit.norm.weight, vit.norm.bias, vit.norm.eps)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), expected, atol=1e-4, rtol=1e-4)


def test_bridge_pools_each_2x2x2_cell_of_the_encoder_grid_into_one_image_token():
    """The bridge reads the (B, N, C) encoder tokens in the ViT's order (x-major, z fastest), standardises them per
    position and channel, and its pooling mixes exactly the 8 tokens of one 2 x 2 x 2 cell into image token
    (X * GY + Y) * GZ + Z, then projection, LayerNorm, position embedding, LayerNorm (no RAM gate here)."""
    torch.manual_seed(0)
    C, D, grid = 8, 12, (4, 2, 6)
    bridge = M.Bridge(C, grid, D, torch.randn(D), ram=False)
    with torch.no_grad():
        bridge.feat_mean.normal_()
        bridge.feat_std.uniform_(0.5, 2.0)
        bridge.pos_embed.normal_()
    tokens = torch.randn(2, 4 * 2 * 6, C)
    z = ((tokens - bridge.feat_mean) / bridge.feat_std).reshape(2, 2, 2, 1, 2, 3, 2, C)   # (B, X, dx, Y, dy, Z, dz, C)
    cells = z.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(2, 6, 2, 2, 2, C)                  # (B, cell, dx, dy, dz, C)
    pooled = torch.einsum("bjxyzc,dcxyz->bjd", cells, bridge.pool.weight) + bridge.pool.bias
    x = bridge.proj_norm(bridge.proj(pooled))
    with torch.no_grad():
        torch.testing.assert_close(bridge(tokens), bridge.norm(x + bridge.pos_embed), atol=1e-5, rtol=1e-5)


# ---- tiny LLM and the VLM ------------------------------------------------------------------------------------------

def test_tiny_llm_is_a_normal_hf_directory(tiny_llm):
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    assert llm.config.model_type == "qwen2" and llm.config.vocab_size >= len(tok)
    for t in ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<im_patch>", *M.TAG_TOKENS]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # tags survive decoding with skip_special_tokens (rewards parse them)
    ids = tok("<think>a nodule</think><answer>C</answer>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a nodule</think><answer>C</answer>"


def test_an_llm_directory_missing_weights_is_an_error_not_a_random_start(tiny_llm, tmp_path):
    """transformers starts a weight absent from the checkpoint at random, with a warning only; a VLM built or loaded
    from such a directory would train or answer with it. load_llm names the directory and the first missing weight."""
    import shutil
    from safetensors.torch import load_file, save_file
    llm, _ = M.load_llm(tiny_llm)                                            # the whole directory loads
    shutil.copytree(tiny_llm, tmp_path / "llm")
    (weights,) = (tmp_path / "llm").glob("*.safetensors")
    state = load_file(weights)
    dropped = sorted(k for k in state if k.endswith("mlp.up_proj.weight"))[-1]
    save_file({k: v for k, v in state.items() if k != dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{tmp_path / 'llm'}: 1 LLM weights are not in the checkpoint "
                                         rf"\(the first: {dropped}\)"):
        M.load_llm(tmp_path / "llm")


def test_anchor_is_the_embedding_mean(tiny_llm, vlm):
    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    vocab = len(AutoTokenizer.from_pretrained(tiny_llm))  # eq. (1) over the real vocabulary, not the padding rows
    torch.testing.assert_close(vlm.bridge.anchor, llm.get_input_embeddings().weight[:vocab].mean(0))
    assert not vlm.bridge.anchor.requires_grad


def test_prompt_holds_n_img_placeholders(vlm):
    ids, mask = vlm.tokenize([vlm.prompt("Describe the scan.")])
    assert int((ids == vlm.image_token_id).sum()) == vlm.n_img == 8
    text_only, _ = vlm.tokenize([vlm.prompt("Describe the scan.", with_image=False)])
    assert int((text_only == vlm.image_token_id).sum()) == 0


def test_splice_with_mixed_left_and_right_padding(vlm):
    prompts = [vlm.prompt("Short?"), vlm.prompt("A much longer question about the lower lobes of both lungs?")]
    images = vlm.image_embeds(volumes(2)).detach()
    logits = {}
    for side in ("left", "right"):
        ids, mask = vlm.tokenize(prompts, padding_side=side)
        assert bool((mask == 0).any())  # the short row really is padded
        embeds = vlm.embed(ids, images)
        plain = vlm.llm.get_input_embeddings()(ids)
        for b in range(2):
            at = ids[b] == vlm.image_token_id
            assert torch.equal(embeds[b, at], images[b])  # row b's placeholders hold row b's image, in order
            assert torch.equal(embeds[b, ~at], plain[b, ~at])  # every other embedding untouched
        with torch.no_grad():
            logits[side] = (vlm(ids, mask, images), mask)
    # each row's logits at its real tokens equal the unpadded single-row logits, whichever side was padded
    for b in range(2):
        ids, mask = vlm.tokenize([prompts[b]])
        with torch.no_grad():
            alone = vlm(ids, mask, images[b:b + 1])[0]
        for side, (lg, m) in logits.items():
            torch.testing.assert_close(lg[b][m[b].bool()], alone, atol=1e-4, rtol=1e-4, msg=side)
    # a row with the wrong number of placeholders is an error, not a silent misalignment
    ids, mask = vlm.tokenize(prompts)
    ids[0, (ids[0] == vlm.image_token_id).nonzero()[0]] = vlm.pad_token_id
    with pytest.raises(ValueError, match="placeholders"):
        vlm.embed(ids, images)


def test_generate_samples_reproducibly_and_matches_full_forward(vlm):
    prompts = [vlm.prompt("Which option?"), vlm.prompt("Which option is present in this scan, A or B?")]
    ids, mask = vlm.tokenize(prompts)
    with torch.no_grad():
        images = vlm.image_embeds(volumes(2))
    G = 4

    def sample(seed):
        return vlm.generate(ids, mask, images, num_samples=G, max_new_tokens=12,
                            generator=torch.Generator().manual_seed(seed))

    c1, l1, f1 = sample(1)
    c2, l2, f2 = sample(1)
    assert c1.shape[0] == 2 * G and torch.equal(c1, c2) and torch.equal(l1, l2)  # same seed, same samples
    assert not torch.equal(c1, sample(2)[0])  # another seed, other samples
    assert not bool((c1 == vlm.image_token_id).any())  # a placeholder is never sampled (it would break the splice)
    for p in range(2):  # G samples of one prompt are independent draws, not copies
        assert len({tuple(c1[p * G + g].tolist()) for g in range(G)}) > 1
    # the KV-cache loop agrees with the full forward pass: greedy tokens are the argmax of the full logits
    comp, lengths, finished = vlm.generate(ids, mask, images, num_samples=2, max_new_tokens=8, temperature=0)
    full_ids = torch.cat([ids.repeat_interleave(2, 0), comp], 1)
    comp_mask = (torch.arange(comp.shape[1]) < lengths[:, None]).long()
    full_mask = torch.cat([mask.repeat_interleave(2, 0), comp_mask], 1)
    with torch.no_grad():
        logits = vlm(full_ids, full_mask, images.repeat_interleave(2, 0))
    T = ids.shape[1]
    for r in range(comp.shape[0]):
        n = int(lengths[r])
        assert torch.equal(logits[r, T - 1:T - 1 + n].argmax(-1), comp[r, :n])
    # token_logprobs scores the same tokens: a greedy token has the highest log-prob at its position
    lp = vlm.token_logprobs(full_ids, full_mask, images.repeat_interleave(2, 0))
    assert lp.shape == (full_ids.shape[0], full_ids.shape[1] - 1) and bool(torch.isfinite(lp).all())
    best = torch.log_softmax(vlm.block_unsampled(logits[:, T - 1:-1].float()), -1).max(-1).values
    torch.testing.assert_close(lp[:, T - 1:][comp_mask.bool()], best[comp_mask.bool()], atol=1e-4, rtol=0)
    # `last` scores only the completion, with the LM head on those positions only; same numbers
    lp_last = vlm.token_logprobs(full_ids, full_mask, images.repeat_interleave(2, 0), last=comp.shape[1])
    torch.testing.assert_close(lp_last, lp[:, T - 1:], atol=1e-5, rtol=0)


def test_generate_with_a_generator_per_prompt_ignores_batch_mates(vlm):
    """GRPO samples all questions of a step in one batch, each from its own generator: a question's samples must be
    those it gets alone (so 1 and N ranks, which batch different questions together, draw the same completions)."""
    prompts = [vlm.prompt("Which option?"), vlm.prompt("Which option is present in this scan, A or B?")]
    with torch.no_grad():
        images = vlm.image_embeds(volumes(2))
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]
    ids, mask = vlm.tokenize(prompts)                                  # left-padded batch of both
    both, both_len, _ = vlm.generate(ids, mask, images, num_samples=3, max_new_tokens=10, generator=gens(5, 6))
    for j, seed in enumerate((5, 6)):
        one_ids, one_mask = vlm.tokenize(prompts[j:j + 1])             # the prompt alone, unpadded
        alone, alone_len, _ = vlm.generate(one_ids, one_mask, images[j:j + 1], num_samples=3, max_new_tokens=10,
                                           generator=gens(seed))
        rows = both[3 * j:3 * j + 3]
        assert torch.equal(both_len[3 * j:3 * j + 3], alone_len)
        assert torch.equal(rows[:, :alone.shape[1]], alone)
    with pytest.raises(ValueError, match="generators"):
        vlm.generate(ids, mask, images, num_samples=3, max_new_tokens=2, generator=gens(5))


def test_generate_stops_each_row_at_eos(vlm):
    ids, mask = vlm.tokenize([vlm.prompt("a"), vlm.prompt("b")])
    images = torch.zeros(2, vlm.n_img, vlm.config["llm_dim"])
    eos, pad = vlm.eos_token_id, vlm.pad_token_id
    calls = []

    def force_eos(module, inputs, out):  # rows 1 and 3 (prompt 0 sample 1, prompt 1 sample 1) say EOS at step 2
        calls.append(1)
        if len(calls) == 3:
            out = out.clone()
            out[[1, 3], -1, eos] = 1e4
        return out

    hook = vlm.llm.lm_head.register_forward_hook(force_eos)
    try:
        comp, lengths, finished = vlm.generate(ids, mask, images, num_samples=2, max_new_tokens=6,
                                               generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    for r in (1, 3):
        assert bool(finished[r]) and int(lengths[r]) == 3 and int(comp[r, 2]) == eos
        assert bool((comp[r, 3:] == pad).all())
    for r in (0, 2):  # the others keep going (unless they sampled EOS themselves)
        assert int(lengths[r]) == 6 or bool(finished[r])
    assert comp.shape[1] == int(lengths.max())
    with torch.no_grad():
        logp = vlm.token_logprobs(ids, mask, images, temperature=0.5)
    assert logp.shape == (2, ids.shape[1] - 1)


def test_bridge_learns_through_the_splice_with_frozen_llm(vlm):
    """SFT trains the bridge only: gradients reach the bridge through the placeholder embeddings."""
    vlm.set_trainable(vit=False, bridge=True, llm=False)
    try:
        ids, mask = vlm.tokenize([vlm.prompt("Report?")])
        logp = vlm.token_logprobs(ids, mask, vlm.image_embeds(volumes(1)))
        logp[:, -5:].sum().backward()
        assert vlm.bridge.pool.weight.grad is not None and vlm.bridge.pool.weight.grad.abs().sum() > 0
        assert vlm.bridge.gate[0].weight.grad.abs().sum() > 0 and vlm.bridge.pos_embed.grad.abs().sum() > 0
        assert all(p.grad is None for p in [*vlm.llm.parameters(), *vlm.vit.parameters()])
    finally:
        vlm.zero_grad(set_to_none=True)
        vlm.set_trainable(vit=True, bridge=True, llm=True)


def test_grad_checkpointing_recomputes_where_gradients_flow(tiny_llm):
    """--grad-ckpt on a model in eval mode (as the stages hold it): each ViT block and LLM decoder layer runs again in
    the backward pass, the gradients are the plain pass's, and generation (no gradients) keeps its cache."""
    torch.manual_seed(0)
    plain = M.VLM.build(tiny_llm, vit_preset="tiny").eval()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    ids, mask = plain.tokenize([plain.prompt("Report?")])
    runs = []
    for net in (plain, ckpt):
        calls = {"vit": 0, "llm": 0}
        hooks = [net.vit.blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.update(vit=calls["vit"] + 1)),
                 net.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.update(llm=calls["llm"] + 1))]
        net.token_logprobs(ids, mask, net.image_embeds(volumes(1)))[:, -5:].sum().backward()
        after_backward = dict(calls)
        out = net.generate(ids, mask, net.image_embeds(volumes(1)), max_new_tokens=4,
                           generator=torch.Generator().manual_seed(0))
        grads = {n: p.grad for n, p in net.named_parameters()}
        runs.append((after_backward, calls["llm"] - after_backward["llm"], out, grads))
        for h in hooks:
            h.remove()
    (plain_calls, plain_gen_calls, plain_out, plain_grads), (ckpt_calls, ckpt_gen_calls, ckpt_out, ckpt_grads) = runs
    assert plain_calls == {"vit": 1, "llm": 1} and ckpt_calls == {"vit": 2, "llm": 2}
    assert all(torch.allclose(plain_grads[n], ckpt_grads[n], rtol=1e-5, atol=1e-8) for n in plain_grads)
    assert all(torch.equal(a, b) for a, b in zip(plain_out, ckpt_out)) and ckpt_gen_calls == plain_gen_calls
    assert not any(layer.training for layer in ckpt.ckpt_layers)  # the layers' flag is back after the pass


def foreign_llm(out_dir):
    """An HF directory like Qwen2.5-3B base: eos <|endoftext|>, no pad, no vision or placeholder tokens, and an
    embedding matrix exactly as large as the vocabulary (so new tokens need new rows)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    llm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    llm.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return llm, tok


def test_build_adapts_a_foreign_tokenizer(tmp_path):
    llm, tok = foreign_llm(tmp_path / "llm")
    vlm = M.VLM.build(tmp_path / "llm", vit_preset="tiny")
    t = vlm.tokenizer
    for token in (M.IMAGE_TOKEN, M.VISION_START, M.VISION_END):
        assert len(t(token, add_special_tokens=False)["input_ids"]) == 1
    assert t.eos_token == "<|im_end|>" == t.convert_ids_to_tokens(vlm.eos_token_id)  # the chat template's turn end
    assert vlm.pad_token_id is not None and vlm.pad_token_id != vlm.eos_token_id
    old = llm.get_input_embeddings().weight
    anchor = old.mean(0)  # eq. (1) over the original vocabulary
    torch.testing.assert_close(vlm.bridge.anchor, anchor)
    new = vlm.llm.get_input_embeddings().weight
    assert new.shape[0] >= len(t) > old.shape[0] and torch.equal(new[:old.shape[0]], old)
    torch.testing.assert_close(new[old.shape[0]:len(t)], anchor.expand(len(t) - old.shape[0], -1))
    ids, mask = vlm.tokenize([vlm.prompt("Hi")])
    with torch.no_grad():
        assert vlm(ids, mask, vlm.image_embeds(volumes(1))).shape == (1, ids.shape[1], new.shape[0])


# ---- checkpoints ---------------------------------------------------------------------------------------------------

LOAD_AND_SCORE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {repo!r})
    import model as M
    vlm = M.VLM.load({ckpt!r}).eval()
    inputs = torch.load({inputs!r})
    with torch.no_grad():
        logits = vlm(inputs["ids"], inputs["mask"], vlm.image_embeds(inputs["volumes"]))
    torch.save({{"logits": logits, "meta": vlm.config["meta"]}}, {out!r})
""")


def _logits(vlm, inputs):
    with torch.no_grad():
        return vlm(inputs["ids"], inputs["mask"], vlm.image_embeds(inputs["volumes"]))


def _inputs(vlm, tmp_path):
    ids, mask = vlm.tokenize([vlm.prompt("Is there a nodule?"), vlm.prompt("Any effusion in the pleura?")])
    inputs = {"ids": ids, "mask": mask, "volumes": volumes(2, seed=3)}
    torch.save(inputs, tmp_path / "inputs.pt")
    return inputs


def _run(script, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script.format(repo=str(REPO), **kw)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_save_then_load_in_a_fresh_process_gives_identical_logits(vlm, tmp_path):
    torch.manual_seed(1)
    with torch.no_grad():  # make the bridge non-trivial so a wrong load would show
        vlm.bridge.proj.weight.add_(0.1 * torch.randn_like(vlm.bridge.proj.weight))
    vlm.set_trainable(vit=False, bridge=True, llm=False)
    inputs = _inputs(vlm, tmp_path)
    vlm.save(tmp_path / "vlm", meta={"stage": "sft", "args": {"lr": 1e-4, "out": tmp_path}})
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert config["trainable"] == {"vit": False, "bridge": True, "llm": False} and config["n_img"] == 8
    assert sorted(p.name for p in (tmp_path / "vlm").iterdir()) == ["bridge.safetensors", "config.json", "llm",
                                                                    "vision.safetensors"]
    proc = _run(LOAD_AND_SCORE, ckpt=str(tmp_path / "vlm"), inputs=str(tmp_path / "inputs.pt"),
                out=str(tmp_path / "out.pt"))
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["logits"], _logits(vlm, inputs))
    assert out["meta"]["stage"] == "sft" and out["meta"]["args"]["out"] == str(tmp_path)
    vlm.set_trainable(vit=True, bridge=True, llm=True)


SLOW_SAVE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    import model as M
    vlm = M.VLM.load({ckpt!r})
    real_save_file = M.save_file
    def slow_save_file(*args, **kwargs):
        real_save_file(*args, **kwargs)
        print("writing", flush=True)
        time.sleep(60)
    M.save_file = slow_save_file
    with __import__("torch").no_grad():
        vlm.bridge.norm.bias.add_(1.0)
    vlm.save({ckpt!r}, meta={{"version": 2}})
""")


@pytest.mark.parametrize("part", ["config.json", "vision.safetensors", "bridge.safetensors", "llm/model.safetensors"])
def test_a_checkpoint_file_cut_short_is_named(vlm, tmp_path, part):
    """A copy of a checkpoint stopped midway: each file that does not read is named (the libraries named none:
    "Error while deserializing header: invalid header length"); the whole copy loads."""
    vlm.save(tmp_path / "vlm")
    whole = (tmp_path / "vlm" / part).read_bytes()
    (tmp_path / "vlm" / part).write_bytes(whole[:len(whole) // 2])
    where = tmp_path / "vlm" / ("llm" if part.startswith("llm/") else part)
    with pytest.raises(ValueError, match=f"^{re.escape(str(where))}(: a weights file)? does not read .*copy the"):
        M.VLM.load(tmp_path / "vlm")
    (tmp_path / "vlm" / part).write_bytes(whole)
    assert M.VLM.load(tmp_path / "vlm").config["ram"] == vlm.config["ram"]


def test_a_checkpoint_of_other_model_code_names_the_commit_that_wrote_it(vlm, tmp_path):
    """A bridge written by other model code (another commit, a fork's pooling) stops naming the checkpoint, the commit
    and edited files that wrote it, then torch's first lines (not one line per mismatched key)."""
    ckpt = vlm.save(tmp_path / "vlm")
    state = load_file(ckpt / "bridge.safetensors")
    save_file({**state, "pool.weight": torch.zeros(8, 8, 1, 1, 1)}, ckpt / "bridge.safetensors")   # another pooling
    written = json.loads((ckpt / "config.json").read_text())["versions"]
    edited = ", ".join(written["git_changed"]) or "none"
    with pytest.raises(RuntimeError, match=re.escape(f"{ckpt} does not fit this model.py: written by commit "
                                                     f"{written['git_commit']} (edited: {edited})\n")) as err:
        M.VLM.load(ckpt)
    assert "size mismatch for pool.weight" in str(err.value) and len(str(err.value).splitlines()) <= 7
    assert err.value.__cause__ is None and err.value.__suppress_context__   # no traceback prints torch's list above


def test_interrupted_save_leaves_previous_checkpoint_loadable(vlm, tmp_path):
    inputs = _inputs(vlm, tmp_path)
    ckpt = tmp_path / "vlm"
    vlm.save(ckpt, meta={"version": 1})
    before = _logits(vlm, inputs)
    # 1) an exception in the middle of the write
    real_save_file = M.save_file
    M.save_file = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    try:
        with pytest.raises(OSError, match="disk full"):
            vlm.save(ckpt, meta={"version": 2})
    finally:
        M.save_file = real_save_file
    again = M.VLM.load(ckpt)
    assert again.config["meta"] == {"version": 1} and torch.equal(_logits(again, inputs), before)
    # 2) a process killed in the middle of the write
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE.format(repo=str(REPO), ckpt=str(ckpt))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = M.VLM.load(ckpt)
    assert again.config["meta"] == {"version": 1} and torch.equal(_logits(again, inputs), before)
    # the killed writer's half-written copy is removed by the next save, not left to fill the disk
    leftover = tmp_path / f".vlm.tmp-{proc.pid}"
    assert leftover.is_dir()
    vlm.save(ckpt, meta={"version": 3})
    assert not leftover.exists() and M.VLM.load(ckpt).config["meta"] == {"version": 3}
    with pytest.raises(FileNotFoundError, match="not a complete VLM checkpoint"):
        M.VLM.load(tmp_path / "nothing_here")


def test_atomic_dir_puts_back_a_version_stranded_by_a_kill_between_its_renames(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    stranded = tmp_path / f".out.old-{dead.pid}"  # killed after moving `out` aside, before moving the new one in
    stranded.mkdir()
    (stranded / "v").write_text("1")
    with pytest.raises(RuntimeError, match="write failed"):
        with runtime.atomic_dir(tmp_path / "out") as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("write failed")
    assert (tmp_path / "out" / "v").read_text() == "1" and not stranded.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with runtime.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "v").write_text("2")
    assert (tmp_path / "out" / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_checkpoint_whose_rope_theta_reads_differently_stops_with_a_clear_error(vlm, tmp_path):
    vlm.save(tmp_path / "vlm")
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert config["versions"]["transformers"] and config["rope_theta"] == M.rope_theta(vlm.llm.config)
    config["rope_theta"], config["versions"]["transformers"] = 12345.0, "4.57.0"  # as another major version reads it
    (tmp_path / "vlm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"written with transformers 4.57.0.*rope theta reads as .* not 12345"):
        M.VLM.load(tmp_path / "vlm")


def test_a_tokenizer_this_transformers_cannot_read_is_named_with_the_version(vlm, tmp_path):
    vlm.save(tmp_path / "vlm")
    (tmp_path / "vlm" / "llm" / "tokenizer.json").write_text('{"version": "9.9", "model": {"type": "FromTheFuture"}}')
    with pytest.raises(RuntimeError, match=r"llm: cannot load its tokenizer with transformers \d+\.\d+"):
        M.VLM.load(tmp_path / "vlm")


def test_saved_weights_are_as_readable_as_the_umask_allows(vlm, tmp_path):
    """safetensors writes its files 0600: a colleague on a shared runs folder could not read the encoder or a VLM
    checkpoint (safetensors then says "No such file or directory"). Saved files now get the umask's read bits."""
    old = os.umask(0o022)
    try:
        M.save_vision_weights(vlm.vit, tmp_path / "enc" / "vision_encoder.safetensors")
        vlm.save(tmp_path / "vlm")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5 and {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
