"""Med3D-R1 data: CT-RATE / RAD-ChestCT readers, preprocessing, report labels, task builders, the phantom world.

Every stage reads volumes, reports, labels and questions through this file, and the phantom world is written in the
exact on-disk formats of the real datasets, so one code path serves both (formats: DATA.md, numbers: SPEC.md §1).

    python data.py phantom                      # the whole phantom world in runs/phantom (= data.ensure_phantom())
    python data.py phantom --out DIR            # only its raw dataset: synthetic CT-RATE v2 layout + RAD-ChestCT
    python data.py preprocess --src dataset/valid_fixed --metadata dataset/metadata/validation_metadata.csv \
        --out cache/valid --workers 8                                     # .nii.gz -> int16 .npy (memmap), resumable
    python data.py preprocess --src rad/ --format radchestct --out cache/radchestct
    python data.py label --reports dataset/radiology_text_reports/validation_reports.csv --out sentences/valid.jsonl
    python data.py mmvqa --labels dataset/multi_abnormality_labels/valid_predicted_labels.csv --out mmvqa/valid.json

Choices:
1. Axis convention (X, Y, Z) = (right->left, anterior->posterior, inferior->superior), from the NIfTI affine.
2. Intensities: a file holding air below -100 is already HU (CT-RATE v2) and is never rescaled; otherwise (v1 raw
   values) RescaleSlope/RescaleIntercept from the metadata CSV are applied, once.
3. Spacing comes from the metadata CSV (the v1 headers are placeholders); NaN spacing is an error, never a guess.
4. Resample (trilinear) -> centre crop / pad with -1024 -> clamp [-1000, 1000] -> int16 .npy, memory-mappable.
"""
from __future__ import annotations

import argparse
import ast
import csv
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from concurrent.futures import ThreadPoolExecutor
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ABNORMALITIES = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening"]
METADATA_COLUMNS = (
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,ReconstructionDiameter,"
    "DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,TableHeight,RotationDirection,ExposureTime,"
    "XRayTubeCurrent,Exposure,FilterType,GeneratorPower,FocalSpots,ConvolutionKernel,PatientPosition,RevolutionTime,"
    "SingleCollimationWidth,TotalCollimationWidth,TableSpeed,TableFeedPerRotation,SpiralPitchFactor,"
    "DataCollectionCenterPatient,ReconstructionTargetCenterPatient,ExposureModulationType,CTDIvol,"
    "ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,PhotometricInterpretation,Rows,"
    "Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,ZSpacing,StudyDate").split(",")
REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
RAD_ABNORMALITIES = (
    "air_trapping airspace_disease aneurysm arthritis aspiration atelectasis atherosclerosis bandlike_or_linear "
    "breast_implant breast_surgery bronchial_wall_thickening bronchiectasis bronchiolectasis bronchiolitis bronchitis "
    "cabg calcification cancer cardiomegaly catheter_or_port cavitation chest_tube clip congestion consolidation "
    "coronary_artery_disease cyst debris deformity density dilation_or_ectasia distention emphysema fibrosis fracture "
    "gi_tube granuloma groundglass hardware heart_failure heart_valve_replacement hemothorax hernia honeycombing "
    "infection infiltrate inflammation interstitial_lung_disease lesion lucency lung_resection lymphadenopathy mass "
    "mucous_plugging nodule nodulegr1cm opacity other_path pacemaker_or_defib pericardial_effusion "
    "pericardial_thickening plaque pleural_effusion pleural_thickening pneumonia pneumonitis pneumothorax "
    "postsurgical pulmonary_edema reticulation scarring scattered_calc scattered_nod secretion septal_thickening "
    "soft_tissue staple stent sternotomy suture tracheal_tube transplant tree_in_bud tuberculosis").split()
# RAD-ChestCT's 84 -> CT-RATE's 18 (BrgSA's mapping, DATA.md §4); Mosaic attenuation pattern has no source.
RAD_TO_CTRATE = {
    "Medical material": ["catheter_or_port", "pacemaker_or_defib", "chest_tube", "clip", "staple", "stent", "suture",
                         "breast_implant", "gi_tube", "hardware", "tracheal_tube"],
    "Arterial wall calcification": ["calcification"], "Cardiomegaly": ["cardiomegaly"],
    "Pericardial effusion": ["pericardial_effusion"], "Coronary artery wall calcification": ["calcification"],
    "Hiatal hernia": ["hernia"], "Lymphadenopathy": ["lymphadenopathy"], "Emphysema": ["emphysema"],
    "Atelectasis": ["atelectasis"], "Lung nodule": ["nodule"], "Lung opacity": ["opacity"],
    "Pulmonary fibrotic sequela": ["scarring"], "Pleural effusion": ["pleural_effusion"],
    "Mosaic attenuation pattern": [], "Peribronchial thickening": ["bronchial_wall_thickening"],
    "Consolidation": ["consolidation"], "Bronchiectasis": ["bronchiectasis"],
    "Interlobular septal thickening": ["septal_thickening"]}
KNOWN_BAD = {"train_1267_a_4", "train_11755_a_3", "train_11755_a_4", "train_14384_a_2", "valid_251_a_2"}
HU_MIN, HU_MAX, PAD_HU = -1000, 1000, -1024
NORM_MEAN, NORM_STD = 0.4978, 0.2449  # the published encoder's normalisation (SPEC §1)


@dataclass(frozen=True)
class Preset:
    name: str
    spacing: tuple  # (x, y, z) mm
    shape: tuple    # stored (X, Y, Z)
    crop: tuple     # online crop (X, Y, Z)


REAL = Preset("real", (1.5, 1.5, 3.0), (256, 256, 128), (224, 224, 112))
PHANTOM = Preset("phantom", (5.0, 5.0, 10.0), (72, 72, 36), (64, 64, 32))  # ViT tiny patch (16,16,8) -> 4x4x4 tokens
PRESETS = {"real": REAL, "phantom": PHANTOM}


def volume_key(name: str) -> str:
    """'…/valid_1_a_1.nii.gz' -> 'valid_1_a_1'; 'trn24737.npz' -> 'trn24737' (the stem every file is keyed by)."""
    name = Path(str(name)).name
    for suffix in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def patient_id(name: str) -> str:
    """CT-RATE patient of a volume: 'train_12_a_2.nii.gz' -> 'train_12' (reconstructions share a patient)."""
    return "_".join(volume_key(name).split("_")[:2])


def ctrate_path(split_dir, name: str) -> Path:
    """split_dir/train_12/train_12_a/train_12_a_2.nii.gz (DATA.md §1)."""
    parts = volume_key(name).split("_")
    return Path(split_dir) / "_".join(parts[:2]) / "_".join(parts[:3]) / f"{volume_key(name)}.nii.gz"


# ================================================ volume readers ================================================

class VolumeReadError(ValueError):
    """A volume that cannot be read; the message always names the file."""


def read_metadata(csv_path) -> dict[str, dict]:
    with open(csv_path, newline="") as f:
        return {row["VolumeName"]: row for row in csv.DictReader(f)}


def _parse_list(text: str) -> list[float]:
    return [float(v) for v in ast.literal_eval(text)]


def metadata_spacing(row: dict) -> tuple[float, float, float]:
    """(x, y, z) mm from a metadata row. XYSpacing is DICOM PixelSpacing '[row (y), column (x)]'."""
    try:
        dy, dx = _parse_list(row["XYSpacing"])
        dz = float(row["ZSpacing"])
    except (ValueError, SyntaxError, TypeError, KeyError) as e:
        raise VolumeReadError(f"{row.get('VolumeName')}: unreadable spacing in metadata ({e})") from e
    if not all(math.isfinite(s) and s > 0 for s in (dx, dy, dz)):
        raise VolumeReadError(f"{row.get('VolumeName')}: invalid spacing {dx, dy, dz} in metadata (NaN ZSpacing?)")
    return dx, dy, dz


def is_hu(array: np.ndarray) -> bool:
    """CT-RATE v2 files hold HU (air ~ -1024); v1 files hold raw scanner values (min >= about -10)."""
    return float(array.min()) < -100


def read_ctrate_volume(path, meta_row: dict) -> tuple[np.ndarray, tuple[float, float, float]]:
    """float32 HU array (X, Y, Z) in (R->L, A->P, I->S) order, and its spacing (x, y, z) mm from the metadata row."""
    path = Path(path)
    spacing = metadata_spacing(meta_row)
    try:
        img = nib.load(str(path))
        proxy = img.dataobj  # unscaled ints + header scaling in float32: never nibabel's float64 (~1 GB a volume)
        raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        affine = img.affine
    except Exception as e:  # nibabel raises many types for missing/corrupt/truncated files; name the file
        raise VolumeReadError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3-D volume, got shape {raw.shape}")
    hu = raw.astype(np.float32)
    if (slope, inter) != (1.0, 0.0):
        hu = hu * slope + inter
    if not is_hu(hu):  # v1: raw values -> HU, exactly once
        hu = hu * float(meta_row["RescaleSlope"]) + float(meta_row["RescaleIntercept"])
    to_lps = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                             nib.orientations.axcodes2ornt(("L", "P", "S")))
    return nib.orientations.apply_orientation(hu, to_lps), spacing  # a view: preprocess_volume avoids the copy


def read_radchestct_volume(path, spacing=(0.8, 0.8, 0.8)) -> tuple[np.ndarray, tuple[float, float, float]]:
    """RAD-ChestCT .npz: key 'ct', (Z, Y, X) with index 0 = superior -> float32 HU (X, Y, Z) inferior-first."""
    path = Path(path)
    try:
        with np.load(path) as npz:
            ct = npz["ct"]
    except Exception as e:
        raise VolumeReadError(f"{path}: cannot read RAD-ChestCT npz ({type(e).__name__}: {e})") from e
    if ct.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3-D volume, got shape {ct.shape}")
    return np.ascontiguousarray(ct[::-1].transpose(2, 1, 0), dtype=np.float32), tuple(float(s) for s in spacing)


