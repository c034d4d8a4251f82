"""weft-cni: flannel's CNI meta-plugin (flannel-io/cni-plugin), for container runtimes.

Installed as ``flannel`` in a runtime's CNI bin directory it takes the conflists users deploy
unchanged. It reads ``subnet.env`` (written by weftd or flanneld), renders the network config of
its delegate (``bridge`` by default, IPAM ``host-local`` over the node's subnet, a route to the
Network, the MTU, masquerading unless the daemon does it; per family in subnet.env, so a
dual-stack one gives both and an IPv6-only one, with no IPv4 line, IPv6 alone), saves that config as
``<dataDir>/<container id>`` (flannel's file, so DEL works after subnet.env is gone and across a
switch between flannel and weft), and runs the delegate found in ``CNI_PATH``.

CNI spec 0.3.1, 0.4.0 and 1.0.0: ADD, DEL, CHECK (0.4.0 and later), VERSION. Errors are the
spec's JSON (cniVersion, code, msg, details) on stdout with exit status 1.

Every pod start pays this process's start-up: standard library only, no pyroute2/etcd/bcc, and
the delegate is started with ``posix_spawn`` rather than through ``subprocess``.
"""
from __future__ import annotations

import json
import os
import sys

SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0")
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"
ABOUT = "CNI plugin weft-cni (flannel's CNI plugin for weft)"

# The spec's well-known error codes (libcni's names); 999 is libcni's "internal".
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT = 4
ERR_IO = 5
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_INTERNAL = 999

# Which CNI_* variables each command needs (libcni's skel): CNI_NETNS is optional on DEL, where
# the namespace may already be gone.
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "VERSION": (),
}
_NAME_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_NAME_REST = _NAME_FIRST | frozenset("_.-")
_SIGPIPE = 13  # Linux's number; the signal module would cost an import on every pod start


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


# -- input ------------------------------------------------------------------------------------------

def _valid_name(text: str) -> bool:
    """libcni's rule for container ids and network names: ``^[a-zA-Z0-9][a-zA-Z0-9_.-]*$``.
    The container id also names a file in dataDir, so this is what keeps it inside."""
    return bool(text) and text[0] in _NAME_FIRST and all(c in _NAME_REST for c in text)


def _check_ifname(name: str) -> None:
    problem = ("is longer than 15 characters" if len(name) > 15 else
               "is . or .." if name in (".", "..") else
               "contains / or : or whitespace" if any(c in "/:" or c.isspace() for c in name) else "")
    if problem:
        raise CNIError(ERR_INVALID_ENVIRONMENT, f"CNI_IFNAME {name!r} {problem}")


