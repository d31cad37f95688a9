"""Text-classification data: the embedded Hutto ICWSM-2014 corpora and users' own tabular files.

Everything here turns files into a `pandas.DataFrame` with the columns `text`, `label` (str) and `department`,
and splits each department deterministically into train and test. Tokenisation lives in `common.text`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.config import JobConfig, RunConfig, SimulationConfig
from common.errors import DataError
from common.paths import cache_dir

if TYPE_CHECKING:
    import pandas as pd  # imported where used: a site's gate process reads its config without it

log = logging.getLogger(__name__)

HUTTO_SDIST = "vaderSentiment==3.3.2"
HUTTO_SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
HUTTO_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
HUTTO_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
# department name -> file in hutto_ICWSM_2014/
HUTTO_DEPARTMENTS = {
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
HUTTO_NEUTRAL_BAND = 0.5  # |mean rating| below this is neutral (dropped from "hutto"; a class of "hutto-small")
NEGATIVE, NEUTRAL, POSITIVE = "negative", "neutral", "positive"
# The small-department scenario ("hutto-small"): 6 departments of 400 rows (320 to train on), 3 classes.
SMALL_DEPARTMENTS = {"amazon": ("amazon",), "movies": ("movies-a", "movies-b"), "nyt": ("nyt-a", "nyt-b"),
                     "tweets": ("tweets",)}
SMALL_ROWS = 400
BUILTIN_SOURCES = ("hutto", "hutto-small")

TEXT, LABEL, DEPARTMENT = "text", "label", "department"
MAX_TEXT_CHARS = 100_000  # longer cells are almost certainly not a text snippet (e.g. a whole file pasted)
TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")  # UTF-8 text never holds a NUL byte; a file that does is not text
TEXT_SNIFF_BYTES = 1 << 16


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_hutto(cache: Path | None = None) -> Path:
    """Return the directory holding the four Hutto ground-truth files, fetching them once.

    The vaderSentiment sdist is fetched with pip (the ordinary package client), its sha256 verified, and only the
    four ground-truth TSVs are extracted into the cache (written to a temporary directory, then renamed).
    """
    root = (cache or cache_dir()) / "hutto_ICWSM_2014"
    if all((root / name).is_file() for name in HUTTO_DEPARTMENTS.values()):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    sdist = root.parent / HUTTO_SDIST_FILE
    if not sdist.is_file() or _sha256(sdist) != HUTTO_SDIST_SHA256:
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            log.info("fetch_hutto: downloading %s with pip", HUTTO_SDIST)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                   "-d", tmp, HUTTO_SDIST]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            got = Path(tmp) / HUTTO_SDIST_FILE
            if proc.returncode != 0 or not got.is_file():
                raise DataError(f"Could not download {HUTTO_SDIST} with pip: {proc.stderr.strip()[-500:]}")
            os.replace(got, sdist)
    digest = _sha256(sdist)
    if digest != HUTTO_SDIST_SHA256:
        sdist.unlink()
        raise DataError(f"{HUTTO_SDIST_FILE} has sha256 {digest}, expected {HUTTO_SDIST_SHA256}; deleted it.")
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        with tarfile.open(sdist) as outer:
            inner_member = outer.extractfile(HUTTO_INNER)
            if inner_member is None:
                raise DataError(f"{HUTTO_SDIST_FILE} does not contain {HUTTO_INNER}.")
            inner_bytes = inner_member.read()
        staged = Path(tmp) / "hutto_ICWSM_2014"
        staged.mkdir()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            for name in HUTTO_DEPARTMENTS.values():
                member = inner.extractfile(f"hutto_ICWSM_2014/{name}")
                if member is None:
                    raise DataError(f"The Hutto archive does not contain {name}.")
                (staged / name).write_bytes(member.read())
        if root.exists():  # a partial earlier extraction: replace it whole
            for child in root.iterdir():
                child.unlink()
            root.rmdir()
        os.replace(staged, root)
    log.info("fetch_hutto: cached the Hutto corpora in %s", root)
    return root


def load_hutto(cache: Path | None = None, *, neutral: bool = False) -> pd.DataFrame:
    """The four Hutto corpora as one frame; label = sign of the mean rating, |rating| < 0.5 dropped (or, with
    `neutral`, labelled neutral)."""
    import pandas as pd

    root = fetch_hutto(cache)
    frames = []
    for department, name in HUTTO_DEPARTMENTS.items():
        raw = pd.read_csv(root / name, sep="\t", header=None, names=["id", "rating", TEXT], quoting=3,
                          dtype={"id": str, TEXT: str}, encoding="utf-8", keep_default_na=False)
        if not neutral:
            raw = raw[raw["rating"].abs() >= HUTTO_NEUTRAL_BAND]
        label = np.where(raw["rating"] > 0, POSITIVE, NEGATIVE)
        label = np.where(raw["rating"].abs() < HUTTO_NEUTRAL_BAND, NEUTRAL, label)
        frames.append(pd.DataFrame({TEXT: raw[TEXT].str.strip(), LABEL: label, DEPARTMENT: department}))
    return pd.concat(frames, ignore_index=True)


def load_hutto_small(cache: Path | None = None, rows: int = SMALL_ROWS, seed: int = 0) -> pd.DataFrame:
    """The small-department scenario: `SMALL_DEPARTMENTS` of `rows` rows each, drawn (seeded, disjoint) from the
    Hutto corpora, with three classes (negative, neutral, positive by the mean rating)."""
    import pandas as pd

    frame = load_hutto(cache, neutral=True)
    rng = np.random.default_rng(seed)
    parts = []
    for corpus, names in SMALL_DEPARTMENTS.items():
        rows_of = frame[frame[DEPARTMENT] == corpus]
        order = rng.permutation(len(rows_of))
        for k, name in enumerate(names):
            picked = rows_of.iloc[order[k * rows:(k + 1) * rows]]
            parts.append(picked.assign(**{DEPARTMENT: name}))
    return pd.concat(parts, ignore_index=True)


def _pandas() -> Any:
    import pandas

    return pandas


_READERS = {
    ".csv": lambda p: _pandas().read_csv(p, dtype=str, keep_default_na=False),
    ".tsv": lambda p: _pandas().read_csv(p, sep="\t", dtype=str, keep_default_na=False, quoting=3),
    ".jsonl": lambda p: _pandas().read_json(p, lines=True, dtype=False),
    ".parquet": lambda p: _pandas().read_parquet(p),
}


def table_bytes(frame: pd.DataFrame, suffix: str) -> bytes:
    """`frame` in the format of a file ending in `suffix` (one `_READERS` reads back)."""
    suffix = suffix.lower()
    if suffix == ".csv":
        return frame.to_csv(index=False).encode()
    if suffix == ".tsv":
        text_cells = frame.select_dtypes(include="object").astype(str)
        if text_cells.apply(lambda col: col.str.contains("[\t\n\r]", regex=True)).any().any():
            raise DataError("A value holds a tab or line break, which TSV cannot carry; write CSV or JSONL.")
        return frame.to_csv(sep="\t", index=False, quoting=3).encode()
    if suffix == ".jsonl":
        return frame.to_json(orient="records", lines=True, force_ascii=False).encode()
    if suffix == ".parquet":
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        return buf.getvalue()
    raise DataError(f"Unsupported table format {suffix!r}; use one of {sorted(_READERS)}.")


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet file as it is (every column); `DataError` for a missing, empty, binary,
    unparsable or row-less file, or an unsupported format."""
    import pandas as pd

    if not path.exists():
        raise DataError(f"Data file {path} does not exist.")
    if not path.is_file():
        raise DataError(f"Data path {path} is not a file.")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"Data file {path}: unsupported format {path.suffix!r}; use one of {sorted(_READERS)}.")
    try:
        with path.open("rb") as fh:
            head = fh.read(TEXT_SNIFF_BYTES)
    except OSError as exc:
        raise DataError(f"Data file {path} cannot be read: {exc.strerror or exc}.") from exc
    if not head:
        raise DataError(f"Data file {path} is empty (0 bytes).")
    if path.suffix.lower() in TEXT_SUFFIXES and b"\x00" in head:
        raise DataError(f"Data file {path} is not a text file (it contains NUL bytes: binary, or not UTF-8).")
    try:
        raw = reader(path)
    except UnicodeDecodeError as exc:
        raise DataError(f"Data file {path} is not valid UTF-8 ({exc.reason} at byte {exc.start}).") from exc
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"Data file {path} could not be parsed: {exc}") from exc
    except OSError as exc:
        raise DataError(f"Data file {path} cannot be read: {exc.strerror or exc}.") from exc
    if raw.empty:
        raise DataError(f"Data file {path} has no rows.")
    return raw


