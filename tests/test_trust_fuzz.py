"""Property tests: random and mutated signatures, armor, certificates and allowed_signers
lines never make the parsers raise anything but TrustError, and never verify."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import sshsig
from agent.errors import TrustError
from agent.trust import split_commit

PAYLOAD = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor a <a> 1 +0000\n" \
          b"committer a <a> 1 +0000\n\nmsg\n"


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    d: Path = tmp_path_factory.mktemp("fuzz")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "k")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "ca")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-s", str(d / "ca"), "-I", "c", "-n", "ops",
                    str(d / "k.pub")], check=True)
    (d / "p").write_bytes(PAYLOAD)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", "git", "-f", str(d / "k-cert.pub"),
                    str(d / "p")], check=True)
    armor = (d / "p.sig").read_text()
    blob = sshsig.dearmor(armor)
    signers = sshsig.parse_allowed_signers(
        "ops cert-authority " + " ".join((d / "ca.pub").read_text().split()[:2]) + "\n", "as")
    cert_blob = base64.b64decode((d / "k-cert.pub").read_text().split()[1])
    # sanity: the unmutated material verifies, so a mutation that is refused means something
    assert sshsig.verify(armor, PAYLOAD, signers, 1).principal == "ops"
    return {"armor": armor, "blob": blob, "signers": signers, "cert": cert_blob}


def _armor(blob: bytes) -> str:
    return ("-----BEGIN SSH SIGNATURE-----\n" + base64.b64encode(blob).decode()
            + "\n-----END SSH SIGNATURE-----\n")


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                 max_size=6)
FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(edits=edits)
def test_mutated_signature_blob_never_verifies(material, edits):
    blob = mutate(material["blob"], edits)
    if blob == material["blob"]:
        return
    try:
        sshsig.verify(_armor(blob), PAYLOAD, material["signers"], 1)
    except TrustError:
        return
    pytest.fail("a mutated signature verified")


@FAST
@given(cut=st.integers(0, 2000), extra=st.binary(max_size=40))
def test_truncated_or_extended_blob_never_verifies(material, cut, extra):
    blob = material["blob"][:cut] + extra
    if blob == material["blob"]:
        return
    with pytest.raises(TrustError):
        sshsig.verify(_armor(blob), PAYLOAD, material["signers"], 1)


@FAST
@given(text=st.text(max_size=400))
def test_random_armor_never_verifies(material, text):
    with pytest.raises(TrustError):
        sshsig.verify(text, PAYLOAD, material["signers"], 1)


@FAST
@given(edits=edits)
def test_mutated_certificate_never_parses_as_valid(material, edits):
    blob = mutate(material["cert"], edits)
    if blob == material["cert"]:
        return
    with pytest.raises(TrustError):
        sshsig.parse_public_key(blob)


@FAST
@given(line=st.text(max_size=200))
def test_random_allowed_signers_lines(line):
    try:
        sshsig.parse_allowed_signers(line, "as")
    except TrustError:
        pass


@FAST
@given(raw=st.binary(max_size=600))
def test_random_commit_objects(raw):
    try:
        split_commit(raw, "0" * 40)
    except TrustError:
        pass
