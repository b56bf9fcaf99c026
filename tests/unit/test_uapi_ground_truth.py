"""The Python uapi layout against the kernel's own <linux/sev-guest.h>, compiled with cc.

scripts/test installs the compiler and linux-libc-dev; a missing one is a failure
here, not a skip: this is the ground truth every ioctl rests on.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from snpd.abi import uapi

HEADER = Path("/usr/include/linux/sev-guest.h")

PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/sev-guest.h>

#define SIZE(s) printf("size %s %zu\n", #s, sizeof(struct s))
#define OFF(s, f) printf("offset %s.%s %zu\n", #s, #f, offsetof(struct s, f))

int main(void) {
    printf("ioctl SNP_GET_REPORT %lu\n", (unsigned long)SNP_GET_REPORT);
    printf("ioctl SNP_GET_DERIVED_KEY %lu\n", (unsigned long)SNP_GET_DERIVED_KEY);
    printf("ioctl SNP_GET_EXT_REPORT %lu\n", (unsigned long)SNP_GET_EXT_REPORT);
    SIZE(snp_guest_request_ioctl); SIZE(snp_report_req); SIZE(snp_report_resp);
    SIZE(snp_derived_key_req); SIZE(snp_derived_key_resp); SIZE(snp_ext_report_req);
    OFF(snp_guest_request_ioctl, msg_version); OFF(snp_guest_request_ioctl, req_data);
    OFF(snp_guest_request_ioctl, resp_data); OFF(snp_guest_request_ioctl, exitinfo2);
    OFF(snp_report_req, user_data); OFF(snp_report_req, vmpl); OFF(snp_report_req, rsvd);
    OFF(snp_derived_key_req, root_key_select); OFF(snp_derived_key_req, guest_field_select);
    OFF(snp_derived_key_req, vmpl); OFF(snp_derived_key_req, guest_svn);
    OFF(snp_derived_key_req, tcb_version);
    OFF(snp_ext_report_req, data); OFF(snp_ext_report_req, certs_address);
    OFF(snp_ext_report_req, certs_len);
    return 0;
}
"""


def test_python_layout_matches_the_kernel_header(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler: scripts/test installs gcc"
    assert HEADER.is_file(), f"{HEADER} missing: scripts/test installs linux-libc-dev"
    source = tmp_path / "uapi.c"
    source.write_text(PROGRAM)
    binary = tmp_path / "uapi"
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(binary), str(source)], check=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        kind, name, value = line.split()
        facts[(kind, name)] = int(value)

    for name in ("SNP_GET_REPORT", "SNP_GET_DERIVED_KEY", "SNP_GET_EXT_REPORT"):
        assert facts[("ioctl", name)] == getattr(uapi, name), name
    assert uapi.SNP_GET_REPORT == 0xC0205300
    for name, size in uapi.STRUCT_SIZES.items():
        assert facts[("size", name)] == size, name
    for name, offset in uapi.FIELD_OFFSETS.items():
        assert facts[("offset", name)] == offset, name
    # Every constant the test compared exists on both sides.
    assert len([k for k in facts if k[0] == "offset"]) == len(uapi.FIELD_OFFSETS)


def test_ioctl_module_exposes_the_kernel_names() -> None:
    from snpd.device import ioctl

    assert ioctl.SNP_GET_REPORT == 0xC0205300
    assert ioctl.SNP_GET_DERIVED_KEY == 0xC0205301
    assert ioctl.SNP_GET_EXT_REPORT == 0xC0205302
