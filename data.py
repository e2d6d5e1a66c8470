"""Med3D-R1 data: CT-RATE / RAD-ChestCT readers, preprocessing, sentence labels, VQA / MMVQA, every stage's prompts.

Every stage reads its inputs through this file, from where `paths(root)` says they lie; the phantom world (phantom/)
is written in the real datasets' on-disk formats, so one code path serves both. Deliberate choices:
1. Axes (X, Y, Z) = (right->left, anterior->posterior, inferior->superior): a v2 file is turned so by its NIfTI
   affine; a v1 file (placeholder header) or one without qform and sform is stored so and used as stored.
2. A file holding air below -100 is already HU (CT-RATE v2) and is never rescaled; v1 raw values are rescaled once,
   and must then show air and tissue in HU; a header's own scaling counts as that one rescale. The manifest records
   these decisions per file.
3. Spacing comes from the metadata CSV (the v1 headers are placeholders); NaN spacing is an error, never a guess, and
   so is a v2 header whose voxel sizes are neither 1 mm placeholders nor the CSV's.
4. A file that cannot be read is listed with its reason in bad_files.jsonl and skipped, never replaced by another.

Run:
  python data.py preprocess --src dataset/valid_fixed --metadata dataset/metadata/validation_metadata.csv \\
      --out cache/valid --workers 8                                     # .nii.gz -> int16 .npy (memmap), resumable
  python data.py preprocess --src rad/ --format radchestct --out cache/radchestct
  python data.py label --reports dataset/radiology_text_reports/validation_reports.csv --out sentences/valid.jsonl
  python data.py mmvqa --labels dataset/multi_abnormality_labels/valid_predicted_labels.csv --out mmvqa/valid.json
"""
from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from runtime import (at_least, free_space, lock_folder, make_parser, pid_alive, read_appended, unlock_folder,
                     writable_dir, write_atomic)

REPORT_COLUMNS = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
# CT-RATE's 18 abnormalities, in its label columns' order, and the RAD-ChestCT labels each is read from (BrgSA's
# mapping; no official one exists); Mosaic attenuation pattern has no source.
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
ABNORMALITIES = list(RAD_TO_CTRATE)
MAPPED = {s for sources in RAD_TO_CTRATE.values() for s in sources}
KNOWN_BAD = {"train_1267_a_4", "train_11755_a_3", "train_11755_a_4", "train_14384_a_2", "valid_251_a_2"}
HU_MIN, HU_MAX, PAD_HU = -1000, 1000, -1024
NORM_MEAN, NORM_STD = 0.4978, 0.2449  # the published encoder's normalisation
RAD_SPACING = (0.8, 0.8, 0.8)  # RAD-ChestCT's isotropic voxel (mm): its .npz files store none
LABEL_VALUES = ("0", "0.0", "1", "1.0")  # a label cell in CT-RATE's and RAD-ChestCT's labels CSVs


@dataclass(frozen=True)
class Preset:
    name: str
    spacing: tuple  # (x, y, z) mm
    shape: tuple    # stored (X, Y, Z)
    crop: tuple     # online crop (X, Y, Z)


REAL = Preset("real", (1.5, 1.5, 3.0), (256, 256, 128), (224, 224, 112))
PHANTOM = Preset("phantom", (5.0, 5.0, 10.0), (72, 72, 36), (64, 64, 32))  # ViT tiny patch (16,16,8) -> 4x4x4 tokens
PRESETS = {"real": REAL, "phantom": PHANTOM}


_VOLUME_EXT = re.compile(r"\.(nii\.gz|nii|npz|npy)$")


def volume_key(name: str) -> str:
    """'…/valid_1_a_1.nii.gz' -> 'valid_1_a_1'; 'trn24737.npz' -> 'trn24737' (the stem every file is keyed by)."""
    return _VOLUME_EXT.sub("", str(name).rstrip("/").rpartition("/")[2])   # no Path: called per manifest line


def patient_id(name: str) -> str:
    """CT-RATE patient of a volume: 'train_12_a_2.nii.gz' -> 'train_12' (reconstructions share a patient)."""
    return "_".join(volume_key(name).split("_")[:2])


def ctrate_path(split_dir, name: str) -> Path:
    """split_dir/train_12/train_12_a/train_12_a_2.nii.gz, CT-RATE's folder layout."""
    key = volume_key(name)
    parts = key.split("_")
    return Path(split_dir) / "_".join(parts[:2]) / "_".join(parts[:3]) / f"{key}.nii.gz"


# ================================================ volumes: readers and preprocessing ============================
class VolumeReadError(ValueError):
    """A volume that cannot be read; the message always names the file."""


def read_text(path) -> str:
    """A UTF-8 text file (a byte-order mark read past); other bytes (Excel's cp1252, UTF-16) are an error naming the
    file and line, never a decoder's bare position."""
    raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: byte {raw[e.start]:#04x} is not UTF-8 (a file saved as cp1252 or "
                         f"UTF-16?): save it as UTF-8") from None


def read_csv_rows(csv_path, key: str = "VolumeName") -> dict[str, dict]:
    """{row[key]: row} of a CSV with a header (UTF-8); a row of empty cells reads as a blank line. No key column, a
    column named twice, no row, a row of another length than the header or without a key, or a key listed twice with
    other values is an error naming the file (and line)."""
    reader, out = csv.DictReader(io.StringIO(read_text(csv_path), newline="")), {}
    if key not in (reader.fieldnames or []):
        raise ValueError(f"{csv_path}: no {key} column (header starts {(reader.fieldnames or [])[:3]})")
    if twice := sorted({c for c in reader.fieldnames if reader.fieldnames.count(c) > 1}):
        raise ValueError(f"{csv_path}: the header names column {twice[0]!r} twice (a later one would hide the first)")
    for row in reader:
        if None in row.values() or None in row:
            raise ValueError(f"{csv_path} line {reader.line_num}: not the header's {len(reader.fieldnames)} fields")
        if not row[key].strip():
            if any(v.strip() for v in row.values()):
                raise ValueError(f"{csv_path} line {reader.line_num}: no {key}")
            continue                                     # a row of empty cells (a spreadsheet's cleared row)
        if out.get(row[key], row) != row:
            raise ValueError(f"{csv_path} line {reader.line_num}: {row[key]} is listed twice, with other values")
        out[row[key]] = row
    if not out:
        raise ValueError(f"{csv_path}: a header and no rows")
    return out


def read_metadata(csv_path) -> dict[str, dict]:
    return read_csv_rows(csv_path)


def metadata_spacing(row: dict) -> tuple[float, float, float]:
    """(x, y, z) mm from a metadata row. XYSpacing is DICOM PixelSpacing '[row (y), column (x)]'."""
    try:
        dy, dx = [float(v) for v in ast.literal_eval(row["XYSpacing"])]
        dz = float(row["ZSpacing"])
    except (ValueError, SyntaxError, TypeError, KeyError) as e:
        raise VolumeReadError(f"{row.get('VolumeName')}: unreadable spacing in metadata ({e})") from e
    if not all(np.isfinite(s) and s > 0 for s in (dx, dy, dz)):
        raise VolumeReadError(f"{row.get('VolumeName')}: invalid spacing {dx, dy, dz} in metadata (NaN ZSpacing?)")
    return dx, dy, dz


def is_hu(array: np.ndarray) -> bool:
    """CT-RATE v2 files hold HU (air ~ -1024); v1 files hold raw scanner values (min >= about -10); NaN is ignored."""
    return bool((array < -100).any())


def check_finite(hu: np.ndarray, path) -> np.ndarray:
    """hu, or a VolumeReadError counting its NaN / infinite voxels: NaN never becomes 0 HU in a cache."""
    if np.isfinite(hu).all():
        return hu
    n = {"NaN": int(np.isnan(hu).sum()), "infinite": int(np.isinf(hu).sum())}
    raise VolumeReadError(f"{path}: {', '.join(f'{v} {k} voxels' for k, v in n.items() if v)} (of {hu.size})")


