"""Stage 0: download xeno-canto recordings (API v3, or a local dump laid out like it).

    python -m local.download --conf conf.yml --data_dir data --xc_source SRC [--key value ...]

SRC is the API base URL (key in $XC_API_KEY) or a dump directory such as ../shared/xeno-canto.
Both go through the same parsing, filtering, selection, verification and atomic renames;
only the transport (local.xeno_canto) differs. Writes `<data_dir>/raw/`: audio/XC<id>.<ext>,
recordings.csv, ATTRIBUTION.md, ATTRIBUTION.csv, download_failures.csv and a done-marker.
In recordings.csv, `genus` and `species` are xeno-canto's gen and sp ("Coereba", "flaveola");
`path` is relative to raw/.

Selection (conf section `download`): group, quality, licence, length and species filters;
then at most max_per_species per species, keeping the best quality (A before B ...) and,
among equals, the lowest xeno-canto ids (the oldest uploads), so a rerun picks the same set.
"""
from __future__ import annotations

import difflib
import logging
import os
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from local.xeno_canto import (KEY_ENV_VAR, XC_API_URL, DownloadError, InvalidRecord,
                              Recording, RecordingSource, RetryableError, iter_listing,
                              open_source, parse_recording, source_identity, with_retries)
from utils.atomic import atomic_path
from utils.audio import AudioError, decoded_duration_s
from utils.config import Conf, parse_stage_args
from utils.stage_marker import clear_done, is_done, mark_done

log = logging.getLogger(__name__)

MARKER_NAME = "download"
RECORDINGS_COLUMNS = ["id", "genus", "species", "english_name", "recordist", "licence",
                      "quality", "type", "background_species", "length_s", "group", "country",
                      "url", "path"]
ATTRIBUTION_COLUMNS = ["id", "species", "english_name", "recordist", "licence", "url"]
FAILURE_COLUMNS = ["id", "species", "file_url", "reason"]
# xeno-canto's quality ratings, best first; anything else ("no score") ranks after them.
QUALITY_ORDER = "ABCDE"


@dataclass
class DownloadSummary:
    n_listed: int = 0
    n_selected: int = 0
    n_downloaded: int = 0
    n_skipped_existing: int = 0
    n_failed: int = 0
    hours: float = 0.0
    already_done: bool = False

    def line(self, raw_dir: Path) -> str:
        if self.already_done:
            return (f"download: already done with these settings: {self.n_selected} "
                    f"recordings, {self.hours:.2f} h in {raw_dir}")
        return (f"download: {self.n_listed} listed, {self.n_selected} selected, "
                f"{self.n_downloaded} downloaded, {self.n_skipped_existing} already there, "
                f"{self.n_failed} failed; {self.hours:.2f} h of audio in {raw_dir}")


# ------------------------------------------------------------------------ selection

def parse_listing(raw_records: Iterable[Any]) -> tuple[list[Recording], int]:
    """Valid recordings of a listing (invalid ones are skipped with a warning), and how
    many entries were listed. A repeated id (pages shifting under us) is kept once."""
    records: dict[int, Recording] = {}
    n_listed = 0
    for raw in raw_records:
        n_listed += 1
        try:
            rec = parse_recording(raw)
        except InvalidRecord as err:
            rec_id = str(raw.get("id"))[:40] if isinstance(raw, dict) else "?"
            log.warning("skipping listed record %r: %s", rec_id, err)
            continue
        records.setdefault(rec.id, rec)
    return list(records.values()), n_listed


def _quality_rank(quality: str) -> int:
    return QUALITY_ORDER.index(quality) if quality in QUALITY_ORDER and quality else len(
        QUALITY_ORDER)


def check_species_names(names: Sequence[str], records: Sequence[Recording]) -> None:
    """Every requested species must occur in the listing; else say which names are close."""
    listed = sorted({rec.species for rec in records})
    by_lower = {name.lower(): name for name in listed}
    for name in names:
        if " ".join(str(name).split()).lower() in by_lower:
            continue
        close = difflib.get_close_matches(str(name), listed, n=5, cutoff=0.6)
        hint = (f"close matches: {', '.join(close)}" if close else
                f"no close match among the {len(listed)} listed species")
        raise DownloadError(f"species '{name}' is not in the listing ({hint}). Names are "
                            f"'Genus species' as xeno-canto writes them; the listing comes "
                            f"from the query in conf (download.query)")


