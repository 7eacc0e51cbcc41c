"""`fsearch fetch` against a local HTTP server on 127.0.0.1 serving fixtures (no outside network): a good file, a
wrong hash (refused, nothing kept), a download cut off and resumed with a Range request, a server that ignores
ranges, connection refused (one-line offline message), --from DIR, and the hash recorded when none is published."""
from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator import fetch as F

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class FixtureServer:
    """Serves /good (whole file, honours Range), /cut (sends only the first `cut_at` bytes of the file, then closes,
    while announcing the whole length; honours Range), /norange (ignores Range). Records each request's Range."""

    def __init__(self):
        self.cut_at = len(PAYLOAD) // 3
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server.ranges.append(self.headers.get("Range"))
                start = 0
                rng = self.headers.get("Range")
                if rng and self.path != "/norange":
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                elif self.path in ("/good", "/cut", "/norange"):
                    self.send_response(200)
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path == "/cut" and start < server.cut_at:
                    self.wfile.write(PAYLOAD[start:server.cut_at])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def server():
    s = FixtureServer()
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def write_manifest(tmp_path: Path, urls: list[str], sha256: str | None = SHA, size: int | None = len(PAYLOAD),
                   kind: str = "checkpoint") -> Path:
    entry = {"description": "fixture", "files": [{"path": "model.pth", "urls": urls, "size": size, "sha256": sha256}]}
    if kind == "data":
        entry = {"description": "fixture", "tasks": ["mbpp"], "dataset_config": "full",
                 "files": [{"path": "full/train-0000.parquet", "urls": urls, "size": size, "sha256": sha256}]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({kind: {"fixture": entry}}))
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def run_fetch(tmp_path, manifest, kind="checkpoint", name="fixture", **kw):
    lines: list[str] = []
    got = F.fetch(kind, name, cache=tmp_path / "cache", manifest=manifest, echo=lines.append, **kw)
    return got, lines


def test_good_file_is_verified_and_spec_line_printed(tmp_path, server):
    got, lines = run_fetch(tmp_path, write_manifest(tmp_path, [server.url("/good")]))
    target = tmp_path / "cache" / "checkpoints" / "model.pth"
    assert got[0].path == target and target.read_bytes() == PAYLOAD
    assert got[0].verified_against == "manifest"
    assert not Path(str(target) + ".part").exists()
    assert f"  model: {{checkpoint: {target}}}" in lines
    # a second fetch finds it in the cache and re-verifies it, without a request
    n = len(server.ranges)
    got2, lines2 = run_fetch(tmp_path, write_manifest(tmp_path, [server.url("/good")]))
    assert got2[0].source == "cache" and len(server.ranges) == n
    assert "already in the cache" in lines2[0]


def test_wrong_hash_is_refused_and_nothing_is_kept(tmp_path, server):
    manifest = write_manifest(tmp_path, [server.url("/good")], sha256="0" * 64)
    with pytest.raises(F.FetchError, match="does not match the manifest sha256 0000") as e:
        run_fetch(tmp_path, manifest)
    assert "\n" not in str(e.value)
    folder = tmp_path / "cache" / "checkpoints"
    assert list(folder.iterdir()) == []


def test_wrong_size_is_refused(tmp_path, server):
    manifest = write_manifest(tmp_path, [server.url("/good")], size=len(PAYLOAD) + 1, sha256=None)
    with pytest.raises(F.FetchError, match="expected"):
        run_fetch(tmp_path, manifest)
    assert list((tmp_path / "cache" / "checkpoints").iterdir()) == []


def test_cut_download_keeps_part_and_resumes_with_range(tmp_path, server):
    manifest = write_manifest(tmp_path, [server.url("/cut")])
    with pytest.raises(F.FetchError, match="bytes kept in model.pth.part: the next fetch resumes"):
        run_fetch(tmp_path, manifest)
    part = tmp_path / "cache" / "checkpoints" / "model.pth.part"
    assert part.stat().st_size == server.cut_at
    assert not (tmp_path / "cache" / "checkpoints" / "model.pth").exists()
    server.cut_at = len(PAYLOAD)  # the connection holds this time
    got, _ = run_fetch(tmp_path, manifest)
    assert server.ranges[-1] == f"bytes={len(PAYLOAD) // 3}-"
    assert got[0].path.read_bytes() == PAYLOAD and not part.exists()


