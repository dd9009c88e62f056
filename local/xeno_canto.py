"""xeno-canto: what a record of the API v3 means, and the two places recordings come from.

`HttpSource` talks to the live API (https://xeno-canto.org/explore/api) with `requests`;
`LocalDirSource` reads a dump laid out like it (`recordings.json` + `audio/XC<id>.<ext>`).
Both only move bytes: they hand raw listing pages and audio files to local.download, which
does all parsing, filtering, selection, retrying and verification the same way for both.

The API key travels in the query string, so every URL of an API request contains it.
Nothing here prints, logs or raises a message with the key in it: errors from requests are
passed through `scrub`, raised `from None` (no chained traceback holding the URL), and
urllib3's debug log of request lines is filtered.
"""
from __future__ import annotations

import email.utils
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Protocol, TypeVar
from urllib.parse import urlparse

import requests

XC_API_URL = "https://xeno-canto.org/api/3/recordings"
KEY_ENV_VAR = "XC_API_KEY"
AUDIO_EXTENSIONS = ("mp3", "wav", "flac", "ogg")
FALLBACK_AUDIO_EXTENSION = "mp3"
USER_AGENT = "BirdSep-recipe (asteroid-style Conv-TasNet recipe; python-requests)"

# `key=<anything>` in a query string; used to scrub text that may hold a request URL.
_KEY_PARAM = re.compile(r"([?&;]key=)[^&\s'\"<>]*", re.IGNORECASE)
_RECORDING_ID = re.compile(r"[0-9]{1,12}")

log = logging.getLogger(__name__)
T = TypeVar("T")


class DownloadError(RuntimeError):
    """A problem that retrying will not fix (refused key, bad source, missing audio...)."""


class RetryableError(Exception):
    """A transient problem (429, 5xx, timeout, broken or truncated transfer)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def scrub(text: object, secret: str | None = None) -> str:
    """`text` without the API key: both the literal secret and any `key=...` parameter."""
    text = str(text)
    if secret:
        text = text.replace(secret, "***")
    return _KEY_PARAM.sub(r"\1***", text)


class _ScrubKeyFilter(logging.Filter):
    """Redacts `key=...` from log records (urllib3 logs every request line at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def _install_log_scrubber() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _ScrubKeyFilter) for f in logger.filters):
        logger.addFilter(_ScrubKeyFilter())


def missing_key_message(source: str) -> str:
    return (f"no xeno-canto API key for {source}: the API v3 needs one. Log in (or register) "
            f"at https://xeno-canto.org, copy the key shown on your account page "
            f"(https://xeno-canto.org/account) and run with {KEY_ENV_VAR}=<your key> in the "
            f"environment (it is never printed or stored). Or use a local dump instead: "
            f"--xc_source ../shared/xeno-canto")


# ---------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Recording:
    """One xeno-canto recording, as far as the recipe needs it."""
    id: int
    genus: str
    epithet: str
    english_name: str
    recordist: str
    licence: str  # https URL
    quality: str
    sound_type: str
    background_species: tuple[str, ...]
    length_s: float
    group: str
    country: str
    file_url: str
    file_name: str

    @property
    def species(self) -> str:
        return f"{self.genus} {self.epithet}"

    @property
    def page_url(self) -> str:
        return f"https://xeno-canto.org/{self.id}"


class InvalidRecord(ValueError):
    """A listing entry that lacks what the recipe needs."""


def parse_length(text: str) -> float:
    """xeno-canto durations "s", "m:ss" or "h:mm:ss" -> seconds."""
    parts = str(text).strip().split(":")
    if not 1 <= len(parts) <= 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"not a duration: {text!r}")
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds)


def normalise_url(url: str) -> str:
    """Scheme-relative ("//host/...") and http URLs -> https."""
    url = url.strip()
    if url.startswith("//"):
        return "https:" + url
    if url.startswith("http://"):
        return "https://" + url[len("http://"):]
    return url