def read_ctrate_volume(path, meta_row: dict, how: dict | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """float32 HU array (X, Y, Z) in (R->L, A->P, I->S) order, and its spacing (x, y, z) mm from the metadata row.
    `how`, if given, receives what was decided for this file: {"values": ..., "orientation": ...}."""
    path = Path(path)
    spacing = metadata_spacing(meta_row)
    try:
        img = nib.load(str(path))
        proxy = img.dataobj  # unscaled ints + header scaling in float32: never nibabel's float64 (~1 GB a volume)
        raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
        affine = img.affine
        with nib.openers.ImageOpener(str(path)) as f:  # the stored scl_slope: nibabel reads an infinite one as 1
            scl_slope = float(img.header_class.from_fileobj(f)["scl_slope"])
    except Exception as e:  # nibabel raises many types for missing/corrupt/truncated files; name the file
        raise VolumeReadError(f"{path}: cannot read NIfTI ({type(e).__name__}: {e})") from e
    if np.isinf(scl_slope):  # NaN or 0 means "not scaled"; a NaN scl_inter with a valid slope fails nib.load
        raise VolumeReadError(f"{path}: NIfTI header scl_slope is {scl_slope}")
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3-D volume, got shape {raw.shape}")
    hu = raw.astype(np.float32)                   # a copy: scaled in place below (an expression would hold two more)
    scaled, scaling = (slope, inter) != (1.0, 0.0), f"the header's scl_slope {slope:g}, scl_inter {inter:g}"
    if scaled:
        hu *= slope
        hu += inter
    how = {} if how is None else how
    if is_hu(hu):  # v2: HU as stored, turned to (L, P, S) by its affine (a view: preprocess_volume avoids the copy)
        if not (hu > -300).any():   # e.g. the intercept applied twice: air near -2048, the body near -1000
            raise VolumeReadError(f"{path}: no tissue (no voxel above -300 HU; values {hu.min():g} to {hu.max():g}): "
                                  f"not the HU a CT holds, shifted by a rescale too many?")
        values = f"HU as stored (v2), after {scaling}" if scaled else "HU as stored (v2)"
        if not (img.header["qform_code"] or img.header["sform_code"]):   # nibabel would make up an (L, A, S) affine
            how.update(values=values, orientation="LPS as stored (no qform or sform in the header)")
            return check_finite(hu, path), spacing
        if not (np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 1e-12):
            raise VolumeReadError(f"{path}: the NIfTI affine is singular or not finite (orientation unknown): "
                                  f"{np.round(affine[:3], 3).tolist()}")
        ornt = nib.orientations
        to_lps = ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("L", "P", "S")))
        zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))[to_lps[:, 0].argsort()]   # the header's voxel sizes (x, y, z)
        if not (np.allclose(zooms, 1) or np.allclose(zooms, spacing, rtol=0.02)):   # 1 mm: a placeholder
            raise VolumeReadError(f"{path}: the header's voxel sizes {tuple(np.round(zooms, 4).tolist())} mm are not "
                                  f"the metadata CSV's {spacing} (a resampled file, or another volume's row?)")
        hu = ornt.apply_orientation(hu, to_lps)
        how.update(values=values, orientation="".join(nib.aff2axcodes(affine)) + " -> LPS by the affine")
        return check_finite(hu, path), spacing
    if scaled:                                    # never two rescales: the header's, then the CSV's
        raise VolumeReadError(f"{path}: {scaling} do not give HU (no voxel below -100), and the metadata CSV's "
                              f"rescale would be a second one")
    cells = {k: meta_row.get(k) for k in ("RescaleSlope", "RescaleIntercept")}      # v1: raw values -> HU, once
    try:
        rescale = {k: float(v) for k, v in cells.items()}
    except (TypeError, ValueError):   # e.g. an empty cell, as pandas writes a missing value
        raise VolumeReadError(f"{path}: RescaleSlope, RescaleIntercept {list(cells.values())} in the metadata CSV "
                              f"are not numbers (v1 raw values cannot become HU)") from None
    if bad := [f"{k} is {v}" for k, v in rescale.items() if not np.isfinite(v)]:
        raise VolumeReadError(f"{path}: {', '.join(bad)} in the metadata CSV (v1 raw values cannot become HU)")
    hu *= rescale["RescaleSlope"]
    hu += rescale["RescaleIntercept"]
    check_finite(hu, path)
    if not (((hu > -1200) & (hu < -100)).any() and (hu > -300).any()):  # e.g. an HU file without air, or [0, 1] data
        raise VolumeReadError(f"{path}: neither HU (no voxel below -100) nor raw values (after the metadata CSV's "
                              f"rescale {rescale}: no air in (-1200, -100) HU or no tissue above -300 HU; values "
                              f"{hu.min():.0f} to {hu.max():.0f})")
    how.update(values=f"raw, rescaled by the metadata CSV {rescale} (v1)", orientation="LPS as stored (v1 header)")
    return hu, spacing


def read_radchestct_volume(path, spacing=RAD_SPACING) -> tuple[np.ndarray, tuple[float, float, float]]:
    """RAD-ChestCT .npz: key 'ct', (Z, Y, X) with index 0 = superior -> float32 HU (X, Y, Z) inferior-first."""
    path = Path(path)
    try:
        with np.load(path) as npz:
            ct = npz["ct"]
    except Exception as e:
        raise VolumeReadError(f"{path}: cannot read RAD-ChestCT npz ({type(e).__name__}: {e})") from e
    if ct.ndim != 3:
        raise VolumeReadError(f"{path}: expected a 3-D volume, got shape {ct.shape}")
    hu = check_finite(np.ascontiguousarray(ct[::-1].transpose(2, 1, 0), dtype=np.float32), path)
    if not (is_hu(hu) and (hu > -300).any()):    # air near -1000 and tissue: not shifted, scaled or normalised
        raise VolumeReadError(f"{path}: 'ct' is not HU (values {hu.min():g} to {hu.max():g}; RAD-ChestCT holds HU in "
                              f"[-1000, 1000], air near -1000)")
    return hu, tuple(float(s) for s in spacing)


