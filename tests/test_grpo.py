"""Tests for grpo.py: rewards on adversarial completions, the loss against a hand computation, the training loop."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ChatEndpoint, curve_points
import data
import grpo
import model
from phantom.llm import build_tiny_llm, phantom_texts
from grpo import (accuracy_reward, discretise, format_reward, group_advantages, grpo_loss, make_consistency_scorer,
                  offline_consistency, parse_answer)

OPTIONS = {"A": "Emphysema", "B": "Atelectasis", "C": "Pleural effusion", "D": "Cardiomegaly"}
GOOD = "<think>Fluid in the pleural space.</think><answer>C</answer>"

# (completion, format, accuracy for key "C")
BATTERY = [
    (GOOD, 1.0, 1.0),
    ("  <think>\nFluid.\n</think>\n<answer> C </answer>\n", 1.0, 1.0),            # white space outside is fine
    ("<think>x</think><answer>c</answer>", 1.0, 1.0),                            # lower case
    ("<think>x</think><answer>(C)</answer>", 1.0, 1.0),                          # brackets
    ("<think>x</think><answer>[C]</answer>", 1.0, 1.0),
    ("<think>x</think><answer>C) Pleural effusion</answer>", 1.0, 1.0),          # letter + its own option text
    ("<think>x</think><answer>C) Emphysema</answer>", 1.0, 0.0),                 # letter + another option's text
    ("<think>x</think><answer>A or B</answer>", 1.0, 0.0),                       # two letters
    ("<think>x</think><answer>C or D</answer>", 1.0, 0.0),                       # two letters, one correct
    ("<think>x</think><answer>B, C</answer>", 1.0, 0.0),
    ("<think>x</think><answer>CD</answer>", 1.0, 0.0),
    ("<think>x</think><answer>B</answer>", 1.0, 0.0),                            # wrong letter
    ("<think>x</think><answer></answer>", 0.0, 0.0),                             # empty answer
    ("<think>x</think><answer>   </answer>", 0.0, 0.0),
    ("<think></think><answer>C</answer>", 0.0, 1.0),                             # empty think
    ("<think>x</think><answer>C</answer><answer>C</answer>", 0.0, 0.0),          # two answer blocks
    ("<think>x</think><think>y</think><answer>C</answer>", 0.0, 1.0),            # two think blocks
    ("<answer>C</answer><think>x</think>", 0.0, 1.0),                            # wrong order
    ("The answer is C", 0.0, 0.0),                                               # no tags
    ("C", 0.0, 0.0),
    ("<think>x</think><answer>C</answer> because of fluid", 0.0, 1.0),           # text after </answer>
    ("Sure. <think>x</think><answer>C</answer>", 0.0, 1.0),                      # text before <think>
    ("<think>x <finding>fluid</finding></think><answer>C</answer>", 0.0, 1.0),   # unknown tag inside
    ("<think>x</think><answer>C</answer><foo>", 0.0, 1.0),                       # unknown tag outside
    ("<think>x</think><answer><b>C</b></answer>", 0.0, 0.0),
    ("<think>x</think><answer>C", 0.0, 0.0),                                     # truncated answer
    ("<think>size < 3 cm</think><answer>C</answer>", 1.0, 1.0),                  # a '<' is not a tag
]


@pytest.mark.parametrize("completion,fmt,acc", BATTERY)
def test_reward_battery(completion, fmt, acc):
    assert format_reward(completion) == fmt
    assert accuracy_reward(completion, "C", OPTIONS) == acc


def test_answer_only_format_reward():
    """Asked without <think>, the format is one non-empty answer block alone."""
    assert grpo.answer_only_reward("<answer>C</answer>") == grpo.answer_only_reward(" <answer> C </answer>\n") == 1.0
    for bad in (GOOD, "C", "<answer></answer>", "<answer> </answer>", "<answer>\n</answer>",
                "<answer>C</answer> because", "<answer>C</answer><answer>C</answer>", "<answer> C",
                "<answer>C<b></answer>"):
        assert grpo.answer_only_reward(bad) == 0.0


def test_parse_answer():
    assert parse_answer(GOOD) == "C"
    assert parse_answer("<answer> d. </answer>") == "D"
    assert parse_answer("B") == "B" and parse_answer("(b)") == "B"            # no tags: a lone letter
    assert parse_answer("<think>fluid, so C</think> C") == "C" and parse_answer("<think>C</think>") is None
    assert parse_answer("Cardiomegaly") is None and parse_answer("A or B") is None
    assert parse_answer("<answer>C) Pleural effusion</answer>") == "C"        # without options: no other letter
    assert parse_answer("<answer>C) a nodule</answer>") is None               # "a" could be option A: refuse
    assert parse_answer("<answer>C) Pleural effusion.</answer>", options=OPTIONS) == "C"
    assert parse_answer("<answer>C) Atelectasis</answer>", options=OPTIONS) is None
    assert parse_answer("<answer>E</answer>") is None and parse_answer("<answer>E</answer>", letters="ABCDE") == "E"
    assert accuracy_reward("C", "C") == 0.0                                    # reward needs the answer block
    assert parse_answer("<answer>\u212a</answer>", options={**OPTIONS, "K": "x"}) is None   # the Kelvin sign: "k"
    assert parse_answer("<answer>\n  ( b )\n\n</answer>") == "B"          # white space on both sides of a bracket


# --------------------------------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------------------------------

REPORT = ("Findings: Centrilobular emphysema in both upper lobes. Coronary artery wall calcification. "
          "No pleural or pericardial effusion. Impression: Emphysema. Pleural effusion is not seen.")


def test_clinical_stances():
    s = data.clinical_stances("No pleural effusion. There is emphysema and no nodule; consolidation is not seen, "
                              "but coronary artery wall calcification is present. Cardiomegaly? No cardiomegaly.")
    assert s == {"Pleural effusion": "deny", "Emphysema": "affirm", "Lung nodule": "deny", "Consolidation": "deny",
                 "Coronary artery wall calcification": "affirm", "Cardiomegaly": "both"}
    s = data.clinical_stances("Pleural effusion cannot be ruled out. Consolidation was ruled out. A nodule is not "
                              "excluded.")   # a finding left possible is raised
    assert s == {"Pleural effusion": "affirm", "Consolidation": "deny", "Lung nodule": "affirm"}


def test_offline_consistency_scores():
    # report affirms {Emphysema, Coronary artery wall calcification}
    assert offline_consistency("Emphysema and coronary artery wall calcification; no pleural effusion.", REPORT) == 1.0
    assert offline_consistency("Emphysema. No pleural effusion.", REPORT) == 2 / 3        # missed the calcification
    assert offline_consistency("Pleural effusion and emphysema.", REPORT) == 1 / 2          # one wrong, one missed
    assert offline_consistency("No emphysema.", REPORT) == 0.0
    assert offline_consistency("The scan looks interesting.", REPORT) == 0.0                # nothing clinical
    # denials alone, each true, find none of the report's findings: nothing to gain from listing them
    denials = "No pleural effusion, cardiomegaly, nodule, consolidation, atelectasis or bronchiectasis."
    assert offline_consistency(denials, REPORT) == 0.0
    assert offline_consistency(denials, "No pleural effusion. The heart is normal.") == 1.0  # a report without findings


def test_discretise_spec_thresholds():
    th, lv = grpo.CON_DEFAULTS["rm"]
    got = [discretise(s, th, lv) for s in (-0.5, 0.0, 0.1, 0.2, 0.49, 0.5, 0.99, 1.0, 1.59, 1.6, 9.0)]
    assert got == [0.0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8, 1.0, 1.0]


def test_offline_scorer_levels():
    score = make_consistency_scorer("offline")
    got = score(["Emphysema and coronary artery wall calcification.", "Emphysema. No pleural effusion.",
                 "Pleural effusion, cardiomegaly and emphysema.", "", "No emphysema."], [REPORT] * 5)
    assert got == [1.0, 0.8, 0.5, 0.0, 0.0]
    score = make_consistency_scorer("offline", thresholds=[0.5], levels=[0.0, 1.0])
    assert score(["Emphysema. No pleural effusion."], [REPORT]) == [1.0]
    assert make_consistency_scorer("none")(["Emphysema and coronary artery wall calcification."], [REPORT]) == [0.0]
    with pytest.raises(ValueError):
        make_consistency_scorer("bogus")
    with pytest.raises(ValueError, match="--con-thresholds and --con-levels .*--consistency none has none"):
        make_consistency_scorer("none", thresholds=[0.5], levels=[0.0, 5.0])      # never ignored silently
    for thresholds, levels in (([0.5, 0.25], [0.0, 0.5, 1.0]), ([0.5], [0.0, 0.5, 1.0]), ([0.25, 0.5], [0.0, 1.0])):
        with pytest.raises(ValueError, match="--con-thresholds .* must ascend and be one fewer than --con-levels"):
            make_consistency_scorer("offline", thresholds=thresholds, levels=levels)   # at build time, not mid-run


def test_rm_scorer_tiny_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(REPORT.lower().replace(".", " ").split()))
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    rm = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=1))
    rm.save_pretrained(tmp_path), tok.save_pretrained(tmp_path)
    thinks = ["emphysema", "no pleural effusion", ""]
    with torch.no_grad():
        raw = [rm.eval()(**tok(grpo.RM_QUESTION.format(report=REPORT) + "\n" + t, return_tensors="pt")).logits[0, 0]
               for t in thinks[:2]]
    th, lv = [-100.0, float(raw[0] + raw[1]) / 2], [0.0, 0.5, 1.0]    # the two thinks fall in different levels
    score = make_consistency_scorer(f"rm:{tmp_path}", thresholds=th, levels=lv)
    expected = [discretise(float(r), th, lv) for r in raw] + [0.0]     # no think: 0 without calling the model
    assert score(thinks, [REPORT] * 3) == expected and sorted(expected[:2]) == [0.5, 1.0]


def test_rm_scorer_reads_the_chat_template_with_one_bos(tmp_path):
    """A reward model with a chat template (RM-Mistral-7B's starts with the BOS token) must see the templated text as
    it was trained on it: the template's own BOS, not a second one added by the tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(REPORT.lower().replace(".", " ").split()))
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tok = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"), bos_token="[CLS]")
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(0)
    rm = BertForSequenceClassification(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=1)).eval()
    rm.save_pretrained(tmp_path), tok.save_pretrained(tmp_path)
    text = tok.apply_chat_template([{"role": "user", "content": grpo.RM_QUESTION.format(report=REPORT)},
                                    {"role": "assistant", "content": "emphysema"}], tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    assert ids["input_ids"][0, 0] == 2 and (ids["input_ids"] == 2).sum() == 1     # the template's one [CLS]
    with torch.no_grad():
        raw = float(rm(**ids).logits[0, 0])
    score = make_consistency_scorer(f"rm:{tmp_path}", thresholds=[raw - 1e-4, raw + 1e-4], levels=[0.0, 0.5, 1.0])
    assert score(["emphysema"], [REPORT]) == [0.5]                       # the raw score of exactly that input


def test_model_scorers_need_a_local_directory_or_an_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")     # were the name tried on the Hub, this would fail differently
    with pytest.raises(FileNotFoundError, match="rm:weqweasdas/RM-Mistral-7B is not a local model directory"):
        make_consistency_scorer("rm:weqweasdas/RM-Mistral-7B")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        make_consistency_scorer(f"rm:{tmp_path}")                       # a directory without a model
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match=r"\$OPENAI_BASE_URL"):
        make_consistency_scorer("judge:deepseek-chat")


