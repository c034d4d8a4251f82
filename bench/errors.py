"""Errors of the lab; str() is always one line."""


class LabError(RuntimeError):
    """A lab that cannot be built, reached or torn down; str() is one line."""


class LabNotFound(LabError):
    """No lab with that id or directory (for down: already removed)."""


def refuse_ipv6_only(scenario, tool: str, does: str) -> None:
    """A LabError naming the scenario when ``tool`` (which ``does`` something IPv4 only) is handed
    an IPv6-only scenario (EnableIPv4 false): refused before anything is built."""
    if getattr(scenario, "ipv6_only", False):
        raise LabError(f"{scenario.path}: {tool}: {does}; the network is IPv6-only (EnableIPv4 false)")