def _crop_or_pad(vol: np.ndarray, shape, value) -> np.ndarray:
    """Centre crop every axis longer than `shape`, centre pad every shorter one with `value`."""
    out = np.full(shape, value, dtype=vol.dtype)
    src = tuple(slice(max(n - t, 0) // 2, max(n - t, 0) // 2 + min(n, t)) for n, t in zip(vol.shape, shape))
    dst = tuple(slice(max(t - n, 0) // 2, max(t - n, 0) // 2 + min(n, t)) for n, t in zip(vol.shape, shape))
    out[dst] = vol[src]
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
    """int16 (X, Y, Z) -> float32 (1, *preset.crop): centre crop (random if train), [-1, 1], encoder normalisation."""
    room = [max(n - c, 0) for n, c in zip(vol.shape, preset.crop)]
    starts = [int((rng or np.random.default_rng()).integers(0, r + 1)) if train else r // 2 for r in room]
    vol = vol[tuple(slice(s, s + c) for s, c in zip(starts, preset.crop))]
    if vol.shape != tuple(preset.crop):
        vol = _crop_or_pad(np.asarray(vol), preset.crop, HU_MIN)
    x = np.clip(vol, HU_MIN, HU_MAX).astype(np.float32)   # clipped as stored (exact), one float copy, then in place
    x /= HU_MAX
    x -= NORM_MEAN
    x /= NORM_STD
    return torch.from_numpy(x)[None]


class VolumeCache:
    """A preprocessed cache dir: {stem}.npy (int16, memmap) + manifest.jsonl + preset.json."""

    def __init__(self, cache_dir):
        self.dir = Path(cache_dir)
        if not (self.dir / "preset.json").exists():
            raise FileNotFoundError(f"{self.dir} is not a preprocessed cache (no preset.json); run "
                                    f"`python data.py preprocess ... --out {self.dir}`")
        p = read_json(self.dir / "preset.json")
        self.preset = Preset(p["name"], tuple(p["spacing"]), tuple(p["shape"]), tuple(p["crop"]))
        manifest = self.dir / "manifest.jsonl"
        try:
            recs = {r["VolumeName"]: r for r in read_json(manifest, lines=True)} if manifest.exists() else {}
        except ValueError as e:   # a line cut short by a full disk or a crash
            raise ValueError(f"{e}: preprocess into {self.dir} again (data.py preprocess), which mends it") from None
        self.names = sorted(recs)  # sorted: the manifest's order depends on worker timing
        self._files = {volume_key(n): self.dir / r["file"] for n, r in recs.items()}

    def __len__(self):
        return len(self.names)

    def __contains__(self, name) -> bool:
        return volume_key(name) in self._files

    def load(self, name) -> np.ndarray:
        if name not in self:
            raise KeyError(f"volume {name!r} is not in the cache {self.dir}")
        try:
            arr = np.load(path := self._files[volume_key(name)], mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:   # a copy cut short, an empty file
            raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e}); preprocess it again") from None
        if arr.shape != self.preset.shape or arr.dtype != np.int16:   # never cropped or padded into shape silently
            raise ValueError(f"{path}: {arr.dtype} {arr.shape}, not the int16 {self.preset.shape} of {self.dir}'s "
                             f"preset.json; preprocess it again")
        return arr

    def batch(self, names) -> torch.Tensor:
        """(B, 1, X, Y, Z): the model inputs of these volumes (online_transform without augmentation)."""
        return torch.stack([online_transform(self.load(n), self.preset) for n in names])

    def keep_cached(self, items: list[dict], key: str, what: str, log=print) -> list[dict]:
        """The items whose volume (item[key]) is in the cache; how many were left out is logged, never hidden."""
        cached = {name for name in dict.fromkeys(it[key] for it in items) if name in self}   # once a volume
        kept = [it for it in items if it[key] in cached]
        if len(kept) < len(items):
            log(f"left out {len(items) - len(kept)} of {len(items)} {what}: their volume is not in {self.dir}")
        return kept


def _pool(workers: int) -> ProcessPoolExecutor:
    """Workers of one torch thread each, from a forkserver: fork() of a process running OpenMP threads can deadlock.
    A worker that dies (the OOM killer) breaks the pool with an error; a multiprocessing.Pool would wait forever."""
    return ProcessPoolExecutor(workers, multiprocessing.get_context("forkserver"), _worker_start, (os.getpid(),))


def _worker_start(parent: int) -> None:
    """A pool worker: one torch thread, and a watch that ends it once `parent` (the pool's process) is gone; killed
    there, it would wait for work forever."""
    def exit_after_parent() -> None:
        while pid_alive(parent):
            time.sleep(1)
        os._exit(1)
    torch.set_num_threads(1)
    threading.Thread(target=exit_after_parent, daemon=True).start()


def _completed(pool: ProcessPoolExecutor, jobs: list) -> Iterator[dict]:
    """_preprocess_one's records as they finish; once a worker died, each volume not done is a bad-file record."""
    futures = {pool.submit(_preprocess_one, job): job for job in jobs}
    for future in as_completed(futures):
        try:
            yield future.result()
        except BrokenProcessPool:
            name, src, *_, out_dir = futures[future]
            Path(out_dir, f"{volume_key(name)}.tmp.npy").unlink(missing_ok=True)
            yield {"VolumeName": name, "path": str(src), "error": f"{src}: a worker process died while this volume "
                   f"was queued or read (killed for memory? rerun with fewer --workers)"}


def _preprocess_one(job) -> dict:
    """One volume -> {key}.tmp.npy and its manifest record, or (reading or preprocessing fails) its bad_files record
    and no file; a cache file that cannot be written raises (OSError)."""
    name, src, fmt, meta_row, preset, spacing, out_dir = job
    tmp = Path(out_dir) / f"{volume_key(name)}.tmp.npy"
    try:
        if fmt == "ctrate" and meta_row is None:
            raise VolumeReadError(f"{src}: no row for {name} in the metadata CSV")
        how = {"values": "HU as stored", "orientation": "(Z, Y, X) superior first -> (X, Y, Z) inferior first"}
        hu, sp = read_ctrate_volume(src, meta_row, how) if fmt == "ctrate" else read_radchestct_volume(src, spacing)
        vol = preprocess_volume(hu, sp, preset)
    except Exception as e:  # whatever fails, fails for this file only: listed with its reason, and the run goes on
        error = str(e) if isinstance(e, VolumeReadError) else f"{src}: {type(e).__name__}: {e}"
        return {"VolumeName": name, "path": str(src), "error": error}
    try:   # a failure here is the cache's (a full disk), not the volume's: it stops the run
        np.save(tmp, vol)
        np.load(tmp, mmap_mode="r")   # numpy misses a failed write of its last buffered bytes: a short file fails here
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{tmp}: written short ({e})") if isinstance(e, ValueError) else e
    return {"VolumeName": name, "file": f"{volume_key(name)}.npy", "source": str(src), "spacing": list(sp),
            "shape": list(vol.shape), **how}


def files_under(src: Path) -> list[Path]:
    """Every file under src, sorted, symlinked folders followed (a split spread over disks: Path.rglob skips them
    before Python 3.13); a folder met twice (a link loop) is walked once."""
    seen, out = set(), []
    for folder, dirs, files in os.walk(src, followlinks=True):
        if (real := os.path.realpath(folder)) in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out += [Path(folder, f) for f in files]
    return sorted(out)


def check_preset(cache_dir, preset: Preset) -> None:
    """A cache made with another preset is an error naming both: one cache never mixes two."""
    file = Path(cache_dir) / "preset.json"
    if file.exists() and read_json(file) != json.loads(json.dumps(asdict(preset))):
        raise ValueError(f"{cache_dir} was preprocessed with another preset ({file.read_text()}), not {preset}: "
                         f"preprocess into another folder, or delete this one")


def preprocess_dir(src, out, fmt="ctrate", metadata=None, preset: Preset = REAL, workers=1,
                   spacing=RAD_SPACING, no_chest=None, progress=True) -> dict:
    """Preprocess every volume under src into out (resumable). Returns counts {'written', 'skipped' (done before),
    'bad' (listed with the reason in out/bad_files.jsonl), 'excluded' (no-chest list and KNOWN_BAD), 'removed'
    (excluded volumes an earlier run had cached: taken out of the cache), 'not_volume' ({kind: count} of the other
    files under src, e.g. {'*.nii': 2})}: every file under src is counted once, 'removed' aside."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    ext = ".nii.gz" if fmt == "ctrate" else ".npz"
    every = files_under(src)
    found = [p for p in every if p.name.endswith(ext)]   # the link's name: a hub download's blobs have no extension
    other = Counter(f"*{p.suffix}" if p.suffix else p.name for p in every if p.is_file() and not p.name.endswith(ext))
    if twice := sorted({k for k, n in Counter(volume_key(p.name) for p in found).items() if n > 1}):
        raise ValueError(f"{src} holds {len(twice)} volume(s) more than once, e.g. {twice[0]}: "
                         f"{[str(p) for p in found if volume_key(p.name) == twice[0]]}; point --src at one copy "
                         f"(one snapshot; train_fixed, not dataset/)")
    lock_folder(out, "preprocessing", wait=True)              # one writer: the manifest's lines and files agree
    try:
        if not found:   # nothing to cache: no preset.json, which would make the folder pass for an (empty) cache
            return {**dict.fromkeys(["written", "skipped", "bad", "excluded", "removed"], 0),
                    "not_volume": dict(sorted(other.items()))}
        check_preset(out, preset)
        if not (out / "preset.json").exists():
            write_json(out / "preset.json", asdict(preset))
        for stale in out.glob("*.tmp*"):                      # what a killed run was writing
            stale.unlink()
        manifest = out / "manifest.jsonl"
        meta = read_metadata(metadata) if metadata else {}
        listed = {volume_key(n) for n in read_text(no_chest).split()} if no_chest else set()
        if unmatched := len(listed - {volume_key(p.name) for p in found}):
            print(f"note: {unmatched} of the {len(listed)} volumes in {no_chest} are not under {src} (another split's "
                  f"list, or a partial download?)", flush=True)
        excluded = KNOWN_BAD | listed
        files = [p for p in found if volume_key(p.name) not in excluded]
        cached = [r for _, r in read_appended(manifest)]   # a line cut short: that volume is preprocessed again
        removed = [r for r in cached if volume_key(r["VolumeName"]) in excluded]   # cached, then excluded
        if removed:
            cached = [r for r in cached if r not in removed]
            write_atomic(manifest, "".join(json.dumps(r) + "\n" for r in cached))   # first: never names a deleted file
            for r in removed:
                (out / r["file"]).unlink(missing_ok=True)
        done = {volume_key(r["VolumeName"]) for r in cached}
        jobs = []
        for p in files:
            name = p.name if fmt == "ctrate" else volume_key(p.name)
            if volume_key(name) not in done or not (out / f"{volume_key(name)}.npy").exists():
                jobs.append((name, p, fmt, meta.get(name), preset, spacing, out))
        n_bad = 0
        pool = _pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
        try:
            with open(manifest, "a") as man, open(out / "bad_files.jsonl", "w") as badf:
                results = _completed(pool, jobs) if pool else map(_preprocess_one, jobs)
                for rec in tqdm(results, total=len(jobs), desc=f"preprocess {src.name}", disable=not progress):
                    n_bad += "error" in rec
                    f = badf if "error" in rec else man
                    f.write(json.dumps(rec) + "\n"); f.flush()
                    if "file" in rec:  # named once listed: a crash never leaves a .npy outside the manifest
                        os.replace(out / f"{volume_key(rec['VolumeName'])}.tmp.npy", out / rec["file"])
        except OSError as e:   # a full disk, a file-size limit: every volume after would fail the same way
            raise OSError(f"{out}: cannot write the cache ({e.strerror or e}; {free_space(out)}): make room and rerun, "
                          f"what is written stays done") from e
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        return {"written": len(jobs) - n_bad, "skipped": len(files) - len(jobs), "bad": n_bad,
                "excluded": len(found) - len(files), "removed": len(removed), "not_volume": dict(sorted(other.items()))}
    finally:
        unlock_folder(out)


# ================================================ reports and labels =============================================
def read_reports(csv_path) -> dict[str, dict]:
    """{VolumeName: {'findings': str|None, 'impressions': str|None}}; 'Not given.' (CT-RATE's) and 'nan' (a CSV that
    went through pandas) mean absent."""
    def section(text):
        return None if (text or "").strip() in ("", "Not given.", "nan") else text.strip()
    rows = read_csv_rows(csv_path)
    if missing := {"Findings_EN", "Impressions_EN"} - set(next(iter(rows.values()))):
        raise ValueError(f"{csv_path}: no {' or '.join(sorted(missing))} column (CT-RATE's reports: {REPORT_COLUMNS})")
    return {k: {"findings": section(r["Findings_EN"]), "impressions": section(r["Impressions_EN"])}
            for k, r in rows.items()}


def report_text(report: dict) -> str:
    """A read_reports entry as one text: findings, then impressions (a missing section left out; "" if both are)."""
    return " ".join(s for s in (report["findings"], report["impressions"]) if s)


def split_sentences(text: str | None) -> list[str]:
    """Split at '.', '!' or '?' followed by white space and a capital/digit/bracket (keeps '3.5 mm' whole); a list
    number ('1.', '2)') stays with its sentence."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9(\"'])|\n+", text.strip()) if text else []
    out = []
    for p in filter(None, map(str.strip, parts)):
        out.append(f"{out.pop()} {p}" if out and re.fullmatch(r"\d+[.)]", out[-1]) else p)
    return out


_ABNORMAL = re.compile(  # finding terms, from a word's start (no "stent" in "consistent"); a few take prefixes
    r"\b(?:\w*megal|\w*steatosis|\w*nodul|\w*calcif|\w*atelecta|\w*pneumothorax|\w*pneumoni|\w*edema|opacit|effusion|"
    r"atheroscl|emphysem|bull(?:a|ous)|consolidat|thicken|(?:bronchi)?ecta[st]|lymphadenopath|lymph nodes? (?:up to|"
    r"measuring|with|of)|hernia|enlarg|ground[- ]glass|fibro|sequela|mosaic|catheter|port\b|pacemaker|stent|clips?\b|"
    r"prosthe|sternotomy|postoperative|operated|resect|mass|lesion|cyst|fracture|degenerat|osteophyt|spondylo|"
    r"scoliosis|kyphosis|dilat|aneurysm|infiltrat|granulom|scar|reticul|honeycomb|bands?\b|plaque|increase|decrease|"
    r"herniat|collapse|septal|tree-in-bud|bronchiolect|air trapping|hypodens|hyperdens|stones?\b|calcul(?:us|i)\b|"
    r"atroph|hypertroph|metal|wire|tubes?\b|tubercul|tumou?r|malignan|metasta|neoplas|carcinom|embol|thromb|"
    r"crazy[- ]paving|air[- ]fluid|infect)", re.I)
_NEGATES_AFTER = re.compile(r"\b(?:no|without|free of|negative for|absence of|none of|neither)\b", re.I)  # to the end
_NEGATES_PART = re.compile(  # negates its own comma-separated part of a clause
    r"\b(?:not|none|absent|normal|unremarkable|within normal limits|patent|open|intact|natural|preserved|clear|"
    r"negative|ruled out|cannot be evaluated|\w+n't)\b", re.I)
_CLAUSE = re.compile(r";|,?\s+\b(?:but|however|whereas|although|while)\b|\.\s", re.I)
# a finding left possible ("cannot be ruled out", "not excluded", "should be excluded") is raised, not negated
HEDGE = re.compile(r"\b(?:(?:can ?not|can't|could not|couldn't|should|must|to) be|not(?: be)?) "
                   r"(?:ruled out|excluded)\b", re.I)


def rule_label(sentence: str) -> bool:
    """Offline sentence labeller: True = abnormal, when a clause names a finding that no cue negates. "no", "without"
    (and the like) negate the rest of their clause ("No nodule, mass or consolidation."; "Atelectasis without
    effusion." is abnormal); "not", "normal", "unremarkable" (and the like) negate their comma-separated part ("Heart
    size increased, pericardial effusion not observed." is abnormal); clauses end at ";", "but", "however", ..."""
    for clause in filter(None, _CLAUSE.split(HEDGE.sub(" possible", sentence))):
        cue = _NEGATES_AFTER.search(clause)
        head = clause[:cue.start()] if cue else clause   # what "no", "without" leave un-negated
        if any(_ABNORMAL.search(h) and not _NEGATES_PART.search(p) for p, h in zip(clause.split(","), head.split(","))):
            return True
    return False


# Clinical terms for the 18 CT-RATE abnormalities (ABNORMALITIES order): which findings a text affirms or denies
# (grpo.py's offline consistency reward). Each name also matches itself.
TERMS = {
    "Medical material": [r"medical material", r"catheter", r"pacemaker", r"stent", r"prosthe\w*", r"surgical clips?"],
    "Arterial wall calcification": [r"arterial wall calcification", r"aortic (?:wall )?calcification", r"atheroscl\w*"],
    "Cardiomegaly": [r"cardiomegaly", r"enlarged heart", r"heart is enlarged"],
    "Pericardial effusion": [r"pericardial effusion", r"pericardial fluid"],
    "Coronary artery wall calcification": [r"coronary (?:artery )?(?:wall )?calcifications?"],
    "Hiatal hernia": [r"hiatal hernia", r"hiatus hernia"],
    "Lymphadenopathy": [r"lymphadenopathy", r"enlarged (?:\w+ )?lymph nodes?"],
    "Emphysema": [r"emphysema\w*"],
    "Atelectasis": [r"atelectasis", r"atelectatic"],
    "Lung nodule": [r"(?:lung |pulmonary )?nodules?", r"nodular"],
    "Lung opacity": [r"(?:lung |pulmonary )?opacit(?:y|ies)", r"ground[- ]glass"],
    "Pulmonary fibrotic sequela": [r"(?:pulmonary )?fibrotic sequelae?", r"fibrosis", r"fibrotic"],
    "Pleural effusion": [r"pleural effusions?", r"pleural fluid"],
    "Mosaic attenuation pattern": [r"mosaic attenuation(?: pattern)?"],
    "Peribronchial thickening": [r"peribronchial (?:wall )?thickening", r"bronchial wall thickening"],
    "Consolidation": [r"consolidations?", r"consolidated"],
    "Bronchiectasis": [r"bronchiectasis", r"bronchiectatic"],
    "Interlobular septal thickening": [r"(?:interlobular )?septal thickening"],
}
assert list(TERMS) == ABNORMALITIES, "data.TERMS needs the clinical terms of every one of data.ABNORMALITIES"
TERM_RE = {name: re.compile(r"\b(?:" + "|".join(pats) + r")\b", re.IGNORECASE) for name, pats in TERMS.items()}
NEG_BEFORE = re.compile(r"\b(?:no|not|without|absence of|absent|negative for|free of|neither|nor|rule out|ruled out)\b",
                        re.IGNORECASE)
NEG_AFTER = re.compile(r"^[^.;]*?\b(?:not (?:seen|present|detected|observed|identified|shown)|absent|ruled out)\b",
                       re.IGNORECASE)
CLAUSE = re.compile(r"[.;!?\n]+|\bbut\b|\bhowever\b|\bwhereas\b|\bwhile\b", re.IGNORECASE)


def clinical_stances(text: str) -> dict[str, str]:
    """{abnormality: "affirm" | "deny" | "both"} for each of the 18 abnormalities the text mentions.

    A mention is denied when a negation cue precedes it in its clause ("no pleural effusion") or a post-negation
    follows it ("pleural effusion is not seen"); clauses are split at sentence ends and at but/however/whereas/while."""
    stance: dict[str, set] = {}
    for clause in CLAUSE.split(HEDGE.sub(" possible", text)):
        spans = sorted((m.start(), m.end(), name) for name, rx in TERM_RE.items() for m in rx.finditer(clause))
        taken = -1
        for start, end, name in spans:
            if start < taken:                                # "coronary artery wall calcification" is not also
                continue                                     # an "arterial wall calcification" mention
            taken = end
            denied = bool(NEG_BEFORE.search(clause[:start])) or bool(NEG_AFTER.match(clause[end:]))
            stance.setdefault(name, set()).add("deny" if denied else "affirm")
    return {name: s.pop() if len(s) == 1 else "both" for name, s in stance.items()}


class Chat:
    """An OpenAI-compatible endpoint asked fixed prompts at temperature 0 (sentence labeller, GRPO's `judge:` scorer,
    evaluate.py's judge). The client retries transport errors, 429 and server errors with back-off; a reply `parse`
    rejects (None or ValueError) is an error, never retried or cached. Valid replies are cached per (endpoint, model,
    prompt) under `cache_dir` when given. The key comes from the variable `key_env`, never logged or saved."""

    def __init__(self, base_url, model, key_env="OPENAI_API_KEY", cache_dir=None, timeout=60.0, retries=3, workers=4):
        import openai
        if not model or not base_url:
            raise ValueError(f"an OpenAI-compatible endpoint needs a base URL (a flag's or $OPENAI_BASE_URL) and a "
                             f"model, got {base_url!r}, {model!r}")
        self.base_url, self.model, self.retries, self.workers = base_url, model, retries, max(1, workers)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._key = os.environ.get(key_env) or "EMPTY"  # local servers accept any key
        self.client = openai.OpenAI(base_url=base_url, api_key=self._key, timeout=timeout, max_retries=retries)

    def ask(self, prompt: str, parse, max_tokens: int | None = None) -> tuple[object, str | None]:
        """(parse(reply), None), or (None, the error) for a failed request or a rejected reply."""
        messages = [{"role": "user", "content": prompt}]
        key = json.dumps([self.base_url, self.model, messages], sort_keys=True).encode()
        path = self.cache_dir / f"{hashlib.sha256(key).hexdigest()}.json" if self.cache_dir else None
        if path and path.is_file():
            return json.loads(path.read_text())["parsed"], None
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                        **({"max_tokens": max_tokens} if max_tokens else {}))
        except Exception as e:  # connection, timeout and HTTP errors after the client's retries: the caller counts it
            status = getattr(e, "status_code", None)   # the openai client retries these, never another status
            tries = f" after {self.retries + 1} attempts" if status is None or status in (408, 409, 429) \
                or status >= 500 else ""
            text = str(e).replace(self._key, "***") if len(self._key) >= 8 else str(e)   # "x": no secret, kept legible
            return None, f"{type(e).__name__}{tries}: {text[:200]}"
        if not getattr(reply, "choices", None):   # e.g. a proxy's HTML page
            return None, f"not a chat completion: {str(reply)[:200]!r}"
        text = reply.choices[0].message.content
        try:
            parsed = parse(text) if isinstance(text, str) else None   # None: e.g. a tool call, a refusal
        except (ValueError, TypeError):
            parsed = None
        if parsed is None:
            return None, f"unparseable reply: {text[:200] if isinstance(text, str) else text!r}"
        if path:
            write_json(path, {"model": self.model, "reply": text, "parsed": parsed})
        return parsed, None

    def ask_all(self, prompts: list[str], parse) -> tuple[list, list[str]]:
        """The parsed replies (None where an error occurred) and the errors, `workers` requests at a time."""
        with ThreadPoolExecutor(self.workers) as pool:
            out = list(tqdm(pool.map(lambda p: self.ask(p, parse), prompts), total=len(prompts), leave=False,
                            desc=f"{self.model}: {len(prompts)} requests"))
        return [o for o, _ in out], [e for _, e in out if e]


LABEL_PROMPT = ("You label sentences from chest CT radiology reports. For each numbered sentence answer 1 if it "
                "describes an abnormal finding and 0 if it describes a normal finding or absence of disease. "
                "Reply with only a JSON list of 0/1 integers, one per sentence, in order.\n\n")


class OpenAILabeller:
    """Sentence labeller via an OpenAI-compatible endpoint (the paper used DeepSeek-V3): one request per report section
    for its sentences not yet cached, the reply a JSON list of 0/1, cached per (model, sentence) in
    cache_dir/labels.jsonl; failures raise RuntimeError."""

    def __init__(self, base_url=None, model=None, key_env="OPENAI_API_KEY", cache_dir="runs/label_cache",
                 timeout=60.0, retries=3):
        base_url, model = base_url or os.environ.get("OPENAI_BASE_URL"), model or os.environ.get("OPENAI_MODEL")
        if not base_url or not model:
            raise ValueError("the OpenAI labeller needs --base-url and --model (or $OPENAI_BASE_URL, $OPENAI_MODEL)")
        self.chat = Chat(base_url, model, key_env, None, timeout, retries)
        self.model, self.lock = self.chat.model, threading.Lock()
        self.cache_file = Path(cache_dir) / "labels.jsonl"
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        self.cache = {(r["model"], r["sentence"]): r["abnormal"] for _, r in read_appended(self.cache_file)}

    def __call__(self, sentences: list[str]) -> list[bool]:
        todo = list(dict.fromkeys(s for s in sentences if (self.model, s) not in self.cache))
        if todo:
            def parse(text):  # the list may be wrapped in prose or a code fence
                labels = json.loads(text[text.index("["): text.rindex("]") + 1])
                return [bool(v) for v in labels] if len(labels) == len(todo) and set(labels) <= {0, 1} else None
            answers, error = self.chat.ask(LABEL_PROMPT + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(todo)), parse)
            if error:
                raise RuntimeError(f"OpenAI labeller failed at {self.chat.base_url} (model {self.model}): {error}")
            with self.lock, open(self.cache_file, "a") as f:
                for s, a in zip(todo, answers):
                    self.cache[(self.model, s)] = a
                    f.write(json.dumps({"model": self.model, "sentence": s, "abnormal": a}) + "\n")
        return [self.cache[(self.model, s)] for s in sentences]


def label_reports(reports: dict, out_path, labeller=None, workers=1, progress=True) -> None:
    """One JSON line per volume: {VolumeName, findings: [[sentence, abnormal], ...]|null, impressions: ...}. Each
    distinct section is labelled once: a scan's reconstructions share their report, and `workers` threads would
    otherwise ask an LLM labeller for it twice."""
    labeller = labeller or (lambda sents: [rule_label(s) for s in sents])
    texts = list(dict.fromkeys(r[k] for r in reports.values() for k in ("findings", "impressions") if r[k]))

    def label(text):
        sents = split_sentences(text)
        return [[s, a] for s, a in zip(sents, labeller(sents))] if sents else None

    def write(tmp):   # atomically: a failed or killed run leaves no part of the file
        with ThreadPoolExecutor(workers) as pool:
            done = dict(zip(texts, tqdm(pool.map(label, texts), total=len(texts), desc="label", disable=not progress)))
        with open(tmp, "w") as f:
            for name, r in reports.items():
                f.write(json.dumps({"VolumeName": name, **{k: done.get(r[k]) for k in ("findings", "impressions")}})
                        + "\n")
    write_atomic(out_path, write)


def read_json(path, lines: bool = False):
    """A JSON file, or (lines=True) the records of a JSON-lines file, blank lines skipped. A byte-order mark is read
    past; text that does not parse is an error naming the file (and line)."""
    out, text = [], read_text(path)
    for n, chunk in enumerate(text.split("\n") if lines else [text], 1):   # JSON lines end at \n alone
        try:
            out += [json.loads(chunk)] if chunk.strip() or not lines else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}{f' line {n}' if lines else ''}: not valid JSON ({e})") from None
    return out if lines else out[0]