@pytest.fixture
def judge_at(monkeypatch):
    """start(replies): a local endpoint, which $OPENAI_BASE_URL then names, giving `replies` in turn: a str is the
    reply's text, an int an HTTP error status (400: one the client does not retry)."""
    servers = []

    def start(replies):
        replies = list(replies)
        servers.append(ChatEndpoint(lambda body: (r, "bad request") if isinstance(r := replies.pop(0), int)
                                    else (200, r)))
        monkeypatch.setenv("OPENAI_BASE_URL", servers[-1].url)
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def test_a_judge_scorer_without_an_endpoint_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)   # grpo.py has no URL flag: the message names no flag
    with pytest.raises(ValueError, match=r"--consistency judge:m needs the endpoint's URL in \$OPENAI_BASE_URL"):
        make_consistency_scorer("judge:m")


def test_judge_scorer(judge_at, monkeypatch):
    """GRPO's `judge:` scorer against a real endpoint: replies 0-10 become levels; a failed request or an unparseable
    reply stops the run, or with judge_failures="exclude" gives NaN; an empty <think> asks nothing."""
    judge_at(["7", " 10 ", "1"])
    score = make_consistency_scorer("judge:some-model")
    assert score(["a", "b", "c"], [REPORT] * 3) == [0.8, 1.0, 0.0]
    judge = judge_at(["9", 400, "maybe"])
    score = make_consistency_scorer("judge:m", judge_failures="exclude")
    got = score(["a", "b", "c", ""], [REPORT] * 4)
    assert got[0] == 0.8 and math.isnan(got[1]) and math.isnan(got[2]) and got[3] == 0.0 and len(judge.requests) == 3
    judge_at([400])
    with pytest.raises(RuntimeError, match="judge 'm' failed: BadRequestError"):
        make_consistency_scorer("judge:m")(["a"], [REPORT])
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")       # nothing listens: after the client's retries
    with pytest.raises(RuntimeError, match="judge 'm' failed: APIConnectionError after 4 attempts"):
        make_consistency_scorer("judge:m")(["a"], [REPORT])


