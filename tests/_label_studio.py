"""Helpers of the end-to-end tests against a real Label Studio (DELSE's and LevelSet R-CNN's):
Label Studio 1.23 from its own venv (`make label-studio`) on SQLite in a tmp dir, and the backend
commands as subprocesses with basic auth on. The ``label_studio`` fixture is in conftest.py, so
one Label Studio serves both test files in a session."""
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".venv" / "label-studio"
# The backends' basic auth, as an operator sets it in both places (env of the backend, ML backend
# settings in Label Studio).
BASIC_AUTH = ("labelstudio", "e2e-basic-auth-pass")


def missing(what):
    """Skip, or fail under CI (where the e2e tests must run)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, proc, seconds, log, auth=None):
    """Poll ``url`` until it answers 200; RuntimeError with the log's tail if it does not."""
    import requests

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2, auth=auth).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not up after {seconds} s:\n{Path(log).read_text()[-3000:]}")


def stop(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def start_backend(module, args, label_studio_url, api_key, log):
    """``python -m <module> <args>`` on a free loopback port with basic auth; (url, process)."""
    import sys

    port = free_port()
    env = dict(os.environ, LABEL_STUDIO_URL=label_studio_url, LABEL_STUDIO_API_KEY=api_key, OMP_NUM_THREADS="1",
               BASIC_AUTH_USER=BASIC_AUTH[0], BASIC_AUTH_PASS=BASIC_AUTH[1])
    proc = subprocess.Popen([sys.executable, "-m", module, *args, "--port", str(port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import requests

        wait_up(url + "/health", proc, 120, log, auth=BASIC_AUTH)
        assert requests.get(url + "/health", timeout=10).status_code == 401  # auth is on
    except BaseException:
        stop(proc)
        raise
    return url, proc


def connect_backend(api, ls_url, ml_url, project, title, interactive):
    """Add the backend to a project, with its basic auth, as the ML settings page does."""
    r = api.post(ls_url + "/api/ml", json={"url": ml_url, "project": project, "is_interactive": interactive,
                                           "title": title, "auth_method": "BASIC_AUTH",
                                           "basic_auth_user": BASIC_AUTH[0], "basic_auth_pass": BASIC_AUTH[1]},
                 timeout=60)
    assert r.status_code == 201 and r.json()["readable_state"] == "Connected", r.text[:500]
    return r.json()["id"]


def start_label_studio(data: Path):
    """A fresh Label Studio on localhost; (url, personal access token, (user, password), log, process)."""
    import requests

    exe = LS_VENV / "bin" / "label-studio"
    if not exe.exists():
        missing(f"Label Studio not installed at {LS_VENV}: run `make label-studio`")
    port = free_port()
    env = dict(os.environ, LABEL_STUDIO_BASE_DATA_DIR=str(data), ML_BLOCK_LOCAL_IP="false",
               SSRF_PROTECTION_ENABLED="false",  # the ML backend's webhook is on 127.0.0.1 too
               OMP_NUM_THREADS="1", SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
    env.pop("HOST", None)
    log = data / "label_studio.log"
    user, password = "delse@example.com", "delse-e2e-password"
    proc = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--port", str(port), "--internal-host", "127.0.0.1",
         "--data-dir", str(data), "--username", user, "--password", password],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=data, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url + "/health", proc, 300, log)
        s = requests.Session()
        s.get(url + "/user/login/", timeout=30)
        r = s.post(url + "/user/login/", data={"email": user, "password": password,
                                              "csrfmiddlewaretoken": s.cookies.get("csrftoken")},
                   headers={"Referer": url + "/user/login/"}, timeout=30)
        assert r.status_code == 200, r.text[:500]
        r = s.post(url + "/api/token/", headers={"X-CSRFToken": s.cookies.get("csrftoken"), "Referer": url}, timeout=30)
        assert r.status_code == 201, r.text[:500]
    except BaseException:
        stop(proc)
        raise
    return url, r.json()["token"], (user, password), log, proc


def api_session(ls_url, pat):
    """A requests session with a Bearer access token for the personal access token."""
    import requests

    access = requests.post(ls_url + "/api/token/refresh/", json={"refresh": pat}, timeout=30).json()["access"]
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {access}"
    return api
