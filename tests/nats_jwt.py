"""NATS decentralised auth for the tests: operator, account and user NKeys, JWTs signed by hand, .creds files.

What `nsc` does, in a few lines (so the tests need no `nsc` binary): a JWT is
`base64url(header).base64url(claims).base64url(signature)`, unpadded; the header is
`{"typ":"JWT","alg":"ed25519-nkey"}`; the signature is the issuer's Ed25519 signature
over the first two parts; `jti` is the unpadded base32 of a SHA-512/256 hash of the
claims without `jti` (the nats-io/jwt v2 library's choice). The operator signs itself and
the accounts; an account signs its users.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass

import nkeys

HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass
class Identity:
    seed: bytes  # secret
    public: str

    @classmethod
    def new(cls, prefix: int) -> Identity:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed, nkeys.from_seed(bytearray(seed)).public_key.decode())

    def sign_jwt(self, subject: str, name: str, nats: dict) -> str:
        claims = {"iat": int(time.time()), "iss": self.public, "name": name, "sub": subject, "nats": nats}
        body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
        claims["jti"] = base64.b32encode(hashlib.new("sha512_256", body).digest()).decode().rstrip("=")
        signing_input = f"{_b64(json.dumps(HEADER, separators=(',', ':')).encode())}." \
                        f"{_b64(json.dumps(claims, separators=(',', ':')).encode())}"
        signature = nkeys.from_seed(bytearray(self.seed)).sign(signing_input.encode())
        return f"{signing_input}.{_b64(signature)}"


def operator() -> Identity:
    return Identity.new(nkeys.PREFIX_BYTE_OPERATOR)


def account() -> Identity:
    return Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)


def user() -> Identity:
    return Identity.new(nkeys.PREFIX_BYTE_USER)


def operator_jwt(op: Identity, name: str = "test-operator", system_account: str | None = None) -> str:
    nats = {"type": "operator", "version": 2}
    if system_account:
        nats["system_account"] = system_account
    return op.sign_jwt(op.public, name, nats)


def account_jwt(op: Identity, acc: Identity, name: str, jetstream: bool = False) -> str:
    limits = {**UNLIMITED, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
    if jetstream:
        limits.update({"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1})
    return op.sign_jwt(acc.public, name, {"type": "account", "version": 2, "limits": limits,
                                          "default_permissions": {"pub": {}, "sub": {}}})


def user_jwt(acc: Identity, usr: Identity, name: str, pub: dict | None = None, sub: dict | None = None) -> str:
    return acc.sign_jwt(usr.public, name, {"type": "user", "version": 2, **UNLIMITED,
                                           "pub": pub or {}, "sub": sub or {}})


def creds(jwt: str, seed: bytes) -> str:
    """A .creds file as `nsc generate creds` writes it."""
    return (f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n\n"
            "*************************************************************\n")


def server_config(op: Identity, accounts: dict[str, str], system_account: str | None = None) -> str:
    """nats-server config for operator mode with the in-memory resolver, accounts preloaded."""
    preload = "\n".join(f"  {public}: \"{jwt}\"" for public, jwt in accounts.items())
    lines = [f'operator: "{operator_jwt(op, system_account=system_account)}"']
    if system_account:
        lines.append(f"system_account: {system_account}")
    lines += ["resolver: MEMORY", f"resolver_preload: {{\n{preload}\n}}"]
    return "\n".join(lines) + "\n"
