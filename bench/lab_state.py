"""A lab's state document (``<lab dir>/state.json``): what ``bench up`` prints, ``bench inspect``
lists and ``Lab.attach`` rebuilds a Lab from (the ledger says what to remove; this says what it is).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from .errors import LabError
from .ledger import STATE, _write_json
from .scenario import to_dict


def state_doc(lab) -> dict:
    """The state of a Lab that is up: names, store, every node and pod, and its scenario."""
    return {
        "id": lab.id, "prefix": lab.prefix, "dir": lab.dir, "name": lab.scenario.name,
        "scenario_path": lab.scenario.path, "scenario": to_dict(lab.scenario),
        "daemon": lab.daemon, "wire": lab.wire, "store": lab.store,
        "underlay": str(lab.scenario.underlay), "backend": lab.scenario.network.backend.name,
        "nodes": [asdict(n) for n in lab.nodes], "pods": [asdict(p) for p in lab.pods],
    }


def save_state(directory: str, state: dict) -> None:
    _write_json(os.path.join(directory, STATE), state)


def read_state(directory: str) -> dict:
    try:
        with open(os.path.join(directory, STATE)) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise LabError(f"{directory}: no usable {STATE} ({exc})") from None
