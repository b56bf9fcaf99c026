"""The daemon's life cycle: build the parts from the configuration, serve, reload, stop.

Start-up order matters to systemd: READY=1 is sent only once the varlink socket
listens and the bus name is owned, so a client started after snpd can always
connect. SIGTERM drains in-flight requests; SIGHUP re-reads the configuration
(access groups, policies, log level apply at once; device, queue and transport
settings need a restart, which the journal says).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import signal
import threading
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence

from snpd.access import Access, Caller
from snpd.broker import Broker, BrokerState
from snpd.config import Config, load_config
from snpd.dbus.gate import Limits
from snpd.device.base import Device
from snpd.device.select import open_device
from snpd.device.unavailable import UnavailableDevice
from snpd.errors import DeviceUnavailable, SnpdError
from snpd.events import Events, Repeats, choose_sink
from snpd.files import atomic_write
from snpd.kds.budget import BudgetLimits, KdsBudget
from snpd.kds.cache import CertificateCache
from snpd.kds.negative import NegativeCache
from snpd.kds.thim import ThimSource
from snpd.notify import Notifier
from snpd.ratelimit import Rate
from snpd.secrets import Secrets
from snpd.service import ReportOptions, Service
from snpd.status.kernel_log import parse_kernel_log
from snpd.status.probe import (
    SevStatus,
    emulated,
    probe,
    read_kernel_log_from,
    read_sev_status_msr,
    status_properties,
)
from snpd.status.summary import (
    by_interface,
    changed_message,
    changes,
    journal_fields,
    startup_message,
    status_document,
)
from snpd.status.summary import status_line as summary_status_line
from snpd.trust.roots import AMD_ROOTS, TrustRoots
from snpd.trust.verify import Verifier
from snpd.varlink.server import VarlinkServer, activation_sockets, listen_fds

PROBE_FILE = Path("/run/snpd/probe.json")
STARTUP_CALLER = Caller(uid=0, transport="startup", peer="snpd")
# The longest Retry-After a KDS thread sleeps through; a longer one fails the fetch
# at once, is remembered, and pauses that KDS URL (snpd/kds/client.py).
KDS_MAX_RETRY_WAIT = 2.0
# The longest a VCEK lookup waits for THIM before it asks the KDS.
THIM_DEADLINE = 10.0


class LazyKdsClient:
    """A KdsClient made on the first fetch: most daemons never fetch (the host's table
    or the cache answers), and requests with TLS costs megabytes of memory."""

    def __init__(self, url: str, mirrors: Sequence[str], deadline: float) -> None:
        self._args = (url, tuple(mirrors), deadline)
        self._client: Any = None
        self._lock = threading.Lock()  # KDS threads share one client and its pauses

    def _get(self) -> Any:
        with self._lock:
            if self._client is None:
                # lazy: requests only once the daemon fetches; offline or warm, it never does
                from snpd.kds.client import KdsClient

                url, mirrors, deadline = self._args
                self._client = KdsClient(url, mirrors, deadline=deadline,
                                         max_retry_wait=KDS_MAX_RETRY_WAIT)
            return self._client

    def fetch_cert_chain(self, *args: Any) -> bytes:
        result: bytes = self._get().fetch_cert_chain(*args)
        return result

    def fetch_vcek(self, *args: Any) -> bytes:
        result: bytes = self._get().fetch_vcek(*args)
        return result

    def fetch_crl(self, *args: Any) -> bytes:
        result: bytes = self._get().fetch_crl(*args)
        return result

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def group_id(name: str) -> Optional[int]:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def resolve_groups(names: Sequence[str], events: Events) -> FrozenSet[int]:
    gids = set()
    for name in names:
        gid = group_id(name)
        if gid is None:
            events.log("warning", f"access group {name!r} does not exist; ignored")
        else:
            gids.add(gid)
    return frozenset(gids)


def dbus_limits(cfg: Config) -> Limits:
    """The D-Bus gate's bounds from ``[queue]`` and ``[dbus]``: a connection may have
    ``per_client`` calls in flight, a user ``per_uid``, all users together four times
    ``max_pending`` (calls that verify or serve certificates never reach the firmware
    queue), root ``max_pending`` plus its reserve, counted apart from everyone else;
    as many again may wait for the bus to say who their caller is (a burst of new
    connections), each for one round trip."""
    q = cfg.queue
    rate = cfg.dbus.cheap_calls_per_s
    return Limits(per_connection=q.per_client, per_uid=q.per_uid, total=4 * q.max_pending,
                  root=q.max_pending + q.root_reserve, unidentified=4 * q.max_pending,
                  cheap_rate=float(rate),
                  cheap_burst=2 * rate)


def kds_budget(cfg: Config) -> KdsBudget:
    """Each non-root uid's share of KDS work, from ``[kds]``."""
    kds = cfg.kds
    return KdsBudget(BudgetLimits(calls=kds.per_uid_calls, fetches=Rate(
        kds.per_uid_fetch_burst, kds.per_uid_fetch_interval_s)))


