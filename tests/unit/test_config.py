"""snpd.toml: defaults, the shipped commented file, every class of error, the CLI check."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snpd import config as config_module
from snpd.abi.product import Product
from snpd.cli import daemon
from snpd.config import (
    DEFAULT_CONFIG_PATH,
    MAX_CONFIG_SIZE,
    AccessSection,
    Config,
    DbusSection,
    DeviceSection,
    EmulatorSection,
    KbsEndpoint,
    KdsSection,
    LogSection,
    QueueSection,
    VarlinkSection,
    load_config,
    parse_config,
)
from snpd.emulator.launch import EmulatorConfig
from snpd.errors import ConfigError
from snpd.trust.appraisal import AppraisalPolicy, TcbMinimum

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "conf" / "snpd.toml"

# Every key and its default, written out by hand: a change of default must be a
# deliberate edit here, in conf/snpd.toml and in the code, not an accident.
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "device": {
        "backend": "auto",
        "path": Path("/dev/sev-guest"),
        "configfs_root": Path("/sys/kernel/config/tsm/report"),
        "tpm": "/dev/tpmrm0",
        "min_interval_ms": 0,
        "request_timeout_s": 30.0,
        "busy_retries": 3,
    },
    "queue": {"max_pending": 64, "per_client": 8, "per_uid": 16, "root_reserve": 8},
    "kds": {
        "url": "https://kdsintf.amd.com",
        "mirrors": (),
        "thim": "",
        "timeout_s": 60.0,
        "cache_dir": Path("/var/cache/snpd"),
        "offline": False,
        "offline_dirs": (),
        "workers": 4,
        "per_uid_calls": 2,
        "per_uid_fetch_burst": 10,
        "per_uid_fetch_interval_s": 60.0,
        "negative_ttl_s": 600.0,
        "negative_entries": 4096,
    },
    "access": {"report_groups": ("snpd-users",), "key_groups": ("snpd-keys",)},
    "dbus": {"enabled": True, "bus": "system", "max_message_bytes": 65536,
             "cheap_calls_per_s": 50},
    "varlink": {
        "enabled": True,
        "socket": Path("/run/snpd/snpd.varlink"),
        "max_message_bytes": 1 << 20,
        "max_connections": 256,
        "max_connections_per_uid": 32,
        "root_reserved_connections": 16,
        "max_buffer_bytes": 32 << 20,
        "max_buffer_bytes_per_uid": 4 << 20,
        "root_reserved_buffer_bytes": 4 << 20,
        "idle_timeout_s": 60.0,
        "message_timeout_s": 10.0,
    },
    "emulator": {"state_dir": Path("/var/lib/snpd/emulator"), "product": Product.GENOA},
    "log": {"level": "info", "repeat_burst": 10, "repeat_interval_s": 10.0},
}

FULL = """
[device]
backend = "emulator"
path = "/dev/sev-guest-test"
configfs_root = "/tmp/tsm/report"
min_interval_ms = 2000
request_timeout_s = 12.5
busy_retries = 0

[queue]
max_pending = 100
per_client = 100

[kds]
url = "http://127.0.0.1:8080/kds"
mirrors = ["https://kds-proxy.example:8443", "https://kds-mirror.example"]
timeout_s = 5
cache_dir = "/srv/snpd/cache"
offline = true
offline_dirs = ["/usr/share/snpd/certs", "/srv/certs"]

[access]
report_groups = ["attest", "_svc", "app.users"]
key_groups = []

[dbus]
enabled = false
bus = "unix:path=/run/test/bus"

[varlink]
enabled = true
socket = "/run/test/snpd.varlink"
max_message_bytes = 65536

[emulator]
state_dir = "/srv/emulator"
product = "Turin"
latency = 0.25
kernel = "6.2"
reported_tcb = { fmc = 1, bootloader = 1, tee = 0, snp = 2, microcode = 71 }

[log]
level = "debug"