def read_sentence_labels(jsonl) -> dict[str, dict]:
    """{VolumeName: {'findings': [(sentence, abnormal)]|None, 'impressions': [...]|None}}; a record of another shape,
    a label other than true/false/0/1 (the string "0" would read as abnormal), or a volume listed twice with other
    labels is an error naming the file and record or volume."""
    recs, seen, parts = read_json(jsonl, lines=True), {}, ("findings", "impressions")
    for n, r in enumerate(recs, 1):
        check_fields(f"{jsonl} record {n}", r, {"VolumeName": str, "findings": object, "impressions": object})
        if not all(isinstance(r[k], list | None) and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                         for p in r[k] or []) for k in parts):
            raise ValueError(f"{jsonl}: {r['VolumeName']}: findings and impressions must each be null or a list of "
                             f"[sentence, label] pairs")
        if bad := [a for k in parts for _, a in r[k] or [] if a not in (0, 1)]:
            raise ValueError(f"{jsonl}: {r['VolumeName']}: sentence label {bad[0]!r} is not true, false, 0 or 1")
        if seen.setdefault(r["VolumeName"], r) != r:
            raise ValueError(f"{jsonl}: {r['VolumeName']} is listed twice, with other labels")
    return {r["VolumeName"]: {k: [(s, bool(a)) for s, a in r[k]] if r[k] else None for k in parts} for r in recs}