def test_server_ignoring_range_restarts_the_file(tmp_path, server):
    folder = tmp_path / "cache" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "model.pth.part").write_bytes(b"x" * 1000)  # junk a resume would otherwise keep
    got, _ = run_fetch(tmp_path, write_manifest(tmp_path, [server.url("/norange")]))
    assert server.ranges[-1] == "bytes=1000-"
    assert got[0].path.read_bytes() == PAYLOAD


def test_offline_is_one_line_saying_where_to_put_the_file(tmp_path):
    manifest = write_manifest(tmp_path, [f"http://127.0.0.1:{closed_port()}/good"])
    with pytest.raises(F.FetchError) as e:
        run_fetch(tmp_path, manifest)
    msg = str(e.value)
    target = tmp_path / "cache" / "checkpoints" / "model.pth"
    assert msg.startswith("cannot reach 127.0.0.1 (127.0.0.1: ") and "refused" in msg.lower()
    assert msg.endswith(f"put model.pth at {target} or pass --from DIR")
    assert "\n" not in msg


def test_second_url_is_tried_after_a_failing_one(tmp_path, server):
    manifest = write_manifest(tmp_path, [server.url("/missing"), server.url("/good")])
    got, _ = run_fetch(tmp_path, manifest)
    assert got[0].source == server.url("/good")


def test_unpublished_hash_is_recorded_and_checked_later(tmp_path, server):
    manifest = write_manifest(tmp_path, [server.url("/good")], sha256=None, size=None)
    got, lines = run_fetch(tmp_path, manifest)
    assert got[0].verified_against == "none (recorded now)"
    assert "NOT verified against a published hash" in lines[0]
    target = got[0].path
    assert json.loads(Path(str(target) + ".sha256").read_text())["sha256"] == SHA
    got2, lines2 = run_fetch(tmp_path, manifest)
    assert got2[0].verified_against == "recorded" and "recorded when it was first fetched" in lines2[0]
    target.write_bytes(PAYLOAD[:-1] + b"\0")  # the cached file changed since: refused
    with pytest.raises(F.FetchError, match="does not match the recorded sha256"):
        run_fetch(tmp_path, manifest)


def test_from_dir_copies_and_verifies(tmp_path):
    src = tmp_path / "downloads"
    src.mkdir()
    (src / "model.pth").write_bytes(PAYLOAD)
    manifest = write_manifest(tmp_path, ["http://127.0.0.1:9/unused"])
    got, lines = run_fetch(tmp_path, manifest, from_dir=src)
    assert got[0].path.read_bytes() == PAYLOAD and got[0].source == str(src / "model.pth")
    with pytest.raises(F.FetchError, match="no model.pth there"):
        run_fetch(tmp_path / "other", manifest, from_dir=tmp_path)
    (src / "model.pth").write_bytes(b"bad")
    with pytest.raises(F.FetchError, match="refused"):
        run_fetch(tmp_path / "third", manifest, from_dir=src)
    assert list((tmp_path / "third" / "cache" / "checkpoints").iterdir()) == []


def test_data_by_task_name_prints_params_line(tmp_path, server):
    manifest = write_manifest(tmp_path, [server.url("/good")], kind="data")
    got, lines = run_fetch(tmp_path, manifest, kind="data", name="mbpp")
    folder = tmp_path / "cache" / "data" / "fixture"
    assert got[0].path == folder / "full" / "train-0000.parquet"
    assert f"  mbpp: params: {{dataset: {folder}, dataset_config: full}}" in lines
    with pytest.raises(F.FetchError, match="unknown data 'nope'; known: fixture"):
        run_fetch(tmp_path, manifest, kind="data", name="nope")


def test_shipped_manifest_loads_and_names_the_ports_checkpoint():
    m = F.load_manifest()
    ck = m["checkpoint"]["rwkv7-g1d-0.1b"]
    assert ck.files[0].path == "rwkv7-g1d-0.1b-20260129-ctx8192.pth"
    assert all(u.startswith("https://") for a in [*m["checkpoint"].values(), *m["data"].values()]
               for f in a.files for u in f.urls)
    from tasks import task_names

    assert {t for a in m["data"].values() for t in a.tasks} <= set(task_names())


def test_cli_fetch_offline_exits_2_with_one_line(tmp_path):
    from orchestrator.cli import cli

    manifest = write_manifest(tmp_path, [f"http://127.0.0.1:{closed_port()}/good"])
    res = CliRunner().invoke(cli, ["fetch", "checkpoint", "fixture", "--cache", str(tmp_path / "c"),
                                   "--manifest", str(manifest)])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and res.output.startswith("error: cannot reach 127.0.0.1")
    assert "Traceback" not in res.output