# --------------------------------------------------------------------------------------------------------------------
# Advantages and loss
# --------------------------------------------------------------------------------------------------------------------

def test_group_advantages():
    r = torch.tensor([1.8, 1.8, 1.8, 1.8, 0.0, 1.0, 2.0, 3.0, 0.7, 0.7, 0.7, 0.7])
    adv = group_advantages(r, 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and torch.equal(adv[8:], torch.zeros(4))
    std = math.sqrt(((1.5 ** 2 + 0.5 ** 2) * 2) / 3)                        # unbiased std of 0,1,2,3
    expected = torch.tensor([(x - 1.5) / (std + 1e-4) for x in (0, 1, 2, 3)])
    assert torch.allclose(adv[4:8], expected, atol=1e-6)


def hand_loss(logp, old, ref, adv, mask, eps, beta):
    """Scalar re-computation of the GRPO loss and its gradient with respect to logp, token by token."""
    B, T = len(logp), len(logp[0])
    loss, grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        n = sum(mask[i])
        for t in range(T):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
            unclipped_is_min = ratio * adv[i] <= clipped_ratio * adv[i]
            kl = math.exp(ref[i][t] - logp[i][t]) - (ref[i][t] - logp[i][t]) - 1
            loss += (-min(ratio * adv[i], clipped_ratio * adv[i]) + beta * kl) / n / B
            d_pg = -ratio * adv[i] if unclipped_is_min else 0.0          # clipped branch is constant in logp
            d_kl = beta * (1 - math.exp(ref[i][t] - logp[i][t]))
            grad[i][t] = (d_pg + d_kl) / n / B
    return loss, grad


def test_grpo_loss_matches_hand_computation():
    logp = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -3.0]]
    old = [[-1.1, -0.9, -2.0, -0.1], [-0.3, -0.9, -0.2, -3.0]]
    ref = [[-1.2, -0.4, -1.5, -5.0], [-0.2, -1.0, -0.9, -1.0]]
    adv, mask = [1.5, -0.8], [[1, 1, 1, 0], [1, 1, 1, 1]]
    eps, beta = 0.2, 0.04
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(lp, torch.tensor(old, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                            torch.tensor(adv, dtype=torch.float64), torch.tensor(mask), eps, beta)
    loss.backward()
    want_loss, want_grad = hand_loss(logp, old, ref, adv, mask, eps, beta)
    assert loss.item() == pytest.approx(want_loss, abs=1e-12)
    assert torch.allclose(lp.grad, torch.tensor(want_grad, dtype=torch.float64), atol=1e-12)
    assert lp.grad[0, 3] == 0                                               # masked token: no gradient
    # clipped: row 0 t=1 (ratio e^.4 > 1.2, A > 0); row 1 t=1, t=2 (e^-.3, e^-.5 < 0.8, A < 0): 1 of 3, 2 of 4
    assert stats["clip_frac"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    kl = [[math.exp(r - l) - (r - l) - 1 for r, l in zip(rr, ll)] for rr, ll in zip(ref, logp)]
    assert stats["kl"] == pytest.approx((sum(kl[0][:3]) / 3 + sum(kl[1]) / 4) / 2)


def test_grpo_loss_on_policy_value_and_token_mean():
    """mu = 1: ratio = 1, so the surrogate's value is -mean(A) (zero for group-normalised A) and only KL remains."""
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    adv = group_advantages(torch.tensor([0.0, 1.0, 2.0, 2.0]), 4)
    mask = torch.ones(4, 5)
    loss, stats = grpo_loss(logp, logp, logp, adv, mask)
    assert loss.abs().item() < 1e-6 and stats["kl"] == 0 and stats["clip_frac"] == 0
    mask[0, 2:] = 0
    loss_tok, _ = grpo_loss(logp, logp, logp, torch.tensor([1.0, 0.0, 0.0, 0.0]), mask, reduction="token")
    assert loss_tok.item() == pytest.approx(-2 / 17)                        # 2 of 17 masked-in tokens carry A = 1


def test_grpo_loss_ignores_what_lies_under_the_mask():
    """Past EOS the targets are padding, blocked at -1e9: policy and reference log-probs there may differ by more
    than exp() can take. The loss and its gradient depend on the masked-in tokens only."""
    torch.manual_seed(1)
    logp, old, ref = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), torch.randn(
        3, 6, dtype=torch.float64)
    mask, adv = torch.ones(3, 6), torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    mask[:, 4:] = 0
    wild_logp, wild_ref = logp.clone(), ref.clone()
    wild_logp[:, 4:], wild_ref[:, 4:] = -1e9, 0.0                           # exp(ref - logp) = inf there
    for reduction in ("sequence", "token"):
        a, b = logp.clone().requires_grad_(), wild_logp.clone().requires_grad_()
        loss_a, stats_a = grpo_loss(a, old, ref, adv, mask, reduction=reduction)
        loss_b, stats_b = grpo_loss(b, old, wild_ref, adv, mask, reduction=reduction)
        loss_a.backward(), loss_b.backward()
        assert loss_b.item() == loss_a.item() and stats_b == stats_a
        assert torch.equal(a.grad, b.grad)


def test_completion_mask_through_first_eos_and_placeholder_cut():
    EOS, PAD, IMG = 2, 0, 9
    completion = torch.tensor([[5, 6, EOS, PAD], [5, 6, 7, 8], [5, IMG, 7, EOS], [EOS, PAD, PAD, PAD]])
    lengths, finished = torch.tensor([3, 4, 4, 1]), torch.tensor([True, False, True, True])
    ids, lengths, finished, mask = grpo.completion_mask(completion, lengths, finished, IMG, PAD)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]     # EOS itself is trained on
    assert lengths.tolist() == [3, 4, 1, 1] and finished.tolist() == [True, False, False, True]
    assert ids[2].tolist() == [5, PAD, PAD, PAD] and torch.equal(ids[[0, 1, 3]], completion[[0, 1, 3]])