def read_env(environ) -> tuple[str, dict[str, str]]:
    command = environ.get("CNI_COMMAND", "")
    if command not in _REQUIRED_ENV:
        if not command:
            raise CNIError(ERR_INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing")
        raise CNIError(ERR_INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}",
                       f"weft-cni implements {', '.join(_REQUIRED_ENV)} (CNI spec "
                       f"{', '.join(SUPPORTED_VERSIONS)})")
    missing = [k for k in _REQUIRED_ENV[command] if not environ.get(k)]
    if missing:
        raise CNIError(ERR_INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
    env = {k: environ.get(k, "") for k in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")}
    if command != "VERSION":
        if not _valid_name(env["CNI_CONTAINERID"]):
            raise CNIError(ERR_INVALID_ENVIRONMENT, "invalid characters in containerID",
                           env["CNI_CONTAINERID"])
        _check_ifname(env["CNI_IFNAME"])
    return command, env


def parse_netconf(data: bytes, command: str) -> dict:
    """The network config on stdin, with its version checked against what this plugin speaks."""
    try:
        conf = json.loads(data)
    except ValueError as e:
        raise CNIError(ERR_DECODING, f"network config on stdin is not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise CNIError(ERR_DECODING, f"network config on stdin is a JSON {type(conf).__name__}, not an object")
    version = conf.get("cniVersion") or "0.1.0"  # libcni: a config without a version is 0.1.0
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f"config is {json.dumps(version)}, plugin supports {json.dumps(list(SUPPORTED_VERSIONS))}")
    if command == "CHECK" and version == "0.3.1":
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK",
                       "CHECK exists from CNI spec 0.4.0 on; the config says 0.3.1")
    name = conf.get("name")
    if not name or not isinstance(name, str):
        raise CNIError(ERR_INVALID_CONFIG, "missing network name")
    if not _valid_name(name):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters found in network name", name)
    for key in ("subnetFile", "dataDir"):
        if key in conf and not (isinstance(conf[key], str) and conf[key]):
            raise CNIError(ERR_INVALID_CONFIG, f"{key} must be a non-empty string, not {json.dumps(conf[key])}")
    for key in ("delegate", "ipam", "runtimeConfig"):
        if conf.get(key) is not None and not isinstance(conf[key], dict):
            raise CNIError(ERR_INVALID_CONFIG, f"{key} must be an object, not {json.dumps(conf[key])}")
    return conf


def read_subnet_env(path: str) -> dict:
    """subnet.env as flannel's plugin reads it: FLANNEL_NETWORK (a comma-separated list in
    flannel's multi-network form), FLANNEL_SUBNET, their IPv6 twins, FLANNEL_MTU, FLANNEL_IPMASQ."""
    import ipaddress  # only ADD reads subnet.env: DEL, CHECK and VERSION do not pay for it
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        # weftd (or flanneld) has not written it yet: transient, the runtime retries.
        raise CNIError(ERR_TRY_AGAIN_LATER, f"{path} does not exist (is weftd running on this node?)",
                       "weftd writes the subnet file once it holds a lease") from None
    except OSError as e:
        raise CNIError(ERR_IO, f"cannot read {path}: {e.strerror}") from None
    env = {"networks": [], "subnet": None, "networks6": [], "subnet6": None, "mtu": None, "ipmasq": None}

    def cidrs(key, value, version):
        try:
            nets = [ipaddress.ip_network(v.strip(), strict=False) for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise CNIError(ERR_INVALID_CONFIG, f"{path}: {key}={value} is not a CIDR list: {e}") from None
        if not nets or any(n.version != version for n in nets):
            raise CNIError(ERR_INVALID_CONFIG, f"{path}: {key}={value} is not an IPv{version} CIDR")
        return nets

    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip(), value.strip().strip('"')
        if key == "FLANNEL_NETWORK":
            env["networks"] = cidrs(key, value, 4)
        elif key == "FLANNEL_IPV6_NETWORK":
            env["networks6"] = cidrs(key, value, 6)
        elif key in ("FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"):
            nets = cidrs(key, value, 4 if key == "FLANNEL_SUBNET" else 6)
            if len(nets) != 1:
                raise CNIError(ERR_INVALID_CONFIG, f"{path}: {key}={value} is not one CIDR")
            env["subnet" if key == "FLANNEL_SUBNET" else "subnet6"] = nets[0]
        elif key == "FLANNEL_MTU":
            if not value.isdigit():
                raise CNIError(ERR_INVALID_CONFIG, f"{path}: FLANNEL_MTU={value} is not a number")
            env["mtu"] = int(value)
        elif key == "FLANNEL_IPMASQ":
            env["ipmasq"] = value == "true"
    missing = []
    if not env["networks"] and not env["networks6"]:
        missing.append("FLANNEL_NETWORK (or FLANNEL_IPV6_NETWORK)")
    if env["subnet"] is None and env["subnet6"] is None:
        missing.append("FLANNEL_SUBNET (or FLANNEL_IPV6_SUBNET)")
    missing += [k for k, f in (("FLANNEL_MTU", "mtu"), ("FLANNEL_IPMASQ", "ipmasq")) if env[f] is None]
    if missing:
        raise CNIError(ERR_INVALID_CONFIG, f"{path} is missing {', '.join(missing)}")
    return env


# -- the delegate's config --------------------------------------------------------------------------

def delegate_conf(conf: dict, subnet_env: dict) -> dict:
    """flannel's rendering (flannel_linux.go doCmdAdd): the delegate's own keys win; it gets the
    network's name and version, ``bridge`` by default, masquerading when the daemon does not do
    it, the daemon's MTU, ``isGateway`` on a bridge, and IPAM over the node's subnet."""
    given = conf.get("delegate") or {}
    if "type" in given and not isinstance(given["type"], str):
        raise CNIError(ERR_INVALID_CONFIG, "'delegate' dictionary, if present, must have (string) 'type' field")
    for key in ("name", "ipam"):
        if key in given:
            raise CNIError(ERR_INVALID_CONFIG,
                           f"'delegate' dictionary must not have '{key}' field, it'll be set by flannel")
    delegate = dict(given)
    delegate["name"] = conf["name"]
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not subnet_env["ipmasq"])
    delegate.setdefault("mtu", subnet_env["mtu"])
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    delegate["cniVersion"] = conf["cniVersion"]
    if conf.get("runtimeConfig") is not None:
        delegate["runtimeConfig"] = conf["runtimeConfig"]

    ipam = dict(conf.get("ipam") or {})
    ipam.setdefault("type", "host-local")
    ipam["ranges"] = [[{"subnet": str(s)}] for s in (subnet_env["subnet"], subnet_env["subnet6"]) if s]
    routes = ipam.get("routes", [])
    if not isinstance(routes, list):
        raise CNIError(ERR_INVALID_CONFIG, f"ipam.routes must be a list, not {json.dumps(routes)}")
    ipam["routes"] = routes + [{"dst": str(n)} for n in subnet_env["networks"] + subnet_env["networks6"]]
    delegate["ipam"] = ipam
    return delegate


# -- dataDir: the rendered config of each container, for DEL and CHECK ------------------------------

def _saved_path(data_dir: str, container_id: str) -> str:
    return os.path.join(data_dir, container_id)


def save_delegate(data_dir: str, container_id: str, data: bytes) -> bytes | None:
    """Write atomically (a crash never leaves half a file for DEL); the previous content or None."""
    try:
        os.makedirs(data_dir, 0o700, exist_ok=True)
    except OSError as e:
        raise CNIError(ERR_IO, f"cannot create dataDir {data_dir}: {e.strerror}") from None
    path = _saved_path(data_dir, container_id)
    previous = load_delegate(data_dir, container_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise CNIError(ERR_IO, f"cannot save the delegate config in {path}: {e.strerror}") from None
    return previous


def load_delegate(data_dir: str, container_id: str) -> bytes | None:
    try:
        with open(_saved_path(data_dir, container_id), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CNIError(ERR_IO, f"cannot read {_saved_path(data_dir, container_id)}: {e.strerror}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- running the delegate ---------------------------------------------------------------------------

def find_plugin(plugin_type: str, cni_path: str) -> str:
    if not _valid_name(plugin_type):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters in the delegate's type", plugin_type)
    dirs = [d for d in cni_path.split(":") if d]
    for d in dirs:
        path = os.path.join(d, plugin_type)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise CNIError(ERR_INVALID_CONFIG, f"failed to find plugin {json.dumps(plugin_type)} in path {dirs}")


def run_delegate(command: str, delegate: dict | bytes, environ) -> bytes:
    """Run the delegate as libcni's invoke does (same environment, CNI_COMMAND set, the config on
    stdin, stderr shared); its stdout on success, its error (code and details kept) otherwise."""
    data = delegate if isinstance(delegate, bytes) else json.dumps(delegate).encode()
    plugin_type = (json.loads(data) if isinstance(delegate, bytes) else delegate).get("type", "")
    path = find_plugin(plugin_type, environ["CNI_PATH"])
    env = dict(environ)
    env["CNI_COMMAND"] = command
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        pid = os.posix_spawn(path, [path], env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1)],
                             setsigdef=(_SIGPIPE,))
    except OSError as e:
        for fd in (in_r, in_w, out_r, out_w):
            os.close(fd)
        raise CNIError(ERR_IO, f"cannot run {path}: {e.strerror}") from None
    os.close(in_r)
    os.close(out_w)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(in_w, view):]
    except BrokenPipeError:
        pass  # it exited without reading all of its config: its status says why
    finally:
        os.close(in_w)
    chunks = []
    while chunk := os.read(out_r, 65536):
        chunks.append(chunk)
    os.close(out_r)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out = b"".join(chunks)
    if status == 0:
        return out
    try:
        err = json.loads(out)
        code, msg = int(err["code"]), str(err["msg"])
    except (ValueError, KeyError, TypeError):
        raise CNIError(ERR_INTERNAL, f"delegate {plugin_type} {command} failed with status {status}",
                       out.decode(errors="replace").strip()) from None
    raise CNIError(code, f"delegate {plugin_type} {command}: {msg}", str(err.get("details") or ""))


# -- the commands -----------------------------------------------------------------------------------

def cmd_add(conf: dict, env: dict, environ) -> bytes:
    subnet_env = read_subnet_env(conf.get("subnetFile", DEFAULT_SUBNET_FILE))
    delegate = delegate_conf(conf, subnet_env)
    data = json.dumps(delegate).encode()
    data_dir = conf.get("dataDir", DEFAULT_DATA_DIR)
    # Saved before the delegate runs: if this process dies half way, DEL can still undo it.
    previous = save_delegate(data_dir, env["CNI_CONTAINERID"], data)
    try:
        return run_delegate("ADD", data, environ)
    except CNIError:
        # A repeated ADD the delegate refused must not change what DEL will undo.
        if previous is not None and previous != data:
            save_delegate(data_dir, env["CNI_CONTAINERID"], previous)
        raise


def _saved_with(conf: dict, saved: bytes) -> dict:
    try:
        delegate = json.loads(saved)
        if not isinstance(delegate, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise CNIError(ERR_DECODING, f"saved delegate config is not a JSON object: {e}") from None
    for key in ("prevResult", "runtimeConfig"):
        if conf.get(key) is not None:
            delegate[key] = conf[key]
    return delegate


def cmd_del(conf: dict, env: dict, environ) -> bytes:
    data_dir = conf.get("dataDir", DEFAULT_DATA_DIR)
    saved = load_delegate(data_dir, env["CNI_CONTAINERID"])
    if saved is None:
        return b""  # never added, or already deleted: the spec wants success
    try:
        delegate = _saved_with(conf, saved)
    except CNIError as e:
        # Nothing can be undone without it; the veth goes with the namespace.
        sys.stderr.write(f"weft-cni: {_saved_path(data_dir, env['CNI_CONTAINERID'])}: {e.msg}; removed\n")
        _remove(_saved_path(data_dir, env["CNI_CONTAINERID"]))
        return b""
    run_delegate("DEL", delegate, environ)
    _remove(_saved_path(data_dir, env["CNI_CONTAINERID"]))
    return b""


def cmd_check(conf: dict, env: dict, environ) -> bytes:
    data_dir = conf.get("dataDir", DEFAULT_DATA_DIR)
    saved = load_delegate(data_dir, env["CNI_CONTAINERID"])
    if saved is None:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"container {env['CNI_CONTAINERID']} was not added",
                       f"no {_saved_path(data_dir, env['CNI_CONTAINERID'])}")
    if not isinstance(conf.get("prevResult"), dict):
        raise CNIError(ERR_INVALID_CONFIG, "CHECK needs prevResult (the result of ADD)")
    delegate = _saved_with(conf, saved)
    delegate["prevResult"] = _routes_via_gateways(delegate["prevResult"])
    run_delegate("CHECK", delegate, environ)
    return b""


def _routes_via_gateways(result: dict) -> dict:
    """The ADD result with each gateway-less route given the gateway ADD actually installed it
    with. IPAM routes carry no gateway (flannel's config) and the bridge plugin installs them via
    the address's gateway, but its CHECK looks them up literally (destination and gateway), so a
    gateway-less route never matches and CHECK would fail on every healthy pod."""
    gateways = {}
    for ip in result.get("ips") or []:
        if isinstance(ip, dict) and ip.get("gateway"):
            gateways.setdefault(":" in ip["gateway"], ip["gateway"])
    routes = []
    for route in result.get("routes") or []:
        if isinstance(route, dict) and not route.get("gw") and isinstance(route.get("dst"), str):
            gateway = gateways.get(":" in route["dst"])
            if gateway:
                route = dict(route, gw=gateway)
        routes.append(route)
    if "routes" in result:
        result = dict(result, routes=routes)
    return result


def cmd_version() -> bytes:
    return json.dumps({"cniVersion": SUPPORTED_VERSIONS[-1],
                       "supportedVersions": list(SUPPORTED_VERSIONS)}).encode()


def run(environ, stdin: bytes) -> bytes:
    command, env = read_env(environ)
    if command == "VERSION":
        return cmd_version()
    conf = parse_netconf(stdin, command)
    return {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}[command](conf, env, environ)


def _error_version(stdin: bytes) -> str:
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return SUPPORTED_VERSIONS[-1]
    return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


def main() -> int:
    stdin = b""
    try:
        if os.environ.get("CNI_COMMAND", "VERSION") != "VERSION":
            try:
                stdin = sys.stdin.buffer.read()
            except OSError as e:
                raise CNIError(ERR_IO, f"error reading from stdin: {e}") from None
        out = run(os.environ, stdin)
    except Exception as e:  # noqa: BLE001 - the runtime reads errors as JSON only, even a bug's
        error = e if isinstance(e, CNIError) else CNIError(
            ERR_INTERNAL, " ".join(f"weft-cni failed: {type(e).__name__}: {e}".split()))
        if not os.environ.get("CNI_COMMAND"):
            sys.stderr.write(f"{ABOUT}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n")
        err = {"cniVersion": _error_version(stdin), "code": error.code, "msg": error.msg, "details": error.details}
        sys.stdout.write(json.dumps(err) + "\n")
        return 1
    sys.stdout.buffer.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
