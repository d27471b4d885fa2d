"""Discover BraTS cases under a root and auto-detect the release layout.

Layouts (case folder / file names):

* 2020: ``BraTS20_Training_001/BraTS20_Training_001_{t1,t1ce,t2,flair,seg}.nii[.gz]``
  (validation folders: ``BraTS20_Validation_001``)
* 2021: ``BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz``
* 2023: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``

Validation and test folders have no ``seg``. Cases may sit directly under the
root or one level deeper (e.g. ``root/MICCAI_BraTS2020_TrainingData/...``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trifuse import keys

_PATTERNS: tuple[tuple[int, re.Pattern, str], ...] = (
    (2023, re.compile(r"^BraTS-[A-Z]+-\d+-\d+$"), "-"),
    (2021, re.compile(r"^BraTS2021_\d+$"), "_"),
    (2020, re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$"), "_"),
)
_EXTS = (".nii.gz", ".nii")


@dataclass
class CaseRecord:
    """One case on disk.

    Attributes:
        case_id: folder name, also the BraTS submission file stem.
        year: release whose layout and label convention the case follows.
        directory: case folder.
        images: canonical modality name (:data:`trifuse.keys.MODALITIES`) → file; a missing
            modality is absent from the dict (validation reports it).
        seg: label file, or ``None`` for validation/test cases.
        missing: canonical modality names whose file was not found.
    """

    case_id: str
    year: int
    directory: Path
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def has_seg(self) -> bool:
        return self.seg is not None

    def files(self) -> list[Path]:
        """All files of the case (images then seg)."""
        return list(self.images.values()) + ([self.seg] if self.seg else [])


def detect_year(case_id: str) -> int | None:
    """Release whose naming ``case_id`` follows, or ``None``."""
    for year, pattern, _ in _PATTERNS:
        if pattern.match(case_id):
            return year
    return None


def _find(directory: Path, stem: str) -> Path | None:
    for ext in _EXTS:
        p = directory / f"{stem}{ext}"
        if p.exists():
            return p
    return None


def case_record(directory: str | Path, year: int | None = None) -> CaseRecord:
    """Build the record of one case folder.

    Raises:
        ValueError: if the folder name follows no known BraTS layout and ``year`` is not given.
    """
    directory = Path(directory)
    case_id = directory.name
    detected = detect_year(case_id)
    year = year or detected
    if year is None:
        raise ValueError(f"{directory}: folder name follows no BraTS layout (2020, 2021 or 2023)")
    sep = "-" if int(year) == 2023 else "_"
    rec = CaseRecord(case_id=case_id, year=int(year), directory=directory)
    for name, suffix in zip(keys.MODALITIES, keys.MODALITY_SUFFIXES[int(year)]):
        p = _find(directory, f"{case_id}{sep}{suffix}")
        if p is None:
            rec.missing.append(name)
        else:
            rec.images[name] = p
    rec.seg = _find(directory, f"{case_id}{sep}seg")
    return rec


def _case_dirs(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if p.is_dir() and detect_year(p.name)]
    if found:
        return found
    # one level deeper: e.g. root/MICCAI_BraTS2020_TrainingData/BraTS20_Training_001
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found += [p for p in sub.iterdir() if p.is_dir() and detect_year(p.name)]
    return found


def discover_cases(root: str | Path, year: int | str | None = "auto") -> list[CaseRecord]:
    """List the cases under ``root`` (or the single case that ``root`` is), sorted by id.

    Args:
        root: a dataset folder, a folder one level above case folders, or a case folder.
        year: ``"auto"``/``None`` to detect from names, or a release to enforce.

    Raises:
        FileNotFoundError: the root does not exist.
        ValueError: no BraTS case found, or cases of several releases are mixed, or the
            detected release differs from the requested one.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: data folder does not exist")
    if root.is_dir() and detect_year(root.name):
        dirs = [root]
    else:
        dirs = _case_dirs(root)
    if not dirs:
        raise ValueError(f"{root}: no BraTS case folders found (expected e.g. BraTS2021_00000/, BraTS-GLI-00000-000/)")
    records = sorted((case_record(d) for d in dirs), key=lambda r: r.case_id)
    years = sorted({r.year for r in records})
    if len(years) > 1:
        raise ValueError(f"{root}: cases of several BraTS releases are mixed: {years}")
    if year not in (None, "auto") and int(year) != years[0]:
        raise ValueError(f"{root}: requested BraTS {year} but the folders follow the {years[0]} layout")
    return records


def case_file_name(case_id: str, year: int, modality: str, ext: str = ".nii.gz") -> str:
    """File name of ``modality`` (canonical name or ``"seg"``) for a case in ``year``'s layout."""
    sep = "-" if int(year) == 2023 else "_"
    if modality == "seg":
        suffix = "seg"
    else:
        suffix = keys.MODALITY_SUFFIXES[int(year)][keys.MODALITIES.index(modality)]
    return f"{case_id}{sep}{suffix}{ext}"


def case_id_for(year: int, index: int, split: str = "Training") -> str:
    """A case id in ``year``'s naming, e.g. ``BraTS2021_00007`` or ``BraTS-GLI-00007-000``."""
    year = int(year)
    if year == 2020:
        return f"BraTS20_{split}_{index + 1:03d}"
    if year == 2021:
        return f"BraTS2021_{index:05d}"
    if year == 2023:
        return f"BraTS-GLI-{index:05d}-000"
    raise ValueError(f"unknown BraTS year {year}")
