"""Argument parsing and human/JSON output for every verb.

Owns: the CLI contract of DESIGN.md (verbs, --config, --json, exit codes: 0 ok,
1 failed/not trusted, 2 bad usage or config) and turning AgentError into one clear
line on stderr, never a traceback.
Must not: do any verb's work itself. The imports of the other modules are inside the
verbs on purpose: `status` over the socket must not pay for pygit2, Jinja2 or the
trust code, so each verb loads only what it uses (the exception to "imports at the
top" in this package, with sshsig's cryptography, isolate's pickle and cycle's render,
which a no-op cycle never needs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from .errors import AgentError, TrustError, UsageError

DEFAULT_CONFIG = "/etc/gitops-agent/agent.yaml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with one line, like the contract says
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=os.environ.get("GITOPS_AGENT_CONFIG", DEFAULT_CONFIG),
                        help="agent.yaml (default %(default)s)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    p = _Parser(prog="gitops-agent", description="Pull-based GitOps agent for hosts.")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    a = sub.add_parser("apply", parents=[common], help="run one full cycle in the foreground")
    a.add_argument("--dry-run", action="store_true", help="plan only, change nothing")
    a.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another cycle's lock instead of failing")
    sub.add_parser("plan", parents=[common], help="what a cycle would change now")
    r = sub.add_parser("render", parents=[common], help="desired state of one host, offline")
    r.add_argument("--repo", required=True)
    r.add_argument("--rev", default="HEAD")
    r.add_argument("--host", required=True)
    r.add_argument("--label", action="append", default=[], metavar="K=V")
    h = sub.add_parser("history", parents=[common], help="past cycles, newest last")
    h.add_argument("-n", type=int, default=20, help="how many (0 = all)")
    v = sub.add_parser("verify", parents=[common], help="trust verdict of one commit")
    v.add_argument("--repo", required=True)
    v.add_argument("--rev", required=True)
    v.add_argument("--allowed-signers")
    v.add_argument("--gpg-keyring")
    v.add_argument("--revoked-keys")
    sub.add_parser("check", parents=[common],
                   help="run the health checks of the revision on the host now (exit 0/1)")
    q = sub.add_parser("quarantine", parents=[common],
                       help="commits whose health checks failed here; `clear COMMIT`")
    q.add_argument("action", nargs="?", choices=["clear"])
    q.add_argument("commit", nargs="?", help="a quarantined commit (a prefix will do)")
    sub.add_parser("run", parents=[common], help="the daemon (systemd ExecStart)")
    sub.add_parser("status", parents=[common], help="the running agent's status")
    s = sub.add_parser("sync", parents=[common], help="ask the daemon for a cycle now")
    s.add_argument("--wait", action="store_true", help="wait for the cycle's result")
    pa = sub.add_parser("pause", parents=[common], help="stop converging (persisted)")
    pa.add_argument("--reason", default="")
    sub.add_parser("resume", parents=[common], help="converge again after pause")
    ident = argparse.ArgumentParser(add_help=False)
    ident.add_argument("--identity", help="the host's age identity file (default: "
                                          "secrets.identity of agent.yaml)")
    kg = sub.add_parser("keygen", parents=[common, ident],
                        help="create this host's age identity; print its recipient")
    kg.add_argument("--force", action="store_true",
                    help="replace an existing identity (its secrets no longer open)")
    sub.add_parser("recipient", parents=[common, ident],
                   help="print this host's age recipient (for encrypting its secrets)")
    se = sub.add_parser("secrets", parents=[common], help="operators' side of secrets")
    ses = se.add_subparsers(dest="secrets_verb", required=True, parser_class=_Parser)
    sr = ses.add_parser("recipients", parents=[common],
                        help="the secrets one host needs, and who they are encrypted to")
    sr.add_argument("--repo", required=True)
    sr.add_argument("--rev", default="HEAD")
    sr.add_argument("--host", required=True)
    sr.add_argument("--label", action="append", default=[], metavar="K=V")
    sc = ses.add_parser("check", parents=[common],
                        help="which secrets are not encrypted to every host that uses them "
                             "(fleet.yaml recipients:); exit 1 when one certainly is not")
    sc.add_argument("--repo", required=True)
    sc.add_argument("--rev", default="HEAD")
    ap = sub.add_parser("approve", parents=[common],
                        help="sign an approval of a commit (ssh-keygen -Y sign) and store it "
                             "as refs/approvals/<commit>/<key>")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--key", required=True, help="your ssh private key (or FIDO key handle)")
    ap.add_argument("--branch", help="the branch hosts follow (default: the repo's HEAD)")
    ap.add_argument("--push", metavar="REMOTE", help="push the approval ref there")
    al = sub.add_parser("approvals", parents=[common],
                        help="who approved a commit, checked against an approvers file")
    al.add_argument("--repo", required=True)
    al.add_argument("--rev", default="HEAD")
    al.add_argument("--approvers", required=True, help="allowed_signers format")
    al.add_argument("--threshold", type=int, default=1)
    al.add_argument("--branch", help="the branch hosts follow (default: the repo's HEAD)")
    pn = sub.add_parser("pin", parents=[common],
                        help="break glass: converge this trusted commit of the branch instead "
                             "of the tip until unpin (root only)")
    pn.add_argument("rev")
    pn.add_argument("--reason", required=True)
    sub.add_parser("unpin", parents=[common], help="follow the branch tip again")
    f = sub.add_parser("fleet", parents=[common], help="fleet views")
    fs = f.add_subparsers(dest="fleet_verb", required=True, parser_class=_Parser)
    rb = fs.add_parser("rollback", parents=[common],
                       help="go back to REV's tree with a new commit on the branch (a signed "
                            "roll-forward, ready to push)")
    rb.add_argument("--repo", required=True)
    rb.add_argument("--to", required=True, metavar="REV")
    rb.add_argument("--branch", help="default: the branch HEAD names")
    rb.add_argument("--sign", action="store_true",
                    help="sign it with your git signing key (user.signingkey, gpg.format)")
    rb.add_argument("-m", "--message", default="", help="why")
    rb.add_argument("--dry-run", action="store_true",
                    help="make no commit; show which hosts' plans would change")
    rb.add_argument("--reports", help="also render the hosts of this report drop (with "
                                      "the labels their reports carry)")
    rb.add_argument("--label", action="append", default=[], metavar="K=V",
                    help="labels for hosts without a report (dry run)")
    st = fs.add_parser("status", parents=[common], help="aggregate the fleet's reports")
    st.add_argument("--reports", required=True)
    st.add_argument("--repo")
    st.add_argument("--branch", default="main")
    st.add_argument("--stale", default="15m", help="a report older than this is stale")
    st.add_argument("--html", metavar="FILE", help="also write the rollout as one "
                                                    "self-contained HTML page")
    return p


def _setup_logging(verbose: bool) -> None:
    from .logs import setup

    setup(logging.DEBUG if verbose else logging.INFO)


def _print(data: Any, as_json: bool, human: str) -> None:
    if as_json:
        json.dump(data, sys.stdout, indent=1, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human)


def socket_path(config_path: str) -> str:
    """Where the daemon listens. The client verbs must reach the daemon exactly when
    agent.yaml is broken (status shows the error), so an invalid file is read leniently:
    its `socket:` if that much can be found, else the default."""
    from .config import Config, ConfigError, load_file

    try:
        return load_file(config_path).socket
    except ConfigError:
        pass
    import re

    try:
        with open(config_path, "rb") as f:
            text = f.read(1 << 20).decode(errors="replace")
    except OSError:
        return Config().socket
    # a top-level `socket: PATH` line, whatever else in the file is broken
    m = re.search(r"""^socket:[ \t]*["']?([^"'#\s]+)["']?[ \t]*(?:#.*)?$""", text, re.M)
    if m is None:
        return Config().socket
    sock = m.group(1)
    return sock if os.path.isabs(sock) else os.path.join(
        os.path.dirname(os.path.abspath(config_path)), sock)


def _config(args: argparse.Namespace) -> Any:
    from .config import load_file

    return load_file(args.config)


# --- verbs -----------------------------------------------------------------------------


def cmd_apply(args: argparse.Namespace, plan_only: bool = False) -> int:
    from .cycle import run_cycle

    cfg = _config(args)
    dry = plan_only or getattr(args, "dry_run", False)
    result, _plan = run_cycle(cfg, dry_run=dry, lock_wait=getattr(args, "wait", 0.0),
                              keep_render=True)
    _print(result.to_json(), args.json, _human_cycle(result, dry))
    if not dry and (cfg.report.sftp is not None or cfg.report.metrics_textfile):
        from .report import send_now, status_json

        send_now(cfg, status_json(cfg, result), result)
    if dry:
        return 1 if result.errors or result.failed else 0
    return 0 if result.state in ("converged", "offline", "waiting", "halted",
                                 "rebooting", "awaiting-approval", "pinned") else 1


def _check_line(c: dict[str, Any]) -> str:
    """One check result: its mark, name and the last line of its output."""
    mark = "ok  " if c["ok"] else ("FAIL" if c["required"] else "warn")
    last = c["output"].splitlines()[-1] if c.get("output") else ""
    return f"{mark} {c['name']}: {last}"


def _human_cycle(result: Any, dry: bool) -> str:
    out = []
    for w in result.warnings:
        out.append(f"WARNING: {w}\n")
    if result.offline:
        out.append(f"offline: every source URL failed: {result.offline_reason}\n")
    if result.rejected:
        out.append(f"rejected: {result.rejected}\n")
    trial = getattr(result, "trial", None)
    for c in result.changes:
        if not (c.changed or c.failed):
            continue
        verb = "FAILED" if c.failed else ("would " + c.action if dry else c.action)
        if c.action == "rollback":
            verb = "ROLLBACK FAILED" if c.failed else "rolled back"
        out.append(f"{verb} {c.id}: {c.msg}\n")
        if c.diff:
            out.append("".join(f"    {line}\n" for line in c.diff.rstrip("\n").split("\n")))
    if trial:
        for ch in trial.get("checks", []):
            out.append(f"check {_check_line(ch)}\n")
        out.append(f"trial {'passed' if trial['ok'] else 'FAILED'} after "
                   f"{trial['seconds']:.1f}s\n")
    for e in result.errors:
        out.append(f"error: {e}\n")
    if getattr(result, "quarantined", "") and not result.errors:
        out.append(f"held: {result.rolled_back}\n")
    if getattr(result, "waiting", ""):
        out.append(f"waiting: {result.waiting}\n")
    commit = (result.commit or "-")[:12]
    if dry:
        n = sum(1 for c in result.changes if c.changed)
        out.append(f"plan @{commit}: {n} to change, {result.failed} failing\n")
    else:
        took = result.finished - result.started
        out.append(f"{result.state} @{commit}: {result.changed} changed, {result.failed} failed "
                   f"({took:.2f}s{', no drift' if result.fast_path else ''})\n")
    return "".join(out)


def cmd_render(args: argparse.Namespace) -> int:
    from .config import LimitsConfig
    from .render import offline
    from .source import open_repo

    labels = _labels(args.label, "render")
    repo = open_repo(args.repo)
    commit = repo.resolve(args.rev)
    desired = offline(repo.tree(commit, LimitsConfig()), args.host, labels)
    data = desired.to_json()
    lines = [f"host {desired.host} @{commit[:12]}: roles {', '.join(desired.roles) or '-'}\n"]
    for res in desired.resources:
        lines.append(f"{res.identity}  ({res.origin})\n")
        spec = {k: v for k, v in res.spec.items() if v is not None}
        if spec:
            lines.append(f"    {json.dumps(spec, sort_keys=True)}\n")
        if res.error:
            lines.append(f"    HELD: {res.error}\n")
        if res.secrets:
            lines.append(f"    (secret content from {', '.join(res.secrets)}: not shown)\n")
        elif res.content is not None:
            try:
                text = res.content.decode()
                lines.append("".join(f"    | {line}\n" for line in text.splitlines()))
            except UnicodeDecodeError:
                lines.append(f"    ({len(res.content)} bytes of binary content)\n")
    _print(data, args.json, "".join(lines))
    return 0


def _labels(pairs: list[str], verb: str) -> dict[str, str]:
    labels = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise UsageError(f"{verb}: --label takes K=V, got {kv!r}")
        labels[k] = v
    return labels


def _identity_path(args: argparse.Namespace) -> str:
    """--identity, else secrets.identity of agent.yaml when there is one, else default."""
    from .config import ConfigError, SecretsConfig, load_file

    if args.identity:
        return str(args.identity)
    try:
        return load_file(args.config).secrets.identity
    except ConfigError:
        if os.path.exists(args.config):
            raise
        return SecretsConfig().identity


def cmd_keygen(args: argparse.Namespace) -> int:
    from .secrets import keygen

    path = _identity_path(args)
    recipient = keygen(path, force=args.force)
    _print({"identity": path, "recipient": recipient}, args.json, f"{recipient}\n")
    print(f"gitops-agent: wrote {path} (0600); encrypt this host's secrets to the "
          f"recipient above", file=sys.stderr)
    return 0


def cmd_recipient(args: argparse.Namespace) -> int:
    from .secrets import Keyring

    path = _identity_path(args)
    keyring = Keyring(path)
    _print({"identity": path, "recipient": keyring.recipient}, args.json,
           f"{keyring.recipient}\n")
    return 0


def cmd_secrets(args: argparse.Namespace) -> int:
    from . import secret_audit

    if args.secrets_verb == "recipients":
        needs = secret_audit.needs(args.repo, args.rev, args.host,
                                   _labels(args.label, "secrets recipients"))
        _print(needs, args.json, secret_audit.human_needs(args.host, needs))
        return 0
    report = secret_audit.check(args.repo, args.rev)
    _print(report, args.json, secret_audit.human_check(report))
    return 1 if report["missing"] else 0


def cmd_pin(args: argparse.Namespace) -> int:
    """Write or remove the pin (cycle.pin), then ask a running daemon for a cycle."""
    from .control import request
    from .cycle import pin, unpin

    if os.geteuid() != 0:
        raise UsageError(f"{args.verb}: root only (it changes what this host converges)")
    cfg = _config(args)
    if args.verb == "unpin":
        message = unpin(cfg)
    else:
        by = os.environ.get("SUDO_USER") or os.environ.get("USER") or f"uid {os.getuid()}"
        message = pin(cfg, args.rev, args.reason, by)
    try:
        request(cfg.socket, {"verb": "sync", "wait": False}, 10)
        message += "; the daemon is running a cycle now"
    except (AgentError, OSError):
        message += "; the next cycle (or `gitops-agent apply`) takes it"
    _print({"message": message}, args.json, message + "\n")
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    from .approvals import approve

    out = approve(args.repo, args.rev, args.key, args.branch, args.push)
    human = (f"approved {out['commit'][:12]} (tree {out['tree'][:12]}) on {out['branch']} "
             f"with {out['key']}: {out['ref']}"
             + (f", pushed to {out['pushed']}" if out["pushed"] else "") + "\n")
    _print(out, args.json, human)
    return 0


def cmd_approvals(args: argparse.Namespace) -> int:
    from .approvals import human, show

    data = show(args.repo, args.rev, args.approvers, args.branch, args.threshold)
    _print(data, args.json, human(data))
    return 0 if data["ok"] else 1


def human_history(entries: list[dict]) -> str:
    import time

    lines = []
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.get("started", 0)))
        took = e.get("finished", 0) - e.get("started", 0)
        extra = " offline" if e.get("offline") else ""
        extra += f" rejected: {e['rejected']}" if e.get("rejected") else ""
        lines.append(f"{when}  {(e.get('commit') or '-')[:12]:12}  {e.get('result'):9}  "
                     f"{e.get('changed', 0)} changed {e.get('failed', 0)} failed  "
                     f"{took:.2f}s{extra}\n")
    return "".join(lines) or "no cycles yet\n"