def extension_from_file_name(file_name: str) -> str:
    """Audio extension from a source file name; anything unexpected gives mp3. The name comes
    from the API, so it only ever picks one of a fixed set and never becomes part of a path."""
    suffix = PurePosixPath(str(file_name)).suffix.lower().lstrip(".")
    return suffix if suffix in AUDIO_EXTENSIONS else FALLBACK_AUDIO_EXTENSION


def _text(raw: dict[str, Any], field: str, required: bool) -> str:
    value = raw.get(field)
    value = "" if value is None else str(value).strip()
    if required and not value:
        raise InvalidRecord(f"missing '{field}'")
    return value


def parse_recording(raw: dict[str, Any]) -> Recording:
    """Validate and convert one listing entry; raises InvalidRecord with the reason."""
    if not isinstance(raw, dict):
        raise InvalidRecord("not a JSON object")
    rec_id = _text(raw, "id", required=True)
    # The id names files on disk: digits only, so no listing can write outside audio/.
    if not _RECORDING_ID.fullmatch(rec_id):
        raise InvalidRecord(f"id {rec_id[:40]!r} is not a number")
    try:
        length_s = parse_length(_text(raw, "length", required=True))
    except ValueError as err:
        raise InvalidRecord(str(err)) from None
    file_url = _text(raw, "file", required=True)  # empty for restricted species
    if urlparse(file_url).scheme not in ("http", "https"):
        raise InvalidRecord(f"audio URL {file_url[:60]!r} is not http(s)")
    licence = normalise_url(_text(raw, "lic", required=True))
    also = raw.get("also") or []
    if not isinstance(also, list):
        also = [also]
    return Recording(
        id=int(rec_id),
        genus=_text(raw, "gen", required=True),
        epithet=_text(raw, "sp", required=True),
        english_name=_text(raw, "en", required=False),
        recordist=_text(raw, "rec", required=True),
        licence=licence,
        quality=_text(raw, "q", required=True),
        sound_type=_text(raw, "type", required=False),
        background_species=tuple(str(s).strip() for s in also if str(s).strip()),
        length_s=length_s,
        group=_text(raw, "group", required=False),
        country=_text(raw, "cnt", required=False),
        file_url=file_url,
        file_name=_text(raw, "file-name", required=False),
    )


# ------------------------------------------------------------------- retries, pacing

