"""weftctl: the operator's tool for a weft (or flannel) network in a store.

  weftctl [--store URL | -etcd-* flags] config put FILE|-     validate, then store the config
  weftctl ... config get                                       print the stored config
  weftctl ... leases [--json]                                  subnet, public IP, backend, expiry
  weftctl ... reserve SUBNET --public-ip IP [--subnet6 SUBNET6]   a lease that never expires
  weftctl ... reserve --subnet6 SUBNET6 --public-ipv6 IP6      the same on an IPv6-only network
  weftctl ... release SUBNET|SUBNET6                           delete a reservation or a lease
  weftctl docker-opts [-f subnet.env] [-d OUT|-] [-i] [-c] [-m] [-k KEY]   as mk-docker-opts.sh
  weftctl peermap [--dev flannel.1] [--json]                   this node's live BPF maps and counters
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
import time

from . import flags, subnetenv
from .config import ConfigError, parse_config
from .lease import NO_IPV4, NO_PUBLIC_IP, LeaseAttrs, LeaseFormatError, subnet_key
from .leasecheck import key_problem, not_a_node, shown
from .manager import decode
from .store import LeaseExists, StoreError


def build_parser() -> flags.Parser:
    p = flags.Parser(prog="weftctl", description=__doc__.split("\n\n")[0])
    flags.add_store_flags(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=flags.Parser)
    cfg = sub.add_parser("config", help="read or write the network config")
    cfg_sub = cfg.add_subparsers(dest="action", required=True, parser_class=flags.Parser)
    put = cfg_sub.add_parser("put", help="validate and store a config (FILE or - for stdin)")
    put.add_argument("file")
    cfg_sub.add_parser("get", help="print the stored config")
    leases = sub.add_parser("leases", help="list leases")
    leases.add_argument("--json", action="store_true", help="print JSON")
    res = sub.add_parser("reserve", help="reserve a subnet for a public IP (no TTL)")
    res.add_argument("subnet", nargs="?", help="the IPv4 subnet (none on an IPv6-only network)")
    res.add_argument("--public-ip", help="the node's public IP (not on an IPv6-only network)")
    res.add_argument("--backend-type", default="", help="BackendType to record (optional)")
    res.add_argument("--subnet6", help="its IPv6 subnet (EnableIPv6; alone on an IPv6-only network)")
    res.add_argument("--public-ipv6", help="the node's public IPv6 (names the node on an IPv6-only network)")
    rel = sub.add_parser("release", help="delete a reservation or a lease")
    rel.add_argument("subnet", help="its IPv4 subnet, or its IPv6 subnet for an IPv6-only lease")
    dk = sub.add_parser("docker-opts", help="Docker options from subnet.env, as mk-docker-opts.sh")
    dk.add_argument("-f", dest="env_file", default="/run/flannel/subnet.env", help="subnet.env to read")
    dk.add_argument("-d", dest="out", default="/run/docker_opts.env", help="file to write (- for stdout)")
    dk.add_argument("-i", dest="individual", action="store_true", help="write DOCKER_OPT_* lines")
    dk.add_argument("-c", dest="combined", action="store_true", help="write the combined line")
    dk.add_argument("-m", dest="no_masq", action="store_true", help="leave out --ip-masq")
    dk.add_argument("-k", dest="key", default="DOCKER_OPTS", help="name of the combined variable")
    pm = sub.add_parser("peermap", help="print this node's BPF peer map and counters (vxlan/ebpf, or a --source-guard; run in the node's netns)")
    pm.add_argument("--dev", default="flannel.1", help="the VXLAN device the programs are attached to, or -iface for a --source-guard")
    pm.add_argument("--json", action="store_true", help="print JSON (peers, counters, drops)")
    return p


def _subnet(text: str) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        raise flags.UsageError(f"{text!r}: not an IPv4 subnet such as 10.5.3.0/24 (no host bits)") from None


def _subnet6(text: str) -> ipaddress.IPv6Network:
    try:
        subnet6 = ipaddress.IPv6Network(text)
    except ValueError:
        subnet6 = None
    if subnet6 is None or subnet6.network_address.scope_id:
        raise flags.UsageError(f"--subnet6 {text!r}: not an IPv6 subnet such as fd10:244:0:3::/64 "
                               "(no host bits)")
    return subnet6


def _public_ipv6(text: str) -> ipaddress.IPv6Address:
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        addr = None
    if addr is None or addr.scope_id:
        raise flags.UsageError(f"--public-ipv6 {text!r}: not an IPv6 address")
    what = not_a_node(addr)
    if what:
        raise flags.UsageError(f"--public-ipv6 {text!r}: not an address a node can have ({what})")
    return addr


def _lease_subnet(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``release``'s argument: a lease's identity (its IPv4 subnet, or an IPv6-only lease's IPv6 one)."""
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        pass
    try:
        subnet6 = ipaddress.IPv6Network(text)
        if not subnet6.network_address.scope_id:
            return subnet6
    except ValueError:
        pass
    raise flags.UsageError(f"{text!r}: not a subnet such as 10.5.3.0/24, or fd10:244:0:3::/64 for an "
                           "IPv6-only lease (no host bits)")


