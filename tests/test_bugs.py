"""Regression tests for small, plausible bugs that the rest of the suite did not catch. Each test asserts the
behaviour a user relies on: cached generation scores like a full forward pass, log-probs are taken at the given
temperature, GRPO scores each completion with its own question's image, the bridge standardises its input, a
judge-excluded group and a truncated completion's format reward stay out of the loss, an unparsed answer is never
correct, the RAM anchor ignores padding rows, and a resumed run draws the random numbers of the uninterrupted one.
Tiny models on the CPU, a few seconds each."""
import copy
import math
import random
from argparse import Namespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate as E
import grpo
import model as M
import runtime
import sft
from phantom.llm import build_tiny_llm, phantom_texts

from test_model import TEXTS, one_thread  # noqa: F401  shared with test_model.py (one_thread is autouse)

OPTIONS = {"A": "Emphysema", "B": "Atelectasis", "C": "Lung nodule", "D": "Pleural effusion"}
QUESTIONS = [  # two questions of different lengths (left padding), on two different volumes
    {"VolumeName": "vol_a.nii.gz", "question": "What abnormality is present in this CT scan?", "options": OPTIONS,
     "answer": "C", "report": "There is a 5 mm lung nodule in the right upper lobe. No pleural effusion."},
    {"VolumeName": "vol_b.nii.gz", "question": "Which abnormality is present in both lungs of this chest CT scan, "
     "and which one is the answer?", "options": OPTIONS, "answer": "A",
     "report": "Emphysema in both lungs. No lung nodule."},
]