def load_probe(path: Path) -> Optional[SevStatus]:
    """The facts snpd-probe (the unit's privileged ExecStartPre) wrote, if any; sysfs,
    device nodes and /proc/cpuinfo are read again here (anyone may read them)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    lines = data.get("kernel_lines") if isinstance(data, dict) else None
    if not isinstance(lines, list):
        return None
    why = data.get("kernel_log_error")
    source = data.get("kernel_log_source")
    msr = data.get("sev_status_msr")
    return probe(Path(data.get("root", "/")), kernel_lines=[str(x) for x in lines][:20000],
                 kernel_log=None if why else f"snpd-probe ({source or 'kernel log'})",
                 unavailable=[f"{why} (snpd-probe)"] if isinstance(why, str) and why else (),
                 sev_status_msr=msr if isinstance(msr, int) and not isinstance(msr, bool)
                 else None)


class Daemon:
    def __init__(self, config: Config, *, config_path: Optional[Path], events: Events,
                 notifier: Optional[Notifier] = None, probe_file: Path = PROBE_FILE,
                 root: Path = Path("/")) -> None:
        self.config = config
        self.config_path = config_path
        self.events = events
        self.notifier = notifier or Notifier()
        self.probe_file = probe_file
        self.root = root
        self.service: Optional[Service] = None
        self.broker: Optional[Broker] = None
        self._transports: List[Any] = []
        # Events are made in run(): on Python 3.9 an Event binds to the loop current
        # at construction, and asyncio.run() makes a new one.
        self._stop: Optional[asyncio.Event] = None
        self._reload: Optional[asyncio.Event] = None
        self._tasks: List[asyncio.Task[None]] = []
        self.status: Optional[SevStatus] = None
        self._logged_status: Optional[Dict[str, Any]] = None  # the last status logged
        self.exit_status = 0  # what run() returns once stopped

    # -- assembly ------------------------------------------------------------------------

    def _device(self) -> Device:
        cfg = self.config
        try:
            return open_device(cfg.device.backend, path=str(cfg.device.path),
                               configfs_root=str(cfg.device.configfs_root),
                               emulator_dir=cfg.emulator.state_dir,
                               emulator_config=cfg.emulator.emulator_config(),
                               tpm=cfg.device.tpm, hyperv_snp=(
                                   self.status.kernel.hyperv_snp if self.status else None))
        except DeviceUnavailable as exc:
            self.events.log("err", f"no firmware channel: {exc}")
            return UnavailableDevice(exc)

    def _roots(self, device: Device) -> TrustRoots:
        # The emulator's root is trusted only with its backend.
        extra = device.platform().extra_roots
        return AMD_ROOTS.with_explicit(*extra) if extra else AMD_ROOTS

    def _cache(self, roots: TrustRoots) -> Any:
        kds = self.config.kds
        client = None if kds.offline else LazyKdsClient(kds.url, kds.mirrors, kds.timeout_s)
        # THIM is local (IMDS): a short deadline, so that the KDS keeps most of the time.
        thim = None if kds.offline or not kds.thim else ThimSource(
            kds.thim, deadline=min(THIM_DEADLINE, kds.timeout_s),
            max_retry_wait=KDS_MAX_RETRY_WAIT)
        try:
            return CertificateCache(kds.cache_dir, client, offline_dirs=kds.offline_dirs,
                                    offline=kds.offline, roots=roots,
                                    observer=self.events.kds_fetch,
                                    negative=NegativeCache(kds.negative_ttl_s,
                                                           kds.negative_entries),
                                    thim=thim)
        except OSError as exc:
            self.events.log("warning", f"KDS cache {kds.cache_dir} unusable ({exc}); "
                            "certificates will not be cached")
            for made in (client, thim):
                if made is not None:
                    made.close()
            return None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._repeat_limit()
        self.status = load_probe(self.probe_file) or probe(self.root)
        device = self._device()
        platform = device.platform()
        product_hint, hint_source = None, ""
        if platform.emulated and platform.guest_vmpl is not None:
            # The emulated guest, not this machine: its VMPL, its driver's VMPCK, and the
            # product it is configured as (known without spending a report).
            self.status = emulated(platform.guest_vmpl, list(platform.driver_log),
                                   device_node=platform.device_node)
            guest_vmpl = platform.guest_vmpl
            product_hint, hint_source = platform.product, "emulator"
        else:
            guest_vmpl = self.status.vmpl or 0
            if device.name != "none" and self.status.cpu is not None:
                # CPUID family/model name the product on hardware (docs/reference/abi.md §4.8);
                # the first report confirms or corrects it.
                product_hint = self.status.cpu.product
                hint_source = "cpuid" if product_hint is not None else ""

        def state_changed(state: BrokerState) -> None:  # called on the device thread
            loop.call_soon_threadsafe(self._state_changed, state)

        self.broker = Broker(device, max_pending=cfg.queue.max_pending,
                             per_client=cfg.queue.per_client,
                             per_user=cfg.queue.per_uid, reserve=cfg.queue.root_reserve,
                             min_interval=cfg.device.min_interval_ms / 1000,
                             request_timeout=cfg.device.request_timeout_s,
                             busy_retries=cfg.device.busy_retries,
                             vmpck_id=self.status.kernel.driver_vmpck,
                             on_state_change=state_changed)
        self.broker.start()
        roots = self._roots(device)
        self.service = Service(
            broker=self.broker,
            access=Access(resolve_groups(cfg.access.report_groups, self.events),
                          resolve_groups(cfg.access.key_groups, self.events)),
            events=self.events, cache=self._cache(roots), verifier=Verifier(roots),
            policies=cfg.policies, guest_vmpl=guest_vmpl, backend=device.name,
            report_data=platform.report_data,
            sev_status=status_properties(self.status), product_hint=product_hint,
            product_hint_source=hint_source,
            request_timeout=cfg.device.request_timeout_s,
            kds_budget=kds_budget(cfg), kds_workers=cfg.kds.workers)
        self.service.secrets = Secrets(cfg.kbs, tee=self.service.kbs_tee,
                                       evidence=self.service.kbs_evidence, events=self.events,
                                       gid_lookup=group_id)
        await self._start_transports()
        self.notifier.ready(self.status_line())
        self._log_status()
        self.service.subscribe(self._properties_changed)
        self._tasks.append(loop.create_task(self._learn_platform()))
        self._tasks.append(loop.create_task(self._flush_events()))
        if self.notifier.watchdog_usec:
            self._tasks.append(loop.create_task(self._watchdog()))

    async def _start_transports(self) -> None:
        assert self.service is not None
        cfg = self.config
        errors = []
        if cfg.varlink.enabled:
            v = cfg.varlink
            server = VarlinkServer(
                self.service, max_message=v.max_message_bytes,
                max_connections=v.max_connections,
                max_connections_per_uid=v.max_connections_per_uid,
                root_reserved_connections=v.root_reserved_connections,
                max_buffer_bytes=v.max_buffer_bytes,
                max_buffer_bytes_per_uid=v.max_buffer_bytes_per_uid,
                root_reserved_buffer_bytes=v.root_reserved_buffer_bytes,
                idle_timeout=v.idle_timeout_s, message_timeout=v.message_timeout_s)
            try:
                activated = activation_sockets(listen_fds())
                for sock in activated:  # socket activation: snpd.socket made it already
                    await server.adopt(sock)
                if not activated:
                    cfg.varlink.socket.parent.mkdir(parents=True, exist_ok=True)
                    await server.bind(str(cfg.varlink.socket))
                self._transports.append(server)
            except (OSError, SnpdError, RuntimeError) as exc:
                errors.append(f"varlink on {cfg.varlink.socket}: {exc}")
                await server.close()
        if cfg.dbus.enabled:
            try:
                # lazy: dbus-fast only with [dbus] enabled, and it may be absent
                from snpd.dbus import service as dbus_service

                address = None if cfg.dbus.bus == "system" else cfg.dbus.bus
                handle = await dbus_service.serve(
                    self.service, address, limits=dbus_limits(cfg),
                    max_message=cfg.dbus.max_message_bytes)
                self._transports.append(handle)
                self._tasks.append(asyncio.get_running_loop().create_task(
                    self._watch_bus(handle)))
            except (OSError, SnpdError, ImportError) as exc:
                errors.append(f"D-Bus: {exc}")
        for error in errors:
            self.events.log("err", f"cannot serve {error}")
        if not self._transports:
            raise SnpdError("no transport could be started: " + "; ".join(errors))

    def _status_document(self) -> Dict[str, Any]:
        assert self.service is not None
        return status_document(by_interface(vars(self.service.properties())))

    def _log_status(self) -> None:
        """The SEV status in the journal: the start-up record first, then one record
        each time a fact in it changes (product, reported TCB, state, VMPCK)."""
        doc = self._status_document()
        before = self._logged_status
        fields = journal_fields(doc)
        if before is None:
            self.events.startup_status(startup_message(doc), **fields)
        else:
            changed = changes(before, doc)
            if not changed:
                return
            self.events.sev_status_changed(changed_message(doc, changed),
                                           ready=doc.get("state") == "ready",
                                           changed=", ".join(changed), **fields)
        self._logged_status = doc

    def _properties_changed(self, changed: Mapping[str, object]) -> None:
        """Service listener (on the loop): the product, TCB or state changed. It runs
        inside the request that learned it, so a failure here is logged, never
        passed on to that caller."""
        if not {"product", "reported_tcb", "state"} & set(changed):
            return
        try:
            if "product" in changed and self.service is not None:
                # product_source (in SevStatus) moved to "report" with it.
                self.service.notify({"sev_status": self.service.properties().sev_status})
            self._log_status()
            self.notifier.status(self.status_line())
        except Exception as exc:  # a status display must not fail a request
            self.events.log("err", f"cannot record the SEV status change: "
                                   f"{type(exc).__name__}: {exc}")

    async def _learn_platform(self) -> None:
        """One report at start-up names the product (v3+) and the reported TCB for
        status displays; the journal records the change (see _properties_changed)."""
        assert self.service is not None
        with contextlib.suppress(SnpdError):
            await self.service.get_report(STARTUP_CALLER, b"", None, ReportOptions())
        self.notifier.status(self.status_line())

    async def _watch_bus(self, handle: Any) -> None:
        """A daemon whose bus connection ended (the bus restarted, or dropped us) would
        go on serving varlink while org.snpd.Snpd1 has no owner, and nothing would ever
        bring the name back: stop instead, with a failure status, so that systemd
        restarts snpd (Restart=on-failure). Shutdown cancels this task first."""
        await handle.wait_closed()
        self.events.log("err", "the D-Bus connection ended; stopping so that snpd is "
                               "restarted and owns org.snpd.Snpd1 again")
        self.exit_status = 1
        self.request_stop()

    def _repeat_limit(self) -> None:
        """[log] repeat_*: at start and on reload (what was held back is reported first)."""
        log = self.config.log
        rate = Rate(log.repeat_burst, log.repeat_interval_s)
        if self.events.repeats is None or self.events.repeats.rate != rate:
            self.events.flush()
            self.events.repeats = Repeats(rate)

    async def _flush_events(self) -> None:
        """Report the records held back as repeats, once per repeat interval."""
        while True:
            await asyncio.sleep(self.config.log.repeat_interval_s)
            self.events.flush()

    async def _watchdog(self) -> None:
        interval = self.notifier.watchdog_usec / 2e6
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _state_changed(self, state: BrokerState) -> None:
        if state.state == "degraded":
            self.events.vmpck_disabled(state.reason)
        else:
            self.events.log("crit", f"firmware channel {state.state}: {state.reason}")
        if self.service is not None:
            self.service.notify({"state": state.state, "state_reason": state.reason})
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        """What ``systemctl status snpd`` shows: state, product, VMPL, reported TCB,
        backend, counts (snpd.status.summary.status_line)."""
        if self.service is None or self.broker is None:
            return "starting"
        return summary_status_line(self._status_document())

    # -- running -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def request_reload(self) -> None:
        if self._reload is not None:
            self._reload.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = stop_event = asyncio.Event()
        self._reload = reload_event = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            await self.start()
            while not stop_event.is_set():
                stop = asyncio.ensure_future(stop_event.wait())
                reload = asyncio.ensure_future(reload_event.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                for waiter in (stop, reload):
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
                if reload_event.is_set() and not stop_event.is_set():
                    reload_event.clear()
                    self.reload()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        return self.exit_status

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except SnpdError as exc:
            self.events.log("err", f"reload refused, keeping the running configuration: {exc}")
            self.notifier.ready(self.status_line())
            return
        old, self.config = self.config, new
        if self.service is not None:
            self.service.access = Access(resolve_groups(new.access.report_groups, self.events),
                                         resolve_groups(new.access.key_groups, self.events))
            self.service.policies = dict(new.policies)
            if self.service.secrets is not None:
                self.service.secrets.configure(new.kbs)
        self.events.max_priority = new.log.max_priority
        self._repeat_limit()
        restart = [name for name in ("device", "queue", "kds", "dbus", "varlink", "emulator")
                   if getattr(old, name).to_dict() != getattr(new, name).to_dict()]
        note = f"; restart snpd to apply [{'], ['.join(restart)}]" if restart else ""
        self.events.log("notice", "configuration reloaded (access, policies, KBSes, log level)"
                                  f"{note}")
        self.notifier.ready(self.status_line())

    async def shutdown(self) -> None:
        self.notifier.stopping(f"stopping: draining {self.broker.pending() if self.broker else 0}"
                               " requests")
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for transport in self._transports:
            with contextlib.suppress(Exception):
                await transport.close()
        self._transports.clear()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.broker.close(drain=True),
                                       self.config.device.request_timeout_s + 5)
            self.broker = None
        if self.service is not None:
            self.service.close()
        if self.service is not None and self.service.cache is not None:
            for name in ("client", "thim"):
                made = getattr(self.service.cache, name, None)
                if made is not None:
                    made.close()
        self.events.flush()
        self.notifier.close()


def run_daemon(config_path: Optional[Path], *, log_target: str = "auto") -> int:
    """Load the configuration, run until SIGTERM. Exit codes: 0 clean stop, 2 bad
    configuration, 1 the daemon could not start (the journal says why)."""
    events = Events(choose_sink(log_target))
    try:
        config = load_config(config_path)
    except SnpdError as exc:
        events.log("err", str(exc))
        return exc.exit_code
    events.max_priority = config.log.max_priority
    daemon = Daemon(config, config_path=config_path, events=events)
    try:
        return asyncio.run(daemon.run())
    except SnpdError as exc:
        events.log("err", f"snpd could not start: {exc}")
        return 1


def write_probe(path: Path = PROBE_FILE, root: Path = Path("/")) -> Dict[str, object]:
    """What snpd-probe records for the unprivileged daemon: the kernel's SEV lines and
    the sysfs facts (the daemon cannot read the kernel log itself).

    Root writes this into /run/snpd, a directory user snpd owns and can plant links
    in. That is safe because root only ever creates a fresh file of its own there
    and renames it over ``path`` (files.atomic_write). The temporary file has a
    random name and is created with O_EXCL|O_NOFOLLOW, its mode is set with fchmod,
    and rename(2) replaces a planted link instead of following it. A symlinked
    directory is refused. The file stays where the daemon looks for it, and a
    root-only directory would buy nothing more: the file is the daemon's own input,
    which a compromised daemon controls anyway. Only ``path``'s directory is created
    if missing, never a chain of parents.
    """
    lines, source, why = read_kernel_log_from(root)
    keep = [line for line in lines if any(
        word in line for word in ("SEV", "sev-guest", "VMPCK", "vmpck", "Memory Encryption",
                                  "ASP", "Hyper-V: Isolation"))]
    # The MSR only when the msr driver is already there: the probe loads no modules.
    msr, _msr_error = read_sev_status_msr(root)
    facts = parse_kernel_log(keep).to_json()
    doc: Dict[str, object] = {"root": str(root), "kernel_lines": keep[:2000],
                              "kernel_log_source": source, "kernel_log_error": why,
                              "kernel_log_lines": len(lines), "sev_status_msr": msr,
                              "facts": facts}
    # exact_mode: the unit's UMask=0077 would leave the file unreadable to user snpd.
    atomic_write(path, json.dumps(doc, indent=1).encode(), mode=0o644, exact_mode=True,
                 within=path.parent.parent)
    return doc
