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
        unexpected: for a missing modality (or ``"seg"``), NIfTI files of the folder that look
            like it but do not carry the expected name (e.g. another case id or separator),
            so the message can say which file is there and which name was expected.
        stray: NIfTI files of the folder matched to nothing.
    """

    case_id: str
    year: int
    directory: Path
    images: dict[str, Path] = field(default_factory=dict)
    seg: Path | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: dict[str, list[Path]] = field(default_factory=dict)
    stray: list[Path] = field(default_factory=list)

    def expected_name(self, modality: str) -> str:
        """The file name ``modality`` (canonical name or ``"seg"``) should have in this case."""
        return case_file_name(self.case_id, self.year, modality)

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


#: the other releases' names of each contrast, so a 2021-named file in a 2023 folder is recognised
_SYNONYMS = {
    name: {suffixes[i] for suffixes in keys.MODALITY_SUFFIXES.values()} for i, name in enumerate(keys.MODALITIES)
} | {"seg": {"seg"}}


def nifti_stem(name: str) -> str | None:
    """``name`` without its NIfTI extension (matched case-insensitively), or ``None``."""
    low = name.lower()
    for ext in _EXTS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def _nifti_files(directory: Path) -> dict[str, Path]:
    """Lower-cased stem → file, for the visible NIfTI files of ``directory``.

    Extensions match case-insensitively (``*_t1.NII.GZ`` is a NIfTI file); when a stem
    exists as both ``.nii.gz`` and ``.nii`` the compressed one wins, as before.
    """
    out: dict[str, Path] = {}
    for p in sorted(directory.iterdir(), key=lambda q: (not q.name.lower().endswith(".gz"), q.name)):
        stem = nifti_stem(p.name)
        if stem is None or p.name.startswith(".") or not p.is_file():
            continue
        out.setdefault(stem.lower(), p)
    return out


def _looks_like(stem: str, modality: str) -> bool:
    """True if a file stem ends with one of ``modality``'s suffixes after a separator."""
    low = stem.lower()
    return any(re.search(rf"(^|[-_. ]){re.escape(s)}$", low) for s in _SYNONYMS[modality])


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
    files = _nifti_files(directory)
    used: set[str] = set()
    for name, suffix in zip(keys.MODALITIES, keys.MODALITY_SUFFIXES[int(year)]):
        stem = f"{case_id}{sep}{suffix}".lower()
        if stem in files:
            rec.images[name] = files[stem]
            used.add(stem)
        else:
            rec.missing.append(name)
    seg_stem = f"{case_id}{sep}seg".lower()
    if seg_stem in files:
        rec.seg = files[seg_stem]
        used.add(seg_stem)
    rec.stray = [p for s, p in files.items() if s not in used]
    for name in rec.missing + ([] if rec.seg is not None else ["seg"]):
        hits = [p for p in rec.stray if _looks_like(nifti_stem(p.name), name)]
        if hits:
            rec.unexpected[name] = hits
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
