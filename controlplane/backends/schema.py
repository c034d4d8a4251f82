"""The backend parts of the scenario schema (``scenarios/schema.json``), made from the registry.

The network config's ``Backend`` object (Type, Dataplane, Port, each wire format's own keys, MTU)
and a node's ``dataplane`` are generated; the rest of the file is written by hand. After a backend
is added, ``python -m controlplane.backends.schema`` rewrites the file; ``--check`` exits 1 when it
is out of date (tests/test_registry.py runs that check).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import dataplane_names, wires
from .spec import Key

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scenarios", "schema.json")
_JSON_TYPES = {int: "integer", bool: "boolean", str: "string"}


def _key_schema(key: Key, description: str | None = None) -> dict:
    out: dict = {}
    if description:
        out["description"] = description
    out["type"] = _JSON_TYPES[key.kind]
    if key.minimum is not None:
        out["minimum"] = key.minimum
    if key.maximum is not None:
        out["maximum"] = key.maximum
    return out


def backend_schema() -> dict:
    """The ``Backend`` object of the network config."""
    from ..config import MTU, PORT
    props: dict = {"Type": {"enum": list(wires())}, "Dataplane": {"enum": dataplane_names()},
                   "Port": _key_schema(PORT)}
    owners: dict[str, list[str]] = {}
    for wire in wires().values():
        for key in wire.keys:
            owners.setdefault(key.name, []).append(wire.name)
            if key.name not in props:
                props[key.name] = (key, key.description)
    for name, wire_names in owners.items():
        key, description = props[name]
        props[name] = _key_schema(key, f"{', '.join(wire_names)} only: {description}")
    props["MTU"] = _key_schema(MTU)
    return {"type": "object", "properties": props}


def scenario_schema(doc: dict) -> dict:
    """``doc`` (the scenario schema) with its generated parts made from the registry."""
    config = doc["properties"]["network"]["properties"]["config"]
    config["oneOf"][1]["properties"]["Backend"] = backend_schema()
    node = doc["properties"]["nodes"]["patternProperties"]["^[1-9][0-9]*$"]
    node["properties"]["dataplane"]["enum"] = dataplane_names()
    return doc


def dumps(value, indent: int = 0, width: int = 100) -> str:
    """JSON with every object or list that fits in ``width`` columns on one line."""
    text = json.dumps(value, ensure_ascii=False)
    if indent + len(text) <= width or not isinstance(value, (dict, list)) or not value:
        return text
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + dumps(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def generated_text(path: str = SCHEMA_PATH) -> str:
    with open(path) as f:
        return dumps(scenario_schema(json.load(f))) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m controlplane.backends.schema", description=__doc__.split("\n\n")[0])
    p.add_argument("path", nargs="?", default=os.path.normpath(SCHEMA_PATH))
    p.add_argument("--check", action="store_true", help="exit 1 if the file is not what would be written")
    args = p.parse_args(argv)
    text = generated_text(args.path)
    with open(args.path) as f:
        current = f.read()
    if args.check:
        if current != text:
            print(f"{args.path} is out of date with the backend registry: run "
                  "python -m controlplane.backends.schema", file=sys.stderr)
            return 1
        return 0
    if current != text:
        with open(args.path, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
