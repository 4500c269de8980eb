"""`make demo`: the whole BYOK flow on local services, as a custodian and an operator run it.

Starts Azurite and the Managed HSM emulator (free loopback ports), creates and downloads a KEK,
packages an RSA, an EC and an AES key with the offline packager, uploads them, runs the local
runner, prints the status table, proves each imported key works, then stops everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run(args: list[str], env: dict[str, str], *, capture: bool = False) -> str:
    shown = " ".join(shlex.quote(a) for a in args)
    print(f"$ {shown}" + ("   # JSON output read by the demo" if capture else ""), flush=True)
    proc = subprocess.run(args, env=env, text=True, capture_output=capture, check=False)
    if capture:
        sys.stdout.write(proc.stderr)
    if proc.returncode != 0:
        if capture:
            sys.stdout.write(proc.stdout)
        raise SystemExit(f"demo: command failed with exit code {proc.returncode}: {shown}")
    return proc.stdout if capture else ""


def load_env(path: Path) -> dict[str, str]:
    env = dict(os.environ)
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def prove(env: dict[str, str], out: Path, names: list[str]) -> None:
    """Use each imported key in the HSM and check the result against the manifest, locally."""
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import (
        CryptographyClient,
        EncryptionAlgorithm,
        SignatureAlgorithm,
    )
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    from managed_hsm_emulator import EmulatorCredential

    cred = EmulatorCredential(env["BYOK_HSM_EMULATOR_DIR"])
    kw: dict[str, Any] = {
        "verify_challenge_resource": False,
        "connection_verify": env["BYOK_HSM_CA_BUNDLE"],
    }
    client = KeyClient(env["BYOK_HSM_URL"], cred, **kw)
    message = b"BYOK demo: this key came from the custodian's HSM"
    for name in names:
        manifest = json.loads((out / f"{name}.manifest.json").read_text())
        target = manifest["target"]
        key = client.get_key(name)
        crypto = CryptographyClient(key, cred, **kw)
        if target["kty"] == "oct-HSM":
            size = target["key_size"]
            alg = getattr(EncryptionAlgorithm, f"a{size}_cbc")
            block = crypto.encrypt(alg, bytes(16), iv=bytes(16)).ciphertext
            kcv = block[:3].hex().upper()
            ok = kcv == target["fingerprint"]["value"]
            print(f"  {name}: AES check value from the HSM {kcv}, manifest {target['fingerprint']['value']}: "
                  f"{'MATCH' if ok else 'MISMATCH'}")  # fmt: skip
        else:
            public = serialization.load_pem_public_key(target["public_key_pem"].encode())
            digest = hashlib.sha256(message).digest()
            if isinstance(public, rsa.RSAPublicKey):
                sig = crypto.sign(SignatureAlgorithm.rs256, digest).signature
                public.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
            else:
                if not isinstance(public, ec.EllipticCurvePublicKey):
                    raise SystemExit(f"demo: {name}: unexpected public key type")
                alg = {"P-256": SignatureAlgorithm.es256, "P-384": SignatureAlgorithm.es384,
                       "P-521": SignatureAlgorithm.es512}[target["crv"]]  # fmt: skip
                hash_alg = {
                    "P-256": hashes.SHA256(),
                    "P-384": hashes.SHA384(),
                    "P-521": hashes.SHA512(),
                }[target["crv"]]
                h = hashes.Hash(hash_alg)
                h.update(message)
                sig = crypto.sign(alg, h.finalize()).signature
                half = len(sig) // 2
                der = encode_dss_signature(
                    int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big")
                )
                public.verify(der, message, ec.ECDSA(hash_alg))
            ok = True
            print(
                f"  {name}: signature made in the HSM verifies with the manifest's public key: OK"
            )
        if not ok:
            raise SystemExit(f"demo: {name} does not match its manifest")


def main() -> int:
    work = REPO / ".demo"  # kept after the run for a look (git-ignored); cleared at each start
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    stack_dir = work / "stack"
    offline = work / "offline"  # stands in for the air-gapped machine's working folder
    offline.mkdir()
    byok = [str(BIN / "byok")]
    pkg = [str(BIN / "byok-package")]
    env = dict(os.environ)
    try:
        banner("Start the local stack: Azurite (blob storage) and the Managed HSM emulator")
        run([*byok, "dev", "up", "--dir", str(stack_dir)], env)
        env = load_env(stack_dir / "env")

        banner("Step 1 (connected side): create an import-only KEK in the HSM and download it")
        created = json.loads(
            run(
                [
                    *byok,
                    "kek",
                    "create",
                    "--name",
                    "demo-kek",
                    "--size",
                    "3072",
                    "--expires-days",
                    "7",
                    "--json",
                ],
                env,
                capture=True,
            )
        )
        print(f"  KEK kid: {created['kid']}")
        info = json.loads(
            run(
                [
                    *byok,
                    "kek",
                    "download",
                    "--kid",
                    created["kid"],
                    "--out",
                    str(offline / "kek.pem"),
                    "--json",
                ],
                env,
                capture=True,
            )
        )
        print(f"  KEK SPKI SHA-256 (read it aloud at the ceremony): {info['spki_sha256']}")

        banner("Step 2 (offline machine): wrap target keys under the KEK with the packager")
        kek_args = [
            "--kek",
            str(offline / "kek.pem"),
            "--kek-kid",
            created["kid"],
            "--kek-sha256",
            info["spki_sha256"],
        ]
        # an existing EC key held by the custodian (made here with OpenSSL for the demo)
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384",
             "-out", str(offline / "signing-ec.pem")], env)  # fmt: skip
        run([*pkg, "wrap", *kek_args, "--key", str(offline / "signing-ec.pem"), "--key-ops", "sign,verify",
             "--out", str(offline / "signing-ec.byok")], env)  # fmt: skip
        (offline / "signing-ec.pem").unlink()  # the plaintext never leaves the offline machine
        run(
            [
                *pkg,
                "wrap",
                *kek_args,
                "--generate",
                "rsa-3072",
                "--out",
                str(offline / "payments-rsa.byok"),
            ],
            env,
        )
        run([*pkg, "wrap", *kek_args, "--generate", "oct-256", "--key-ops", "encrypt,decrypt",
             "--out", str(offline / "data-aes.byok")], env)  # fmt: skip
        names = ["payments-rsa", "signing-ec", "data-aes"]
        for name in names:
            run(
                [*pkg, "inspect", str(offline / f"{name}.byok"), "--kek", str(offline / "kek.pem")],
                env,
            )

        banner("Step 3 (connected side): drop the packages into the incoming container")
        for name in names:
            run([*byok, "upload", str(offline / f"{name}.byok")], env)

        banner("Step 4: the pipeline validates, imports, verifies (local runner = Event Grid)")
        run([*byok, "watch", "--once", "--workers", "2"], env)
        run([*byok, "status"], env)
        statuses = json.loads(run([*byok, "status", "--json"], env, capture=True))
        bad = [
            s["blob_name"]
            for s in statuses
            if s["state"] != "imported" or s["fingerprint_result"] != "match"
        ]
        if bad:
            raise SystemExit(f"demo: not imported and verified: {bad}")

        banner("Prove each imported key works")
        prove(env, offline, names)

        banner("Check the tamper-evident audit trail and export one key's history for the auditor")
        run([*byok, "audit", "verify"], env)
        run([*byok, "audit", "export", "--key", "payments-rsa", "--format", "csv"], env)
        print("\nDemo complete: 3 keys imported exactly once, verified against their manifests.")
        events = (stack_dir / "audit.jsonl").read_text().splitlines()
        print(
            f"Audit events: {len(events)} in {stack_dir / 'audit.jsonl'}; packages and manifests in {offline}"
        )
        return 0
    finally:
        banner("Stop everything the demo started")
        subprocess.run([*byok, "dev", "down", "--dir", str(stack_dir)], check=False)


if __name__ == "__main__":
    sys.exit(main())