def load_table(path: Path, text_column: str, label_column: str, department_column: str | None) -> pd.DataFrame:
    """Read a CSV/TSV/JSONL/Parquet file into the standard frame (department column optional)."""
    import pandas as pd

    raw = read_table(path)
    wanted = [text_column, label_column] + ([department_column] if department_column else [])
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        raise DataError(f"Data file {path} lacks column(s) {missing}; it has {list(raw.columns)}.")
    for column in wanted:
        nulls = int(raw[column].isna().sum())
        if nulls:
            raise DataError(f"Data file {path}: {nulls} row(s) have an empty '{column}'.")
    frame = pd.DataFrame({
        TEXT: raw[text_column].astype(str).str.strip(),
        LABEL: raw[label_column].astype(str).str.strip(),
        DEPARTMENT: raw[department_column].astype(str).str.strip() if department_column else path.stem,
    })
    empty_text = int((frame[TEXT] == "").sum())
    if empty_text:
        raise DataError(f"Data file {path}: {empty_text} row(s) have an empty '{text_column}'.")
    if (frame[LABEL] == "").any():
        raise DataError(f"Data file {path}: some rows have an empty '{label_column}'.")
    with_nul = int(frame[TEXT].str.contains("\x00", regex=False).sum())
    if with_nul:
        raise DataError(f"Data file {path}: {with_nul} '{text_column}' value(s) contain NUL characters (binary data?).")
    too_long = int((frame[TEXT].str.len() > MAX_TEXT_CHARS).sum())
    if too_long:
        raise DataError(f"Data file {path}: {too_long} text(s) exceed {MAX_TEXT_CHARS} characters.")
    return frame