def read_labels(csv_path) -> dict[str, np.ndarray]:
    """CT-RATE multi-abnormality CSV -> {VolumeName: int64 (18,)} in ABNORMALITIES order (column order checked)."""
    rows = read_csv_rows(csv_path)
    if (columns := list(next(iter(rows.values())))[1:]) != ABNORMALITIES:
        raise ValueError(f"{csv_path}: the label columns are not data.ABNORMALITIES, in order (missing: "
                         f"{[a for a in ABNORMALITIES if a not in columns]}, other: "
                         f"{[c for c in columns if c not in ABNORMALITIES]})")
    return {k: np.array([_label(csv_path, k, a, r[a]) for a in ABNORMALITIES], np.int64) for k, r in rows.items()}


def _label(csv_path, key: str, column: str, value: str) -> float:
    if value.strip() not in LABEL_VALUES:
        raise ValueError(f"{csv_path}: {key}, column {column}: {value!r} is not a label (one of {list(LABEL_VALUES)})")
    return float(value)


def read_radchestct_labels(csv_path) -> dict[str, np.ndarray]:
    """RAD-ChestCT labels (84 collapsed columns, or the 84x52 'abnormality*location' file) -> {NoteAcc_DEID:
    float (18,)} in ABNORMALITIES order: the max over the mapped columns; NaN where the mapping has none."""
    rows = read_csv_rows(csv_path, "NoteAcc_DEID")
    header = list(next(iter(rows.values())))[1:]
    sources = [h.split("*")[0] for h in header]
    if missing := sorted(MAPPED - set(sources)):
        raise ValueError(f"{csv_path}: no RAD-ChestCT label column for {missing}")
    cols = [[i for i, s in enumerate(sources) if s in RAD_TO_CTRATE[name]] for name in ABNORMALITIES]
    out = {}
    for k, r in rows.items():
        vals = np.array([_label(csv_path, k, h, r[h]) if s in MAPPED else 0 for h, s in zip(header, sources)])
        out[k] = np.array([float(vals[c].max() > 0) if c else np.nan for c in cols])
    return out