def cmd_history(args: argparse.Namespace) -> int:
    from .state import StateDir

    cfg = _config(args)
    entries = StateDir(cfg.state_dir).history(args.n)
    _print(entries, args.json, human_history(entries))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .source import open_repo
    from .trust import Verdict, Verifier, commit_time

    if not args.allowed_signers and not args.gpg_keyring:
        raise UsageError("verify: give --allowed-signers FILE and/or --gpg-keyring FILE")
    for path in (args.allowed_signers, args.gpg_keyring, args.revoked_keys):
        if path and not os.path.isfile(path):
            raise UsageError(f"verify: {path} does not exist")
    repo = open_repo(args.repo)
    commit = repo.resolve(args.rev)
    try:
        commit_time(repo, commit)  # a commit libgit2 cannot parse is a bad verdict
        v = Verifier(args.allowed_signers, args.gpg_keyring, args.revoked_keys).verify(
            repo.raw_commit(commit), commit)
    except TrustError as e:
        v = Verdict(commit, False, None, None, str(e), e.rule)
    human = (f"good: {commit[:12]} signed by {v.signer} ({v.key})\n" if v.good
             else f"bad: {v.reason}\n")
    _print(v.to_json(), args.json, human)
    return 0 if v.good else 1


def cmd_check(args: argparse.Namespace) -> int:
    """The checks recorded with the revision on the host (last good), run once now."""
    from . import health
    from .source import Mirror
    from .state import StateDir

    cfg = _config(args)
    state = StateDir(cfg.state_dir)
    st = state.load_state()
    checks = st.get("checks") or []

    def probe() -> str:
        state.lock(wait=300)  # the mirror is the running cycle's while it fetches
        try:
            fetched = Mirror(state.mirror_path, cfg.source).fetch(lambda: False)
        finally:
            state.unlock()
        return "; ".join(fetched.errors) if fetched.offline else ""

    results = health.run_once(checks, health.Runner(fetch=probe))
    ok = all(r.ok or not r.required for r in results)
    lines = [f"{'ok  ' if r.ok else 'FAIL' if r.required else 'warn'} {r.name} ({r.type}): "
             f"{r.output}\n" for r in results]
    commit = (st.get("last_good") or "-")[:12]
    lines.append(f"{len(results)} checks of {commit}: "
                 f"{'healthy' if ok else 'UNHEALTHY'}\n" if results
                 else f"no health checks recorded for {commit}\n")
    _print({"commit": st.get("last_good"), "ok": ok, "checks": [r.to_json() for r in results],
            "degraded": st.get("degraded")}, args.json, "".join(lines))
    return 0 if ok else 1


