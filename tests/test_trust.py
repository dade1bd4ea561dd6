"""A results folder made by someone else never makes rayrcm contact the server it names: ``rayrcm
analyze`` logs back only to runs on the user's own tracking URI, so neither the tables nor the
user's MLflow credentials reach a stranger's server (a local fake server records what it receives)."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from rayrcm.cli import main
from rayrcm.orchestration.analyze import same_server
from rayrcm.result_parts import write_part


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str, str]] = []

    def _any(self):
        type(self).seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        self.send_response(404)
        self.end_headers()

    do_GET = do_POST = do_PUT = do_PATCH = _any

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def stranger():
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    server.shutdown()


def _crafted_folder(root, uri):
    folder = root / "shared-results"
    write_part(folder / "rows", [{"idx": i, "label": i % 2, "predict": i % 2, "radius": 0.3, "correct": 1, "time": 0.1,
                                  "samples": 1100} for i in range(4)])
    (folder / "protocol.json").write_text(json.dumps({"mode": "certify", "n": 1000, "alpha": 0.001, "sigma": 0.25}))
    (folder / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": "0" * 32}))
    return folder


def test_analyze_never_contacts_the_server_a_folder_names(tmp_path, stranger, monkeypatch, capsys):
    uri, seen = stranger
    folder = _crafted_folder(tmp_path, uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "me")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "my-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mine.db'}")
    with pytest.raises(SystemExit) as done:
        main(["analyze", str(folder)])
    assert done.value.code == 0
    assert seen == []  # nothing sent: neither the tables nor the credentials
    out = capsys.readouterr().out
    assert "not on your tracking URI" in out and "the analysis was not logged there" in out
    # the check can fail: naming that server as one's own does contact it (with the credentials)
    with pytest.raises(SystemExit):
        main(["analyze", str(folder), "--tracking-uri", uri])
    assert seen and any(auth for _, _, auth in seen)
    assert "could not be logged" in capsys.readouterr().err  # the fake server's 404: one line, no traceback


def test_same_server_compares_scheme_host_port_and_path():
    assert same_server("http://Host.example:80/", "http://host.example")
    assert same_server("https://h/mlflow", "https://h:443/mlflow/")
    assert not same_server("http://h:5000", "http://h:5001") and not same_server("http://h", "https://h")
    assert not same_server("http://evil.example", "sqlite:///mlflow.db")
    assert same_server("sqlite:///mlflow.db", "sqlite:///mlflow.db") and not same_server("sqlite:///a.db", "sqlite:////etc/a.db")


def test_mlflow_server_refuses_a_port_something_listens_on(tmp_path, capsys):
    """Before: the second server failed to bind, yet the start reported success because whatever
    listened there answered /health. Now: one line, exit 2, nothing started."""
    import socket

    from helpers import fails_in_one_line

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fails_in_one_line(capsys, ["mlflow-server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                   "--artifacts-destination", str(tmp_path / "a"), "--port", str(port), "--no-auth",
                                   "--detach", "--log", str(tmp_path / "server.log")], "already listens on")
    assert not (tmp_path / "server.log").exists()
