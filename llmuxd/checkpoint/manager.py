"""The checkpoint room plugged into the orchestrator.

`CheckpointManager.install(orchestrator)` registers:
- process steps for `cuda_suspend` (cuda-checkpoint toggles) and `checkpoint`
  (CRIU dump to the image catalogue; wake restores the tree as a new unit);
- lifecycle hooks the orchestrator calls (`before_sleep`, `after_sleep`,
  `after_wake`, `backend_env`): the post-wake canary, verified eviction with
  escalation, and the backend environment rules (CRIU-safe variables,
  expandable_segments stripped).

Everything here is reached through the orchestrator's model lock, so one
model never sees two of these at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from llmuxd.checkpoint import cuda as cuda_ops
from llmuxd.checkpoint.canary import CANARY_MAX_TOKENS, CANARY_PROMPT, Canary, needs_canary
from llmuxd.checkpoint.catalogue import (
    MANIFEST,
    ImageCatalogue,
    Manifest,
    checked_image_path,
    config_fields,
    config_hash,
)
from llmuxd.checkpoint.criu import CRIU_SAFE_ENV, Criu, ExternalSocket, log_errors, pid_taken_error, restore_argv
from llmuxd.checkpoint.errors import CheckpointBusy, CheckpointError, ImageRejected
from llmuxd.checkpoint.gpu_probe import (
    GpuProbe,
    Measurement,
    ProbeFactory,
    SleepVerdict,
    driver_versions,
    make_probe_factory,
    measures,
    probe_problem,
    sleep_verdict,
)
from llmuxd.gpu_ledger import SIZE_ENV
from llmuxd.errors import BackendError, LLMuxError, NotSupported
from llmuxd.eviction import STOP_EVICTION, Eviction, ProcessStrategy, WeightStrategy
from llmuxd.lifecycle import BackendState
from llmuxd.lifecycle import ModelPhase
from llmuxd.runtime.base import LaunchSpec

log = logging.getLogger("llmuxd.checkpoint")

#: what a process may keep on the GPU after a vLLM sleep (CUDA context, NCCL buffers)
EXPECTED_RESIDUE_MB = 1024
#: what a cuda-suspended process may keep (nothing, give or take rounding)
SUSPENDED_RESIDUE_MB = 64
#: seconds for a dumped unit to be seen gone
UNIT_GONE_TIMEOUT = 60.0
#: tries (a quarter second apart) for the restore unit while the dumped one is collected
UNIT_GONE_TIMEOUT_TRIES = 80
#: seconds the start-up look-up of published images may take (an unreachable store must not hold up the start)
STORE_LOOKUP_TIMEOUT = 20.0
ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"

UnsafeCallback = Callable[[str, str, str], None]


def strip_expandable_segments(model: str, env: dict[str, str]) -> dict[str, str]:
    """vLLM's sleep frees 0 GiB with expandable_segments:True (PR #11743): drop that option."""
    value = env.get(ALLOC_CONF)
    if not value or "expandable_segments" not in value:
        return env
    kept = [opt for opt in value.split(",") if not opt.strip().startswith("expandable_segments")]
    env = dict(env)
    if kept:
        env[ALLOC_CONF] = ",".join(kept)
    else:
        del env[ALLOC_CONF]
    log.warning("model %s: removed expandable_segments from %s: vLLM sleep frees no memory with it", model,
                ALLOC_CONF)
    return env


def _tp(m: Any) -> int:
    return int(getattr(m.config, "tensor_parallel_size", 1) or 1)