# ================================================ preprocessing =================================================

def _crop_or_pad(vol: np.ndarray, shape, value) -> np.ndarray:
    out = np.full(shape, value, dtype=vol.dtype)
    src, dst = [], []
    for n, t in zip(vol.shape, shape):
        if n >= t:
            src.append(slice((n - t) // 2, (n - t) // 2 + t)); dst.append(slice(0, t))
        else:
            src.append(slice(0, n)); dst.append(slice((t - n) // 2, (t - n) // 2 + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def preprocess_volume(hu: np.ndarray, spacing, preset: Preset = REAL) -> np.ndarray:
    """HU (X, Y, Z) at `spacing` -> int16 preset.shape: resample, centre crop/pad (-1024), clamp [-1000, 1000]."""
    size = [max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, preset.spacing)]
    # Resample the array in its memory order: a reoriented NIfTI is a flipped / transposed view of nibabel's
    # column-major data, and copying it into (X, Y, Z) order costs ~2 s per CT-RATE volume. Trilinear resampling
    # (align_corners=False) commutes with axis flips and permutations, so they are applied to the small result.
    flips = tuple(i for i, st in enumerate(hu.strides) if st < 0)
    view = np.flip(hu, flips) if flips else hu
    perm = [int(i) for i in np.argsort([-st for st in view.strides], kind="stable")]
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(view.transpose(perm), dtype=np.float32))[None, None]
        x = F.interpolate(x, size=[size[p] for p in perm], mode="trilinear", align_corners=False)[0, 0].numpy()
    x = x.transpose(np.argsort(perm))
    x = _crop_or_pad(np.flip(x, flips) if flips else x, preset.shape, PAD_HU)
    return np.clip(np.rint(x), HU_MIN, HU_MAX).astype(np.int16)


def online_transform(vol: np.ndarray, preset: Preset = REAL, train: bool = False,
                     rng: np.random.Generator | None = None) -> torch.Tensor:
    """int16 (X, Y, Z) -> float32 (1, X', Y', Z') at preset.crop: centre crop (random if train), HU -> [-1, 1],
    then (x - 0.4978) / 0.2449 as the published encoder expects."""
    starts = []
    for n, c in zip(vol.shape, preset.crop):
        hi = max(n - c, 0)
        starts.append(int((rng or np.random.default_rng()).integers(0, hi + 1)) if train else hi // 2)
    vol = vol[tuple(slice(s, s + c) for s, c in zip(starts, preset.crop))]
    if vol.shape != tuple(preset.crop):
        vol = _crop_or_pad(np.asarray(vol), preset.crop, HU_MIN)
    x = np.clip(np.asarray(vol, dtype=np.float32), HU_MIN, HU_MAX) / HU_MAX  # numpy: cheap inside loader workers
    return torch.from_numpy((x - NORM_MEAN) / NORM_STD)[None]


class VolumeCache:
    """A preprocessed cache dir: {stem}.npy (int16, memmap) + manifest.jsonl + preset.json."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        if not (self.dir / "preset.json").exists():
            raise FileNotFoundError(f"{self.dir} is not a preprocessed cache (no preset.json); run "
                                    f"`python data.py preprocess ... --out {self.dir}`")
        p = json.loads((self.dir / "preset.json").read_text())
        self.preset = Preset(p["name"], tuple(p["spacing"]), tuple(p["shape"]), tuple(p["crop"]))
        manifest = self.dir / "manifest.jsonl"
        recs = {r["VolumeName"]: r for r in map(json.loads, open(manifest))} if manifest.exists() else {}
        self.names = sorted(recs)  # sorted: the manifest's order depends on worker timing
        self._files = {volume_key(n): self.dir / r["file"] for n, r in recs.items()}

    def __len__(self):
        return len(self.names)

    def __contains__(self, name) -> bool:
        return volume_key(name) in self._files

    def load(self, name) -> np.ndarray:
        if name not in self:
            raise KeyError(f"volume {name!r} is not in the cache {self.dir}")
        return np.load(self._files[volume_key(name)], mmap_mode="r")


def _worker_init():
    torch.set_num_threads(1)  # one volume per process; also avoids OpenMP thread pools inherited through fork


def _pool(workers: int):
    """Worker processes from a clean forkserver: fork() of a process that already runs torch/OpenMP threads can
    deadlock on a lock inherited in the locked state (seen under pytest)."""
    return multiprocessing.get_context("forkserver").Pool(workers, _worker_init)


def _preprocess_one(job) -> dict:
    name, src, fmt, meta_row, preset, spacing, out_dir = job
    try:
        if fmt == "ctrate":
            if meta_row is None:
                raise VolumeReadError(f"{src}: no row for {name} in the metadata CSV")
            hu, sp = read_ctrate_volume(src, meta_row)
        else:
            hu, sp = read_radchestct_volume(src, spacing)
        vol = preprocess_volume(hu, sp, preset)
    except (VolumeReadError, OSError) as e:
        return {"VolumeName": name, "path": str(src), "error": str(e)}
    out = Path(out_dir) / f"{volume_key(name)}.npy"
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, vol)
    os.replace(tmp, out)  # a crash never leaves a half-written .npy under the final name
    return {"VolumeName": name, "file": out.name, "source": str(src), "spacing": list(sp), "shape": list(vol.shape)}


def preprocess_dir(src, out, fmt="ctrate", metadata=None, preset: Preset = REAL, workers=1,
                   spacing=(0.8, 0.8, 0.8), no_chest=None, progress=True) -> dict:
    """Preprocess every volume under src into out (resumable). Returns counts {'written', 'skipped' (done before),
    'bad' (listed with the reason in out/bad_files.jsonl), 'excluded' (no-chest list and DATA.md's known bad)}."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    if (out / "preset.json").exists() and json.loads((out / "preset.json").read_text()) != json.loads(
            json.dumps(asdict(preset))):
        raise ValueError(f"{out} was preprocessed with another preset ({(out / 'preset.json').read_text()})")
    (out / "preset.json").write_text(json.dumps(asdict(preset)))
    meta = read_metadata(metadata) if metadata else {}
    excluded = set(KNOWN_BAD)
    if no_chest:
        excluded |= {volume_key(l.strip()) for l in open(no_chest) if l.strip()}
    pattern = "*.nii.gz" if fmt == "ctrate" else "*.npz"
    found = sorted(src.rglob(pattern))
    files = [p for p in found if volume_key(p.name) not in excluded]
    manifest = out / "manifest.jsonl"
    done = set()
    if manifest.exists():
        done = {volume_key(json.loads(l)["VolumeName"]) for l in open(manifest)}
        done = {k for k in done if (out / f"{k}.npy").exists()}
    jobs = []
    for p in files:
        name = p.name if fmt == "ctrate" else volume_key(p.name)
        if volume_key(name) not in done:
            jobs.append((name, p, fmt, meta.get(name), preset, spacing, out))
    bad = []
    pool = _pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
    with open(manifest, "a") as man, open(out / "bad_files.jsonl", "w") as badf:
        results = pool.imap_unordered(_preprocess_one, jobs) if pool else map(_preprocess_one, jobs)
        for rec in tqdm(results, total=len(jobs), desc=f"preprocess {src.name}", disable=not progress):
            f = badf if "error" in rec else man
            f.write(json.dumps(rec) + "\n"); f.flush()
            if "error" in rec:
                bad.append(rec)
    if pool:
        pool.close(); pool.join()
    return {"written": len(jobs) - len(bad), "skipped": len(files) - len(jobs), "bad": len(bad),
            "excluded": len(found) - len(files)}


# ================================================ reports and sentence labels =====================================

def read_reports(csv_path) -> dict[str, dict]:
    """{VolumeName: {'findings': str|None, 'impressions': str|None}}; the literal 'Not given.' means absent."""
    def section(text):
        text = (text or "").strip()
        return None if text in ("", "Not given.") else text
    with open(csv_path, newline="") as f:
        return {r["VolumeName"]: {"findings": section(r["Findings_EN"]), "impressions": section(r["Impressions_EN"])}
                for r in csv.DictReader(f)}


def split_sentences(text: str | None) -> list[str]:
    """Split at '.', '!' or '?' followed by white space and a capital/digit/bracket (keeps '3.5 mm' whole)."""
    if not text:
        return []
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])|\n+", text.strip())
    return [p.strip() for p in parts if p.strip()]


_NORMAL = re.compile(
    r"\b(no|not|none|without|absent|free of|normal|unremarkable|within normal limits|patent|open|intact|"
    r"natural|preserved|clear|negative|ruled out|was not|were not|cannot be evaluated|could not be evaluated)\b", re.I)
_ABNORMAL = re.compile(
    r"(nodul|opacit|effusion|calcif|atheroscl|atelecta|emphysem|bulla|consolidat|thicken|bronchiectas|lymphadenopath|"
    r"lymph nodes? (?:up to|measuring|with|of)|hernia|megal|enlarg|ground[- ]glass|fibro|sequela|mosaic|catheter|"
    r"\bport\b|pacemaker|stent|clips?\b|prosthe|sternotomy|postoperative|operated|resect|mass|lesion|cyst|fracture|"
    r"degenerat|osteophyt|spondylo|scoliosis|kyphosis|dilat|aneurysm|infiltrat|pneumothorax|granulom|scar|reticul|"
    r"honeycomb|band|plaque|increased|decreased|herniat|collapse|septal|tree-in-bud|bronchiolect|air trapping|"
    r"hypodens|hyperdens|steatosis|stone|calcul|atroph|hypertroph|metal|wire|tube)", re.I)
_CLAUSE = re.compile(r";|,?\s+\b(?:but|however|whereas|although|while)\b|\.\s", re.I)


def rule_label(sentence: str) -> bool:
    """Offline sentence labeller: True = abnormal. A clause is abnormal when it names a finding and is not negated
    ('No pleural effusion.', '... within normal limits', '... unremarkable' are normal); a sentence is abnormal when
    any of its clauses is ('No effusion, but atelectasis is seen.' is abnormal)."""
    for clause in _CLAUSE.split(sentence):
        if clause and _ABNORMAL.search(clause) and not _NORMAL.search(clause):
            return True
    return False


class OpenAILabeller:
    """Sentence labeller through any OpenAI-compatible chat-completions endpoint (the paper used DeepSeek-V3).

    One request per report, its unseen sentences numbered; the reply must be a JSON list of 0/1. Replies are cached
    per (model, sentence) in cache_dir/labels.jsonl, so a rerun costs nothing. Failures raise RuntimeError."""

    PROMPT = ("You label sentences from chest CT radiology reports. For each numbered sentence answer 1 if it "
              "describes an abnormal finding and 0 if it describes a normal finding or absence of disease. "
              "Reply with only a JSON list of 0/1 integers, one per sentence, in order.\n\n")

    def __init__(self, base_url=None, model=None, api_key=None, cache_dir="runs/label_cache", timeout=60.0,
                 retries=3):
        import openai
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        self.model = model or os.environ.get("OPENAI_MODEL")
        if not self.base_url or not self.model:
            raise ValueError("OpenAI labeller needs a base URL and a model: --base-url/--model or the "
                             "OPENAI_BASE_URL/OPENAI_MODEL environment variables")
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY", "none"),
                                    timeout=timeout, max_retries=0)
        self.retries = retries
        self.cache_file = Path(cache_dir) / "labels.jsonl"
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        self.cache, self.lock = {}, threading.Lock()
        if self.cache_file.exists():
            for line in open(self.cache_file):
                r = json.loads(line)
                self.cache[(r["model"], r["sentence"])] = r["abnormal"]

    def _ask(self, sentences: list[str]) -> list[bool]:
        text = self.PROMPT + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(sentences))
        error = None
        for attempt in range(self.retries + 1):
            try:
                reply = self.client.chat.completions.create(
                    model=self.model, temperature=0.0, messages=[{"role": "user", "content": text}])
                content = reply.choices[0].message.content
                labels = json.loads(content[content.index("["): content.rindex("]") + 1])
                if len(labels) != len(sentences) or any(int(v) not in (0, 1) for v in labels):
                    raise ValueError(f"expected {len(sentences)} labels of 0/1, got {content!r}")
                return [bool(int(v)) for v in labels]
            except Exception as e:  # network, HTTP status, or unparsable reply: retry, then fail loudly
                error = e
                time.sleep(min(2 ** attempt, 10) * 0.1)
        raise RuntimeError(f"OpenAI labeller failed at {self.base_url} (model {self.model}) after "
                           f"{self.retries + 1} attempts: {type(error).__name__}: {error}")

    def __call__(self, sentences: list[str]) -> list[bool]:
        todo = list(dict.fromkeys(s for s in sentences if (self.model, s) not in self.cache))
        if todo:
            answers = self._ask(todo)
            with self.lock, open(self.cache_file, "a") as f:
                for s, a in zip(todo, answers):
                    self.cache[(self.model, s)] = a
                    f.write(json.dumps({"model": self.model, "sentence": s, "abnormal": a}) + "\n")
        return [self.cache[(self.model, s)] for s in sentences]