def test_group_advantages_are_exactly_zero_for_equal_rewards_of_any_group_size():
    """Choice 3: a group whose rewards are all equal carries no signal. In float32 the mean of G equal rewards can be
    off by one ulp (1.8 over G = 3), which divided by std + 1e-4 would push every completion by ~1e-3."""
    for G in (3, 6, 7, 8):
        for value in (0.8, 1.3, 1.8, 2.6, 2.8):                           # r_fmt + r_acc + r_con sums
            r = torch.tensor([value] * G + [0.0] * (G - 1) + [1.0])
            adv = group_advantages(r, G)
            assert torch.equal(adv[:G], torch.zeros(G)), (G, value)
            assert adv[G:].abs().sum() > 0                                  # the mixed group still has a signal


def test_consistency_scores_each_rationale_against_its_own_report():
    """Completions without a <think> text are skipped (0), and the rest must still be paired with their own scan's
    report, not with the reports of the rows before them."""
    other = "Findings: Pleural effusion on the left. No emphysema."
    score = make_consistency_scorer("offline")
    thinks = ["", "Emphysema and coronary artery wall calcification.", "", "Pleural effusion."]
    reports = [other, REPORT, REPORT, other]
    # REPORT affirms the emphysema and the calcification the second rationale names (level 1.0); `other` affirms the
    # effusion the last one names (1.0); crossed, each rationale agrees with nothing its report affirms (0.0)
    assert score(thinks, reports) == [0.0, 1.0, 0.0, 1.0]
    assert score([thinks[1], thinks[3]], [other, REPORT]) == [0.0, 0.0]


