"""docs/transparent.md's recipes, copied step by step, give exactly the rules
the conf/transparent/ scripts give (which the lab tests prove work), and each
script's ``down`` removes what its ``up`` added."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import SCRIPTS
from .lab import Netns, host

DOC = Path(__file__).resolve().parents[2] / "docs" / "transparent.md"
RECIPES = re.findall(r"<!-- same as: (\S+) (\S+) -->\n```sh\n(.*?)```", DOC.read_text(), re.S)


def _netns_with_eth0() -> Netns:
    ns = Netns("doc")
    host("ip", "link", "add", "eth0", "netns", ns.name,
         "type", "veth", "peer", "name", "eth1", "netns", ns.name)
    ns.run("ip", "link", "set", "eth0", "up")
    return ns


def _state(ns: Netns) -> dict[str, str]:
    ruleset = "\n".join(
        line for line in ns.run("nft", "list", "ruleset").splitlines() if not line.startswith("# Warning")
    )
    return {
        "ruleset": ruleset,
        "rules": ns.run("ip", "rule", "show"),
        "routes": "\n".join(
            line for line in ns.run("ip", "route", "show", "table", "all").splitlines()
            if re.search(r"\btable 10[07]\b", line)
        ),
    }


def test_every_recipe_is_checked() -> None:
    assert sorted((script, tool) for script, tool, _ in RECIPES) == sorted(
        (f"{name}.sh", tool)
        for name in ("sidecar-redirect", "gateway-tproxy", "gateway-redirect")
        for tool in ("iptables", "nftables")
    )


@pytest.mark.parametrize(("script", "tool", "recipe"), RECIPES, ids=[f"{s}-{t}" for s, t, _ in RECIPES])
def test_recipe_matches_script(kernel_support, script: str, tool: str, recipe: str) -> None:
    by_hand, by_script = _netns_with_eth0(), _netns_with_eth0()
    try:
        empty = _state(by_script)
        by_hand.run("sh", "-ec", recipe)
        by_script.run("sh", str(SCRIPTS / script), tool, "up")
        applied = _state(by_script)
        assert applied["ruleset"] and "fwmark" in applied["rules"]
        assert "local default dev lo" in applied["routes"]
        assert _state(by_hand) == applied
        by_script.run("sh", str(SCRIPTS / script), tool, "down")
        removed = _state(by_script)
        assert (removed["rules"], removed["routes"]) == (empty["rules"], empty["routes"])
        # (iptables-nft leaves its built-in chains behind, empty.)
        assert "tlsproxy" not in removed["ruleset"].lower()
        rules = [line for line in removed["ruleset"].splitlines() if line.startswith("\t\t")]
        assert all("hook" in line for line in rules)
    finally:
        by_hand.delete()
        by_script.delete()
