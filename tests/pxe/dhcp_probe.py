#!/usr/bin/env python3
"""A PXE client's first DHCP exchange, sent raw (no DHCP client of ours or of the OS).

    dhcp_probe.py IFACE MAC ARCH [USERCLASS]

Broadcasts a DHCPDISCOVER from IFACE with chaddr MAC, option 93 (client system architecture)
ARCH and, when given, option 77 (user class, as iPXE sends "iPXE"), and prints the first
DHCPOFFER as JSON: {"yiaddr", "siaddr", "file", "options": {code: hex}}; or {"offer": null}
when none comes within 5 s.
"""
import json
import random
import socket
import struct
import sys
import time

SO_BINDTODEVICE = 25


def discover(mac: bytes, arch: int, user_class: str | None, xid: int) -> bytes:
    head = struct.pack("!BBBBIHHIIII", 1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0)
    chaddr = mac + bytes(10)
    opts = bytes([53, 1, 1])  # DHCPDISCOVER
    opts += bytes([93, 2]) + struct.pack("!H", arch)
    opts += bytes([94, 3, 1, 2, 1])  # UNDI 2.1
    opts += bytes([60, 32]) + b"PXEClient:Arch:%05d:UNDI:002001" % arch
    if user_class:
        opts += bytes([77, len(user_class)]) + user_class.encode()
    opts += bytes([55, 4, 1, 3, 6, 67])
    opts += bytes([255])
    return head + chaddr + bytes(64) + bytes(128) + b"\x63\x82\x53\x63" + opts


def parse(pkt: bytes):
    op, _, _, _, xid = struct.unpack("!BBBBI", pkt[:8])
    yiaddr = socket.inet_ntoa(pkt[16:20])
    siaddr = socket.inet_ntoa(pkt[20:24])
    file = pkt[108:236].split(b"\0", 1)[0].decode()
    options, i = {}, 240
    while i < len(pkt) and pkt[i] != 255:
        if pkt[i] == 0:
            i += 1
            continue
        code, length = pkt[i], pkt[i + 1]
        options[code] = pkt[i + 2 : i + 2 + length]
        i += 2 + length
    return op, xid, yiaddr, siaddr, file, options


def main() -> int:
    iface, mac_text, arch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    user_class = sys.argv[4] if len(sys.argv) > 4 else None
    mac = bytes(int(b, 16) for b in mac_text.split(":"))
    xid = random.getrandbits(32)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, iface.encode())
    s.bind(("0.0.0.0", 68))
    s.sendto(discover(mac, arch, user_class, xid), ("255.255.255.255", 67))
    deadline = time.monotonic() + 5
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            pkt = s.recv(4096)
        except socket.timeout:
            break
        op, rxid, yiaddr, siaddr, file, options = parse(pkt)
        if op != 2 or rxid != xid or options.get(53) != b"\x02":
            continue
        # dnsmasq may put the boot file in option 67 rather than the header's file field.
        if not file and 67 in options:
            file = options[67].split(b"\0", 1)[0].decode()
        print(json.dumps({"yiaddr": yiaddr, "siaddr": siaddr, "file": file,
                          "options": {str(k): v.hex() for k, v in options.items()}}))
        return 0
    print(json.dumps({"offer": None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