def cmd_quarantine(args: argparse.Namespace) -> int:
    import time

    from .state import StateDir

    cfg = _config(args)
    state = StateDir(cfg.state_dir)
    items = state.load_quarantine()
    if args.action == "clear":
        if not args.commit or len(args.commit) < 4:
            raise UsageError("quarantine clear: give the commit (at least 4 hex digits)")
        gone = [q for q in items if q["commit"].startswith(args.commit.lower())]
        if not gone:
            raise UsageError(f"quarantine clear: {args.commit} is not quarantined here")
        state.lock(wait=300)  # never under a running cycle's feet
        try:
            left = [q for q in state.load_quarantine() if q not in gone]
            state.save_quarantine(left)
            st = state.load_state()
            if st.get("degraded") and any(q["commit"] == st["degraded"].get("commit")
                                          for q in gone):
                st.pop("degraded", None)
                state.save_state(st)
        finally:
            state.unlock()
        _print({"cleared": [q["commit"] for q in gone]}, args.json,
               "".join(f"cleared {q['commit'][:12]}: the next cycle tries it again\n"
                       for q in gone))
        return 0
    if args.commit:
        raise UsageError("quarantine: a commit is only taken by `quarantine clear COMMIT`")
    lines = []
    for q in items:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(q.get("at", 0)))
        lines.append(f"{q['commit'][:12]}  {when}  check {q.get('check') or '?'}: "
                     f"{str(q.get('output', ''))[-200:]}\n")
    _print(items, args.json, "".join(lines) or "no quarantined commits\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .daemon import main as daemon_main

    return daemon_main(args.config)


def cmd_control(args: argparse.Namespace) -> int:
    return client_verb(socket_path(args.config), args)


def cmd_fleet(args: argparse.Namespace) -> int:
    from .config import parse_duration
    from .fleet import fleet_rows

    if args.fleet_verb == "rollback":
        from .rollforward import human, rollback

        out = rollback(args.repo, args.to, args.branch, args.sign, args.message,
                       args.dry_run, args.reports, _labels(args.label, "fleet rollback"))
        _print(out, args.json, human(out))
        return 0

    try:
        stale = parse_duration(args.stale)
    except ValueError as e:
        from .errors import UsageError

        raise UsageError(f"fleet status: --stale: {e}") from None
    data = fleet_rows(args.reports, stale, args.repo, args.branch)
    bad = bool(data["skipped"]) or any(
        r["stale"] or r["state"] in ("failed", "rejected", "rolled-back", "degraded")
        for r in data["rows"])
    for why in data["skipped"]:
        print(f"warning: fleet status: {why}", file=sys.stderr)
    if args.html:
        from .fleet_html import page
        from .host import write_atomic

        try:
            write_atomic(os.path.abspath(args.html), page(data).encode(), mode=0o644)
        except OSError as e:
            raise UsageError(f"fleet status: --html {args.html}: {e.strerror}") from None
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True, default=str))
        return 1 if bad else 0
    lines = [f"{'HOST':20} {'COMMIT':12} {'STATE':17} {'REPORT AGE':>10}  {'OFFLINE':7} "
             f"{'FAILED':6}" + ("  BEHIND" if data["tip"] else "")]
    for r in data["rows"]:
        age = "-" if r["age"] is None else f"{r['age']:.0f}s" + (" STALE" if r["stale"] else "")
        behind = ""
        if data["tip"]:
            behind = "  ?" if r.get("behind") is None else f"  {r['behind']}"
        lines.append(f"{r['host']:20} {(r['commit'] or '-')[:12]:12} {r['state'] or '-':17} "
                     f"{age:>10}  {'yes' if r['offline'] else 'no':7} {r['failed']:<6}{behind}")
        for why in (r.get("rolled_back"), r.get("waiting"), r.get("pinned")):
            if why:
                lines.append(f"{'':20} {why}")
    lines.append("")
    waves = [w for w in data.get("waves", []) if w["wave"] != "-"]
    if waves:
        lines.append(f"{'WAVE':12} {'HOSTS':>5} {'APPLIED':>7} {'FAILED':>6} {'WAITING':>7}  "
                     f"OPENS")
        for w in waves:
            opens = (time.strftime("%Y-%m-%d %H:%M", time.localtime(w["opens_at"]))
                     if w["opens_at"] else "open")
            lines.append(f"{w['wave']:12} {w['hosts']:>5} {w['applied']:>7} {w['failed']:>6} "
                         f"{w['waiting']:>7}  {opens}")
        lines.append("")
    for commit, s in data["rollout"].items():
        lines.append(f"{commit[:7]}: {s['converged']}/{s['hosts']} hosts converged, "
                     f"{s['failed']} failed, {s.get('rolled_back', 0)} rolled back, "
                     f"{s.get('degraded', 0)} degraded, {s['stale']} stale")
    print("\n".join(lines))
    return 1 if bad else 0