def label_reports(reports: dict, out_path, labeller=None, workers=1, progress=True) -> None:
    """Write one JSON line per volume: {VolumeName, findings: [[sentence, abnormal], ...]|null, impressions: ...}.
    workers > 1 labels reports in parallel threads (for a remote labeller)."""
    labeller = labeller or (lambda sents: [rule_label(s) for s in sents])

    def label(item):
        name, rep = item
        rec = {"VolumeName": name}
        for key in ("findings", "impressions"):
            sents = split_sentences(rep[key])
            rec[key] = [[s, a] for s, a in zip(sents, labeller(sents))] if sents else None
        return rec
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    with open(tmp, "w") as f, ThreadPoolExecutor(workers) as pool:
        for rec in tqdm(pool.map(label, reports.items()), total=len(reports), desc="label", disable=not progress):
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, out_path)


def read_sentence_labels(jsonl) -> dict[str, dict]:
    """{VolumeName: {'findings': [(sentence, abnormal)]|None, 'impressions': [...]|None}}."""
    out = {}
    for line in open(jsonl):
        r = json.loads(line)
        out[r["VolumeName"]] = {k: [(s, bool(a)) for s, a in r[k]] if r[k] else None
                                for k in ("findings", "impressions")}
    return out


# ================================================ labels =========================================================