def test_row_logprobs_score_at_the_sampling_temperature():
    """Choice 1: completions are scored at the temperature they were sampled at, each row with its own question's
    image (rows are question-major, G per question; a micro-batch may start inside a group)."""
    calls = []

    class Stub:
        def image_embeds(self, x):
            return x * 10.0

        def token_logprobs(self, input_ids, attention_mask, image, temperature, last):
            calls.append((input_ids, image, temperature, last))
            return torch.zeros(input_ids.shape[0], last)

    G, x = 3, torch.arange(2.0).view(2, 1, 1)                              # question q's "volume" is q
    args = argparse.Namespace(group_size=G, temperature=0.7)
    ids = torch.arange(2 * G).view(-1, 1).expand(-1, 5)
    grpo.row_logprobs(Stub(), x, ids, torch.ones_like(ids), slice(2, 5), 4, args)
    rows, image, temperature, last = calls[-1]
    assert temperature == 0.7 and last == 4
    assert rows[:, 0].tolist() == [2, 3, 4] and image.flatten().tolist() == [0.0, 10.0, 10.0]  # q0, q1, q1


def test_rank_questions_cover_an_epoch_in_disjoint_batches_split_over_ranks(monkeypatch):
    """Each step takes the next global batch of a seeded permutation, no question repeats within an epoch, the next
    epoch draws a new order, and 2 ranks take disjoint halves of the batch 1 rank takes."""
    n, batch = 11, 4
    per_epoch = n // batch
    epoch = lambda e: [grpo.rank_questions(n, batch, 3, e * per_epoch + k) for k in range(per_epoch)]
    first = epoch(0)
    assert all(len(b) == batch for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == len(flat) == per_epoch * batch and set(flat) <= set(range(n))
    assert epoch(1) != first and epoch(0) == first                          # reshuffled, yet a function of the step
    assert all(len(b) == batch for b in epoch(1))
    monkeypatch.setattr(grpo, "world_size", lambda: 2)
    for step in range(per_epoch):
        shares = []
        for rank in range(2):
            monkeypatch.setattr(grpo, "get_rank", lambda: rank)
            shares.append(grpo.rank_questions(n, batch, seed=3, step=step))
        assert [len(s) for s in shares] == [2, 2] and sorted(shares[0] + shares[1]) == sorted(first[step])


# --------------------------------------------------------------------------------------------------------------------
# The training loop: a tiny VLM and a stand-in accuracy reward that varies within a group (an untrained LLM never
# writes a correct answer), so that advantages are non-zero and the policy-gradient path runs
# --------------------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
DRIVER = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import grpo
grpo.accuracy_reward = lambda completion, answer, options=None: float(len(completion) % 3 == 0)
grpo.main(sys.argv[1:])
"""


def stand_in_accuracy(completion, answer, options=None):
    return float(len(completion) % 3 == 0)


@pytest.fixture(scope="module")
def sft_ckpt(phantom_world, tmp_path_factory):
    """A small untrained VLM saved like runs/sft/vlm."""
    tmp = tmp_path_factory.mktemp("grpo_sft")
    llm = build_tiny_llm(phantom_texts(phantom_world), tmp / "llm", hidden=64, layers=2, heads=2,
                               kv_heads=1)
    torch.manual_seed(0)
    return str(model.VLM.build(llm, vit_preset="tiny").save(tmp / "vlm", meta={"stage": "sft"}))


def run_args(world, sft, out, *extra):
    return ["--data-root", str(world["root"]), "--sft", sft, "--out", str(out), "--steps", "4", "--batch-size", "2",
            "--max-new-tokens", "12", "--lr", "1e-3", "--eval-every", "0", "--save-every", "0", "--no-freeze-encoder",
            *map(str, extra)]


def test_presets_choose_what_trains():
    """The paper's setting trains the whole model; the phantom one keeps the ViT frozen (grpo.py choice 6)."""
    assert grpo.parse_args(["--preset", "real"]).freeze_encoder is False
    assert grpo.parse_args([]).freeze_encoder is True
    assert grpo.parse_args(["--no-freeze-encoder"]).freeze_encoder is False


def trained_state(out):
    return model.VLM.load(Path(out) / "vlm").state_dict()


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "sec"} for r in rows]


