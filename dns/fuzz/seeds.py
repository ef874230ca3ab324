#!/usr/bin/env python3
"""Write the seed corpus of the `request` fuzz target: DNS requests in wire
format against the target's zone (fuzz_targets/request.rs), one file each,
as corpus/request/seed-<what>. Standard library only; rerun after changing
the list: python3 dns/fuzz/seeds.py
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "corpus", "request")

A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, IXFR, AXFR, ANY = (
    1, 2, 5, 6, 12, 16, 28, 33, 41, 251, 252, 255)
IN, CH = 1, 3
QUERY, NOTIFY = 0, 4


def name(text):
    out = b""
    for label in text.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def opt(payload=1232, version=0, do=False, options=b""):
    """An OPT pseudo-record (EDNS): root owner, class = UDP payload size."""
    ttl = (version << 16) | (0x8000 if do else 0)
    return b"\0" + struct.pack(">HHIH", OPT, payload, ttl, len(options)) + options


def message(questions, id=0x4242, rd=True, opcode=QUERY, additionals=()):
    flags = (opcode << 11) | (0x0100 if rd else 0)
    head = struct.pack(">HHHHHH", id, flags, len(questions), 0, 0, len(additionals))
    body = b"".join(name(n) + struct.pack(">HH", t, c) for n, t, c in questions)
    return head + body + b"".join(additionals)


def q(n, t=A, c=IN):
    return (n, t, c)


SVC = "svc.cluster.local"
SEEDS = {
    "a-clusterip": message([q(f"web.shop.{SVC}")]),
    "a-mixed-case": message([q(f"WeB.ShOp.{SVC}")]),
    "aaaa-edns": message([q(f"web.shop.{SVC}", AAAA)], additionals=[opt()]),
    "srv-clusterip": message(
        [q(f"_http._tcp.web.shop.{SVC}", SRV)], additionals=[opt(4096, do=True)]),
    "srv-headless": message([q(f"_sql._tcp.db.shop.{SVC}", SRV)]),
    "a-headless-hostname": message([q(f"db-0.db.shop.{SVC}")]),
    "a-headless-big": message([q(f"big.shop.{SVC}")]),
    "a-headless-big-edns": message([q(f"big.shop.{SVC}")], additionals=[opt(4096)]),
    "a-external-name": message([q(f"ext.shop.{SVC}")]),
    "a-alias-in-zone": message([q(f"alias.shop.{SVC}")]),
    "a-search-path": message([q(f"web.shop.shop.{SVC}")]),
    "a-pod": message([q("10-244-1-9.shop.pod.cluster.local")]),
    "ptr-v4": message([q("20.0.96.10.in-addr.arpa", PTR)]),
    "ptr-v6": message([q(
        ".".join(reversed("fd000096000000000000000000000020")) + ".ip6.arpa", PTR)]),
    "soa-apex": message([q("cluster.local", SOA)]),
    "ns-apex": message([q("cluster.local", NS)]),
    "any-apex": message([q("cluster.local", ANY)]),
    "txt-version": message([q("dns-version.cluster.local", TXT)]),
    "a-nameserver": message([q("ns.dns.cluster.local")]),
    "a-outside-zone": message([q("example.test")]),
    "axfr": message([q("cluster.local", AXFR)]),
    "ixfr": message([q("cluster.local", IXFR)]),
    "txt-chaos": message([q("version.bind", TXT, CH)]),
    "edns-version-1": message([q(f"web.shop.{SVC}")], additionals=[opt(version=1)]),
    "edns-cookie": message(
        [q(f"web.shop.{SVC}")],
        additionals=[opt(options=struct.pack(">HH", 10, 8) + b"\x01" * 8)]),
    "notify": message([q("cluster.local", SOA)], opcode=NOTIFY),
    "two-questions": message([q(f"web.shop.{SVC}"), q(f"db.shop.{SVC}")]),
    "no-question": message([]),
    # A question name that points back at itself (a compression loop).
    "compression-loop": struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    + b"\xc0\x0c" + struct.pack(">HH", A, IN),
    "truncated": message([q(f"web.shop.{SVC}")])[:20],
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for what, raw in SEEDS.items():
        with open(os.path.join(OUT, f"seed-{what}"), "wb") as f:
            f.write(raw)
    print(f"{len(SEEDS)} seeds in {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
