"""Stage 0 (local.download, local.xeno_canto) over real HTTP (tests/xc_server.py) and over
the shared dump directory. No mocking: the real client, the real server, real files."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import traceback
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest
import requests

from local.download import (ATTRIBUTION_COLUMNS, RECORDINGS_COLUMNS, download_recordings,
                            parse_listing, select_recordings)
from local.xeno_canto import (DownloadError, RetryableError, RetryPolicy,
                              extension_from_file_name, parse_length, parse_retry_after,
                              scrub, with_retries)
from xc_server import XenoCantoServer  # tests/ is on sys.path (rootdir-relative import)
from utils.audio import AudioError, read_audio
from utils.config import read_conf

KEY = "xc-test-key-7f3a9c51"
# Three species with several A/B recordings each: a handful of files per run.
FEW_SPECIES = ["Coereba flaveola", "Todus mexicanus", "Vireo latimeri"]


def make_conf(repo_root: Path, **download) -> dict:
    conf = read_conf(repo_root / "conf.yml")
    conf["download"].update(requests_per_second=1000.0, max_retries=3, backoff_s=0.01,
                            timeout_s=0.5, species=FEW_SPECIES, max_per_species=2)
    conf["download"].update(download)
    return conf


def selected_ids(xc_dump: Path, conf: dict) -> list[int]:
    raw = json.loads((xc_dump / "recordings.json").read_text())["recordings"]
    records, _ = parse_listing(raw)
    return [rec.id for rec in select_recordings(records, conf["download"])]


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def assert_key_nowhere(root: Path, *texts: str) -> None:
    for text in texts:
        assert KEY not in text
    for path in all_files(root):
        assert KEY.encode() not in path.read_bytes(), f"API key written to {path}"


def assert_clean_and_complete(data_dir: Path, xc_dump: Path, recordings: pd.DataFrame) -> None:
    raw = data_dir / "raw"
    assert not [p for p in all_files(data_dir) if p.name.endswith(".part")]
    listed = {raw / p for p in recordings["path"]}
    assert set((raw / "audio").iterdir()) == listed  # nothing else under audio/
    for row in recordings.itertuples():
        path = raw / row.path
        assert path.name == f"XC{row.id}.mp3"
        assert path.read_bytes() == (xc_dump / "audio" / path.name).read_bytes()
        audio, sr = read_audio(path)
        assert sr == 22050 and audio.shape[0] > 0


# --------------------------------------------------------------------------- HTTP

def test_http_download_survives_transient_failures(xc_dump, repo_root, tmp_path, caplog,
                                                   capsys):
    caplog.set_level(logging.DEBUG)  # urllib3 logs request lines (with the key) at DEBUG
    conf = make_conf(repo_root)
    ids = selected_ids(xc_dump, conf)
    assert len(ids) == 6
    with XenoCantoServer(xc_dump, KEY, per_page=50, sleep_s=2.0) as server:
        server.inject("page:1", "429")
        server.inject("page:3", "500", "timeout")
        server.inject(f"XC{ids[0]}", "429", "500")
        server.inject(f"XC{ids[1]}", "truncate")
        server.inject(f"XC{ids[2]}", "timeout")
        server.inject(f"XC{ids[3]}", "garbage", "truncate")
        recordings = download_recordings(conf, tmp_path / "data", server.api_url, api_key=KEY)
        requests_seen = list(server.requests)
        counts = {i: server.count(f"XC{i}") for i in ids}
    summary = recordings.attrs["summary"]
    assert (summary["n_selected"], summary["n_downloaded"], summary["n_failed"]) == (6, 6, 0)
    assert summary["n_listed"] == 442
    assert counts == {ids[0]: 3, ids[1]: 2, ids[2]: 2, ids[3]: 3, ids[4]: 1, ids[5]: 1}

    # Every page was asked for with the conf's query and the key; audio never gets the key.
    pages = [(route, params) for route, params in requests_seen if route.startswith("page:")]
    assert {route for route, _ in pages} == {f"page:{n}" for n in range(1, 10)}
    assert all(p["query"] == [conf["download"]["query"]] and p["key"] == [KEY]
               for _, p in pages)
    assert all("key" not in params for route, params in requests_seen
               if route.startswith("XC"))

    data = tmp_path / "data"
    on_disk = pd.read_csv(data / "raw" / "recordings.csv", keep_default_na=False)
    assert list(on_disk.columns) == RECORDINGS_COLUMNS
    assert list(on_disk["id"]) == ids
    assert set(on_disk["genus"] + " " + on_disk["species"]) == set(FEW_SPECIES)
    assert_clean_and_complete(data, xc_dump, on_disk)
    attribution = pd.read_csv(data / "raw" / "ATTRIBUTION.csv")
    assert list(attribution.columns) == ATTRIBUTION_COLUMNS
    assert list(attribution["recordist"]) == list(on_disk["recordist"])
    assert set(attribution["species"]) == set(FEW_SPECIES)
    assert all(lic.startswith("https://creativecommons.org/") for lic in attribution["licence"])
    md = (data / "raw" / "ATTRIBUTION.md").read_text()
    assert all(name in md for name in on_disk["recordist"])
    assert all(f"https://xeno-canto.org/{i}" in md for i in ids)
    assert (data / "raw" / ".done.download").is_file()

    out = capsys.readouterr()
    assert "6 downloaded" in out.out and "0 failed" in out.out
    assert "retry" in caplog.text  # the failures did happen and were retried
    assert_key_nowhere(data, caplog.text, out.out, out.err)


def test_persistent_failures_are_listed_then_resumed(xc_dump, repo_root, tmp_path, caplog):
    conf = make_conf(repo_root, max_retries=2)
    ids = selected_ids(xc_dump, conf)
    data = tmp_path / "data"
    broken = {ids[0]: ("truncate",) * 3, ids[2]: ("garbage",) * 3, ids[4]: ("404",)}
    with XenoCantoServer(xc_dump, KEY, per_page=200) as server:
        for rec_id, modes in broken.items():
            server.inject(f"XC{rec_id}", *modes)
        first = download_recordings(conf, data, server.api_url, api_key=KEY)
        failures = pd.read_csv(data / "raw" / "download_failures.csv")
        audio_after_first = {p.name for p in (data / "raw" / "audio").iterdir()}
        marked_after_first = (data / "raw" / ".done.download").exists()
        before = {i: server.count(f"XC{i}") for i in ids}
        server.clear_failures()
        second = download_recordings(conf, data, server.api_url, api_key=KEY)
        refetched = {i for i in ids if server.count(f"XC{i}") > before[i]}
    assert before[ids[0]] == before[ids[2]] == 3  # 1 try + max_retries
    assert before[ids[4]] == 1  # a 404 is not worth retrying

    raw = data / "raw"
    s1 = first.attrs["summary"]
    assert (s1["n_downloaded"], s1["n_failed"]) == (3, 3)
    assert set(failures["id"]) == set(broken)
    assert "HTTP 404" in failures.set_index("id").loc[ids[4], "reason"]
    assert list(first["id"]) == [i for i in ids if i not in broken]
    # Failed downloads never sit under their final name, nor as leftovers.
    assert audio_after_first == {f"XC{i}.mp3" for i in first["id"]}
    assert not marked_after_first  # unfinished: the next run must retry
    assert (raw / ".done.download").exists()

    s2 = second.attrs["summary"]
    assert (s2["n_downloaded"], s2["n_skipped_existing"], s2["n_failed"]) == (3, 3, 0)
    assert refetched == set(broken)  # only the failed ones were fetched again
    assert pd.read_csv(raw / "download_failures.csv").empty
    assert_clean_and_complete(data, xc_dump, pd.read_csv(raw / "recordings.csv"))
    assert_key_nowhere(data, caplog.text)


def test_local_dump_gives_the_same_recordings_as_http(xc_dump, repo_root, tmp_path):
    conf = make_conf(repo_root, species=[], max_per_species=1, min_length_s=20.0)
    with XenoCantoServer(xc_dump, KEY, per_page=100) as server:
        via_http = download_recordings(conf, tmp_path / "http", server.api_url, api_key=KEY)
    via_dir = download_recordings(conf, tmp_path / "dir", xc_dump)
    assert len(via_http) > 20
    for name in ("recordings.csv", "ATTRIBUTION.csv", "ATTRIBUTION.md"):
        assert (tmp_path / "http" / "raw" / name).read_text() == \
            (tmp_path / "dir" / "raw" / name).read_text()
    assert_clean_and_complete(tmp_path / "dir", xc_dump, via_dir)


def test_wrong_key_is_a_clear_immediate_error(xc_dump, repo_root, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-key-0d1e2f"
    with XenoCantoServer(xc_dump, KEY) as server:
        with pytest.raises(DownloadError, match=r"refused the API key \(HTTP 401\)") as info:
            download_recordings(make_conf(repo_root), tmp_path / "data", server.api_url,
                                api_key=wrong)
        assert server.count("page:1") == 1  # not retried
    message = "".join(traceback.format_exception(info.value))
    assert wrong not in message and wrong not in caplog.text
    assert "XC_API_KEY" in message


def test_key_scrubbed_from_connection_errors(repo_root, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api/3/recordings"
    with pytest.raises(requests.ConnectionError) as raw_error:
        requests.get(url, params={"key": KEY}, timeout=1)
    assert KEY in str(raw_error.value)  # requests would leak it: the client must scrub

    with pytest.raises(DownloadError, match="gave up after 2 attempts") as info:
        download_recordings(make_conf(repo_root, max_retries=1), tmp_path / "data", url,
                            api_key=KEY)
    assert KEY not in "".join(traceback.format_exception(info.value))
    assert KEY not in caplog.text and "retry 1 of 1" in caplog.text


def test_no_key_says_how_to_get_one(repo_root, tmp_path, monkeypatch):
    monkeypatch.delenv("XC_API_KEY", raising=False)
    with pytest.raises(DownloadError) as info:
        download_recordings(make_conf(repo_root), tmp_path / "data",
                            "https://xeno-canto.org/api/3/recordings")
    message = str(info.value)
    assert "XC_API_KEY" in message and "https://xeno-canto.org/account" in message
    assert "--xc_source ../shared/xeno-canto" in message
    assert not (tmp_path / "data").exists()

    env = {k: v for k, v in os.environ.items() if k != "XC_API_KEY"}
    out = subprocess.run([sys.executable, "-m", "local.download", "--data_dir",
                          str(tmp_path / "data"), "--xc_source", "http://127.0.0.1:9/api"],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "XC_API_KEY" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------- resume, local dir

def test_resume_downloads_only_what_is_missing(xc_dump, repo_root, tmp_path):
    conf = make_conf(repo_root)
    data = tmp_path / "data"
    raw = data / "raw"
    first = download_recordings(conf, data, xc_dump)
    n = len(first)
    assert first.attrs["summary"]["n_downloaded"] == n == 6
    assert set(first["quality"]) <= {"A", "B"} and not first["licence"].str.contains("nd").any()

    assert download_recordings(conf, data, xc_dump).attrs["summary"]["already_done"]

    stamps = {p.name: p.stat().st_mtime_ns for p in (raw / "audio").iterdir()}
    deleted = raw / first["path"][2]
    deleted.unlink()  # marker still there, but its outputs are incomplete
    third = download_recordings(conf, data, xc_dump).attrs["summary"]
    assert (third["n_downloaded"], third["n_skipped_existing"]) == (1, n - 1)
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in (raw / "audio").iterdir()
               if p != deleted)

    corrupt = raw / first["path"][4]
    corrupt.write_bytes(b"not audio at all")
    (raw / ".done.download").unlink()
    fourth = download_recordings(conf, data, xc_dump).attrs["summary"]
    assert (fourth["already_done"], fourth["n_downloaded"]) == (False, 1)
    assert corrupt.read_bytes() == (xc_dump / "audio" / corrupt.name).read_bytes()

    other = download_recordings(make_conf(repo_root, max_per_species=1), data, xc_dump)
    assert not other.attrs["summary"]["already_done"] and len(other) == 3
    assert other.attrs["summary"]["n_skipped_existing"] == 3


def test_hostile_ids_and_file_names_are_rejected(xc_dump, repo_root, tmp_path, caplog):
    listing = json.loads((xc_dump / "recordings.json").read_text())["recordings"]
    good = next(r for r in listing if r["gen"] == "Coereba" and r["q"] == "A" and r["file"]
                and "nd" not in r["lic"] and parse_length(r["length"]) >= 3)
    dump = tmp_path / "dump"
    (dump / "audio").mkdir(parents=True)
    shutil.copy(xc_dump / "audio" / f"XC{good['id']}.mp3", dump / "audio")
    hostile = [dict(good, id=bad) for bad in ("../../evil", "12a", "", "1/../2", "١٢")]
    sneaky_name = dict(good, **{"file-name": "../../../outside.sh"})
    (dump / "recordings.json").write_text(json.dumps(
        {"numRecordings": "7", "page": 1, "numPages": 1,
         "recordings": hostile + [sneaky_name, good]}))
    data = tmp_path / "data"
    recordings = download_recordings(make_conf(repo_root, species=[]), data, dump)
    assert list(recordings["id"]) == [int(good["id"])]  # the duplicate id is kept once
    assert recordings["path"][0] == f"audio/XC{good['id']}.mp3"
    assert caplog.text.count("is not a number") + caplog.text.count("missing 'id'") == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "dump"]
    assert {p.relative_to(data).as_posix() for p in all_files(data)} == {
        f"raw/audio/XC{good['id']}.mp3", "raw/recordings.csv", "raw/ATTRIBUTION.md",
        "raw/ATTRIBUTION.csv", "raw/download_failures.csv", "raw/.done.download"}


# -------------------------------------------------------------------------- filters

@pytest.fixture(scope="module")
def dump_records(xc_dump):
    raw = json.loads((xc_dump / "recordings.json").read_text())["recordings"]
    return raw, parse_listing(raw)[0]


def test_default_filters_match_an_independent_count(dump_records, repo_root):
    raw, records = dump_records
    dl = read_conf(repo_root / "conf.yml")["download"]
    selected = select_recordings(records, dl)

    def seconds(text):
        m, s = text.split(":")
        return int(m) * 60 + int(s)

    by_species = defaultdict(list)
    for r in raw:  # the same rules, written out by hand on the raw JSON
        if (r["group"] == "birds" and r["q"] in ("A", "B") and "nd" not in r["lic"]
                and 3 <= seconds(r["length"]) <= 600 and r["file"] and r["gen"] != "Mystery"):
            by_species[(r["gen"], r["sp"])].append((r["q"], int(r["id"])))
    expected = sorted(i for recs in by_species.values() for _, i in sorted(recs)[:20])
    assert [rec.id for rec in selected] == expected

    assert all(r.group == "birds" and r.quality in "AB" and "nd" not in r.licence
               for r in selected)
    one_each = select_recordings(records, dict(dl, max_per_species=1))
    assert [rec.id for rec in one_each] == sorted(
        min(recs)[1] for recs in by_species.values())  # best quality, then lowest id


def test_each_filter_does_what_it_says(dump_records, repo_root):
    _, records = dump_records
    dl = read_conf(repo_root / "conf.yml")["download"]
    assert {r.quality for r in select_recordings(records, dict(dl, qualities=["A"]))} == {"A"}
    with_nd = select_recordings(records, dict(dl, exclude_licences=[], max_per_species=0))
    assert any("-nd/" in r.licence for r in with_nd)
    frogs = select_recordings(records, dict(dl, groups=["frogs"]))
    assert frogs and {r.group for r in frogs} == {"frogs"}
    assert all(10 <= r.length_s <= 30 for r in select_recordings(
        records, dict(dl, min_length_s=10.0, max_length_s=30.0)))
    picked = select_recordings(records, dict(dl, species=["coereba  FLAVEOLA",
                                                          "Todus mexicanus"]))
    assert {r.species for r in picked} == {"Coereba flaveola", "Todus mexicanus"}
    mystery = select_recordings(records, dict(dl, exclude_species=[], max_per_species=0))
    assert any(r.species == "Mystery mystery" for r in mystery)
    with pytest.raises(DownloadError, match="close matches: Coereba flaveola"):
        select_recordings(records, dict(dl, species=["Coereba flaveolla"]))
    with pytest.raises(DownloadError, match="no recording passes the filters"):
        select_recordings(records, dict(dl, min_length_s=5000.0, max_length_s=6000.0))


# ---------------------------------------------------------------------- helpers

def test_parsing_and_retry_helpers():
    assert parse_length("1:43") == 103.0 and parse_length("1:02:03") == 3723.0
    assert parse_length("0:07") == 7.0
    with pytest.raises(ValueError):
        parse_length("1:xx")
    assert parse_retry_after("7") == 7.0 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert [extension_from_file_name(n) for n in ("a.WAV", "b.flac", "c", "d.exe", "e.mp3/..")
            ] == ["wav", "flac", "mp3", "mp3", "mp3"]
    assert scrub(f"GET /api?query=x&key={KEY}&page=2") == "GET /api?query=x&key=***&page=2"
    assert scrub(f"refused {KEY}", KEY) == "refused ***"

    waits, answers = [], [RetryableError("429", retry_after_s=0.0), RetryableError("500"),
                          RetryableError("500"), "ok"]

    def flaky():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert with_retries(flaky, "x", RetryPolicy(3, 0.5), sleep=waits.append) == "ok"
    assert waits == [0.0, 1.0, 2.0]  # Retry-After honoured, then 0.5 * 2**i
    def always_500():
        raise RetryableError("HTTP 500")

    with pytest.raises(DownloadError, match="HTTP 500 .gave up after 2 attempts"):
        with_retries(always_500, "x", RetryPolicy(1, 0.0), sleep=waits.append)


# ------------------------------------------------------------------- files cut short

def test_files_cut_short_are_failed_downloads_retried_reported_and_resumed(
        xc_dump, repo_root, tmp_path):
    """A file whose transfer looks complete but which decodes shorter than the listing's
    length (its mp3 header still announcing the whole) was accepted, and stage 1 then called
    it "no vocalisation found"."""
    conf = make_conf(repo_root, max_retries=2)
    ids = selected_ids(xc_dump, conf)
    data = tmp_path / "data"
    with XenoCantoServer(xc_dump, KEY, per_page=200) as server:
        server.inject(f"XC{ids[0]}", "short")             # once: the retry gets it whole
        server.inject(f"XC{ids[1]}", *("short",) * 3)     # every try: a failed download
        first = download_recordings(conf, data, server.api_url, api_key=KEY)
        failures = pd.read_csv(data / "raw" / "download_failures.csv")
        retried = server.count(f"XC{ids[0]}")
        marked_after_first = (data / "raw" / ".done.download").exists()
        server.clear_failures()
        second = download_recordings(conf, data, server.api_url, api_key=KEY)
    assert retried == 2
    assert list(failures["id"]) == [ids[1]] and "decode" in failures["reason"][0]
    assert ids[1] not in set(first["id"]) and not marked_after_first
    assert second.attrs["summary"]["n_downloaded"] == 1 and list(second["id"]) == ids
    assert_clean_and_complete(data, xc_dump, second)


def test_a_short_file_in_a_dump_or_already_downloaded_is_not_accepted(xc_dump, repo_root,
                                                                      tmp_path, caplog):
    conf = make_conf(repo_root)
    ids = selected_ids(xc_dump, conf)
    dump = tmp_path / "dump"
    shutil.copytree(xc_dump, dump)
    cut = dump / "audio" / f"XC{ids[3]}.mp3"
    cut.chmod(0o644)
    cut.write_bytes(cut.read_bytes()[:cut.stat().st_size // 3])
    data = tmp_path / "data"
    first = download_recordings(conf, data, dump)
    assert first.attrs["summary"]["n_failed"] == 1 and ids[3] not in set(first["id"])
    assert "truncated or corrupt" in caplog.text

    # Downloaded whole, then cut short on disk (as an older stage 0 accepted it): a rerun
    # decodes it, finds it short and fetches it again.
    whole = download_recordings(conf, data, xc_dump)
    assert whole.attrs["summary"]["n_downloaded"] == 1
    on_disk = data / "raw" / "audio" / f"XC{ids[2]}.mp3"
    on_disk.write_bytes(on_disk.read_bytes()[:on_disk.stat().st_size // 3])
    (data / "raw" / ".done.download").unlink()
    again = download_recordings(conf, data, xc_dump).attrs["summary"]
    assert (again["n_downloaded"], again["n_skipped_existing"]) == (1, 5)
    assert on_disk.read_bytes() == (xc_dump / "audio" / on_disk.name).read_bytes()
    with pytest.raises(AudioError, match="truncated or corrupt: only"):
        read_audio(cut)   # stage 1 says why, not "no vocalisation found"
