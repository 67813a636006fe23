"""Object storage through the daemon: llmuxd.service under the real test
systemd with a `checkpoint.object_store` section, its credentials given as
files with `LoadCredential=` (not environment, not the config), against the
real S3 server (moto_server, tests/s3_server.py).

What an operator sees: a CRIU checkpoint is uploaded after the switch that
made it; with the local images gone, a restart of the daemon and one request
restore the model from the downloaded image; the journal holds the transfer's
progress lines and never the secret key (the whole journal is searched, and
so is everything else that shows the daemon's state); uploading a 1 GiB image
raises the daemon's peak RSS by less than RSS_GROWTH_MIB.

tests/test_criu_s3.py is the same round trip at orchestrator level.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from test_service import BUS_NAME, ServiceBed, wait_for
from test_service_criu import answer, boot_with_criu, sim_env

pytestmark = [pytest.mark.systemd, pytest.mark.criu, pytest.mark.s3, pytest.mark.slow]

CK, OTHER, BIG = "ck", "other", "big"
PREFIX = "llmux"
#: the 1 GiB image: the simulator's weights, read into host RAM at start (so in the dump)
BIG_WEIGHTS_MIB = 1024
RSS_GROWTH_MIB = 64
#: an upload of BIG takes about 20 s at moto's rate on this machine kind; generous
UPLOAD_DEADLINE = 600.0


def credentials_dropin(svc: ServiceBed, files: dict[str, Path]) -> None:
    """LoadCredential=NAME:FILE for llmuxd.service (llmuxd reads $CREDENTIALS_DIRECTORY/NAME)."""
    lines = [f"LoadCredential={name}:{path}" for name, path in files.items()]
    (svc.unit_dir / "llmuxd.service.d" / "60-s3-credentials.conf").write_text("\n".join(["[Service]", *lines]) + "\n")
    svc.bed.run("systemctl", "daemon-reload")


@pytest.fixture(scope="module")
def s3_svc(s3_server, tmp_path_factory):
    bucket = s3_server.new_bucket()
    service = boot_with_criu(object_store={"endpoint": s3_server.endpoint, "bucket": bucket, "prefix": PREFIX})
    try:
        secrets = tmp_path_factory.mktemp("s3-credentials")
        secrets.chmod(0o700)
        files = {"s3-access-key": secrets / "access", "s3-secret-key": secrets / "secret"}
        files["s3-access-key"].write_text(s3_server.access_key)
        files["s3-secret-key"].write_text(s3_server.secret_key)
        for path in files.values():
            path.chmod(0o600)
        credentials_dropin(service, files)
        cache = tmp_path_factory.mktemp("sim-cache")
        service.write_model(CK, eviction="offload+checkpoint", env=sim_env(cache))
        service.write_model(OTHER, eviction="offload+keep_running", env=sim_env(cache))
        service.write_model(BIG, eviction="offload+checkpoint", env=sim_env(cache, BIG_WEIGHTS_MIB))
        service.enable_now()
        service.bucket = bucket
        yield service
    finally:
        service.systemctl("stop", "llmux-model-*.service")
        service.shut_down()


def daemon_log(svc: ServiceBed) -> str:
    return svc.journal("-u", "llmuxd.service")


def wait_uploaded(svc: ServiceBed, model: str, since: int = 0) -> str:
    """Until the daemon's journal (from offset `since`) says the model's image
    is in the bucket: that line; AssertionError with the reason once it says
    the upload did not happen."""
    done = re.compile(rf"model {model}: checkpoint image uploaded to .*")
    failed = re.compile(rf"model {model}: checkpoint image (not uploaded|upload failed).*")

    def outcome():
        log = daemon_log(svc)[since:]
        return done.search(log) or failed.search(log)

    found = wait_for(outcome, f"{model}'s image uploaded", deadline=UPLOAD_DEADLINE).group(0)
    assert done.match(found), found
    return found


def uploads_settled(log: str) -> bool:
    """Every upload the journal shows begun has ended (uploaded or failed)."""
    begun = len(re.findall(r"uploading checkpoint image to ", log))
    ended = len(re.findall(r"checkpoint image (uploaded to |upload failed)", log))
    return begun == ended


def objects(s3_server, svc: ServiceBed, model: str) -> dict[str, int]:
    """The bucket's objects for `model` (key -> size)."""
    return {key: entry["Size"] for key, entry in s3_server.keys(svc.bucket, PREFIX).items() if f"/{model}/" in key}


