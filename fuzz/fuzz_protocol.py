"""Coverage-guided fuzzing of the wire parsers with atheris (optional; docs/security.md).

Feeds arbitrary bytes to the parsers that see client input before anything
else: the binary media header, the JSON control message parser and the
credential check (API tokens, session tickets: forged ones, and arbitrary
payloads signed with the right key to reach the claim checks). Any exception
other than the protocol's own `BadRequest` / `Unauthorized`, or a forged
ticket that passes, is a finding.

    pip install atheris          # a wheel exists for CPython 3.11 on x86-64 Linux
    python fuzz/fuzz_protocol.py -runs=200000             # or -max_total_time=600
    python fuzz/fuzz_protocol.py fuzz/corpus -max_total_time=3600   # keep a corpus
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports():
    from agent.auth import Authenticator, mint_ticket
    from agent.errors import BadRequest, Unauthorized
    from agent.protocol import HEADER_SIZE, parse_client_message, unpack_media

SECRET = b"fuzz-secret-0123456789abcdef0123456789"
NOW = 1_800_000_000.0
AUTH = Authenticator(["fuzz-token-0123456789"], SECRET, ticket_max_ttl_s=3600)
GOOD_TICKET = mint_ticket(SECRET, "fuzzer", "default", now=NOW, ttl_s=60)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 4)
    rest = fdp.ConsumeBytes(fdp.remaining_bytes())
    if target == 0:
        try:
            header, payload = unpack_media(rest)
        except BadRequest:
            return
        assert len(payload) == len(rest) - HEADER_SIZE
        assert header.pack()[4:] == rest[4:HEADER_SIZE]
    elif target == 1:
        try:
            parse_client_message(rest)
        except BadRequest:
            return
    elif target == 2:
        try:
            AUTH.authenticate(rest.decode("utf-8", "surrogatepass"), NOW)
        except (Unauthorized, UnicodeDecodeError):
            return
    elif target == 3:
        # Any payload, correctly signed: the claim checks behind the signature.
        body = base64.urlsafe_b64encode(rest).rstrip(b"=")
        sig = base64.urlsafe_b64encode(hmac.new(SECRET, body, hashlib.sha256).digest())
        try:
            principal = AUTH.authenticate((body + b"." + sig.rstrip(b"=")).decode(), NOW)
        except Unauthorized:
            return
        assert principal.kind == "ticket" and principal.expires_at is not None
        assert NOW < principal.expires_at <= NOW + 3600
    else:
        # Mutations of a valid ticket: only the untouched one may pass.
        text = GOOD_TICKET[: len(rest) % (len(GOOD_TICKET) + 1)]
        text += rest.decode("latin-1")
        try:
            principal = AUTH.authenticate(text, NOW)
        except Unauthorized:
            return
        assert text == GOOD_TICKET, text
        assert principal.id == "ticket:fuzzer"


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