# ================================================ questions and every stage's prompts ==========================
REPORT_INSTRUCTION = ("Write the radiology report of this chest CT scan: the findings inside <finding></finding>, "
                      "then the impression inside <impression></impression>.")
MMVQA_QUESTION = "What abnormality is present in this CT scan?"
THINK_FORMAT = ("Think step by step inside one <think></think> block, then give only the letter of the correct "
                "option inside one <answer></answer> block. Write nothing outside the two blocks.")
NO_THINK_FORMAT = "Give only the letter of the correct option inside one <answer></answer> block, nothing else."
_TASKS = {"report_generation": "report", "long_answer": "open", "short_answer": "yes_no",
          "multiple_choice": "multiple_choice"}  # CT-CHAT task token -> question kind
ROLES = ("human", "gpt")  # a CT-CHAT conversation's turns: question, answer, question, ...
_TAGS = re.compile(r"<image>|<(?:report_generation|long_answer|short_answer|multiple_choice)>")


def read_vqa(json_path, skipped: Counter | None = None) -> list[dict]:
    """CT-CHAT VQA JSON (LLaVA style) or Med3D-R1 VQA JSON -> [{VolumeName, question, answer, kind}], one per
    question/answer turn; <image> and task tokens are stripped. Text-only items (no image) and questions without an
    answer (a last turn, or an empty answer) are skipped, and counted in `skipped` if given; turns must alternate
    human, gpt."""
    out, skipped, items = [], Counter() if skipped is None else skipped, read_json(json_path)
    if not isinstance(items, list):
        raise ValueError(f"{json_path}: must be a list of VQA items, got {type(items).__name__}")
    for i, item in enumerate(items):
        where = f"{json_path} item {i}"
        check_fields(where, item, {})
        if "conversations" in item:
            check_fields(where, item, {"conversations": list, **({"image": str} if item.get("image") else {})})
            turns = item["conversations"] if item.get("image") else []
            for j, turn in enumerate(turns):
                check_fields(f"{where} turn {j}", turn, {"value": str})
                if turn.get("from", ROLES[j % 2]) != ROLES[j % 2]:
                    raise ValueError(f"{where} turn {j}: from {turn['from']!r}, not {ROLES[j % 2]!r} "
                                     f"(turns alternate question, answer)")
            answered = [(q, a) for q, a in zip(turns[0::2], turns[1::2]) if a["value"].strip()]
            name = Path(item["image"]).name if turns else None   # once per item: CT-CHAT has ~60 turns a volume
            skipped["text-only items"] += not item.get("image")
            skipped["questions without an answer"] += (len(turns) + 1) // 2 - len(answered)
            for q, a in answered:
                task = next((t for t in _TASKS if f"<{t}>" in q["value"]), str(item.get("id", "")).rsplit("_", 1)[0])
                kind, answer = _TASKS.get(task, "open"), a["value"].strip()
                if kind == "yes_no" and not re.match(r"(yes|no)\b", answer, re.I):
                    kind = "open"
                out.append({"VolumeName": name, "question": _TAGS.sub("", q["value"]).strip(),
                            "answer": answer, "kind": kind})
        elif "Question" in item:
            check_fields(where, item, {"Question": str, "Answer": object, "Image Path": str})
            cells = {c: cell_text(f'{where} "Choice {c}"', item.get(f"Choice {c}")) for c in "ABCD"}
            choices = {c: v for c, v in cells.items() if v}
            question, answer = item["Question"].strip(), cell_text(f'{where} "Answer"', item["Answer"]).strip()
            if not answer:
                skipped["questions without an answer"] += 1
                continue
            if choices and {v.strip().lower() for v in choices.values()} <= {"yes", "no"}:
                kind = "yes_no"
            elif choices:
                kind = "multiple_choice"
                question += " " + " ".join(f"{c}) {v}" for c, v in choices.items())
                if letter := cell_text(f'{where} "Answer Choice"', item.get("Answer Choice")):
                    answer = f"{letter}) {answer}"
            else:
                kind = "yes_no" if answer.lower().rstrip(".") in ("yes", "no") else "open"
            out.append({"VolumeName": Path(item["Image Path"]).name, "question": question, "answer": answer,
                        "kind": kind})
        else:
            raise ValueError(f"{where}: unknown VQA item format (keys {sorted(item)})")
    return out


