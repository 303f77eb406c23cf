"""What the server tests (and benchmarks/serve_benchmark.py) share: a tiny generator checkpoint and
``serve.py`` started as a real process on a free local port."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import torch

from models import Wav2Lip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_checkpoint(path, seed=0):
    """Save a 96x96 generator at a quarter of the published width (random weights, fixed seed) as
    ``{"state_dict": ...}``; returns the path as a string."""
    torch.manual_seed(seed)
    torch.save({"state_dict": Wav2Lip(img_size=96, width=0.25).eval().state_dict()}, str(path))
    return str(path)


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=10.0):
    """GET ``url`` -> its JSON body (urllib: no test-only packages, so benchmarks can use it too)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


class Server:
    """``serve.py`` in a subprocess (lbp detector, fp32, warnings only, then ``flags``, which win
    over those); its output goes to the file ``log``. Waits up to ``start_timeout`` seconds for
    /healthz to answer, else raises AssertionError with the log."""

    def __init__(self, ckpt, avatars_dir, log, *flags, start_timeout=120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = str(log)
        cmd = [sys.executable, os.path.join(ROOT, "serve.py"), "--checkpoint_path", str(ckpt), "--port", str(self.port),
               "--avatars_dir", str(avatars_dir), "--face_detector", "lbp", "--precision", "fp32",
               "--log_level", "warning", *flags]
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve.py exited with {self.proc.returncode}:\n{self.output()}")
            try:
                get_json(self.url + "/healthz", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401: a server with --token)
                break
            except (OSError, ValueError):  # not listening yet (URLError is an OSError)
                pass
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise AssertionError("serve.py did not start:\n" + self.output())
            time.sleep(0.2)

    def health(self):
        """/healthz as a dict."""
        return get_json(self.url + "/healthz")

    def upload(self, path, **fields):
        """POST ``path`` to /v1/avatars with form ``fields``; the httpx response."""
        import httpx

        with open(path, "rb") as fh:
            return httpx.post(self.url + "/v1/avatars", files={"file": ("face.mp4", fh)}, data=fields, timeout=120)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Send ``sig`` and wait for the exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.out.close()

    def output(self):
        """What the server printed so far."""
        with open(self.log) as fh:
            return fh.read()