def test_resume_replays_exactly(phantom_world, sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "accuracy_reward", stand_in_accuracy)
    full = grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "a"))
    rows = full["history"]
    assert len(rows) == 4 and all(r["grad_norm"] > 0 for r in rows) and rows[-1]["kl"] > 0
    assert any(r["zero_std_frac"] < 1 for r in rows)                        # some groups carry a signal
    first = grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "b", "--stop-at", 2))
    assert first["interrupted"] and first["step"] == 2 and not (tmp_path / "b" / "vlm").exists()
    rest = grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "b", "--resume"))
    assert without_time(rest["history"]) == without_time(rows[2:])
    a, b = trained_state(tmp_path / "a"), trained_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sft = model.VLM.load(sft_ckpt).state_dict()
    assert not torch.equal(a["vit.patch_embed.proj.weight"], sft["vit.patch_embed.proj.weight"])  # whole model trains
    assert torch.equal(a["bridge.anchor"], sft["bridge.anchor"])                                    # anchor frozen
    meta = json.loads((tmp_path / "a" / "vlm" / "config.json").read_text())["meta"]
    assert meta["stage"] == "grpo" and meta["sft"] == {"stage": "sft"}


def test_truncation_freeze_encoder_and_logs(phantom_world, sft_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(grpo, "accuracy_reward", stand_in_accuracy)
    out = grpo.main(run_args(phantom_world, sft_ckpt, tmp_path, "--steps", 1, "--max-new-tokens", 3,
                             "--freeze-encoder", "--eval-every", 1, "--eval-n", 4))
    row = out["history"][-1]
    assert row["truncated"] == 1.0 and row["r_fmt"] == 0.0 and row["completion_len"] == 3.0   # no EOS in 3 tokens
    for key in ("reward", "r_acc", "r_con", "reward_std", "zero_std_frac", "kl", "clip_frac", "grad_norm", "sample",
                "val_acc", "val_format"):
        assert key in row
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1] and "val_acc" in logged[0]
    assert curve_points(tmp_path / "curves.png") == {"reward": 1, "r_fmt": 1, "r_acc": 1, "r_con": 1, "reward_std": 1,
                                                     "kl": 1, "completion_len": 1, "truncated": 1, "val_acc": 2}
    trained, sft = trained_state(tmp_path), model.VLM.load(sft_ckpt).state_dict()
    assert all(torch.equal(trained[k], sft[k]) for k in trained if k.startswith("vit."))
    assert not torch.equal(trained["bridge.proj.weight"], sft["bridge.proj.weight"])


def test_no_think_share_of_the_rl_questions(phantom_world, sft_ckpt, tmp_path, monkeypatch):
    """--no-think-frac asks that share of the questions without <think> (the same draw on every rank), each graded
    by the answer-only format; 0 asks every question with <think>."""
    asked, prompt = [], data.mmvqa_prompt
    monkeypatch.setattr(data, "mmvqa_prompt", lambda item, think=True: asked.append(think) or prompt(item, think))
    n_rl = len(data.read_questions(data.paths(phantom_world["root"])["mmvqa_rl"]))
    grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "a", "--steps", 2))
    assert asked == [True] * (n_rl + 4)      # the prompt-length check at the start, then 2 steps of 2 questions
    asked.clear()
    grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "b", "--steps", 2, "--no-think-frac", 1))
    assert asked == [False] * (n_rl + 4)
    draws = [grpo.asks_think(0, step, q, 0.5) for step in range(50) for q in range(8)]
    assert 0.4 < sum(draws) / len(draws) < 0.6 and draws == [grpo.asks_think(0, s, q, 0.5) for s in range(50)
                                                              for q in range(8)]