def volumes(n, seed=0):
    return torch.randn(n, 1, 64, 64, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return build_tiny_llm(TEXTS, tmp_path_factory.mktemp("bugs_llm") / "tiny_llm", vocab_size=600, hidden=64,
                          layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def ckpt(llm_dir, tmp_path_factory):
    """A tiny VLM checkpoint whose LLM matrices are re-drawn large: an untrained LLM (std 0.02) has nearly flat
    logits, which would hide a small misalignment (a position off by one, another question's image)."""
    torch.manual_seed(0)
    vlm = M.VLM.build(llm_dir, vit_preset="tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in vlm.llm.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return vlm.save(tmp_path_factory.mktemp("bugs_ckpt") / "vlm", meta={"stage": "sft"})


@pytest.fixture(scope="module")
def vlm(ckpt):
    return M.VLM.load(ckpt).eval()


def load_pair(ckpt):
    """The policy and the frozen reference, both from the SFT checkpoint, as grpo.main builds them."""
    return M.VLM.load(ckpt).eval(), M.VLM.load(ckpt).eval().requires_grad_(False)


# ---- 1. the cached generation loop feeds each new token at its own position ------------------------------------

def test_each_sampled_step_scores_like_a_full_forward_over_prompt_and_tokens_so_far(vlm):
    prompts = [vlm.prompt("Which option?"), vlm.prompt("Which option is present in this scan, A or B or C or D?"),
               vlm.prompt("Is there a nodule in the right upper lobe of the lung?")]
    ids, mask = vlm.tokenize(prompts)                               # left-padded, three different lengths
    assert len(set(mask.sum(1).tolist())) == 3
    G, P = 2, ids.shape[1]
    with torch.no_grad():
        images = vlm.image_embeds(volumes(3))
    steps = []                                                      # the LM head's last-position logits, per step
    hook = vlm.llm.lm_head.register_forward_hook(lambda mod, inp, out: steps.append(out[:, -1].detach().float()))
    try:
        comp, lengths, _ = vlm.generate(ids, mask, images, num_samples=G, max_new_tokens=10, temperature=1.0,
                                        generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    T = comp.shape[1]
    assert T >= 5 and len(steps) >= T
    comp_mask = (torch.arange(T) < lengths[:, None]).long()
    full_ids = torch.cat([ids.repeat_interleave(G, 0), comp], 1)
    full_mask = torch.cat([mask.repeat_interleave(G, 0), comp_mask], 1)
    with torch.no_grad():
        full = vlm(full_ids, full_mask, images.repeat_interleave(G, 0)).float()  # (n, P + T, V)
    cached = torch.stack(steps[:T], 1)                              # (n, T, V): step t predicts token t
    at = comp_mask.bool()
    torch.testing.assert_close(cached[at], full[:, P - 1:P - 1 + T][at], atol=1e-4, rtol=1e-4)


# ---- 2. token_logprobs scores at its temperature ---------------------------------------------------------------

def test_token_logprobs_are_log_softmax_of_logits_over_temperature(vlm):
    ids, mask = vlm.tokenize([vlm.prompt("Which option?") + "<think>A nodule.</think><answer>C</answer>",
                              vlm.prompt("Is there an effusion in the pleura of this CT?") + "<answer>D</answer>"])
    with torch.no_grad():
        images = vlm.image_embeds(volumes(2))
        logits = vlm(ids, mask, images).float()[:, :-1]
        blocked = vlm.block_unsampled(torch.zeros(logits.shape[-1])) < -1   # placeholder, vision markers, pad
        real = mask[:, 1:].bool() & ~blocked[ids[:, 1:]]                # real targets a completion could hold
        scored = {}
        for temperature in (0.5, 1.0, 2.0):
            want = torch.log_softmax(vlm.block_unsampled(logits) / temperature, -1)
            want = want.gather(-1, ids[:, 1:, None]).squeeze(-1)
            got = vlm.token_logprobs(ids, mask, images, temperature=temperature)
            torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=1e-4)
            last = vlm.token_logprobs(ids, mask, images, temperature=temperature, last=6)
            torch.testing.assert_close(last, want[:, -6:], atol=1e-4, rtol=1e-4)
            scored[temperature] = got[real]
    assert not torch.allclose(scored[0.5], scored[1.0], atol=1e-2)   # the temperature matters on these logits


# ---- 3. GRPO pairs every completion with its own question's image ----------------------------------------------

class RecordingPolicy(grpo.PolicyLogprobs):
    """grpo.PolicyLogprobs that keeps what it was asked and what it answered."""

    def forward(self, volumes_, input_ids, attention_mask, group_size, completion_len, temperature):
        out = super().forward(volumes_, input_ids, attention_mask, group_size, completion_len, temperature)
        self.calls = getattr(self, "calls", []) + [(input_ids, attention_mask, completion_len, out.detach().clone())]
        return out


def grpo_args(*extra):
    return grpo.parse_args(["--group-size", "3", "--max-new-tokens", "8", "--temperature", "1.0", "--lr", "1e-3",
                            *map(str, extra)])


def test_grpo_first_step_policy_equals_reference_and_each_questions_own_image(ckpt, monkeypatch):
    policy, ref = load_pair(ckpt)
    frozen = M.VLM.load(ckpt).eval()                                # for the direct per-question computation
    ref_seen, real_ref = [], ref.token_logprobs

    def recording_ref(*a, **kw):
        out = real_ref(*a, **kw)
        ref_seen.append(out.clone())
        return out
    monkeypatch.setattr(ref, "token_logprobs", recording_ref)
    net, args, x = RecordingPolicy(policy), grpo_args(), volumes(2, seed=1)
    G = args.group_size
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr)
    out = grpo.train_step(net, ref, optimizer, QUESTIONS, x, grpo.make_consistency_scorer("offline"), args,
                          0, [0, 1])
    (input_ids, attention_mask, T, logp), ref_logp = net.calls[0], ref_seen[0]
    assert input_ids.shape[0] == len(QUESTIONS) * G
    scored = attention_mask[:, -T:].bool()                          # each completion through its first EOS
    # at the first step the policy is the reference: the same log-probs, row by row, and no KL
    torch.testing.assert_close(logp[scored], ref_logp[scored], atol=1e-5, rtol=1e-5)
    assert out["sums"]["kl"] < 1e-6
    # each row equals a direct computation with its own question's volume, and not with the other one's
    with torch.no_grad():
        images = [frozen.image_embeds(x[j:j + 1]) for j in range(len(QUESTIONS))]
        differs = []
        for r in range(input_ids.shape[0]):
            row = (input_ids[r:r + 1], attention_mask[r:r + 1])
            own = frozen.token_logprobs(*row, images[r // G], args.temperature, last=T)[0]
            torch.testing.assert_close(logp[r][scored[r]], own[scored[r]], atol=1e-5, rtol=1e-5)
            other = frozen.token_logprobs(*row, images[1 - r // G], args.temperature, last=T)[0]
            differs.append(not torch.allclose(other[scored[r]], own[scored[r]], atol=1e-3))
    assert all(differs)                                             # the two volumes really change the scores


# ---- 4. the bridge standardises its input tokens ---------------------------------------------------------------

def test_bridge_with_statistics_maps_tokens_like_the_plain_bridge_maps_standardised_tokens():
    torch.manual_seed(0)
    tokens = torch.randn(2, 64, 32) * 3 + 1                         # a 4 x 4 x 4 grid of 32-wide encoder tokens
    bridge = M.Bridge(32, (4, 4, 4), 48, torch.randn(48))
    plain = copy.deepcopy(bridge)                                   # identity statistics
    mean, std = torch.randn(64, 32), torch.rand(64, 32) + 0.5
    with torch.no_grad():
        bridge.feat_mean.copy_(mean)
        bridge.feat_std.copy_(std)
        torch.testing.assert_close(bridge(tokens), plain((tokens - mean) / std), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(bridge(tokens), plain(tokens), atol=1e-3)


def test_vlm_image_embeds_use_the_saved_input_statistics(vlm, tmp_path):
    x = volumes(2, seed=2)
    with torch.no_grad():
        tokens = vlm.vit(x)
        standardised = copy.deepcopy(vlm.bridge)
        standardised.feat_mean.copy_(tokens.mean(0))
        standardised.feat_std.copy_(tokens.std(0) + 0.1)
        expected = vlm.bridge((tokens - standardised.feat_mean) / standardised.feat_std)   # vlm.bridge: identity
        other = copy.deepcopy(vlm)
        other.bridge = standardised
        other.save(tmp_path / "vlm")
        loaded = M.VLM.load(tmp_path / "vlm")
        torch.testing.assert_close(loaded.image_embeds(x), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(loaded.image_embeds(x), vlm.image_embeds(x), atol=1e-3)


# ---- 5. a judge-excluded group stays out of the loss -------------------------------------------------------------

def grpo_update(ckpt, consistency_values, args):
    """One grpo.train_step with plain SGD (lr 1, no clipping: the update is minus the gradient) and the given
    consistency scores; returns the parameter update and train_step's output."""
    policy, ref = load_pair(ckpt)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(list(params.values()), lr=1.0)

    def consistency(thinks, reports):
        return list(consistency_values)
    out = grpo.train_step(grpo.PolicyLogprobs(policy), ref, optimizer, QUESTIONS, volumes(2, seed=1),
                          consistency, args, 0, [0, 1])
    return {n: p.detach() - before[n] for n, p in params.items()}, out


def test_a_judge_excluded_group_does_not_reach_the_update(ckpt, monkeypatch):
    monkeypatch.setattr(grpo, "format_reward", lambda completion: 0.0)       # rewards = the consistency scores
    monkeypatch.setattr(grpo, "accuracy_reward", lambda completion, answer, options=None: 0.0)
    args = grpo_args("--grad-clip", 0, "--judge-failures", "exclude")
    second = [0.0, 0.5, 1.0]                                        # question 1's group carries a signal
    # the judge failed on one completion of question 0 (NaN): its whole group is left out
    excluded, out = grpo_update(ckpt, [math.nan, 0.5, 1.0] + second, args)
    silent, _ = grpo_update(ckpt, [0.3, 0.3, 0.3] + second, args)   # question 0's group: all equal, no signal
    live, _ = grpo_update(ckpt, [0.0, 0.5, 1.0] + second, args)     # question 0's group with a signal
    assert out["sums"]["excluded"] == 3 and out["applied"]
    # the loss is the mean over the rows left in (question 1's three): twice the update of the silent group's batch,
    # whose six rows all count (at step 0 the policy is the reference, so the silent rows add no gradient)
    assert all(torch.allclose(excluded[n], 2 * silent[n], atol=1e-6) for n in excluded)
    assert not all(torch.allclose(live[n], silent[n], atol=1e-6) for n in live)   # question 0 could have mattered
    assert any(bool(d.abs().max() > 1e-4) for d in excluded.values())             # question 1 still trains
    # the logged rewards are the means over the rows left in: question 1's (0, 0.5, 1), one group
    row = grpo.log_row(1, grpo_update(ckpt, [math.nan, 0.9, 0.9] + second, args)[1])
    assert row["reward"] == row["r_con"] == 0.5 and row["r_fmt"] == row["r_acc"] == 0.0 and row["excluded"] == 0.5
    assert row["reward_std"] == pytest.approx(0.5) and row["zero_std_frac"] == 0.0


# ---- 6. a truncated completion earns no format reward ----------------------------------------------------------

def test_a_well_formed_but_truncated_completion_earns_no_format_reward(ckpt, monkeypatch):
    policy, ref = load_pair(ckpt)
    tok = policy.tokenizer
    short = "<think>There is a lung nodule.</think><answer>C</answer>"
    long = "<think>There is a lung nodule in the right upper lobe.</think><answer>C</answer>"
    short_ids, long_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (short, long))
    assert len(short_ids) + 1 < len(long_ids)
    max_new = len(long_ids)                                         # the long text fills max-new-tokens, no EOS
    eos, pad = policy.eos_token_id, policy.pad_token_id
    rows = [short_ids + [eos], long_ids, long_ids, short_ids + [eos]]   # G = 2: per question one finished, one cut
    completion = torch.tensor([r + [pad] * (max_new - len(r)) for r in rows])
    lengths = torch.tensor([len(r) for r in rows])
    finished = torch.tensor([True, False, False, True])

    def fake_generate(input_ids, attention_mask, image_embeds=None, num_samples=1, max_new_tokens=256, **kw):
        assert num_samples == 2 and max_new_tokens == max_new and input_ids.shape[0] == 2
        return completion.clone(), lengths.clone(), finished.clone()
    monkeypatch.setattr(policy, "generate", fake_generate)
    args = grpo.parse_args(["--group-size", "2", "--max-new-tokens", str(max_new), "--temperature", "1.0"])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=args.lr)
    out = grpo.train_step(grpo.PolicyLogprobs(policy), ref, optimizer, QUESTIONS, volumes(2, seed=1),
                          grpo.make_consistency_scorer("offline"), args, 0, [0, 1])
    assert [grpo.format_reward(t) for t in out["texts"]] == [1.0] * 4   # all four are well-formed text ...
    s = out["sums"]
    assert s["truncated"] == 2 and s["n"] == 4
    assert s["r_fmt"] == 2.0                                        # ... but only the two finished ones earn r_fmt
    assert s["reward"] == pytest.approx(s["r_fmt"] + s["r_acc"] + s["r_con"])


# ---- 7. an unparsed answer is never correct --------------------------------------------------------------------

OUTPUTS = [  # (output, the question's answer)
    ("<think>A nodule.</think><answer>C</answer>", "C"),            # parsed, right
    ("<think>A nodule.</think><answer>B</answer>", "C"),            # parsed, wrong
    ("", "A"),                                                      # nothing
    ("<think>Not sure.</think><answer>A or B</answer>", "A"),       # two letters: the parser refuses
    ("I cannot tell from this scan.", "B"),                         # no letter at all
    ("<answer></answer>", "D"),
]


def test_every_evaluated_record_is_correct_iff_its_prediction_is_the_answer(monkeypatch):
    items = [{"VolumeName": f"valid_{i}_a_1.nii.gz", "question": "Which?", "options": OPTIONS, "answer": a}
             for i, (_, a) in enumerate(OUTPUTS)]
    monkeypatch.setattr(E, "generate_all", lambda vlm, cache, jobs, *a, **kw:
                         [(o, True) for o, _ in OUTPUTS][:len(jobs)])
    args = Namespace(batch_size=2, max_new_tokens=8)
    for embed in (None, lambda texts: torch.tensor([[float(len(t) % 5), 1.0] for t in texts])):
        out = E.evaluate_mmvqa(None, None, items, embed, args, "test")
        for prompt in ("think", "no_think"):
            records = out[prompt]["records"]
            assert len(records) == len(OUTPUTS)
            for r in records:
                assert r["correct"] == (r["pred"] == r["answer"]), r
                assert r["pred"] is not None or not r["correct"], r
            assert out[prompt]["accuracy"] == pytest.approx(np.mean([r["pred"] == r["answer"] for r in records]))
        if embed is None:                                           # without an embedder four answers stay unparsed
            assert [r["pred"] for r in out["think"]["records"]] == ["C", "B", None, None, None, None]
            assert out["think"]["accuracy"] == pytest.approx(1 / 6)


# ---- 8. the RAM anchor is the mean over the tokenizer's vocabulary, not the padding rows -----------------------

def test_anchor_ignores_the_padding_rows_of_a_larger_embedding_matrix(llm_dir, tmp_path):
    llm, tok = AutoModelForCausalLM.from_pretrained(llm_dir), AutoTokenizer.from_pretrained(llm_dir)
    vocab = len(tok)
    llm.resize_token_embeddings(vocab + 100, mean_resizing=False)   # padded like Qwen2.5's (151936 rows, 151665 tokens)
    with torch.no_grad():
        llm.get_input_embeddings().weight[vocab:] = 1.0             # padding rows far from the real ones
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    rows = llm.get_input_embeddings().weight.detach()
    assert rows.shape[0] == vocab + 100
    vlm = M.VLM.build(tmp_path / "llm", vit_preset="tiny")
    torch.testing.assert_close(vlm.bridge.anchor, rows[:vocab].mean(0))
    assert not torch.allclose(vlm.bridge.anchor, rows.mean(0), atol=1e-3)
    torch.testing.assert_close(M.compute_anchor(llm, vocab), rows[:vocab].mean(0))


# ---- 9. a resumed run draws the random numbers of the uninterrupted one ----------------------------------------

def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_resume_restores_python_numpy_and_torch_random_state(tmp_path):
    runtime.seed_everything(0)
    run = runtime.Run(tmp_path, resume=False)
    straight = []
    for step in (1, 2, 3, 4):
        straight.append(draws())
        if step == 2:
            run.save(step, {})
    run.close()
    runtime.seed_everything(0)                                      # a new process: seeded, then the model built
    draws()
    resumed = runtime.Run(tmp_path, resume=True)
    assert resumed.start == 2
    again = [draws(), draws()]
    resumed.close()
    assert again == straight[2:]


@pytest.fixture(scope="module")
def sft_inputs(phantom_world, tmp_path_factory):
    llm = build_tiny_llm(phantom_texts(phantom_world), tmp_path_factory.mktemp("bugs_sft") / "llm", vocab_size=512,
                         hidden=32, layers=1, heads=2, kv_heads=1)
    torch.manual_seed(1)
    vit = M.save_vision_weights(M.ViT3D.from_preset("tiny"), tmp_path_factory.mktemp("bugs_vit") / "vit.safetensors")
    return phantom_world, str(llm), str(vit)


def test_a_resumed_sft_run_draws_the_random_numbers_of_the_uninterrupted_one(sft_inputs, tmp_path, monkeypatch):
    world, llm, vit = sft_inputs
    seen, real_step = [], sft.train_step

    def drawing_step(*a, **kw):                                     # a step that uses every global RNG
        seen.append(draws())
        return real_step(*a, **kw)
    monkeypatch.setattr(sft, "train_step", drawing_step)

    def argv(out, *extra):
        return ["--data-root", str(world["root"]), "--llm", llm, "--vision-weights", vit, "--out", str(out),
                "--batch-size", "2", "--max-steps", "4", "--log-every", "1", "--feature-stats", "2", *extra]
    sft.main(argv(tmp_path / "a"))
    straight, seen[:] = list(seen), []
    first = sft.main(argv(tmp_path / "b", "--stop-at", "2"))
    assert first["interrupted"] and seen == straight[:2]
    seen[:] = []
    sft.main(argv(tmp_path / "b", "--resume"))
    assert len(straight) == 4 and seen == straight[2:]