def cell_text(where: str, value) -> str:
    """A JSON cell as text: null and NaN (a table's missing cell, as pandas writes it) are no text, never "None"; a
    list or an object is an error naming `where`."""
    if isinstance(value, (list, dict)):
        raise ValueError(f"{where}: must be text, got {type(value).__name__}")
    return "" if value is None or value != value else str(value)


def check_fields(where: str, item, fields: dict) -> None:
    """ValueError '<where>: "<field>" ...' unless `item` is a dict holding each field with its type."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: must be an object, got {type(item).__name__}")
    for key, kind in fields.items():
        if key not in item:
            raise ValueError(f'{where}: "{key}" is missing')
        if not isinstance(item[key], kind):
            raise ValueError(f'{where}: "{key}" must be a {kind.__name__}, got {type(item[key]).__name__}')


def read_questions(json_path) -> list[dict]:
    """Official MCQ items [{VolumeName, question, options: {letter: text}, answer}], checked before any model work:
    ValueError '<file> item <i>: ...' (i from 0) for a missing or mistyped field, an option letter that is not one
    capital letter, fewer than 2 options, or an answer that is not one of the item's letters."""
    items = read_json(json_path)
    if not isinstance(items, list):
        raise ValueError(f"{json_path}: must be a list of questions, got {type(items).__name__}")
    for i, q in enumerate(items):
        where = f"{json_path} item {i}"
        check_fields(where, q, {"VolumeName": str, "question": str, "options": dict, "answer": str})
        for letter, text in q["options"].items():
            if not re.fullmatch("[A-Z]", letter):
                raise ValueError(f'{where}: option letter "{letter}" is not a single capital letter')
            if not isinstance(text, str):
                raise ValueError(f'{where}: option "{letter}" must be a str, got {type(text).__name__}')
        if len(q["options"]) < 2:
            raise ValueError(f"{where}: needs at least 2 options, has {len(q['options'])}")
        if q["answer"] not in q["options"]:
            raise ValueError(f'{where}: answer "{q["answer"]}" is not one of its options {", ".join(q["options"])}')
    return items


def attach_reports(questions: list[dict], reports_csv, what: str, log=print) -> list[dict]:
    """The questions whose scan has a report text (findings, impressions) in `reports_csv`, each given it as "report"
    (matched by volume_key: an official item's VolumeName may be a path); how many had none is logged, never hidden."""
    texts = {volume_key(n): report_text(r) for n, r in read_reports(reports_csv).items()}
    keys = [volume_key(q["VolumeName"]) for q in questions]
    kept = [{**q, "report": texts[k]} for q, k in zip(questions, keys) if texts.get(k)]
    if len(kept) < len(questions):
        log(f"left out {len(questions) - len(kept)} of {len(questions)} {what}: their scan has no report text in "
            f"{reports_csv}")
    return kept


def build_mmvqa(labels: dict, seed: int, per_label: bool = False, exclude=(), stats: dict | None = None) -> list[dict]:
    """Official MCQ items, deterministic for a seed: the key present in the volume, three distractors absent, answer
    letters balanced over A-D. NaN labels and `exclude` are never options. One item per volume (a random positive)
    or per positive (per_label); volumes without a positive or three negatives are skipped, counted in `stats`."""
    rng = np.random.default_rng(seed)
    allowed = np.array([a not in exclude for a in ABNORMALITIES])
    queries, stats = [], stats if stats is not None else {}
    stats.update(no_positive=0, few_negatives=0)
    for name, lab in labels.items():
        lab = np.asarray(lab, dtype=float)
        pos, neg = np.flatnonzero((lab == 1) & allowed), np.flatnonzero((lab == 0) & allowed)
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
        options = {l: ABNORMALITIES[k] for l, k in zip("ABCD", distractors[:slot] + [key] + distractors[slot:])}
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


def mmvqa_prompt(item: dict, think: bool = True) -> str:
    return f"{item['question']}\n{THINK_FORMAT if think else NO_THINK_FORMAT}"


def check_prompt_lengths(questions: list[dict], n_tokens, limit: int, source: str, no_think_frac: float = 0.0) -> None:
    """Stop before training when a question's prompt, with <think> (unless no_think_frac is 1) or without it (if above
    0), is over `limit` tokens as `n_tokens(user text)` counts them, template and image included: none is truncated."""
    thinks = [t for t in (True, False) if (no_think_frac < 1 if t else no_think_frac > 0)]
    longest = [max(n_tokens(mmvqa_prompt(q, think=t)) for t in thinks) for q in questions]
    over = [i for i, n in enumerate(longest) if n > limit]
    if over:
        raise SystemExit(f"{source}: {len(over)} of {len(questions)} questions have a prompt over --max-prompt-len "
                         f"{limit} tokens (the first: {questions[over[0]]['VolumeName']}, {longest[over[0]]} tokens); "
                         f"raise --max-prompt-len or leave these questions out")


TAG = re.compile(r"</?[A-Za-z_|][^<>\s]*>")            # any tag-like token: <think>, </answer>, <finding>, <|im_end|>
BLOCK = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def well_formed(completion: str) -> bool:
    """Exactly one non-empty <think> block, then exactly one non-empty <answer> block, no other tags, nothing but
    white space outside them."""
    m = BLOCK.fullmatch(completion)
    return m is not None and all(part.strip() and not TAG.search(part) for part in m.groups())


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def parse_answer(completion: str, letters: str = "ABCD", options: dict | None = None) -> str | None:
    """The chosen option letter, or None (grpo.py's accuracy reward, evaluate.py's first answer path).

    Reads the single <answer> block (several blocks -> None); without any answer tag, what is left outside a <think>
    block. Accepts case, spaces, brackets ("c", " (C) ", "[C]", "C)") and a trailing option text ("C) Pleural
    effusion"), which must match options[letter] when `options` is given and may never name another option letter
    ("A or B", "B, C" -> None). The letters are the item's own (the keys of `options`) when `options` is given."""
    letters = "".join(options) if options else letters
    if "<answer>" in completion or "</answer>" in completion:
        blocks = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
        if len(blocks) != 1 or completion.count("<answer>") != 1:
            return None
        text = blocks[0]
    else:                                                     # no answer tags: what is left outside <think>
        text = TAG.sub(" ", re.sub(r"<think>.*?</think>", " ", completion, flags=re.DOTALL))
    # an optional bracket as one group, trailing white space stripped in Python: linear time on any completion
    m = re.fullmatch(rf"\s*(?:[(\[]\s*)?([{letters}])\s*(?:[)\].:]\s*)?(.*)", text, re.DOTALL | re.IGNORECASE)
    if m is None or m.group(1).upper() not in letters:       # the Kelvin sign matches "k" but is no option letter
        return None
    letter, rest = m.group(1).upper(), m.group(2).rstrip()
    if rest:
        if text[m.end(1)] not in " \t\n)].:-":
            return None                                       # "AB", "B, C", "Cardiomegaly": not a lone letter
        if options is not None:                               # trailing text must be this letter's option
            return letter if _norm(rest) == _norm(options.get(letter, "")) else None
        if re.search(rf"(?<![A-Za-z])[{letters}](?![A-Za-z])", rest, re.IGNORECASE):
            return None                                       # "A or B": another option letter
    return letter