def select_recordings(records: Sequence[Recording], download_conf: dict[str, Any]
                      ) -> list[Recording]:
    """Apply the conf's filters and per-species cap; returns the selection sorted by id.
    Empty `groups`, `qualities` or `species` lists mean no filter on that field."""
    dl = download_conf
    funnel = [f"{len(records)} valid"]
    selected = list(records)

    def keep(description: str, predicate) -> None:
        nonlocal selected
        selected = [rec for rec in selected if predicate(rec)]
        funnel.append(f"{len(selected)} {description}")

    groups = {str(g).lower() for g in dl["groups"]}
    if groups:
        keep(f"in groups {sorted(groups)}", lambda rec: rec.group.lower() in groups)
    qualities = {str(q) for q in dl["qualities"]}
    if qualities:
        keep(f"of quality {sorted(qualities)}", lambda rec: rec.quality in qualities)
    excluded_licences = [str(s).lower() for s in dl["exclude_licences"]]
    if excluded_licences:
        keep(f"without licences containing {excluded_licences}",
             lambda rec: not any(s in rec.licence.lower() for s in excluded_licences))
    min_s, max_s = float(dl["min_length_s"]), float(dl["max_length_s"])
    keep(f"of {min_s:g}-{max_s:g} s", lambda rec: min_s <= rec.length_s <= max_s)
    excluded_species = {" ".join(str(s).split()).lower() for s in dl["exclude_species"]}
    if excluded_species:
        keep("not of excluded species",
             lambda rec: rec.species.lower() not in excluded_species)
    if dl["species"]:
        check_species_names(dl["species"], records)
        wanted = {" ".join(str(s).split()).lower() for s in dl["species"]}
        keep(f"of the {len(wanted)} requested species",
             lambda rec: rec.species.lower() in wanted)
        present = {rec.species.lower() for rec in selected}
        for name in sorted(wanted - present):
            log.warning("species '%s' is listed, but none of its recordings passes the "
                        "filters", name)
    cap = int(dl["max_per_species"])
    if cap > 0:
        by_species: dict[str, list[Recording]] = defaultdict(list)
        for rec in selected:
            by_species[rec.species].append(rec)
        selected = [rec for group in by_species.values()
                    for rec in sorted(group, key=lambda r: (_quality_rank(r.quality), r.id))[:cap]]
        funnel.append(f"{len(selected)} after at most {cap} per species")
    log.info("selection: %s", ", ".join(funnel))
    if not selected:
        raise DownloadError(f"no recording passes the filters ({', '.join(funnel)}); "
                            f"check the download section of the conf")
    return sorted(selected, key=lambda rec: rec.id)


# ------------------------------------------------------------------------- download

# The listing's `length` is whole seconds ("m:ss", mostly rounded down; one recording of the
# shared dump decodes 0.83 s shorter than it says): a file may decode this much shorter.
LENGTH_TOLERANCE_S = 1.0
LENGTH_TOLERANCE_FRACTION = 0.01


def check_audio_file(path: Path, listed_s: float | None = None) -> float:
    """Decode the whole of `path` and return its length in seconds; raise AudioError unless it
    is audio with samples, decodes as long as its header announces (utils.audio.read_blocks:
    an mp3 cut short keeps its header) and, given the listing's length `listed_s`, is not
    shorter than that (within LENGTH_TOLERANCE_S + LENGTH_TOLERANCE_FRACTION of it)."""
    try:
        duration_s = decoded_duration_s(path)
    except AudioError as err:  # named as the recording, not as its .part
        raise AudioError(str(err).replace(str(path), path.name)) from None
    if listed_s is not None:
        shortest = listed_s - LENGTH_TOLERANCE_S - LENGTH_TOLERANCE_FRACTION * listed_s
        if duration_s < shortest:
            raise AudioError(f"{path.name}: truncated: {duration_s:.2f} s decode, the listing "
                             f"says {listed_s:g} s")
    return duration_s


