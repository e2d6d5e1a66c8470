"""data.py (readers, preprocessing numerics, labels, task builders, the OpenAI labeller) and the phantom generator."""
import csv
import dataclasses
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import phantom
import runtime
from phantom import llm, world

# the team's shared/ folder lies beside the checkout (CI copies it there); /work/shared on the development machines
SHARED = next((p for p in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")) if p.exists()),
              Path(__file__).resolve().parents[2] / "shared")
CTRATE, RAD = SHARED / "ctrate", SHARED / "radchestct"
needs_real = pytest.mark.skipif(not CTRATE.exists(), reason="real CT-RATE CSVs not present")
SMALL = data.Preset("small", (1.5, 1.5, 3.0), (40, 40, 20), (32, 32, 16))
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # CT-RATE voxel order (L, P, S) expressed in nibabel's RAS world


def meta_row(name="valid_1_a_1.nii.gz", xy=(0.75, 0.75), z=1.5, intercept=-1024, slope=1):
    return {"VolumeName": name, "XYSpacing": f"[{xy[0]}, {xy[1]}]", "ZSpacing": str(z),
            "RescaleIntercept": str(intercept), "RescaleSlope": str(slope)}


def write_nifti(path, array, affine=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, LPS if affine is None else affine), str(path))
    return path


# ------------------------------------------------ real CSVs -----------------------------------------------------

@needs_real
def test_real_ctrate_csvs_parse_completely():
    meta = data.read_metadata(CTRATE / "validation_metadata.csv")
    assert len(meta) == 3039
    with open(CTRATE / "validation_metadata.csv", newline="") as f:
        assert next(csv.reader(f)) == world.METADATA_COLUMNS
    spacings = np.array([data.metadata_spacing(r) for r in meta.values()])
    assert np.isfinite(spacings).all() and (spacings > 0).all() and spacings[:, 0].max() < 1.5
    siemens = [r for r in meta.values() if r["Manufacturer"] == "Siemens Healthineers"]
    assert siemens and all(r["RescaleIntercept"] == "-8192" for r in siemens)
    valid, train = data.read_labels(CTRATE / "valid_predicted_labels.csv"), data.read_labels(
        CTRATE / "train_predicted_labels.csv")
    assert (len(valid), len(train)) == (3039, 47149) and set(valid) == set(meta)
    assert sum(v.sum() == 0 for v in valid.values()) == 346 and sum(v.sum() == 0 for v in train.values()) == 5226
    assert len({data.patient_id(n) for n in valid}) == 1304 and len({data.patient_id(n) for n in train}) == 20000


@needs_real
def test_mmvqa_on_real_valid_labels_key_positive_distractors_negative():
    labels = data.read_labels(CTRATE / "valid_predicted_labels.csv")
    stats = {}
    items = data.build_mmvqa(labels, seed=0, stats=stats)
    eligible = [n for n, v in labels.items() if v.sum() >= 1 and (v == 0).sum() >= 3]
    assert len(items) == len(eligible) == stats["items"] and stats["no_positive"] == 346
    for it in items:
        lab = labels[it["VolumeName"]]
        idx = {l: data.ABNORMALITIES.index(o) for l, o in it["options"].items()}
        assert lab[idx[it["answer"]]] == 1
        assert all(lab[i] == 0 for l, i in idx.items() if l != it["answer"])
        assert len(set(idx.values())) == 4
        assert it["question"].endswith(" ".join(f"{l}) {o}" for l, o in it["options"].items()))
    counts = Counter(it["answer"] for it in items)
    assert max(counts.values()) - min(counts.values()) <= 1  # answer position uniform
    assert data.build_mmvqa(labels, seed=0) == items and data.build_mmvqa(labels, seed=1) != items
    per_label = data.build_mmvqa(labels, seed=0, per_label=True)
    assert len(per_label) == sum(int(labels[n].sum()) for n in eligible)


@needs_real
def test_mmvqa_key_is_a_random_positive_not_always_the_first():
    """One item per volume: the key is drawn among the volume's positives, so every abnormality can be asked about,
    not only the first positive in ABNORMALITIES order."""
    labels = data.read_labels(CTRATE / "valid_predicted_labels.csv")
    items = data.build_mmvqa(labels, seed=0)
    first = {n: data.ABNORMALITIES[int(np.flatnonzero(v == 1)[0])] for n, v in labels.items() if (v == 1).sum() >= 2}
    is_first = [it["options"][it["answer"]] == first[it["VolumeName"]] for it in items if it["VolumeName"] in first]
    assert len(is_first) > 100 and sum(is_first) < 0.8 * len(is_first)


@needs_real
def test_real_radchestct_labels_map_84_to_18():
    labels = data.read_radchestct_labels(RAD / "imgtest_abnormality_labels_84.csv")
    assert len(labels) == 360
    mosaic = data.ABNORMALITIES.index("Mosaic attenuation pattern")
    rows = {r["NoteAcc_DEID"]: r for r in csv.DictReader(open(RAD / "imgtest_abnormality_labels_84.csv"))}
    for name, lab in labels.items():
        assert np.isnan(lab[mosaic]) and set(np.delete(lab, mosaic)) <= {0.0, 1.0}
        r = rows[name]
        assert lab[data.ABNORMALITIES.index("Coronary artery wall calcification")] == float(r["calcification"])
        assert lab[data.ABNORMALITIES.index("Lung nodule")] == float(r["nodule"])
        device = max(float(r[c]) for c in data.RAD_TO_CTRATE["Medical material"])
        assert lab[data.ABNORMALITIES.index("Medical material")] == device
    items = data.build_mmvqa(labels, seed=0)
    assert items and all("Mosaic attenuation pattern" not in it["options"].values() for it in items)
    with open(RAD / "Summary_3630.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3630


def test_radchestct_location_file_collapses_by_max(tmp_path):
    cols = ["NoteAcc_DEID", "nodule*right_lung", "nodule*left_lung", "stent*heart", "emphysema*left_lung"]
    rest = sorted(data.MAPPED - {"nodule", "stent", "emphysema"})  # every mapped label has a column, all 0 here
    zeros = "".join(",0.0" for _ in rest)
    (tmp_path / "loc.csv").write_text(",".join(cols + [f"{r}*lung" for r in rest]) + f"\ntrn1,0.0,1.0,0.0,0.0{zeros}"
                                      f"\ntrn2,0.0,0.0,1.0,1.0{zeros}\n")
    lab = data.read_radchestct_labels(tmp_path / "loc.csv")
    i = data.ABNORMALITIES.index
    assert lab["trn1"][i("Lung nodule")] == 1 and lab["trn1"][i("Medical material")] == 0
    assert lab["trn2"][i("Medical material")] == 1 and lab["trn2"][i("Emphysema")] == 1
    assert lab["trn2"][i("Lung nodule")] == 0


@needs_real
def test_rl_subset_is_patient_level():
    names = list(data.read_labels(CTRATE / "train_predicted_labels.csv"))
    sub = data.rl_subset(names, frac=0.05, seed=0)
    patients = {data.patient_id(n) for n in sub}
    assert len(patients) == 1000  # 5 % of 20,000 training patients
    assert sub == [n for n in names if data.patient_id(n) in patients]  # every reconstruction of a chosen patient
    assert data.rl_subset(names, 0.05, 0) == sub and data.rl_subset(names, 0.05, 1) != sub


# ------------------------------------------------ preprocessing numerics ----------------------------------------

def test_resample_puts_a_known_cube_at_the_right_size_and_place():
    hu = np.full((80, 80, 40), -1000.0, np.float32)  # 0.75 x 0.75 x 1.5 mm -> 60 x 60 x 60 mm
    hu[20:60, 20:60, 10:30] = 500.0  # a 30 x 30 x 30 mm cube in the centre
    out = data.preprocess_volume(hu, (0.75, 0.75, 1.5), SMALL)
    assert out.shape == SMALL.shape and out.dtype == np.int16
    inside = out > 0
    assert inside.sum(axis=0).max() == 20 and inside.sum(axis=2).max() == 10  # 30 mm / 1.5 mm, 30 mm / 3 mm
    xs, ys, zs = np.nonzero(inside)
    assert (xs.min(), xs.max(), zs.min(), zs.max()) == (10, 29, 5, 14)  # 40-voxel grid padded 5 each side -> centred
    assert out[0, 0, 0] == -1000  # padding (-1024) clamped to -1000


def test_resample_is_exact_on_linear_ramps_and_clamps():
    x = np.arange(60, dtype=np.float32)[:, None, None] * 0.5  # 0.5 HU per voxel at 0.75 mm
    ramp = np.broadcast_to(x, (60, 60, 30)).copy()
    out = data.preprocess_volume(ramp, (0.75, 0.75, 1.5), SMALL).astype(int)
    crop = out[5:35, 5:35, 2:17]  # the 30 x 30 x 15 resampled voxels, away from the pad
    assert np.abs(np.diff(crop[2:-2], axis=0) - 1).max() <= 1  # 1.5 mm per voxel -> +1 HU per voxel
    assert np.ptp(crop, axis=(1, 2)).max() <= 1
    big = np.full((40, 40, 20), 3000.0, np.float32)
    big[:, :, :10] = -3000.0
    clamped = data.preprocess_volume(big, (1.5, 1.5, 3.0), SMALL)
    assert clamped.max() == 1000 and clamped.min() == -1000


def test_crop_takes_the_centre_and_pad_fills_evenly():
    vol = np.arange(50 * 50 * 26, dtype=np.float32).reshape(50, 50, 26) % 997 - 500
    out = data.preprocess_volume(vol, SMALL.spacing, SMALL)  # same spacing: pure crop
    assert np.array_equal(out, np.rint(vol[5:45, 5:45, 3:23]).astype(np.int16))
    small = np.zeros((30, 31, 20), np.float32)
    out = data.preprocess_volume(small, SMALL.spacing, SMALL)
    assert (out[5:35, 4:35] == 0).all() and (out[:5] == -1000).all() and (out[:, :4] == -1000).all()
    assert (out[:, 35:] == -1000).all() and (out[35:] == -1000).all()


def test_online_transform_crop_and_normalisation():
    vol = np.zeros(data.PHANTOM.shape, np.int16)
    vol[0] = -1000
    vol[-1] = 1000
    x = data.online_transform(vol, data.PHANTOM)
    assert x.shape == (1, *data.PHANTOM.crop) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (0 - 0.4978) / 0.2449))  # centre crop drops the edge slabs
    wide = data.Preset("p", (5, 5, 10), (72, 72, 36), (72, 72, 36))
    full = data.online_transform(vol, wide)
    assert full[0, 0].max() == pytest.approx((-1 - 0.4978) / 0.2449) and full[0, -1].min() == pytest.approx(
        (1 - 0.4978) / 0.2449)
    assert torch.equal(data.online_transform(vol * 3, wide), full)             # HU beyond +-1000 clipped
    ramp = np.broadcast_to(np.arange(72, dtype=np.int16)[:, None, None], data.PHANTOM.shape)
    a = data.online_transform(ramp, data.PHANTOM, train=True, rng=np.random.default_rng(0))
    b = data.online_transform(ramp, data.PHANTOM, train=True, rng=np.random.default_rng(0))
    assert torch.equal(a, b)
    crops = [data.online_transform(ramp, data.PHANTOM, train=True, rng=np.random.default_rng(s)) for s in range(30)]
    starts = {round((float(c[0, 0, 0, 0]) * 0.2449 + 0.4978) * 1000) for c in crops}
    assert len(starts) > 3 and min(starts) >= 0 and max(starts) <= 8  # random crops stay inside the volume


# ------------------------------------------------ volume readers --------------------------------------------------