def think_text(completion: str) -> str:
    m = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    return m.group(1).strip() if m else ""


# ================================================ the data root and the command line ============================
def paths(root, preset: str = "real") -> dict[str, Path]:
    """Where every stage finds its inputs under a data root: the downloads under dataset/, what this file's CLI writes,
    clip3d.py's local text encoder. With preset "phantom" the phantom world is built there when missing; a root that
    holds other data is never touched."""
    if preset == "phantom":
        import phantom
        return phantom.ensure_world(root)   # refuses a root that holds other data
    root = Path(root)
    ds, cache, sents, mm = root / "dataset", root / "cache", root / "sentences", root / "mmvqa"
    meta, reports, labels = ds / "metadata", ds / "radiology_text_reports", ds / "multi_abnormality_labels"
    return {"root": root, "dataset": ds, "train_volumes": ds / "train_fixed", "valid_volumes": ds / "valid_fixed",
            "radchestct_volumes": ds / "radchestct" / "volumes",
            "train_cache": cache / "train", "valid_cache": cache / "valid", "radchestct_cache": cache / "radchestct",
            "train_metadata": meta / "train_metadata.csv", "valid_metadata": meta / "validation_metadata.csv",
            "train_reports": reports / "train_reports.csv", "valid_reports": reports / "validation_reports.csv",
            "train_labels": labels / "train_predicted_labels.csv",
            "valid_labels": labels / "valid_predicted_labels.csv",
            "radchestct_labels": ds / "radchestct" / "imgtest_abnormality_labels_84.csv",
            "train_vqa": ds / "vqa" / "train_vqa.json", "valid_vqa": ds / "vqa" / "valid_vqa.json",
            "train_sentences": sents / "train.jsonl", "valid_sentences": sents / "valid.jsonl",
            "mmvqa_train": mm / "train.json", "mmvqa_rl": mm / "train_rl.json", "mmvqa_valid": mm / "valid.json",
            "mmvqa_radchestct": mm / "radchestct.json", "text_encoder": root / "text_encoder"}


def write_json(path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):   # a value's default, not an unset one (None) or a switch's (False)
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def main(argv=None):
    ap = make_parser(__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    command = lambda name, help: sub.add_parser(name, help=help, formatter_class=_ShowDefaults)
    a = command("preprocess", ".nii.gz / .npz -> int16 .npy cache (resumable)")
    a.add_argument("--src", required=True, help="folder searched recursively for *.nii.gz (ctrate) or *.npz")
    a.add_argument("--metadata", help="CT-RATE metadata CSV (required for --format ctrate)")
    a.add_argument("--out", required=True,
                   help="cache folder: <volume key>.npy, manifest.jsonl, preset.json, bad_files.jsonl")
    a.add_argument("--format", choices=["ctrate", "radchestct"], default="ctrate", help="input format")
    a.add_argument("--preset", choices=list(PRESETS), default="real", help="; ".join(
        f"{p.name}: {p.spacing} mm, stored {p.shape}, cropped to {p.crop} when read" for p in PRESETS.values()))
    a.add_argument("--workers", type=at_least(1), default=1, help="processes")
    a.add_argument("--no-chest", help="no_chest_{train,valid}.txt: volumes to exclude")
    a.add_argument("--spacing", type=at_least(0.001), nargs=3,
                   help=f"RAD-ChestCT voxel (mm); unset = {' '.join(map(str, RAD_SPACING))}")
    a = command("label", "split reports into sentences and label each normal/abnormal")
    a.add_argument("--reports", required=True, help="CT-RATE reports CSV")
    a.add_argument("--out", required=True, help="sentence labels, JSON lines")
    a.add_argument("--labeller", choices=["rules", "openai"], default="rules", help="offline rules or an endpoint")
    a.add_argument("--base-url", help="OpenAI-compatible endpoint; unset = $OPENAI_BASE_URL")
    a.add_argument("--model", help="model name; unset = $OPENAI_MODEL")
    a.add_argument("--api-key-env", default="OPENAI_API_KEY", help="NAME of the env variable holding the key")
    a.add_argument("--cache", default="runs/label_cache", help="reply cache folder")
    a.add_argument("--timeout", type=at_least(0.001), default=60.0, help="seconds per request")
    a.add_argument("--retries", type=at_least(0), default=3, help="the client's retries, with back-off (errors, 429)")
    a.add_argument("--workers", type=at_least(1), default=1, help="parallel requests (openai labeller)")
    a = command("mmvqa", "build MMVQA questions (official MCQ format) from a label CSV")
    a.add_argument("--labels", required=True, nargs="+", help="CT-RATE or RAD-ChestCT labels CSVs (e.g. every split)")
    a.add_argument("--out", required=True, help="questions JSON")
    a.add_argument("--format", choices=["ctrate", "radchestct"], default="ctrate", help="labels format")
    a.add_argument("--seed", type=at_least(0, 2**31 - 1), default=0, help="options' order and the RL subset")
    a.add_argument("--per-label", action="store_true", help="one question per positive label, not per volume")
    a.add_argument("--rl-frac", type=at_least(0.0, 1.0), help="share of patients kept (RL subset: 0.05); unset = all")
    args = ap.parse_args(argv)
    if args.cmd != "preprocess":   # the file to write: checked before the work, not at its end
        if Path(args.out).is_dir():
            ap.error(f"--out {args.out} is a folder: name the file to write")
        writable_dir(Path(args.out).parent)
    if args.cmd == "mmvqa" and args.rl_frac == 0:
        ap.error("--rl-frac: must be above 0 (unset = every patient)")
    if args.cmd == "preprocess":
        if (args.format == "ctrate") != bool(args.metadata) or (args.format == "ctrate" and args.spacing):
            ap.error("--format ctrate needs --metadata and takes its spacing from it; radchestct takes --spacing")
        stats = preprocess_dir(args.src, args.out, args.format, args.metadata, PRESETS[args.preset], args.workers,
                               tuple(args.spacing or RAD_SPACING), args.no_chest)
        other, bad_list = stats["not_volume"], Path(args.out) / "bad_files.jsonl"
        kinds = f" ({', '.join(f'{k}: {n}' for k, n in other.items())})" if other else ""
        removed = f" ({stats['removed']} taken out of the cache)" if stats["removed"] else ""
        line = (f"{stats['written']} written, {stats['skipped']} already done, {stats['excluded']} excluded{removed}, "
                f"{stats['bad']} bad{f' (see {bad_list})' if stats['bad'] else ''}, "
                f"{sum(other.values())} not a volume{kinds}")
        if stats["bad"] or not any(stats[k] for k in ("written", "skipped", "bad", "excluded")):
            raise SystemExit(line + (f": no {args.format} volume under --src" if not stats["bad"] else ""))   # exit 1
        print(line)
    elif args.cmd == "label":
        try:
            labeller = OpenAILabeller(args.base_url, args.model, args.api_key_env, args.cache, args.timeout,
                                      args.retries) if args.labeller == "openai" else None
        except ValueError as e:
            ap.error(str(e))
        label_reports(read_reports(args.reports), args.out, labeller, args.workers)
        print(f"sentence labels written to {args.out}")
    elif args.cmd == "mmvqa":
        labels = {}
        for path in args.labels:
            more = read_labels(path) if args.format == "ctrate" else read_radchestct_labels(path)
            if twice := sorted(labels.keys() & more.keys()):
                raise SystemExit(f"{path}: {twice[0]} (and {len(twice) - 1} more) also in an earlier --labels file")
            labels |= more
        if args.rl_frac is not None:
            keep = set(rl_subset(list(labels), args.rl_frac, args.seed))
            labels = {n: v for n, v in labels.items() if n in keep}
        stats = {}
        write_json(args.out, build_mmvqa(labels, args.seed, args.per_label, stats=stats))
        print(f"{stats['items']} questions written to {args.out}; skipped {stats['no_positive']} volumes without a "
              f"positive label and {stats['few_negatives']} with fewer than three negatives")


if __name__ == "__main__":
    main()