def cmd_config(args, store) -> int:
    if args.action == "get":
        text = store.get_config()
        if text is None:
            return flags.fail("weftctl", f"no config at {args.etcd_prefix}/config")
        print(text)
        return 0
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file).read()
    except OSError as exc:
        return flags.fail("weftctl", f"{args.file}: {exc.strerror}")
    parse_config(text)  # ConfigError -> one line, exit 1, nothing stored
    store.put_config(text.strip())
    return 0


def _expiry(expiration) -> str:
    if expiration is None:
        return "never (reservation)"
    left = expiration - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expiration))
    return f"{stamp} (in {int(left // 3600)}h{int(left % 3600 // 60):02d}m)"


def cmd_leases(args, store) -> int:
    """The table (or JSON) lists the leases weftd follows; each one it refuses is named on stderr
    with the reason it is counted under (``weft_leases_invalid_total``)."""
    text = store.get_config()
    try:
        config = parse_config(text) if text is not None else None
    except ConfigError as exc:
        print(f"weftctl: the stored config is invalid ({exc}); leases judged without it", file=sys.stderr)
        config = None
    scan = store.scan_subnets()
    rows, bad = [], []
    for r in scan.records:
        try:
            rows.append(decode(r, config))
        except LeaseFormatError as exc:
            bad.append((subnet_key(r.subnet, r.subnet6), exc.reason, str(exc)))
    bad += [(f.name, "bad_key", key_problem(f.name)) for f in scan.foreign]
    if args.json:
        print(json.dumps([l.to_dict() for l in rows], indent=2))
    else:
        # The IPv6 columns only when a lease has an IPv6 part: an IPv4 network's table is as before.
        # An IPv6-only lease shows "-" for its empty IPv4 parts (0.0.0.0-0, PublicIP 0.0.0.0).
        dual = any(l.subnet6 is not None or l.attrs.public_ipv6 is not None for l in rows)
        table = [("SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES")]
        if dual:
            table = [("SUBNET", "SUBNET6", "PUBLIC IP", "PUBLIC IPV6", "BACKEND", "EXPIRES")]
        for l in rows:
            if dual:
                d = l.to_dict()
                table.append((d["subnet"] or "-", d["subnet6"] or "-", d["public_ip"] or "-",
                              d["public_ipv6"] or "-", l.attrs.wire_type, _expiry(l.expiration)))
            else:
                table.append((str(l.subnet), str(l.attrs.public_ip), l.attrs.wire_type,
                              _expiry(l.expiration)))
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for name, reason, message in sorted(bad):
        print(f"weftctl: invalid lease subnets/{shown(name)} ({reason}): {message}; weftd ignores it",
              file=sys.stderr)
    return 0


def _record_of(store, ident):
    """The live record of the lease named ``ident`` (``Lease.ident``): an IPv4 subnet, whatever IPv6
    part its key has, or the IPv6 subnet of an IPv6-only lease."""
    records, _ = store.list_leases()
    return next((r for r in records if r.ident == ident), None)