def read_labels(csv_path) -> dict[str, np.ndarray]:
    """CT-RATE multi-abnormality CSV -> {VolumeName: int64 (18,)} in ABNORMALITIES order (column order checked)."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if header[1:] != ABNORMALITIES:
            raise ValueError(f"{csv_path}: label columns differ from CT-RATE's 18: {header[1:]}")
        return {row[0]: np.array([int(float(v)) for v in row[1:]], dtype=np.int64) for row in reader if row}


def read_radchestct_labels(csv_path) -> dict[str, np.ndarray]:
    """RAD-ChestCT labels (84 collapsed columns, or the 84x52 'abnormality*location' file) -> {NoteAcc_DEID:
    float (18,)} in ABNORMALITIES order; NaN where the mapping has no source (Mosaic attenuation pattern)."""
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        abn = [h.split("*")[0] for h in header[1:]]
        index = defaultdict(list)
        for i, a in enumerate(abn):
            index[a].append(i)
        out = {}
        for row in reader:
            if not row:
                continue
            vals = np.array([float(v) for v in row[1:]])
            labels = np.full(len(ABNORMALITIES), np.nan)
            for k, name in enumerate(ABNORMALITIES):
                cols = [i for src in RAD_TO_CTRATE[name] for i in index[src]]
                if cols:
                    labels[k] = float(vals[cols].max() > 0)
            out[row[0]] = labels
        return out


# ================================================ VQA =============================================================

_TASKS = {"report_generation": "report", "long_answer": "open", "short_answer": "yes_no",
          "multiple_choice": "multiple_choice"}
_TAGS = re.compile(r"<image>|<(?:report_generation|long_answer|short_answer|multiple_choice)>")


def read_vqa(json_path) -> list[dict]:
    """CT-CHAT VQA JSON (LLaVA style) or Med3D-R1 VQA JSON -> [{VolumeName, question, answer, kind}], one per
    question/answer turn; text-only items (no image) are skipped; <image> and task tokens are stripped."""
    out = []
    for item in json.load(open(json_path)):
        if "conversations" in item:
            if not item.get("image"):
                continue
            turns = item["conversations"]
            for q, a in zip(turns[0::2], turns[1::2]):
                task = next((t for t in _TASKS if f"<{t}>" in q["value"]), item.get("id", "").rsplit("_", 1)[0])
                kind = _TASKS.get(task, "open")
                answer = a["value"].strip()
                if kind == "yes_no" and not re.match(r"(yes|no)\b", answer, re.I):
                    kind = "open"
                out.append({"VolumeName": Path(item["image"]).name, "question": _TAGS.sub("", q["value"]).strip(),
                            "answer": answer, "kind": kind})
        elif "Question" in item:
            choices = {c: item.get(f"Choice {c}") for c in "ABCD" if item.get(f"Choice {c}")}
            question, answer = item["Question"].strip(), str(item["Answer"]).strip()
            if choices and {v.strip().lower() for v in choices.values()} <= {"yes", "no"}:
                kind = "yes_no"
            elif choices:
                kind = "multiple_choice"
                question += " " + " ".join(f"{c}) {v}" for c, v in choices.items())
                if item.get("Answer Choice"):
                    answer = f"{item['Answer Choice']}) {answer}"
            else:
                kind = "yes_no" if answer.lower().rstrip(".") in ("yes", "no") else "open"
            out.append({"VolumeName": Path(item["Image Path"]).name, "question": question, "answer": answer,
                        "kind": kind})
        else:
            raise ValueError(f"{json_path}: unknown VQA item format (keys {sorted(item)})")
    return out


# ================================================ MMVQA ===========================================================

MMVQA_QUESTION = "What abnormality is present in this CT scan?"


def build_mmvqa(labels: dict, seed: int, per_label: bool = False, exclude=(), stats: dict | None = None) -> list[dict]:
    """Official MCQ items: key = an abnormality present in the volume, three distractors absent from it, answer
    letters balanced over A-D; deterministic for a seed. NaN labels (unmapped) and the abnormality names in
    `exclude` are never options. One item per volume (a random positive) or, with per_label, one per positive.
    Volumes without a positive or with fewer than three negatives are skipped and counted in `stats`."""
    rng = np.random.default_rng(seed)
    allowed = np.array([a not in exclude for a in ABNORMALITIES])
    queries, stats = [], stats if stats is not None else {}
    stats.update(no_positive=0, few_negatives=0)
    for name, lab in labels.items():
        lab = np.asarray(lab, dtype=float)
        pos = np.flatnonzero((lab == 1) & allowed)
        neg = np.flatnonzero((lab == 0) & allowed)
        if len(pos) == 0:
            stats["no_positive"] += 1
        elif len(neg) < 3:
            stats["few_negatives"] += 1
        else:
            for key in (pos if per_label else [rng.choice(pos)]):
                queries.append((name, int(key), [int(d) for d in rng.choice(neg, 3, replace=False)]))
    slots = rng.permutation(np.arange(len(queries)) % 4)  # each letter is the key equally often
    items = []
    for (name, key, distractors), slot in zip(queries, slots):
        opts = distractors[:slot] + [key] + distractors[slot:]
        options = {l: ABNORMALITIES[k] for l, k in zip("ABCD", opts)}
        question = MMVQA_QUESTION + " " + " ".join(f"{l}) {v}" for l, v in options.items())
        items.append({"VolumeName": name, "question": question, "options": options, "answer": "ABCD"[slot]})
    stats["items"] = len(items)
    return items


def rl_subset(names, frac: float = 0.05, seed: int = 0) -> list[str]:
    """The RL subset: all volumes of a seeded `frac` of the patients (reconstructions never split)."""
    patients = sorted({patient_id(n) for n in names})
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(patients, max(1, round(frac * len(patients))), replace=False).tolist())
    return [n for n in names if patient_id(n) in chosen]


# ================================================ prompts and targets (every stage's text formats) ==============

REPORT_INSTRUCTION = ("Write the radiology report of this chest CT scan: the findings inside <finding></finding>, "
                      "then the impression inside <impression></impression>.")


def report_instruction(sentences: dict) -> str:
    """REPORT_INSTRUCTION, adapted when the report lacks a section."""
    if not sentences.get("impressions"):
        return "Write the findings of this chest CT scan inside <finding></finding>."
    if not sentences.get("findings"):
        return "Write the impression of this chest CT scan inside <impression></impression>."
    return REPORT_INSTRUCTION


def report_target(sentences: dict) -> list[tuple[str, bool]]:
    """Segments (text, abnormal) whose concatenation is '<finding>…</finding><impression>…</impression>' (a missing
    section omitted); tags are their own normal segments, sentences after the first carry their leading space."""
    segments = []
    for key, tag in (("findings", "finding"), ("impressions", "impression")):
        if sentences.get(key):
            segments.append((f"<{tag}>", False))
            segments += [((" " if i else "") + s, bool(a)) for i, (s, a) in enumerate(sentences[key])]
            segments.append((f"</{tag}>", False))
    return segments


THINK_FORMAT = ("Think step by step inside one <think></think> block, then give only the letter of the correct "
                "option inside one <answer></answer> block. Write nothing outside the two blocks.")
NO_THINK_FORMAT = "Give only the letter of the correct option inside one <answer></answer> block, nothing else."


def mmvqa_prompt(item: dict, think: bool = True) -> str:
    return f"{item['question']}\n{THINK_FORMAT if think else NO_THINK_FORMAT}"


def mmvqa_target(item: dict, abnormal_names_present: list[str], think: bool = True) -> str:
    """The warm-up completion: the option the scan shows, each option in turn, the key, then what else it shows.

    Every claim is checkable against the report. The order is chosen for a small LLM: naming the present option
    first takes one look at the image, restricted to the option names; the walk copies the options in order and
    gives each name the stance it had the last time it was written, a plain in-context copy (hence "X present" with
    no colon: the stance follows the name directly); the key is the letter next to "present". The list of all
    findings comes last: before the walk it gave each name a second earlier mention to copy from (measured with the
    true labels as image: 42 % of think answers right with the list first, 82 % with it last)."""
    key = item["answer"]
    answer = f"<answer>{key}</answer>"
    if not think:
        return answer
    present = list(abnormal_names_present)  # names spelled as in the options: the rationale copies them verbatim
    shown = (", ".join(present[:-1]) + " and " + present[-1] if len(present) > 1 else present[0]) if present \
        else "no abnormality"
    walk = " ".join(f"{l}) {v} {'present' if l == key else 'not seen'}." for l, v in item["options"].items())
    return (f"<think>Of the options, {item['options'][key]} present. {walk} The answer is {key}. "
            f"The scan shows {shown}.</think>{answer}")


# ================================================ the phantom world ==============================================
# Synthetic chest CTs in the exact CT-RATE v2 / RAD-ChestCT formats. Each abnormality is drawn big and contrasty
# enough to survive the phantom preset (5, 5, 10) mm; size, place and intensity vary per patient; reports, labels,
# VQA and images are generated from one patient description, so they agree. Version 3 drew the lung findings
# bigger (emphysema, nodules, opacity, bronchiectasis), mosaic attenuation as darker lobules and the lung density
# less variable between patients: a linear probe on the CLIP encoder's tokens went from a mean validation AUC of
# 0.83 to 0.87 (mosaic 0.36 -> 0.74, emphysema 0.56 -> 0.72); lung nodule and opacity stay near 0.5.

PHANTOM_PREVALENCE = np.linspace(0.18, 0.36, len(ABNORMALITIES))[np.random.default_rng(7).permutation(18)]
PHANTOM_ALL_NEGATIVE = 0.06
PHANTOM_RAD_SPACING = (4.0, 4.0, 4.0)
PHANTOM_VERSION = "3"  # bump when the generator changes, so stale worlds are noticed
A = {name: i for i, name in enumerate(ABNORMALITIES)}


class _Canvas:
    """A float32 HU volume in (X, Y, Z) = (R->L, A->P, I->S) with millimetre coordinates centred on the volume."""

    def __init__(self, shape, spacing):
        self.vol = np.full(shape, -1000.0, np.float32)
        self.spacing = spacing
        self.axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]

    def grid(self, lo, hi):
        """Bounding box (slices) of the mm box [lo, hi] and its broadcast coordinates."""
        box = tuple(slice(int(np.searchsorted(ax, l - s)), int(np.searchsorted(ax, h + s)))
                    for ax, l, h, s in zip(self.axes, lo, hi, self.spacing))
        x, y, z = (ax[b] for ax, b in zip(self.axes, box))
        return box, (x[:, None, None], y[None, :, None], z[None, None, :])

    def paint(self, box, mask, value, where=None):
        if where is not None:
            mask = mask & where[box]
        self.vol[box][mask] = value

    def ellipsoid(self, c, r, value, where=None):
        c, r = np.asarray(c, float), np.asarray(r, float)
        box, (x, y, z) = self.grid(c - r, c + r)
        d = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2
        self.paint(box, d <= 1, value, where)

    def capsule(self, p0, p1, radius, value, where=None):
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        box, (x, y, z) = self.grid(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        d = p1 - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / max(d @ d, 1e-6), 0, 1)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        self.paint(box, dist2 <= radius ** 2, value, where)


def _phantom_patient(rng: np.random.Generator, force_normal=False) -> dict:
    """One patient: anatomy jitter, the 18 labels and every finding's parameters."""
    labels = np.zeros(18, bool) if force_normal or rng.random() < PHANTOM_ALL_NEGATIVE \
        else rng.random(18) < PHANTOM_PREVALENCE
    u = lambda lo, hi: float(rng.uniform(lo, hi))
    side = lambda: int(rng.choice([-1, 1]))  # -1 = patient right, +1 = patient left (X grows to the left)
    p = {"labels": labels, "scale": u(0.93, 1.07), "shift": (u(-6, 6), u(-6, 6), u(-10, 10)),
         "lung_hu": u(-860, -845), "heart_scale": u(0.92, 1.05), "cardiomegaly": u(1.28, 1.4),
         "vessels": rng.uniform(-1, 1, (40, 3)), "age": int(rng.integers(25, 90)), "sex": str(rng.choice(["M", "F"]))}
    p["device"] = dict(pacemaker=rng.random() < 0.35, side=side(), z=u(70, 100))
    p["aortic_calc"] = dict(arc0=u(0, 6.3), arc=u(2.0, 4.0), z0=u(-120, -40), length=u(70, 140), hu=u(900, 1300))
    p["peff"] = dict(t=u(12, 18), hu=u(0, 20))
    p["coronary"] = [(u(-0.6, 0.9), u(-0.2, 0.5), u(7, 9)) for _ in range(int(rng.integers(3, 5)))]
    p["hernia"] = dict(r=u(24, 32), hu=u(15, 35))
    p["nodes"] = [(side() * u(20, 38), u(-40, 10), u(10, 70), u(12, 16)) for _ in range(int(rng.integers(3, 6)))]
    p["emph"] = [(side(), u(-0.5, 0.5), u(-0.4, 0.4), u(0.1, 0.7), u(18, 28)) for _ in range(int(rng.integers(8, 13)))]
    p["atel"] = dict(side=side(), hu=u(15, 40), z=u(-0.4, -0.2))
    p["nodule"] = dict(side=side(), lobe=str(rng.choice(["upper", "lower"])), r=u(14, 19), hu=u(100, 200),
                       pos=[(u(-0.45, 0.45), u(-0.45, 0.3), u(0.25, 0.65)) for _ in range(int(rng.integers(1, 4)))])
    p["opacity"] = dict(side=side(), lobe=str(rng.choice(["upper", "lower"])), r=u(30, 40), hu=u(-420, -320),
                        pos=(u(-0.3, 0.3), u(-0.3, 0.3), u(0.25, 0.5)))
    p["fibrosis"] = dict(side=side(), hu=u(-80, 0), cap=u(25, 40),
                         strands=rng.uniform(-1, 1, (int(rng.integers(3, 6)), 4)))
    p["effusion"] = dict(side=side(), bilateral=rng.random() < 0.3, t=u(22, 40), hu=u(5, 20))
    p["mosaic"] = dict(phase=rng.uniform(0, 6.3, 3), amp=u(90, 130))
    p["consolidation"] = dict(side=side(), r=u(28, 38), hu=u(20, 45), pos=(u(-0.3, 0.3), u(-0.1, 0.3), u(0.3, 0.5)))
    p["bronchiectasis"] = dict(side=side(), hu=u(-20, 20), tubes=rng.uniform(-1, 1, (int(rng.integers(8, 12)), 2)))
    p["septal"] = dict(phase=u(0, 22), hu=u(-400, -300))
    return p


