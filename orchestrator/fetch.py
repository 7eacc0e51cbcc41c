"""`fsearch fetch checkpoint NAME` / `fsearch fetch data NAME`: the real checkpoint and datasets the ported rounds
need, downloaded into a local cache, verified, and the spec lines that use them printed. Torch-free.

The manifest (orchestrator/fetch_manifest.json) names each artefact: its files, each with download URLs (tried in
order), size in bytes and sha256, or null where no published value is known. The cache is $FSEARCH_CACHE, else
~/.cache/fsearch: checkpoints/<file>, data/<artefact>/<file path>.

A download goes to `<file>.part`, resumes from the bytes already there (HTTP Range; a server that ignores the range
sends the whole file again), and becomes the file only after its size and sha256 are checked (atomic rename); a file
that fails the check is deleted, so the cache never holds an unverified file under its final name. Where the
manifest has no sha256, the hash computed on the first fetch is written beside the file (`<file>.sha256`) and every
later fetch verifies against it; fetch says so each time. `--from DIR` takes the files from a local folder (by file
name, or by the manifest's path under DIR) instead of the network; offline, the error says where to put which file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from orchestrator.errors import UserError
from orchestrator.fileio import fsync_dir, write_json_atomic

CACHE_ENV = "FSEARCH_CACHE"
DEFAULT_CACHE = "~/.cache/fsearch"
MANIFEST_FILE = Path(__file__).with_name("fetch_manifest.json")
KINDS = ("checkpoint", "data")
CHUNK = 1 << 20
TIMEOUT_S = 60.0
RECORDED_HASH_SUFFIX = ".sha256"


class FetchError(UserError):
    """A fetch that cannot be done or verified: one line naming the file and what to do."""


@dataclass(frozen=True)
class FileSpec:
    path: str  # relative to the artefact's folder (a checkpoint's folder is checkpoints/)
    urls: tuple[str, ...]
    size: int | None
    sha256: str | None


@dataclass(frozen=True)
class Artefact:
    kind: str  # checkpoint | data
    name: str
    description: str
    files: tuple[FileSpec, ...]
    tasks: tuple[str, ...] = ()  # data: the tasks that read it
    dataset_config: str | None = None  # data: the spec's params.dataset_config
    extra_params: dict[str, Any] | None = None  # data: other params a spec needs with it (e.g. test_split: null)


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    verified_against: str  # "manifest" | "recorded" | "none (recorded now)"
    source: str  # "cache" | a URL | a local path


def cache_root(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def load_manifest(path: str | Path | None = None) -> dict[str, dict[str, Artefact]]:
    """{kind: {name: Artefact}} from the manifest JSON."""
    path = Path(path) if path else MANIFEST_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FetchError(f"cannot read the fetch manifest {path}: {e}") from None
    out: dict[str, dict[str, Artefact]] = {k: {} for k in KINDS}
    for kind in KINDS:
        for name, a in (raw.get(kind) or {}).items():
            files = tuple(FileSpec(f["path"], tuple(f["urls"]), f.get("size"), f.get("sha256")) for f in a["files"])
            out[kind][name] = Artefact(kind, name, a.get("description", ""), files, tuple(a.get("tasks", ())),
                                       a.get("dataset_config"), a.get("extra_params"))
    return out


def find_artefact(manifest: dict[str, dict[str, Artefact]], kind: str, name: str) -> Artefact:
    """An artefact by name; for data also by the name of a task that reads it (its first listed artefact)."""
    if kind not in KINDS:
        raise FetchError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    items = manifest[kind]
    if name in items:
        return items[name]
    if kind == "data":
        for a in items.values():
            if name in a.tasks:
                return a
    raise FetchError(f"unknown {kind} {name!r}; known: {', '.join(sorted(items))}"
                     + (" (or a task name: " + ", ".join(sorted({t for a in items.values() for t in a.tasks})) + ")"
                        if kind == "data" else ""))


def artefact_dir(root: Path, a: Artefact) -> Path:
    return root / "checkpoints" if a.kind == "checkpoint" else root / "data" / a.name


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _recorded_hash(target: Path) -> str | None:
    try:
        return json.loads(Path(str(target) + RECORDED_HASH_SUFFIX).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _expected(f: FileSpec, target: Path) -> tuple[str | None, str]:
    """(the sha256 to check against, where it comes from)."""
    if f.sha256:
        return f.sha256.lower(), "manifest"
    recorded = _recorded_hash(target)
    return (recorded, "recorded") if recorded else (None, "none (recorded now)")


def _check(part: Path, f: FileSpec, target: Path, source: str) -> Fetched:
    """Verify a complete download (or copy) in `part` and move it to `target`; on failure delete it and raise."""
    size = part.stat().st_size
    if f.size is not None and size != f.size:
        part.unlink(missing_ok=True)
        raise FetchError(f"{f.path}: {size} bytes from {source}, expected {f.size}: refused (nothing kept)")
    digest = sha256_of(part)
    want, against = _expected(f, target)
    if want is not None and digest != want:
        part.unlink(missing_ok=True)
        raise FetchError(f"{f.path}: sha256 {digest} from {source} does not match the {against} sha256 {want}: "
                         f"refused (nothing kept)")
    os.replace(part, target)
    fsync_dir(target.parent)
    if want is None:
        write_json_atomic(Path(str(target) + RECORDED_HASH_SUFFIX), {"sha256": digest, "size": size, "source": source})
    return Fetched(target, digest, against, source)


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or url


def _download(url: str, part: Path, f: FileSpec, progress: Callable[[int, int | None], None] | None) -> None:
    """Append the rest of `url` to `part` (Range from its current size); restart when the server ignores the range."""
    have = part.stat().st_size if part.exists() else 0
    if f.size is not None and have > f.size:
        part.unlink()
        have = 0
    if f.size is not None and have == f.size:
        return
    req = urllib.request.Request(url, headers={"User-Agent": "fsearch-fetch"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)  # noqa: S310 - manifest URLs (http/https)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the .part is already whole
            return
        raise
    with resp:
        mode = "ab"
        if have and resp.status != 206:
            mode, have = "wb", 0
        length = resp.headers.get("Content-Length")
        total = (have + int(length)) if length and length.isdigit() else f.size
        with open(part, mode) as out:
            done = have
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                out.write(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")


def _from_dir(src_dir: Path, f: FileSpec) -> Path | None:
    for cand in (src_dir / f.path, src_dir / Path(f.path).name):
        if cand.is_file():
            return cand
    return None


def fetch_file(f: FileSpec, folder: Path, *, from_dir: Path | None = None,
               progress: Callable[[int, int | None], None] | None = None) -> Fetched:
    target = folder / f.path
    target.parent.mkdir(parents=True, exist_ok=True)
    part = Path(str(target) + ".part")
    if target.exists():
        want, against = _expected(f, target)
        digest = sha256_of(target)
        if want is None or digest == want:
            if want is None:
                write_json_atomic(Path(str(target) + RECORDED_HASH_SUFFIX),
                                  {"sha256": digest, "size": target.stat().st_size, "source": "cache"})
            return Fetched(target, digest, against, "cache")
        raise FetchError(f"{target}: sha256 {digest} does not match the {against} sha256 {want}; delete it and "
                         f"fetch again")
    if from_dir is not None:
        src = _from_dir(from_dir, f)
        if src is None:
            raise FetchError(f"--from {from_dir}: no {Path(f.path).name} there (nor {f.path})")
        shutil.copyfile(src, part)
        return _check(part, f, target, str(src))
    if not f.urls:
        raise FetchError(f"{f.path}: the manifest gives no URL; put the file at {target} or pass --from DIR")
    failures = []
    for url in f.urls:
        try:
            _download(url, part, f, progress)
        except urllib.error.HTTPError as e:
            failures.append(f"{_host(url)}: HTTP {e.code}")
            continue
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            failures.append(f"{_host(url)}: {' '.join(str(reason).split()) or type(reason).__name__}")
            continue
        return _check(part, f, target, url)
    kept = f" ({part.stat().st_size} bytes kept in {part.name}: the next fetch resumes)" if part.exists() else ""
    hosts = ", ".join(dict.fromkeys(_host(u) for u in f.urls))
    raise FetchError(f"cannot reach {hosts} ({'; '.join(failures)}): put {Path(f.path).name} at {target} or pass "
                     f"--from DIR{kept}")


def spec_lines(a: Artefact, root: Path) -> list[str]:
    """The spec lines that use a fetched artefact."""
    folder = artefact_dir(root, a)
    if a.kind == "checkpoint":
        return [f"model: {{checkpoint: {folder / a.files[0].path}}}"]
    params = {"dataset": str(folder)}
    if a.dataset_config is not None:
        params["dataset_config"] = a.dataset_config
    params.update(a.extra_params or {})
    text = ", ".join(f"{k}: {'null' if v is None else v}" for k, v in params.items())
    return [f"{t}: params: {{{text}}}" for t in a.tasks] if a.tasks else [f"params: {{{text}}}"]


def fetch(kind: str, name: str, *, cache: str | Path | None = None, from_dir: str | Path | None = None,
          manifest: str | Path | None = None, echo: Callable[[str], None] = print,
          progress: Callable[[int, int | None], None] | None = None) -> list[Fetched]:
    """Fetch every file of an artefact into the cache, verify it and print the spec lines (through `echo`)."""
    a = find_artefact(load_manifest(manifest), kind, name)
    root = cache_root(cache)
    src = Path(from_dir).expanduser() if from_dir else None
    if src is not None and not src.is_dir():
        raise FetchError(f"--from {from_dir}: not a folder")
    folder = artefact_dir(root, a)
    out = []
    for f in a.files:
        got = fetch_file(f, folder, from_dir=src, progress=progress)
        note = {"manifest": "verified against the manifest's sha256",
                "recorded": "verified against the sha256 recorded when it was first fetched",
                "none (recorded now)": "NOT verified against a published hash (none known); its sha256 is recorded "
                                       "and later fetches verify against it"}[got.verified_against]
        echo(f"{got.path}: {got.path.stat().st_size} bytes, sha256 {got.sha256}, "
             f"{'already in the cache' if got.source == 'cache' else 'from ' + got.source}; {note}")
        out.append(got)
    echo("spec lines:")
    for line in spec_lines(a, root):
        echo(f"  {line}")
    return out


def format_manifest(manifest: str | Path | None = None) -> str:
    """What can be fetched, one line per artefact."""
    m = load_manifest(manifest)
    lines = []
    for kind in KINDS:
        for name, a in m[kind].items():
            size = sum(f.size for f in a.files) if all(f.size is not None for f in a.files) else None
            known = sum(f.sha256 is not None for f in a.files)
            lines.append(f"{kind} {name}: {a.description}; {len(a.files)} file(s)"
                         + (f", {size} bytes" if size is not None else "")
                         + f", published sha256 for {known} of {len(a.files)}"
                         + (f"; tasks: {', '.join(a.tasks)}" if a.tasks else ""))
    return "\n".join(lines)