def cmd_reserve(args, store) -> int:
    if args.subnet is None and args.subnet6 is None:
        raise flags.UsageError("reserve: give a SUBNET (or --subnet6 on an IPv6-only network)")
    subnet = _subnet(args.subnet) if args.subnet is not None else None
    subnet6 = _subnet6(args.subnet6) if args.subnet6 else None
    public_ipv6 = _public_ipv6(args.public_ipv6) if args.public_ipv6 else None
    text = store.get_config()
    config = parse_config(text) if text is not None else None
    # IPv6-only: as the config says; with no config stored, when only --subnet6 is given
    ipv6_only = config.ipv6_only if config is not None else subnet is None
    if ipv6_only:
        return _reserve_ipv6_only(args, store, config, subnet, subnet6, public_ipv6)
    if subnet is None:
        return flags.fail("weftctl", f"--subnet6 {subnet6} alone: the network has IPv4 (Network "
                                     f"{config.network}): give its IPv4 SUBNET too")
    if args.public_ip is None:
        raise flags.UsageError("the following arguments are required: --public-ip")
    try:
        attrs = LeaseAttrs(ipaddress.IPv4Address(args.public_ip), args.backend_type, public_ipv6=public_ipv6)
    except ValueError:
        raise flags.UsageError(f"--public-ip {args.public_ip!r}: not an IPv4 address") from None
    if config is not None:
        if not config.contains_subnet(subnet):
            return flags.fail("weftctl", f"{subnet} is not a subnet of the configured network")
        if config.enable_ipv6 and subnet6 is None:
            return flags.fail("weftctl", f"{subnet}: the network is dual-stack (EnableIPv6): give its "
                                         f"IPv6 subnet too (--subnet6, inside {config.ipv6_network})")
        if config.enable_ipv6 and not config.contains_subnet6(subnet6):
            return flags.fail("weftctl", f"--subnet6 {subnet6} is not a subnet of the configured "
                                         f"IPv6Network {config.ipv6_network}")
        if not config.enable_ipv6 and subnet6 is not None:
            return flags.fail("weftctl", f"--subnet6 {subnet6}: the configured network has no IPv6 "
                                         "(EnableIPv6 is false)")
    try:
        store.create_lease(subnet, attrs.to_json(), ttl=None, subnet6=subnet6)
    except LeaseExists:
        current = _record_of(store, subnet)
        try:
            holder = LeaseAttrs.from_json(current.value) if current else None
        except LeaseFormatError:
            holder = None
        if holder is None or holder.public_ip != attrs.public_ip:
            who = holder.public_ip if holder else "someone else"
            return flags.fail("weftctl", f"{subnet} is held by {who}; release it first")
        if subnet6 is not None and current.subnet6 != subnet6:
            return flags.fail("weftctl", f"{subnet} is held by {holder.public_ip} with IPv6 subnet "
                                         f"{current.subnet6 or 'none'}; release it first")
        # The node's own lease becomes a reservation: same value, no TTL (flannel's documented way).
        store.update_lease(subnet, current.value, ttl=None, subnet6=current.subnet6)
        subnet6 = current.subnet6
    print(f"reserved {subnet}{'' if subnet6 is None else f' and {subnet6}'} for {attrs.public_ip}")
    return 0