def load_source(source: str, text_column: str = TEXT, label_column: str = LABEL,
                department_column: str | None = DEPARTMENT) -> pd.DataFrame:
    """`hutto` (the embedded default), `hutto-small` (the small-department scenario) or the path of a user file."""
    if source == "hutto":
        return load_hutto()
    if source == "hutto-small":
        return load_hutto_small()
    return load_table(Path(source), text_column, label_column, department_column)


@dataclass(frozen=True)
class Split:
    """One department's deterministic train/test split (texts and label indices)."""

    department: str
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray


def label_index(labels: tuple[str, ...], values: pd.Series, where: str) -> np.ndarray:
    """Map label strings to indices of `labels`; unknown labels are an error naming them."""
    lookup = {name: i for i, name in enumerate(labels)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown[:5]} are not in the job's label set {list(labels)}.")
    return values.map(lookup).to_numpy(dtype=np.int64)


def split_department(frame: pd.DataFrame, department: str, labels: tuple[str, ...], test_fraction: float,
                     seed: int) -> Split:
    """Seeded split of one department's rows; the same inputs give the same split on every machine."""
    rows = frame[frame[DEPARTMENT] == department]
    if len(rows) < 2:
        raise DataError(f"Department {department!r} has {len(rows)} example(s); at least 2 are needed.")
    rng = np.random.default_rng([seed, zlib.crc32(department.encode())])
    order = rng.permutation(len(rows))
    n_test = min(len(rows) - 1, max(1, round(len(rows) * test_fraction)))  # at least one row on each side
    test, train = rows.iloc[order[:n_test]], rows.iloc[order[n_test:]]
    where = f"Department {department!r}"
    return Split(department, train[TEXT].tolist(), label_index(labels, train[LABEL], where),
                 test[TEXT].tolist(), label_index(labels, test[LABEL], where))


def departments_of(frame: pd.DataFrame) -> list[str]:
    return sorted(frame[DEPARTMENT].unique().tolist())


def labels_of(frame: pd.DataFrame) -> tuple[str, ...]:
    return tuple(sorted(frame[LABEL].unique().tolist()))


def frame_labels_and_departments(source: str, text_column: str, label_column: str,
                                 department_column: str) -> tuple[tuple[str, ...], list[str]]:
    """Label set and department names of a simulation data source."""
    frame = load_source(source, text_column, label_column, department_column)
    return labels_of(frame), departments_of(frame)


def resolve_job(rc: RunConfig) -> tuple[JobConfig, SimulationConfig]:
    """Parse both configs; a job without labels takes the simulation data's label set."""
    job, sim = JobConfig.from_run_config(rc), SimulationConfig.from_run_config(rc)
    if not job.label_names:
        labels, _ = frame_labels_and_departments(sim.sim_data, sim.sim_text_column, sim.sim_label_column,
                                                 sim.sim_department_column)
        job = dataclasses.replace(job, labels=",".join(labels))  # checked again on construction
    return job, sim
