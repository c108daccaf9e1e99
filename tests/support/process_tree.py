"""A running sidecar's processes, read from /proc: sidewatch's children (its Envoy) and the TCP ports each
process listens on, with the address it is bound to."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LISTEN = "0A"   # TCP_LISTEN in /proc/net/tcp's `st` column


def children(pid: int) -> list[int]:
    """Every thread's children: sidewatch starts Envoy from its supervisor thread. A thread may end while they
    are read (its task folder goes): it has no child then."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory (VmRSS) of process ``pid``; 0 once it has gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (sidewatch and its Envoy)."""
    return rss_bytes(pid) + sum(rss_bytes(child) for child in children(pid))


def envoy_child(pid: int) -> int | None:
    """The pid of the envoy that process ``pid`` runs, or None."""
    for child in children(pid):
        try:
            if Path(f"/proc/{child}/exe").resolve().name == "envoy":
                return child
        except OSError:
            continue
    return None


def _address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    # The kernel prints the address as 32-bit words in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port, 16)


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                found.add(_address(fields[1]))
    return found