def test_a_question_asked_without_think_earns_no_consistency_reward(phantom_world, sft_ckpt, tmp_path, monkeypatch):
    """A rationale the no-think prompt did not ask for is not scored: r_con would otherwise win back the format
    reward the completion lost by writing it."""
    seen, make = [], grpo.make_consistency_scorer
    monkeypatch.setattr(grpo, "make_consistency_scorer", lambda *a, **k: (
        lambda thinks, reports: seen.append(thinks) or make(*a, **k)(thinks, reports)))
    completion = "<think>Pleural effusion.</think><answer>A</answer>"    # whatever the prompt asked for
    monkeypatch.setattr(grpo, "decode", lambda tokenizer, ids, *a: [completion] * len(ids))
    for frac, rationale in ((0, "Pleural effusion."), (1, "")):
        seen.clear()
        grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / str(frac), "--steps", 1, "--no-think-frac", frac))
        assert seen == [[rationale] * 2 * 4]                   # 2 questions x G = 4


def test_prompts_over_the_length_limit_stop_the_run_at_the_start(phantom_world, sft_ckpt, tmp_path):
    """--max-prompt-len (the official 1024): a prompt over it stops the run before any step, naming how many questions
    and the first; only the variants that can be asked count (the no-think prompt is shorter than the think one)."""
    vlm, paths = model.VLM.load(sft_ckpt), data.paths(phantom_world["root"])
    qs = data.read_questions(paths["mmvqa_rl"])
    n_ids = lambda q, think: vlm.tokenize([vlm.prompt(data.mmvqa_prompt(q, think=think))])[0].shape[1]
    think, plain = [n_ids(q, True) for q in qs], [n_ids(q, False) for q in qs]
    assert all(t > p for t, p in zip(think, plain))
    limit = sorted(think)[len(qs) // 2]                                    # about half the questions are over it
    over = [i for i, n in enumerate(think) if n > limit]
    with pytest.raises(SystemExit, match=rf"{paths['mmvqa_rl']}: {len(over)} of {len(qs)} questions have a prompt "
                       rf"over --max-prompt-len {limit} tokens \(the first: {qs[over[0]]['VolumeName']}, "
                       rf"{think[over[0]]} tokens\); raise --max-prompt-len or leave these questions out"):
        grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "a", "--max-prompt-len", limit))
    assert not (tmp_path / "a").exists()                                   # stopped before anything was written
    fits = grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "b", "--steps", 1, "--no-think-frac", 1,
                              "--max-prompt-len", max(plain)))             # no question is asked with <think>
    assert fits["step"] == 1
    with pytest.raises(SystemExit, match=f"{sum(n > max(plain) for n in think)} of {len(qs)} questions"):
        grpo.main(run_args(phantom_world, sft_ckpt, tmp_path / "c", "--steps", 1, "--no-think-frac", 0.5,
                           "--max-prompt-len", max(plain)))                # some are: their think prompt is too long


