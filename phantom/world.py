"""The phantom world's generator: synthetic chest CTs in the exact CT-RATE v2 / RAD-ChestCT on-disk formats.

The 18 CT-RATE abnormalities are drawn big and contrasty enough to survive the (5, 5, 10) mm preset, varying per
patient; volumes, reports, labels and VQA come from one patient description, so they agree. `ensure_world` builds
what is missing: raw dataset, caches, sentence labels and MMVQA (with data.py's code), tiny LLM and text encoder.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

import data
from phantom import llm
from data import ABNORMALITIES, HU_MAX, HU_MIN, RAD_TO_CTRATE, REPORT_COLUMNS

# The columns of CT-RATE's metadata CSVs and RAD-ChestCT's 84 abnormality labels, as the real files hold them.
METADATA_COLUMNS = (
    "VolumeName,Manufacturer,SeriesDescription,ManufacturerModelName,PatientSex,PatientAge,ReconstructionDiameter,"
    "DistanceSourceToDetector,DistanceSourceToPatient,GantryDetectorTilt,TableHeight,RotationDirection,ExposureTime,"
    "XRayTubeCurrent,Exposure,FilterType,GeneratorPower,FocalSpots,ConvolutionKernel,PatientPosition,RevolutionTime,"
    "SingleCollimationWidth,TotalCollimationWidth,TableSpeed,TableFeedPerRotation,SpiralPitchFactor,"
    "DataCollectionCenterPatient,ReconstructionTargetCenterPatient,ExposureModulationType,CTDIvol,"
    "ImagePositionPatient,ImageOrientationPatient,SliceLocation,SamplesPerPixel,PhotometricInterpretation,Rows,"
    "Columns,XYSpacing,RescaleIntercept,RescaleSlope,RescaleType,NumberofSlices,ZSpacing,StudyDate").split(",")
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

PHANTOM_PREVALENCE = np.random.default_rng(7).permutation(np.linspace(0.18, 0.36, len(ABNORMALITIES)))
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
        self.vol[box][mask if where is None else mask & where[box]] = value

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
    labels = np.zeros(len(ABNORMALITIES), bool) if force_normal or rng.random() < PHANTOM_ALL_NEGATIVE \
        else rng.random(len(ABNORMALITIES)) < PHANTOM_PREVALENCE
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
    _draw_findings(cv, p, lungs, lung, P, at, heart_c, heart_r)
    cv.vol += rng.normal(0, 12, shape).astype(np.float32)  # quantum noise
    return cv.vol


def _draw_findings(cv: _Canvas, p: dict, lungs: list, lung: np.ndarray, P, at, heart_c, heart_r) -> None:
    """Draw patient p's abnormalities on the anatomy (the lung ones restricted to the lung mask)."""
    L, s, sz, shape = p["labels"], p["scale"], p["shift"][2], cv.vol.shape
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
        o, c = p["hernia"], P(8, 40, -105)
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
                                    "sequelae are seen in the {side} lung."], "Fibrotic sequelae."),
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
        path = data.ctrate_path(Path(out) / f"{split}_fixed", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        maker = str(rng.choice(["Philips", "Siemens Healthineers", "PNMS", "SIEMENS"], p=[0.6, 0.28, 0.06, 0.06]))
        meta = {c: "" for c in METADATA_COLUMNS}
        meta.update(VolumeName=name, Manufacturer=maker, SeriesDescription="PHANTOM", ManufacturerModelName="Phantom",
                    PatientSex=p["sex"], PatientAge=f"{p['age']:03d}Y", ReconstructionDiameter="360",
                    GantryDetectorTilt="0", PatientPosition="HFS", ConvolutionKernel=["B", "YA"][r - 1],
                    ImagePositionPatient=f"[{-origin[0]}, {-origin[1]}, {origin[2]}]", XYSpacing=f"[{sxy}, {sxy}]",
                    ImageOrientationPatient="[1, 0, 0, 0, 1, 0]", SliceLocation=f"{origin[2]}", SamplesPerPixel="1",
                    PhotometricInterpretation="MONOCHROME2", Rows=str(nxy), Columns=str(nxy),
                    RescaleIntercept="-8192" if maker == "Siemens Healthineers" else "-1024",
                    RescaleSlope="1", NumberofSlices=str(nz), ZSpacing=str(sz), StudyDate="20240101")
        rows.append({"name": name, "meta": meta, "labels": p["labels"].astype(int).tolist(),
                     "findings": findings, "impression": impression,
                     "vqa": _phantom_vqa(name, p, findings, impression, rng, 0)})
    return rows


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *rows])


