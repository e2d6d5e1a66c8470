"""Tests for bench.py: it runs at tiny sizes, writes the JSON a README is written from, and its checks can fail."""
import importlib.util
import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import bench
import data
import grpo
import model
import sft
from phantom.llm import build_tiny_llm, phantom_texts

PRE_KEYS = {"volume", "ours", "ctclip", "decode", "per_sample"}


def tiny_llm(world, tmp_path_factory):
    return build_tiny_llm(phantom_texts(world), tmp_path_factory.mktemp("llm") / "tiny_llm",
                                vocab_size=600, hidden=64, layers=2)


@pytest.fixture(scope="module")
def llm_dir(phantom_world, tmp_path_factory):
    return tiny_llm(phantom_world, tmp_path_factory)


def test_preprocess_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--which", "preprocess", "--shape", "48,48,40", "--repeats", "1", "--out", str(out),
                      "--workdir", str(tmp_path / "work")])
    saved = json.loads(out.read_text())
    p = saved["preprocess"]
    assert PRE_KEYS <= p.keys() and saved["machine"]["cores"] >= 1
    assert ("monai" in p) == (importlib.util.find_spec("monai") is not None)
    for k in ("ours", "ctclip", "monai"):
        if k in p:
            assert p[k]["sec_per_volume"] > 0 and p[k]["peak_mb"] >= 0
            assert p[k]["max_hu_diff_vs_ours"] <= 1, k     # same pipeline up to float rounding
    assert 0 < p["decode"]["share_of_ours"] and p["per_sample"]["cache_sec"] > 0
    assert p["per_sample"]["npz_ratio"] == pytest.approx(p["per_sample"]["npz_sec"] / p["per_sample"]["cache_sec"])
    reading = p["read_ahead"]                                  # every emulated step waits for its GPU time
    assert reading["serial_ms_per_sample"] >= 24 and reading["read_ahead_ms_per_sample"] >= 24
    assert res["preprocess"]["ours"]["sec_per_volume"] == p["ours"]["sec_per_volume"]


def test_synthetic_volume_is_read_as_hu_in_ctrate_layout(tmp_path):
    path, meta = bench.synth_ctrate_volume(tmp_path, (40, 36, 20), (0.7, 0.7, 1.0))
    assert path.parts[-4:] == ("valid_fixed", "valid_1", "valid_1_a", "valid_1_a_1.nii.gz")
    hu, spacing = data.read_ctrate_volume(path, meta)
    raw = np.asanyarray(__import__("nibabel").load(path).dataobj)
    assert spacing == (0.7, 0.7, 1.0) and hu.min() == raw.min() < -1000   # v2: HU, not rescaled again
    np.testing.assert_array_equal(hu, raw)                                # LPS affine: no flip


def test_hu_agreement_check_detects_mismatches(tmp_path):
    path, meta = bench.synth_ctrate_volume(tmp_path, (48, 48, 40), (0.7, 0.7, 1.0))
    hu, spacing = data.read_ctrate_volume(path, meta)
    ours = data.preprocess_volume(hu, spacing, data.REAL)
    assert bench.max_hu_diff(ours, bench.ctclip_preprocess(path, spacing, data.REAL)) <= 1
    bad = ours.copy()
    bad[10, 20, 30] += 7
    assert bench.max_hu_diff(ours, bad) == 7
    assert bench.max_hu_diff(ours, ours[:-1]) == float("inf")
    twice = data.preprocess_volume(hu - 1024, spacing, data.REAL)        # the double-rescale bug
    assert bench.max_hu_diff(ours, twice) > 500
    shifted = bench.ctclip_preprocess(path, (0.7, 0.7, 1.4), data.REAL)  # wrong z spacing
    assert bench.max_hu_diff(ours, shifted) > 100


def fresh_pages(mb: int) -> int:
    """Fill `mb` MB of newly mapped pages and unmap them: a peak no allocator can have kept resident beforehand."""
    with mmap.mmap(-1, mb << 20) as m:
        a = np.frombuffer(m, np.uint8)
        a.fill(1)
        total = int(a[::4096].sum())
        del a
    return total


def rss_counts_held_pages() -> bool:
    """Whether this kernel's RSS rises by 64 MB of pages filled and still held (it does on every Linux seen so far)."""
    rss = lambda: int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    before = rss()
    with mmap.mmap(-1, 64 << 20) as m:
        a = np.frombuffer(m, np.uint8)
        a.fill(1)
        held = rss()
        del a
    return held - before > 48


def test_measure_reports_median_and_peak_memory():
    if not rss_counts_held_pages():
        pytest.skip("this kernel's RSS does not count pages a process fills and holds: no peak can be measured")
    calls = []
    r = bench.measure(lambda: calls.append(1) or fresh_pages(128), 3)
    assert len(calls) == 4                                                   # one untimed warm-up call, three timed
    assert len(r["sec_all"]) == 3 and r["sec"] == pytest.approx(sorted(r["sec_all"])[1], abs=1e-3)
    assert 100 < r["peak_mb"] < 400 and r["out"] == 128 * 256