def _reserve_ipv6_only(args, store, config, subnet, subnet6, public_ipv6) -> int:
    """An IPv6-only reservation: flanneld's key 0.0.0.0-0&<ip6>-<len6>, PublicIP 0.0.0.0, named by
    the node's public IPv6 (what the acquisition of an IPv6-only node finds its lease by)."""
    six = "the network is IPv6-only (EnableIPv4 false)"
    if subnet is not None:
        return flags.fail("weftctl", f"{subnet}: {six}: it has no IPv4 subnets; reserve with --subnet6 alone")
    if args.public_ip is not None:
        return flags.fail("weftctl", f"--public-ip {args.public_ip}: {six}: an IPv6-only node is named "
                                     "by its public IPv6 (--public-ipv6)")
    if public_ipv6 is None:
        return flags.fail("weftctl", f"{subnet6}: {six}: give the node's --public-ipv6")
    if config is not None and not config.contains_subnet6(subnet6):
        return flags.fail("weftctl", f"--subnet6 {subnet6} is not a subnet of the configured "
                                     f"IPv6Network {config.ipv6_network}")
    attrs = LeaseAttrs(NO_PUBLIC_IP, args.backend_type, public_ipv6=public_ipv6)
    try:
        store.create_lease(NO_IPV4, attrs.to_json(), ttl=None, subnet6=subnet6)
    except LeaseExists:
        current = _record_of(store, subnet6)
        try:
            holder = LeaseAttrs.from_json(current.value) if current else None
        except LeaseFormatError:
            holder = None
        if holder is None or holder.public_ipv6 != public_ipv6:
            who = (holder.public_ipv6 or "someone else") if holder else "someone else"
            return flags.fail("weftctl", f"{subnet6} is held by {who}; release it first")
        store.update_lease(NO_IPV4, current.value, ttl=None, subnet6=subnet6)  # now a reservation
    print(f"reserved {subnet6} for {public_ipv6}")
    return 0


def cmd_release(args, store) -> int:
    ident = _lease_subnet(args.subnet)
    current = _record_of(store, ident)
    if current is None or not store.delete_lease(current.subnet, current.subnet6):
        return flags.fail("weftctl", f"no lease or reservation for {ident}")
    print(f"released {ident}")
    return 0


def cmd_docker_opts(args) -> int:
    env = subnetenv.read(args.env_file)
    if not env:
        return flags.fail("weftctl", f"{args.env_file}: missing or empty (is weftd running?)")
    opts = {}
    if env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    masq = env.get("FLANNEL_IPMASQ")
    if masq in ("true", "false") and not args.no_masq:
        # weft masquerades (true) -> Docker must not, and the other way round.
        opts["DOCKER_OPT_IPMASQ"] = f"--ip-masq={'false' if masq == 'true' else 'true'}"
    if env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    individual, combined = args.individual, args.combined
    if not individual and not combined:
        individual = combined = True
    lines = []
    if individual:
        for key in ("DOCKER_OPT_BIP", "DOCKER_OPT_IPMASQ", "DOCKER_OPT_MTU"):
            lines.append(f'{key}="{opts.get(key, "")}"')
    if combined:
        prior = os.environ.get(args.key, "")
        joined = " ".join(opts[k] for k in ("DOCKER_OPT_BIP", "DOCKER_OPT_IPMASQ", "DOCKER_OPT_MTU")
                          if k in opts)
        lines.append(f'{args.key}="{(prior + " " + joined).strip()}"')
    text = "\n".join(lines) + "\n"
    if args.out == "-":
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 0


def cmd_peermap(args) -> int:
    """Needs no store: the backend that keeps maps on --dev in this network namespace shows them
    (``Dataplane.inspect`` in the registry)."""
    from .backends import show_node
    try:
        doc, text = show_node(args.dev)
    except LookupError as exc:
        return flags.fail("weftctl", f"peermap: {exc}")
    print(json.dumps(doc, indent=2) if args.json else text)
    return 0


COMMANDS = {"config": cmd_config, "leases": cmd_leases, "reserve": cmd_reserve, "release": cmd_release}


def _needs_existing_store(args) -> bool:
    """Commands that must find an existing store (a typo in --store is not an empty store).
    ``release`` deletes, but from a store that is not there it has nothing to delete."""
    return args.command in ("leases", "release") or (args.command == "config" and args.action == "get")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(flags.normalize(list(argv), flags.long_flags_of(parser)))
        if args.command == "docker-opts":
            return cmd_docker_opts(args)
        if args.command == "peermap":
            return cmd_peermap(args)
        store = flags.open_store_from_args(args, must_exist=_needs_existing_store(args))
        try:
            return COMMANDS[args.command](args, store)
        finally:
            store.close()
    except flags.UsageError as exc:
        return flags.fail("weftctl", str(exc), 2)
    except (ConfigError, StoreError) as exc:
        return flags.fail("weftctl", str(exc), 1)


if __name__ == "__main__":
    sys.exit(main())