# --- the verbs that talk to a running daemon -------------------------------------------


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    d = time.time() - ts
    if d < 0:
        return f"in {-d:.0f}s"
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else \
        f"{d / 3600:.1f}h ago"


def human_status(s: dict) -> str:
    lc = s.get("last_cycle") or {}
    lines = [
        f"host:        {s.get('host')}",
        f"state:       {s.get('state')}" + (f" ({s['paused']['reason']})"
                                            if s.get("paused") else ""),
        f"applied:     {(s.get('applied_commit') or '-')[:12]}  signed by "
        f"{s.get('signer') or '-'}",
        f"last good:   {(s.get('last_good') or '-')[:12]}",
        f"fetched tip: {(s.get('fetched_tip') or '-')[:12]}",
        f"last cycle:  {lc.get('state', '-')}, {lc.get('changed', 0)} changed, "
        f"{lc.get('failed', 0)} failed, finished {_age(lc.get('finished'))}",
        f"next cycle:  {_age(s.get('next_cycle_at'))}",
        f"drift fixed: {s.get('drift_corrections', 0)}",
    ]
    if s.get("offline_since"):
        lines.append(f"offline:     since {_age(s['offline_since'])}: {s.get('offline_reason')}")
    if s.get("rejected"):
        lines.append(f"rejected:    {s['rejected']}")
    if s.get("pinned"):
        lines.append(f"PINNED:      {s['pinned']} (`gitops-agent unpin` to follow the tip)")
    if lc.get("waiting"):
        lines.append(f"waiting:     {lc['waiting']}")
    if s.get("rolled_back"):
        lines.append(f"rolled back: {s['rolled_back']}")
    if s.get("degraded"):
        d = s["degraded"]
        lines.append(f"DEGRADED:    since {_age(d.get('since'))}: check {d.get('check')} still "
                     f"fails after the rollback of {str(d.get('commit'))[:12]}: "
                     f"{d.get('output')}")
    for c in s.get("checks") or []:
        lines.append(f"check:       {_check_line(c)}")
    for q in s.get("quarantine") or []:
        lines.append(f"quarantined: {str(q.get('commit'))[:12]} (check {q.get('check')})")
    if s.get("recovered"):
        lines.append(f"recovered:   an interrupted apply of {s['recovered'][:12]} was rolled "
                     f"back on start")
    for e in lc.get("errors") or []:
        lines.append(f"error:       {e}")
    if s.get("config_error"):
        lines.append(f"config:      {s['config_error']} (running with the previous config)")
    for w in s.get("warnings") or []:
        lines.append(f"warning:     {w}")
    lines.append(f"version:     {s.get('version')}")
    return "\n".join(lines) + "\n"