@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    backoff_s: float  # first wait; doubled at each further retry

    def delay_s(self, retry_index: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:  # the server said how long to wait: honour it
            return max(0.0, retry_after_s)
        return self.backoff_s * 2 ** retry_index


def with_retries(action: Callable[[], T], what: str, policy: RetryPolicy,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `action`; on RetryableError wait (Retry-After or exponential backoff) and retry,
    at most `policy.max_retries` times. DownloadError passes through at once."""
    for retry_index in range(policy.max_retries + 1):
        try:
            return action()
        except RetryableError as err:
            message = str(err) if str(err).startswith(what) else f"{what}: {err}"
            if retry_index == policy.max_retries:
                attempts = policy.max_retries + 1
                raise DownloadError(f"{message} (gave up after {attempts} "
                                    f"attempt{'s' if attempts > 1 else ''})") from None
            delay = policy.delay_s(retry_index, err.retry_after_s)
            log.warning("%s; retry %d of %d in %.2f s", message, retry_index + 1,
                        policy.max_retries, delay)
        sleep(delay)
    raise AssertionError("unreachable")


class RateLimiter:
    """At most `requests_per_second` calls of `wait()` per second (spaced evenly)."""

    def __init__(self, requests_per_second: float):
        if not requests_per_second > 0:
            raise DownloadError(f"requests_per_second must be > 0, got {requests_per_second}")
        self.interval_s = 1.0 / float(requests_per_second)
        self._next = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self._next:
            time.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval_s


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# -------------------------------------------------------------------------- sources

class RecordingSource(Protocol):
    """Where listings and audio come from. Implementations only move bytes; a transient
    problem raises RetryableError, a permanent one DownloadError."""

    #: What the data came from, for the done-marker and messages (never holds the key).
    identity: str
    #: How often local.download retries a failed page or audio file from this source.
    retry_policy: RetryPolicy

    def fetch_page(self, page: int) -> dict[str, Any]:
        """One listing page (1-based): an API v3 answer with numPages and recordings[]."""

    def audio_extension(self, rec: Recording) -> str:
        """Extension (one of AUDIO_EXTENSIONS) the audio of `rec` is stored with."""

    def fetch_audio(self, rec: Recording, dest: Path) -> int | None:
        """Write the audio of `rec` to `dest`; return its expected size in bytes if known."""


def iter_listing(source: RecordingSource) -> Iterator[dict[str, Any]]:
    """Every raw record of every page of the listing (pages fetched with retries)."""
    page, num_pages = 1, 1
    while page <= num_pages:
        answer = with_retries(lambda: source.fetch_page(page), f"listing page {page}",
                              source.retry_policy)
        records = answer.get("recordings") if isinstance(answer, dict) else None
        if not isinstance(records, list):
            raise DownloadError(f"listing page {page} from {source.identity} has no "
                                f"'recordings' list")
        try:
            num_pages = int(answer.get("numPages", 1))
        except (TypeError, ValueError):
            raise DownloadError(f"listing page {page}: bad numPages "
                                f"{str(answer.get('numPages'))[:20]!r}") from None
        log.info("listing page %d of %d: %d records", page, num_pages, len(records))
        yield from records
        page += 1


class HttpSource:
    """The live xeno-canto API v3 (or anything that answers like it)."""

    def __init__(self, base_url: str, api_key: str | None, query: str,
                 requests_per_second: float, timeout_s: float, retry_policy: RetryPolicy):
        if not api_key:
            raise DownloadError(missing_key_message(base_url))
        self.identity = source_identity(base_url)
        self.retry_policy = retry_policy
        self._base_url = base_url
        self._key = api_key
        self._query = query
        self._timeout_s = float(timeout_s)
        self._rate = RateLimiter(requests_per_second)
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        _install_log_scrubber()

    def _get(self, url: str, what: str, params: dict[str, Any] | None = None,
             stream: bool = False) -> requests.Response:
        """One GET, paced by the rate limiter; transport failures become our errors."""
        self._rate.wait()
        try:
            return self._session.get(url, params=params, stream=stream,
                                     timeout=self._timeout_s)
        except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as err:
            raise RetryableError(f"{what}: {scrub(err, self._key)}") from None
        except requests.RequestException as err:
            raise DownloadError(f"{what}: {scrub(err, self._key)}") from None

    def _status_error(self, response: requests.Response, what: str) -> Exception:
        code = response.status_code
        if code == 429:
            return RetryableError(f"{what}: HTTP 429 (rate-limited)",
                                  parse_retry_after(response.headers.get("Retry-After")))
        if code >= 500:
            return RetryableError(f"{what}: HTTP {code}")
        detail = ""
        try:
            body = response.json()
            if isinstance(body, dict):
                detail = str(body.get("message") or body.get("error") or "")
        except ValueError:
            detail = response.text if len(response.content) < 300 else ""
        detail = scrub(" ".join(detail.split())[:200], self._key)
        return DownloadError(f"{what}: HTTP {code}{': ' + detail if detail else ''}")

    def fetch_page(self, page: int) -> dict[str, Any]:
        what = f"xeno-canto API page {page}"
        params = {"query": self._query, "key": self._key, "page": page}
        with self._get(self._base_url, what, params=params) as response:
            if response.status_code in (401, 403):
                raise DownloadError(
                    f"xeno-canto refused the API key (HTTP {response.status_code}): check "
                    f"{KEY_ENV_VAR} against the key on https://xeno-canto.org/account") from None
            if response.status_code != 200:
                raise self._status_error(response, what)
            try:
                return response.json()
            except ValueError:
                # A proxy's error page or a cut answer: worth another try.
                raise RetryableError(f"{what}: answer is not JSON") from None

    def audio_extension(self, rec: Recording) -> str:
        return extension_from_file_name(rec.file_name)

    def fetch_audio(self, rec: Recording, dest: Path) -> int | None:
        # Audio URLs are public: the key is only ever sent to the API.
        what = f"XC{rec.id} audio"
        with self._get(rec.file_url, what, stream=True) as response:
            if response.status_code != 200:
                raise self._status_error(response, what)
            expected = response.headers.get("Content-Length")
            encoded = response.headers.get("Content-Encoding", "identity") != "identity"
            try:
                with open(dest, "wb") as f:
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
            except requests.RequestException as err:  # cut, reset or stalled mid-body
                raise RetryableError(f"{what}: transfer broken "
                                     f"({scrub(err, self._key)})") from None
        if expected is None or encoded or not expected.isdigit():
            return None  # no usable size to check against (decoded size differs)
        return int(expected)


class LocalDirSource:
    """A dump laid out like the API: `recordings.json` (one API answer; further pages, if
    any, in `recordings_page<N>.json`) and `audio/XC<id>.<ext>`."""

    def __init__(self, root: str | Path):
        root = Path(root)
        if not (root / "recordings.json").is_file():
            raise DownloadError(f"--xc_source {root}: neither an http(s) URL nor a directory "
                                f"holding recordings.json and audio/")
        self.identity = source_identity(root)
        # Copying a local file again gives the same bytes: no point retrying.
        self.retry_policy = RetryPolicy(max_retries=0, backoff_s=0.0)
        self._root = root

    def fetch_page(self, page: int) -> dict[str, Any]:
        path = self._root / ("recordings.json" if page == 1 else f"recordings_page{page}.json")
        if not path.is_file():
            raise DownloadError(f"{path}: missing (the listing says it has page {page})")
        try:
            with open(path) as f:
                return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DownloadError(f"{path}: not valid JSON ({err})") from None

    def _audio_path(self, rec: Recording) -> Path | None:
        for ext in AUDIO_EXTENSIONS:
            path = self._root / "audio" / f"XC{rec.id}.{ext}"
            if path.is_file():
                return path
        return None

    def audio_extension(self, rec: Recording) -> str:
        path = self._audio_path(rec)
        return path.suffix[1:] if path else extension_from_file_name(rec.file_name)

    def fetch_audio(self, rec: Recording, dest: Path) -> int | None:
        path = self._audio_path(rec)
        if path is None:
            raise DownloadError(f"XC{rec.id}: no audio/XC{rec.id}.<ext> in {self._root}")
        shutil.copyfile(path, dest)
        return path.stat().st_size


def is_api_url(xc_source: str | Path) -> bool:
    return re.match(r"https?://", str(xc_source), re.IGNORECASE) is not None


def source_identity(xc_source: str | Path) -> str:
    """What a source is, for done-markers: the URL, or the dump's absolute path."""
    return str(xc_source) if is_api_url(xc_source) else str(Path(xc_source).resolve())


def open_source(xc_source: str | Path, download_conf: dict[str, Any],
                api_key: str | None) -> RecordingSource:
    """An HttpSource for an http(s) URL (needs the key), else a LocalDirSource."""
    if is_api_url(xc_source):
        return HttpSource(
            str(xc_source), api_key, query=download_conf["query"],
            requests_per_second=download_conf["requests_per_second"],
            timeout_s=download_conf["timeout_s"],
            retry_policy=RetryPolicy(int(download_conf["max_retries"]),
                                     float(download_conf["backoff_s"])))
    return LocalDirSource(xc_source)