def test_sigterm_saves_and_exits(phantom_world, sft_ckpt, tmp_path, monkeypatch):
    def format_then_sigterm(completion):              # the real signal, delivered mid-step
        os.kill(os.getpid(), signal.SIGTERM)
        return 0.0
    monkeypatch.setattr(grpo, "format_reward", format_then_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        out = grpo.main(run_args(phantom_world, sft_ckpt, tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert out["interrupted"] and out["step"] == 1 and (tmp_path / "ckpt" / "step_00000001" / "state.pt").is_file()
    assert not (tmp_path / "vlm").exists() and curve_points(tmp_path / "curves.png")["reward"] == 1  # curves so far


def rl_questions(phantom_world, n: int) -> tuple[data.VolumeCache, list[dict]]:
    """The training volumes and the first n RL questions, each with its scan's findings as "report"."""
    volumes = data.VolumeCache(phantom_world["train_cache"])
    qs = [q for q in data.read_questions(phantom_world["mmvqa_rl"]) if q["VolumeName"] in volumes][:n]
    reports = {name: r["findings"] for name, r in data.read_reports(phantom_world["train_reports"]).items()}
    return volumes, [{**q, "report": reports[q["VolumeName"]]} for q in qs]


def test_the_reward_is_the_sum_of_format_accuracy_and_consistency(phantom_world, sft_ckpt, monkeypatch):
    """r = r_fmt + r_acc + r_con, each with weight 1, and a completion cut at --max-new-tokens earns no format reward
    (rewards stood in by constants, so that each term's share of the logged sums is known)."""
    for name, value in (("format_reward", 0.25), ("answer_only_reward", 0.25), ("accuracy_reward", 0.5)):
        monkeypatch.setattr(grpo, name, lambda *a, value=value: value)
    volumes, qs = rl_questions(phantom_world, 2)
    args = grpo.parse_args(run_args(phantom_world, sft_ckpt, "unused", "--max-new-tokens", 256))
    vlm, ref = model.VLM.load(sft_ckpt).eval(), model.VLM.load(sft_ckpt).eval().requires_grad_(False)
    out = grpo.train_step(grpo.PolicyLogprobs(vlm), ref, torch.optim.SGD(vlm.parameters(), lr=0.1), qs,
                          volumes.batch(q["VolumeName"] for q in qs), lambda thinks, reports: [0.125] * len(thinks),
                          args, 0, [0, 1])
    s = out["sums"]
    assert s["n"] == 2 * args.group_size and s["r_acc"] == 0.5 * s["n"] and s["r_con"] == 0.125 * s["n"]
    assert s["r_fmt"] == 0.25 * (s["n"] - s["truncated"])
    assert s["reward"] == pytest.approx(s["r_fmt"] + s["r_acc"] + s["r_con"])


def test_micro_batches_and_grad_checkpointing_give_the_one_pass_update(phantom_world, sft_ckpt, monkeypatch):
    """--micro-batch 2 and 3 (3 splits the groups of G = 4 unevenly) and --grad-ckpt: the same policy, reference and
    old-policy log-probs, loss and gradients as one pass over all 8 rows, for both loss reductions, so the same
    weights after one step of mu = 2 policy iterations (SGD, so that the weights show the gradients themselves)."""
    monkeypatch.setattr(grpo, "accuracy_reward", stand_in_accuracy)
    volumes, qs = rl_questions(phantom_world, 2)
    start = model.VLM.load(sft_ckpt).state_dict()

    def step(*extra):
        args = grpo.parse_args(run_args(phantom_world, sft_ckpt, "unused", "--mu", 2, "--no-grad-ckpt", *extra))
        vlm, ref = model.VLM.load(sft_ckpt).eval(), model.VLM.load(sft_ckpt).eval().requires_grad_(False)
        vlm.set_grad_checkpointing(args.grad_ckpt)
        sgd, score = torch.optim.SGD(vlm.parameters(), lr=0.1), make_consistency_scorer("offline")
        x = volumes.batch(q["VolumeName"] for q in qs)
        out = grpo.train_step(grpo.PolicyLogprobs(vlm), ref, sgd, qs, x, score, args, 0, [0, 1])
        return out, {n: p.detach() for n, p in vlm.named_parameters()}

    for reduction in ("sequence", "token"):
        base, weights = step("--loss-reduction", reduction)
        assert base["sums"]["reward_std"] > 0 and all(not torch.equal(weights[n], start[n]) for n in weights)
        for extra in (["--micro-batch", 2], ["--micro-batch", 3], ["--micro-batch", 3, "--grad-ckpt"]):
            out, w = step("--loss-reduction", reduction, *extra)
            assert out["texts"] == base["texts"] and out["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
            for key in ("loss", "kl", "clip_frac"):
                assert out["sums"][key] == pytest.approx(base["sums"][key], rel=1e-5, abs=1e-8), (extra, key)
            assert all(torch.allclose(w[n], weights[n], rtol=0, atol=1e-6) for n in w), extra  # moved by up to 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_one_and_two_processes_agree(phantom_world, sft_ckpt, tmp_path, reduction):
    """2 ranks x 1 question (gloo) = 1 rank x 2 questions: same samples, rewards and weights; the 2 ranks run their 4
    rows in micro-batches of 3 and 1 (DDP accumulates the first without synchronising). With the token mean, the
    ranks' completions differ in length: each token weighs the same on 1 and on 2 ranks."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = run_args(phantom_world, sft_ckpt, tmp_path / "one", "--steps", 2, "--loss-reduction", reduction)
    two = run_args(phantom_world, sft_ckpt, tmp_path / "two", "--steps", 2, "--batch-size", 1, "--micro-batch", 3,
                   "--loss-reduction", reduction)
    subprocess.run([sys.executable, str(driver), *one], check=True, env=env, capture_output=True)
    ran = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(driver), *two], check=True, env=env, capture_output=True, text=True)
    assert "Grad strides do not match" not in ran.stderr      # DDP copies no gradient (one ViT volume per forward)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) > 0                                 # zip below would hide a short run
    for r1, r2 in zip(*rows):
        assert r1["sample"] == r2["sample"]
        for key in ("reward", "r_fmt", "r_acc", "r_con", "completion_len", "zero_std_frac", "kl", "grad_norm"):
            assert r1[key] == pytest.approx(r2[key], rel=1e-4, abs=1e-6), key
    a, b = trained_state(tmp_path / "one"), trained_state(tmp_path / "two")
    # summation order differs across ranks; Adam can magnify a float-noise gradient into up to lr = 1e-3 per step,
    # so allow a tenth of one step
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_the_largest_seed_seeds_every_sample():
    """--seed up to 2**31 - 1 (the command line's bound): each question's generator seed stays within torch's range."""
    assert 0 <= grpo.sample_seed(2**31 - 1, 10**6, 10**6) < 2**63
    assert isinstance(grpo.asks_think(2**31 - 1, 10**6, 10**6, 0.5), bool)
