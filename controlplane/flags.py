"""flanneld-style command lines: ``-flag value``, ``-flag=value``, ``--flag`` all mean the same,
every flag can come from ``FLANNELD_<UPPER_SNAKE>`` in the environment (flanneld's rule), and a
bool flag takes ``-ip-masq``, ``-ip-masq=true`` or ``-ip-masq=false`` as Go's flag package does.
"""
from __future__ import annotations

import argparse
import os
import sys

from .store import DEFAULT_ETCD_ENDPOINTS, DEFAULT_PREFIX, DEFAULT_SQLITE_URL, EtcdOptions, open_store

_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"0", "f", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


class UsageError(Exception):
    """A bad flag or flag value; one line."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


def normalize(argv: list[str], long_flags: set[str]) -> list[str]:
    """Turn Go-style single-dash long flags (``-etcd-prefix``) into ``--etcd-prefix``."""
    out = []
    for arg in argv:
        if arg == "--":
            out.append(arg)
            continue
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name = arg[1:].split("=", 1)[0]
            if name in long_flags:
                arg = "-" + arg
        out.append(arg)
    return out


def env_name(flag: str) -> str:
    return "FLANNELD_" + flag.upper().replace("-", "_")


def add_flag(parser: argparse.ArgumentParser, name: str, *, kind=str, default=None, help=""):
    """A flag whose default comes from FLANNELD_<NAME> when set."""
    env = os.environ.get(env_name(name))
    if kind is bool:
        value = default if env is None else _env_bool(name, env)
        parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, default=value,
                            help=f"{help} (env {env_name(name)})")
        return
    if env is not None:
        try:
            default = kind(env)
        except ValueError:
            raise UsageError(f"{env_name(name)}={env!r}: not a valid {kind.__name__}") from None
    parser.add_argument(f"--{name}", type=kind, default=default, help=f"{help} (env {env_name(name)})")


def _env_bool(name: str, text: str) -> bool:
    try:
        return parse_bool(text)
    except argparse.ArgumentTypeError:
        raise UsageError(f"{env_name(name)}={text!r}: not a boolean (true or false)") from None


def add_store_flags(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "store", help=f"store URL: sqlite:///PATH (default {DEFAULT_SQLITE_URL} unless "
             "etcd flags are given), etcd, or etcd://HOST:PORT[,...]")
    add_flag(parser, "etcd-endpoints", help="comma-separated etcd endpoints")
    add_flag(parser, "etcd-prefix", default=DEFAULT_PREFIX, help="key prefix of the network")
    for f in ("etcd-cafile", "etcd-certfile", "etcd-keyfile", "etcd-username", "etcd-password"):
        add_flag(parser, f, default="", help=f.replace("etcd-", "etcd "))


def long_flags_of(parser: argparse.ArgumentParser) -> set[str]:
    names = set()
    for action in parser._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                names.add(opt[2:])
    return names


def store_url(args) -> str:
    """The store the flags name: --store wins; any etcd flag means etcd; else the embedded default."""
    if args.store:
        return args.store
    etcd_given = args.etcd_endpoints or args.etcd_cafile or args.etcd_certfile or args.etcd_username
    return "etcd" if etcd_given else DEFAULT_SQLITE_URL


def describe_store(args) -> str:
    """The store for people: its URL, or etcd's endpoints."""
    url = store_url(args)
    if url == "etcd":
        return args.etcd_endpoints or ",".join(DEFAULT_ETCD_ENDPOINTS)
    return url


def open_store_from_args(args, must_exist: bool = False):
    """The store the flags name (``store_url``).

    A SQLite file is never created when it ``must_exist`` (commands with nothing to do on an empty
    store: a typo in --store is an error, not "no leases"); others create it only in a directory
    that exists, except at the default path, whose directory (/var/lib/weft) may be created."""
    opts = EtcdOptions(
        endpoints=[e.strip() for e in (args.etcd_endpoints or ",".join(DEFAULT_ETCD_ENDPOINTS)).split(",")
                   if e.strip()],
        cafile=args.etcd_cafile, certfile=args.etcd_certfile, keyfile=args.etcd_keyfile,
        username=args.etcd_username, password=args.etcd_password)
    url = store_url(args)
    create = "never" if must_exist else "parents" if url == DEFAULT_SQLITE_URL else "file"
    return open_store(url, prefix=args.etcd_prefix, etcd=opts, create=create)


def fail(prog: str, message: str, code: int = 1) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code