def client_verb(socket_path: str, args: Any) -> int:
    verb = args.verb
    req: dict[str, Any] = {"verb": verb}
    timeout = 30.0
    if verb == "sync":
        req["wait"] = args.wait
        timeout = 3600.0 if args.wait else 30.0
    if verb == "pause":
        req["reason"] = args.reason
    if verb == "plan":
        timeout = 600.0
    from .control import request

    result = request(socket_path, req, timeout)
    if verb == "status":
        _print(result, args.json, human_status(result))
        return 0 if result.get("state") not in ("failed", "rejected", "rolled-back",
                                                "degraded") else 1
    if verb in ("sync", "plan") and isinstance(result, dict) and "changes" in result:
        from .cycle import CycleResult
        from .model import Change

        cr = CycleResult(started=result.get("started", 0))
        for k in ("finished", "state", "commit", "offline", "offline_reason", "rejected",
                  "warnings", "errors", "fast_path", "trial", "rolled_back", "quarantined"):
            setattr(cr, k, result.get(k, getattr(cr, k)))
        cr.changes = [Change(c["id"], c["changed"], c["failed"], c["msg"], c.get("diff", ""),
                             c["action"]) for c in result["changes"]]
        _print(result, args.json, _human_cycle(cr, verb == "plan"))
        return 0 if cr.state in ("converged", "offline", "planned") and not cr.failed else 1
    if verb == "history":
        _print(result, args.json, human_history(result))
        return 0
    _print(result, args.json, f"{result.get('message', 'ok')}\n")
    return 0


# the verbs done in this process; every other verb talks to the daemon (cmd_control)
_VERBS: dict[str, Any] = {
    "apply": cmd_apply, "plan": lambda args: cmd_apply(args, plan_only=True),
    "render": cmd_render, "history": cmd_history, "verify": cmd_verify, "run": cmd_run,
    "check": cmd_check, "quarantine": cmd_quarantine, "fleet": cmd_fleet,
    "keygen": cmd_keygen, "recipient": cmd_recipient, "secrets": cmd_secrets,
    "approve": cmd_approve, "approvals": cmd_approvals, "pin": cmd_pin, "unpin": cmd_pin,
}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _setup_logging(args.verbose)
        return _VERBS.get(args.verb, cmd_control)(args)
    except AgentError as e:
        print(f"gitops-agent: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