def everything_shown(svc: ServiceBed) -> dict[str, str]:
    """Every place the daemon shows its state or configuration, as text."""
    from sysd.helpers import http

    shown = {
        "the whole journal": svc.journal(),
        "GetStatus": svc.manager_call("GetStatus").stdout,
        "manager properties": svc.busctl("introspect", BUS_NAME, "/io/llmux/LLMux1").stdout,
        "/v1/models": str(http("GET", f"http://127.0.0.1:{svc.port}/v1/models", timeout=60)[1]),
        "/metrics": str(http("GET", f"http://127.0.0.1:{svc.port}/metrics", timeout=60)[1]),
        "systemctl status": svc.systemctl("status", "--no-pager", "-n", "50", "llmuxd.service").stdout,
        "systemctl show": svc.systemctl("show", "llmuxd.service").stdout,
    }
    for path in svc.busctl("tree", "--list", BUS_NAME).stdout.split():
        if path.startswith("/io/llmux/LLMux1/model/"):
            shown[f"properties of {path}"] = svc.busctl("introspect", BUS_NAME, path).stdout
    check = svc.bed.run(str(Path(svc.sim_command[0]).parent / "llmuxd"), "check-config", svc.config_file, check=False)
    shown["check-config"] = check.stdout + check.stderr
    return shown


def test_a_checkpoint_goes_to_the_bucket_and_restores_a_host_that_lost_its_images(s3_svc, s3_server):
    svc = s3_svc
    unit = f"llmux-model-{CK}.service"
    good = answer(svc, CK)
    pid = svc.unit_pid(CK)
    answer(svc, OTHER)  # the switch puts ck away: offload, a CRIU dump, then the upload
    uploaded = wait_uploaded(svc, CK)
    assert objects(s3_server, svc, CK), f"nothing of {CK} in the bucket, though the journal says: {uploaded}"
    log = daemon_log(svc)
    assert f"model {CK}: uploading checkpoint image to" in log, log[-3000:]

    # the host loses its images; the daemon restarts and finds them only in the bucket
    assert svc.systemctl("stop", "llmuxd.service").returncode == 0
    images = svc.host_path(f"{svc.state_dir}/checkpoints/{CK}")
    assert images.is_dir(), "the checkpoint was not where the config puts images"
    shutil.rmtree(images)
    assert svc.systemctl("start", "llmuxd.service").returncode == 0
    svc.wait_active()

    assert answer(svc, CK) == good  # one request: downloaded, restored, answered
    log = daemon_log(svc)
    assert f"model {CK}: downloading checkpoint image from" in log, log[-3000:]
    assert f"model {CK}: checkpoint image downloaded from" in log, log[-3000:]
    assert f"model {CK}: restored from" in log, log[-3000:]
    assert svc.prop(unit, "Type") == "forking", log[-3000:]  # `criu restore -d`, not a cold start
    assert svc.unit_pid(CK) == pid  # CRIU gives the process back its pid

    # the secret was used (moto checks every signature) and is nowhere to be seen
    for where, text in everything_shown(svc).items():
        assert text.strip(), f"{where}: nothing read, so nothing proven"
        assert s3_server.secret_key not in text, f"the secret key is in {where}"


def peak_rss_mib(svc: ServiceBed, pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in the test systemd, in MiB."""
    status = svc.bed.run("cat", f"/proc/{pid}/status").stdout
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return tuple(int(values[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def test_uploading_a_1_gib_image_leaves_the_daemon_s_memory_flat(s3_svc, s3_server):
    """The daemon streams the image from disk in parts: its peak RSS grows by
    less than RSS_GROWTH_MIB while it uploads 1 GiB (peak reset just before,
    /proc/PID/clear_refs 5)."""
    svc = s3_svc
    answer(svc, BIG)  # a cold start; whatever was awake is put away (and uploaded)
    wait_for(lambda: uploads_settled(daemon_log(svc)), "no upload in progress", deadline=UPLOAD_DEADLINE)
    daemon = int(svc.prop("llmuxd.service", "MainPID"))
    svc.bed.run("sh", "-c", f"echo 5 > /proc/{daemon}/clear_refs")  # VmHWM := VmRSS
    before, peak_reset = peak_rss_mib(svc, daemon)
    since = len(daemon_log(svc))
    answer(svc, OTHER)  # big is put away: a CRIU dump of ~1 GiB, then its upload
    wait_uploaded(svc, BIG, since=since)
    now, peak = peak_rss_mib(svc, daemon)
    sent = sum(objects(s3_server, svc, BIG).values())
    print(f"1 GiB upload: {sent / 2**20:.0f} MiB in the bucket; daemon RSS {before:.0f} MiB before, "
          f"peak {peak:.0f} MiB during (+{peak - before:.0f} MiB), {now:.0f} MiB after")
    assert int(svc.prop("llmuxd.service", "MainPID")) == daemon, "llmuxd restarted meanwhile: nothing measured"
    assert sent >= BIG_WEIGHTS_MIB * 2**20, f"only {sent} bytes of {BIG} in the bucket: not a 1 GiB upload"
    assert peak_reset - before < 1, "the peak was not reset before the upload"
    assert peak - before < RSS_GROWTH_MIB, (
        f"the daemon's peak RSS grew by {peak - before:.0f} MiB while uploading {sent / 2**20:.0f} MiB")