[policy.production]
minimum_abi = "0.0"
minimum_version = "1.55"
allow_debug = false
vmpl = [0, 1]
measurement = "MEASUREMENT"
report_data = "00ff"
minimum_tcb.reported = { bootloader = 4, tee = 0, snp = 22, microcode = 213 }
minimum_tcb.committed = { fmc = 1 }
minimum_current_mit_vector = "0x8000000000000001"
trusted_id_key_digests = ["DIGEST"]

[policy.lab]
allow_debug = true
""".replace("MEASUREMENT", "ab" * 48).replace("DIGEST", "cd" * 48)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


# -- defaults --------------------------------------------------------------------


def test_defaults_cover_every_key() -> None:
    assert {name: cls.key_names() for name, cls in Config.sections().items()} == {
        name: tuple(keys) for name, keys in DEFAULTS.items()}
    cfg = Config()
    for section, keys in DEFAULTS.items():
        for key, value in keys.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert cfg.policies == {}
    assert cfg.emulator.options == {}


def test_empty_text_and_empty_tables_are_the_defaults() -> None:
    assert parse_config("") == Config()
    assert parse_config("# nothing\n\n") == Config()
    assert parse_config("".join(f"[{s}]\n" for s in DEFAULTS)) == Config()
    assert parse_config("[policy]\n") == Config()


def test_no_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(None, default_path=tmp_path / "absent.toml") == Config()
    assert Path("/etc/snpd/snpd.toml") == DEFAULT_CONFIG_PATH


def test_default_path_is_read_when_present(tmp_path: Path) -> None:
    path = tmp_path / "snpd.toml"
    path.write_text("[log]\nlevel = \"error\"\n", encoding="utf-8")
    assert load_config(None, default_path=path).log.level == "error"


# -- the full example ------------------------------------------------------------


def test_full_example() -> None:
    cfg = parse_config(FULL)
    assert cfg.device == DeviceSection(
        backend="emulator", path=Path("/dev/sev-guest-test"),
        configfs_root=Path("/tmp/tsm/report"), min_interval_ms=2000,
        request_timeout_s=12.5, busy_retries=0)
    assert cfg.queue == QueueSection(max_pending=100, per_client=100)
    assert cfg.kds.url == "http://127.0.0.1:8080/kds"
    assert cfg.kds.mirrors == ("https://kds-proxy.example:8443", "https://kds-mirror.example")
    assert cfg.kds.timeout_s == 5.0 and isinstance(cfg.kds.timeout_s, float)
    assert cfg.kds.cache_dir == Path("/srv/snpd/cache")
    assert cfg.kds.offline is True
    assert cfg.kds.offline_dirs == (Path("/usr/share/snpd/certs"), Path("/srv/certs"))
    assert cfg.access == AccessSection(report_groups=("attest", "_svc", "app.users"),
                                       key_groups=())
    assert cfg.dbus == DbusSection(enabled=False, bus="unix:path=/run/test/bus")
    assert cfg.varlink == VarlinkSection(socket=Path("/run/test/snpd.varlink"),
                                         max_message_bytes=65536)
    assert cfg.emulator.state_dir == Path("/srv/emulator")
    assert cfg.emulator.product is Product.TURIN
    assert cfg.emulator.options == {"latency": 0.25, "kernel": "6.2", "reported_tcb": {
        "fmc": 1, "bootloader": 1, "tee": 0, "snp": 2, "microcode": 71}}
    emulated = cfg.emulator.emulator_config()
    assert emulated.product is Product.TURIN
    assert (emulated.latency, emulated.kernel) == (0.25, "6.2")
    assert emulated.tcb("reported").components()["microcode"] == 71
    assert cfg.log == LogSection(level="debug")
    assert set(cfg.policies) == {"production", "lab"}
    prod = cfg.policies["production"]
    assert prod.minimum_version == (1, 55)
    assert prod.vmpl == (0, 1)
    assert prod.measurement == (bytes.fromhex("ab" * 48),)
    assert prod.minimum_reported_tcb == TcbMinimum(bootloader=4, tee=0, snp=22, microcode=213)
    assert prod.minimum_current_mit_vector == 0x8000000000000001
    assert cfg.policies["lab"] == AppraisalPolicy(allow_debug=True)


def test_json_reads_back_as_the_same_config() -> None:
    for cfg in (Config(), parse_config(FULL)):
        text = cfg.to_json()
        data = json.loads(text)
        assert data["device"]["path"] == str(cfg.device.path)
        assert Config.from_mapping(data) == cfg
    data = parse_config(FULL).to_dict()
    assert data["emulator"]["product"] == "Turin"
    assert data["emulator"]["kernel"] == "6.2"  # options sit in the section
    assert data["policy"]["production"]["minimum_tcb"]["reported"]["snp"] == 22
    assert data["policy"]["production"]["minimum_current_mit_vector"] == "0x8000000000000001"


def test_default_emulator_config_is_the_emulators_default() -> None:
    assert Config().emulator.emulator_config() == EmulatorConfig()


def test_lists_drop_duplicates_keeping_order() -> None:
    cfg = parse_config('[access]\nreport_groups = ["b", "a", "b"]\n')
    assert cfg.access.report_groups == ("b", "a")


# -- values built in code obey the same rules ------------------------------------


def test_sections_validate_and_normalize_when_built_in_code() -> None:
    assert DeviceSection(path="/dev/x").path == Path("/dev/x")  # type: ignore[arg-type]
    assert KdsSection(mirrors=["http://a"]).mirrors == ("http://a",)  # type: ignore[arg-type]
    assert EmulatorSection(product="Genoa").product is Product.GENOA  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^queue\.per_client: 9 is more than "
                                          r"queue\.max_pending \(8\)$"):
        QueueSection(max_pending=8, per_client=9)
    with pytest.raises(ConfigError, match=r"^device\.path: expected an absolute path"):
        DeviceSection(path=Path("dev/x"))
    with pytest.raises(ConfigError, match=r"^emulator\.product: "):
        EmulatorSection(options={"product": "Milan"})
    with pytest.raises(ConfigError, match=r"^device: expected a DeviceSection"):
        Config(device=QueueSection())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^policy\.p: expected an AppraisalPolicy"):
        Config(policies={"p": "allow_debug"})  # type: ignore[dict-item]


def test_config_is_immutable_all_the_way_down() -> None:
    cfg = parse_config(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.log = LogSection()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.queue.max_pending = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.emulator.options["latency"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.emulator.options["reported_tcb"]["snp"] = 0  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.policies["x"] = AppraisalPolicy()  # type: ignore[index]
    assert dataclasses.replace(cfg.log, level="error").level == "error"


# -- errors ----------------------------------------------------------------------

SECTIONS = "access, dbus, device, emulator, kbs, kds, log, policy, queue, varlink"


@pytest.mark.parametrize("text, message", [
    # unknown names
    ("[queu]\n", f"snpd.toml: queu: unknown section (known: {SECTIONS})"),
    ("level = \"info\"\n", f"snpd.toml: level: unknown section (known: {SECTIONS})"),
    ("[queue]\nmax_pendng = 3\n",
     "snpd.toml: queue.max_pendng: unknown key (known: max_pending, per_client, per_uid, "
     "root_reserve)"),
    ("[log]\n\"lev el\" = 1\n",
     'snpd.toml: log."lev el": unknown key (known: level, repeat_burst, repeat_interval_s)'),
    ("[device.path]\n", "snpd.toml: device.path: expected an absolute path, got a table"),
    ("log = 3\n", "snpd.toml: log: expected a [log] table, got 3"),
    # booleans are TOML booleans
    ("[dbus]\nenabled = 1\n", "snpd.toml: dbus.enabled: expected true or false, got 1"),
    ("[kds]\noffline = \"yes\"\n",
     "snpd.toml: kds.offline: expected true or false, got \"yes\""),
    # integers
    ("[queue]\nmax_pending = \"64\"\n",
     "snpd.toml: queue.max_pending: expected an integer 1..10000, got \"64\""),
    ("[queue]\nmax_pending = 64.0\n",
     "snpd.toml: queue.max_pending: expected an integer 1..10000, got 64.0"),
    ("[queue]\nmax_pending = true\n",
     "snpd.toml: queue.max_pending: expected an integer 1..10000, got true"),
    ("[queue]\nmax_pending = 0\n", "snpd.toml: queue.max_pending: 0 is out of range 1..10000"),
    ("[queue]\nmax_pending = 10001\n",
     "snpd.toml: queue.max_pending: 10001 is out of range 1..10000"),
    ("[queue]\nper_client = 0\n", "snpd.toml: queue.per_client: 0 is out of range 1..10000"),
    ("[queue]\nper_client = 65\n",
     "snpd.toml: queue.per_client: 65 is more than queue.max_pending (64)"),
    ("[device]\nmin_interval_ms = -1\n",
     "snpd.toml: device.min_interval_ms: -1 is out of range 0..60000"),
    ("[device]\nbusy_retries = 101\n",
     "snpd.toml: device.busy_retries: 101 is out of range 0..100"),
    ("[varlink]\nmax_message_bytes = 1024\n",
     "snpd.toml: varlink.max_message_bytes: 1024 is out of range 65536..67108864"),
    # varlink's per-uid bounds (issue 10)
    ("[varlink]\nmax_connections_per_uid = 0\n",
     "snpd.toml: varlink.max_connections_per_uid: 0 is out of range 1..65536"),
    ("[varlink]\nmax_connections_per_uid = 257\n",
     "snpd.toml: varlink.max_connections_per_uid: 257 is more than varlink.max_connections "
     "(256)"),
    ("[varlink]\nroot_reserved_connections = -1\n",
     "snpd.toml: varlink.root_reserved_connections: -1 is out of range 0..65536"),
    ("[varlink]\nmax_buffer_bytes_per_uid = 67108864\n",
     "snpd.toml: varlink.max_buffer_bytes_per_uid: 67108864 is more than "
     "varlink.max_buffer_bytes (33554432)"),
    ("[varlink]\nmax_message_bytes = 8388608\n",
     "snpd.toml: varlink.max_buffer_bytes_per_uid: 4194304 is less than "
     "varlink.max_message_bytes (8388608)"),
    ("[varlink]\nmessage_timeout_s = 0\n",
     "snpd.toml: varlink.message_timeout_s: expected a positive number, got 0"),
    ("[varlink]\nidle_timeout_s = 86401\n",
     "snpd.toml: varlink.idle_timeout_s: 86401 is more than the maximum 86400"),
    # durations
    ("[kds]\ntimeout_s = \"60\"\n", "snpd.toml: kds.timeout_s: expected a positive number, "
                                    "got \"60\""),
    ("[kds]\ntimeout_s = 0\n", "snpd.toml: kds.timeout_s: expected a positive number, got 0"),
    ("[kds]\ntimeout_s = nan\n",
     "snpd.toml: kds.timeout_s: expected a positive number, got nan"),
    ("[kds]\ntimeout_s = inf\n",
     "snpd.toml: kds.timeout_s: expected a positive number, got inf"),
    ("[kds]\nworkers = 0\n", "snpd.toml: kds.workers: 0 is out of range 1..64"),
    ("[kds]\nper_uid_calls = 5\n",
     "snpd.toml: kds.per_uid_calls: 5 is more than kds.workers (4)"),
    ("[kds]\nper_uid_fetch_burst = 0\n",
     "snpd.toml: kds.per_uid_fetch_burst: 0 is out of range 1..10000"),
    ("[kds]\nper_uid_fetch_interval_s = 0\n",
     "snpd.toml: kds.per_uid_fetch_interval_s: expected a positive number, got 0"),
    ("[kds]\nnegative_ttl_s = 86401\n",
     "snpd.toml: kds.negative_ttl_s: 86401 is more than the maximum 86400"),
    ("[kds]\nnegative_entries = 15\n",
     "snpd.toml: kds.negative_entries: 15 is out of range 16..1000000"),
    ("[log]\nrepeat_burst = 0\n", "snpd.toml: log.repeat_burst: 0 is out of range 1..100000"),
    ("[log]\nrepeat_interval_s = -1\n",
     "snpd.toml: log.repeat_interval_s: expected a positive number, got -1"),
    ("[device]\nrequest_timeout_s = -0.5\n",
     "snpd.toml: device.request_timeout_s: expected a positive number, got -0.5"),
    ("[device]\nrequest_timeout_s = 3601\n",
     "snpd.toml: device.request_timeout_s: 3601 is more than the maximum 3600"),
    # choices
    ("[device]\nbackend = \"sev\"\n", "snpd.toml: device.backend: expected one of auto, ioctl, "
                                      "configfs, azure, emulator, got \"sev\""),
    ("[log]\nlevel = \"INFO\"\n", "snpd.toml: log.level: expected one of debug, info, notice, "
                                  "warning, error, got \"INFO\""),
    ("[emulator]\nproduct = \"milan\"\n",
     "snpd.toml: emulator.product: expected one of Milan, Genoa, Turin, got \"milan\""),
    # paths
    ("[kds]\ncache_dir = \"var/cache/snpd\"\n",
     "snpd.toml: kds.cache_dir: expected an absolute path, got \"var/cache/snpd\""),
    ("[device]\npath = \"\"\n", "snpd.toml: device.path: expected an absolute path, got \"\""),
    ("[device]\npath = 5\n", "snpd.toml: device.path: expected an absolute path, got 5"),
    ("[varlink]\nsocket = \"/run/\\u0000x\"\n",
     "snpd.toml: varlink.socket: \"/run/\\u0000x\" is not a usable path"),
    ("[kds]\noffline_dirs = [\"/a\", \"b\"]\n",
     "snpd.toml: kds.offline_dirs[1]: expected an absolute path, got \"b\""),
    ("[kds]\noffline_dirs = \"/a\"\n",
     "snpd.toml: kds.offline_dirs: expected an array, got \"/a\""),
    # URLs
    ("[kds]\nurl = \"ftp://kdsintf.amd.com\"\n",
     "snpd.toml: kds.url: expected an http(s) URL, got \"ftp://kdsintf.amd.com\""),
    ("[kds]\nurl = \"kdsintf.amd.com\"\n",
     "snpd.toml: kds.url: expected an http(s) URL, got \"kdsintf.amd.com\""),
    ("[kds]\nurl = \"https://\"\n", "snpd.toml: kds.url: expected an http(s) URL, got \"https://\""),
    ("[kds]\nurl = \"https://h:99999\"\n",
     "snpd.toml: kds.url: expected an http(s) URL, got \"https://h:99999\""),
    ("[kds]\nurl = \"https://h/a b\"\n",
     "snpd.toml: kds.url: expected an http(s) URL, got \"https://h/a b\""),
    ("[kds]\nurl = \"https://h/?x=1\"\n",
     "snpd.toml: kds.url: \"https://h/?x=1\" must not carry a query or fragment"),
    ("[kds]\nmirrors = [\"https://a\", \"file:///srv/kds\"]\n",
     "snpd.toml: kds.mirrors[1]: expected an http(s) URL, got \"file:///srv/kds\""),
    ("[kds]\nmirrors = [{ url = \"https://a\" }]\n",
     "snpd.toml: kds.mirrors[0]: expected an http(s) URL, got a table"),
    # groups and bus
    ("[access]\nreport_groups = \"snpd-users\"\n",
     "snpd.toml: access.report_groups: expected an array, got \"snpd-users\""),
    ("[access]\nkey_groups = [1000]\n",
     "snpd.toml: access.key_groups[0]: expected a group name, got 1000"),
    ("[access]\nkey_groups = [\"1000\"]\n",
     "snpd.toml: access.key_groups[0]: expected a group name, got \"1000\""),
    ("[dbus]\nbus = \"sytem\"\n", "snpd.toml: dbus.bus: expected \"system\", \"session\" or a "
                                  "D-Bus address such as \"unix:path=/run/dbus/system_bus_socket\""
                                  ", got \"sytem\""),
    # cross-section
    ("[dbus]\nenabled = false\n[varlink]\nenabled = false\n",
     "snpd.toml: varlink.enabled: false together with dbus.enabled = false leaves the daemon "
     "no transport to serve"),
    # emulator pass-through must still be TOML-shaped
    ("[emulator]\nstate_dir = \"emu\"\n",
     "snpd.toml: emulator.state_dir: expected an absolute path, got \"emu\""),
    # the emulated guest's keys are checked by EmulatorConfig, under their path
    ("[emulator]\nlatency = -1\n",
     "snpd.toml: emulator: latency: expected seconds between 0 and 3600"),
    ("[emulator]\nproduct = \"Milan\"\nreported_tcb = { fmc = 1, bootloader = 1, tee = 0, "
     "snp = 2, microcode = 3 }\n",
     "snpd.toml: emulator: reported_tcb: unknown TCB component 'fmc' for Milan"),
])
def test_errors_name_the_key(text: str, message: str) -> None:
    assert error_of(text) == message


def test_long_and_hostile_values_are_shortened_and_escaped() -> None:
    message = error_of('[log]\nlevel = "' + "\\u001b[31m" + "x" * 500 + '"\n')
    assert "\x1b" not in message
    assert len(message) < 200
    assert message.endswith('"...')


def test_policy_errors_carry_their_path() -> None:
    typo = error_of("[policy.production]\nallow_debugg = true\n")
    # The known keys follow, as for every other table.
    assert typo.startswith("snpd.toml: policy.production: allow_debugg: unknown key (known: "
                           "minimum_abi, allow_debug, ")
    assert error_of("[policy.production]\nminimum_tcb.reported = { snp = 256 }\n") == (
        "snpd.toml: policy.production: minimum_tcb.reported.snp: 256 is out of range 0..255")
    assert error_of("[policy.production]\nallow_debug = 0\n") == (
        "snpd.toml: policy.production: allow_debug: expected a boolean, got integer")
    assert error_of("[policy]\nproduction = 1\n").startswith("snpd.toml: policy.production: ")
    assert error_of("policy = 1\n").startswith("snpd.toml: policy: ")
    assert error_of('[policy."bad name"]\n').startswith("snpd.toml: policy.bad name: ")


@pytest.mark.parametrize("text, position", [
    ("[queue]\nmax_pending = \n", "line 2, column 15"),
    ("[queue]\nmax_pending = 1\nmax_pending = 2\n", "line 3, column"),
    ("[log]\nlevel = \"info\n", "line 2, column"),
    ("\n\n[log\n", "line 3, column"),
])
def test_toml_syntax_errors_give_line_and_column(text: str, position: str) -> None:
    message = error_of(text)
    assert message.startswith(f"snpd.toml: {position}"), message
    assert "invalid TOML: " in message


def test_pathological_toml_is_a_config_error() -> None:
    assert "invalid TOML" in error_of("a = " + "1" * 5000 + "\n")
    assert "invalid TOML" in error_of("a = " + "[" * 3000 + "]" * 3000 + "\n")
    assert "nested more than" in error_of("[emulator]\nx = " + "[" * 20 + "]" * 20 + "\n")
    assert error_of("x" * (MAX_CONFIG_SIZE + 1)) == (
        f"snpd.toml: larger than {MAX_CONFIG_SIZE} bytes")


def test_source_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/x\.toml: log\.level: "):
        parse_config("[log]\nlevel = 1\n", source="/etc/x.toml")


# -- reading files ---------------------------------------------------------------


def test_load_config_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(missing))}: no such file$"):
        load_config(missing)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)  # and does not hang waiting for a writer
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (MAX_CONFIG_SIZE + 1))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(big)
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(bad byte at offset 5\)"):
        load_config(latin)
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nmax_pendng = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(bad))}: queue.max_pendng: "):
        load_config(bad)
    # A broken default file is an error too: only its absence means defaults.
    with pytest.raises(ConfigError, match=r"queue\.max_pendng"):
        load_config(None, default_path=bad)


def test_load_config_accepts_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "snpd.toml"
    path.write_bytes(b"\xef\xbb\xbf[log]\nlevel = \"debug\"\n")
    assert load_config(path).log.level == "debug"


# -- the shipped, commented file ---------------------------------------------------

_HEADER = re.compile(r"\[([A-Za-z0-9_.-]+)\]")
_COMMENTED_HEADER = re.compile(r"#\s?\[([A-Za-z0-9_.-]+)\]")
_COMMENTED_KEY = re.compile(r"#\s?([A-Za-z0-9_.-]+ = .*)")


def _uncomment(text: str, *, examples: bool) -> Tuple[str, Dict[str, List[str]]]:
    """Uncomment every ``#key = value`` line of the sections; with ``examples`` also
    the commented-out tables (``#[policy.production]``) and their keys. Returns the
    text and the keys found per section."""
    out: List[str] = []
    keys: Dict[str, List[str]] = {}
    section: Optional[str] = None
    for line in text.splitlines():
        header = _HEADER.fullmatch(line)
        commented_header = _COMMENTED_HEADER.fullmatch(line)
        key = _COMMENTED_KEY.fullmatch(line)
        if header:
            section = header.group(1)
        elif commented_header:
            section = commented_header.group(1) if examples else None
            if examples:
                line = line.lstrip("#").strip()
        elif key and section is not None:
            line = key.group(1)
            keys.setdefault(section, []).append(line.split(" = ", 1)[0])
        out.append(line)
    return "\n".join(out) + "\n", keys


def test_shipped_file_parses_to_the_defaults() -> None:
    assert parse_config(SHIPPED.read_text(encoding="utf-8")) == Config()


def test_shipped_file_uncommented_still_gives_the_defaults() -> None:
    text, keys = _uncomment(SHIPPED.read_text(encoding="utf-8"), examples=False)
    assert keys, "no commented key lines found"
    assert parse_config(text) == Config()


def test_shipped_file_documents_every_key() -> None:
    _, keys = _uncomment(SHIPPED.read_text(encoding="utf-8"), examples=False)
    for name, cls in Config.sections().items():
        assert keys.get(name) == list(cls.key_names()), f"[{name}] in conf/snpd.toml"
    assert set(keys) == set(Config.sections())


def test_shipped_policy_example_parses() -> None:
    text, keys = _uncomment(SHIPPED.read_text(encoding="utf-8"), examples=True)
    assert "policy.production" in keys
    cfg = parse_config(text)
    assert set(cfg.policies) == {"production"}
    assert cfg.policies["production"].allow_debug is False
    assert dataclasses.replace(cfg, policies={}, kbs={}) == Config()


def test_shipped_kbs_example_parses() -> None:
    text, keys = _uncomment(SHIPPED.read_text(encoding="utf-8"), examples=True)
    assert keys["kbs.fleet"] == list(KbsEndpoint.KEYS)
    fleet = parse_config(text).kbs["fleet"]
    assert fleet.url.startswith("https://") and len(fleet.allow) == 2
    assert fleet.allow[1].token and not fleet.allow[0].token


# -- property: the mapping-level parser raises ConfigError and nothing else ------------

_NAMES = sorted({
    "policy", "production", "minimum_tcb", "reported", "committed", "snp", "fmc",
    *Config.sections(),
    *(k for cls in Config.sections().values() for k in cls.key_names()),
    *(f.name for f in dataclasses.fields(AppraisalPolicy)),
    *(f.name for f in dataclasses.fields(EmulatorConfig)),
    "trusted_id_keys", "trusted_author_keys",
})
_keys = st.one_of(st.sampled_from(_NAMES), st.text(max_size=6), st.integers(-2, 2))
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(),
    st.text(max_size=12), st.binary(max_size=8),
    st.sampled_from(["auto", "emulator", "/a/b", "rel", "https://h", "http://h:1", "Milan",
                     "system", "unix:path=/x", "debug", "snpd-users", "0x1", "00" * 48,
                     "1.55", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"]),
    st.datetimes(), st.dates(), st.times(),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(_keys, children, max_size=4)),
    max_leaves=24,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=6))
def test_arbitrary_mappings_raise_only_config_error(data: Dict[Any, Any]) -> None:
    try:
        cfg = Config.from_mapping(data)
    except ConfigError as exc:
        assert str(exc).startswith("snpd.toml: ")
    else:
        assert isinstance(json.loads(cfg.to_json()), dict)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(Config.sections())), st.data())
def test_arbitrary_values_in_known_keys_raise_only_config_error(section: str,
                                                               data: st.DataObject) -> None:
    keys = list(Config.sections()[section].key_names())
    table = data.draw(st.dictionaries(st.sampled_from(keys), _values, max_size=len(keys)))
    try:
        Config.from_mapping({section: table})
    except ConfigError as exc:
        assert str(exc).startswith(f"snpd.toml: {section}."), str(exc)


def test_non_string_keys_and_non_toml_values() -> None:
    with pytest.raises(ConfigError, match=r"^snpd.toml: <int key>: unknown section"):
        Config.from_mapping({1: {}})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"^snpd.toml: emulator.x: expected a TOML value"):
        Config.from_mapping({"emulator": {"x": None}})
    with pytest.raises(ConfigError, match=r"^snpd.toml: expected a TOML document"):
        Config.from_mapping([])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^snpd.toml: emulator.<int key>: keys must be"):
        Config.from_mapping({"emulator": {1: 2}})
    with pytest.raises(ConfigError, match=r"^snpd.toml: queue.max_pending: a very large "
                                          r"integer is out of range 1..10000$"):
        Config.from_mapping({"queue": {"max_pending": 10**5000}})


# -- snpd --check-config -----------------------------------------------------------


def run(*argv: object) -> Tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = daemon.main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_check_config_ok(tmp_path: Path) -> None:
    path = tmp_path / "snpd.toml"
    path.write_text(FULL, encoding="utf-8")
    assert run("--check-config", "--config", path) == (0, f"{path}: OK\n", "")
    code, out, err = run("--check-config", "--config", path, "--json")
    assert (code, err) == (0, "")
    assert Config.from_mapping(json.loads(out)) == parse_config(FULL)


def test_check_config_shipped_file() -> None:
    assert run("--check-config", "--config", SHIPPED) == (0, f"{SHIPPED}: OK\n", "")


def test_check_config_error(tmp_path: Path) -> None:
    path = tmp_path / "snpd.toml"
    path.write_text("[queue]\nmax_pendng = 3\n", encoding="utf-8")
    assert run("--check-config", "--config", path) == (
        2, "", f"{path}: queue.max_pendng: unknown key (known: max_pending, per_client, "
               "per_uid, root_reserve)\n")
    code, out, err = run("--check-config", "--config", tmp_path / "nope.toml", "--json")
    assert (code, out) == (2, "")
    assert err == f"{tmp_path / 'nope.toml'}: no such file\n"


def test_check_config_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "snpd.toml"
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", path)
    assert run("--check-config") == (
        0, f"{path}: not present, the built-in defaults apply: OK\n", "")
    code, out, _ = run("--check-config", "--json")
    assert code == 0 and Config.from_mapping(json.loads(out)) == Config()
    path.write_text("[log]\nlevel = 3\n", encoding="utf-8")
    code, out, err = run("--check-config")
    assert (code, out) == (2, "")
    assert err == f"{path}: log.level: expected one of debug, info, notice, warning, error, got 3\n"


def test_daemon_usage() -> None:
    code, _, err = run("--json")
    assert code == 2 and "--json only applies to --check-config" in err
    code, _, err = run("--bogus")
    assert code == 2 and "unrecognized arguments" in err
    code, out, _ = run("--help")
    assert code == 0 and "--check-config" in out
