"""`make demo`: the whole BYOK flow on local services, as a custodian and an operator run it.

Starts Azurite and the Managed HSM emulator (free loopback ports), creates and downloads a KEK,
packages an RSA, an EC and an AES key with the offline packager, sets an import policy under
which the RSA key needs 2 of 3 signed approvals (dual control), uploads them, runs the local
runner (the RSA key waits until its second approval arrives), shows that packages for protected
names are refused, prints the status table, proves each imported key works, then stops
everything.
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


def run_refused(args: list[str], env: dict[str, str]) -> None:
    """Run a command that must be refused (exit 2); show its one-line reason."""
    print(f"$ {shlex.join(args)}   # must be refused", flush=True)
    proc = subprocess.run(args, env=env, text=True, capture_output=True, check=False)
    sys.stdout.write(proc.stderr)
    if proc.returncode != 2:
        raise SystemExit(f"demo: expected a refusal (exit 2), got {proc.returncode}")


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


APPROVERS = ("alice", "bob", "carol")


def write_policy(offline: Path, env: dict[str, str]) -> Path:
    """Each approver makes a signing key on their own offline machine (here: one folder) and
    hands the administrator the public half; the administrator writes the policy."""
    members = []
    for who in APPROVERS:
        key = offline / f"{who}.key.pem"
        run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(key)], env)  # fmt: skip
        pub = subprocess.run(
            ["openssl", "pkey", "-in", str(key), "-pubout"],  # openssl from PATH
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        members.append({"id": who, "public_key_pem": pub})
    policy = {
        "policy_version": 1,
        "description": "demo: payments keys need 2 of 3 custodians; other demo keys import freely",
        "approval_deadline_hours": 24,
        "approver_groups": {"custodians": {"approvers": members}},
        "rules": [
            {"name": "payments-rsa", "target_types": ["rsa-3072", "rsa-4096"],
             "approvals": {"group": "custodians", "required": 2}},
            {"name": "signing-ec", "target_types": ["ec-p384"]},
            {"name": "data-aes", "target_types": ["oct-256"]},
        ],
    }  # fmt: skip
    path = offline / "import-policy.json"
    path.write_text(json.dumps(policy, indent=2) + "\n")
    return path


def approve(pkg: list[str], offline: Path, name: str, who: str, env: dict[str, str]) -> Path:
    out = offline / f"{name}.approval-{who}.json"
    run([*pkg, "approve", str(offline / f"{name}.manifest.json"), "--approver-id", who,
         "--signer-key", str(offline / f"{who}.key.pem"), "--valid-days", "2", "--out", str(out)],
        env)  # fmt: skip
    return out


def dual_control(
    byok: list[str], pkg: list[str], offline: Path, names: list[str], env: dict[str, str]
) -> None:
    """The administrator sets the import policy; alice approves payments-rsa offline; the
    packages are dropped; payments-rsa waits until carol's approval arrives."""
    banner("Dual control: the administrator sets an import policy (2 of 3 for payments-rsa)")
    policy = write_policy(offline, env)
    run([*byok, "policy", "validate", str(policy)], env)
    run([*byok, "policy", "set", str(policy), "--actor", "admin@demo"], env)
    run([*byok, "policy", "show"], env)

    banner("Offline: alice reads what she approves, then signs (one approval of two needed)")
    approve(pkg, offline, "payments-rsa", "alice", env)
    run([*pkg, "inspect", str(offline / "payments-rsa.byok"), "--kek", str(offline / "kek.pem")],
        env)  # fmt: skip

    banner("Step 3 (connected side): drop the packages (with their manifests and approvals)")
    for name in names:
        run([*byok, "upload", str(offline / f"{name}.byok")], env)

    banner("Step 4: the pipeline validates, authorizes, imports, verifies (local runner)")
    run([*byok, "watch", "--once", "--workers", "2"], env)
    run([*byok, "status", "payments-rsa"], env)
    waiting = json.loads(run([*byok, "status", "payments-rsa", "--json"], env, capture=True))
    if waiting["state"] != "awaiting_approval" or waiting["approvals"]["missing"] != 1:
        raise SystemExit("demo: payments-rsa should wait for its second approval")

    banner("The second approval (carol) arrives later: the waiting package completes")
    run([*byok, "approve", "upload", str(approve(pkg, offline, "payments-rsa", "carol", env))],
        env)  # fmt: skip
    run([*byok, "watch", "--once"], env)
    run([*byok, "status", "payments-rsa"], env)