def test_measure_each_takes_the_sides_repeats_in_turn():
    """A comparison's sides run one repeat each per round, in an order rotated from round to round, so that neither a
    slow phase of the machine nor the side run before falls on one side more than on another."""
    calls = []
    r = bench.measure_each({k: (lambda k=k: calls.append(k) or k) for k in ("ours", "alt", "alt2")}, 3)
    assert calls == ["ours", "alt", "alt2"] * 2 + ["alt", "alt2", "ours"] + ["alt2", "ours", "alt"]   # warm-ups, rounds
    assert [r[k]["out"] for k in ("ours", "alt")] == ["ours", "alt"] and len(r["alt2"]["sec_all"]) == 3


def test_peak_memory_is_sampled_where_vmhwm_misses_it(monkeypatch):
    if not rss_counts_held_pages():
        pytest.skip("this kernel's RSS does not count pages a process fills and holds: no peak can be measured")
    status = bench._status_mb
    monkeypatch.setattr(bench, "_status_mb", lambda key: status("VmRSS"))     # a VmHWM that never exceeds the RSS
    r = bench.measure(lambda: fresh_pages(256), 3)
    assert 100 < r["peak_mb"] < 600


def test_sft_step_with_and_without_cached_features(phantom_world, llm_dir, monkeypatch):
    """Both settings run sft.train_step itself (one untimed first step, then one call per timed step) and train the
    bridge only; the cached setting never runs the ViT (that is what --cache-features saves)."""
    steps, calls, vit_calls, real_step = 2, [], [], sft.train_step

    def spy_step(net, *a, **k):
        vlm = net.vlm
        before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
        out = real_step(net, *a, **k)
        moved = {n.split(".")[0] for n, p in vlm.named_parameters() if not torch.equal(p, before[n])}
        calls.append((len(vit_calls), moved))
        return out
    monkeypatch.setattr(sft, "train_step", spy_step)
    monkeypatch.setattr(model.ViT3D, "__call__", lambda self, *a, **k: vit_calls.append(1) or
                        torch.nn.Module.__call__(self, *a, **k))
    args = bench.parse_args(["--sft-presets", "tiny", "--sft-steps", str(steps), "--sft-batch", "2"])
    res = bench.bench_sft(args, phantom_world, llm_dir)
    t = res["tiny"]
    assert t["steps_per_s"] > 0 and t["cached_steps_per_s"] > 0
    assert len(t["sec_all"]) == len(t["cached_sec_all"]) == steps
    assert len(calls) == 2 * (steps + 1) and all(moved == {"bridge"} for _, moved in calls)
    assert [n for n, _ in calls] == [1, 2, 3, 3, 3, 3]    # the ViT ran once per plain step, never in a cached one


@pytest.mark.slow
def test_grpo_ours_vs_trl(phantom_world, llm_dir, tmp_path):
    pytest.importorskip("trl")
    args = bench.parse_args(["--grpo-prompts", "1", "--grpo-steps", "1", "--grpo-new-tokens", "6"])
    res = bench.bench_grpo(args, phantom_world, llm_dir, tmp_path)
    for side in ("ours", "trl"):   # both without activation checkpointing (TRL's default has it on)
        assert res[side]["sec_per_step"] > 0 and 1 <= res[side]["completion_len"] <= 6 and not res[side]["grad_ckpt"]
    assert res["ratio_trl_over_ours"] == pytest.approx(res["trl"]["sec_per_step"] / res["ours"]["sec_per_step"])


def test_grpo_bench_times_grpo_train_step_without_trl(phantom_world, llm_dir, tmp_path, monkeypatch):
    """Without TRL (as CI installs it) our side of item 3 still runs: grpo.train_step once untimed, then once per
    timed step, and TRL's absence is reported, not raised."""
    monkeypatch.setitem(sys.modules, "trl", None)                  # `from trl import ...` raises ImportError
    calls, real_step = [], grpo.train_step
    monkeypatch.setattr(grpo, "train_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    args = bench.parse_args(["--grpo-prompts", "1", "--grpo-steps", "2", "--grpo-new-tokens", "6"])
    res = bench.bench_grpo(args, phantom_world, llm_dir, tmp_path)
    assert len(calls) == 3 and len(res["ours"]["sec_all"]) == 2 and "TRL not installed" in res["trl_skipped"]
    assert 0 < res["ours"]["update_sec"] < res["ours"]["sec_per_step"] and 1 <= res["ours"]["completion_len"] <= 6


def test_cuda_benchmark_code_path_on_cpu(phantom_world, llm_dir):
    """Item 4 only runs on a GPU; run its code path here with a tiny LLM shape so that it is not dead code."""
    args = bench.parse_args(["--sft-steps", "1", "--grpo-prompts", "1", "--cuda-new-tokens", "4"])
    shape = dict(bench.QWEN25_3B, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 vocab_size=128)
    res = bench.bench_cuda(args, phantom_world, llm_dir, device="cpu", llm_shape=shape, vit_preset="tiny")
    assert res["sft"]["samples_per_s"] > 0 and 0 < res["sft"]["mfu"]
    assert res["grpo"]["generated_tokens_per_s"] > 0 and res["grpo"]["tokens"] <= 4 * 4


def test_cuda_is_skipped_with_a_reason_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = bench.main(["--which", "cuda", "--out", str(tmp_path / "b.json"), "--data-root", str(tmp_path / "none")])
    assert "no CUDA" in res["cuda"]["skipped"]
