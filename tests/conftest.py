"""Shared fixtures and helpers: an empty working directory per test, a small phantom world built once per test
session, process groups, torchrun, a local OpenAI-compatible endpoint."""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `import data` works from tests/

import phantom  # noqa: E402


@pytest.fixture(autouse=True)
def empty_working_dir(tmp_path_factory, monkeypatch):
    """Every test runs in an empty directory: a stage's default paths (runs/...) never meet a user's runs."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def phantom_world(tmp_path_factory) -> dict:
    """phantom.ensure_world's paths for a small world (24 train / 12 valid / 8 RAD-ChestCT volumes)."""
    return phantom.ensure_world(tmp_path_factory.mktemp("phantom"), n_train=24, n_valid=12, n_rad=8, seed=0)


def curve_points(png) -> dict:
    """{series: number of points} of a stage's curves.png (runtime.plot_curves writes it into the PNG's metadata)."""
    import json

    from PIL import Image
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 600
        return json.loads(im.info["Description"])["points"]


def group(pid: int, wait: float = 0.0) -> list[str]:
    """The pids still in process group `pid`; with `wait`, those left after up to `wait` seconds for it to empty."""
    deadline = time.monotonic() + wait
    while (left := subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True).stdout.split()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def torchrun(nproc: int, *args, timeout=900) -> subprocess.CompletedProcess:
    """`args` (a script and its arguments) under torchrun with `nproc` processes (gloo on the CPU); it must succeed."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Grad strides do not match" not in res.stderr                   # DDP copies no gradient
    return res


class ChatEndpoint:
    """A local OpenAI-compatible chat-completions server on a free port (`url`): `reply(request body)` gives (HTTP
    status, text): the completion's text for 200, the error's message otherwise. `requests` lists what it was sent."""

    def __init__(self, reply):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text = reply(body)
                answer = {"error": {"message": text}} if status != 200 else {
                    "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}]}
                raw = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass                                          # the client gave up (a timeout)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