def make_phantom(out, n_train=400, n_valid=340, n_rad=340, seed=0, workers=None, progress=True) -> None:
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
    with data._pool(workers) as pool:
        results = list(tqdm(pool.map(_phantom_patient_job, jobs, chunksize=4), total=len(jobs), desc="phantom",
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
        h = {r["name"]: int(hashlib.md5(r["name"].encode()).hexdigest(), 16) % 100 for r in rows}  # some lack a section
        reports = [[r["name"], "Chest CT for evaluation.", "Non-contrast chest CT.",
                    "Not given." if h[r["name"]] == 0 else text(r["findings"]),
                    "Not given." if h[r["name"]] in (1, 2) else text(r["impression"])] for r in rows]
        _write_csv(out / "radiology_text_reports" / f"{csv_split}_reports.csv", REPORT_COLUMNS, reports)
        vqa = [dict(item, id=f"{item['id'].rsplit('_', 1)[0]}_{i}") for i, item in
               enumerate(it for r in rows for it in r["vqa"])]
        (out / "vqa").mkdir(parents=True, exist_ok=True)
        (out / "vqa" / f"{split}_vqa.json").write_text(json.dumps(vqa, indent=1))
    rad84 = []
    for r in by_split["rad"]:   # each drawn finding sets the RAD-ChestCT label it maps to (data.RAD_TO_CTRATE)
        on = {RAD_TO_CTRATE[name][0] for k, name in enumerate(ABNORMALITIES) if r["labels"][k] and RAD_TO_CTRATE[name]}
        rad84.append([r["name"]] + ["1.0" if label in on else "0.0" for label in RAD_ABNORMALITIES])
    _write_csv(out / "radchestct" / "imgtest_abnormality_labels_84.csv", ["NoteAcc_DEID"] + RAD_ABNORMALITIES, rad84)


# 340 validation and RAD-ChestCT-format volumes: about 320 MMVQA questions per set (standard error ~2.7 points)
PHANTOM_DEFAULTS = {"n_train": 400, "n_valid": 340, "n_rad": 340, "seed": 0, "rl_frac": 0.25}


def ensure_world(root="runs/phantom", n_train=None, n_valid=None, n_rad=None, seed=None, rl_frac=None,
                 progress=False) -> dict[str, Path]:
    """Build whatever part of the phantom world under root is missing (dataset, caches, sentence labels, MMVQA
    files, the tiny LLM and text encoder) and return data.paths(root) plus "tiny_llm". Idempotent and safe under
    concurrent callers (file lock); a root holding other data is never touched; a complete world that this user
    cannot write (shared read-only) is used as it is. The RL subset is rl_frac of the training patients (the
    paper's 5 % of a few hundred phantom patients would leave too few questions)."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):   # a worker importing the main script
        raise RuntimeError("phantom.ensure_world ran while a worker process imported the main script, and would wait "
                           "forever for the lock its parent holds: call it under `if __name__ == '__main__':`")
    paths = data.paths(root)
    root, ds = paths["root"], paths["dataset"]
    if [d for d in ("dataset", "cache", "sentences", "mmvqa") if any((root / d).glob("*"))] \
            and not (root / "phantom.json").exists():   # data of another kind, which building here would replace
        raise SystemExit(f"{root} holds data that is not a phantom world: pass --preset real, or another root")
    root.mkdir(parents=True, exist_ok=True)
    asked = {"n_train": n_train, "n_valid": n_valid, "n_rad": n_rad, "seed": seed, "rl_frac": rl_frac}
    writable = os.access(root, os.W_OK)   # False: a world shared read-only, e.g. by a class
    with open(root / ".lock", "a") if writable else contextlib.nullcontext() as lock:
        if writable:
            fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks (or parallel tests) wait for the first builder
        # a parameter left out keeps the value the existing world was built with (else the default)
        built = data.read_json(root / "phantom.json") if (root / "phantom.json").exists() else {}
        params = {k: v if v is not None else built.get(k, PHANTOM_DEFAULTS[k]) for k, v in asked.items()}
        n_train, n_valid, n_rad, seed, rl_frac = params.values()
        if built and built != params:
            raise ValueError(f"{root} holds a phantom world built with {built}, not {params}: use another root")
        if not built:
            data.write_json(root / "phantom.json", params)   # atomic: never an empty file after a kill
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
            data.check_preset(paths[key], data.PHANTOM)             # not one made before data.PHANTOM changed
            if not (paths[key] / ".done").exists():
                stats = data.preprocess_dir(paths[src], paths[key], fmt, paths[meta] if meta else None, data.PHANTOM,
                                            min(os.cpu_count() or 1, 8), PHANTOM_RAD_SPACING, progress=progress)
                if stats["bad"]:
                    raise RuntimeError(f"phantom preprocessing failed, see {paths[key] / 'bad_files.jsonl'}")
                (paths[key] / ".done").touch()
        for split in ("train", "valid"):
            if not paths[f"{split}_sentences"].exists():
                data.label_reports(data.read_reports(paths[f"{split}_reports"]), paths[f"{split}_sentences"],
                                   progress=progress)
        train, valid = data.read_labels(paths["train_labels"]), data.read_labels(paths["valid_labels"])
        rl_names = set(data.rl_subset(list(train), rl_frac, seed))
        for key, labels, s in (("mmvqa_train", train, seed), ("mmvqa_valid", valid, seed + 1),
                               ("mmvqa_rl", {n: v for n, v in train.items() if n in rl_names}, seed + 2),
                               ("mmvqa_radchestct", data.read_radchestct_labels(paths["radchestct_labels"]), seed + 3)):
            if not paths[key].exists():
                data.write_json(paths[key], data.build_mmvqa(labels, s))
        paths["tiny_llm"] = root / "tiny_llm"
        if not (paths["tiny_llm"] / "config.json").is_file():
            llm.build_tiny_llm(llm.phantom_texts(paths), paths["tiny_llm"])
        if not (paths["text_encoder"] / "config.json").is_file():
            llm.build_text_encoder(paths["tiny_llm"], paths["text_encoder"])
    return paths