def test_reorientation_from_the_affine(tmp_path):
    rng = np.random.default_rng(0)
    target = rng.integers(-1000, 1000, (6, 7, 5)).astype(np.int16)  # L, P, S order
    hu, spacing = data.read_ctrate_volume(write_nifti(tmp_path / "a.nii.gz", target), meta_row(xy=(0.7, 0.6), z=2.0))
    assert np.array_equal(hu, target) and spacing == (0.6, 0.7, 2.0)  # XYSpacing is [row (y), column (x)]
    ras = write_nifti(tmp_path / "b.nii.gz", target[::-1, ::-1, :].copy(), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert np.array_equal(data.read_ctrate_volume(ras, meta_row())[0], target)
    swapped = np.array([[0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # stored (P, L, S)
    pls = write_nifti(tmp_path / "c.nii.gz", target.transpose(1, 0, 2).copy(), swapped)
    assert np.array_equal(data.read_ctrate_volume(pls, meta_row())[0], target)


def test_reoriented_views_preprocess_like_contiguous_arrays(tmp_path):
    """read_ctrate_volume returns nibabel's data as a flipped / transposed view (no copy); preprocess_volume must give
    what it gives for the same voxels laid out contiguously in (X, Y, Z) order."""
    rng = np.random.default_rng(1)
    target = rng.integers(-1000, 1000, (41, 37, 23)).astype(np.int16)  # L, P, S order; odd sizes: uneven crops
    spacing = (1.2, 0.9, 2.5)
    expected = data.preprocess_volume(np.ascontiguousarray(target, dtype=np.float32), spacing, SMALL)
    swapped = np.array([[0, -1, 0, 0], [-1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # stored (P, L, S)
    files = {"lps": (target, None), "ras": (target[::-1, ::-1, :], np.eye(4)),
             "pls": (target.transpose(1, 0, 2), swapped)}
    for name, (stored, affine) in files.items():
        path = write_nifti(tmp_path / f"{name}.nii.gz", np.ascontiguousarray(stored), affine)
        hu, _ = data.read_ctrate_volume(path, meta_row())
        assert np.array_equal(hu, target)
        got = data.preprocess_volume(hu, spacing, SMALL)
        assert np.abs(got.astype(int) - expected).max() <= 1 and (got != expected).mean() < 1e-3, name


def test_a_csv_with_a_header_and_no_rows_is_an_error_naming_it(tmp_path):
    """A CSV cut after its header (an interrupted download, a filter that matched nothing) holds nothing to train on
    or score: every reader names the file, and `data.py label` writes no sentence file and fails."""
    readers = {"reports": (data.read_reports, ",".join(data.REPORT_COLUMNS)),
               "labels": (data.read_labels, "VolumeName," + ",".join(data.ABNORMALITIES)),
               "metadata": (data.read_metadata, "VolumeName,XYSpacing,ZSpacing"),
               "rad": (data.read_radchestct_labels, "NoteAcc_DEID," + ",".join(sorted(data.MAPPED)))}
    for name, (read, header) in readers.items():
        (tmp_path / f"{name}.csv").write_text(header + "\n")
        with pytest.raises(ValueError, match=f"{name}.csv: a header and no rows"):
            read(tmp_path / f"{name}.csv")
    r = subprocess.run([sys.executable, "data.py", "label", "--reports", str(tmp_path / "reports.csv"), "--out",
                        str(tmp_path / "sentences.jsonl")], cwd=Path(data.__file__).parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.splitlines()[-1].endswith("reports.csv: a header and no rows")
    assert not list(tmp_path.glob("sentences*"))


def test_bad_label_csvs_raise_errors_naming_file_and_row(tmp_path):
    """A label that is not 0/1, a short row, a renamed column or a volume listed twice with other labels would
    become wrong labels or a late, nameless error: each is an error naming the file and the volume or line."""
    header = "VolumeName," + ",".join(data.ABNORMALITIES)
    row = lambda name, v: f"{name}," + ",".join([v] + ["0"] * 17)
    cases = {"nan": [row("valid_1_a_1.nii.gz", "nan")], "two": [row("valid_1_a_1.nii.gz", "2")],
             "frac": [row("valid_1_a_1.nii.gz", "0.7")], "short": ["valid_1_a_1.nii.gz,0,1"],
             "dup": [row("valid_1_a_1.nii.gz", "0"), row("valid_1_a_1.nii.gz", "1")]}
    (tmp_path / "cols.csv").write_text(header.replace(",Cardiomegaly", "") + ",Pneumothorax\n"
                                       + row("valid_1_a_1.nii.gz", "0") + "\n")
    with pytest.raises(ValueError, match=r"cols.csv: the label columns are not data.ABNORMALITIES, in order "
                                         r"\(missing: \['Cardiomegaly'\], other: \['Pneumothorax'\]\)"):
        data.read_labels(tmp_path / "cols.csv")
    for name, rows in cases.items():
        (tmp_path / f"{name}.csv").write_text("\n".join([header] + rows) + "\n")
        with pytest.raises(ValueError, match=f"{name}.csv.*(valid_1_a_1|line)"):
            data.read_labels(tmp_path / f"{name}.csv")
    (tmp_path / "bom.csv").write_text("\ufeff" + header + "\n" + row("valid_1_a_1.nii.gz", "1.0") + "\n",
                                      encoding="utf-8")   # re-saved by a spreadsheet program
    assert data.read_labels(tmp_path / "bom.csv")["valid_1_a_1.nii.gz"].tolist() == [1] + [0] * 17
    (tmp_path / "meta.csv").write_text("\ufeffVolumeName,ZSpacing\nvalid_1_a_1.nii.gz,1.5\n", encoding="utf-8")
    assert data.read_metadata(tmp_path / "meta.csv")["valid_1_a_1.nii.gz"]["ZSpacing"] == "1.5"
    (tmp_path / "nokey.csv").write_text("Volume,ZSpacing\nvalid_1_a_1.nii.gz,1.5\n")
    with pytest.raises(ValueError, match="nokey.csv: no VolumeName column"):
        data.read_metadata(tmp_path / "nokey.csv")
    rad = ["NoteAcc_DEID"] + sorted(data.MAPPED) + ["air_trapping"]
    body = lambda first, last: f"trn1,{first}," + ",".join(["0.0"] * (len(rad) - 3)) + f",{last}"
    (tmp_path / "rad_ok.csv").write_text(",".join(rad) + "\n" + body("1.0", "n/a") + "\n")  # unmapped: not read
    assert data.read_radchestct_labels(tmp_path / "rad_ok.csv")["trn1"].shape == (18,)
    (tmp_path / "rad_nan.csv").write_text(",".join(rad) + "\n" + body("nan", "0.0") + "\n")
    with pytest.raises(ValueError, match="rad_nan.csv: trn1, column atelectasis: 'nan' is not a label"):
        data.read_radchestct_labels(tmp_path / "rad_nan.csv")
    (tmp_path / "rad_renamed.csv").write_text(",".join(r.replace("cardiomegaly", "cardiomeg") for r in rad) + "\n"
                                              + body("0.0", "0.0") + "\n")
    with pytest.raises(ValueError, match=r"rad_renamed.csv: no RAD-ChestCT label column for \['cardiomegaly'\]"):
        data.read_radchestct_labels(tmp_path / "rad_renamed.csv")


def test_v1_files_are_used_as_stored_and_the_manifest_says_how(tmp_path):
    """v1 headers are placeholders (often an identity affine, which nibabel reads as R, A, S): a v1 array is stored
    in CT-RATE's (L, P, S) order and must not be flipped by it; a v2 file is turned by its affine. An HU file
    without air, rescaled as if it were v1, would be cached thousands of HU too low: it is an error."""
    rng = np.random.default_rng(2)
    hu = rng.integers(-1024, 1000, (6, 7, 5)).astype(np.int16)  # (L, P, S) order
    v1 = write_nifti(tmp_path / "v1.nii.gz", (hu + 1024).astype(np.int16), np.eye(4))  # raw values, placeholder
    how = {}
    assert np.array_equal(data.read_ctrate_volume(v1, meta_row(intercept=-1024), how)[0], hu)
    assert "v1" in how["values"] and "as stored" in how["orientation"]
    v2 = write_nifti(tmp_path / "v2.nii.gz", np.ascontiguousarray(hu[::-1, ::-1, :]), np.eye(4))  # stored R, A, S
    how = {}
    assert np.array_equal(data.read_ctrate_volume(v2, meta_row(), how)[0], hu)
    assert how == {"values": "HU as stored (v2)", "orientation": "RAS -> LPS by the affine"}
    no_air = write_nifti(tmp_path / "no_air.nii.gz", np.full((4, 4, 4), 40, np.int16))
    with pytest.raises(data.VolumeReadError, match="no_air.nii.gz: neither HU .* values -8152 to -8152"):
        data.read_ctrate_volume(no_air, meta_row(intercept=-8192))
    src = tmp_path / "src"
    write_nifti(data.ctrate_path(src, "valid_1_a_1"), (hu + 1024).astype(np.int16), np.eye(4))
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        csv.DictWriter(f, list(meta_row())).writerows([dict(zip(meta_row(), meta_row())), meta_row()])
    data.preprocess_dir(src, tmp_path / "out", metadata=tmp_path / "meta.csv", preset=SMALL, progress=False)
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text())
    assert "v1" in record["values"] and "as stored" in record["orientation"]


def test_double_rescale_guard(tmp_path):
    hu = np.full((8, 8, 4), -1024, np.int16)
    hu[2:6, 2:6] = 40
    v2 = write_nifti(tmp_path / "v2.nii.gz", hu)  # v2: already HU, although its CSV row says intercept -8192
    out, _ = data.read_ctrate_volume(v2, meta_row(intercept=-8192))
    assert np.array_equal(out, hu.astype(np.float32))
    v1 = write_nifti(tmp_path / "v1.nii.gz", (hu.astype(np.int32) + 8192).astype(np.int16))  # raw Siemens values
    assert np.array_equal(data.read_ctrate_volume(v1, meta_row(intercept=-8192))[0], hu)
    v1b = write_nifti(tmp_path / "v1b.nii.gz", (hu + 1024).astype(np.uint16))  # raw values, intercept -1024
    assert np.array_equal(data.read_ctrate_volume(v1b, meta_row(intercept=-1024))[0], hu)
    img = nib.Nifti1Image((hu + 2048).astype(np.int16), LPS)  # NIfTI header scaling (scl_inter) already gives HU
    img.header.set_slope_inter(1.0, -2048.0)
    nib.save(img, str(tmp_path / "scl.nii.gz"))
    out, _ = data.read_ctrate_volume(tmp_path / "scl.nii.gz", meta_row(intercept=-1024))
    assert out.dtype == np.float32 and np.array_equal(out, hu)


def test_bad_files_raise_errors_naming_the_file(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", np.full((8, 8, 4), -1000, np.int16))
    cases = {"missing.nii.gz": None, "corrupt.nii.gz": b"this is not a nifti file at all" * 20,
             "truncated.nii.gz": good.read_bytes()[: len(good.read_bytes()) // 2]}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(data.VolumeReadError, match=name):
            data.read_ctrate_volume(tmp_path / name, meta_row())
    write_nifti(tmp_path / "four_d.nii.gz", np.zeros((4, 4, 4, 2), np.int16))
    with pytest.raises(data.VolumeReadError, match="four_d.nii.gz.*3-D"):
        data.read_ctrate_volume(tmp_path / "four_d.nii.gz", meta_row())
    with pytest.raises(data.VolumeReadError, match="valid_9_a_1.*NaN"):
        data.read_ctrate_volume(good, meta_row("valid_9_a_1.nii.gz", z=float("nan")))
    np.savez(tmp_path / "no_ct.npz", image=np.zeros((2, 2, 2)))
    with pytest.raises(data.VolumeReadError, match="no_ct.npz"):
        data.read_radchestct_volume(tmp_path / "no_ct.npz")


def test_radchestct_reader_flips_superior_first(tmp_path):
    ct = np.full((10, 6, 8), -1000, np.int16)  # (Z, Y, X), index 0 = superior
    ct[0, 1, 2] = 500  # top slice, y = 1, x = 2
    np.savez_compressed(tmp_path / "trn1.npz", ct=ct)
    hu, spacing = data.read_radchestct_volume(tmp_path / "trn1.npz")
    assert hu.shape == (8, 6, 10) and spacing == (0.8, 0.8, 0.8)
    assert hu[2, 1, 9] == 500 and hu.sum() == 500 - 1000 * (hu.size - 1)


def test_preprocess_dir_is_resumable_and_records_bad_files(tmp_path):
    src = tmp_path / "valid_fixed"
    rows = []
    for i in (1, 2, 3):
        name = f"valid_{i}_a_1.nii.gz"
        vol = np.full((30, 30, 12), -1000, np.int16)
        vol[10:20, 10:20, 4:8] = 100 * i
        write_nifti(data.ctrate_path(src, name), vol)
        rows.append({**meta_row(name, xy=(2.0, 2.0), z=5.0)})
    data.ctrate_path(src, "valid_4_a_1.nii.gz").parent.mkdir(parents=True)
    data.ctrate_path(src, "valid_4_a_1.nii.gz").write_bytes(b"broken")
    rows.append(meta_row("valid_4_a_1.nii.gz"))
    write_nifti(data.ctrate_path(src, "valid_5_a_1.nii.gz"), np.zeros((4, 4, 4), np.int16))  # no metadata row
    meta = tmp_path / "meta.csv"
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=world.METADATA_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "cache"
    write_nifti(data.ctrate_path(src, "valid_6_a_1.nii.gz"), np.zeros((4, 4, 4), np.int16))  # a head CT
    (tmp_path / "no_chest.txt").write_text("dataset/valid/valid_6/valid_6_a/valid_6_a_1.nii.gz\n")
    assert data.preprocess_dir(src, out, "ctrate", meta, data.PHANTOM, no_chest=tmp_path / "no_chest.txt",
                               progress=False) == {"written": 3, "skipped": 0, "bad": 2, "excluded": 1,
                                                   "removed": 0, "not_volume": {}}
    bad = [json.loads(l) for l in open(out / "bad_files.jsonl")]
    assert {b["VolumeName"] for b in bad} == {"valid_4_a_1.nii.gz", "valid_5_a_1.nii.gz"}
    assert all(b["VolumeName"][:-7] in b["error"] for b in bad)
    with pytest.raises(SystemExit, match=r"^0 written, 3 already done, 1 excluded, 2 bad \(see .*bad_files.jsonl\)"):
        data.main(["preprocess", "--src", str(src), "--metadata", str(meta), "--out", str(out),
                   "--preset", "phantom", "--workers", "2", "--no-chest", str(tmp_path / "no_chest.txt")])
    assert len(open(out / "manifest.jsonl").readlines()) == 3  # the rerun skipped what was done
    cache = data.VolumeCache(out)
    assert cache.preset == data.PHANTOM and sorted(cache.names) == [f"valid_{i}_a_1.nii.gz" for i in (1, 2, 3)]
    vol = cache.load("some/dir/valid_2_a_1.nii.gz")
    assert isinstance(vol, np.memmap) and vol.shape == data.PHANTOM.shape and vol.max() == 200
    assert "valid_3_a_1" in cache and "valid_4_a_1.nii.gz" not in cache
    with pytest.raises(KeyError, match="valid_4_a_1"):
        cache.load("valid_4_a_1.nii.gz")
    x = cache.batch(["valid_2_a_1.nii.gz", "valid_1_a_1"])           # the model inputs, in the order asked
    assert x.shape == (2, 1, *data.PHANTOM.crop) and torch.equal(x[0], data.online_transform(vol, cache.preset))
    said, items = [], [{"v": "valid_1_a_1.nii.gz"}, {"v": "valid_4_a_1.nii.gz"}, {"v": "valid_9_a_1.nii.gz"}]
    assert cache.keep_cached(items, "v", "questions", said.append) == items[:1]
    assert said == [f"left out 2 of 3 questions: their volume is not in {out}"]
    assert cache.keep_cached(items[:1], "v", "questions", said.append) == items[:1] and len(said) == 1
    with pytest.raises(ValueError, match="another preset"):
        data.preprocess_dir(src, out, "ctrate", meta, data.REAL, progress=False)


def test_a_volume_excluded_after_it_was_cached_leaves_the_cache(tmp_path):
    """Preprocessing resumed with a --no-chest list takes the volumes it names out of the cache an earlier run wrote
    (manifest and file), so that no stage trains on a head CT; the rest stays done."""
    src, out, meta = tmp_path / "valid_fixed", tmp_path / "cache", tmp_path / "meta.csv"
    names = [f"valid_{i}_a_1.nii.gz" for i in (1, 2)]
    for name in names:
        vol = np.full((30, 30, 12), -1000, np.int16)
        vol[10:20, 10:20, 4:8] = 100
        write_nifti(data.ctrate_path(src, name), vol)
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=world.METADATA_COLUMNS, restval="")
        w.writeheader()
        w.writerows(meta_row(n, xy=(2.0, 2.0), z=5.0) for n in names)
    assert data.preprocess_dir(src, out, "ctrate", meta, data.PHANTOM, progress=False)["written"] == 2
    (tmp_path / "no_chest.txt").write_text(f"{names[1]}\n")
    stats = data.preprocess_dir(src, out, "ctrate", meta, data.PHANTOM, no_chest=tmp_path / "no_chest.txt",
                                progress=False)
    assert (stats["skipped"], stats["excluded"], stats["removed"]) == (1, 1, 1)
    assert data.VolumeCache(out).names == names[:1] and not (out / "valid_2_a_1.npy").exists()
    assert data.main(["preprocess", "--src", str(src), "--metadata", str(meta), "--out", str(out), "--preset",
                      "phantom", "--no-chest", str(tmp_path / "no_chest.txt")]) is None   # nothing left to remove


def real_meta_rows() -> dict[str, dict]:
    """The real CT-RATE validation metadata rows by VolumeName (RescaleIntercept -1024: Philips, -8192: Siemens)."""
    with open(CTRATE / "validation_metadata.csv", newline="") as f:
        return {r["VolumeName"]: r for r in csv.DictReader(f)}


def write_meta_csv(path, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=world.METADATA_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def chest(shape=(24, 24, 12)) -> np.ndarray:
    """HU int16: air (-1024) around a 40 HU block."""
    hu = np.full(shape, -1024, np.int16)
    hu[6:18, 6:18, 3:9] = 40
    return hu


@needs_real
def test_non_finite_voxels_or_rescale_parameters_make_bad_files_never_cache_entries(tmp_path):
    rows = real_meta_rows()
    philips = [n for n, r in rows.items() if r["RescaleIntercept"] == "-1024"]
    siemens = [n for n, r in rows.items() if r["RescaleIntercept"] == "-8192"]
    src, hu = tmp_path / "valid_fixed", chest()
    nan_voxels, inf_voxel, all_nan = hu.astype(np.float32), hu.astype(np.float32), np.full(hu.shape, np.nan, "f4")
    nan_voxels.flat[:12] = np.nan
    inf_voxel[0, 0, 0] = -np.inf
    cases = {philips[0]: (hu, None), siemens[0]: (hu + 8192, None),  # a good v2 (HU) and a good v1 (raw) file
             philips[1]: (nan_voxels, "12 NaN voxels"), philips[2]: (nan_voxels + 1024, "12 NaN voxels"),
             philips[3]: (all_nan, f"{hu.size} NaN voxels"), philips[4]: (inf_voxel, "1 infinite voxels"),
             siemens[1]: (hu + 8192, "RescaleIntercept is nan")}
    for name, (vol, _) in cases.items():
        write_nifti(data.ctrate_path(src, name), vol)
    rows[siemens[1]] = {**rows[siemens[1]], "RescaleIntercept": "nan"}
    overflow = nib.Nifti1Image(hu, LPS)  # header scaling to beyond float32
    overflow.header.set_slope_inter(1e36, 0.0)
    nib.save(overflow, str(data.ctrate_path(src, philips[5])))
    cases[philips[5]] = (None, "infinite voxels")
    inf_slope = write_nifti(data.ctrate_path(src, philips[6]), hu)
    stored = bytearray(gzip.decompress(inf_slope.read_bytes()))
    stored[112:116] = np.float32(np.inf).tobytes()  # the NIfTI-1 scl_slope field, which nibabel reads as 1
    inf_slope.write_bytes(gzip.compress(bytes(stored)))
    cases[philips[6]] = (None, "NIfTI header scl_slope is inf")
    with np.errstate(over="ignore"):
        for name, (_, reason) in cases.items():
            if reason:
                with pytest.raises(data.VolumeReadError, match=f"{name}: .*{reason}"):
                    data.read_ctrate_volume(data.ctrate_path(src, name), rows[name])
    assert data.is_hu(nan_voxels) and not data.is_hu(nan_voxels + 1024) and not data.is_hu(all_nan)
    meta, out = write_meta_csv(tmp_path / "meta.csv", [rows[n] for n in cases]), tmp_path / "cache"
    with np.errstate(over="ignore"):
        stats = data.preprocess_dir(src, out, "ctrate", meta, SMALL, progress=False)
    assert stats == {"written": 2, "skipped": 0, "bad": 7, "excluded": 0, "removed": 0, "not_volume": {}}
    bad = {b["VolumeName"]: b["error"] for b in map(json.loads, open(out / "bad_files.jsonl"))}
    assert set(bad) == {n for n, (_, reason) in cases.items() if reason}
    assert all(e.startswith(f"{data.ctrate_path(src, n)}: ") and cases[n][1] in e for n, e in bad.items())
    assert sorted(out.glob("*.npy")) == sorted(out / f"{data.volume_key(n)}.npy" for n in (philips[0], siemens[0]))
    for name in (philips[0], siemens[0]):  # the good files: exactly the HU volume, preprocessed
        expected = data.preprocess_volume(hu.astype(np.float32), data.metadata_spacing(rows[name]), SMALL)
        assert np.array_equal(np.load(out / f"{data.volume_key(name)}.npy"), expected)
    rad = tmp_path / "rad"
    rad.mkdir()
    for name, vol in {"trn1": hu.astype(np.float32), "trn2": nan_voxels}.items():  # RAD-ChestCT (Z, Y, X) .npz
        np.savez_compressed(rad / f"{name}.npz", ct=vol.transpose(2, 1, 0)[::-1])
    with pytest.raises(data.VolumeReadError, match="trn2.npz: 12 NaN voxels"):
        data.read_radchestct_volume(rad / "trn2.npz")
    stats = data.preprocess_dir(rad, tmp_path / "rad_cache", "radchestct", preset=SMALL, progress=False)
    assert (stats["written"], stats["bad"]) == (1, 1) and not (tmp_path / "rad_cache" / "trn2.npy").exists()


@needs_real
@pytest.mark.parametrize("workers", [1, 2])
def test_any_failure_is_listed_and_the_run_goes_on(tmp_path, workers):
    rows = real_meta_rows()
    names = sorted(rows)[:6]  # the two failing files come first
    src, hu = tmp_path / "valid_fixed", chest()
    rgb = np.zeros(hu.shape, [("R", "u1"), ("G", "u1"), ("B", "u1")])  # a colour image (NIfTI RGB24): no HU
    for name in names:  # v1 raw values
        write_nifti(data.ctrate_path(src, name), rgb if name == names[1] else hu + 1024)
    rows[names[0]] = {**rows[names[0]], "RescaleSlope": ""}  # an empty cell (pandas' NaN): named
    meta, out = write_meta_csv(tmp_path / "meta.csv", [rows[n] for n in names]), tmp_path / "cache"
    stats = data.preprocess_dir(src, out, "ctrate", meta, SMALL, workers=workers, progress=False)
    assert stats == {"written": 4, "skipped": 0, "bad": 2, "excluded": 0, "removed": 0, "not_volume": {}}
    bad = {b["VolumeName"]: b["error"] for b in map(json.loads, open(out / "bad_files.jsonl"))}
    assert bad[names[0]] == (f"{data.ctrate_path(src, names[0])}: RescaleSlope, RescaleIntercept ['', '-1024'] in the "
                             "metadata CSV are not numbers (v1 raw values cannot become HU)")
    # an exception of any other kind is listed with the file too
    assert bad[names[1]].startswith(f"{data.ctrate_path(src, names[1])}: TypeError: Cannot cast array data from ")
    listed = {r["file"] for r in map(json.loads, open(out / "manifest.jsonl"))}
    assert listed == {f"{data.volume_key(n)}.npy" for n in names[2:]} == {p.name for p in out.glob("*.npy")}
    for name in names[2:]:
        expected = data.preprocess_volume(hu.astype(np.float32), data.metadata_spacing(rows[name]), SMALL)
        assert np.array_equal(np.load(out / f"{data.volume_key(name)}.npy"), expected)


@needs_real
def test_a_crash_leaves_no_npy_outside_the_manifest(tmp_path, monkeypatch):
    rows = real_meta_rows()
    names = sorted(rows)[:6]
    src, hu = tmp_path / "valid_fixed", chest()
    for name in names:
        write_nifti(data.ctrate_path(src, name), hu)
    meta, out = write_meta_csv(tmp_path / "meta.csv", [rows[n] for n in names]), tmp_path / "cache"

    def crash_after_first_record(results, **kwargs):  # tqdm's stand-in: the main process dies after one record,
        results = iter(results)                         # once both workers have saved all six volumes
        yield next(results)
        for _ in range(600):
            if len(list(out.glob("*.npy"))) == len(names):
                break
            time.sleep(0.05)
        raise KeyError("simulated crash")
    monkeypatch.setattr(data, "tqdm", crash_after_first_record)
    with pytest.raises(KeyError, match="simulated crash"):
        data.preprocess_dir(src, out, "ctrate", meta, SMALL, workers=2, progress=False)
    listed = [r["file"] for r in map(json.loads, open(out / "manifest.jsonl"))]
    assert len(listed) == 1 and {p.name for p in out.glob("*.npy") if not p.name.endswith(".tmp.npy")} == set(listed)
    monkeypatch.undo()
    assert data.preprocess_dir(src, out, "ctrate", meta, SMALL, progress=False)["written"] == 5  # resumed
    assert {p.name for p in out.glob("*.npy")} == {f"{data.volume_key(n)}.npy" for n in names}


@needs_real
def test_an_empty_rescale_cell_of_a_raw_volume_is_named(tmp_path):
    """A v1 volume (raw values) whose metadata row has an empty RescaleIntercept (pandas' NaN) fails naming the
    file and the cells, not with a bare float() error."""
    name, row = next(iter(real_meta_rows().items()))
    write_nifti(path := tmp_path / name, chest() + 1024)
    with pytest.raises(data.VolumeReadError, match=rf"{name}: RescaleSlope, RescaleIntercept \['1', ''\] in the "
                                                   "metadata CSV are not numbers"):
        data.read_ctrate_volume(path, {**row, "RescaleSlope": "1", "RescaleIntercept": ""})


@needs_real
def test_summary_counts_every_file_and_the_cli_fails_on_bad_files(tmp_path, capsys):
    rows = real_meta_rows()
    names = sorted(rows)[:4]
    src, hu = tmp_path / "valid_fixed", chest()
    for name in names:
        write_nifti(data.ctrate_path(src, name), hu + 1024 if name == names[3] else hu)  # names[3]: v1 raw values
    for name in sorted(rows)[4:6]:  # uncompressed NIfTI: not read
        write_nifti(str(data.ctrate_path(src, name)).removesuffix(".gz"), hu)
    (src / "README.txt").write_text("CT-RATE validation volumes\n")
    rows[names[3]] = {**rows[names[3]], "RescaleSlope": "inf", "RescaleIntercept": "nan"}
    meta = write_meta_csv(tmp_path / "meta.csv", [rows[n] for n in names])
    (tmp_path / "no_chest.txt").write_text(f"{names[2]}\n")
    out = tmp_path / "cache"
    argv = ["preprocess", "--src", str(src), "--metadata", str(meta), "--out", str(out), "--preset", "phantom",
            "--no-chest", str(tmp_path / "no_chest.txt")]
    r = subprocess.run([sys.executable, "data.py", *argv], cwd=Path(data.__file__).parent, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines()[-1] == (f"2 written, 0 already done, 1 excluded, 1 bad (see {out}/bad_files.jsonl), "
                                         "3 not a volume (*.nii: 2, *.txt: 1)")
    assert [json.loads(l)["error"] for l in open(out / "bad_files.jsonl")] == [
        f"{data.ctrate_path(src, names[3])}: RescaleSlope is inf, RescaleIntercept is nan in the metadata CSV "
        "(v1 raw values cannot become HU)"]
    stats = data.preprocess_dir(src, out, "ctrate", meta, data.PHANTOM, no_chest=tmp_path / "no_chest.txt",
                                progress=False)
    assert stats == {"written": 0, "skipped": 2, "bad": 1, "excluded": 1, "removed": 0,
                     "not_volume": {"*.nii": 2, "*.txt": 1}}
    del stats["removed"]                                          # cache entries, not files under src
    assert sum(stats.pop("not_volume").values()) + sum(stats.values()) == sum(p.is_file() for p in src.rglob("*"))
    write_nifti(data.ctrate_path(src, names[3]), hu)  # HU: the rescale parameters are not needed
    assert data.main(argv) is None
    assert capsys.readouterr().out == (
        "1 written, 2 already done, 1 excluded, 0 bad, 3 not a volume (*.nii: 2, *.txt: 1)\n")


# ------------------------------------------------ reports and labels ---------------------------------------------

REAL_STYLE = {  # CT-RATE-style sentences -> abnormal?
    "Trachea and both main bronchi are open.": False,
    "Mediastinal structures were evaluated as suboptimal since contrast material was not given.": False,
    "Heart contour and size are within normal limits.": False,
    "Pericardial effusion-thickening was not observed.": False,
    "No lymph nodes in pathological size and appearance were detected in the mediastinal and hilar regions.": False,
    "No pleural effusion.": False,
    "Thyroid gland is unremarkable.": False,
    "No mass or infiltrative lesion was detected in both lungs.": False,
    "No lytic-destructive lesions were detected in the bone structures within the sections.": False,
    "Atherosclerotic calcifications are observed in the aorta and coronary arteries.": True,
    "Millimetric nonspecific nodules are observed in both lungs.": True,
    "Subsegmental atelectasis is present in the lower lobe of the left lung.": True,
    "Emphysematous changes are seen in both lungs.": True,
    "No pleural effusion, but there are minimal atelectatic changes in the lower lobes.": True,
    "Hiatal hernia is observed.": True,
    "Cardiomegaly.": True,
    "Degenerative changes are observed in the thoracic spine.": True,
    "Ground-glass opacities are seen in both lungs.": True,
    "Thyroid gland is not enlarged.": False,
    "Liver size is normal; hepatosteatosis is observed.": True,
    "Postoperative changes are observed in the left hemithorax.": True,
    # a finding beside a negated one, in one sentence: the negation governs only its own part
    "There are linear atelectasis and fibrotic changes in both lungs, no mass lesion with distinct borders was "
    "detected.": True,
    "Heart size increased, pericardial effusion not observed.": True,
    "Aorta is of normal diameter, calcified atherosclerotic plaques are observed in its wall.": True,
    "Atelectasis is present in the right lower lobe without pleural effusion.": True,
    "Trachea and both main bronchi are open, emphysematous changes are observed in both lungs.": True,
    "A few millimetric nodules are observed in both lungs and no mass was detected.": True,
    "Minimal pleural effusion, no pneumothorax.": True,
    "No nodule, mass, or consolidation was detected.": False,   # "no" governs the whole list
    "Heart contour and size are normal, no pericardial effusion-thickening was detected.": False,
    "Thoracic esophagus calibration was normal and no significant tumoral wall thickening was detected.": False,
    "Mediastinal structures cannot be evaluated optimally since contrast material was not given.": False,
    "Neither pleural nor pericardial effusion is seen.": False,
    "Consolidation isn't seen.": False,
    # findings the terms used to miss, and words that only contain a term
    "Findings are compatible with viral pneumonia.": True,
    "Pulmonary edema.": True,
    "A tumor is seen in the left upper lobe.": True,
    "Malignancy cannot be excluded.": True,
    # a finding left possible is raised, not negated; one ruled out is negated
    "Pneumonia cannot be ruled out.": True,
    "Pleural effusion is not excluded, no pneumothorax.": True,
    "Metastasis should be ruled out clinically.": True,
    "An infectious process cannot be excluded.": True,
    "Pneumothorax was ruled out.": False,
    "Density increase in the right lower lobe.": True,
    "Micronodules are seen in both lungs.": True,
    "The findings are consistent with the clinical history.": False,   # "stent" inside "consistent"
    "The volume was calculated from the sections.": False,             # "calcul" inside "calculated"
    "Bronchiectatic changes are seen in the lower lobes.": True,
    "Bullous changes are seen in both apices.": True,
    "The ascending aorta is ectatic.": True,
    "As expected, the trachea is open.": False,                        # "ectat" inside "expected"
}


def test_rule_labeller_on_real_style_sentences():
    assert {s: data.rule_label(s) for s in REAL_STYLE} == REAL_STYLE


def test_split_sentences_and_reports(tmp_path):
    assert data.split_sentences("Heart size is normal. A 3.5 mm nodule is seen in the right lung. No effusion.") == [
        "Heart size is normal.", "A 3.5 mm nodule is seen in the right lung.", "No effusion."]
    assert data.split_sentences(None) == [] and data.split_sentences("") == []
    assert data.split_sentences("1. Emphysema. 2. Atelectasis in the left lung.\n3) Nodule.") == [
        "1. Emphysema.", "2. Atelectasis in the left lung.", "3) Nodule."]   # a list number stays with its sentence
    path = tmp_path / "r.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(data.REPORT_COLUMNS)
        w.writerow(["a.nii.gz", "x", "y", "Not given.", "Cardiomegaly."])
    assert data.read_reports(path) == {"a.nii.gz": {"findings": None, "impressions": "Cardiomegaly."}}


class FakeLLM(BaseHTTPRequestHandler):
    """A chat-completions endpoint that labels the numbered sentences with the rule labeller (or fails)."""
    mode, requests, limited_until, delay = "ok", 0, 0.0, 0.0

    def do_POST(self):
        FakeLLM.requests += 1
        time.sleep(FakeLLM.delay)      # a slow endpoint: concurrent requests overlap
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if FakeLLM.mode == "429" and not FakeLLM.limited_until:   # rate-limited for 0.8 s from the first request
            FakeLLM.limited_until = time.monotonic() + 0.8
        limited = FakeLLM.mode == "429" and time.monotonic() < FakeLLM.limited_until
        if self.path != "/v1/chat/completions" or FakeLLM.mode == "error" or limited:
            self.send_response(429 if limited else 500)
            self.send_header("retry-after", "1")                           # seconds
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "boom"}}')
            return
        lines = body["messages"][-1]["content"].split("\n\n", 1)[1].split("\n")
        labels = [int(data.rule_label(l.split(". ", 1)[1])) for l in lines]
        content = f"Labels: {json.dumps(labels)}" if FakeLLM.mode in ("ok", "429") else "I cannot help with that."
        content = None if FakeLLM.mode == "null" else content   # a tool call or a refusal has no text
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}]
                 * (FakeLLM.mode != "no choices"), "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                                             "total_tokens": 2}}
        raw = b"<html>a proxy's login page</html>" if FakeLLM.mode == "html" else json.dumps(reply).encode()
        if FakeLLM.mode == "404":   # a model the server does not serve
            raw = json.dumps({"error": {"message": f"no model {body['model']}"}}).encode()
        self.send_response(404 if FakeLLM.mode == "404" else 200)
        self.send_header("Content-Type", "text/html" if FakeLLM.mode == "html" else "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeLLM.mode, FakeLLM.requests, FakeLLM.delay = "ok", 0, 0.0
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_labeller_against_a_local_server(fake_llm, tmp_path):
    sents = list(REAL_STYLE)
    lab = data.OpenAILabeller(fake_llm, "fake-model", "NO_KEY_ENV", tmp_path / "cache", timeout=5, retries=1)
    assert lab(sents) == list(REAL_STYLE.values()) and FakeLLM.requests == 1  # one request per report
    assert lab(sents[:3]) == list(REAL_STYLE.values())[:3] and FakeLLM.requests == 1  # cached
    FakeLLM.mode = "error"
    again = data.OpenAILabeller(fake_llm, "fake-model", "NO_KEY_ENV", tmp_path / "cache", timeout=5, retries=1)
    assert again(sents) == list(REAL_STYLE.values()) and FakeLLM.requests == 1  # the on-disk cache is reused
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1.*fake-model.*2 attempts"):
        again(["A new sentence about a nodule."])
    assert FakeLLM.requests == 3  # tried, retried by the client, failed loudly
    FakeLLM.mode = "garbage"
    with pytest.raises(RuntimeError, match=r"fake-model\): unparseable reply: 'I cannot help"):   # asked once
        again(["Another new sentence."])
    assert FakeLLM.requests == 4  # a malformed reply is not asked again
    dead = data.OpenAILabeller("http://127.0.0.1:9/v1", "m", "NO_KEY_ENV", tmp_path / "c2", timeout=1, retries=0)
    with pytest.raises(RuntimeError, match="127.0.0.1:9"):
        dead(["No effusion."])


def test_openai_labeller_names_replies_that_hold_no_labels_and_counts_only_the_attempts_made(fake_llm, tmp_path,
                                                                                              monkeypatch):
    """A reply without text, without choices or not JSON at all, and an error the client does not retry (404), are
    each named after one request; a server error after the client's retries says how many attempts; a short dummy
    key (local servers take any) is not blanked out of the messages; a failed `label` leaves no file behind."""
    monkeypatch.setenv("SHORT_KEY", "o")
    lab = data.OpenAILabeller(fake_llm, "fake-model", "SHORT_KEY", tmp_path / "cache", timeout=5, retries=2)
    for mode, said, requests in (("null", "fake-model): unparseable reply: None", 1),
                                 ("no choices", "fake-model): not a chat completion", 1),
                                 ("html", "fake-model): not a chat completion: \"<html>a proxy's login page", 1),
                                 ("404", "fake-model): NotFoundError: Error code: 404 - no model fake-model", 1),
                                 ("error", "fake-model): InternalServerError after 3 attempts: Error code: 500", 3)):
        FakeLLM.mode, FakeLLM.requests = mode, 0
        with pytest.raises(RuntimeError) as e:
            lab([f"A nodule is seen ({mode})."])
        assert said in str(e.value) and FakeLLM.requests == requests, (mode, str(e.value))
    with open(reports := tmp_path / "r.csv", "w", newline="") as f:
        csv.writer(f).writerows([data.REPORT_COLUMNS, ["v_1_a_1.nii.gz", "", "", "Cardiomegaly.", "Not given."]])
    (out := tmp_path / "out").mkdir()
    with pytest.raises(RuntimeError, match="unparseable reply: None"):
        FakeLLM.mode = "null"
        data.main(["label", "--reports", str(reports), "--out", str(out / "s.jsonl"), "--labeller", "openai",
                   "--base-url", fake_llm, "--model", "fake-model", "--cache", str(tmp_path / "cache")])
    assert list(out.iterdir()) == []


def test_openai_labeller_waits_out_a_rate_limit(fake_llm, tmp_path):
    lab = data.OpenAILabeller(fake_llm, "fake-model", "NO_KEY_ENV", tmp_path / "cache", timeout=5, retries=2)
    FakeLLM.mode, FakeLLM.limited_until = "429", 0.0
    assert lab(["Cardiomegaly is seen."]) == [True] and FakeLLM.requests == 2   # 429, waited as told, then served


def test_openai_labeller_drops_a_reply_cache_line_cut_short_and_asks_those_sentences_again(fake_llm, tmp_path, capsys):
    """A kill while labels.jsonl is appended to leaves half a line: the next labeller drops it (and says so), asks
    those sentences again, and its own lines start on a line of their own, so a third labeller reads them all."""
    sents = list(REAL_STYLE)
    data.OpenAILabeller(fake_llm, "fake-model", "NO_KEY_ENV", tmp_path / "cache", timeout=5, retries=1)(sents[:2])
    cache = tmp_path / "cache" / "labels.jsonl"
    cache.write_text(cache.read_text() + '{"model": "fake-model", "sentence": "Cardiomeg')     # cut short
    lab = data.OpenAILabeller(fake_llm, "fake-model", "NO_KEY_ENV", tmp_path / "cache", timeout=5, retries=1)
    assert "labels.jsonl: dropped 1 line(s)" in capsys.readouterr().out
    assert lab(sents) == list(REAL_STYLE.values()) and FakeLLM.requests == 2     # the first two stayed cached
    FakeLLM.mode = "error"
    again = data.OpenAILabeller(fake_llm, "fake-model", "NO_KEY_ENV", tmp_path / "cache", timeout=5, retries=1)
    assert again(sents) == list(REAL_STYLE.values()) and FakeLLM.requests == 2
    assert "dropped" not in capsys.readouterr().out


def test_label_cli_with_openai_labeller(fake_llm, tmp_path, monkeypatch):
    reports = tmp_path / "r.csv"
    with open(reports, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(data.REPORT_COLUMNS)
        w.writerow(["v_1_a_1.nii.gz", "", "", "Trachea is open. Cardiomegaly is seen.", "Not given."])
    monkeypatch.setenv("OPENAI_BASE_URL", fake_llm)
    monkeypatch.setenv("OPENAI_MODEL", "fake-model")
    data.main(["label", "--reports", str(reports), "--out", str(tmp_path / "s.jsonl"), "--labeller", "openai",
               "--cache", str(tmp_path / "cache")])
    got = data.read_sentence_labels(tmp_path / "s.jsonl")
    assert got == {"v_1_a_1.nii.gz": {"findings": [("Trachea is open.", False), ("Cardiomegaly is seen.", True)],
                                      "impressions": None}}


def test_label_asks_once_per_distinct_section_however_many_workers(fake_llm, tmp_path):
    """A scan's reconstructions share one report: with 4 threads against a slow endpoint, each distinct section is
    still one request, and every reconstruction gets its labels; a pandas-written 'nan' section is absent."""
    shared = ["Trachea is open. Cardiomegaly is seen.", "Cardiomegaly."]
    rows = [[f"valid_1_a_{i}.nii.gz", "", "", *shared] for i in (1, 2, 3)]
    rows += [["valid_2_a_1.nii.gz", "", "", "Pleural effusion is seen.", "nan"]]
    with open(reports := tmp_path / "r.csv", "w", newline="") as f:
        csv.writer(f).writerows([data.REPORT_COLUMNS, *rows])
    FakeLLM.delay = 0.3
    data.main(["label", "--reports", str(reports), "--out", str(out := tmp_path / "s.jsonl"), "--labeller", "openai",
               "--base-url", fake_llm, "--model", "fake-model", "--cache", str(tmp_path / "cache"), "--workers", "4"])
    assert FakeLLM.requests == 3
    got = data.read_sentence_labels(out)
    assert [got[f"valid_1_a_{i}.nii.gz"] for i in (1, 2, 3)] == 3 * [{
        "findings": [("Trachea is open.", False), ("Cardiomegaly is seen.", True)],
        "impressions": [("Cardiomegaly.", True)]}]
    assert got["valid_2_a_1.nii.gz"] == {"findings": [("Pleural effusion is seen.", True)], "impressions": None}
    assert [json.loads(line)["VolumeName"] for line in out.read_text().splitlines()] == [r[0] for r in rows]


# ------------------------------------------------ VQA, prompts and targets ---------------------------------------

def test_split_sentences_only_at_a_capital_digit_or_bracket():
    """A '.' followed by a lower-case word (an abbreviation) does not end the sentence."""
    assert data.split_sentences("Nodule approx. measuring 5 mm, i.e. small. Heart normal. 2. Trachea open.") == [
        "Nodule approx. measuring 5 mm, i.e. small.", "Heart normal.", "2. Trachea open."]


def test_json_inputs_read_past_a_bom_and_blank_lines_and_name_what_does_not_parse(tmp_path):
    """The question, VQA and sentence-label files as editors and pandas leave them: a byte-order mark, CRLF line ends,
    blank lines (JSON lines); a file that does not parse is named, a JSON-lines file with its line; a sentence-label
    file that lists a volume twice with other labels is refused, as the CSVs are."""
    rec = {"VolumeName": "valid_1_a_1.nii.gz", "findings": [["Effusion.", 1]], "impressions": None}
    (jsonl := tmp_path / "s.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(rec) + "\r\n\r\n").encode())
    assert data.read_sentence_labels(jsonl) == {rec["VolumeName"]: {"findings": [("Effusion.", True)],
                                                                     "impressions": None}}
    jsonl.write_text(json.dumps(rec) + "\n" + json.dumps(rec)[:-1] + "\n")
    with pytest.raises(ValueError, match=rf"{jsonl} line 2: not valid JSON"):
        data.read_sentence_labels(jsonl)
    for label in ("0", None, 0.5):     # the string "0" is truthy: every such sentence would count as abnormal
        jsonl.write_text(json.dumps({**rec, "impressions": [["Clear.", 0], ["Effusion.", label]]}) + "\n")
        with pytest.raises(ValueError, match=rf"{jsonl}: valid_1_a_1.nii.gz: sentence label {label!r} is not true"):
            data.read_sentence_labels(jsonl)
    jsonl.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")              # a file appended twice: one volume
    assert list(data.read_sentence_labels(jsonl)) == [rec["VolumeName"]]
    jsonl.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "findings": [["Effusion.", 0]]}) + "\n")
    with pytest.raises(ValueError, match=rf"{jsonl}: valid_1_a_1.nii.gz is listed twice, with other labels"):
        data.read_sentence_labels(jsonl)
    (questions := tmp_path / "q.json").write_text("")
    with pytest.raises(ValueError, match=rf"{questions}: not valid JSON"):
        data.read_questions(questions)
    (vqa := tmp_path / "v.json").write_bytes(b"\xef\xbb\xbf[]")
    assert data.read_vqa(vqa) == []


def test_files_saved_by_spreadsheets_and_editors_are_read_or_named_with_their_line(tmp_path):
    """What Excel and PowerShell leave: cp1252 or UTF-16 bytes are an error naming the file and line (not a decoder's
    bare offset, which names no file among several --labels); a column named twice is refused (the later one would
    hide the first); rows of empty cells read as blank lines, a row with values but no key is named."""
    header = "VolumeName," + ",".join(data.ABNORMALITIES)
    row = lambda name: f"{name}," + ",".join(["1"] + ["0"] * 17)
    (labels := tmp_path / "labels.csv").write_bytes(f"{header}\n{row('valid_1_a_1')}\n".encode()
                                                    + row("valid_2_a_1\xe9").encode("cp1252") + b"\n")
    with pytest.raises(ValueError, match=rf"{labels} line 3: byte 0xe9 is not UTF-8 .*save it as UTF-8"):
        data.read_labels(labels)
    (reports := tmp_path / "reports.csv").write_text(",".join(data.REPORT_COLUMNS) + "\n", encoding="utf-16")
    with pytest.raises(ValueError, match=rf"{reports} line 1: byte 0xff is not UTF-8"):
        data.read_reports(reports)
    labels.write_text(f"{header},Cardiomegaly\n{row('valid_1_a_1')},1\n")
    with pytest.raises(ValueError, match=rf"{labels}: the header names column 'Cardiomegaly' twice"):
        data.read_labels(labels)
    (meta := tmp_path / "meta.csv").write_text("VolumeName,ZSpacing\r\nvalid_1_a_1,1.5\r\n,\r\nvalid_2_a_1,2\r\n,\r\n")
    assert {k: r["ZSpacing"] for k, r in data.read_metadata(meta).items()} == {"valid_1_a_1": "1.5", "valid_2_a_1": "2"}
    meta.write_text("VolumeName,ZSpacing\nvalid_1_a_1,1.5\n ,2\n")
    with pytest.raises(ValueError, match=rf"{meta} line 3: no VolumeName"):
        data.read_metadata(meta)
    labels.write_text(f"{header}\n{row('valid_1_a_1')}\n" + " ," * 18 + "\n")
    assert list(data.read_labels(labels)) == ["valid_1_a_1"]


def test_json_lines_end_at_newline_only_and_other_encodings_are_named(tmp_path):
    """A line separator (U+2028) inside a JSON string is text, not a line end, as JSON lines define it: it splits
    neither a sentence-label record nor a line of an appended file (which would be dropped and the file rewritten
    without it). A UTF-16 question file is named, not a decoder's offset."""
    rec = {"VolumeName": "valid_1_a_1", "findings": [["Effusion\u2028 on the left.", 1]], "impressions": None}
    (jsonl := tmp_path / "s.jsonl").write_text(json.dumps(rec, ensure_ascii=False) + "\n", encoding="utf-8")
    assert data.read_sentence_labels(jsonl)["valid_1_a_1"]["findings"] == [("Effusion\u2028 on the left.", True)]
    before = jsonl.read_bytes()
    assert [r for _, r in runtime.read_appended(jsonl)] == [rec] and jsonl.read_bytes() == before
    (questions := tmp_path / "q.json").write_text("[]", encoding="utf-16")
    with pytest.raises(ValueError, match=rf"{questions} line 1: byte 0xff is not UTF-8"):
        data.read_questions(questions)


def test_sentence_label_records_of_another_shape_are_named(tmp_path):
    """A hand-made sentence-label file: a list dumped on one line, a record without a part, a part that is a string
    or holds triples or non-text sentences: each is an error naming the file, never a bare KeyError or a label read
    from a character."""
    rec = {"VolumeName": "valid_1_a_1", "findings": [["Effusion.", 1]], "impressions": None}
    shape = r": valid_1_a_1: findings and impressions must each be null or a list of \[sentence, label\] pairs"
    cases = {"a list": ([rec], r" record 2: must be an object, got list"),
             "null": (None, r" record 2: must be an object, got NoneType"),
             "no impressions": ({"VolumeName": "v", "findings": None}, r' record 2: "impressions" is missing'),
             "a number as name": ({**rec, "VolumeName": 5}, r' record 2: "VolumeName" must be a str, got int'),
             "a string": ({**rec, "findings": "Effusion."}, shape), "an int": ({**rec, "impressions": 7}, shape),
             "a triple": ({**rec, "findings": [["Effusion.", 1, 0.9]]}, shape),
             "a number": ({**rec, "impressions": [[3, 1]]}, shape)}
    jsonl = tmp_path / "s.jsonl"
    for record, message in cases.values():
        jsonl.write_text(json.dumps(rec) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=rf"{jsonl}{message}"):
            data.read_sentence_labels(jsonl)


def test_read_vqa_both_formats(tmp_path):
    ctchat = [{"id": "short_answer_1", "image": "train_1_a_1.nii.gz", "conversations": [
        {"from": "human", "type": "x", "value": "<image>\nIs there an effusion? <short_answer>"},
        {"from": "gpt", "value": "No."},
        {"from": "human", "value": "How large is the heart? <short_answer>"}, {"from": "gpt", "value": "Enlarged."}]},
        {"id": "long_answer_2", "conversations": [{"from": "human", "value": "What is emphysema? <long_answer>"},
                                                  {"from": "gpt", "value": "A disease."}]},
        {"id": "multiple_choice_3", "image": "train_2_a_1.nii.gz", "conversations": [
            {"from": "human", "value": "<image>\nWhich? (a) A (b) B <multiple_choice>"},
            {"from": "gpt", "value": "(b) B"}]}]
    ctchat[2]["conversations"].append({"from": "human", "value": "And the size?"})   # a question left unanswered
    (tmp_path / "c.json").write_text(json.dumps(ctchat))
    skipped = Counter()
    assert data.read_vqa(tmp_path / "c.json", skipped) == [
        {"VolumeName": "train_1_a_1.nii.gz", "question": "Is there an effusion?", "answer": "No.", "kind": "yes_no"},
        {"VolumeName": "train_1_a_1.nii.gz", "question": "How large is the heart?", "answer": "Enlarged.",
         "kind": "open"},
        {"VolumeName": "train_2_a_1.nii.gz", "question": "Which? (a) A (b) B", "answer": "(b) B",
         "kind": "multiple_choice"}]
    assert skipped == {"text-only items": 1, "questions without an answer": 1}
    med3d = [{"Image Path": "/d/valid_1_a_1.nii.gz", "Question": "Is the heart enlarged?", "Answer": "Yes",
              "Answer Choice": "A", "Question Type": "Closed", "Choice A": "Yes", "Choice B": "No"},
             {"Image Path": "/d/valid_1_a_1.nii.gz", "Question": "Where is the nodule?", "Answer": "Right lung",
              "Answer Choice": "C", "Question Type": "Closed", "Choice A": "Liver", "Choice B": "Heart",
              "Choice C": "Right lung", "Choice D": "Spine"},
             {"Image Path": "/d/valid_1_a_1.nii.gz", "Question": "Describe the lungs.", "Answer": "Clear.",
              "Answer Choice": "", "Question Type": "Open"}]
    (tmp_path / "m.json").write_text(json.dumps(med3d))
    got = data.read_vqa(tmp_path / "m.json")
    assert [g["kind"] for g in got] == ["yes_no", "multiple_choice", "open"]
    assert got[1]["question"].endswith("A) Liver B) Heart C) Right lung D) Spine")
    assert got[1]["answer"] == "C) Right lung"


def test_med3d_vqa_as_pandas_writes_it_reads_missing_cells_as_missing(tmp_path):
    """A Med3D-format file exported by pandas: a missing answer is null or NaN, which is a question without an answer
    (counted), never the target "None" or "nan"; numbers are text ("2"); a list is an error naming the item and field;
    a file that is an object, not a list of items, is named as such."""
    item = lambda **kw: {"Image Path": "/d/valid_1_a_1.nii.gz", "Question": "How many nodules?", **kw}
    path, skipped = tmp_path / "v.json", Counter()
    path.write_text(json.dumps([item(Answer=None), item(Answer=float("nan")), item(Answer="Two", **{"Choice D": None}),
                                item(Answer=2, **{"Choice A": 1, "Choice B": 2, "Choice C": float("nan"),
                                                  "Answer Choice": "B"})]))
    got = data.read_vqa(path, skipped)
    assert skipped["questions without an answer"] == 2
    assert [(g["question"], g["answer"], g["kind"]) for g in got] == [
        ("How many nodules?", "Two", "open"), ("How many nodules? A) 1 B) 2", "B) 2", "multiple_choice")]
    path.write_text(json.dumps([item(Answer="Two"), item(Answer=["Two"])]))
    with pytest.raises(ValueError, match=rf'{path} item 1 "Answer": must be text, got list'):
        data.read_vqa(path)
    path.write_text(json.dumps({"data": [item(Answer="Two")]}))
    with pytest.raises(ValueError, match=rf"{path}: must be a list of VQA items, got dict"):
        data.read_vqa(path)
    path.write_text(json.dumps([{"id": 7, "image": "train_1_a_1.nii.gz", "conversations": [
        {"from": "human", "value": "<image>\nWhy?"}, {"from": "gpt", "value": "So."}]}]))
    assert data.read_vqa(path)[0]["kind"] == "open"                        # an integer id, as a database exports it


def test_read_vqa_skips_empty_answers_and_refuses_malformed_conversations(tmp_path):
    turn = lambda who, text: {"from": who, "value": text}
    item = lambda *turns, image="train_1_a_1.nii.gz": {"id": "q_0", "image": image, "conversations": list(turns)}
    path, skipped = tmp_path / "v.json", Counter()
    path.write_text(json.dumps([item(turn("human", "<image>\nWhy? <long_answer>"), turn("gpt", " "),
                                     turn("human", "Any effusion? <short_answer>"), turn("gpt", "No.")),
                                {"Image Path": "/d/train_2_a_1.nii.gz", "Question": "Size?", "Answer": ""}]))
    assert [q["question"] for q in data.read_vqa(path, skipped)] == ["Any effusion?"]     # no EOS-only target
    assert skipped["questions without an answer"] == 2
    path.write_text(json.dumps([item(turn("gpt", "No."), turn("human", "<image>\nAny effusion? <short_answer>"))]))
    with pytest.raises(ValueError, match=rf"{path} item 0 turn 0: from 'gpt', not 'human' .turns alternate"):
        data.read_vqa(path)                                              # else question and answer swap silently
    path.write_text(json.dumps([item(turn("human", "<image>\nWhy?"), turn("gpt", "So."), image=["a.nii.gz"])]))
    with pytest.raises(ValueError, match=rf"{path} item 0.*image"):
        data.read_vqa(path)


def test_report_target_and_instruction():
    sents = {"findings": [("Heart is normal.", False), ("A nodule.", True)], "impressions": [("Nodule.", True)]}
    seg = data.report_target(sents)
    assert "".join(t for t, _ in seg) == "<finding>Heart is normal. A nodule.</finding><impression>Nodule.</impression>"
    assert [a for _, a in seg] == [False, False, True, False, False, True, False]
    assert data.report_instruction(sents) == data.REPORT_INSTRUCTION
    only = {"findings": sents["findings"], "impressions": None}
    assert "".join(t for t, _ in data.report_target(only)) == "<finding>Heart is normal. A nodule.</finding>"
    assert "impression" not in data.report_instruction(only)


def test_mmvqa_prompt_and_target():
    item = {"VolumeName": "v.nii.gz", "question": "What abnormality is present in this CT scan? A) Emphysema "
            "B) Cardiomegaly C) Hiatal hernia D) Lung nodule", "options": {"A": "Emphysema", "B": "Cardiomegaly",
            "C": "Hiatal hernia", "D": "Lung nodule"}, "answer": "B"}
    assert data.mmvqa_prompt(item, True).startswith(item["question"]) and "<think>" in data.mmvqa_prompt(item, True)
    assert "<think>" not in data.mmvqa_prompt(item, False)
    assert llm.mmvqa_target(item, ["Cardiomegaly"], think=False) == "<answer>B</answer>"
    t = llm.mmvqa_target(item, ["Cardiomegaly", "Pleural effusion"], think=True)
    assert t == ("<think>Of the options, Cardiomegaly present. "
                 "A) Emphysema not seen. B) Cardiomegaly present. C) Hiatal hernia not seen. D) Lung nodule not seen. "
                 "The answer is B. The scan shows Cardiomegaly and Pleural effusion.</think><answer>B</answer>")


# ------------------------------------------------ the phantom world ----------------------------------------------

def test_phantom_headers_match_ctrate_byte_for_byte(phantom_world):
    first = lambda p: open(p, "rb").readline()
    if CTRATE.exists():
        assert first(phantom_world["valid_metadata"]) == first(CTRATE / "validation_metadata.csv")
        assert first(phantom_world["train_labels"]) == first(CTRATE / "train_predicted_labels.csv")
        assert first(phantom_world["radchestct_labels"]) == first(RAD / "imgtest_abnormality_labels_84.csv")
    assert first(phantom_world["train_reports"]) == b"VolumeName,ClinicalInformation_EN,Technique_EN,Findings_EN," \
                                                    b"Impressions_EN\n"
    meta = data.read_metadata(phantom_world["valid_metadata"])
    labels = data.read_labels(phantom_world["valid_labels"])
    assert len(meta) == len(labels) == 12 and set(meta) == set(labels)
    for name, row in meta.items():  # the exact CT-RATE v2 folder layout, read through the real-data reader
        hu, spacing = data.read_ctrate_volume(data.ctrate_path(phantom_world["valid_volumes"], name), row)
        assert hu.min() < -900 and spacing == data.metadata_spacing(row)


def test_phantom_caches_have_anatomy_in_the_convention(phantom_world):
    for key in ("train_cache", "valid_cache", "radchestct_cache"):
        cache = data.VolumeCache(phantom_world[key])
        assert cache.preset == data.PHANTOM and len(cache) == {"train_cache": 24, "valid_cache": 12,
                                                               "radchestct_cache": 8}[key]
        for name in cache.names[:3]:
            v = np.asarray(cache.load(name), dtype=np.float32)
            assert v.shape == data.PHANTOM.shape and v.dtype == np.float32
            bone = v > 250
            yb = np.nonzero(bone)[1].mean()
            assert yb > 36  # the spine lies posterior (Y grows anterior -> posterior)
            liver = (np.abs(v - 55) < 30)[:, :, :10]  # liver under the right hemidiaphragm: low Z, low X
            assert np.nonzero(liver)[0].mean() < 36
            lung = (v < -600)[:, :, 12:24].mean()
            assert lung > 0.1


def test_phantom_reports_labels_and_vqa_agree(phantom_world):
    for split in ("train", "valid"):
        labels = data.read_labels(phantom_world[f"{split}_labels"])
        sents = data.read_sentence_labels(phantom_world[f"{split}_sentences"])
        assert set(sents) == set(labels)
        for name, lab in labels.items():
            s = sents[name]
            if s["findings"]:
                assert sum(a for _, a in s["findings"]) == lab.sum()  # one abnormal sentence per finding
                first_abnormal = next((i for i, (_, a) in enumerate(s["findings"]) if a), len(s["findings"]))
                assert not any(a for _, a in s["findings"][:first_abnormal])  # normal sentences first
                assert all(a for _, a in s["findings"][first_abnormal:])
            if s["impressions"]:
                assert sum(a for _, a in s["impressions"]) == lab.sum()
        vqa = data.read_vqa(phantom_world[f"{split}_vqa"])
        assert {q["kind"] for q in vqa} == {"report", "open", "yes_no", "multiple_choice"}
        for q in vqa:
            if q["kind"] == "yes_no":
                asked = next(a for a in data.ABNORMALITIES if f"there {a.lower()} in" in q["question"])
                assert (q["answer"] == "Yes.") == bool(labels[q["VolumeName"]][data.ABNORMALITIES.index(asked)])
    for key, lab_key in (("mmvqa_valid", "valid_labels"), ("mmvqa_rl", "train_labels")):
        labels = data.read_labels(phantom_world[lab_key])
        for it in json.load(open(phantom_world[key])):
            assert labels[it["VolumeName"]][data.ABNORMALITIES.index(it["options"][it["answer"]])] == 1
    rad = data.read_radchestct_labels(phantom_world["radchestct_labels"])
    cache = data.VolumeCache(phantom_world["radchestct_cache"])
    assert set(rad) == set(cache.names) and all(it["VolumeName"] in cache for it in json.load(
        open(phantom_world["mmvqa_radchestct"])))


def test_every_phantom_abnormality_is_visible_at_the_phantom_preset():
    """Adding one finding to a normal patient changes a clear block of voxels after preprocessing."""
    for seed in (0, 1):
        base = world._phantom_patient(np.random.default_rng(seed), force_normal=True)
        render = lambda p: data.preprocess_volume(
            world._render(p, (86, 86, 44), (4.2, 4.2, 8.0), np.random.default_rng(5)), (4.2, 4.2, 8.0), data.PHANTOM)
        normal = render(base).astype(int)[4:68, 4:68, 2:34]
        for k, name in enumerate(data.ABNORMALITIES):
            p = dict(base, labels=np.eye(18, dtype=bool)[k])
            changed = (np.abs(render(p).astype(int)[4:68, 4:68, 2:34] - normal) >= 80).sum()
            assert changed >= 20, (name, seed, changed)


def test_phantom_label_statistics():
    rng = np.random.default_rng(0)
    labels = np.array([world._phantom_patient(rng)["labels"] for _ in range(3000)])
    prevalence = labels.mean(0)
    assert prevalence.min() > 0.13 and prevalence.max() < 0.37
    assert 0.04 < (labels.sum(1) == 0).mean() < 0.1 and labels.sum(1).mean() > 3


def test_phantom_is_deterministic_and_ensure_is_idempotent(tmp_path, phantom_world):
    world.make_phantom(tmp_path / "a", n_train=3, n_valid=1, n_rad=1, seed=3, workers=1, progress=False)
    r = subprocess.run([sys.executable, "-m", "phantom", "dataset", "--out", str(tmp_path / "b"), "--n-train", "3",
                        "--n-valid", "1", "--n-rad", "1", "--seed", "3"],  # the CLI, with a worker pool: same bytes
                       cwd=Path(data.__file__).parent, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 10
    for f in files:
        a, b = (tmp_path / "a" / f).read_bytes(), (tmp_path / "b" / f).read_bytes()
        if f.suffix == ".gz":
            a, b = gzip.decompress(a), gzip.decompress(b)
        if f.suffix == ".npz":  # zip members carry time stamps: compare the arrays
            a, b = (np.load(tmp_path / d / f)["ct"].tobytes() for d in ("a", "b"))
        assert a == b, f
    before = {p: p.stat().st_mtime_ns for p in Path(phantom_world["root"]).rglob("*.json")}
    assert phantom.ensure_world(phantom_world["root"], n_train=24, n_valid=12, n_rad=8) == phantom_world
    assert before == {p: p.stat().st_mtime_ns for p in Path(phantom_world["root"]).rglob("*.json")}
    with pytest.raises(ValueError, match="another root"):
        phantom.ensure_world(phantom_world["root"], n_train=25, n_valid=12, n_rad=8)


def test_mmvqa_cli_runs_as_a_script(tmp_path, phantom_world):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "data.py", "mmvqa", "--labels", str(phantom_world["radchestct_labels"]),
                        "--format", "radchestct", "--out", str(out), "--seed", "4"],
                       cwd=Path(data.__file__).parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "questions written" in r.stdout and json.load(open(out)) == data.build_mmvqa(
        data.read_radchestct_labels(phantom_world["radchestct_labels"]), 4)


def test_mmvqa_reads_several_label_files_as_one_and_refuses_a_volume_in_two(tmp_path, phantom_world, capsys):
    """RAD-ChestCT's labels come per split (imgtrain / imgvalid / imgtest): given all, the questions are those of one
    file holding every row; a volume in two files is named, never read twice."""
    lines = Path(phantom_world["radchestct_labels"]).read_text().splitlines(keepends=True)
    (a := tmp_path / "a.csv").write_text("".join(lines[:5]))
    (b := tmp_path / "b.csv").write_text("".join(lines[:1] + lines[5:]))
    data.main(["mmvqa", "--format", "radchestct", "--labels", str(a), str(b), "--out", str(tmp_path / "q.json")])
    whole = data.build_mmvqa(data.read_radchestct_labels(phantom_world["radchestct_labels"]), 0)
    assert data.read_json(tmp_path / "q.json") == whole and len(whole) > 5
    key = lines[1].split(",")[0]
    with pytest.raises(SystemExit, match=rf"{phantom_world['radchestct_labels']}: {key} \(and 3 more\) also in an "):
        data.main(["mmvqa", "--format", "radchestct", "--labels", str(a), str(phantom_world["radchestct_labels"]),
                   "--out", str(tmp_path / "q2.json")])


def test_write_json_from_many_threads_to_one_path(tmp_path):
    """data.Chat caches a reply per prompt from worker threads: equal prompts write one path at the same time."""
    from concurrent.futures import ThreadPoolExecutor
    path = tmp_path / "cache" / "reply.json"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: data.write_json(path, {"i": i, "pad": "x" * 100_000}), range(200)))
    assert json.loads(path.read_text())["pad"] == "x" * 100_000                    # whole, not interleaved
    assert [p.name for p in path.parent.iterdir()] == ["reply.json"]               # no temporary file left


def test_a_cached_volume_of_another_shape_or_type_is_an_error_naming_its_file(phantom_world, tmp_path):
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(phantom_world["train_cache"], cache)
    vc = data.VolumeCache(cache)
    name, other = vc.names[0], vc.names[1]
    good = vc.batch([name])
    path = cache / f"{data.volume_key(name)}.npy"
    np.save(path, np.ascontiguousarray(np.load(path).transpose(2, 1, 0)))       # (Z, Y, X): cropped and padded before
    with pytest.raises(ValueError, match=rf"{path}: int16 \(36, 72, 72\), not the int16 \(72, 72, 36\) of"):
        vc.batch([name])
    np.save(path, np.load(cache / f"{data.volume_key(other)}.npy").astype(np.float32))
    with pytest.raises(ValueError, match=r"float32 \(72, 72, 36\), not the int16"):
        vc.load(name)
    assert good.shape == (1, 1, 64, 64, 32)
    for cut in (path.stat().st_size // 2, 0):            # a copy of the cache cut short; an empty file
        with open(path, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(ValueError, match=rf"{path}: cannot read \((ValueError|EOFError): .*\); preprocess it"):
            vc.load(name)


def test_the_phantom_preset_never_replaces_other_data(tmp_path):
    """A stage run without --preset real on a real data root (the default preset is the phantom world's) must stop
    before writing: building the phantom world there would delete the dataset and its caches."""
    volume = data.ctrate_path(tmp_path / "dataset" / "train_fixed", "train_1_a_1.nii.gz")
    volume.parent.mkdir(parents=True)
    volume.write_bytes(b"a real volume")
    with pytest.raises(SystemExit, match=f"{tmp_path} holds data that is not a phantom world.*pass --preset real"):
        data.paths(tmp_path, "phantom")
    from phantom.__main__ import main as phantom_cli
    with pytest.raises(SystemExit, match="not a phantom world"):                 # nor does `python -m phantom world`
        phantom_cli(["world", "--root", str(tmp_path), "--n-train", "4"])
    assert volume.read_bytes() == b"a real volume" and sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
    assert data.paths(tmp_path)["train_volumes"] == tmp_path / "dataset" / "train_fixed"   # the real preset reads it


def test_a_phantom_cache_made_with_another_preset_is_refused(tmp_path):
    """After data.PHANTOM changes, a world built before would feed the stages volumes of the old spacing and shape:
    ensure_world names the cache instead (and builds nothing)."""
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / ".done").write_text(world.PHANTOM_VERSION)
    (tmp_path / "phantom.json").write_text(json.dumps(world.PHANTOM_DEFAULTS))
    old = dataclasses.replace(data.PHANTOM, spacing=(4.0, 4.0, 8.0))
    (cache := data.paths(tmp_path)["train_cache"]).mkdir(parents=True)
    (cache / "preset.json").write_text(json.dumps(data.asdict(old)))
    (cache / ".done").touch()
    with pytest.raises(ValueError, match=rf"{cache} was preprocessed with another preset .* delete this one"):
        world.ensure_world(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "cache", "dataset", "phantom.json"]


@pytest.mark.parametrize("cmd, shown", [
    ("preprocess", ["(default: real)", "real: (1.5, 1.5, 3.0) mm, stored (256, 256, 128), cropped to (224, 224, 112)",
                    "processes (default: 1)"]),
    ("label", ["(default: rules)", "(default: runs/label_cache)", "(default: 3)"]),
    ("mmvqa", ["(default: ctrate)", "RL subset: 0.05); unset = all"])])
def test_data_commands_show_their_defaults(cmd, shown):
    out = subprocess.run([sys.executable, "data.py", cmd, "--help"], cwd=Path(data.__file__).parent,
                         capture_output=True, text=True, timeout=60)
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and all(s in text for s in shown), text
    assert "default: None" not in text and "default: False" not in text   # unset flags say so in words, or nothing


def test_preprocess_that_finds_no_volume_fails(tmp_path):
    """The wrong --format or --src: nothing to preprocess is a failure (exit 1), not an empty cache that exits 0."""
    (src := tmp_path / "src").mkdir()
    (src / "valid_1_a_1.nii.gz").write_bytes(b"a CT-RATE volume, not RAD-ChestCT's .npz")
    with pytest.raises(SystemExit, match=r"0 written.*1 not a volume \(\*.gz: 1\): no radchestct volume under --src"):
        data.main(["preprocess", "--src", str(src), "--format", "radchestct", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "preset.json").exists()   # no empty cache that a stage would read as one


def test_data_commands_refuse_flags_that_do_not_apply_and_an_out_folder_before_any_work(tmp_path, capsys):
    """--spacing belongs to RAD-ChestCT (CT-RATE's comes from the metadata CSV), --metadata to CT-RATE; a timeout of 0
    s or an RL share of 0 no run can use; --out naming a folder stops label and mmvqa before the work, not after it."""
    labels = Path("/nonexistent/labels.csv")
    for argv, said in ((["preprocess", "--src", "s", "--out", "o", "--metadata", "m.csv", "--spacing", "1", "1", "1"],
                        "radchestct takes --spacing"),
                       (["preprocess", "--src", "s", "--out", "o", "--format", "radchestct", "--metadata", "m.csv"],
                        "--format ctrate needs --metadata"),
                       (["label", "--reports", "r.csv", "--out", "o", "--timeout", "0"], "--timeout: must be at least"),
                       (["mmvqa", "--labels", str(labels), "--out", "o", "--rl-frac", "0"], "--rl-frac: must be above"),
                       (["mmvqa", "--labels", str(labels), "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
                       (["label", "--reports", "r.csv", "--out", str(tmp_path)], f"--out {tmp_path} is a folder")):
        with pytest.raises(SystemExit) as e:
            data.main(argv)
        assert e.value.code == 2 and said in " ".join(capsys.readouterr().err.split()), argv


def test_a_no_chest_list_with_a_byte_order_mark_excludes_its_first_volume_and_names_unknown_volumes(tmp_path, capsys):
    """Lists written on Windows (a byte-order mark, CRLF) exclude every volume they name, the first included; volumes
    the list names that are not under --src (another split's list) are counted in a note."""
    src, out = tmp_path / "src", tmp_path / "cache"
    rows = []
    for i in (1, 2, 3):
        write_nifti(data.ctrate_path(src, f"valid_{i}_a_1.nii.gz"), chest())
        rows.append(meta_row(f"valid_{i}_a_1.nii.gz"))
    with open(meta := tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=world.METADATA_COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)
    (listed := tmp_path / "no_chest.txt").write_bytes(b"\xef\xbb\xbfvalid_1_a_1.nii.gz\r\ntrain_9_a_1.nii.gz\r\n")
    stats = data.preprocess_dir(src, out, "ctrate", meta, data.PHANTOM, no_chest=listed, progress=False)
    assert stats["written"] == 2 and stats["excluded"] == 1 and "valid_1_a_1" not in data.VolumeCache(out)
    assert f"note: 1 of the 2 volumes in {listed} are not under {src}" in capsys.readouterr().out


def test_headers_that_would_turn_rescale_or_resize_a_volume_wrongly_are_read_as_stored_or_refused(tmp_path):
    """A marker at a known (L, P, S) voxel lands there, or the file is refused naming it: a header without qform and
    sform (nibabel would make up an (L, A, S) affine) is used as stored; a singular affine, header voxel sizes that
    are not the CSV's, and header scaling that leaves raw values (the CSV's rescale would be a second) are errors."""
    hu = chest()
    hu[3, 5, 7] = 900                                               # (L, P, S)
    bare = nib.Nifti1Image(hu, None)
    assert bare.header["qform_code"] == bare.header["sform_code"] == 0
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    how = {}
    got, _ = data.read_ctrate_volume(tmp_path / "bare.nii.gz", meta_row(), how)
    assert tuple(np.argwhere(got == 900)[0]) == (3, 5, 7) and "as stored" in how["orientation"]
    singular = nib.Nifti1Image(hu, None)                           # an sform with a zero column; nibabel writes no
    singular.header.set_sform(np.diag([-1.0, -1.0, 0.0, 1.0]), code=1)   # qform for it
    nib.save(singular, str(tmp_path / "singular.nii.gz"))
    with pytest.raises(data.VolumeReadError, match="singular.nii.gz: the NIfTI affine is singular"):
        data.read_ctrate_volume(tmp_path / "singular.nii.gz", meta_row())
    sized = np.diag([-0.6, -0.7, 2.0, 1.0])                        # the CSV's (x, y, z) = (0.6, 0.7, 2.0): read
    pls = np.array([[0, -0.6, 0, 0], [-0.7, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])   # the same, stored (P, L, S)
    for name, stored, affine in (("lps", hu, sized), ("pls", hu.transpose(1, 0, 2).copy(), pls)):
        got, _ = data.read_ctrate_volume(write_nifti(tmp_path / f"{name}.nii.gz", stored, affine),
                                         meta_row(xy=(0.7, 0.6), z=2.0))
        assert tuple(np.argwhere(got == 900)[0]) == (3, 5, 7), name
    with pytest.raises(data.VolumeReadError, match=r"resampled.nii.gz: the header's voxel sizes \(1.5, 1.5, 3.0\) "
                                                   r"mm are not the metadata CSV's \(0.75, 0.75, 1.5\)"):
        data.read_ctrate_volume(write_nifti(tmp_path / "resampled.nii.gz", hu, np.diag([-1.5, -1.5, 3.0, 1.0])),
                                meta_row())
    img = nib.Nifti1Image((hu.astype(np.int32) + 8192).astype(np.int16), LPS)   # raw + 8192, header says -1024
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "twice.nii.gz"))
    with pytest.raises(data.VolumeReadError, match="twice.nii.gz: the header's scl_slope 1, scl_inter -1024 do not "
                                                   "give HU .* a second one"):
        data.read_ctrate_volume(tmp_path / "twice.nii.gz", meta_row(intercept=-8192))
    img = nib.Nifti1Image(hu + 1024, LPS)                          # header scaling that gives HU: once, and said
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, str(tmp_path / "once.nii.gz"))
    how = {}
    assert np.array_equal(data.read_ctrate_volume(tmp_path / "once.nii.gz", meta_row(), how)[0], hu)
    assert how["values"] == "HU as stored (v2), after the header's scl_slope 1, scl_inter -1024"


def test_arrays_that_are_not_ct_are_refused_not_cached_as_air(tmp_path):
    """Data normalised to [0, 1] or [-1, 1], all zeros, or a RAD-ChestCT array shifted out of HU would pass as raw
    values and be cached as near-uniform air: each is an error naming the file and its value range."""
    hu = chest()
    cases = {"unit": (hu + 1024) / 2048, "zeros": np.zeros(hu.shape, np.int16)}
    for name, vol in cases.items():
        with pytest.raises(data.VolumeReadError, match=f"{name}.nii.gz: neither HU .* no tissue above -300 HU"):
            data.read_ctrate_volume(write_nifti(tmp_path / f"{name}.nii.gz", vol.astype(np.float32)), meta_row())
    for name, vol in {"twice": hu.astype(np.int32) - 1024, "air": np.full(hu.shape, -1024, np.int16)}.items():
        with pytest.raises(data.VolumeReadError, match=f"{name}.nii.gz: no tissue .no voxel above -300 HU"):
            data.read_ctrate_volume(write_nifti(tmp_path / f"{name}.nii.gz", vol), meta_row())   # v2, HU as stored
    rad = {"shifted": (hu + 1000).astype(np.uint16), "normalised": hu / 1000.0, "zeros": np.zeros(hu.shape)}
    for name, vol in rad.items():
        np.savez(tmp_path / f"{name}.npz", ct=vol.transpose(2, 1, 0)[::-1])
        with pytest.raises(data.VolumeReadError, match=f"{name}.npz: 'ct' is not HU"):
            data.read_radchestct_volume(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "ok.npz", ct=hu.transpose(2, 1, 0)[::-1])
    assert np.array_equal(data.read_radchestct_volume(tmp_path / "ok.npz")[0], hu)


def preprocess_with_a_busy_worker(src: Path, out: Path) -> tuple[subprocess.Popen, int]:
    """`preprocess --workers 2` on RAD-ChestCT files in src, one of them a named pipe (src/trn0.npz) that a worker
    opens with np.load and then blocks on: the process, and the write end of the pipe (close it when done)."""
    os.mkfifo(fifo := src / "trn0.npz")
    proc = subprocess.Popen([sys.executable, "data.py", "preprocess", "--src", str(src), "--format", "radchestct",
                             "--out", str(out), "--workers", "2"], cwd=Path(data.__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(1200):                       # wait until a worker has opened the pipe to read it
        try:
            return proc, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("no worker opened the named pipe")


def test_a_killed_worker_fails_its_volumes_instead_of_hanging_preprocess(tmp_path):
    """The OOM killer takes a worker: preprocess --workers 2 must end (exit 1) listing the volumes left undone, and a
    rerun finishes them. The victim blocks on a named pipe, so it is at work when it is killed."""
    src, names = tmp_path / "rad", [f"trn{i}" for i in range(5)]
    src.mkdir()
    for name in names[1:]:
        np.savez(src / f"{name}.npz", ct=chest())
    proc, writer = preprocess_with_a_busy_worker(src, tmp_path / "cache")
    fifo = src / "trn0.npz"

    def opened(fd: Path) -> bool:
        try:
            return fd.parts[2] != str(os.getpid()) and os.readlink(fd) == str(fifo)
        except OSError:                         # another user's process, or one that has just ended
            return False
    for _ in range(200):                        # its open() returns once ours has
        if victim := [int(fd.parts[2]) for fd in Path("/proc").glob("[0-9]*/fd/*") if opened(fd)]:
            break
        time.sleep(0.05)
    os.kill(victim[0], signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(writer)
        proc.kill()
    bad = {b["VolumeName"]: b["error"] for b in map(json.loads, open(tmp_path / "cache" / "bad_files.jsonl"))}
    assert proc.returncode == 1 and names[0] in bad, out
    assert all(e.startswith(f"{src / n}.npz: a worker process died") for n, e in bad.items())
    fifo.unlink()
    np.savez(fifo, ct=chest())
    cmd = [sys.executable, "data.py", "preprocess", "--src", str(src), "--format", "radchestct", "--out",
           str(tmp_path / "cache"), "--workers", "2"]
    assert subprocess.run(cmd, cwd=Path(data.__file__).parent, capture_output=True).returncode == 0
    assert {p.name for p in (tmp_path / "cache").glob("*.npy")} == {f"{n}.npy" for n in names}


def test_a_killed_preprocess_leaves_no_worker_behind(tmp_path):
    """SIGKILL of `preprocess --workers 2` (a preempted job): its pool workers, one of them busy, must end too, not
    wait for work forever holding their memory."""
    src = tmp_path / "rad"
    src.mkdir()
    np.savez(src / "trn1.npz", ct=chest())
    proc, writer = preprocess_with_a_busy_worker(src, tmp_path / "cache")

    def parents() -> dict[int, int]:
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            except (OSError, ValueError):
                continue
            if state != "Z":                                      # an ended process its parent has not reaped
                out[int(stat.parent.name)] = int(ppid)
        return out
    family, ppid = {proc.pid}, parents()
    while more := {p for p, pp in ppid.items() if pp in family} - family:
        family |= more
    assert len(family) >= 3                                       # the process, the forkserver and its workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        for _ in range(300):
            if not (left := [p for p in family - {proc.pid} if p in parents()]):
                break
            time.sleep(0.05)
        assert not left, f"still running after the kill: {left}"
    finally:
        os.close(writer)


def test_volume_key_of_names_and_paths():
    for name, key in [("valid_1_a_1.nii.gz", "valid_1_a_1"), ("/d/train_12/train_12_a/train_12_a_2.nii.gz",
                                                                "train_12_a_2"),
                      ("trn24737.npz", "trn24737"), ("cache/valid_3_a_1.npy", "valid_3_a_1"), ("x.nii", "x"),
                      ("train_1_a_1", "train_1_a_1")]:
        assert data.volume_key(name) == key and data.volume_key(Path(name)) == key


# ------------------------------------------------ file systems -------------------------------------------------

def fake_split(src: Path, n=3) -> Path:
    """n CT-RATE volumes (30 x 30 x 12, 2 x 2 x 5 mm, a block of 100 * i HU) under src and their metadata CSV."""
    for i in range(1, n + 1):
        vol = np.full((30, 30, 12), -1000, np.int16)
        vol[10:20, 10:20, 4:8] = 100 * i
        write_nifti(data.ctrate_path(src, f"valid_{i}_a_1.nii.gz"), vol)
    return write_meta_csv(src.parent / "meta.csv", [meta_row(f"valid_{i}_a_1.nii.gz", (2.0, 2.0), 5.0)
                                                    for i in range(1, n + 1)])


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in folder.rglob("*")}


def test_a_hub_snapshot_of_relative_symlinks_preprocesses_like_plain_files(tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/dataset/... are relative symlinks into blobs/<sha> (no extension);
    here one patient folder is also a symlink to another disk, and the data root a symlink. Every volume is found
    by its link's name, nothing is written beside the data, and the cache equals a plain tree's. Two snapshots
    under --src hold every volume twice: refused, naming both paths (a race on one cache file before)."""
    meta = fake_split(tmp_path / "plain" / "valid_fixed")
    repo = tmp_path / "hub" / "datasets--ibrahimhamamci--CT-RATE"
    snap = repo / "snapshots" / "0123abc" / "dataset" / "valid_fixed"
    for f in sorted((tmp_path / "plain" / "valid_fixed").rglob("*.nii.gz")):
        blob = repo / "blobs" / f"{abs(hash(f.name)):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(f.read_bytes())
        link = snap / f.relative_to(tmp_path / "plain" / "valid_fixed")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    shutil.copytree(tmp_path / "plain" / "valid_fixed" / "valid_3", tmp_path / "disk2" / "valid_3")
    shutil.rmtree(snap / "valid_3")
    (snap / "valid_3").symlink_to(tmp_path / "disk2" / "valid_3")
    (tmp_path / "root").symlink_to(snap.parent.parent)
    before = tree(tmp_path / "hub")
    stats = data.preprocess_dir(tmp_path / "root" / "dataset" / "valid_fixed", tmp_path / "cache", "ctrate", meta,
                                data.PHANTOM, workers=2, progress=False)
    assert (stats["written"], stats["bad"], stats["not_volume"]) == (3, 0, {})
    assert tree(tmp_path / "hub") == before
    plain = data.preprocess_dir(tmp_path / "plain" / "valid_fixed", tmp_path / "plain_cache", "ctrate", meta,
                                data.PHANTOM, progress=False)
    assert plain["written"] == 3
    hub, ref = data.VolumeCache(tmp_path / "cache"), data.VolumeCache(tmp_path / "plain_cache")
    assert hub.names == ref.names == [f"valid_{i}_a_1.nii.gz" for i in (1, 2, 3)]
    assert all(np.array_equal(hub.load(n), ref.load(n)) for n in hub.names)
    shutil.copytree(repo / "snapshots" / "0123abc", repo / "snapshots" / "4567def", symlinks=True)  # valid_3: one
    with pytest.raises(ValueError, match=r"2 volume\(s\) more than once, e.g. valid_1_a_1: .*0123abc.*4567def"):
        data.preprocess_dir(repo, tmp_path / "cache2", "ctrate", meta, data.PHANTOM, progress=False)
    assert not (tmp_path / "cache2").exists()


PREPROCESS_LIMITED = """
import resource, sys
import data
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), resource.RLIM_INFINITY))   # bytes per file
tiny = data.Preset("tiny", (5.0, 5.0, 10.0), (8, 8, 4), (8, 8, 4))   # 640-byte .npy files, ~330-byte manifest lines
print(data.preprocess_dir(sys.argv[1], sys.argv[2], "ctrate", sys.argv[3], tiny, progress=False))
"""


def test_a_cache_write_cut_short_stops_preprocessing_and_the_rerun_mends_the_cache(tmp_path):
    """A file-size limit (EFBIG; a full disk is ENOSPC) while writing the cache. 500 bytes: numpy wrote a 500-byte
    .npy without an error and the cache took it as done. 700 bytes: the third manifest line was cut short, and every
    later preprocess and VolumeCache failed on it with a bare JSONDecodeError. Now the run stops naming the cache,
    the torn line is dropped by the rerun, which finishes the volumes; a cache read before that names the file."""
    meta = fake_split(tmp_path / "valid_fixed")
    run = lambda out, limit: subprocess.run(
        [sys.executable, "-c", PREPROCESS_LIMITED, str(tmp_path / "valid_fixed"), str(out), str(meta), str(limit)],
        capture_output=True, text=True, cwd=Path(data.__file__).parent)
    for limit in (500, 700):
        out = tmp_path / f"cache_{limit}"
        cut = run(out, limit)
        assert cut.returncode == 1 and f"{out}: cannot write the cache (" in cut.stderr, cut.stderr[-2000:]
        assert "make room and rerun" in cut.stderr
        if limit == 700:
            assert not (out / "manifest.jsonl").read_text().endswith("\n")
            with pytest.raises(ValueError, match=r"manifest.jsonl line 3: not valid JSON .* preprocess into .* again"):
                data.VolumeCache(out)
        mended = run(out, 10**6)
        assert mended.returncode == 0, mended.stderr[-2000:]
        cache = data.VolumeCache(out)
        assert cache.names == [f"valid_{i}_a_1.nii.gz" for i in (1, 2, 3)]
        assert [int(cache.load(n).max()) for n in cache.names] == [100, 200, 300]
        assert sorted(p.name for p in out.iterdir()) == [".lock", "bad_files.jsonl", "manifest.jsonl", "preset.json",
                                                          "valid_1_a_1.npy", "valid_2_a_1.npy", "valid_3_a_1.npy"]