def _fetch_verified(rec: Recording, source: RecordingSource, final: Path) -> None:
    """One attempt: fetch to `<final>.part`, check its size, that it decodes in full and as
    long as the listing says, then rename."""
    with atomic_path(final) as part:
        expected = source.fetch_audio(rec, part)
        size = part.stat().st_size
        if expected is not None and size != expected:
            raise RetryableError(f"XC{rec.id}: truncated ({size} of {expected} bytes)")
        try:
            check_audio_file(part, rec.length_s)
        except AudioError as err:
            raise RetryableError(f"XC{rec.id}: bad audio ({err})") from None


def _existing_ok(final: Path, listed_s: float) -> bool:
    if not final.is_file():
        return False
    try:
        check_audio_file(final, listed_s)
        return True
    except AudioError as err:
        log.warning("%s; downloading it again", err)
        final.unlink()
        return False


def recordings_row(rec: Recording, rel_path: str) -> dict[str, Any]:
    # genus and species as xeno-canto splits them (gen, sp): "Coereba", "flaveola".
    return {"id": rec.id, "genus": rec.genus, "species": rec.epithet,
            "english_name": rec.english_name, "recordist": rec.recordist,
            "licence": rec.licence, "quality": rec.quality, "type": rec.sound_type,
            "background_species": ";".join(rec.background_species),
            "length_s": rec.length_s, "group": rec.group, "country": rec.country,
            "url": rec.page_url, "path": rel_path}


# -------------------------------------------------------------------------- outputs

def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def licence_label(url: str) -> str:
    """'https://creativecommons.org/licenses/by-nc-sa/4.0/' -> 'CC BY-NC-SA 4.0'."""
    parts = [p for p in url.split("/") if p]
    if "licenses" in parts and len(parts) > parts.index("licenses") + 2:
        i = parts.index("licenses")
        return f"CC {parts[i + 1].upper()} {parts[i + 2]}"
    if "zero" in parts:
        return "CC0"
    return url


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def attribution_table(recordings: pd.DataFrame) -> pd.DataFrame:
    """ATTRIBUTION.csv: who recorded what, under which licence ("species" = "Genus species")."""
    table = recordings.assign(species=recordings["genus"] + " " + recordings["species"])
    return table[ATTRIBUTION_COLUMNS]


def attribution_markdown(attribution: pd.DataFrame) -> str:
    credits = Counter(attribution["recordist"])
    lines = [
        "# Attribution",
        "",
        "The audio in `audio/` (and everything derived from it: clips, mixtures, examples) "
        "comes from [xeno-canto](https://xeno-canto.org). Every recording is © its recordist "
        "and used under the Creative Commons licence listed with it: BY = credit the "
        "recordist, NC = non-commercial use only, SA = share derivatives under the same "
        "licence.",
        "",
        f"Recordists ({len(credits)}): " + "; ".join(
            f"{_md(name)} ({n})" for name, n in sorted(credits.items())) + ".",
        "",
        "| Recording | Species | Recordist | Licence |",
        "|---|---|---|---|",
    ]
    for row in attribution.itertuples(index=False):
        species = f"{_md(row.english_name)} (*{_md(row.species)}*)" if row.english_name \
            else f"*{_md(row.species)}*"
        lines.append(f"| [XC{row.id}]({row.url}) | {species} | {_md(row.recordist)} | "
                     f"[{licence_label(row.licence)}]({row.licence}) |")
    return "\n".join(lines) + "\n"


def write_outputs(raw_dir: Path, recordings: pd.DataFrame, failures: pd.DataFrame) -> None:
    _write_csv(recordings, raw_dir / "recordings.csv")
    attribution = attribution_table(recordings.fillna(""))
    _write_csv(attribution, raw_dir / "ATTRIBUTION.csv")
    with atomic_path(raw_dir / "ATTRIBUTION.md") as tmp:
        tmp.write_text(attribution_markdown(attribution))
    _write_csv(failures, raw_dir / "download_failures.csv")