class CheckpointManager:
    """Catalogue, CRIU, cuda-checkpoint, GPU probe and canary for one daemon."""

    def __init__(self, config: Any, *, command_prefix: tuple[str, ...] | list[str] = (),
                 probe_factory: ProbeFactory | None = None,
                 on_unsafe: UnsafeCallback | None = None, store_settings: Any = None,
                 report: Callable[[Any], None] | None = None):
        self.config = config
        cp = getattr(config, "checkpoint", None)
        self.checkpoint_config = cp
        self.catalogue = ImageCatalogue(cp.images_dir, cp.quota_gib) if cp is not None else None
        self._store_settings, self._report = store_settings, report
        #: checkpoint.object_store: images are uploaded after each dump, downloaded when missing here
        self.store = self._make_store(cp)
        #: model -> the generation its image was last downloaded from
        self.downloaded: dict[str, str] = {}
        self.criu = Criu(cp.criu_path, command_prefix=command_prefix, libdir=cp.cuda_plugin_dir) if cp else None
        self.cuda = cuda_ops.CudaCheckpointTool(cp.cuda_checkpoint_path if cp else "cuda-checkpoint",
                                                command_prefix=command_prefix)
        self.keep_images = bool(getattr(cp, "keep_images", True))
        self.canary = Canary(on_unsafe)
        #: the configured `gpu_probe` (tests may pass their own factory instead)
        self.probe_kind = str(getattr(config, "gpu_probe", "auto"))
        self._own_probe = probe_factory is None
        self._probe_factory = probe_factory or make_probe_factory(self.probe_kind)
        #: model -> fraction of its GPU memory the last sleep freed (None: not measurable)
        self.effectiveness: dict[str, float | None] = {}
        self.last_residue_mb: dict[str, int | None] = {}
        self._before: dict[str, Measurement] = {}
        #: model -> the verdict of its last measured sleep (verified, or why not)
        self.verdicts: dict[str, SleepVerdict] = {}
        #: model -> MiB its processes held after its first measured wake (when nothing else says)
        self._awake_mb: dict[str, int] = {}
        self._suspended: dict[str, list[int]] = {}
        self._busy: set[str] = set()
        self._backend_versions: dict[str, str] = {}
        #: model -> how its last checkpointed wake went ("restored" or "cold-started instead: why")
        self.restore_outcome: dict[str, str] = {}

    def _make_store(self, cp: Any) -> Any:
        if cp is None or getattr(cp, "object_store", None) is None:
            return None
        from llmuxd.checkpoint.store import ObjectStore  # late: botocore only where configured

        return ObjectStore(cp.object_store, settings=self._store_settings, report=self._report)

    # -- wiring -------------------------------------------------------------

    def install(self, orchestrator: Any) -> "CheckpointManager":
        orchestrator.process_steps[ProcessStrategy.CUDA_SUSPEND] = CudaSuspendStep(self)
        orchestrator.process_steps[ProcessStrategy.CHECKPOINT] = CheckpointStep(self)
        hooks = getattr(orchestrator, "hooks", None)
        if hooks is None:
            raise RuntimeError("this orchestrator has no 'hooks' list; it predates the checkpoint room")
        hooks.append(self)
        return self

    async def preflight(self) -> list[str]:
        """Problems that will make configured evictions fail, one line each with the fix
        (the daemon logs them at start: a model then falls back to stop, not silently)."""
        problems = []
        if self._own_probe:
            problem = probe_problem(self.probe_kind)
            if problem:
                problems.append(problem)
        processes = {mc.eviction.process for mc in self.config.models.values()}
        if ProcessStrategy.CHECKPOINT in processes and self.criu is not None:
            reason = await self.criu.check()
            if reason:
                problems.append(f"checkpoint evictions will stop models instead: {reason}")
        if ProcessStrategy.CUDA_SUSPEND in processes and not self.cuda_available:
            problems.append(f"cuda_suspend evictions will stop models instead: '{self.cuda.path}' not found; "
                            "install cuda-checkpoint or set checkpoint.cuda_checkpoint_path")
        if self.store is not None:
            reason = await self.store.check()
            if reason:
                problems.append(f"checkpoint images will not be uploaded or downloaded: {reason}")
        return problems

    def probe_for(self, m: Any) -> GpuProbe:
        return self._probe_factory(dict(getattr(m.config, "env", {}) or {}))

    # -- hooks --------------------------------------------------------------

    def backend_env(self, model: str, model_config: Any, env: dict[str, str]) -> dict[str, str]:
        env = strip_expandable_segments(model, env) if getattr(model_config, "sleep_mode", True) else env
        if self.criu is not None:
            # any model may end up dumped (its eviction, or verified eviction escalating)
            env = {**CRIU_SAFE_ENV, **env}
        return env

    async def before_sleep(self, orchestrator: Any, m: Any, eviction: Eviction) -> Eviction:
        name = m.status.name
        eviction = self.canary.effective(name, eviction)
        if needs_canary(eviction) and name not in self.canary.baselines:
            try:
                self.canary.baselines[name] = await m.engine.probe(name, CANARY_PROMPT, CANARY_MAX_TOKENS)
            except Exception as exc:  # noqa: BLE001 - no baseline only means no check after wake
                log.warning("model %s: canary baseline not taken (%s); the wake will not be checked", name, exc)
        if eviction.process is ProcessStrategy.CHECKPOINT:
            try:  # recorded in the manifest; asked now, while the server answers everything
                self._backend_versions[name] = await m.engine.version()
            except Exception:  # noqa: BLE001
                self._backend_versions.pop(name, None)
        self._before.pop(name, None)
        if self._measurable(eviction) and m.handle is not None and await measures(self.probe_for(m)):
            self._before[name] = await self._measure(orchestrator, m)
        return eviction

    async def _measure(self, orchestrator: Any, m: Any) -> Measurement:
        """The GPU memory of all the backend's processes (its cgroup or process group)."""
        pids = await orchestrator.runtime.pids(m.handle) if m.handle is not None else []
        if not pids:
            return Measurement(0, "no process left")
        return await self.probe_for(m).measure(pids, tuple(getattr(m.config, "gpus", ()) or ()))

    async def measure_backend(self, orchestrator: Any, m: Any) -> Measurement | None:
        """What the backend's processes hold now, for the orchestrator's first-wake
        weights measurement; None where no GPU probe measures."""
        if m.handle is None or not await measures(self.probe_for(m)):
            return None
        return await self._measure(orchestrator, m)

    def expected_mb(self, m: Any) -> int | None:
        """What the model should hold awake: gpu_memory_gib, else the simulator's size
        (LLMUX_SIM_GPU_MB), else what its processes held after its first measured wake."""
        gib = getattr(m.config, "gpu_memory_gib", None)
        if gib:
            return int(float(gib) * 1024)
        size = (getattr(m.config, "env", None) or {}).get(SIZE_ENV)
        if size and str(size).isdigit() and int(size) > 0:
            return int(size)
        return self._awake_mb.get(m.status.name)

    def _judge(self, m: Any, eviction: Eviction, after: Measurement, allowed: int) -> SleepVerdict:
        """The sleep's verdict, logged in one journal line that names the method; a sleep
        not seen is reported unverified in the model's status, never verified."""
        name = m.status.name
        before = self._before.get(name) or Measurement(None, after.method)
        verdict = sleep_verdict(before, after, self.expected_mb(m), allowed)
        self.verdicts[name] = verdict
        level = " (device-level: the used memory of its GPUs, valid while llmux owns them)" if (
            after.device_level) else ""
        if verdict.verified:
            log.info("model %s: sleep (%s) verified%s: %s", name, eviction, level, verdict.detail)
            if after.device_level:
                m.status.reason = f"sleep verified device-level: {verdict.detail}"
        elif not verdict.seen:
            log.warning("model %s: sleep (%s) not verified: %s", name, eviction, verdict.detail)
            m.status.reason = f"sleep not verified: {verdict.detail}"
        elif after.device_level:
            log.warning("model %s: sleep (%s) not verified%s: %s; not escalated on a device-level figure",
                        name, eviction, level, verdict.detail)
            m.status.reason = f"sleep not verified device-level: {verdict.detail}"
        return verdict

    @staticmethod
    def _measurable(eviction: Eviction) -> bool:
        if eviction.process in (ProcessStrategy.CHECKPOINT, ProcessStrategy.STOP):
            return False  # the process is gone: so is its memory
        if eviction.process is ProcessStrategy.CUDA_SUSPEND:
            return True
        return eviction.weights is not WeightStrategy.RETAIN  # retain+freeze keeps memory by design

    async def after_sleep(self, orchestrator: Any, m: Any, eviction: Eviction) -> None:
        """Verified eviction: measure what is left; escalate while it is too much."""
        name = m.status.name
        if not self._measurable(eviction):
            self.effectiveness[name] = 1.0 if eviction.frees_process else None
            self.last_residue_mb[name] = 0 if eviction.frees_process else None
            return
        if not await measures(self.probe_for(m)):  # no GPU probe: nothing is verified, nothing claimed
            self.effectiveness[name] = self.last_residue_mb[name] = None
            return
        current = eviction
        while True:
            after = await self._measure(orchestrator, m)
            allowed = SUSPENDED_RESIDUE_MB if current.process is ProcessStrategy.CUDA_SUSPEND else EXPECTED_RESIDUE_MB
            verdict = self._judge(m, current, after, allowed)
            self.last_residue_mb[name] = after.mib
            before = verdict.before.mib
            self.effectiveness[name] = (
                max(0.0, (before - after.mib) / before) if verdict.seen and before and after.mib is not None else None)
            # escalate only on what the backend's own processes demonstrably keep
            kept = verdict.kept_mb
            if verdict.verified or kept is None or kept <= allowed:
                return
            stronger = self._stronger(orchestrator, current)
            log.warning("model %s: after sleep (%s) its processes still hold %d MiB on the GPU (at most %d "
                        "expected); escalating to %s", name, current, kept, allowed, stronger)
            if stronger.process is ProcessStrategy.STOP:
                await orchestrator._stop(m)
                self.effectiveness[name] = 1.0
                self.last_residue_mb[name] = 0
                m.status.reason = f"sleep ({eviction}) left {kept} MiB on the GPU; stopped instead"
                return
            step = orchestrator.process_steps[stronger.process]
            try:
                await step.apply(orchestrator, m)
            except Exception as exc:  # noqa: BLE001
                log.warning("model %s: %s failed (%s); stopping instead", name, stronger, exc)
                await orchestrator._stop(m)
                self.effectiveness[name] = 1.0
                return
            orchestrator._set(m, step.phase, eviction=stronger)
            if not self._measurable(stronger):
                self.effectiveness[name] = 1.0
                return
            current = stronger

    def _stronger(self, orchestrator: Any, eviction: Eviction) -> Eviction:
        """The next process strategy that frees more GPU memory and can work here.

        A frozen backend goes straight to stop: cuda-checkpoint cannot reach a
        frozen process, and thawing it to try would undo what was asked."""
        if eviction.process is ProcessStrategy.FREEZE:
            return STOP_EVICTION
        ladder = [ProcessStrategy.CUDA_SUSPEND, ProcessStrategy.CHECKPOINT]
        order = [ProcessStrategy.KEEP_RUNNING, ProcessStrategy.FREEZE, *ladder]
        start = order.index(eviction.process) + 1 if eviction.process in order else len(order)
        for process in order[start:]:
            if process is ProcessStrategy.CUDA_SUSPEND and self.cuda_available:
                return Eviction(eviction.weights, process)
            if process is ProcessStrategy.CHECKPOINT and self.criu is not None and _is_systemd(orchestrator):
                return Eviction(eviction.weights, process)
        return STOP_EVICTION

    @property
    def cuda_available(self) -> bool:
        return self.checkpoint_config is not None and cuda_ops.tool_available(self.cuda.path)

    async def after_wake(self, orchestrator: Any, m: Any, eviction: Eviction, fresh: bool) -> None:
        """The canary: compare the deterministic answer with the one before the sleep."""
        name = m.status.name
        if (name not in self._awake_mb and self.expected_mb(m) is None and m.handle is not None
                and await measures(self.probe_for(m))):
            awake = await self._measure(orchestrator, m)
            if awake.mib and not awake.device_level and awake.mib > EXPECTED_RESIDUE_MB:
                self._awake_mb[name] = awake.mib
        if fresh or not needs_canary(eviction):
            return
        baseline = self.canary.baselines.get(name)
        if baseline is None:
            return
        try:
            answer = await m.engine.probe(name, CANARY_PROMPT, CANARY_MAX_TOKENS)
        except Exception as exc:  # noqa: BLE001
            answer = f"<probe failed: {exc}>"
        if answer == baseline:
            return
        reason = f"after waking from {eviction} the deterministic answer changed ({baseline!r} -> {answer!r})"
        await orchestrator._stop(m)
        self.canary.mark_unsafe(name, eviction, reason)
        log.warning("model %s: %s; stopped it and cold-starting so no request gets a wrong answer", name, reason)
        await orchestrator._start(m)

    # -- checkpoint requests (tools, bus) ------------------------------------

    async def checkpoint_now(self, orchestrator: Any, model: str, eviction: Eviction) -> Manifest:
        """Dump a running model now (for `llmuxd checkpoint`); one at a time per model."""
        if eviction.process is not ProcessStrategy.CHECKPOINT:
            raise CheckpointError(model, "checkpoint", f"eviction {eviction} does not checkpoint; use WEIGHTS+checkpoint")
        if model in self._busy:
            raise CheckpointBusy(f"model '{model}' is being checkpointed already; wait for it to finish")
        self._busy.add(model)
        try:
            if orchestrator.state(model) is not BackendState.READY:
                raise CheckpointError(model, "checkpoint", f"model '{model}' is not running "
                                      f"({orchestrator.state(model).value}); start it first")
            await orchestrator.sleep(model, eviction)
            if orchestrator.state(model) is not BackendState.CHECKPOINTED:
                reason = orchestrator.status(model).reason or "the dump failed"
                raise CheckpointError(model, "checkpoint", reason)
            assert self.catalogue is not None
            manifest = self.catalogue.load(model)
            assert manifest is not None
            return manifest
        finally:
            self._busy.discard(model)

    def images_for(self, m: Any) -> Path:
        """The image set a restore reads: the catalogue's (every dump goes there), or
        the configured `checkpoint_path` until the model has been dumped once."""
        assert self.catalogue is not None
        path = getattr(m.config, "checkpoint_path", None)
        if path and not self.catalogue.has_image(m.status.name):
            return checked_image_path(path, m.status.name)
        return self.catalogue.images_path(m.status.name)

    def mark_lazy(self, orchestrator: Any) -> list[str]:
        """Models with `checkpoint_path` or a valid catalogue entry start checkpointed:
        their first request restores instead of cold-starting (call after adopt)."""
        marked = []
        for name in list(orchestrator.config.models):
            m = orchestrator._get(name)
            if orchestrator.state(name) is not BackendState.NOT_STARTED or self.catalogue is None:
                continue
            try:
                manifest = self.catalogue.verify(name, m.config, self.images_for(m), checksums=False)
            except CheckpointError as exc:
                if getattr(m.config, "checkpoint_path", None) or self.catalogue.has_image(name):
                    log.warning("model %s: not restoring lazily: %s", name, exc.reason)
                continue
            orchestrator._set(m, ModelPhase.CHECKPOINTED, eviction=Eviction.parse(manifest.eviction))
            if manifest.canary is not None:
                self.canary.baselines.setdefault(name, manifest.canary)
            marked.append(name)
            log.info("model %s: starts checkpointed (images in %s); its first request restores it", name,
                     self.images_for(m))
        return marked

    async def mark_lazy_from_store(self, orchestrator: Any) -> list[str]:
        """Models with no image here whose published image fits their settings start
        checkpointed: their first request downloads the image and restores it
        (call after `mark_lazy`). An unreachable store only means cold starts."""
        if self.store is None or self.catalogue is None:
            return []
        names = [name for name in orchestrator.config.models
                 if orchestrator.state(name) is BackendState.NOT_STARTED and not self._has_local_image(
                     orchestrator._get(name))]
        if not names:
            return []
        try:
            found = await asyncio.wait_for(asyncio.gather(*(self.store.published(n) for n in names),
                                                          return_exceptions=True), STORE_LOOKUP_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("the object store %s did not answer within %.0fs; models without a local image "
                        "cold-start", self.store.where, STORE_LOOKUP_TIMEOUT)
            return []
        marked = []
        for name, remote in zip(names, found):
            if isinstance(remote, BaseException):
                log.warning("model %s: not restoring lazily from the object store: %s", name, remote)
                continue
            if remote is None:
                continue
            m = orchestrator._get(name)
            if remote.config_hash != config_hash(m.config):
                log.warning("model %s: the image published in %s was made with other settings; it cold-starts, "
                            "and its next checkpoint replaces that image", name, self.store.url(name))
                continue
            try:
                eviction = Eviction.parse(remote.eviction)
            except ValueError:
                eviction = Eviction(WeightStrategy.DISCARD, ProcessStrategy.CHECKPOINT)
            orchestrator._set(m, ModelPhase.CHECKPOINTED, eviction=eviction)
            marked.append(name)
            log.info("model %s: starts checkpointed (image generation %s in %s); its first request downloads "
                     "and restores it", name, remote.generation, self.store.url(name))
        return marked

    def _has_local_image(self, m: Any) -> bool:
        assert self.catalogue is not None
        if self.catalogue.has_image(m.status.name):
            return True
        path = getattr(m.config, "checkpoint_path", None)
        return bool(path) and (checked_image_path(path, m.status.name) / MANIFEST).is_file()

    async def ensure_local_image(self, orchestrator: Any, m: Any) -> bool:
        """Download the published image when there is none here; True when it did.

        The download goes to a directory of its own and is moved into place only
        when every file matched its checksum: a failed one leaves the images
        directory as it was (and the model cold-starts)."""
        name = m.status.name
        if self.store is None or self.catalogue is None or self._has_local_image(m):
            return False
        from llmuxd.checkpoint.store import ChecksumMismatch, ObjectStoreError

        model_dir = self.catalogue.model_dir(name)
        try:
            remote, directory = await self.store.fetch(name, model_dir)
        except ChecksumMismatch as exc:
            raise ImageRejected(name, str(exc)) from None
        except ObjectStoreError as exc:
            raise CheckpointError(name, "restore", f"its image could not be downloaded: {exc}") from None
        except OSError as exc:
            raise CheckpointError(name, "restore", f"cannot write the downloaded image to {model_dir}: "
                                  f"{exc.strerror or exc}; make images_dir writable and give it free space") from None
        local = self.catalogue.read_manifest(directory)
        expected = {k: v for k, v in remote.checksums().items() if k != MANIFEST}
        if local is None or local.checksums != expected:
            shutil.rmtree(directory, ignore_errors=True)
            raise ImageRejected(name, f"the image downloaded from {self.store.url(name)} (generation "
                                      f"{remote.generation}) has a manifest.json that does not list its files; not used")
        self.catalogue.install(name, directory)
        self.downloaded[name] = remote.generation
        self._gc(orchestrator, name)
        return True

    def upload_later(self, name: str) -> Any:
        """Publish the model's committed image set in the background (None: no store)."""
        if self.store is None or self.catalogue is None:
            return None
        manifest = self.catalogue.load(name)
        if manifest is None:
            return None
        identity = {"config_hash": manifest.config_hash, "eviction": manifest.eviction, "created": manifest.created}
        return self.store.publish_later(name, self.catalogue.images_path(name), identity, dict(manifest.checksums))

    def cancel_upload(self, name: str) -> None:
        if self.store is not None:
            self.store.cancel_upload(name)

    async def wait_uploads(self) -> None:
        if self.store is not None:
            await self.store.wait_uploads()

    async def close(self) -> None:
        """Daemon shutdown: stop background uploads (the previous images stay published)."""
        if self.store is not None:
            await self.store.close()

    def _gc(self, orchestrator: Any, name: str) -> None:
        assert self.catalogue is not None
        removed = self.catalogue.gc(keep={name} | {other for other in orchestrator.config.models
                                                   if orchestrator.state(other) is BackendState.CHECKPOINTED})
        for other in removed:
            self.cancel_upload(other)

    def clean_removed(self, config: Any) -> list[str]:
        """On reload: delete the images of models no longer configured."""
        if self.catalogue is None:
            return []
        for name in set(self.catalogue.models()) - set(config.models):
            self.cancel_upload(name)
        return self.catalogue.clean_removed(config.models)

    def reload(self, config: Any) -> list[str]:
        """Take a reloaded config (after `Orchestrator.reload`); returns the models whose
        images were deleted because they are no longer configured. Verdicts, baselines
        and measurements of the remaining models are kept."""
        new_store_config = getattr(getattr(config, "checkpoint", None), "object_store", None)
        keep_store = self.store is not None and new_store_config == self.store.config
        same_probe = not self._own_probe or getattr(config, "gpu_probe", "auto") == self.probe_kind
        fresh = CheckpointManager(config, command_prefix=self.cuda.command_prefix,
                                  probe_factory=self._probe_factory if same_probe else None,
                                  on_unsafe=self.canary._on_unsafe, store_settings=self._store_settings,
                                  report=self._report)
        if not same_probe:
            self.probe_kind, self._probe_factory = fresh.probe_kind, fresh._probe_factory
        self.config, self.checkpoint_config = config, fresh.checkpoint_config
        self.catalogue, self.criu, self.cuda, self.keep_images = fresh.catalogue, fresh.criu, fresh.cuda, fresh.keep_images
        if not keep_store:  # uploads under way finish (or fail) on the old store; new ones use the new one
            self.store = fresh.store
        return self.clean_removed(config)


def embedded_checkpoint_problem(model: str, eviction: Any = None) -> str:
    """Why an embedded llmuxd (no systemd) cannot use a CRIU eviction, and what to run instead, in one line."""
    as_root = os.geteuid() == 0
    what = f"'{eviction}'" if eviction is not None else "a checkpoint eviction"
    return (
        f"model '{model}': {what} needs llmuxd under systemd: a CRIU-restored backend is no child of "
        "llmuxd, and embedded `llmuxd run` tracks backends as its children "
        f"({'even as root; ' if as_root else ''}llmux 0.7 restored a detached process it never watched again); "
        "the model is stopped instead. Run llmux as the service (`systemctl enable --now llmux.socket llmuxd`, "
        "this config as /etc/llmux/llmux.yaml) for CRIU, or choose '...+freeze' or '...+stop' here"
    )


def _is_systemd(orchestrator: Any) -> bool:
    return type(orchestrator.runtime).__name__ == "SystemdRuntime" or hasattr(orchestrator.runtime, "systemd_version")


class CudaSuspendStep:
    """cuda_suspend: toggle every CUDA process of the backend out of the GPU and back."""

    def __init__(self, manager: CheckpointManager):
        self.manager = manager
        self.phase = ModelPhase.SLEEPING

    async def apply(self, orchestrator: Any, m: Any) -> None:
        name = m.status.name
        if not self.manager.cuda_available:
            raise NotSupported(f"model '{name}': cuda_suspend needs cuda-checkpoint ('{self.manager.cuda.path}' not "
                               "found) and a 'checkpoint:' section; install it or choose another eviction")
        pids = await orchestrator.runtime.pids(m.handle)
        self.manager._suspended[name] = await cuda_ops.suspend(
            name, self.manager.cuda, pids, tensor_parallel=_tp(m), rpc=m.engine.collective_rpc)

    async def revert(self, orchestrator: Any, m: Any) -> bool:
        name = m.status.name
        pids = self.manager._suspended.pop(name, None)
        if pids is None:
            pids = await self.manager.cuda.cuda_pids(await orchestrator.runtime.pids(m.handle))
        await cuda_ops.resume(name, self.manager.cuda, pids, tensor_parallel=_tp(m), rpc=m.engine.collective_rpc)
        return False


class CheckpointStep:
    """checkpoint: CRIU dump of the unit's tree on sleep; restore as a new unit on wake."""

    def __init__(self, manager: CheckpointManager):
        self.manager = manager
        self.phase = ModelPhase.CHECKPOINTED

    def _usable(self, orchestrator: Any, name: str) -> tuple[Criu, ImageCatalogue]:
        mgr = self.manager
        if mgr.criu is None or mgr.catalogue is None:
            raise NotSupported(f"model '{name}': checkpoint needs a 'checkpoint:' section in the config")
        if not _is_systemd(orchestrator):
            raise NotSupported(embedded_checkpoint_problem(name))
        if os.geteuid() != 0:
            raise NotSupported(f"model '{name}': checkpoint needs llmuxd running as root (CRIU dumps and restores "
                               "other users' processes); run it as the service or choose '...+freeze' or '...+stop'")
        return mgr.criu, mgr.catalogue

    async def apply(self, orchestrator: Any, m: Any) -> None:
        name = m.status.name
        criu, catalogue = self._usable(orchestrator, name)
        handle = m.handle
        if handle is None or handle.exited.is_set() or not handle.main_pid:
            raise CheckpointError(name, "checkpoint", f"model '{name}' is not running; nothing to checkpoint")
        eviction = getattr(m, "evicting", None) or m.status.eviction or m.config.eviction
        pids = await orchestrator.runtime.pids(handle)
        main_pid = handle.main_pid
        if _tp(m) > 1:
            await m.engine.collective_rpc("suspend_nccl")
        self.manager.cancel_upload(name)  # that image is about to be replaced
        staging = catalogue.stage(name)
        await m.engine.close()  # llmux's own keep-alive connections must not be in the image
        externals = await criu.std_sockets(pids)
        cgroup = getattr(handle, "props", {}).get("ControlGroup")
        log_file = str(catalogue.model_dir(name) / "dump.log")
        handle.stopping = True  # the unit ends because we dump it: not an unexpected exit
        ok, why = await criu.dump(main_pid, str(staging), log_file, externals=externals,
                                  freeze_cgroup=f"/sys/fs/cgroup{cgroup}" if cgroup else None)
        if not ok:
            handle.stopping = False
            catalogue.discard_staging(name)
            raise CheckpointError(name, "checkpoint", why)
        try:
            await asyncio.wait_for(handle.exited.wait(), UNIT_GONE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("model %s: unit %s still there after the dump; stopping it", name, handle.name)
            await orchestrator.runtime.stop(handle, 5.0)
        driver, cuda = await driver_versions()
        manifest = Manifest(
            model=name, model_path=str(m.config.model_path), config_hash=config_hash(m.config),
            config=config_fields(m.config), eviction=str(Eviction(eviction.weights, ProcessStrategy.CHECKPOINT)),
            criu_version=await criu.version(), pid=main_pid,
            backend_version=self.manager._backend_versions.get(name),
            driver_version=driver, cuda_version=cuda,
            external_sockets=[[e.inode, e.fd] for e in externals],
            canary=self.manager.canary.baselines.get(name),
        )
        catalogue.commit(name, staging, manifest)
        self.manager._gc(orchestrator, name)
        m.status.main_pid = None
        # after the sleep, in the background: the model is evicted already and the
        # switch goes on; a failed upload leaves the previous published image
        self.manager.upload_later(name)

    async def revert(self, orchestrator: Any, m: Any) -> bool:
        """Restore; on any failure cold-start instead (and say so). True = cold-started."""
        name = m.status.name
        try:
            await self._restore(orchestrator, m)
            self.manager.restore_outcome[name] = "restored"
            return False
        except NotSupported:
            raise
        except LLMuxError as exc:
            log.warning("model %s: restore failed: %s; cold-starting instead", name, exc)
            reason = f"restore failed, cold-started instead: {exc}"
        self.manager.restore_outcome[name] = f"cold-started instead: {reason.split(': ', 1)[1]}"
        await orchestrator._start(m)
        return True

    @staticmethod
    async def _start_unit(orchestrator: Any, spec: Any) -> Any:
        """Start the restore unit; the dumped unit of the same name may still be
        on its way out (collected a moment after it ended), so that is retried."""
        last: BackendError | None = None
        for _ in range(UNIT_GONE_TIMEOUT_TRIES):
            try:
                return await orchestrator.runtime.start(spec)
            except BackendError as exc:
                if "already exists" not in exc.reason:
                    raise
                last = exc
            await asyncio.sleep(0.25)
        assert last is not None
        raise last

    async def _restore(self, orchestrator: Any, m: Any) -> None:
        name = m.status.name
        criu, catalogue = self._usable(orchestrator, name)
        downloaded = await self.manager.ensure_local_image(orchestrator, m)
        images = self.manager.images_for(m)
        # a download was checked file by file against the store's manifest already
        manifest = catalogue.verify(name, m.config, images, checksums=not downloaded)
        if manifest.canary is not None:
            self.manager.canary.baselines.setdefault(name, manifest.canary)
        driver, _ = await driver_versions()
        if manifest.driver_version and driver and manifest.driver_version != driver:
            raise ImageRejected(name, f"the image in {images} was made under GPU driver {manifest.driver_version}, "
                                      f"this host runs {driver}; it will be replaced by the next checkpoint")
        if manifest.pid and await criu.pid_in_use(manifest.pid):
            raise CheckpointError(name, "restore", f"PID {manifest.pid}, which the image's process had, is used by "
                                  "another process and CRIU restores original PIDs; stop that process")
        externals = [ExternalSocket(int(i), int(fd)) for i, fd in manifest.external_sockets]
        log_file = str(catalogue.model_dir(name) / "restore.log")
        Path(log_file).unlink(missing_ok=True)  # an old log would explain the wrong failure
        pid_file = catalogue.pid_file(name)
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.unlink(missing_ok=True)
        spec = LaunchSpec(
            model=name,
            argv=tuple(restore_argv(criu.path, str(images), log_file, str(pid_file), externals=externals,
                                    libdir=criu.libdir, lock=criu.network_lock)),
            stop_timeout=getattr(orchestrator, "_stop_timeout", 30.0),
            description=f"{name} (restored from {images})",
            service_type="forking",
            pid_file=str(pid_file),
        )
        try:
            handle = await self._start_unit(orchestrator, spec)
        except BackendError as exc:
            detail = log_errors(log_file)
            if pid_taken_error(detail):
                detail = f"a PID of the image is taken by another process ({detail})"
            raise CheckpointError(name, "restore", f"{exc.reason}; CRIU: {detail}") from None
        m.handle = handle
        m.status.unit = handle.name
        m.status.main_pid = handle.main_pid
        if _tp(m) > 1:
            await m.engine.collective_rpc("resume_nccl")
        if not self.manager.keep_images and images == catalogue.images_path(name):
            self.manager.cancel_upload(name)
            catalogue.remove(name)
        log.info("model %s: restored from %s as %s (pid %s)", name, images, handle.name, handle.main_pid)