def _render(p: dict, shape, spacing, rng: np.random.Generator) -> np.ndarray:
    """Draw patient p on a grid -> float32 HU (X, Y, Z)."""
    cv, L, s = _Canvas(shape, spacing), p["labels"], p["scale"]
    sx, sy, sz = p["shift"]
    P = lambda x, y, z: (x * s + sx, y * s + sy, z * s + sz)  # anatomy position in mm
    # body: fat rim, muscle/soft tissue, mediastinal fat
    cv.ellipsoid(P(0, 0, 0), (155 * s, 115 * s, 1e4), -90.0)
    cv.ellipsoid(P(0, 0, 0), (140 * s, 100 * s, 1e4), 40.0)
    lungs = [(P(k * 72, 5, 15), (52 * s, 76 * s, 140 * s)) for k in (-1, 1)]  # right, left
    for c, r in lungs:
        cv.ellipsoid(c, r, p["lung_hu"])
    cv.ellipsoid(P(0, -20, 30), (28 * s, 45 * s, 60 * s), -80.0)  # mediastinal fat
    cv.capsule(P(25, 45, -150), P(25, 45, 70), 13 * s, 40.0)  # descending aorta
    cv.capsule(P(0, -20, -20), P(0, -20, 70), 15 * s, 40.0)  # ascending aorta
    cv.capsule(P(0, -20, 70), P(25, 45, 70), 13 * s, 40.0)  # arch
    h = p["heart_scale"] * (p["cardiomegaly"] if L[A["Cardiomegaly"]] else 1.0)
    heart_c, heart_r = P(15, -30, -55), np.array([55, 45, 50]) * s * h
    peff = p["peff"]["t"] if L[A["Pericardial effusion"]] else 0
    cv.ellipsoid(heart_c, heart_r + peff + 6, -90.0)  # epicardial fat
    if peff:
        cv.ellipsoid(heart_c, heart_r + peff, p["peff"]["hu"])
    cv.ellipsoid(heart_c, heart_r, 50.0)
    cv.capsule(P(0, -10, 70), P(0, -10, 200), 9 * s, -1000.0)  # trachea
    for k in (-1, 1):
        cv.capsule(P(0, -10, 70), P(k * 42, 0, 40), 6 * s, -1000.0)  # main bronchi
    cv.capsule(P(6, 25, -140), P(6, 25, 200), 8 * s, 30.0)  # esophagus
    cv.capsule(P(0, 80, -400), P(0, 80, 400), 20 * s, 350.0)  # vertebral bodies
    cv.capsule(P(0, 105, -400), P(0, 105, 400), 8 * s, 20.0)  # spinal canal
    cv.capsule(P(-15, -98, -60), P(15, -98, 120), 9 * s, 300.0)  # sternum
    body_rx, body_ry = 140 * s, 100 * s
    for zr in np.arange(-160, 200, 36):  # ribs: bone arcs in the chest wall
        zc = zr * s + sz
        box, (x, y, z) = cv.grid((sx - body_rx, sy - body_ry, zc - 6), (sx + body_rx, sy + body_ry, zc + 6))
        d = ((x - sx) / body_rx) ** 2 + ((y - sy) / body_ry) ** 2
        cv.paint(box, (d < 0.97) & (d > 0.8) & (np.abs(z - zc) < 6) & (y > sy - 60 * s), 320.0)
    cv.ellipsoid(P(-45, 0, -205), (95 * s, 85 * s, 70 * s), 55.0)  # liver under the right hemidiaphragm
    cv.ellipsoid(P(60, -10, -200), (45 * s, 40 * s, 45 * s), 25.0)  # stomach
    cv.ellipsoid(P(60, -10, -175), (35 * s, 30 * s, 15 * s), -950.0)  # gastric air
    lung = np.zeros(shape, bool)
    for c, r in lungs:
        box, (x, y, z) = cv.grid(np.subtract(c, r), np.add(c, r))
        inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
        lung[box] |= inside & (cv.vol[box] < -700)
    def at(k, rel):  # a point inside lung k (-1 right, +1 left) at normalised coordinates rel
        c, r = lungs[(k + 1) // 2]
        return tuple(c[i] + rel[i] * r[i] for i in range(3))
    for v in p["vessels"]:  # normal pulmonary vessels, small and soft
        k = 1 if v[0] > 0 else -1
        cv.capsule(at(k, (-0.6 * k, 0, 0.1)), at(k, (v[0] * 0.3 + 0.3 * k, v[1] * 0.6, v[2] * 0.6)), 2.5, -60.0, lung)
    # ---- findings (lung ones restricted to the lungs)
    if L[A["Mosaic attenuation pattern"]]:
        ph, amp = p["mosaic"]["phase"], p["mosaic"]["amp"]
        x, y, z = np.meshgrid(*cv.axes, indexing="ij", sparse=True)
        pattern = np.sign(np.sin(x / 18 + ph[0]) * np.sin(y / 18 + ph[1]) * np.sin(z / 22 + ph[2]))
        darker = np.where(pattern > 0, -1.2, 0.3)  # air-trapping lobules darker, the rest slightly denser
        cv.vol[lung] += (amp * np.broadcast_to(darker, shape))[lung]
    if L[A["Emphysema"]]:
        for k, rx, ry, rz, r in p["emph"]:
            cv.ellipsoid(at(k, (rx, ry, rz)), (r, r, r), -990.0, lung)
    if L[A["Interlobular septal thickening"]]:
        x, y, z = np.meshgrid(*cv.axes, indexing="ij", sparse=True)
        ph = p["septal"]["phase"]
        lines = (np.abs((x + ph) % 22 - 11) > 8.5) | (np.abs((y + ph) % 22 - 11) > 8.5)
        cv.vol[lung & np.broadcast_to(lines & (z < 60 + sz), shape)] = p["septal"]["hu"]
    if L[A["Pulmonary fibrotic sequela"]]:
        f = p["fibrosis"]
        c, r = lungs[(f["side"] + 1) // 2]
        cv.vol[lung & (cv.axes[2] > c[2] + r[2] - f["cap"])[None, None, :]] = f["hu"]  # apical pleuroparenchymal cap
        for a, b, c_, d in f["strands"]:  # and bands running down from it
            cv.capsule(at(f["side"], (0.4 * a, 0.5 * b, 0.8 + 0.1 * c_)), at(f["side"], (0.6 * a, 0.6 * d, 0.35)),
                       5.0, f["hu"], lung)
    if L[A["Bronchiectasis"]]:
        b = p["bronchiectasis"]
        for a, c_ in b["tubes"]:
            p0, p1 = at(b["side"], (0.5 * a, 0.4 * c_, -0.65)), at(b["side"], (0.5 * a, 0.4 * c_, -0.15))
            cv.capsule(p0, p1, 13.0, b["hu"], lung)  # thick-walled, dilated bronchi
            cv.capsule(p0, p1, 6.0, -1000.0, lung)
    if L[A["Peribronchial thickening"]]:
        for k in (-1, 1):
            for end in ((0.7 * k, 0.1, -0.1), (0.6 * k, -0.2, 0.45), (0.5 * k, 0.3, -0.45)):
                cv.capsule(at(k, (-0.75 * k, 0, 0.15)), at(k, end), 10.0, 10.0, lung)
                cv.capsule(at(k, (-0.75 * k, 0, 0.15)), at(k, end), 4.5, -1000.0, lung)
    if L[A["Lung opacity"]]:
        o = p["opacity"]
        rel = (o["pos"][0], o["pos"][1], o["pos"][2] * (1 if o["lobe"] == "upper" else -1))
        cv.ellipsoid(at(o["side"], rel), (o["r"], o["r"] * 0.9, o["r"] * 1.2), o["hu"], lung)
    if L[A["Consolidation"]]:
        o = p["consolidation"]
        c = at(o["side"], (o["pos"][0], o["pos"][1], -o["pos"][2]))
        cv.ellipsoid(c, (o["r"], o["r"], o["r"] * 1.3), o["hu"], lung)
        cv.capsule(np.add(c, (0, 0, o["r"])), np.subtract(c, (0, 0, o["r"])), 3.0, -900.0, lung)  # air bronchogram
    if L[A["Lung nodule"]]:
        o = p["nodule"]
        for i, (rx, ry, rz) in enumerate(o["pos"]):  # the first is the largest
            r = o["r"] * (1 - 0.15 * i)
            cv.ellipsoid(at(o["side"], (rx, ry, rz if o["lobe"] == "upper" else -rz)), (r, r, r), o["hu"], lung)
    if L[A["Atelectasis"]]:
        o = p["atel"]  # middle lobe / lingula, next to the heart
        cv.ellipsoid(at(o["side"], (-0.4 * o["side"], -0.55, o["z"])), (26 * s, 22 * s, 40 * s), o["hu"], lung)
    if L[A["Pleural effusion"]]:
        o = p["effusion"]
        for k in ((-1, 1) if o["bilateral"] else (o["side"],)):
            c, r = lungs[(k + 1) // 2]
            t = o["t"] * (1 if k == o["side"] else 0.6)
            box, (x, y, z) = cv.grid(np.subtract(c, r), np.add(c, r))
            rest = 1 - ((x - c[0]) / r[0]) ** 2 - ((z - c[2]) / r[2]) ** 2
            back = c[1] + r[1] * np.sqrt(np.clip(rest, 0, None))  # posterior lung border at (x, z)
            cv.paint(box, (y > back - t) & (z < c[2] + 20), o["hu"], lung)
    if L[A["Lymphadenopathy"]]:
        for x, y, z, r in p["nodes"]:
            cv.ellipsoid(P(x, y, z), (r, r, r * 1.2), 45.0)
    if L[A["Hiatal hernia"]]:
        o = p["hernia"]
        c = P(8, 40, -105)
        cv.ellipsoid(c, (o["r"],) * 3, o["hu"])
        cv.ellipsoid(np.add(c, (0, 0, o["r"] * 0.45)), (o["r"] * 0.8, o["r"] * 0.8, o["r"] * 0.45), -950.0)
    if L[A["Arterial wall calcification"]]:
        o = p["aortic_calc"]
        for c0, c1, r in ((P(25, 45, -150), P(25, 45, 70), 13 * s), (P(0, -20, -20), P(0, -20, 70), 15 * s)):
            box, (x, y, z) = cv.grid((c0[0] - r - 4, c0[1] - r - 4, c0[2]), (c1[0] + r + 4, c1[1] + r + 4, c1[2]))
            rho, ang = np.hypot(x - c0[0], y - c0[1]), np.arctan2(y - c0[1], x - c0[0])
            arc = (ang - o["arc0"]) % (2 * np.pi) < o["arc"]
            cv.paint(box, (rho > r - 2) & (rho < r + 4) & arc & (z > o["z0"] + sz) & (z < o["z0"] + sz + o["length"]),
                     o["hu"])
    if L[A["Coronary artery wall calcification"]]:
        for a, b, r in p["coronary"]:  # spots on the anterior-left heart surface
            pos = heart_c + heart_r * np.array([np.sin(a) * np.cos(b), -np.cos(a) * np.cos(b), np.sin(b)])
            cv.ellipsoid(pos, (r, r, r), 1400.0)
    if L[A["Medical material"]]:
        d = p["device"]
        k = 1 if d["pacemaker"] else d["side"]
        gen = P(k * 75, -88, d["z"])
        cv.ellipsoid(gen, (16, 6, 14) if d["pacemaker"] else (9, 9, 9), 2500.0)
        tip = np.add(heart_c, (-20, -10, 0)) if d["pacemaker"] else P(-20, -25, -20)
        cv.capsule(gen, P(k * 20, -40, 90), 3.5, 2500.0)
        cv.capsule(P(k * 20, -40, 90), tip, 3.5, 2500.0)
    cv.vol += rng.normal(0, 12, shape).astype(np.float32)  # quantum noise
    return cv.vol


_SIDE = {-1: "right", 1: "left"}
_REGIONS = [  # (region, its abnormalities, normal sentence variants) in report order
    ("airway", ["Peribronchial thickening", "Bronchiectasis"],
     ["Trachea and both main bronchi are open.", "The trachea and both main bronchi are patent."]),
    ("mediastinum", [], ["Mediastinal structures could not be evaluated optimally because contrast material was not "
                         "given.", "Since contrast material was not given, mediastinal structures were not evaluated "
                         "optimally."]),
    ("heart", ["Cardiomegaly"], ["Heart contour and size are normal.", "The heart is of normal size."]),
    ("pericardium", ["Pericardial effusion"], ["No pericardial effusion or thickening was detected.",
                                               "Pericardial effusion-thickening was not observed."]),
    ("aorta", ["Arterial wall calcification"], ["Thoracic aorta diameter and wall are normal.",
                                                "The thoracic aorta is of normal calibre without calcification."]),
    ("coronary", ["Coronary artery wall calcification"], ["No calcification was detected in the coronary arteries."]),
    ("nodes", ["Lymphadenopathy"], ["No lymph nodes of pathological size were detected in the mediastinal and hilar "
                                    "regions.", "Mediastinal and hilar lymph nodes are within normal limits."]),
    ("esophagus", ["Hiatal hernia"], ["The esophagus is of normal calibre and no hiatal hernia was detected.",
                                      "Hiatal hernia was not observed."]),
    ("devices", ["Medical material"], []),
    ("lungs", ["Emphysema", "Mosaic attenuation pattern", "Interlobular septal thickening",
               "Pulmonary fibrotic sequela", "Lung opacity", "Consolidation", "Lung nodule", "Atelectasis"],
     ["When examined in the lung parenchyma window, no mass or infiltrative lesion was detected in either lung.",
      "The lung parenchyma is unremarkable.", "No nodule, mass or infiltration was detected in both lungs."]),
    ("pleura", ["Pleural effusion"], ["No pleural effusion or pneumothorax was detected.",
                                      "Pleural spaces are clear without effusion."]),
    ("abdomen", [], ["Upper abdominal organs included in the sections are unremarkable.",
                     "Upper abdominal organs in the sections are of normal appearance."]),
    ("bones", [], ["No lytic or destructive lesion was detected in the bone structures.",
                   "Bone structures are intact."])]


_FINDING_TEXT = {  # name -> (findings sentence variants, impression); {side} {lobe} {mm} are filled per patient
    "Medical material": (["A port catheter is seen in the {side} anterior chest wall, with its tip in the right "
                          "atrium."], "Port catheter in place."),
    "Medical material/pacemaker": (["A cardiac pacemaker is seen in the left anterior chest wall, with its lead "
                                    "extending into the right ventricle."], "Pacemaker in place."),
    "Arterial wall calcification": (["Atherosclerotic calcified plaques are observed in the wall of the thoracic "
                                     "aorta.", "Calcific atherosclerotic changes are seen in the aortic wall."],
                                    "Aortic atherosclerosis."),
    "Cardiomegaly": (["The heart is enlarged, consistent with cardiomegaly.", "Cardiomegaly is observed."],
                     "Cardiomegaly."),
    "Pericardial effusion": (["Pericardial effusion measuring {mm} mm in thickness is observed."],
                             "Pericardial effusion."),
    "Coronary artery wall calcification": (["Calcified plaques are observed in the coronary arteries.",
                                            "Coronary artery calcifications are present."],
                                           "Coronary artery calcification."),
    "Hiatal hernia": (["A hiatal hernia is observed at the esophagogastric junction.",
                       "A sliding-type hiatal hernia is present."], "Hiatal hernia."),
    "Lymphadenopathy": (["Lymph nodes up to {mm} mm in short axis are seen in the mediastinum.",
                         "Mediastinal lymphadenopathy is present, the largest node measuring {mm} mm."],
                        "Mediastinal lymphadenopathy."),
    "Emphysema": (["Centrilobular emphysematous changes are seen in both upper lobes.",
                   "Emphysematous areas are observed in both lungs."], "Emphysema."),
    "Atelectasis": (["Subsegmental atelectasis is seen in the {lobe}.", "Atelectatic changes are observed in the "
                     "{lobe}."], "Atelectasis in the {lobe}."),
    "Lung nodule": (["A {mm} mm solid nodule is observed in the {side} {lobe} lobe.",
                     "A solid nodule measuring {mm} mm is seen in the {side} {lobe} lobe."],
                    "Pulmonary nodule in the {side} {lobe} lobe."),
    "Lung nodule/several": (["Solid nodules up to {mm} mm are observed in the {side} {lobe} lobe."],
                            "Pulmonary nodules in the {side} {lobe} lobe."),
    "Lung opacity": (["A ground-glass opacity is seen in the {side} {lobe} lobe."],
                     "Ground-glass opacity in the {side} lung."),
    "Pulmonary fibrotic sequela": (["Apical pleuroparenchymal thickening and fibrotic bands consistent with "
                                    "sequelae are seen in the {side} lung."],
                                   "Fibrotic sequelae."),
    "Pleural effusion": (["Pleural effusion measuring {mm} mm in its thickest part is seen in the {side} hemithorax."],
                         "Pleural effusion on the {side}."),
    "Pleural effusion/bilateral": (["Bilateral pleural effusion, thicker on the {side}, is observed."],
                                   "Bilateral pleural effusion."),
    "Mosaic attenuation pattern": (["A mosaic attenuation pattern is observed in both lungs."],
                                   "Mosaic attenuation pattern, small airway disease may be considered."),
    "Peribronchial thickening": (["Peribronchial thickening is observed in both lungs.",
                                  "Bronchial wall thickening is seen bilaterally."], "Peribronchial thickening."),
    "Consolidation": (["A consolidation area with air bronchograms is seen in the {side} lower lobe."],
                      "Consolidation in the {side} lower lobe, pneumonia should be considered."),
    "Bronchiectasis": (["Cylindrical bronchiectasis is observed in the {side} lower lobe."], "Bronchiectasis."),
    "Interlobular septal thickening": (["Interlobular septal thickening is observed in the periphery of both lungs."],
                                       "Interlobular septal thickening.")}


def _phantom_text(p: dict, rng: np.random.Generator) -> tuple[list, list]:
    """Report sentences [(sentence, abnormal)] for findings and impression, normal sentences first."""
    L, pick = p["labels"], lambda opts: str(rng.choice(opts))
    side = lambda key: _SIDE[p[key]["side"]]
    values = {"Medical material": dict(side=side("device")),
              "Atelectasis": dict(lobe="lingula" if p["atel"]["side"] > 0 else "right middle lobe"),
              "Pericardial effusion": dict(mm=f"{p['peff']['t']:.0f}"),
              "Lymphadenopathy": dict(mm=f"{2 * max(n[3] for n in p['nodes']):.0f}"),
              "Lung nodule": dict(side=side("nodule"), lobe=p["nodule"]["lobe"], mm=f"{2 * p['nodule']['r']:.0f}"),
              "Lung opacity": dict(side=side("opacity"), lobe=p["opacity"]["lobe"]),
              "Pulmonary fibrotic sequela": dict(side=side("fibrosis")),
              "Pleural effusion": dict(side=side("effusion"), mm=f"{p['effusion']['t']:.0f}"),
              "Consolidation": dict(side=side("consolidation")), "Bronchiectasis": dict(side=side("bronchiectasis"))}
    variant = {"Medical material": "/pacemaker" if p["device"]["pacemaker"] else "",
               "Pleural effusion": "/bilateral" if p["effusion"]["bilateral"] else "",
               "Lung nodule": "/several" if len(p["nodule"]["pos"]) > 1 else ""}
    abnormal = {}
    for name in ABNORMALITIES:
        sentences, impression = _FINDING_TEXT[name + variant.get(name, "")]
        abnormal[name] = (pick(sentences).format(**values.get(name, {})), impression.format(**values.get(name, {})))
    normal, abn, imp = [], [], []
    for region, names, variants in _REGIONS:
        present = [n for n in names if L[A[n]]]
        if not present and variants:
            normal.append((pick(variants), False))
        for n in present:
            abn.append((abnormal[n][0], True))
            imp.append((abnormal[n][1], True))
    if not imp:
        imp = [(pick(["No significant pathology was detected in the chest.", "Normal chest CT."]), False)]
    return normal + abn, imp


def _phantom_vqa(name: str, p: dict, findings: list, impression: list, rng: np.random.Generator, n0: int) -> list:
    """CT-CHAT-style VQA items for one volume: report generation, an open question, yes/no turns, a choice."""
    present = [a for a in ABNORMALITIES if p["labels"][A[a]]]
    absent = [a for a in ABNORMALITIES if not p["labels"][A[a]]]
    turn = lambda q, a, task, img=True: [{"from": "human", "value": ("<image>\n" if img else "") + f"{q} <{task}>"},
                                         {"from": "gpt", "value": a}]
    report = " ".join(s for s, _ in findings) + " Impression: " + " ".join(s for s, _ in impression)
    items = [{"id": f"report_generation_{n0}", "image": name, "conversations": turn(str(rng.choice(
        ["Can you generate the report for the following chest CT image?", "Please write the radiology report of "
         "this chest CT scan."])), report, "report_generation")}]
    lung = [s for s, a in findings if a and re.search(r"lung|lobe|lingula|hemithorax|bilateral", s)]
    if rng.random() < 0.5:
        q = "What are the findings in the lungs and pleura?"
        a = " ".join(lung) or "No abnormality is seen in the lungs."
    else:
        q = "Which abnormalities are present in this scan?"
        a = ("The scan shows " + ", ".join(x.lower() for x in present) + ".") if present else "No abnormality is seen."
    items.append({"id": f"long_answer_{n0}", "image": name, "conversations": turn(q, a, "long_answer")})
    convo = []
    for k in range(2):
        pool = present if (present and rng.random() < 0.5) else absent
        ask = str(rng.choice(pool))
        convo += turn(f"Is there {ask.lower()} in this scan?", "Yes." if ask in present else "No.", "short_answer",
                      img=(k == 0))
    items.append({"id": f"short_answer_{n0}", "image": name, "conversations": convo})
    if present and len(absent) >= 3:
        opts = [str(rng.choice(present))] + [str(x) for x in rng.choice(absent, 3, replace=False)]
        order = rng.permutation(4)
        opts = [opts[i] for i in order]
        key = int(np.flatnonzero(order == 0)[0])
        q = "Which of the following findings is present in this scan? " + " ".join(
            f"({l}) {o}" for l, o in zip("abcd", opts))
        items.append({"id": f"multiple_choice_{n0}", "image": name,
                      "conversations": turn(q, f"({'abcd'[key]}) {opts[key]}", "multiple_choice")})
    return items


def _phantom_patient_job(job) -> list[dict]:
    """Generate one patient's volumes (1-2 reconstructions), write them, return their CSV/VQA rows."""
    seed, split, pid, n_recon, out = job
    rng = np.random.default_rng([seed, {"train": 0, "valid": 1, "rad": 2}[split], pid])
    p = _phantom_patient(rng)
    findings, impression = _phantom_text(p, rng)
    rows = []
    for r in range(1, n_recon + 1):
        if split == "rad":  # RAD-ChestCT: (Z, Y, X) superior-first npz at PHANTOM_RAD_SPACING, clipped int16 HU
            p["labels"][A["Arterial wall calcification"]] = p["labels"][A["Coronary artery wall calcification"]]
            vol = _render(p, (90, 90, 88), PHANTOM_RAD_SPACING, rng)
            name = f"tst{pid:05d}"
            ct = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16).transpose(2, 1, 0)[::-1]
            np.savez(Path(out) / f"{name}.npz", ct=np.ascontiguousarray(ct))
            rows.append({"name": name, "labels": p["labels"].astype(int).tolist()})
            continue
        sxy, sz = (float(rng.uniform(3.8, 4.4)), 8.0) if r == 1 else (float(rng.uniform(4.3, 4.8)), 10.0)
        nxy, nz = int(round(360 / sxy)), int(round(float(rng.uniform(330, 370)) / sz))
        vol = np.clip(np.rint(_render(p, (nxy, nxy, nz), (sxy, sxy, sz), rng)), -1024, 3071).astype(np.int16)
        name = f"{split}_{pid}_a_{r}.nii.gz"
        origin = np.array([(nxy - 1) / 2 * sxy, (nxy - 1) / 2 * sxy, -(nz - 1) / 2 * sz])  # RAS mm of voxel 0
        affine = np.diag([-sxy, -sxy, sz, 1.0])  # voxel order L, P, S in RAS world = CT-RATE's LPS arrays
        affine[:3, 3] = origin
        img = nib.Nifti1Image(vol, affine)
        img.header.set_xyzt_units("mm")
        path = ctrate_path(Path(out) / f"{split}_fixed", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        maker = str(rng.choice(["Philips", "Siemens Healthineers", "PNMS", "SIEMENS"], p=[0.6, 0.28, 0.06, 0.06]))
        meta = {c: "" for c in METADATA_COLUMNS}
        meta.update(VolumeName=name, Manufacturer=maker, SeriesDescription="PHANTOM", ManufacturerModelName="Phantom",
                    PatientSex=p["sex"], PatientAge=f"{p['age']:03d}Y", ReconstructionDiameter="360",
                    GantryDetectorTilt="0", PatientPosition="HFS", ConvolutionKernel=["B", "YA"][r - 1],
                    ImagePositionPatient=f"[{-origin[0]}, {-origin[1]}, {origin[2]}]",
                    ImageOrientationPatient="[1, 0, 0, 0, 1, 0]", SliceLocation=f"{origin[2]}", SamplesPerPixel="1",
                    PhotometricInterpretation="MONOCHROME2", Rows=str(nxy), Columns=str(nxy),
                    XYSpacing=f"[{sxy}, {sxy}]",
                    RescaleIntercept="-8192" if maker == "Siemens Healthineers" else "-1024",
                    RescaleSlope="1", NumberofSlices=str(nz), ZSpacing=str(sz), StudyDate="20240101")
        rows.append({"name": name, "meta": meta, "labels": p["labels"].astype(int).tolist(),
                     "findings": findings, "impression": impression,
                     "vqa": _phantom_vqa(name, p, findings, impression, rng, 0)})
    return rows


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def make_phantom(out, n_train=400, n_valid=100, n_rad=200, seed=0, workers=None, progress=True) -> None:
    """Write the phantom world under out/: CT-RATE v2 layout (train_fixed/, valid_fixed/, metadata/,
    multi_abnormality_labels/, radiology_text_reports/, vqa/) and radchestct/ (volumes/*.npz, labels CSV)."""
    out = Path(out)
    rng = np.random.default_rng([seed, 99])
    (out / "radchestct" / "volumes").mkdir(parents=True, exist_ok=True)
    jobs, pid = [], {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        left, pid[split] = n, 0
        while left > 0:
            pid[split] += 1
            k = min(left, int(rng.integers(1, 3)))  # one or two reconstructions per scan, as in CT-RATE
            jobs.append((seed, split, pid[split], k, out))
            left -= k
    jobs += [(seed, "rad", i + 1, 1, out / "radchestct" / "volumes") for i in range(n_rad)]
    workers = workers or min(os.cpu_count() or 1, 8)
    with _pool(workers) as pool:
        results = list(tqdm(pool.imap(_phantom_patient_job, jobs, chunksize=4), total=len(jobs), desc="phantom",
                            disable=not progress))
    by_split = defaultdict(list)
    for job, rows in zip(jobs, results):
        by_split[job[1]] += rows
    for split, csv_split in (("train", "train"), ("valid", "validation")):
        rows = by_split[split]
        _write_csv(out / "metadata" / f"{csv_split}_metadata.csv", METADATA_COLUMNS,
                   [[r["meta"][c] for c in METADATA_COLUMNS] for r in rows])
        (out / "metadata" / f"no_chest_{split}.txt").write_text("")
        _write_csv(out / "multi_abnormality_labels" / f"{split}_predicted_labels.csv", ["VolumeName"] + ABNORMALITIES,
                   [[r["name"]] + r["labels"] for r in rows])
        text = lambda sents: " ".join(s for s, _ in sents)
        reports = []
        for r in rows:
            h = int(hashlib.md5(r["name"].encode()).hexdigest(), 16) % 100  # a few reports lack a section
            reports.append([r["name"], "Chest CT for evaluation.", "Non-contrast chest CT.",
                            "Not given." if h == 0 else text(r["findings"]),
                            "Not given." if h in (1, 2) else text(r["impression"])])
        _write_csv(out / "radiology_text_reports" / f"{csv_split}_reports.csv", REPORT_COLUMNS, reports)
        vqa = [dict(item, id=f"{item['id'].rsplit('_', 1)[0]}_{i}") for i, item in
               enumerate(it for r in rows for it in r["vqa"])]
        (out / "vqa").mkdir(parents=True, exist_ok=True)
        (out / "vqa" / f"{split}_vqa.json").write_text(json.dumps(vqa, indent=1))
    rad84 = []
    for r in by_split["rad"]:
        row = np.zeros(len(RAD_ABNORMALITIES), int)
        for k, name in enumerate(ABNORMALITIES):
            if r["labels"][k] and RAD_TO_CTRATE[name]:
                row[RAD_ABNORMALITIES.index(RAD_TO_CTRATE[name][0])] = 1
        rad84.append([r["name"]] + [f"{v:.1f}" for v in row])
    _write_csv(out / "radchestct" / "imgtest_abnormality_labels_84.csv", ["NoteAcc_DEID"] + RAD_ABNORMALITIES, rad84)


def phantom_paths(root="runs/phantom") -> dict[str, Path]:
    root = Path(root)
    ds = root / "dataset"
    return {"root": root, "dataset": ds, "train_volumes": ds / "train_fixed", "valid_volumes": ds / "valid_fixed",
            "radchestct_volumes": ds / "radchestct" / "volumes",
            "train_cache": root / "cache" / "train", "valid_cache": root / "cache" / "valid",
            "radchestct_cache": root / "cache" / "radchestct",
            "train_metadata": ds / "metadata" / "train_metadata.csv",
            "valid_metadata": ds / "metadata" / "validation_metadata.csv",
            "train_reports": ds / "radiology_text_reports" / "train_reports.csv",
            "valid_reports": ds / "radiology_text_reports" / "validation_reports.csv",
            "train_labels": ds / "multi_abnormality_labels" / "train_predicted_labels.csv",
            "valid_labels": ds / "multi_abnormality_labels" / "valid_predicted_labels.csv",
            "radchestct_labels": ds / "radchestct" / "imgtest_abnormality_labels_84.csv",
            "train_vqa": ds / "vqa" / "train_vqa.json", "valid_vqa": ds / "vqa" / "valid_vqa.json",
            "train_sentences": root / "sentences" / "train.jsonl",
            "valid_sentences": root / "sentences" / "valid.jsonl",
            "mmvqa_train": root / "mmvqa" / "train.json", "mmvqa_rl": root / "mmvqa" / "train_rl.json",
            "mmvqa_valid": root / "mmvqa" / "valid.json", "mmvqa_radchestct": root / "mmvqa" / "radchestct.json"}


PHANTOM_DEFAULTS = {"n_train": 400, "n_valid": 100, "n_rad": 200, "seed": 0, "rl_frac": 0.25}


def ensure_phantom(root="runs/phantom", n_train=None, n_valid=None, n_rad=None, seed=None, rl_frac=None,
                   progress=False) -> dict[str, Path]:
    """Build whatever part of the phantom world under root is missing (dataset, caches, sentence labels, MMVQA
    files) and return its paths. Idempotent, safe under concurrent callers (file lock), about 20 s at the default
    size on 2 idle cores. The phantom RL subset is rl_frac of the training patients (the paper's 5 % of a few hundred
    phantom patients would leave too few questions)."""
    paths = phantom_paths(root)
    root, ds = paths["root"], paths["dataset"]
    root.mkdir(parents=True, exist_ok=True)
    asked = {"n_train": n_train, "n_valid": n_valid, "n_rad": n_rad, "seed": seed, "rl_frac": rl_frac}
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks (or parallel tests) wait for the first builder
        # a parameter left out keeps the value the existing world was built with (else the default)
        built = json.loads((root / "phantom.json").read_text()) if (root / "phantom.json").exists() else {}
        params = {k: v if v is not None else built.get(k, PHANTOM_DEFAULTS[k]) for k, v in asked.items()}
        n_train, n_valid, n_rad, seed, rl_frac = params.values()
        if (root / "phantom.json").exists() and json.loads((root / "phantom.json").read_text()) != params:
            raise ValueError(f"{root} holds a phantom world built with {(root / 'phantom.json').read_text()}, "
                             f"not {params}: delete it or pass another root")
        if not (root / "phantom.json").exists():
            (root / "phantom.json").write_text(json.dumps(params))
        if (ds / ".done").exists() and (ds / ".done").read_text() != PHANTOM_VERSION:
            raise RuntimeError(f"{root} was built by an older phantom generator; delete it (rm -rf {root}) and rerun")
        if not (ds / ".done").exists():
            tmp = root / "dataset.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            make_phantom(tmp, n_train, n_valid, n_rad, seed, progress=progress)
            (tmp / ".done").write_text(PHANTOM_VERSION)
            for derived in ("dataset", "cache", "sentences", "mmvqa"):  # never keep parts made from another dataset
                shutil.rmtree(root / derived, ignore_errors=True)
            os.replace(tmp, ds)
        for key, src, fmt, meta in (("train_cache", "train_volumes", "ctrate", "train_metadata"),
                                    ("valid_cache", "valid_volumes", "ctrate", "valid_metadata"),
                                    ("radchestct_cache", "radchestct_volumes", "radchestct", None)):
            if not (paths[key] / ".done").exists():
                stats = preprocess_dir(paths[src], paths[key], fmt, paths[meta] if meta else None, PHANTOM,
                                       workers=min(os.cpu_count() or 1, 8), spacing=PHANTOM_RAD_SPACING,
                                       progress=progress)
                if stats["bad"]:
                    raise RuntimeError(f"phantom preprocessing failed, see {paths[key] / 'bad_files.jsonl'}")
                (paths[key] / ".done").touch()
        for split in ("train", "valid"):
            if not paths[f"{split}_sentences"].exists():
                label_reports(read_reports(paths[f"{split}_reports"]), paths[f"{split}_sentences"], progress=progress)
        train, valid = read_labels(paths["train_labels"]), read_labels(paths["valid_labels"])
        rl_names = set(rl_subset(list(train), rl_frac, seed))
        for key, labels, s in (("mmvqa_train", train, seed), ("mmvqa_valid", valid, seed + 1),
                               ("mmvqa_rl", {n: v for n, v in train.items() if n in rl_names}, seed + 2),
                               ("mmvqa_radchestct", read_radchestct_labels(paths["radchestct_labels"]), seed + 3)):
            if not paths[key].exists():
                write_json(paths[key], build_mmvqa(labels, s))
    return paths


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ================================================ command line ===================================================

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    # phantom
    a = sub.add_parser("phantom", help="write the phantom world (CT-RATE v2 layout + RAD-ChestCT subset)")
    where = a.add_mutually_exclusive_group()
    where.add_argument("--out", help="write only the raw dataset (CT-RATE/RAD-ChestCT formats) here")
    where.add_argument("--root", default="runs/phantom", help="build the whole world here (= data.ensure_phantom: "
                                                               "dataset, caches, sentence labels, MMVQA files)")
    a.add_argument("--n-train", type=int, default=400)
    a.add_argument("--n-valid", type=int, default=100)
    a.add_argument("--n-rad", type=int, default=200)
    a.add_argument("--seed", type=int, default=0)
    # preprocess
    a = sub.add_parser("preprocess", help=".nii.gz / .npz -> int16 .npy cache (resumable)")
    a.add_argument("--src", required=True, help="folder searched recursively for *.nii.gz (ctrate) or *.npz")
    a.add_argument("--metadata", help="CT-RATE metadata CSV (required for --format ctrate)")
    a.add_argument("--out", required=True)
    a.add_argument("--format", choices=["ctrate", "radchestct"], default="ctrate")
    a.add_argument("--preset", choices=list(PRESETS), default="real")
    a.add_argument("--workers", type=int, default=1)
    a.add_argument("--no-chest", help="no_chest_{train,valid}.txt: volumes to exclude")
    a.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 0.8), help="RAD-ChestCT voxel size (mm)")
    # label
    a = sub.add_parser("label", help="split reports into sentences and label each normal/abnormal")
    a.add_argument("--reports", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--labeller", choices=["rules", "openai"], default="rules")
    a.add_argument("--base-url", help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL)")
    a.add_argument("--model", help="model name (default $OPENAI_MODEL)")
    a.add_argument("--api-key", help="default $OPENAI_API_KEY")
    a.add_argument("--cache", default="runs/label_cache", help="reply cache folder")
    a.add_argument("--timeout", type=float, default=60.0)
    a.add_argument("--retries", type=int, default=3)
    a.add_argument("--workers", type=int, default=1, help="parallel requests (openai labeller)")
    # mmvqa
    a = sub.add_parser("mmvqa", help="build MMVQA questions (official MCQ format) from a label CSV")
    a.add_argument("--labels", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--format", choices=["ctrate", "radchestct"], default="ctrate")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--per-label", action="store_true", help="one question per positive label, not per volume")
    a.add_argument("--rl-frac", type=float, help="keep only this fraction of patients (the RL subset, e.g. 0.05)")
    args = ap.parse_args(argv)

    if args.cmd == "phantom":
        if args.out:
            make_phantom(args.out, args.n_train, args.n_valid, args.n_rad, args.seed)
            print(f"phantom dataset written to {args.out}")
        else:
            paths = ensure_phantom(args.root, args.n_train, args.n_valid, args.n_rad, args.seed, progress=True)
            print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    elif args.cmd == "preprocess":
        if args.format == "ctrate" and not args.metadata:
            ap.error("--metadata is required for --format ctrate")
        stats = preprocess_dir(args.src, args.out, args.format, args.metadata, PRESETS[args.preset], args.workers,
                               tuple(args.spacing), args.no_chest)
        print(f"{stats['written']} written, {stats['skipped']} already done, {stats['excluded']} excluded, "
              f"{stats['bad']} bad (see {Path(args.out) / 'bad_files.jsonl'})")
    elif args.cmd == "label":
        labeller = None
        if args.labeller == "openai":
            labeller = OpenAILabeller(args.base_url, args.model, args.api_key, args.cache, args.timeout, args.retries)
        label_reports(read_reports(args.reports), args.out, labeller, args.workers)
        print(f"sentence labels written to {args.out}")
    elif args.cmd == "mmvqa":
        labels = read_labels(args.labels) if args.format == "ctrate" else read_radchestct_labels(args.labels)
        if args.rl_frac:
            keep = set(rl_subset(list(labels), args.rl_frac, args.seed))
            labels = {n: v for n, v in labels.items() if n in keep}
        stats = {}
        items = build_mmvqa(labels, args.seed, args.per_label, stats=stats)
        write_json(args.out, items)
        print(f"{stats['items']} questions written to {args.out}; skipped {stats['no_positive']} volumes without a "
              f"positive label and {stats['few_negatives']} with fewer than three negatives")


if __name__ == "__main__":
    main()