def _outputs_complete(raw_dir: Path) -> pd.DataFrame | None:
    """The recordings table of a finished run, if it and every file it lists exist."""
    csv = raw_dir / "recordings.csv"
    if not all((raw_dir / name).is_file() for name in
               ("recordings.csv", "ATTRIBUTION.md", "ATTRIBUTION.csv")):
        return None
    recordings = pd.read_csv(csv, keep_default_na=False)
    if all((raw_dir / p).is_file() for p in recordings["path"]):
        return recordings
    return None


# ---------------------------------------------------------------------------- stage

def download_recordings(conf: Conf, data_dir: str | Path, xc_source: str | Path,
                        api_key: str | None = None) -> pd.DataFrame:
    """Run stage 0; returns the recordings table (also in `<data_dir>/raw/recordings.csv`)
    with the run's counts in `.attrs["summary"]`. `api_key` defaults to $XC_API_KEY."""
    dl = conf["download"]
    raw_dir = Path(data_dir) / "raw"
    # The key is deliberately not part of the params: they are written to the marker.
    # "verified" makes a marker of a run that only checked headers (and so kept files cut
    # short) out of date: that run's files are decoded once more.
    params = {**dl, "xc_source": source_identity(xc_source), "verified": "decoded length"}
    summary = DownloadSummary()

    if is_done(raw_dir, MARKER_NAME, params):
        recordings = _outputs_complete(raw_dir)
        if recordings is not None:
            summary = DownloadSummary(n_selected=len(recordings), already_done=True,
                                      hours=float(recordings["length_s"].sum()) / 3600)
            print(summary.line(raw_dir))
            recordings.attrs["summary"] = asdict(summary)
            return recordings

    if api_key is None:
        api_key = os.environ.get(KEY_ENV_VAR) or None
    source = open_source(xc_source, dl, api_key)
    clear_done(raw_dir, MARKER_NAME)

    records, summary.n_listed = parse_listing(iter_listing(source))
    selected = select_recordings(records, dl)
    summary.n_selected = len(selected)

    audio_dir = raw_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    with logging_redirect_tqdm():
        for rec in tqdm(selected, desc="download", unit="file"):
            # Built from the validated numeric id only: no listing text reaches the path.
            final = audio_dir / f"XC{rec.id}.{source.audio_extension(rec)}"
            if _existing_ok(final, rec.length_s):
                summary.n_skipped_existing += 1
            else:
                try:
                    with_retries(lambda: _fetch_verified(rec, source, final), f"XC{rec.id}",
                                 source.retry_policy)
                except DownloadError as err:
                    log.warning("XC%d failed, skipped: %s", rec.id, err)
                    failures.append({"id": rec.id, "species": rec.species,
                                     "file_url": rec.file_url, "reason": str(err)})
                    continue
                summary.n_downloaded += 1
            rows.append(recordings_row(rec, final.relative_to(raw_dir).as_posix()))

    summary.n_failed = len(failures)
    recordings = pd.DataFrame(rows, columns=RECORDINGS_COLUMNS)
    write_outputs(raw_dir, recordings, pd.DataFrame(failures, columns=FAILURE_COLUMNS))
    summary.hours = float(recordings["length_s"].sum()) / 3600
    if not rows:
        raise DownloadError(f"none of the {len(selected)} selected recordings could be "
                            f"downloaded (see {raw_dir / 'download_failures.csv'})")
    if failures:
        log.warning("%d downloads failed (listed in %s); rerun the stage to retry them",
                    len(failures), raw_dir / "download_failures.csv")
    else:
        mark_done(raw_dir, MARKER_NAME, params)
    print(summary.line(raw_dir))
    recordings.attrs["summary"] = asdict(summary)
    return recordings


def main(argv: Sequence[str] | None = None) -> int:
    def add_arguments(parser) -> None:
        parser.add_argument("--data_dir", required=True, help="data directory (raw/ goes here)")
        parser.add_argument("--xc_source", default=XC_API_URL,
                            help=f"xeno-canto API v3 URL (key in ${KEY_ENV_VAR}) or a local "
                                 f"dump directory (default: %(default)s)")

    args, conf = parse_stage_args("Stage 0: download xeno-canto recordings.", argv,
                                  add_arguments)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        download_recordings(conf, args.data_dir, args.xc_source)
    except DownloadError as err:
        print(f"download: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
