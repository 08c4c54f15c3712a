"""The operators' side of secrets, without any key: which secrets a host needs, and
which secrets are not encrypted to every host that uses them (for CI).

Owns: `gitops-agent secrets recipients` and `gitops-agent secrets check`. Hosts are
rendered with placeholders for every secret (render.py with no identity), so the
secrets each host reads are known without decrypting anything.
Must not: decrypt. What cannot be told from the ciphertext is said as such: an age
X25519 stanza names no recipient, so "encrypted to age1..." cannot be checked for it;
an ssh-ed25519/ssh-rsa stanza carries a 4-byte tag of the key; a sops file lists its
age recipients in its metadata.
"""

from __future__ import annotations

from typing import Any

from .errors import AgentError, RenderError, TreeError
from .render import offline
from .secrets import (
    check_recipients,
    describe,
    is_sops,
    sops_recipients,
    sops_type,
    ssh_tag,
    stanzas,
)

LABELS_CAVEAT = ("groups chosen by labels are not evaluated here (labels live in each "
                 "host's agent.yaml); a secret used only through such a group is not seen")


def _used(desired: Any) -> dict[str, list[str]]:
    """secret path -> the resources that read it."""
    out: dict[str, list[str]] = {}
    for res in desired.resources:
        for path in res.secrets:
            out.setdefault(path, []).append(res.identity)
    return out


def carries(tree: Any, path: str) -> dict[str, Any]:
    """What an encrypted file says about its recipients."""
    try:
        blob = tree.read(path)
    except TreeError as e:
        return {"format": "?", "error": str(e)}
    if is_sops(path, None):
        try:
            return {"format": "sops", "recipients": sops_recipients(blob, sops_type(path))}
        except ValueError as e:
            return {"format": "sops", "error": str(e)}
    try:
        found = stanzas(blob)
    except ValueError as e:
        return {"format": "age", "error": str(e)}
    return {"format": "age", "stanzas": [{"type": k, "tag": t} for k, t in found],
            "summary": describe(found)}


def verdict(info: dict[str, Any], recipients: list[str]) -> tuple[str, str]:
    """ok | missing | unknown, and why, for a file and one host's recipients."""
    if "error" in info:
        return "missing", f"cannot be read: {info['error']}"
    results = [_one(info, r) for r in recipients]
    for wanted in ("ok", "unknown"):
        hit = [why for v, why in results if v == wanted]
        if hit:
            return wanted, hit[0]
    return "missing", "; ".join(why for _, why in results)


def _one(info: dict[str, Any], recipient: str) -> tuple[str, str]:
    short = recipient if not recipient.startswith("ssh-") else \
        f"{recipient.split()[0]} tagged {ssh_tag(recipient)}"
    if info["format"] == "sops":
        listed = [r.strip() for r in info["recipients"]]
        if recipient.strip() in listed or " ".join(recipient.split()[:2]) in [
                " ".join(r.split()[:2]) for r in listed]:
            return "ok", f"its sops metadata lists {short}"
        return "missing", f"its sops metadata does not list {short}"
    kinds = info["stanzas"]
    if recipient.startswith("ssh-"):
        kind, tag = recipient.split()[0], ssh_tag(recipient)
        if any(s["type"] == kind and s["tag"] == tag for s in kinds):
            return "ok", f"it has a {kind} stanza tagged {tag}"
        return "missing", f"no {kind} stanza tagged {tag} (it carries {info['summary']})"
    if not any(s["type"] == "X25519" for s in kinds):
        return "missing", f"no X25519 stanza at all, so not {short} (it carries " \
                          f"{info['summary']})"
    return "unknown", (f"it has X25519 stanzas, which name no recipient: whether one is "
                       f"for {short[:16]}… cannot be told without the host's key")


def needs(repo_path: str, rev: str, host: str, labels: dict[str, str]) -> dict[str, Any]:
    from .config import LimitsConfig
    from .source import open_repo

    repo = open_repo(repo_path)
    commit = repo.resolve(rev)
    tree = repo.tree(commit, LimitsConfig())
    desired = offline(tree, host, labels)
    return {"host": host, "commit": commit,
            "secrets": [{"path": path, "used_by": ids, **carries(tree, path)}
                        for path, ids in sorted(_used(desired).items())]}


def check(repo_path: str, rev: str) -> dict[str, Any]:
    from .config import LimitsConfig
    from .source import open_repo
    from .yamlsrc import YamlError, load

    repo = open_repo(repo_path)
    commit = repo.resolve(rev)
    tree = repo.tree(commit, LimitsConfig())
    try:
        fleet = load(tree.read("fleet.yaml"), "fleet.yaml")
        recipients = check_recipients(fleet) if fleet is not None else {}
    except (YamlError, TreeError) as e:
        raise RenderError(f"secrets check: fleet.yaml: {e}") from None
    except ValueError as e:
        raise RenderError(f"secrets check: {e}") from None
    hosts = set(recipients)
    for name in tree.listdir("hosts"):
        if name.endswith(".yaml") and tree.is_file(f"hosts/{name}"):
            hosts.add(name[:-len(".yaml")])
    results, failed = [], []
    cache: dict[str, dict[str, Any]] = {}
    for host in sorted(hosts):
        try:
            used = _used(offline(tree, host, {}))
        except AgentError as e:
            failed.append({"host": host, "error": str(e)})
            continue
        for path, ids in sorted(used.items()):
            info = cache.setdefault(path, carries(tree, path))
            if host not in recipients:
                v, why = "unknown", f"fleet.yaml recipients lists no recipient for {host}"
            else:
                v, why = verdict(info, recipients[host])
            results.append({"host": host, "path": path, "verdict": v, "why": why,
                            "used_by": ids})
    return {"commit": commit, "hosts": sorted(hosts), "results": results,
            "missing": sum(r["verdict"] == "missing" for r in results),
            "unknown": sum(r["verdict"] == "unknown" for r in results),
            "not_rendered": failed, "caveat": LABELS_CAVEAT}


def human_needs(host: str, data: dict[str, Any]) -> str:
    if not data["secrets"]:
        return f"{host} @{data['commit'][:12]} reads no secrets\n"
    lines = [f"{host} @{data['commit'][:12]} reads {len(data['secrets'])} secrets:\n"]
    for s in data["secrets"]:
        if "error" in s:
            what = f"cannot be read: {s['error']}"
        elif s["format"] == "sops":
            what = "sops, recipients: " + (", ".join(s["recipients"]) or "none")
        else:
            what = f"age, {s['summary']}"
        lines.append(f"  {s['path']}  ({what})\n    used by {', '.join(s['used_by'])}\n")
    return "".join(lines)


def human_check(report: dict[str, Any]) -> str:
    lines = []
    for r in report["results"]:
        mark = {"ok": "ok     ", "missing": "MISSING", "unknown": "unknown"}[r["verdict"]]
        lines.append(f"{mark} {r['host']}: {r['path']}: {r['why']}\n")
    for f in report["not_rendered"]:
        lines.append(f"skipped {f['host']}: it does not render: {f['error']}\n")
    lines.append(f"{len(report['results'])} secret uses on {len(report['hosts'])} hosts: "
                 f"{report['missing']} certainly not encrypted to their host, "
                 f"{report['unknown']} that cannot be told from the ciphertext\n")
    lines.append(f"note: {report['caveat']}\n")
    return "".join(lines)