def protected_names(
    byok: list[str], pkg: list[str], kek_args: list[str], offline: Path, env: dict[str, str]
) -> list[dict[str, Any]]:
    """An insider wraps keys of their own under the public KEK and drops them under protected
    names: `byok upload` refuses each (the gate), and when the insider skips the gate
    (--force-offline: the HSM is not asked), the pipeline refuses them all the same: none is
    imported. Returns every status document."""
    banner("Protected names: packages an insider wraps under the public KEK and drops")
    rogue = offline / "rogue"  # keys of the insider's own, wrapped under the public KEK
    rogue.mkdir()
    for name, key_type in (
        ("payments-rsa", "rsa-3072"),
        ("signing-ec", "ec-p384"),
        ("demo-kek", "oct-256"),
        ("backdoor", "oct-256"),
    ):
        run(
            [
                *pkg,
                "wrap",
                *kek_args,
                "--generate",
                key_type,
                "--out",
                str(rogue / f"{name}.byok"),
            ],
            env,
        )
        run_refused([*byok, "upload", str(rogue / f"{name}.byok")], env)
        run([*byok, "upload", str(rogue / f"{name}.byok"), "--force-offline"], env)
    run([*byok, "watch", "--once"], env)
    run([*byok, "status"], env)
    statuses: list[dict[str, Any]] = json.loads(run([*byok, "status", "--json"], env, capture=True))
    outcome = {(s["blob_name"], s["state"], s["reason_code"]) for s in statuses}
    expected = {
        ("payments-rsa.byok", "imported", None),
        ("signing-ec.byok", "imported", None),
        ("data-aes.byok", "imported", None),
        # no approvals: it waits (0 of 2) and is never imported; rejected at the deadline
        ("payments-rsa.byok", "awaiting_approval", None),
        # the key exists and the policy does not allow a new version of it
        ("signing-ec.byok", "rejected", "existing_key_protected"),
        # the KEK's own name, and a name no rule of the policy allows
        ("demo-kek.byok", "rejected", "key_name_not_allowed"),
        ("backdoor.byok", "rejected", "key_name_not_allowed"),
    }
    if outcome != expected:
        raise SystemExit(f"demo: unexpected outcomes {sorted(outcome, key=str)}")
    return statuses


def verify_attestation(
    pkg: list[str], offline: Path, kid: str, test_root: Path, env: dict[str, str]
) -> None:
    """The custodian checks the KEK's attestation offline: the pinned Marvell roots alone
    refuse the emulator's (signed by its TEST root); naming the TEST root accepts it."""
    check = [*pkg, "verify-kek-attestation", str(offline / "kek.attestation.json"),
             "--kek", str(offline / "kek.pem"), "--kek-kid", kid]  # fmt: skip
    print("$ " + shlex.join(check) + "   # pinned Marvell roots only: must refuse the emulator")
    refused = subprocess.run(check, env=env, text=True, capture_output=True, check=False)
    print(refused.stderr, end="")
    if refused.returncode != 2 or "attestation_chain_invalid" not in refused.stderr:
        raise SystemExit("demo: the emulator's attestation passed without its TEST root")
    run([*check, "--trust-test-root", str(test_root)], env)


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
                    "--attestation",
                    str(offline / "kek.attestation.json"),
                    "--json",
                ],
                env,
                capture=True,
            )
        )
        print(f"  KEK SPKI SHA-256 (read it aloud at the ceremony): {info['spki_sha256']}")
        print(f"  KEK attestation saved, SHA-256 {info['attestation_sha256']}")
        # the emulator signs attestations under a TEST root of its own, never a Marvell root
        test_root = stack_dir / "hsm" / "attestation-test-root.pem"

        banner("Step 2 (offline machine): verify the KEK's attestation, then wrap target keys")
        verify_attestation(pkg, offline, created["kid"], test_root, env)
        kek_args = [
            "--kek",
            str(offline / "kek.pem"),
            "--kek-kid",
            created["kid"],
            "--kek-sha256",
            info["spki_sha256"],
            "--kek-attestation",
            str(offline / "kek.attestation.json"),
            "--trust-test-root",
            str(test_root),
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

        dual_control(byok, pkg, offline, names, env)
        statuses = protected_names(byok, pkg, kek_args, offline, env)
        if any(s["fingerprint_result"] != "match" for s in statuses if s["state"] == "imported"):
            raise SystemExit("demo: an imported key does not match its manifest")

        banner("Prove each imported key works")
        prove(env, offline, names)

        banner("Check the tamper-evident audit trail and export one key's history for the auditor")
        run([*byok, "audit", "verify"], env)
        run([*byok, "audit", "export", "--key", "payments-rsa", "--format", "csv"], env)
        print(
            "\nDemo complete: 3 keys imported exactly once, verified against their manifests; "
            "payments-rsa with 2 of 3 signed approvals; 3 packages for protected names refused, "
            "1 waiting for approvals it will never get."
        )
        events = (stack_dir / "audit.jsonl").read_text().splitlines()
        print(
            f"Audit events: {len(events)} in {stack_dir / 'audit.jsonl'}; packages and manifests in {offline}"
        )
        return 0
    finally:
        banner("Stop everything the demo started")
        subprocess.run([*byok, "dev", "down", "--dir", str(stack_dir)], check=False)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the finally above has stopped the stack
        print("demo: interrupted (Ctrl-C); the local stack is stopped", file=sys.stderr)
        sys.exit(130)
