"""Infrastructure as code: the Bicep parses, scans clean and keeps its security properties.

pycep-parser and checkov live in their own virtualenv (.venv-infra, made by `make infra-deps`);
`make test` passes its interpreter in BYOK_INFRA_PYTHON. These tests run that interpreter by
subprocess: pycep_dump.py (next to this file) turns each .bicep file into a JSON model, and the
checks below run over the model here. Each check returns a list of findings, so the same code
is shown to pass on infra/ and to fail on copies of infra/ weakened one property at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from byok_pipeline.adapters.telemetry import SPAN_ATTRIBUTES, SPAN_NAME
from byok_pipeline.core.metrics import METRICS, OTHER_REASON, PACKAGES, REASON_CODE, STATE
from byok_pipeline.core.reasons import REASONS
from byok_pipeline.core.status import STATES

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA_DIR = REPO_ROOT / "infra"
PYCEP_DUMP = Path(__file__).resolve().with_name("pycep_dump.py")
AUDIT_SCHEMA = REPO_ROOT / "byok_pipeline" / "schemas" / "audit-event.schema.json"
CHECKOV_SKIPS = INFRA_DIR / "checkov-skips.json"
WORKBOOK = INFRA_DIR / "workbook.json"
QUERY_DIR = INFRA_DIR / "queries"
ROLE_SCRIPT = INFRA_DIR / "assign-hsm-roles.sh"
PARAMETERS_EXAMPLE = INFRA_DIR / "main.parameters.example.json"
README = INFRA_DIR / "README.md"

# Fixed by the pipeline (its settings) and by the lead: the names the Bicep must produce.
EXPECTED_CONTAINERS = {
    "incoming": "byok-incoming",
    "status": "byok-status",
    "archive": "byok-archive",
    "quarantine": "byok-quarantine",
    "audit": "byok-audit",
    "auditPeople": "byok-audit-people",
    "config": "byok-config",
    "approvals": "byok-approvals",
    "deadletter": "byok-deadletter",
}
EXPECTED_CONTAINER_SETTINGS = {
    "BYOK_INCOMING_CONTAINER": "byok-incoming",
    "BYOK_STATUS_CONTAINER": "byok-status",
    "BYOK_ARCHIVE_CONTAINER": "byok-archive",
    "BYOK_QUARANTINE_CONTAINER": "byok-quarantine",
    "BYOK_AUDIT_CONTAINER": "byok-audit",
    "BYOK_CONFIG_CONTAINER": "byok-config",
    "BYOK_APPROVALS_CONTAINER": "byok-approvals",
}
# Import authorization: the policy blob in the config container, and its default name.
EXPECTED_AUTHORIZATION_SETTINGS = {"BYOK_POLICY_BLOB": "import-policy.json"}
REQUIRED_APP_SETTINGS = {
    "BYOK_HSM_URL",
    "BYOK_KEK_KID",
    "BYOK_STORAGE__blobServiceUri",
    "BYOK_STORAGE__queueServiceUri",
    "BYOK_STORAGE__credential",
    "BYOK_STORAGE__clientId",
    "AzureWebJobsStorage__blobServiceUri",
    "AzureWebJobsStorage__queueServiceUri",
    "AzureWebJobsStorage__credential",
    "AzureWebJobsStorage__clientId",
    "AZURE_CLIENT_ID",
    "BYOK_MAX_PACKAGE_BYTES",
    "BYOK_MAX_ATTEMPTS",
    "BYOK_HSM_IMPORTS_PER_SECOND",
    "AzureFunctionsJobHost__extensions__blobs__maxDegreeOfParallelism",
    "BYOK_ALLOWED_KEK_NAMES",
    "BYOK_ALLOWED_TARGET_TYPES",
    "BYOK_RECONCILE_SCHEDULE",
    "BYOK_AUDIT_SIGNING_KID",
    "APPLICATIONINSIGHTS_CONNECTION_STRING",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    *EXPECTED_CONTAINER_SETTINGS,
    *EXPECTED_AUTHORIZATION_SETTINGS,
}
# A bare connection name means a connection string; these carry account keys or SAS tokens.
FORBIDDEN_SETTING_NAMES = {
    "AzureWebJobsStorage",
    "BYOK_STORAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "WEBSITE_RUN_FROM_PACKAGE",
    "DEPLOYMENT_STORAGE_CONNECTION_STRING",
}
SECRET_MARKERS = (
    "accountkey",
    "sharedaccesssignature",
    "defaultendpointsprotocol",
    "listkeys",
    "listaccountsas",
    "listservicesas",
    "sig=",
)
GEO_REDUNDANT_SKUS = {"Standard_GRS", "Standard_GZRS", "Standard_RAGRS", "Standard_RAGZRS"}

# Built-in Azure role definition ids.
ROLE_BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
ROLE_BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
ROLE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
ROLE_MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
ROLE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
# The template's own data-only role for people who write blobs (roles.bicep `blobWriterRole`).
# A custom role has no fixed id: the checks name it `custom:<Bicep symbol>`.
ROLE_BLOB_WRITER = "custom:blobWriterRole"
ALLOWED_ROLES = {
    ROLE_BLOB_DATA_CONTRIBUTOR,
    ROLE_BLOB_DATA_READER,
    ROLE_QUEUE_DATA_CONTRIBUTOR,
    ROLE_MONITORING_METRICS_PUBLISHER,
    ROLE_BLOB_WRITER,
}
FORBIDDEN_ROLES = {
    "8e3af657-a8ff-443c-a75c-2fe8c4bcb635": "Owner",
    "b24988ac-6180-42a0-ab88-20f7382dd24c": "Contributor",
    "18d7d88d-d35e-4fb5-a5c3-7773c20a72c9": "User Access Administrator",
    "f58310d9-a9f6-439a-9e8d-f62e7b41a168": "Role Based Access Control Administrator",
    ROLE_BLOB_DATA_OWNER: "Storage Blob Data Owner",
    "17d1049b-9a84-46fb-8f53-869881c3d3ab": "Storage Account Contributor (can list keys)",
    "81a9662b-bebf-436f-a333-f67b29880f12": "Storage Account Key Operator Service Role",
}
GUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
IDENTIFIER_RE = re.compile(r"[A-Za-z_]\w*")
INTERPOLATION_RE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")
# In KQL: event names ("byok.imported") and audit fields (Properties.reason_code).
EVENT_RE = re.compile(r"\bbyok(?:\.[a-z0-9_]+)+")
PROPERTY_RE = re.compile(r"\bProperties(?:\.([A-Za-z_]\w*)|\[\s*[\"']([^\"']+)[\"']\s*\])")
KQL_COMMENT_RE = re.compile(r"//[^\n]*")
WORKBOOK_WORKSPACE_PLACEHOLDER = "__WORKSPACE_ID__"
BICEP_COMMENT_LINE_RE = re.compile(r"(?m)^\s*//.*$")

# The audit events that end a package's processing: "waiting" means received without one.
FINAL_EVENTS = {
    "byok.imported",
    "byok.rejected",
    "byok.failed",
    "byok.verification_failed",
    "byok.duplicate",
}

Findings = list[str]


# --------------------------------------------------------------------------- infra interpreter


def _infra_python() -> Path:
    configured = os.environ.get("BYOK_INFRA_PYTHON")
    python = Path(configured) if configured else REPO_ROOT / ".venv-infra" / "bin" / "python"
    if not python.exists():
        pytest.fail(
            f"infrastructure interpreter {python} not found: run `make infra-deps` "
            "(or set BYOK_INFRA_PYTHON to a Python with checkov and pycep-parser)"
        )
    return python


@pytest.fixture(scope="module")
def infra_python() -> Path:
    return _infra_python()


def parse_bicep(python: Path, files: list[Path]) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse files with pycep in the infra interpreter: (models by path, errors by path)."""
    proc = subprocess.run(
        [str(python), str(PYCEP_DUMP), *(str(f) for f in files)],
        capture_output=True,
        text=True,
        check=False,
        timeout=180,
    )
    if proc.returncode != 0:
        pytest.fail(f"pycep_dump.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    return result["models"], result["errors"]


# --------------------------------------------------------------------------- the parsed model


def _unwrap(config: dict[str, Any]) -> dict[str, Any]:
    """The object of a resource or module, inside any `for` loop or `if` condition."""
    body = config
    while isinstance(body.get("config"), dict) and ("loop_type" in body or "condition" in body):
        body = body["config"]
    return body


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


@dataclass(frozen=True)
class Resource:
    file: str
    symbol: str
    type: str
    existing: bool
    body: dict[str, Any]
    loop_var: str | None
    loop_source: Any
    condition: Any = None


def _make_resource(file: str, symbol: str, resource: dict[str, Any]) -> Resource:
    config = resource["config"]
    loop = _dig(config, "loop_type", "detail") or {}
    condition = None
    body = config
    while isinstance(body, dict) and isinstance(body.get("config"), dict):
        if "condition" in body:
            condition = body["condition"]
        if "loop_type" not in body and "condition" not in body:
            break
        body = body["config"]
    return Resource(
        file=file,
        symbol=symbol,
        type=resource["type"],
        existing=bool(resource.get("existing")),
        body=_unwrap(config),
        loop_var=loop.get("item_name"),
        loop_source=loop.get("array_name"),
        condition=condition,
    )


class Deployment:
    """The parsed .bicep files of one infra/ tree, with module parameters bound from main.bicep."""

    def __init__(self, root: Path, models: dict[str, Any]) -> None:
        self.root = root
        self.files: dict[str, dict[str, Any]] = {
            Path(path).resolve().relative_to(root.resolve()).as_posix(): model
            for path, model in models.items()
        }
        self.bindings: dict[str, dict[str, Any]] = {}
        for module in self.files["main.bicep"].get("modules", {}).values():
            path = module["detail"]["path"]
            self.bindings[path] = _unwrap(module["config"]).get("params", {})

    # -- resources

    def resources(self, type_: str, *, existing: bool = False) -> list[Resource]:
        found = []
        for file, model in self.files.items():
            for symbol, resource in model.get("resources", {}).items():
                if resource["type"] != type_ or bool(resource.get("existing")) != existing:
                    continue
                found.append(_make_resource(file, symbol, resource))
        return found

    def resource(self, file: str, symbol: str) -> Resource | None:
        resource = self.files[file].get("resources", {}).get(symbol)
        return _make_resource(file, symbol, resource) if resource else None

    def module_condition(self, path: str) -> Any:
        """The `if (...)` of the module in main.bicep that deploys `path` (None: unconditional)."""
        for module in self.files["main.bicep"].get("modules", {}).values():
            if module["detail"]["path"] == path:
                return module["config"].get("condition")
        return None

    def symbol(self, file: str, symbol: str) -> dict[str, Any] | None:
        resource = self.files[file].get("resources", {}).get(symbol)
        return _unwrap(resource["config"]) if resource else None

    # -- values

    def resolve(self, file: str, value: Any, depth: int = 0) -> Any:
        """Evaluate what can be evaluated statically: parameters (bound from main.bicep or their
        defaults), variables, property access on objects, string(), integer products, and
        ${name} interpolation.
        Anything else (resource properties, most functions) is returned as it is."""
        if depth > 30:
            return value
        if isinstance(value, str):
            if IDENTIFIER_RE.fullmatch(value):
                return self._resolve_name(file, value, depth)
            if "${" in value:
                return INTERPOLATION_RE.sub(
                    lambda match: self._interpolate(file, match, depth), value
                )
            return value
        if isinstance(value, list):
            return [self.resolve(file, item, depth + 1) for item in value]
        if not isinstance(value, dict):
            return value
        operator = value.get("operator")
        if isinstance(operator, dict) and operator.get("type") == "property_accessor":
            return self._resolve_path(file, _accessor_path(value), value, depth)
        if isinstance(operator, dict) and operator.get("type") == "multiply":
            operands = operator.get("operands") or {}
            a = self.resolve(file, operands.get("operand_1"), depth + 1)
            b = self.resolve(file, operands.get("operand_2"), depth + 1)
            if isinstance(a, int) and isinstance(b, int):
                return a * b
            return value
        function = value.get("function")
        if isinstance(function, dict):
            params = {
                key: self.resolve(file, item, depth + 1)
                for key, item in (function.get("parameters") or {}).items()
            }
            if function.get("type") == "string" and isinstance(
                params.get("value_to_convert"), (int, str)
            ):
                return str(params["value_to_convert"])
            return {"function": {**function, "parameters": params}}
        return {key: self.resolve(file, item, depth + 1) for key, item in value.items()}

    def _resolve_name(self, file: str, name: str, depth: int) -> Any:
        model = self.files[file]
        bindings = self.bindings.get(file, {})
        if name in bindings:
            return self.resolve("main.bicep", bindings[name], depth + 1)
        variables = model.get("variables", {})
        if name in variables:
            return self.resolve(file, variables[name]["value"], depth + 1)
        parameter = model.get("parameters", {}).get(name)
        if parameter is not None and "default" in parameter:
            return self.resolve(file, parameter["default"], depth + 1)
        return name

    def _resolve_path(self, file: str, path: list[Any], original: Any, depth: int) -> Any:
        if not path or not isinstance(path[0], str):
            return original
        current = self.resolve(file, path[0], depth + 1)
        for key in path[1:]:
            if not isinstance(current, dict) or not isinstance(key, str) or key not in current:
                return original
            current = current[key]
        return current

    def _interpolate(self, file: str, match: re.Match[str], depth: int) -> str:
        path: list[Any] = match.group(1).split(".")
        resolved = self._resolve_path(file, path, None, depth)
        if isinstance(resolved, (str, int)) and not isinstance(resolved, bool):
            return str(resolved)
        return match.group(0)


def _accessor_path(value: Any) -> list[Any]:
    """`a.b.c` as pycep writes it (nested property_accessor operators) -> ["a", "b", "c"]."""
    operator = value.get("operator") if isinstance(value, dict) else None
    if isinstance(operator, dict) and operator.get("type") == "property_accessor":
        operands = operator["operands"]
        return _accessor_path(operands["operand_1"]) + _accessor_path(operands["operand_2"])
    return [value]


def load_deployment(python: Path, root: Path) -> tuple[Deployment, dict[str, str]]:
    files = sorted(root.rglob("*.bicep"))
    models, errors = parse_bicep(python, files)
    return Deployment(root, models), errors


# --------------------------------------------------------------------------- checks


def check_storage(dep: Deployment) -> Findings:
    findings: Findings = []
    accounts = dep.resources("Microsoft.Storage/storageAccounts")
    if len(accounts) != 1:
        return [f"expected one storage account, found {len(accounts)}"]
    account = accounts[0]
    props = account.body.get("properties", {})
    if props.get("allowSharedKeyAccess") is not False:
        findings.append("storage: allowSharedKeyAccess must be false (Entra ID only)")
    if props.get("defaultToOAuthAuthentication") is not True:
        findings.append("storage: defaultToOAuthAuthentication must be true")
    if dep.resolve(account.file, props.get("minimumTlsVersion")) != "TLS1_2":
        findings.append("storage: minimumTlsVersion must be TLS1_2")
    if props.get("allowBlobPublicAccess") is not False:
        findings.append("storage: allowBlobPublicAccess must be false")
    if props.get("supportsHttpsTrafficOnly") is not True:
        findings.append("storage: supportsHttpsTrafficOnly must be true")
    sku = dep.resolve(account.file, _dig(account.body, "sku", "name"))
    if sku not in GEO_REDUNDANT_SKUS:
        findings.append(f"storage: sku {sku!r} is not geo-redundant")
    allowed = _decorator(dep.files["main.bicep"], "storageSkuName", "allowed")
    if not allowed or not set(allowed) <= GEO_REDUNDANT_SKUS:
        findings.append(f"storage: main.bicep allows SKUs that are not geo-redundant: {allowed}")

    services = dep.resources("Microsoft.Storage/storageAccounts/blobServices")
    if len(services) != 1:
        return [*findings, f"storage: expected one blobServices resource, found {len(services)}"]
    service = services[0]
    blob_props = service.body.get("properties", {})
    if blob_props.get("isVersioningEnabled") is not True:
        findings.append("storage: blob versioning must be enabled")
    for policy in ("deleteRetentionPolicy", "containerDeleteRetentionPolicy"):
        if _dig(blob_props, policy, "enabled") is not True:
            findings.append(f"storage: {policy} (soft delete) must be enabled")
        days = dep.resolve(service.file, _dig(blob_props, policy, "days"))
        if not isinstance(days, int) or days < 7:
            findings.append(f"storage: {policy} must keep at least 7 days, got {days!r}")
    return findings


def _decorator(model: dict[str, Any], parameter: str, kind: str) -> Any:
    for decorator in model.get("parameters", {}).get(parameter, {}).get("decorators", []):
        if decorator.get("type") == kind:
            return decorator.get("argument")
    return None


def container_names(dep: Deployment) -> dict[str, Resource]:
    """Every container the Bicep creates, by resolved name."""
    names: dict[str, Resource] = {}
    for container in dep.resources("Microsoft.Storage/storageAccounts/blobServices/containers"):
        name = container.body.get("name")
        if container.loop_var is not None and name == container.loop_var:
            resolved = dep.resolve(container.file, container.loop_source)
            for item in resolved if isinstance(resolved, list) else [resolved]:
                names[str(item)] = container
        else:
            names[str(dep.resolve(container.file, name))] = container
    return names


def check_containers(dep: Deployment) -> Findings:
    findings: Findings = []
    declared = dep.resolve("main.bicep", "containerNames")
    for key, name in EXPECTED_CONTAINERS.items():
        if not isinstance(declared, dict) or declared.get(key) != name:
            findings.append(f"containers: main.bicep containerNames.{key} must be {name!r}")
    created = container_names(dep)
    missing = set(EXPECTED_CONTAINERS.values()) - set(created)
    if missing:
        findings.append(f"containers: not created: {sorted(missing)}")
    for name, container in created.items():
        if _dig(container.body, "properties", "publicAccess") != "None":
            findings.append(f"containers: {name} must have publicAccess 'None'")
    return findings


AUDIT_CONTAINER = EXPECTED_CONTAINERS["audit"]
AUDIT_PEOPLE_CONTAINER = EXPECTED_CONTAINERS["auditPeople"]
IMMUTABILITY_TYPE = "Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies"
# Each audit container (the Function's chains; the people's chains), and the main.bicep switch
# that leaves its policy out once it is locked (ARM cannot create-or-update a locked policy).
# Two switches: a deployment whose byok-audit policy was locked before byok-audit-people existed
# must still get the new container's policy.
AUDIT_POLICY_SWITCHES = {
    AUDIT_CONTAINER: "auditPolicyLocked",
    AUDIT_PEOPLE_CONTAINER: "auditPeoplePolicyLocked",
}


def audit_policies(dep: Deployment) -> tuple[dict[str, Resource], Findings]:
    """The immutability policy of each container that has one, by container name; and policies
    that are on any other container, or a second one on the same container."""
    policies: dict[str, Resource] = {}
    findings: Findings = []
    for policy in dep.resources(IMMUTABILITY_TYPE):
        parent = dep.symbol(policy.file, str(policy.body.get("parent")))
        parent_name = str(dep.resolve(policy.file, (parent or {}).get("name")))
        if parent_name not in AUDIT_POLICY_SWITCHES:
            findings.append(
                f"audit: immutability policy {policy.symbol} is on {parent_name!r}, "
                "not the audit container or the people's audit container"
            )
        elif parent_name in policies:
            findings.append(f"audit: {parent_name} has more than one immutability policy")
        else:
            policies[parent_name] = policy
    return policies, findings


def check_audit_immutability(dep: Deployment) -> Findings:
    policies, findings = audit_policies(dep)
    periods: dict[str, Any] = {}
    for container, switch in AUDIT_POLICY_SWITCHES.items():
        policy = policies.get(container)
        if policy is None:
            findings.append(
                f"audit: {container} has no immutability policy: its signed chains could be "
                "overwritten or deleted"
            )
            continue
        # A locked policy rejects ARM's create-or-update: after locking, redeployments skip it.
        negated = _dig(policy.condition, "operator", "operands", "bool_value")
        if _dig(policy.condition, "operator", "type") != "not" or negated != switch:
            findings.append(
                f"audit: the immutability policy of {container} must be deployed only "
                f"if (!{switch}), or every redeployment after locking fails"
            )
        locked = dep.files["main.bicep"].get("parameters", {}).get(switch, {})
        if locked.get("default") is not False or switch not in dep.bindings.get(policy.file, {}):
            findings.append(f"audit: main.bicep must pass {switch} (default false)")
        props = policy.body.get("properties", {})
        days = dep.resolve(policy.file, props.get("immutabilityPeriodSinceCreationInDays"))
        periods[container] = days
        if not isinstance(days, int) or days < 1:
            findings.append(
                f"audit: immutability period of {container} must be a positive number of "
                f"days: {days!r}"
            )
        appends = [
            props.get("allowProtectedAppendWrites"),
            props.get("allowProtectedAppendWritesAll"),
        ]
        if appends.count(True) != 1:
            findings.append(
                f"audit: exactly one of allowProtectedAppendWrites(All) must be true on "
                f"{container}, or its append-blob chains cannot grow"
            )
    if len(set(map(json.dumps, periods.values()))) > 1:
        findings.append(f"audit: the audit containers must keep the same retention: {periods}")
    return findings


def _app_settings(dep: Deployment, site: Resource) -> dict[str, Any]:
    settings = _dig(site.body, "properties", "siteConfig", "appSettings") or []
    return {
        str(dep.resolve(site.file, item.get("name"))): dep.resolve(site.file, item.get("value"))
        for item in settings
        if isinstance(item, dict)
    }


def _app_settings_raw(site: Resource) -> dict[str, Any]:
    settings = _dig(site.body, "properties", "siteConfig", "appSettings") or []
    return {str(item.get("name")): item.get("value") for item in settings if isinstance(item, dict)}


def _function_sites(dep: Deployment) -> list[Resource]:
    return dep.resources("Microsoft.Web/sites")


def check_function_app(dep: Deployment) -> Findings:
    findings: Findings = []
    plans = dep.resources("Microsoft.Web/serverfarms")
    if [(_dig(p.body, "sku", "name"), _dig(p.body, "sku", "tier")) for p in plans] != [
        ("FC1", "FlexConsumption")
    ]:
        findings.append("function: expected one Flex Consumption (FC1) plan")
    sites = _function_sites(dep)
    if len(sites) != 1:
        return [*findings, f"function: expected one function app, found {len(sites)}"]
    site = sites[0]
    kind = str(site.body.get("kind"))
    if "functionapp" not in kind or "linux" not in kind:
        findings.append(f"function: kind must be a Linux function app, got {kind!r}")
    props = site.body.get("properties", {})
    if props.get("httpsOnly") is not True:
        findings.append("function: httpsOnly must be true")
    if _dig(site.body, "identity", "type") != "UserAssigned":
        findings.append("function: must use a user-assigned managed identity")
    site_config = props.get("siteConfig", {})
    if site_config.get("ftpsState") != "Disabled":
        findings.append("function: ftpsState must be Disabled")
    if site_config.get("minTlsVersion") != "1.2":
        findings.append("function: minTlsVersion must be 1.2")
    runtime = _dig(props, "functionAppConfig", "runtime")
    if runtime != {"name": "python", "version": "3.11"}:
        findings.append(f"function: runtime must be python 3.11, got {runtime!r}")
    auth = _dig(props, "functionAppConfig", "deployment", "storage", "authentication", "type")
    if auth != "UserAssignedIdentity":
        findings.append(f"function: deployment storage must use the managed identity, got {auth!r}")
    deploy_identity = _accessor_path(
        _dig(
            props,
            "functionAppConfig",
            "deployment",
            "storage",
            "authentication",
            "userAssignedIdentityResourceId",
        )
    )[0]
    runtime_identity = _accessor_path(_app_settings_raw(site).get("AZURE_CLIENT_ID"))[0]
    if not isinstance(deploy_identity, str) or deploy_identity == runtime_identity:
        findings.append(
            "function: the deployment package must be read with its own identity, "
            f"not the runtime identity ({deploy_identity!r})"
        )
    policies = {
        str(p.body.get("name")): _dig(p.body, "properties", "allow")
        for p in dep.resources("Microsoft.Web/sites/basicPublishingCredentialsPolicies")
    }
    if policies != {"ftp": False, "scm": False}:
        findings.append(f"function: FTP and SCM basic-auth publishing must be off: {policies}")
    return findings


def check_app_settings(dep: Deployment) -> Findings:
    sites = _function_sites(dep)
    if len(sites) != 1:
        return ["settings: expected one function app"]
    settings = _app_settings(dep, sites[0])
    findings: Findings = []
    missing = REQUIRED_APP_SETTINGS - set(settings)
    if missing:
        findings.append(f"settings: missing {sorted(missing)}")
    for name, value in settings.items():
        if name in FORBIDDEN_SETTING_NAMES or name.lower().endswith(
            ("__connectionstring", "__accountkey", "__sastoken")
        ):
            findings.append(f"settings: {name} is a connection string or key setting")
        text = json.dumps(value).lower()
        for marker in SECRET_MARKERS:
            if marker in text:
                findings.append(f"settings: {name} carries a storage key or SAS ({marker})")
    for prefix in ("AzureWebJobsStorage", "BYOK_STORAGE"):
        if settings.get(f"{prefix}__credential") != "managedidentity":
            findings.append(f"settings: {prefix}__credential must be 'managedidentity'")
        client_id = settings.get(f"{prefix}__clientId")
        if client_id is None or client_id != settings.get("AZURE_CLIENT_ID"):
            findings.append(f"settings: {prefix}__clientId must be the identity's client id")
    for name, expected in (EXPECTED_CONTAINER_SETTINGS | EXPECTED_AUTHORIZATION_SETTINGS).items():
        if settings.get(name) != expected:
            findings.append(f"settings: {name} must be {expected!r}, got {settings.get(name)!r}")
    if settings.get("BYOK_MAX_PACKAGE_BYTES") != "65536":
        findings.append("settings: BYOK_MAX_PACKAGE_BYTES must default to 65536")
    if settings.get("BYOK_MAX_ATTEMPTS") != "5":
        findings.append("settings: BYOK_MAX_ATTEMPTS must default to 5")
    # one figure sets the pace and the concurrency (Managed HSM: ~1 creation/s per partition, 2)
    if settings.get("BYOK_HSM_IMPORTS_PER_SECOND") != "2":
        findings.append("settings: BYOK_HSM_IMPORTS_PER_SECOND must default to 2")
    if settings.get("AzureFunctionsJobHost__extensions__blobs__maxDegreeOfParallelism") != "4":
        findings.append("settings: the blob trigger's concurrency must follow the import pace (4)")
    auth = str(settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING"))
    if not auth.startswith("Authorization=AAD;ClientId="):
        findings.append("settings: Application Insights must authenticate with Entra ID")
    return findings


def _main_parameter(dep: Deployment, file: str, value: Any) -> str | None:
    """The main.bicep parameter that `value` (an expression in `file`) is, followed through
    module parameters; None if it is anything else (a literal, a variable, another expression)."""
    for _ in range(len(dep.files)):
        if not isinstance(value, str) or not IDENTIFIER_RE.fullmatch(value):
            return None
        if value not in dep.files[file].get("parameters", {}):
            return None
        if file == "main.bicep":
            return value
        if value not in dep.bindings.get(file, {}):
            return None
        file, value = "main.bicep", dep.bindings[file][value]
    return None


SIGNING_KID_SETTING = "BYOK_AUDIT_SIGNING_KID"
SIGNING_KID_PARAMETER = "auditSigningKid"


def check_audit_signing_kid(dep: Deployment) -> Findings:
    """BYOK_AUDIT_SIGNING_KID is main.bicep's parameter auditSigningKid: a string, empty by
    default (the key exists only after `byok audit init`), set on the second pass."""
    sites = _function_sites(dep)
    if len(sites) != 1:
        return ["audit signing: expected one function app"]
    raw = _app_settings_raw(sites[0])
    if SIGNING_KID_SETTING not in raw:
        return [f"audit signing: the Function has no {SIGNING_KID_SETTING} setting"]
    findings: Findings = []
    source = _main_parameter(dep, sites[0].file, raw[SIGNING_KID_SETTING])
    if source != SIGNING_KID_PARAMETER:
        findings.append(
            f"audit signing: {SIGNING_KID_SETTING} must come from main.bicep's parameter "
            f"{SIGNING_KID_PARAMETER}, not {source or json.dumps(raw[SIGNING_KID_SETTING])}"
        )
    declared = dep.files["main.bicep"].get("parameters", {}).get(SIGNING_KID_PARAMETER)
    if declared is None or declared.get("type") != "string" or declared.get("default") != "":
        findings.append(
            f"audit signing: main.bicep must declare {SIGNING_KID_PARAMETER} as a string with "
            "default '' (the key exists only after byok audit init)"
        )
    description = str(_decorator(dep.files["main.bicep"], SIGNING_KID_PARAMETER, "description"))
    if "byok audit init" not in description:
        findings.append(
            f"audit signing: the description of {SIGNING_KID_PARAMETER} must say it is set "
            "after `byok audit init`"
        )
    return findings


# Each container whose BlobCreated events wake an Event Grid blob trigger of function_app.py,
# and that trigger's function name.
EXPECTED_SUBSCRIPTIONS = {
    EXPECTED_CONTAINERS["incoming"]: "process_package",
    EXPECTED_CONTAINERS["approvals"]: "process_approval",
}
SUBJECT_RE = re.compile(r"/blobServices/default/containers/([^/]+)/blobs/")


def check_event_grid(dep: Deployment) -> Findings:
    findings: Findings = []
    topics = dep.resources("Microsoft.EventGrid/systemTopics")
    if len(topics) != 1 or _dig(topics[0].body, "properties", "topicType") != (
        "Microsoft.Storage.StorageAccounts"
    ):
        findings.append("eventgrid: expected one system topic on the storage account")
    subscriptions = dep.resources("Microsoft.EventGrid/systemTopics/eventSubscriptions")
    covered: dict[str, str] = {}
    for sub in subscriptions:
        where = f"eventgrid: {sub.symbol}"
        props = sub.body.get("properties", {})
        event_filter = props.get("filter", {})
        if event_filter.get("includedEventTypes") != ["Microsoft.Storage.BlobCreated"]:
            findings.append(
                f"{where} includedEventTypes must be exactly Microsoft.Storage.BlobCreated"
            )
        subject = str(dep.resolve(sub.file, event_filter.get("subjectBeginsWith")))
        match = SUBJECT_RE.fullmatch(subject)
        container = match.group(1) if match else None
        function = EXPECTED_SUBSCRIPTIONS.get(str(container))
        if function is None:
            findings.append(
                f"{where} subjectBeginsWith must be one of the triggers' containers "
                f"{sorted(EXPECTED_SUBSCRIPTIONS)}, got {subject!r}"
            )
        elif container in covered:
            findings.append(f"{where} subjectBeginsWith repeats {container!r}")
        else:
            covered[str(container)] = sub.symbol
        destination = props.get("destination", {})
        url = str(dep.resolve(sub.file, _dig(destination, "properties", "endpointUrl")))
        if destination.get("endpointType") != "WebHook" or (
            f"/runtime/webhooks/blobs?functionName=Host.Functions.{function}&code=" not in url
            or "systemKeys.blobs_extension" not in url
        ):
            findings.append(
                f"{where} endpoint must be the blob extension webhook of {function}: {url!r}"
            )
        retry = props.get("retryPolicy", {})
        if not isinstance(retry.get("maxDeliveryAttempts"), int) or not isinstance(
            retry.get("eventTimeToLiveInMinutes"), int
        ):
            findings.append(f"{where} retryPolicy must set attempts and time to live")
        if sub.condition is not None:
            findings.append(f"{where} must not carry a condition: the subscriptions' module does")
        dead_letter = props.get("deadLetterWithResourceIdentity", {})
        dead_container = dep.resolve(
            sub.file, _dig(dead_letter, "deadLetterDestination", "properties", "blobContainerName")
        )
        if dead_container != EXPECTED_CONTAINERS["deadletter"] or not _dig(
            dead_letter, "identity", "type"
        ):
            findings.append(
                f"{where} dead letters must go to byok-deadletter with a managed identity"
            )
    for container in sorted(set(EXPECTED_SUBSCRIPTIONS) - set(covered)):
        findings.append(
            f"eventgrid: no BlobCreated subscription (subjectBeginsWith) for {container}, so "
            f"{EXPECTED_SUBSCRIPTIONS[container]} never runs"
        )
    for file in dep.files:
        text = BICEP_COMMENT_LINE_RE.sub("", (dep.root / file).read_text(encoding="utf-8"))
        if "listkeys(" not in text.lower():
            continue
        if file == "main.bicep" or dep.module_condition(file) != "deployEventSubscription":
            findings.append(
                f"eventgrid: {file} calls listKeys(), so it must be a module deployed only "
                "if (deployEventSubscription): ARM may evaluate list* in conditional resources"
            )
    default = _dig(dep.files["main.bicep"], "parameters", "deployEventSubscription", "default")
    if default is not False:
        findings.append("eventgrid: deployEventSubscription must default to false (first pass)")
    return findings


CONTAINER_TYPE = "Microsoft.Storage/storageAccounts/blobServices/containers"
ACCOUNT_TYPE = "Microsoft.Storage/storageAccounts"
COMPONENT_TYPE = "Microsoft.Insights/components"
ROLE_DEFINITION_TYPE = "Microsoft.Authorization/roleDefinitions"
DATA_ROLES = {
    ROLE_BLOB_DATA_CONTRIBUTOR,
    ROLE_BLOB_DATA_READER,
    ROLE_QUEUE_DATA_CONTRIBUTOR,
    ROLE_BLOB_WRITER,
}
# Roles that cannot change a blob, and roles that do not reach blobs at all.
READ_ONLY_ROLES = {ROLE_BLOB_DATA_READER}
NON_BLOB_ROLES = {ROLE_QUEUE_DATA_CONTRIBUTOR, ROLE_MONITORING_METRICS_PUBLISHER}
# Blob roles whose control-plane Actions include containers/write and containers/delete.
CONTAINER_CONTROL_ROLES = {ROLE_BLOB_DATA_CONTRIBUTOR, ROLE_BLOB_DATA_OWNER}
ROLE_NAMES = {
    ROLE_BLOB_DATA_CONTRIBUTOR: "Storage Blob Data Contributor",
    ROLE_BLOB_DATA_OWNER: "Storage Blob Data Owner",
    ROLE_BLOB_DATA_READER: "Storage Blob Data Reader",
    ROLE_QUEUE_DATA_CONTRIBUTOR: "Storage Queue Data Contributor",
    ROLE_MONITORING_METRICS_PUBLISHER: "Monitoring Metrics Publisher",
    ROLE_BLOB_WRITER: "the custom blob writer role",
}
BLOB_DATA = "Microsoft.Storage/storageAccounts/blobServices/containers/blobs"
# The writer role's data actions, exactly: read and list, create and write (Put Blob with
# metadata, Put Block List), create and append (the custodians' audit append blob). No delete,
# move, version delete, permanent delete, tags, immutability, ownership or ACLs.
BLOB_WRITER_DATA_ACTIONS = {f"{BLOB_DATA}/read", f"{BLOB_DATA}/write", f"{BLOB_DATA}/add/action"}
# Control-plane Actions a custom role may hold, each with its reason. None is needed: requests to
# blob data are authorized by DataActions alone, and the CLI never lists containers through ARM.
ALLOWED_CUSTOM_ROLE_ACTIONS: dict[str, str] = {}
# Data-role grants broader than one container, each with its reason: (file, symbol) -> reason.
ALLOWED_BROAD_GRANTS = {
    ("modules/roles.bicep", "functionQueueAccess"): (
        "queues only; the Functions host creates its queues (webjobs-blobtrigger-poison and its "
        "internal ones) with names it chooses, so they cannot be listed in advance"
    ),
}
HOST_CONTAINERS = {"azure-webjobs-hosts", "azure-webjobs-secrets"}
# Where the Function reads, writes and deletes (Blob Data Contributor). Not the audit container:
# it only creates and appends there, with the data-only writer role.
PIPELINE_CONTAINERS = {
    EXPECTED_CONTAINERS[k] for k in ("incoming", "status", "archive", "quarantine")
}
CONFIG_CONTAINER = EXPECTED_CONTAINERS["config"]
APPROVALS_CONTAINER = EXPECTED_CONTAINERS["approvals"]
DEPLOYMENT_CONTAINER = "app-package"
APP_INSIGHTS = "<application insights>"
STORAGE_ACCOUNT = "<storage account>"
RESOURCE_GROUP = "<resource group>"
FUNCTION_PRINCIPAL = "functionPrincipalId"
# Who holds which role where: principal (parameter or identity) -> {(role, target)}.
EXPECTED_GRANTS: dict[str, set[tuple[str, str]]] = {
    FUNCTION_PRINCIPAL: {
        *((ROLE_BLOB_DATA_CONTRIBUTOR, c) for c in PIPELINE_CONTAINERS | HOST_CONTAINERS),
        (ROLE_BLOB_WRITER, AUDIT_CONTAINER),
        (ROLE_BLOB_DATA_READER, CONFIG_CONTAINER),
        (ROLE_BLOB_DATA_READER, APPROVALS_CONTAINER),
        (ROLE_QUEUE_DATA_CONTRIBUTOR, STORAGE_ACCOUNT),
        (ROLE_MONITORING_METRICS_PUBLISHER, APP_INSIGHTS),
    },
    "deploymentPrincipalId": {(ROLE_BLOB_DATA_CONTRIBUTOR, DEPLOYMENT_CONTAINER)},
    "uploaderPrincipalIds": {
        (ROLE_BLOB_WRITER, "byok-incoming"),
        (ROLE_BLOB_WRITER, APPROVALS_CONTAINER),
    },
    "statusReaderPrincipalIds": {(ROLE_BLOB_DATA_READER, "byok-status")},
    "custodianPrincipalIds": {
        (ROLE_BLOB_WRITER, "byok-incoming"),
        (ROLE_BLOB_WRITER, APPROVALS_CONTAINER),
        (ROLE_BLOB_WRITER, AUDIT_PEOPLE_CONTAINER),
        (ROLE_BLOB_DATA_READER, "byok-status"),
        (ROLE_MONITORING_METRICS_PUBLISHER, APP_INSIGHTS),
    },
    "auditorPrincipalIds": {
        (ROLE_BLOB_DATA_READER, AUDIT_CONTAINER),
        (ROLE_BLOB_DATA_READER, AUDIT_PEOPLE_CONTAINER),
        (ROLE_BLOB_DATA_READER, "byok-status"),
    },
    "policyAdminPrincipalIds": {
        (ROLE_BLOB_WRITER, CONFIG_CONTAINER),
        (ROLE_BLOB_WRITER, AUDIT_PEOPLE_CONTAINER),
    },
    "systemTopic.identity.principalId": {(ROLE_BLOB_DATA_CONTRIBUTOR, "byok-deadletter")},
}
# People (principal lists, not identities of the deployment): they write blobs with the custom
# data-only role, never with a built-in role that carries container Actions or blob delete.
PEOPLE_WHO_WRITE = {"uploaderPrincipalIds", "custodianPrincipalIds", "policyAdminPrincipalIds"}
POLICY_WRITERS = {"policyAdminPrincipalIds"}
APPROVAL_WRITERS = {"uploaderPrincipalIds", "custodianPrincipalIds"}
# Containers where people who write may not delete or move (an ABAC condition on their grant),
# besides every grant of the writer role.
NO_DELETE_CONTAINERS = {"byok-incoming", APPROVALS_CONTAINER, AUDIT_PEOPLE_CONTAINER}
BLOB_DELETE_ACTION = f"{BLOB_DATA}/delete"
# The audit trail: each writer appends its own signed chains to its own container and cannot write
# the other's. The Function writes byok-audit (no person can); custodians and policy administrators
# write byok-audit-people (the Function cannot). Uploaders write neither.
AUDIT_WRITERS = {
    AUDIT_CONTAINER: {FUNCTION_PRINCIPAL},
    AUDIT_PEOPLE_CONTAINER: {"custodianPrincipalIds", "policyAdminPrincipalIds"},
}
AUDIT_READERS = {"auditorPrincipalIds"}


@dataclass(frozen=True)
class Grant:
    """One (principal, role, target) of a role assignment, with where it is declared."""

    principal: str
    role: str
    target: str
    where: str
    conditioned: bool


def _scope_targets(dep: Deployment, assignment: Resource) -> tuple[str, list[str]]:
    """(resource type, resolved names) of what an assignment is scoped to."""
    scope = assignment.body.get("scope")
    if scope is None:
        return "resourceGroup", [RESOURCE_GROUP]
    if _dig(scope, "operator", "type") == "index_accessor":
        scope = scope["operator"]["operands"]["operand_1"]
    if not isinstance(scope, str):
        return "unknown", [json.dumps(scope)]
    target = dep.resource(assignment.file, scope)
    if target is None:
        return "unknown", [scope]
    if target.type == ACCOUNT_TYPE:
        return target.type, [STORAGE_ACCOUNT]
    if target.type == COMPONENT_TYPE:
        return target.type, [APP_INSIGHTS]
    name = target.body.get("name")
    if target.loop_var is not None and name == target.loop_var:
        resolved = dep.resolve(target.file, target.loop_source)
        return target.type, [
            str(n) for n in (resolved if isinstance(resolved, list) else [resolved])
        ]
    return target.type, [str(dep.resolve(target.file, name))]


def _principal_key(assignment: Resource) -> str:
    principal = _dig(assignment.body, "properties", "principalId")
    if assignment.loop_var is not None and principal == assignment.loop_var:
        return str(assignment.loop_source)
    if isinstance(principal, dict):
        return ".".join(str(part) for part in _accessor_path(principal))
    return str(principal)


def _custom_role_symbol(dep: Deployment, file: str, value: Any) -> str | None:
    """The symbol of a role definition declared in `file`, if `value` names it: as
    subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role.name) or role.id."""
    attribute = "id"
    function = _dig(value, "function")
    if isinstance(function, dict) and function.get("type") == "subscription_resource_id":
        if _dig(function, "parameters", "resource_type") != ROLE_DEFINITION_TYPE:
            return None
        value = _dig(function, "parameters", "resource_name_1")
        attribute = "name"
    path = _accessor_path(value) if isinstance(value, dict) else []
    if len(path) != 2 or path[1] != attribute or not isinstance(path[0], str):
        return None
    role = dep.resource(file, path[0])
    if role is None or role.type != ROLE_DEFINITION_TYPE or role.existing:
        return None
    return path[0]


def _role_keys(dep: Deployment, assignment: Resource) -> set[str]:
    """Built-in role ids by GUID; a custom role of the template as `custom:<symbol>`."""
    value = dep.resolve(assignment.file, _dig(assignment.body, "properties", "roleDefinitionId"))
    symbol = _custom_role_symbol(dep, assignment.file, value)
    if symbol is not None:
        return {f"custom:{symbol}"}
    return set(GUID_RE.findall(json.dumps(value)))


def _role_name(role: str) -> str:
    return ROLE_NAMES.get(role, FORBIDDEN_ROLES.get(role, role))


def role_grants(dep: Deployment) -> tuple[list[Grant], Findings]:
    """Every grant of every role assignment, and what is wrong with the assignments themselves
    (naming, role, scope, ABAC condition)."""
    findings: Findings = []
    grants: list[Grant] = []
    for assignment in dep.resources("Microsoft.Authorization/roleAssignments"):
        where = f"roles: {assignment.file}:{assignment.symbol}"
        name = assignment.body.get("name")
        function = _dig(name, "function")
        if not isinstance(function, dict) or function.get("type") != "guid":
            findings.append(f"{where} must be named with guid(scope, principal, role)")
        elif len([p for p in function["parameters"].values() if p is not None]) < 3:
            findings.append(f"{where} guid() must take scope, principal and role")
        props = assignment.body.get("properties", {})
        roles = _role_keys(dep, assignment)
        if len(roles) != 1:
            role_text = json.dumps(dep.resolve(assignment.file, props.get("roleDefinitionId")))
            findings.append(
                f"{where} roleDefinitionId does not name one built-in role or one custom role "
                f"of the template: {role_text}"
            )
        scope_type, targets = _scope_targets(dep, assignment)
        principal = _principal_key(assignment)
        # pycep keeps Bicep's escaped quotes (\\'); ARM sees plain ones.
        condition = str(dep.resolve(assignment.file, props.get("condition"))).replace("\\'", "'")
        conditioned = (
            f"!(ActionMatches{{'{BLOB_DELETE_ACTION}'}})" in condition
            and props.get("conditionVersion") == "2.0"
        )
        for role in roles:
            if role in FORBIDDEN_ROLES:
                findings.append(f"{where} grants {FORBIDDEN_ROLES[role]}")
            elif role not in ALLOWED_ROLES:
                findings.append(f"{where} grants a role outside the allowed narrow set: {role}")
            if (
                role in DATA_ROLES
                and scope_type != CONTAINER_TYPE
                and (assignment.file, assignment.symbol) not in ALLOWED_BROAD_GRANTS
            ):
                findings.append(
                    f"{where} grants a data role account-wide or broader ({scope_type}); "
                    "scope it to a container or allow it with a reason"
                )
            if role == ROLE_MONITORING_METRICS_PUBLISHER and scope_type != COMPONENT_TYPE:
                findings.append(f"{where} Monitoring Metrics Publisher must be on the component")
            needs_condition = role == ROLE_BLOB_WRITER or (
                principal in PEOPLE_WHO_WRITE and NO_DELETE_CONTAINERS & set(targets)
            )
            if needs_condition and not conditioned:
                findings.append(
                    f"{where} needs an ABAC condition (version 2.0) denying blob delete to "
                    "people who upload packages, approvals or the policy"
                )
            grants.extend(Grant(principal, role, t, where, conditioned) for t in targets)
    return grants, findings


def check_role_assignments(dep: Deployment) -> Findings:
    grants, findings = role_grants(dep)
    if not grants:
        return ["roles: no role assignments found"]
    granted: dict[str, set[tuple[str, str]]] = {}
    for grant in grants:
        granted.setdefault(grant.principal, set()).add((grant.role, grant.target))
    for principal, expected in EXPECTED_GRANTS.items():
        actual = granted.get(principal, set())
        for role, target in sorted(actual - expected):
            extra = "the deployment package (app-package)" if target == DEPLOYMENT_CONTAINER else ""
            findings.append(
                f"roles: {principal} holds {role} on {target}, which it must not {extra}".rstrip()
            )
        for role, target in sorted(expected - actual):
            findings.append(f"roles: {principal} lacks {role} on {target}")
    for principal in sorted(set(granted) - set(EXPECTED_GRANTS)):
        findings.append(
            f"roles: unexpected principal {principal} holds {sorted(granted[principal])}"
        )
    return findings


def _resource_group_id(value: Any) -> bool:
    """`resourceGroup().id` of the deployment's own group."""
    function = _dig(value, "function")
    return (
        isinstance(function, dict)
        and function.get("type") == "resource_group"
        and function.get("property_name") == "id"
        and not any((function.get("parameters") or {}).values())
    )


def _storage_account_id(dep: Deployment, file: str, value: Any) -> bool:
    path = _accessor_path(value) if isinstance(value, dict) else []
    if len(path) != 2 or path[1] != "id" or not isinstance(path[0], str):
        return False
    target = dep.resource(file, path[0])
    return target is not None and target.type == ACCOUNT_TYPE


def check_custom_roles(dep: Deployment) -> Findings:
    """Custom role definitions are data-only, blob read/write/add only, assignable in this
    resource group (or on the storage account) only, one per resource group."""
    findings: Findings = []
    definitions = dep.resources(ROLE_DEFINITION_TYPE)
    if ROLE_BLOB_WRITER not in {f"custom:{d.symbol}" for d in definitions}:
        findings.append("custom roles: the data-only blob writer role (blobWriterRole) is missing")
    for role in definitions:
        where = f"custom roles: {role.file}:{role.symbol}"
        props = role.body.get("properties", {})
        name = _dig(role.body, "name", "function")
        if (
            not isinstance(name, dict)
            or name.get("type") != "guid"
            or not any(_resource_group_id(p) for p in (name.get("parameters") or {}).values())
        ):
            findings.append(
                f"{where} must be named guid(resourceGroup().id, ...), so that a redeployment "
                "finds it again"
            )
        if "resourceGroup()" not in str(props.get("roleName")):
            findings.append(
                f"{where} roleName must name the resource group: role names are unique in the "
                "tenant, so a second deployment elsewhere would fail"
            )
        if str(props.get("type")).lower() != "customrole":
            findings.append(f"{where} type must be CustomRole")
        permissions = props.get("permissions")
        if not isinstance(permissions, list) or len(permissions) != 1:
            findings.append(f"{where} must have exactly one permissions block")
            permissions = permissions if isinstance(permissions, list) else []
        for block in permissions:
            for action in block.get("actions") or []:
                if action not in ALLOWED_CUSTOM_ROLE_ACTIONS:
                    findings.append(
                        f"{where} has the control-plane action {action!r}: a data-only role has "
                        "no Actions (containers/write and containers/delete change or delete a "
                        "whole container through ARM)"
                    )
            data_actions = block.get("dataActions") or []
            for action in data_actions:
                if action in BLOB_WRITER_DATA_ACTIONS:
                    continue
                if "delete" in str(action).lower():
                    findings.append(f"{where} grants a delete data action: {action!r}")
                else:
                    findings.append(
                        f"{where} grants a data action beyond read/write/add: {action!r}"
                    )
            if f"custom:{role.symbol}" == ROLE_BLOB_WRITER and set(data_actions) != (
                BLOB_WRITER_DATA_ACTIONS
            ):
                missing = sorted(BLOB_WRITER_DATA_ACTIONS - set(data_actions))
                if missing:
                    findings.append(f"{where} lacks {missing}: uploads or audit appends fail")
        scopes = props.get("assignableScopes")
        if not isinstance(scopes, list) or not scopes:
            findings.append(f"{where} needs assignableScopes")
            scopes = []
        for scope in scopes:
            if not _resource_group_id(scope) and not _storage_account_id(dep, role.file, scope):
                findings.append(
                    f"{where} must be assignable only in this resource group or on the storage "
                    f"account, not {json.dumps(scope)}"
                )
    return findings


def _reaches(grant: Grant, container: str) -> bool:
    return grant.target in {container, STORAGE_ACCOUNT, RESOURCE_GROUP}


def check_import_authorization(dep: Deployment) -> Findings:
    """Only policy administrators write the policy; uploaders and custodians write approvals; the
    function reads both and writes neither; people write only with the data-only role."""
    grants, _ = role_grants(dep)  # what is wrong with the assignments: check_role_assignments
    findings: Findings = []

    def writers(container: str) -> set[str]:
        return {
            g.principal
            for g in grants
            if _reaches(g, container) and g.role not in READ_ONLY_ROLES | NON_BLOB_ROLES
        }

    config_writers = writers(CONFIG_CONTAINER)
    for principal in sorted(config_writers - POLICY_WRITERS):
        findings.append(
            f"authorization: {principal} can write {CONFIG_CONTAINER}: only "
            "policyAdminPrincipalIds may write the import policy"
        )
    for principal in sorted(POLICY_WRITERS - config_writers):
        findings.append(
            f"authorization: {principal} cannot write {CONFIG_CONTAINER} (byok policy set)"
        )
    approval_writers = writers(APPROVALS_CONTAINER)
    for principal in sorted(approval_writers - APPROVAL_WRITERS):
        findings.append(
            f"authorization: {principal} can write {APPROVALS_CONTAINER}: only uploaders and "
            "custodians write approvals"
        )
    for principal in sorted(APPROVAL_WRITERS - approval_writers):
        findings.append(f"authorization: {principal} cannot write {APPROVALS_CONTAINER}")
    for container in (CONFIG_CONTAINER, APPROVALS_CONTAINER):
        roles = {
            g.role for g in grants if g.principal == FUNCTION_PRINCIPAL and _reaches(g, container)
        } - NON_BLOB_ROLES
        if roles != READ_ONLY_ROLES:
            findings.append(
                f"authorization: the function must hold exactly Storage Blob Data Reader on "
                f"{container} (read only), holds {sorted(_role_name(r) for r in roles)}"
            )
    for grant in grants:
        if grant.role not in CONTAINER_CONTROL_ROLES:
            continue
        for container in (CONFIG_CONTAINER, APPROVALS_CONTAINER):
            if _reaches(grant, container):
                findings.append(
                    f"authorization: {grant.principal} holds {_role_name(grant.role)} on "
                    f"{container} ({grant.where})"
                )
        if grant.principal in PEOPLE_WHO_WRITE:
            findings.append(
                f"authorization: {grant.principal} holds {_role_name(grant.role)} on "
                f"{grant.target}: its control-plane Actions can delete the container; people "
                "write with the data-only writer role"
            )
    return findings


def check_audit_trail_roles(dep: Deployment) -> Findings:
    """Each audit container is written by its own writers only, each through the data-only writer
    role with the no-delete condition on that container; auditors read both and write neither."""
    grants, _ = role_grants(dep)  # what is wrong with the assignments: check_role_assignments
    findings: Findings = []
    for container, allowed in AUDIT_WRITERS.items():
        writes = [
            g
            for g in grants
            if _reaches(g, container) and g.role not in READ_ONLY_ROLES | NON_BLOB_ROLES
        ]
        writers = {g.principal for g in writes}
        for principal in sorted(writers - allowed):
            findings.append(
                f"audit trail: {principal} can write {container}: only {sorted(allowed)} "
                "append there (each writer to its own container)"
            )
        for principal in sorted(allowed - writers):
            findings.append(f"audit trail: {principal} cannot write {container}")
        for grant in writes:
            if grant.principal not in allowed:
                continue
            if grant.role != ROLE_BLOB_WRITER or not grant.conditioned or grant.target != container:
                findings.append(
                    f"audit trail: {grant.principal} writes {container} with "
                    f"{_role_name(grant.role)} on {grant.target}"
                    f"{'' if grant.conditioned else ' without the no-delete condition'} "
                    f"({grant.where}): only the data-only writer role with the no-delete ABAC "
                    "condition, on the container itself"
                )
        for principal in sorted(AUDIT_READERS):
            roles = {
                g.role for g in grants if g.principal == principal and _reaches(g, container)
            } - NON_BLOB_ROLES
            if roles != READ_ONLY_ROLES:
                findings.append(
                    f"audit trail: {principal} must hold exactly Storage Blob Data Reader on "
                    f"{container} (byok audit verify reads both audit containers), holds "
                    f"{sorted(_role_name(r) for r in roles)}"
                )
    return findings


def check_forbidden_role_ids(root: Path) -> Findings:
    """No Owner-class role id anywhere in the templates, whatever the checks above make of them."""
    findings: Findings = []
    for path in sorted([*root.rglob("*.bicep"), *root.rglob("*.json")]):
        text = path.read_text(encoding="utf-8").lower()
        for role, name in FORBIDDEN_ROLES.items():
            if role in text:
                findings.append(f"roles: {path.relative_to(root)} mentions {name} ({role})")
    return findings


def _diagnostic_categories(resource: Resource) -> set[str]:
    logs = _dig(resource.body, "properties", "logs") or []
    return {str(log.get("category")) for log in logs if log.get("enabled") is True}


def check_monitoring(dep: Deployment) -> Findings:
    findings: Findings = []
    hsms = dep.resources("Microsoft.KeyVault/managedHSMs", existing=True)
    if len(hsms) != 1:
        return [f"monitoring: the Managed HSM must be referenced as existing (found {len(hsms)})"]
    if dep.resources("Microsoft.KeyVault/managedHSMs"):
        findings.append("monitoring: the Managed HSM must not be created or modified here")
    diagnostics = dep.resources("Microsoft.Insights/diagnosticSettings")
    by_scope = {(d.file, str(d.body.get("scope"))): d for d in diagnostics}
    hsm_diag = by_scope.get((hsms[0].file, hsms[0].symbol))
    if hsm_diag is None or "AuditEvent" not in _diagnostic_categories(hsm_diag):
        findings.append("monitoring: the HSM's AuditEvent logs must go to the workspace")
    for service in dep.resources("Microsoft.Storage/storageAccounts/blobServices"):
        blob_diag = by_scope.get((service.file, service.symbol))
        wanted = {"StorageRead", "StorageWrite", "StorageDelete"}
        if blob_diag is None or not wanted <= _diagnostic_categories(blob_diag):
            findings.append("monitoring: blob read/write/delete logs must go to the workspace")
    for diag in diagnostics:
        if not _dig(diag.body, "properties", "workspaceId"):
            findings.append(f"monitoring: {diag.file}:{diag.symbol} has no workspaceId")
    components = dep.resources("Microsoft.Insights/components")
    if len(components) != 1:
        return [*findings, "monitoring: expected one Application Insights component"]
    component = _dig(components[0].body, "properties") or {}
    if component.get("DisableLocalAuth") is not True or not component.get("WorkspaceResourceId"):
        findings.append("monitoring: App Insights must be workspace-based with local auth disabled")
    if len(dep.resources("Microsoft.OperationalInsights/workspaces")) != 1:
        findings.append("monitoring: expected one Log Analytics workspace")
    return findings


def _loaded_file(dep: Deployment, resource: Resource, value: Any) -> Path | None:
    function = _dig(value, "function")
    if isinstance(function, dict) and function.get("type") == "replace":
        function = _dig(function, "parameters", "original_string", "function")
    if not isinstance(function, dict) or function.get("type") != "load_text_content":
        return None
    relative = str(function["parameters"]["file_path"])
    return (dep.root / resource.file).parent / relative


def check_dashboards(dep: Deployment) -> Findings:
    findings: Findings = []
    workbooks = dep.resources("Microsoft.Insights/workbooks")
    if len(workbooks) != 1:
        return [f"dashboards: expected one workbook, found {len(workbooks)}"]
    workbook = workbooks[0]
    data = _loaded_file(dep, workbook, _dig(workbook.body, "properties", "serializedData"))
    if data is None or data.resolve() != (dep.root / "workbook.json").resolve():
        findings.append("dashboards: the workbook must load infra/workbook.json")
    # Opened from Monitor > Workbooks, a workbook queries its fallbackResourceIds.
    serialized = _dig(workbook.body, "properties", "serializedData", "function", "parameters")
    fallback = []
    if data is not None and data.is_file():
        fallback = json.loads(data.read_text(encoding="utf-8")).get("fallbackResourceIds", [])
    if (
        not isinstance(serialized, dict)
        or fallback != [WORKBOOK_WORKSPACE_PLACEHOLDER]
        or serialized.get("old_string") != WORKBOOK_WORKSPACE_PLACEHOLDER
        or serialized.get("new_string") != "workspaceId"
    ):
        findings.append(
            "dashboards: the workbook's fallbackResourceIds must be the workspace "
            f"({WORKBOOK_WORKSPACE_PLACEHOLDER} replaced with workspaceId)"
        )
    alert_events: set[str] = set()
    alert_texts: list[str] = []
    for rule in dep.resources("Microsoft.Insights/scheduledQueryRules"):
        props = rule.body.get("properties", {})
        frequency = _minutes(props.get("evaluationFrequency"))
        window = _minutes(props.get("windowSize"))
        for criterion in _dig(props, "criteria", "allOf") or []:
            query_file = _loaded_file(dep, rule, criterion.get("query"))
            if query_file is None or not query_file.is_file():
                findings.append(f"dashboards: {rule.symbol} must load its query from infra/queries")
                continue
            text = KQL_COMMENT_RE.sub("", query_file.read_text(encoding="utf-8"))
            alert_texts.append(text)
            alert_events |= set(EVENT_RE.findall(text))
            # Ingestion delay: look back well beyond the evaluation frequency, and count each
            # record once by its ingestion time.
            if frequency is None or window is None or window < max(15, 3 * frequency):
                findings.append(
                    f"dashboards: {rule.symbol} window {window} min leaves no room for "
                    f"ingestion delay (evaluated every {frequency} min)"
                )
            if not re.search(rf"ingestion_time\(\)\s*>\s*ago\({frequency}m\)", text):
                findings.append(
                    f"dashboards: {rule.symbol} must count records ingested in the last "
                    f"{frequency} min (ingestion_time()), or overlapping windows alert twice"
                )
            if METRIC_TABLE in text:
                findings.extend(
                    f"dashboards: {rule.symbol}: {f}"
                    for f in metric_alert_findings(criterion, text)
                )
    if "byok.verification_failed" not in alert_events:
        findings.append("dashboards: no alert rule for byok.verification_failed")
    if "byok.failed" not in alert_events and not any(
        METRIC_TABLE in text
        and _metric_names(text) == [PACKAGES]
        and _metric_values(text, STATE) == {"failed"}
        for text in alert_texts
    ):
        findings.append(
            f"dashboards: no alert rule for byok.failed (the event, or the metric {PACKAGES} "
            'with state "failed")'
        )
    for table, marker, what in (
        ("StorageBlobLogs", "/byok-deadletter/", "dead-lettered events"),
        ("StorageQueueLogs", "webjobs-blobtrigger-poison", "poison blob-trigger messages"),
    ):
        if not any(table in text and marker in text for text in alert_texts):
            findings.append(f"dashboards: no alert rule for {what} ({table}, {marker})")
    return findings


def metric_alert_findings(criterion: dict[str, Any], query: str) -> Findings:
    """An alert over a metric counts the column it sums (``metricMeasureColumn``, a
    ``timeAggregation`` of ``Total``), splits only by columns the query groups by, and names
    only recorded metrics and their attributes."""
    findings: Findings = metric_query_findings(query)
    column = criterion.get("metricMeasureColumn")
    if not isinstance(column, str) or not re.search(rf"\b{re.escape(column)}\s*=\s*sum\(", query):
        findings.append(
            f"a metric alert needs metricMeasureColumn naming a sum() of its query, has {column!r}"
        )
    if criterion.get("timeAggregation") != "Total":
        findings.append(
            f"a metric alert totals its measure column (timeAggregation 'Total'), "
            f"has {criterion.get('timeAggregation')!r}"
        )
    by = re.search(r"\bsummarize\b[^|]*\bby\b([^|]*)", query)
    grouped = set(re.findall(r"\b(\w+)\s*=", by.group(1))) if by else set()
    for dimension in criterion.get("dimensions") or []:
        if dimension.get("name") not in grouped:
            findings.append(
                f"alert dimension {dimension.get('name')!r} is not a column of its query"
            )
    return findings


def _minutes(duration: Any) -> int | None:
    match = re.fullmatch(r"PT(?:(\d+)H)?(?:(\d+)M)?", str(duration))
    if not match or not any(match.groups()):
        return None
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


BICEP_CHECKS = {
    "storage": check_storage,
    "containers": check_containers,
    "audit-immutability": check_audit_immutability,
    "function-app": check_function_app,
    "app-settings": check_app_settings,
    "event-grid": check_event_grid,
    "role-assignments": check_role_assignments,
    "custom-roles": check_custom_roles,
    "import-authorization": check_import_authorization,
    "audit-trail-roles": check_audit_trail_roles,
    "audit-signing-kid": check_audit_signing_kid,
    "monitoring": check_monitoring,
    "dashboards": check_dashboards,
}


def all_findings(dep: Deployment) -> Findings:
    findings = [f for check in BICEP_CHECKS.values() for f in check(dep)]
    return findings + check_forbidden_role_ids(dep.root)


# --------------------------------------------------------------------------- queries


# A package's events follow its processing: an event can carry what the stage before it knew
# (a refusal after validation names the key; a verification failure knows the imported key's
# KEK and fingerprint result). The schema's allOf lists what each event always carries; with
# these stages, what it can carry.
EARLIER_STAGE = {
    "byok.validated": "byok.received",
    "byok.importing": "byok.validated",
    "byok.imported": "byok.importing",
    "byok.verified": "byok.imported",
    "byok.rejected": "byok.validated",
    "byok.failed": "byok.importing",
    "byok.verification_failed": "byok.imported",
    "byok.duplicate": "byok.validated",
}


@dataclass(frozen=True)
class AuditSchema:
    fields: frozenset[str]
    events: frozenset[str]
    carries: dict[str, frozenset[str]]


def load_audit_schema() -> AuditSchema:
    schema = json.loads(AUDIT_SCHEMA.read_text(encoding="utf-8"))
    common = set(schema["required"])
    required: dict[str, set[str]] = {}
    for rule in schema.get("allOf", []):
        event = _dig(rule, "if", "properties", "event", "const")
        if isinstance(event, str):
            then = rule.get("then", {})
            required[event] = set(then.get("required", [])) | set(then.get("properties", {}))
    # Fields no event is required to carry are optional for every event (message, drop_time...).
    claimed = set().union(*required.values()) if required else set()
    optional = set(schema["properties"]) - claimed - common
    events = frozenset(schema["properties"]["event"]["enum"])
    carries: dict[str, frozenset[str]] = {}
    for event in events:
        fields = common | optional
        stage: str | None = event
        while stage is not None:
            fields |= required.get(stage, set())
            stage = EARLIER_STAGE.get(stage)
        carries[event] = frozenset(fields)
    return AuditSchema(fields=frozenset(schema["properties"]), events=events, carries=carries)


def workbook_queries(node: Any) -> Iterator[str]:
    """Every KQL query in a workbook, including those in groups."""
    if isinstance(node, dict):
        content = node.get("content")
        if node.get("type") == 3 and isinstance(content, dict) and "query" in content:
            yield str(content["query"])
        for value in node.values():
            yield from workbook_queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from workbook_queries(item)


# The package spans (one per delivery) in the workspace: table AppRequests, Name "byok.package",
# their attributes in Properties (byok_pipeline.adapters.telemetry.SPAN_ATTRIBUTES).
SPAN_TABLE = "AppRequests"
SPAN_NAME_RE = re.compile(r"\bName\s*==\s*\"([^\"]+)\"")


def span_query_findings(query: str) -> Findings:
    """A query over the package spans: it picks them by name and reads only attributes the
    pipeline sets on them (never an audit field or event)."""
    findings: Findings = []
    names = SPAN_NAME_RE.findall(query)
    if names != [SPAN_NAME]:
        findings.append(f"span query must pick Name == {SPAN_NAME!r}, picks {names}")
    for dotted, indexed in PROPERTY_RE.findall(query):
        name = dotted or indexed
        if name not in SPAN_ATTRIBUTES:
            findings.append(f"span query reads Properties.{name}, which no package span carries")
    for event in sorted(set(EVENT_RE.findall(query)) - {SPAN_NAME}):
        findings.append(f"span query names {event!r}, which is neither the span nor read here")
    if "AppTraces" in query:
        findings.append("a query reads Properties of spans or of audit events, not both")
    return findings


# The pipeline's metrics in the workspace: table AppMetrics, Name the metric's name
# (byok_pipeline.core.metrics.METRICS), its attributes in Properties.
METRIC_TABLE = "AppMetrics"
METRIC_NAME_RE = re.compile(r"\bName\s*(?:==\s*\"([^\"]+)\"|in\s*\(([^)]*)\))")
# A metric attribute compared with a value: tostring(Properties.state) == "imported".
METRIC_VALUE_RE = re.compile(r"Properties\.(\w+)\)?\s*(?:==\s*\"([^\"]*)\"|in\s*\(([^)]*)\))")


def _metric_names(query: str) -> list[str]:
    names: list[str] = []
    for single, listed in METRIC_NAME_RE.findall(query):
        names.extend([single] if single else re.findall(r"\"([^\"]+)\"", listed))
    return names


def _metric_values(query: str, attribute: str) -> set[str]:
    """The values a query compares the metric attribute ``attribute`` with."""
    values: set[str] = set()
    for name, single, listed in METRIC_VALUE_RE.findall(query):
        if name == attribute:
            values.update([single] if single else re.findall(r"\"([^\"]*)\"", listed))
    return values


def metric_query_findings(query: str) -> Findings:
    """A query over the pipeline's metrics picks them by name and reads only the attributes
    those metrics carry, compared only with values they can hold (states, reason codes)."""
    findings: Findings = []
    names = _metric_names(query)
    if not names:
        findings.append(f"metric query must pick its metrics by Name ({sorted(METRICS)})")
    for name in names:
        if name not in METRICS:
            findings.append(f"metric query names {name!r}, which the pipeline never records")
    carried = set().union(*(METRICS[n].attributes for n in names if n in METRICS))
    for dotted, indexed in PROPERTY_RE.findall(query):
        name = dotted or indexed
        if name not in carried:
            findings.append(
                f"metric query reads Properties.{name}, which none of {sorted(set(names))} carries"
            )
    allowed = {STATE: set(STATES), REASON_CODE: set(REASONS) | {OTHER_REASON}}
    for attribute, values in allowed.items():
        for value in sorted(_metric_values(query, attribute) - values):
            findings.append(f"metric query compares Properties.{attribute} with {value!r}")
    for other in ("AppTraces", SPAN_TABLE, "customDimensions"):
        if other in query:
            findings.append(f"a metric query reads {METRIC_TABLE} only, not {other}")
    return findings


def query_findings(query: str, schema: AuditSchema) -> Findings:
    query = KQL_COMMENT_RE.sub("", query)
    if METRIC_TABLE in query:
        return metric_query_findings(query)
    if SPAN_TABLE in query:
        return span_query_findings(query)
    findings: Findings = []
    for dotted, indexed in PROPERTY_RE.findall(query):
        name = dotted or indexed
        if name not in schema.fields:
            findings.append(f"query names field Properties.{name}, which the pipeline never emits")
    events = set(EVENT_RE.findall(query))
    for event in sorted(events):
        if event not in schema.events:
            findings.append(f"query names event {event!r}, which the pipeline never emits")
    # A query that filters on events may read only fields those events can carry.
    if events and events <= schema.events:
        can_carry = set().union(*(schema.carries[e] for e in events))
        for dotted, indexed in PROPERTY_RE.findall(query):
            name = dotted or indexed
            if name in schema.fields and name not in can_carry:
                findings.append(
                    f"query reads Properties.{name}, which none of {sorted(events)} carries"
                )
    if "customDimensions" in query:
        findings.append("query uses customDimensions: in the workspace the column is Properties")
    if "Properties" in query and "AppTraces" not in query:
        findings.append("query reads Properties but not from table AppTraces")
    return findings


def workbook_findings(workbook: Any, schema: AuditSchema) -> Findings:
    queries = list(workbook_queries(workbook))
    if not queries:
        return ["workbook: no queries"]
    findings = [f for query in queries for f in query_findings(query, schema)]
    text = KQL_COMMENT_RE.sub("", "\n".join(queries))
    events = set(EVENT_RE.findall(text))
    fields = {dotted or indexed for dotted, indexed in PROPERTY_RE.findall(text)}
    findings.extend(
        f"workbook: no query covers {event}"
        for event in sorted({"byok.received"} | FINAL_EVENTS)
        if event not in events
    )
    findings.extend(
        f"workbook: no query uses Properties.{name}"
        for name in ("reason_code", "drop_time", "time", "package_sha256")
        if name not in fields
    )
    if not re.search(r"percentile\([^)]*,\s*50\)", text) or not re.search(
        r"percentile\([^)]*,\s*95\)", text
    ):
        findings.append("workbook: time from drop to import needs p50 and p95")
    return findings + panel_findings(workbook, queries)


def _parameter_names(node: Any) -> set[str]:
    if isinstance(node, dict):
        is_parameter = node.get("version") == "KqlParameterItem/1.0" and "name" in node
        found = {str(node["name"])} if is_parameter else set()
        return found.union(*(_parameter_names(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_parameter_names(v) for v in node))
    return set()


def panel_findings(workbook: Any, queries: list[str]) -> Findings:
    """The panels beyond the audit events: retries in flight (spans), each package's current
    state, and blobs waiting past a threshold (lost events, from the storage logs)."""
    findings: Findings = []
    texts = [KQL_COMMENT_RE.sub("", q) for q in queries]
    retry_filter = re.compile(r'\bwhere\s+outcome\s+(?:in\s*\(|==\s*)"retry"')
    if not any(
        SPAN_TABLE in t and "Properties.outcome" in t and retry_filter.search(t) for t in texts
    ):
        findings.append("workbook: no panel shows retries in flight (package spans, outcome retry)")
    if not any(
        re.search(r"arg_max\([^)]*\)[^|]*\bby\s+package_sha256", t) and "AppTraces" in t
        for t in texts
    ):
        findings.append("workbook: no panel shows each package's current state")
    charted = {n for t in texts if METRIC_TABLE in t for n in _metric_names(t)}
    findings.extend(
        f"workbook: no panel charts the metric {name}" for name in sorted(set(METRICS) - charted)
    )
    params = _parameter_names(workbook)
    lost = [
        t
        for t in texts
        if "StorageBlobLogs" in t and "/byok-incoming/" in t and '"byok.received"' in t
    ]
    if not lost:
        findings.append("workbook: no panel shows blobs waiting in byok-incoming (lost events)")
    for t in lost:
        used = set(re.findall(r"\{(\w+)\}", t))
        if not used or not used <= params:
            findings.append(
                f"workbook: the lost-events panel needs its threshold parameter: uses {sorted(used)}, "
                f"the workbook defines {sorted(params)}"
            )
    return findings


# --------------------------------------------------------------------------- checkov


def run_checkov(python: Path, directory: Path) -> dict[str, Any]:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}
    proc = subprocess.run(
        [
            str(python),
            "-m",
            "checkov.main",
            "--framework",
            "bicep",
            "--directory",
            str(directory),
            "--output",
            "json",
            "--compact",
            "--skip-download",
            "--soft-fail",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
        env=env,
        cwd=directory,
    )
    if proc.returncode != 0:
        pytest.fail(f"checkov exited {proc.returncode}: {proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    if isinstance(report, list):  # one report per framework when more than one ran
        report = next(r for r in report if r.get("check_type") == "bicep")
    assert isinstance(report, dict)
    return report


def failed_checks(report: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (c["check_id"], c["file_path"], c["resource"]) for c in report["results"]["failed_checks"]
    }


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def parsed(infra_python: Path) -> tuple[Deployment, dict[str, str]]:
    return load_deployment(infra_python, INFRA_DIR)


@pytest.fixture(scope="module")
def deployment(parsed: tuple[Deployment, dict[str, str]]) -> Deployment:
    dep, errors = parsed
    assert errors == {}, f"pycep could not parse: {errors}"
    return dep


@pytest.fixture(scope="module")
def checkov_report(infra_python: Path) -> dict[str, Any]:
    return run_checkov(infra_python, INFRA_DIR)


@pytest.fixture(scope="module")
def audit_schema() -> AuditSchema:
    return load_audit_schema()


# Each mutation weakens one property in a copy of infra/; the checks must notice.
# (id, file, text to replace, replacement, a phrase the findings must contain)
MUTATIONS = [
    (
        "shared-key",
        "modules/storage.bicep",
        "allowSharedKeyAccess: false",
        "allowSharedKeyAccess: true",
        "allowSharedKeyAccess",
    ),
    (
        "tls",
        "modules/storage.bicep",
        "minimumTlsVersion: 'TLS1_2'",
        "minimumTlsVersion: 'TLS1_0'",
        "minimumTlsVersion",
    ),
    (
        "public-blob",
        "modules/storage.bicep",
        "allowBlobPublicAccess: false",
        "allowBlobPublicAccess: true",
        "allowBlobPublicAccess",
    ),
    (
        "http",
        "modules/storage.bicep",
        "supportsHttpsTrafficOnly: true",
        "supportsHttpsTrafficOnly: false",
        "supportsHttpsTrafficOnly",
    ),
    (
        "versioning",
        "modules/storage.bicep",
        "isVersioningEnabled: true",
        "isVersioningEnabled: false",
        "versioning",
    ),
    (
        "append-writes",
        "modules/storage.bicep",
        (
            "parent: auditContainer\n  name: 'default'\n  properties: {\n"
            "    immutabilityPeriodSinceCreationInDays: auditRetentionDays\n"
            "    allowProtectedAppendWrites: true"
        ),
        (
            "parent: auditContainer\n  name: 'default'\n  properties: {\n"
            "    immutabilityPeriodSinceCreationInDays: auditRetentionDays\n"
            "    allowProtectedAppendWrites: false"
        ),
        "allowProtectedAppendWrites(All) must be true on byok-audit,",
    ),
    (
        "immutability-elsewhere",
        "modules/storage.bicep",
        "parent: auditContainer\n  name: 'default'",
        "parent: blobService\n  name: 'default'",
        "not the audit container",
    ),
    (
        "container-renamed",
        "main.bicep",
        "incoming: 'byok-incoming'",
        "incoming: 'byok-inbox'",
        "subjectBeginsWith",
    ),
    (
        "event-type",
        "modules/eventsubscription.bicep",
        (
            "        'Microsoft.Storage.BlobCreated'\n      ]\n"
            "      subjectBeginsWith: '/blobServices/default/containers/${incomingContainerName}"
        ),
        (
            "        'Microsoft.Storage.BlobDeleted'\n      ]\n"
            "      subjectBeginsWith: '/blobServices/default/containers/${incomingContainerName}"
        ),
        "includedEventTypes",
    ),
    (
        "event-subject",
        "modules/eventsubscription.bicep",
        "containers/${incomingContainerName}/blobs/",
        "containers/${deadletterContainerName}/blobs/",
        "subjectBeginsWith",
    ),
    (
        "connection-string",
        "modules/functionapp.bicep",
        "name: 'BYOK_STORAGE__credential'\n          value: 'managedidentity'",
        "name: 'BYOK_STORAGE'\n          value: 'DefaultEndpointsProtocol=https;AccountKey=x'",
        "connection string",
    ),
    (
        "blob-data-owner",
        "modules/roles.bicep",
        f"storageBlobDataContributor: '{ROLE_BLOB_DATA_CONTRIBUTOR}'",
        "storageBlobDataContributor: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'",
        "Storage Blob Data Owner",
    ),
    (
        "role-name-not-guid",
        "modules/roles.bicep",
        "name: guid(storageAccount.id, functionPrincipalId, roleIds.storageQueueDataContributor)",
        "name: 'function-queue-access'",
        "guid(scope, principal, role)",
    ),
    (
        "policy-redeployed-when-locked",
        "modules/storage.bicep",
        " = if (!auditPolicyLocked) {",
        " = {",
        "auditPolicyLocked",
    ),
    (
        "listkeys-on-first-pass",
        "main.bicep",
        "module eventSubscription 'modules/eventsubscription.bicep' = if (deployEventSubscription) {",
        "module eventSubscription 'modules/eventsubscription.bicep' = {",
        "listKeys",
    ),
    (
        "function-blob-account-wide",
        "modules/roles.bicep",
        "  scope: functionContainers[i]\n",
        "  scope: storageAccount\n",
        "account-wide",
    ),
    (
        "function-reads-deployment-package",
        "modules/roles.bicep",
        "  'azure-webjobs-secrets'\n]",
        "  'azure-webjobs-secrets'\n  deploymentContainerName\n]",
        "deployment package",
    ),
    (
        "deployment-with-runtime-identity",
        "modules/functionapp.bicep",
        "userAssignedIdentityResourceId: deploymentIdentity.id",
        "userAssignedIdentityResourceId: identity.id",
        "its own identity",
    ),
    (
        "uploader-may-delete",
        "modules/roles.bicep",
        (
            "    description: 'byok-managed-hsm uploader: drop .byok packages into the incoming container'\n"
            "    condition: noDeleteCondition\n"
        ),
        "    description: 'byok-managed-hsm uploader: drop .byok packages into the incoming container'\n",
        "ABAC condition",
    ),
    (
        "auditor-writes-audit",
        "modules/roles.bicep",
        (
            "name: guid(auditContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: auditContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)"
        ),
        (
            "name: guid(auditContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: auditContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)"
        ),
        "auditorPrincipalIds holds",
    ),
    (
        "workbook-unscoped",
        "modules/dashboards.bicep",
        "replace(loadTextContent('../workbook.json'), '__WORKSPACE_ID__', workspaceId)",
        "loadTextContent('../workbook.json')",
        "fallbackResourceIds",
    ),
    (
        "alert-window-too-short",
        "modules/dashboards.bicep",
        (
            "    windowSize: 'PT20M'\n    scopes: [\n      workspaceId\n    ]\n    criteria: {\n"
            "      allOf: [\n        {\n          query: loadTextContent('../queries/alert-failed.kql')"
        ),
        (
            "    windowSize: 'PT5M'\n    scopes: [\n      workspaceId\n    ]\n    criteria: {\n"
            "      allOf: [\n        {\n          query: loadTextContent('../queries/alert-failed.kql')"
        ),
        "ingestion delay",
    ),
    (
        "failed-alert-unknown-metric",
        "queries/alert-failed.kql",
        'Name == "byok.packages"',
        'Name == "byok.package_count"',
        "byok.package_count",
    ),
    (
        "failed-alert-no-measure-column",
        "modules/dashboards.bicep",
        "metricMeasureColumn: 'failed'",
        "metricMeasureColumn: 'failures'",
        "metricMeasureColumn",
    ),
    (
        "failed-alert-on-another-state",
        "queries/alert-failed.kql",
        'tostring(Properties.state) == "failed"',
        'tostring(Properties.state) == "rejected"',
        "no alert rule for byok.failed",
    ),
    (
        "no-poison-alert",
        "modules/dashboards.bicep",
        "query: loadTextContent('../queries/alert-poison.kql')",
        "query: loadTextContent('../queries/alert-failed.kql')",
        "poison",
    ),
    (
        "https-only",
        "modules/functionapp.bicep",
        "httpsOnly: true",
        "httpsOnly: false",
        "httpsOnly",
    ),
    (
        "python-version",
        "modules/functionapp.bicep",
        "version: '3.11'",
        "version: '3.10'",
        "python 3.11",
    ),
    (
        "ftp",
        "modules/functionapp.bicep",
        "name: 'ftp'\n  properties: {\n    allow: false",
        "name: 'ftp'\n  properties: {\n    allow: true",
        "FTP",
    ),
    (
        "appinsights-local-auth",
        "modules/monitoring.bicep",
        "DisableLocalAuth: true",
        "DisableLocalAuth: false",
        "local auth",
    ),
    (
        "hsm-audit-log",
        "modules/hsm-diagnostics.bicep",
        "category: 'AuditEvent'",
        "category: 'AzurePolicyEvaluationDetails'",
        "AuditEvent",
    ),
    # Import authorization: the policy, the approvals and the people's data-only role.
    (
        "config-container-missing",
        "modules/storage.bicep",
        "  configContainerName\n  approvalsContainerName\n",
        "  approvalsContainerName\n",
        "not created",
    ),
    (
        "uploader-writes-policy",
        "modules/roles.bicep",
        (
            "name: guid(approvalsContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: approvalsContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm uploader: write signed approvals'"
        ),
        (
            "name: guid(configContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: configContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm uploader: write signed approvals'"
        ),
        "uploaderPrincipalIds can write byok-config",
    ),
    (
        "admin-cannot-write-policy",
        "modules/roles.bicep",
        "name: guid(configContainer.id, principalId, blobWriterRole.id)\n  scope: configContainer\n",
        (
            "name: guid(approvalsContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: approvalsContainer\n"
        ),
        "policyAdminPrincipalIds cannot write byok-config",
    ),
    (
        "function-writes-policy",
        "modules/roles.bicep",
        (
            "name: guid(configContainer.id, functionPrincipalId, roleIds.storageBlobDataReader)\n"
            "  scope: configContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)"
        ),
        (
            "name: guid(configContainer.id, functionPrincipalId, roleIds.storageBlobDataReader)\n"
            "  scope: configContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)"
        ),
        "read only",
    ),
    (
        "function-writes-approvals",
        "modules/roles.bicep",
        (
            "name: guid(approvalsContainer.id, functionPrincipalId, "
            "roleIds.storageBlobDataReader)\n"
            "  scope: approvalsContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)"
        ),
        (
            "name: guid(approvalsContainer.id, functionPrincipalId, "
            "roleIds.storageBlobDataReader)\n"
            "  scope: approvalsContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId"
        ),
        "functionPrincipalId can write byok-approvals",
    ),
    (
        "uploader-back-to-contributor",
        "modules/roles.bicep",
        (
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm uploader: drop .byok packages"
        ),
        (
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm uploader: drop .byok packages"
        ),
        "its control-plane Actions can delete the container",
    ),
    (
        "custodian-audit-contributor",
        "modules/roles.bicep",
        (
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian: append signed KEK"
        ),
        (
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian: append signed KEK"
        ),
        "custodianPrincipalIds holds Storage Blob Data Contributor on byok-audit-people",
    ),
    # The audit trail: each writer appends to its own container only (AUDIT_WRITERS).
    (
        "custodian-writes-audit",
        "modules/roles.bicep",
        (
            "name: guid(auditPeopleContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: auditPeopleContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian:"
        ),
        (
            "name: guid(auditContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: auditContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian:"
        ),
        "custodianPrincipalIds can write byok-audit:",
    ),
    (
        "custodian-reads-and-writes-audit",
        "modules/roles.bicep",
        (
            "name: guid(statusContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: statusContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian:"
        ),
        (
            "name: guid(auditContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: auditContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    condition: noDeleteCondition\n"
            "    conditionVersion: '2.0'\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian:"
        ),
        "custodianPrincipalIds can write byok-audit:",
    ),
    (
        "uploader-writes-audit",
        "modules/roles.bicep",
        (
            "name: guid(approvalsContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: approvalsContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm uploader: write signed approvals'"
        ),
        (
            "name: guid(auditContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: auditContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm uploader: write signed approvals'"
        ),
        "uploaderPrincipalIds can write byok-audit:",
    ),
    (
        "admin-writes-audit",
        "modules/roles.bicep",
        (
            "name: guid(auditPeopleContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: auditPeopleContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm policy administrator:"
        ),
        (
            "name: guid(auditContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: auditContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm policy administrator:"
        ),
        "policyAdminPrincipalIds can write byok-audit:",
    ),
    (
        "function-writes-people-audit",
        "modules/roles.bicep",
        "name: guid(auditContainer.id, functionPrincipalId, blobWriterRole.id)\n  scope: auditContainer\n",
        (
            "name: guid(auditPeopleContainer.id, functionPrincipalId, blobWriterRole.id)\n"
            "  scope: auditPeopleContainer\n"
        ),
        "functionPrincipalId can write byok-audit-people",
    ),
    (
        "function-contributor-on-people-audit",
        "modules/roles.bicep",
        "  quarantineContainerName\n  'azure-webjobs-hosts'\n",
        "  quarantineContainerName\n  auditPeopleContainerName\n  'azure-webjobs-hosts'\n",
        "functionPrincipalId can write byok-audit-people",
    ),
    (
        "function-audit-contributor",
        "modules/roles.bicep",
        "  quarantineContainerName\n  'azure-webjobs-hosts'\n",
        "  quarantineContainerName\n  auditContainerName\n  'azure-webjobs-hosts'\n",
        "functionPrincipalId writes byok-audit with Storage Blob Data Contributor",
    ),
    (
        "function-audit-may-delete",
        "modules/roles.bicep",
        (
            "    description: 'byok-managed-hsm function: create and append its signed audit chains'\n"
            "    condition: noDeleteCondition\n"
        ),
        "    description: 'byok-managed-hsm function: create and append its signed audit chains'\n",
        (
            "functionPrincipalId writes byok-audit with the custom blob writer role on byok-audit "
            "without the no-delete condition"
        ),
    ),
    (
        "people-audit-writer-may-delete",
        "modules/roles.bicep",
        (
            "    description: 'byok-managed-hsm policy administrator: append signed policy events "
            "to the people audit container'\n"
            "    condition: noDeleteCondition\n"
        ),
        (
            "    description: 'byok-managed-hsm policy administrator: append signed policy events "
            "to the people audit container'\n"
        ),
        (
            "policyAdminPrincipalIds writes byok-audit-people with the custom blob writer role on "
            "byok-audit-people without the no-delete condition"
        ),
    ),
    (
        "people-audit-writer-contributor",
        "modules/roles.bicep",
        (
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm policy administrator: append signed policy"
        ),
        (
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm policy administrator: append signed policy"
        ),
        "policyAdminPrincipalIds writes byok-audit-people with Storage Blob Data Contributor",
    ),
    (
        "custodian-cannot-write-people-audit",
        "modules/roles.bicep",
        (
            "name: guid(auditPeopleContainer.id, principalId, blobWriterRole.id)\n"
            "  scope: auditPeopleContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian:"
        ),
        (
            "name: guid(approvalsContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: approvalsContainer\n"
            "  properties: {\n"
            "    roleDefinitionId: blobWriterRoleId\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm custodian:"
        ),
        "custodianPrincipalIds cannot write byok-audit-people",
    ),
    (
        "auditor-cannot-read-people-audit",
        "modules/roles.bicep",
        (
            "name: guid(auditPeopleContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: auditPeopleContainer\n"
        ),
        (
            "name: guid(statusContainer.id, principalId, roleIds.storageBlobDataReader)\n"
            "  scope: statusContainer\n"
        ),
        "auditorPrincipalIds must hold exactly Storage Blob Data Reader on byok-audit-people",
    ),
    (
        "auditor-writes-people-audit",
        "modules/roles.bicep",
        (
            "    roleDefinitionId: subscriptionResourceId("
            "'Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm auditor: read the people audit chains'"
        ),
        (
            "    roleDefinitionId: blobWriterRoleId\n"
            "    condition: noDeleteCondition\n"
            "    conditionVersion: '2.0'\n"
            "    principalId: principalId\n"
            "    description: 'byok-managed-hsm auditor: read the people audit chains'"
        ),
        "auditorPrincipalIds can write byok-audit-people",
    ),
    (
        "people-audit-container-missing",
        "main.bicep",
        (
            "    auditPeopleContainerName: containerNames.auditPeople\n    configContainerName: "
            "containerNames.config\n    approvalsContainerName: containerNames.approvals\n"
            "    deadletterContainerName"
        ),
        (
            "    auditPeopleContainerName: containerNames.config\n    configContainerName: "
            "containerNames.config\n    approvalsContainerName: containerNames.approvals\n"
            "    deadletterContainerName"
        ),
        "not created: ['byok-audit-people']",
    ),
    (
        "people-audit-public",
        "modules/storage.bicep",
        "  name: auditPeopleContainerName\n  properties: {\n    publicAccess: 'None'",
        "  name: auditPeopleContainerName\n  properties: {\n    publicAccess: 'Blob'",
        "byok-audit-people must have publicAccess 'None'",
    ),
    (
        "people-audit-not-immutable",
        "modules/storage.bicep",
        "parent: auditPeopleContainer\n  name: 'default'",
        "parent: auditContainer\n  name: 'default'",
        "byok-audit-people has no immutability policy",
    ),
    (
        "people-audit-no-appends",
        "modules/storage.bicep",
        (
            "parent: auditPeopleContainer\n  name: 'default'\n  properties: {\n"
            "    immutabilityPeriodSinceCreationInDays: auditRetentionDays\n"
            "    allowProtectedAppendWrites: true"
        ),
        (
            "parent: auditPeopleContainer\n  name: 'default'\n  properties: {\n"
            "    immutabilityPeriodSinceCreationInDays: auditRetentionDays\n"
            "    allowProtectedAppendWrites: false"
        ),
        "allowProtectedAppendWrites(All) must be true on byok-audit-people",
    ),
    (
        "people-audit-shorter-retention",
        "modules/storage.bicep",
        (
            "parent: auditPeopleContainer\n  name: 'default'\n  properties: {\n"
            "    immutabilityPeriodSinceCreationInDays: auditRetentionDays\n"
        ),
        (
            "parent: auditPeopleContainer\n  name: 'default'\n  properties: {\n"
            "    immutabilityPeriodSinceCreationInDays: 1\n"
        ),
        "same retention",
    ),
    (
        "people-policy-redeployed-when-locked",
        "modules/storage.bicep",
        " = if (!auditPeoplePolicyLocked) {",
        " = {",
        "if (!auditPeoplePolicyLocked)",
    ),
    (
        "people-policy-on-the-other-switch",
        "modules/storage.bicep",
        " = if (!auditPeoplePolicyLocked) {",
        " = if (!auditPolicyLocked) {",
        "if (!auditPeoplePolicyLocked)",
    ),
    (
        "signing-kid-literal",
        "modules/functionapp.bicep",
        "name: 'BYOK_AUDIT_SIGNING_KID'\n          value: auditSigningKid",
        "name: 'BYOK_AUDIT_SIGNING_KID'\n          value: ''",
        "must come from main.bicep's parameter auditSigningKid",
    ),
    (
        "signing-kid-other-parameter",
        "main.bicep",
        "    auditSigningKid: auditSigningKid\n",
        "    auditSigningKid: kekKid\n",
        "must come from main.bicep's parameter auditSigningKid, not kekKid",
    ),
    (
        "signing-kid-setting-missing",
        "modules/functionapp.bicep",
        "name: 'BYOK_AUDIT_SIGNING_KID'\n",
        "name: 'BYOK_AUDIT_SIGNING_KEY'\n",
        "no BYOK_AUDIT_SIGNING_KID setting",
    ),
    (
        "signing-kid-default",
        "main.bicep",
        "param auditSigningKid string = ''",
        "param auditSigningKid string = 'https://contoso.managedhsm.azure.net/keys/byok-audit-signer'",
        "default ''",
    ),
    (
        "approvals-may-delete",
        "modules/roles.bicep",
        (
            "    description: 'byok-managed-hsm custodian: write signed approvals'\n"
            "    condition: noDeleteCondition\n"
        ),
        "    description: 'byok-managed-hsm custodian: write signed approvals'\n",
        "ABAC condition",
    ),
    (
        "writer-role-container-delete",
        "modules/roles.bicep",
        "        actions: []\n",
        (
            "        actions: [\n"
            "          'Microsoft.Storage/storageAccounts/blobServices/containers/delete'\n"
            "        ]\n"
        ),
        "control-plane action",
    ),
    (
        "writer-role-blob-delete",
        "modules/roles.bicep",
        "          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action'\n",
        (
            "          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action'\n"
            "          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete'\n"
        ),
        "delete data action",
    ),
    (
        "writer-role-wildcard",
        "modules/roles.bicep",
        "          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read'\n",
        "          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/*'\n",
        "beyond read/write/add",
    ),
    (
        "writer-role-subscription-wide",
        "modules/roles.bicep",
        "    assignableScopes: [\n      resourceGroup().id\n    ]",
        "    assignableScopes: [\n      subscription().id\n    ]",
        "assignable only in this resource group",
    ),
    (
        "writer-role-name-clash",
        "modules/roles.bicep",
        "roleName: 'BYOK Blob Writer (${resourceGroup().name}, ${uniqueString(resourceGroup().id)})'",
        "roleName: 'BYOK Blob Writer'",
        "unique in the tenant",
    ),
    (
        "policy-blob-renamed",
        "main.bicep",
        "var policyBlobName = 'import-policy.json'",
        "var policyBlobName = 'policy.json'",
        "BYOK_POLICY_BLOB",
    ),
    (
        "approvals-setting-missing",
        "modules/functionapp.bicep",
        "          name: 'BYOK_APPROVALS_CONTAINER'\n",
        "          name: 'BYOK_APPROVALS'\n",
        "BYOK_APPROVALS_CONTAINER",
    ),
    (
        "no-approvals-subscription",
        "modules/eventsubscription.bicep",
        "containers/${approvalsContainerName}/blobs/",
        "containers/${incomingContainerName}/blobs/",
        "no BlobCreated subscription (subjectBeginsWith) for byok-approvals",
    ),
    (
        "approvals-to-wrong-function",
        "main.bicep",
        "var approvalFunctionName = 'process_approval'",
        "var approvalFunctionName = 'process_package'",
        "webhook of process_approval",
    ),
]


@pytest.fixture(scope="module")
def mutants(
    infra_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Deployment, dict[str, str]]]:
    """Every mutated copy of infra/, parsed with one pycep run."""
    base = tmp_path_factory.mktemp("mutants")
    roots: dict[str, Path] = {}
    for mutation_id, relative, old, new, _ in MUTATIONS:
        root = base / mutation_id
        shutil.copytree(INFRA_DIR, root)
        target = root / relative
        text = target.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{mutation_id}: {old!r} must occur once in {relative}"
        target.write_text(text.replace(old, new), encoding="utf-8")
        roots[mutation_id] = root
    files = [f for root in roots.values() for f in sorted(root.rglob("*.bicep"))]
    models, errors = parse_bicep(infra_python, files)
    result = {}
    for mutation_id, root in roots.items():
        prefix = str(root) + os.sep
        own_models = {p: m for p, m in models.items() if p.startswith(prefix)}
        own_errors = {p: e for p, e in errors.items() if p.startswith(prefix)}
        result[mutation_id] = (Deployment(root, own_models), own_errors)
    return result


# --------------------------------------------------------------------------- tests: Bicep


def test_every_bicep_file_parses(parsed: tuple[Deployment, dict[str, str]]) -> None:
    dep, errors = parsed
    assert errors == {}
    expected = {p.relative_to(INFRA_DIR).as_posix() for p in INFRA_DIR.rglob("*.bicep")}
    assert set(dep.files) == expected
    assert {"main.bicep", "modules/storage.bicep", "modules/functionapp.bicep"} <= expected


def test_every_module_is_used_once_from_main(deployment: Deployment) -> None:
    modules = {p for p in deployment.files if p != "main.bicep"}
    assert set(deployment.bindings) == modules


@pytest.mark.parametrize("check", sorted(BICEP_CHECKS))
def test_security_property_holds(deployment: Deployment, check: str) -> None:
    assert BICEP_CHECKS[check](deployment) == []


def test_no_owner_class_role_anywhere() -> None:
    assert check_forbidden_role_ids(INFRA_DIR) == []


@pytest.mark.parametrize(
    ("mutation_id", "phrase"), [(m[0], m[4]) for m in MUTATIONS], ids=[m[0] for m in MUTATIONS]
)
def test_checks_catch_a_weakened_copy(
    mutants: dict[str, tuple[Deployment, dict[str, str]]], mutation_id: str, phrase: str
) -> None:
    dep, errors = mutants[mutation_id]
    assert errors == {}, "the mutated copy must still parse, or the test proves nothing"
    findings = all_findings(dep)
    assert any(phrase.lower() in f.lower() for f in findings), findings


def test_parameters_example_matches_main(deployment: Deployment) -> None:
    example = json.loads(PARAMETERS_EXAMPLE.read_text(encoding="utf-8"))
    declared = deployment.files["main.bicep"]["parameters"]
    given = set(example["parameters"])
    assert given <= set(declared), f"unknown parameters: {given - set(declared)}"
    required = {name for name, p in declared.items() if "default" not in p}
    assert required <= given, f"required parameters missing from the example: {required - given}"
    assert example["parameters"]["deployEventSubscription"]["value"] is False
    assert example["parameters"]["auditPolicyLocked"]["value"] is False
    assert parameters_example_findings(example) == []


ZERO_GUID = "00000000-0000-0000-0000-000000000000"
PRINCIPAL_LIST_PARAMETERS = (
    "uploaderPrincipalIds",
    "statusReaderPrincipalIds",
    "custodianPrincipalIds",
    "auditorPrincipalIds",
    "policyAdminPrincipalIds",
)


def parameters_example_findings(example: dict[str, Any]) -> Findings:
    """Principal lists in the example are empty or real-looking object ids, never the zero GUID
    (a role assignment to it fails only at deployment, far from the mistake)."""
    findings: Findings = []
    if ZERO_GUID in json.dumps(example):
        findings.append("parameters: the example must not ship the all-zero GUID")
    for name in PRINCIPAL_LIST_PARAMETERS:
        values = example["parameters"].get(name, {}).get("value")
        if not isinstance(values, list):
            findings.append(f"parameters: {name} must be a list")
            continue
        for value in values:
            if not GUID_RE.fullmatch(str(value)) or value == ZERO_GUID:
                findings.append(f"parameters: {name} holds {value!r}, not an object id")
    return findings


def test_parameters_example_check_rejects_the_zero_guid() -> None:
    example = json.loads(PARAMETERS_EXAMPLE.read_text(encoding="utf-8"))
    example["parameters"]["uploaderPrincipalIds"] = {"value": [ZERO_GUID]}
    assert any("zero GUID" in f for f in parameters_example_findings(example))


def test_app_settings_are_the_pipelines_own(deployment: Deployment) -> None:
    """The Bicep sets only settings the pipeline documents, with the pipeline's defaults."""
    from byok_pipeline.core.settings import DEFAULTS, SETTINGS_DOC
    from offline_packager.keytypes import TARGET_TYPES

    (site,) = _function_sites(deployment)
    settings = _app_settings(deployment, site)
    own = {
        name
        for name in settings
        if name.startswith("BYOK_") and not name.startswith("BYOK_STORAGE__")
    }
    assert own <= set(SETTINGS_DOC), (
        f"settings the pipeline does not read: {own - set(SETTINGS_DOC)}"
    )
    for name, default in DEFAULTS.items():
        if name in settings:
            assert settings[name] == default, name
    example = json.loads(PARAMETERS_EXAMPLE.read_text(encoding="utf-8"))
    types = example["parameters"]["allowedTargetTypes"]["value"].split(",")
    assert set(types) <= set(TARGET_TYPES), "the example names target types the pipeline rejects"


# --------------------------------------------------------------------------- tests: authorization
# Each property of the import authorization, asserted directly over the grants (the checks above
# say the same in BICEP_CHECKS, and MUTATIONS shows them failing on weakened copies).


def _holders(grants: list[Grant], container: str) -> dict[str, set[str]]:
    """Principal -> the roles it holds on `container`, directly or from a broader scope."""
    holders: dict[str, set[str]] = {}
    for grant in grants:
        if _reaches(grant, container) and grant.role not in NON_BLOB_ROLES:
            holders.setdefault(grant.principal, set()).add(grant.role)
    return holders


@pytest.fixture(scope="module")
def grants(deployment: Deployment) -> list[Grant]:
    found, findings = role_grants(deployment)
    assert findings == []
    return found


def test_config_container_exists_and_only_policy_admins_write_it(
    deployment: Deployment, grants: list[Grant]
) -> None:
    assert CONFIG_CONTAINER in container_names(deployment)
    assert _holders(grants, CONFIG_CONTAINER) == {
        "policyAdminPrincipalIds": {ROLE_BLOB_WRITER},
        FUNCTION_PRINCIPAL: {ROLE_BLOB_DATA_READER},
    }
    admin = [g for g in grants if g.principal == "policyAdminPrincipalIds"]
    assert admin
    assert all(g.conditioned and g.role == ROLE_BLOB_WRITER for g in admin)
    # The policy, and their own signed audit chains (byok policy set records them); nothing else.
    assert sorted(g.target for g in admin) == sorted([CONFIG_CONTAINER, AUDIT_PEOPLE_CONTAINER])


def test_approvals_are_written_by_uploaders_and_custodians_only(
    deployment: Deployment, grants: list[Grant]
) -> None:
    assert APPROVALS_CONTAINER in container_names(deployment)
    assert _holders(grants, APPROVALS_CONTAINER) == {
        "uploaderPrincipalIds": {ROLE_BLOB_WRITER},
        "custodianPrincipalIds": {ROLE_BLOB_WRITER},
        FUNCTION_PRINCIPAL: {ROLE_BLOB_DATA_READER},
    }
    writers = [g for g in grants if g.target == APPROVALS_CONTAINER and g.role == ROLE_BLOB_WRITER]
    assert len(writers) == 2
    assert all(g.conditioned for g in writers), "approvals must not be deletable by their writers"


def test_function_only_reads_config_and_approvals(grants: list[Grant]) -> None:
    for container in (CONFIG_CONTAINER, APPROVALS_CONTAINER):
        assert _holders(grants, container)[FUNCTION_PRINCIPAL] == {ROLE_BLOB_DATA_READER}, container


def test_people_write_only_with_the_data_only_custom_role(
    deployment: Deployment, grants: list[Grant]
) -> None:
    (definition,) = deployment.resources(ROLE_DEFINITION_TYPE)
    assert f"custom:{definition.symbol}" == ROLE_BLOB_WRITER
    props = definition.body["properties"]
    (permission,) = props["permissions"]
    assert permission["actions"] == [], "no control-plane action (containers/write, /delete)"
    assert permission["notActions"] == []
    assert set(permission["dataActions"]) == BLOB_WRITER_DATA_ACTIONS
    for action in permission["dataActions"]:
        assert not any(word in action for word in ("delete", "move", "*")), action
    (scope,) = props["assignableScopes"]
    assert _resource_group_id(scope)
    people = [g for g in grants if g.principal in PEOPLE_WHO_WRITE]
    assert {g.principal for g in people} == PEOPLE_WHO_WRITE
    for grant in people:
        assert grant.role in {
            ROLE_BLOB_WRITER,
            ROLE_BLOB_DATA_READER,
            ROLE_MONITORING_METRICS_PUBLISHER,
        }, grant
        if grant.role == ROLE_BLOB_WRITER:
            assert grant.conditioned, grant


def test_nobody_holds_contributor_or_owner_on_config_or_approvals(grants: list[Grant]) -> None:
    for container in (CONFIG_CONTAINER, APPROVALS_CONTAINER):
        for principal, roles in _holders(grants, container).items():
            assert not roles & CONTAINER_CONTROL_ROLES, (principal, container)


# --------------------------------------------------------------------------- tests: audit trail
# Each writer appends its signed chains to its own container (AUDIT_WRITERS); asserted directly
# here, by check_audit_trail_roles and check_audit_immutability in BICEP_CHECKS, and shown failing
# on weakened copies in MUTATIONS.


def test_only_the_function_writes_the_audit_container(grants: list[Grant]) -> None:
    assert _holders(grants, AUDIT_CONTAINER) == {
        FUNCTION_PRINCIPAL: {ROLE_BLOB_WRITER},
        "auditorPrincipalIds": {ROLE_BLOB_DATA_READER},
    }
    (function,) = [
        g
        for g in grants
        if g.principal == FUNCTION_PRINCIPAL
        and _reaches(g, AUDIT_CONTAINER)
        and g.role not in NON_BLOB_ROLES
    ]
    assert function.target == AUDIT_CONTAINER
    assert function.conditioned, "the Function must not be able to delete its audit chains"
    for principal in ("custodianPrincipalIds", "uploaderPrincipalIds", "policyAdminPrincipalIds"):
        assert principal not in _holders(grants, AUDIT_CONTAINER), principal


def test_only_custodians_and_policy_admins_write_the_people_audit_container(
    deployment: Deployment, grants: list[Grant]
) -> None:
    assert AUDIT_PEOPLE_CONTAINER in container_names(deployment)
    assert _holders(grants, AUDIT_PEOPLE_CONTAINER) == {
        "custodianPrincipalIds": {ROLE_BLOB_WRITER},
        "policyAdminPrincipalIds": {ROLE_BLOB_WRITER},
        "auditorPrincipalIds": {ROLE_BLOB_DATA_READER},
    }
    writers = [
        g for g in grants if _reaches(g, AUDIT_PEOPLE_CONTAINER) and g.role == ROLE_BLOB_WRITER
    ]
    assert len(writers) == 2
    assert all(g.conditioned and g.target == AUDIT_PEOPLE_CONTAINER for g in writers)
    assert FUNCTION_PRINCIPAL not in _holders(grants, AUDIT_PEOPLE_CONTAINER)


def test_auditors_read_both_audit_containers(grants: list[Grant]) -> None:
    for container in (AUDIT_CONTAINER, AUDIT_PEOPLE_CONTAINER):
        assert _holders(grants, container)["auditorPrincipalIds"] == {ROLE_BLOB_DATA_READER}


def test_both_audit_containers_are_immutable_with_protected_appends(
    deployment: Deployment,
) -> None:
    policies, findings = audit_policies(deployment)
    assert findings == []
    assert set(policies) == {AUDIT_CONTAINER, AUDIT_PEOPLE_CONTAINER}
    people = policies[AUDIT_PEOPLE_CONTAINER]
    assert people.body["properties"]["allowProtectedAppendWrites"] is True
    assert deployment.resolve(
        people.file, people.body["properties"]["immutabilityPeriodSinceCreationInDays"]
    ) == deployment.resolve(
        policies[AUDIT_CONTAINER].file,
        policies[AUDIT_CONTAINER].body["properties"]["immutabilityPeriodSinceCreationInDays"],
    )
    assert people.condition == {
        "operator": {"type": "not", "operands": {"bool_value": "auditPeoplePolicyLocked"}}
    }
    container = container_names(deployment)[AUDIT_PEOPLE_CONTAINER]
    assert container.body["properties"]["publicAccess"] == "None"


def test_audit_signing_kid_setting_comes_from_its_parameter(deployment: Deployment) -> None:
    (site,) = _function_sites(deployment)
    raw = _app_settings_raw(site)
    assert _main_parameter(deployment, site.file, raw[SIGNING_KID_SETTING]) == "auditSigningKid"
    assert _app_settings(deployment, site)[SIGNING_KID_SETTING] == ""
    declared = deployment.files["main.bicep"]["parameters"]["auditSigningKid"]
    assert declared["type"] == "string"
    assert declared["default"] == ""
    example = json.loads(PARAMETERS_EXAMPLE.read_text(encoding="utf-8"))
    assert example["parameters"]["auditSigningKid"] == {"value": ""}
    assert example["parameters"]["auditPeoplePolicyLocked"] == {"value": False}


def test_authorization_settings_are_set_with_their_defaults(deployment: Deployment) -> None:
    (site,) = _function_sites(deployment)
    settings = _app_settings(deployment, site)
    assert settings["BYOK_CONFIG_CONTAINER"] == "byok-config"
    assert settings["BYOK_POLICY_BLOB"] == "import-policy.json"
    # in Azure a deleted policy stops imports; it never falls back to the safe defaults
    assert settings["BYOK_POLICY_REQUIRED"] == "true"
    assert settings["BYOK_APPROVALS_CONTAINER"] == "byok-approvals"
    # The containers the settings name are the ones the Bicep creates and grants on.
    declared = deployment.resolve("main.bicep", "containerNames")
    assert declared["config"] == settings["BYOK_CONFIG_CONTAINER"]
    assert declared["approvals"] == settings["BYOK_APPROVALS_CONTAINER"]


def test_parameters_example_lists_policy_admins(deployment: Deployment) -> None:
    declared = deployment.files["main.bicep"]["parameters"]["policyAdminPrincipalIds"]
    assert declared["type"] == "array"
    assert declared["default"] == []
    example = json.loads(PARAMETERS_EXAMPLE.read_text(encoding="utf-8"))
    assert example["parameters"]["policyAdminPrincipalIds"] == {"value": []}


# --------------------------------------------------------------------------- tests: checkov


def load_skips() -> list[dict[str, str]]:
    skips: list[dict[str, str]] = json.loads(CHECKOV_SKIPS.read_text(encoding="utf-8"))["skips"]
    return skips


def test_checkov_skips_are_documented() -> None:
    skips = load_skips()
    keys = [(s["check_id"], s["file"], s["resource"]) for s in skips]
    assert len(keys) == len(set(keys)), "duplicate skip"
    for skip in skips:
        assert re.fullmatch(r"CKV2?_AZURE_\d+", skip["check_id"]), skip
        assert len(skip["reason"].split()) >= 12, f"give {skip['check_id']} a real reason"


def test_checkov_finds_nothing_beyond_the_documented_skips(checkov_report: dict[str, Any]) -> None:
    results = checkov_report["results"]
    assert results.get("parsing_errors", []) == []
    scanned = {c["file_path"] for c in results["passed_checks"] + results["failed_checks"]}
    assert {"/modules/storage.bicep", "/modules/functionapp.bicep"} <= scanned
    assert len(results["passed_checks"]) >= 10, "checkov ran too few checks to mean anything"
    documented = {(s["check_id"], s["file"], s["resource"]) for s in load_skips()}
    failed = failed_checks(checkov_report)
    assert failed - documented == set(), "new checkov findings: fix them or document them"
    assert documented - failed == set(), "stale skips in infra/checkov-skips.json: remove them"


def test_checkov_catches_a_weakened_copy(infra_python: Path, tmp_path: Path) -> None:
    root = tmp_path / "infra"
    shutil.copytree(INFRA_DIR, root)
    for relative, old, new in (
        ("modules/storage.bicep", "minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'"),
        ("modules/functionapp.bicep", "httpsOnly: true", "httpsOnly: false"),
    ):
        target = root / relative
        target.write_text(target.read_text(encoding="utf-8").replace(old, new), encoding="utf-8")
    ids = {check_id for check_id, _, _ in failed_checks(run_checkov(infra_python, root))}
    assert {"CKV_AZURE_44", "CKV_AZURE_70"} <= ids


# --------------------------------------------------------------------------- tests: workbook


def test_workbook_is_valid_json_workbook() -> None:
    workbook = json.loads(WORKBOOK.read_text(encoding="utf-8"))
    assert workbook["version"] == "Notebook/1.0"
    assert isinstance(workbook["items"], list)
    assert workbook["items"]
    for item in workbook["items"]:
        assert {"type", "content", "name"} <= set(item)


def test_workbook_queries_name_only_emitted_events_and_fields(audit_schema: AuditSchema) -> None:
    workbook = json.loads(WORKBOOK.read_text(encoding="utf-8"))
    assert workbook_findings(workbook, audit_schema) == []


def test_alert_queries_name_only_emitted_events_and_fields(audit_schema: AuditSchema) -> None:
    queries = sorted(QUERY_DIR.glob("*.kql"))
    assert len(queries) >= 2
    for path in queries:
        assert query_findings(path.read_text(encoding="utf-8"), audit_schema) == [], path.name


@pytest.mark.parametrize(
    ("old", "new", "phrase"),
    [
        ("Properties.reason_code", "Properties.reasonCode", "Properties.reasonCode"),
        ('"byok.imported"', '"byok.import_done"', "byok.import_done"),
        ("Properties.drop_time", 'Properties["dropped_at"]', "Properties.dropped_at"),
        ("AppTraces", "traces", "AppTraces"),
        ("Properties.duplicate_of", "Properties.kek_spki_sha256", "Properties.kek_spki_sha256"),
        ("Properties.error_reason", "Properties.retry_reason", "Properties.retry_reason"),
        ('"byok.package"', '"byok.delivery"', "byok.delivery"),
        ("by package_sha256, etag", "by etag", "current state"),
        ('| where outcome in ("retry"', '| where outcome in ("failed"', "retries in flight"),
        ('"byok.drop_to_import"', '"byok.drop_to_imports"', "byok.drop_to_imports"),
        ('"byok.throttled"', '"byok.paced"', "byok.paced"),
        ('Properties.state) == "rejected"', 'Properties.state) == "refused"', "'refused'"),
        ('Name == "byok.packages"', 'Name == "byok.drop_to_import"', "Properties.state"),
        ("AppMetrics", "AppTraces", "no panel charts the metric"),
    ],
    ids=[
        "unknown-field",
        "unknown-event",
        "unknown-indexed-field",
        "wrong-table",
        "field-of-another-event",
        "unknown-span-attribute",
        "wrong-span-name",
        "no-current-state",
        "no-retries-panel",
        "unknown-metric",
        "unknown-gauge",
        "unknown-state-value",
        "attribute-of-another-metric",
        "no-metric-panels",
    ],
)
def test_workbook_check_catches_unknown_names(
    audit_schema: AuditSchema, old: str, new: str, phrase: str
) -> None:
    text = WORKBOOK.read_text(encoding="utf-8")
    assert old.replace('"', '\\"') in text
    broken = json.loads(text.replace(old.replace('"', '\\"'), new.replace('"', '\\"')))
    findings = workbook_findings(broken, audit_schema)
    assert any(phrase in f for f in findings), findings


def test_workbook_check_needs_the_lost_events_threshold(audit_schema: AuditSchema) -> None:
    workbook = json.loads(WORKBOOK.read_text(encoding="utf-8"))
    for item in workbook["items"]:
        if item["name"] == "parameters":
            params = item["content"]["parameters"]
            params[:] = [p for p in params if p["name"] != "WaitMinutes"]
    findings = workbook_findings(workbook, audit_schema)
    assert any("threshold parameter" in f for f in findings), findings


# --------------------------------------------------------------------------- tests: HSM roles


FAKE_AZ = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$FAKE_AZ_LOG"
if [[ "$1 $2 $3 $4" == "keyvault role assignment list" ]]; then
  echo "${FAKE_AZ_EXISTING:-0}"
fi
if [[ "$1 $2 $3 $4" == "keyvault role definition list" ]]; then
  echo "${FAKE_AZ_EXISTING:-0}"
fi
"""
HSM_ROLE_DIR = INFRA_DIR / "hsm-roles"
HSM_KEYS = "Microsoft.KeyVault/managedHsm/keys"
IMPORTER_DATA_ACTIONS = {
    f"{HSM_KEYS}/read/action",
    f"{HSM_KEYS}/import/action",
    f"{HSM_KEYS}/write/action",
    f"{HSM_KEYS}/encrypt/action",
}
CUSTODIAN_DATA_ACTIONS = {f"{HSM_KEYS}/create", f"{HSM_KEYS}/read/action"}
# The Function's audit signing key (byok audit init): sign with it and read it, nothing else.
AUDIT_SIGNER_DATA_ACTIONS = {f"{HSM_KEYS}/sign/action", f"{HSM_KEYS}/read/action"}
AUDIT_SIGNER_ROLE = "BYOK Audit Signer"
DEFAULT_AUDIT_KEY = "byok-audit-signer"
FUNCTION_OID = "11111111-2222-3333-4444-555555555555"
CUSTODIAN_OID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


def run_role_script(
    args: list[str], tmp_path: Path, existing: int = 0, script: Path = ROLE_SCRIPT
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_az = bin_dir / "az"
    fake_az.write_text(FAKE_AZ, encoding="utf-8")
    fake_az.chmod(0o755)
    log = tmp_path / "az.log"
    log.write_text("", encoding="utf-8")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_AZ_LOG": str(log),
        "FAKE_AZ_EXISTING": str(existing),
    }
    proc = subprocess.run(
        ["bash", str(script), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )
    return proc, log.read_text(encoding="utf-8").splitlines()


def test_role_script_is_strict_bash() -> None:
    text = ROLE_SCRIPT.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(ROLE_SCRIPT, os.X_OK)
    syntax = subprocess.run(
        ["bash", "-n", str(ROLE_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert syntax.returncode == 0, syntax.stderr


def test_role_script_help(tmp_path: Path) -> None:
    proc, calls = run_role_script(["--help"], tmp_path)
    assert proc.returncode == 0
    assert "Usage: assign-hsm-roles.sh" in proc.stdout
    assert calls == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--hsm-name", "contoso-mhsm"],
        ["--function-principal-id", FUNCTION_OID],
        ["--hsm-name", "contoso-mhsm", "--function-principal-id", "not-a-guid"],
        ["--hsm-name", "x", "--function-principal-id", FUNCTION_OID],
        ["--hsm-name", "contoso-mhsm", "--function-principal-id", FUNCTION_OID, "--bogus"],
        ["--hsm-name", "contoso-mhsm", "--function-principal-id", FUNCTION_OID, "--kek-name"],
        [
            "--hsm-name",
            "contoso-mhsm",
            "--function-principal-id",
            FUNCTION_OID,
            "--custodian-object-id",
            "nope",
        ],
        [
            "--hsm-name",
            "contoso-mhsm",
            "--function-principal-id",
            FUNCTION_OID,
            "--custodian-object-id",
            CUSTODIAN_OID,
        ],
        ["--hsm-name", "contoso-mhsm", "--function-principal-id", FUNCTION_OID, "--audit-key"],
        [
            "--hsm-name",
            "contoso-mhsm",
            "--function-principal-id",
            FUNCTION_OID,
            "--audit-key",
            "keys/../all",
        ],
        [
            "--hsm-name",
            "contoso-mhsm",
            "--function-principal-id",
            FUNCTION_OID,
            "--custodian-object-id",
            CUSTODIAN_OID,
            "--kek-name",
            DEFAULT_AUDIT_KEY,
        ],
        [
            "--hsm-name",
            "contoso-mhsm",
            "--function-principal-id",
            FUNCTION_OID,
            "--custodian-object-id",
            CUSTODIAN_OID,
            "--kek-name",
            "KEKforBYOK",
            "--audit-key",
            "kekforbyok",
        ],
    ],
    ids=[
        "nothing",
        "no-principal",
        "no-hsm",
        "bad-guid",
        "bad-hsm-name",
        "unknown-option",
        "missing-value",
        "bad-custodian",
        "custodian-without-kek",
        "audit-key-missing-value",
        "bad-audit-key",
        "kek-is-the-audit-key",
        "kek-is-the-audit-key-in-another-case",
    ],
)
def test_role_script_rejects_bad_arguments(tmp_path: Path, args: list[str]) -> None:
    proc, calls = run_role_script(args, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert calls == [], "nothing may be called before the arguments are valid"


CUSTODIAN_ARGS = [
    "--hsm-name",
    "contoso-mhsm",
    "--function-principal-id",
    FUNCTION_OID,
    "--custodian-object-id",
    CUSTODIAN_OID,
    "--kek-name",
    "KEKforBYOK",
]


def test_hsm_custom_roles_grant_only_what_the_pipeline_uses() -> None:
    importer = json.loads((HSM_ROLE_DIR / "byok-importer.json").read_text(encoding="utf-8"))
    custodian = json.loads((HSM_ROLE_DIR / "byok-kek-custodian.json").read_text(encoding="utf-8"))
    signer = json.loads((HSM_ROLE_DIR / "byok-audit-signer.json").read_text(encoding="utf-8"))
    assert set(importer["dataActions"]) == IMPORTER_DATA_ACTIONS
    assert set(custodian["dataActions"]) == CUSTODIAN_DATA_ACTIONS
    assert set(signer["dataActions"]) == AUDIT_SIGNER_DATA_ACTIONS
    assert signer["roleName"] == AUDIT_SIGNER_ROLE
    # Only the audit signer signs: neither the importer (at /keys) nor the custodians.
    for role in (importer, custodian):
        assert not any("sign" in action for action in role["dataActions"]), role["roleName"]
    script = ROLE_SCRIPT.read_text(encoding="utf-8")
    for role in (importer, custodian, signer):
        assert role["actions"] == []
        assert role["notActions"] == []
        assert role["notDataActions"] == []
        assert f'"{role["roleName"]}"' in script, role["roleName"]
        assert len(role["dataActions"]) == len(set(role["dataActions"]))


def test_role_script_creates_custom_roles_and_assigns_them(tmp_path: Path) -> None:
    proc, calls = run_role_script(CUSTODIAN_ARGS, tmp_path, existing=0)
    assert proc.returncode == 0, proc.stderr
    definitions = [c for c in calls if c.startswith("keyvault role definition create")]
    assert definitions == [
        f"keyvault role definition create --hsm-name contoso-mhsm --role-definition "
        f"@{HSM_ROLE_DIR / name} --output none"
        for name in ("byok-importer.json", "byok-audit-signer.json", "byok-kek-custodian.json")
    ]
    creates = [c for c in calls if c.startswith("keyvault role assignment create")]
    assert len(creates) == 3, calls
    # Definitions before the assignments that use them.
    assert calls.index(definitions[-1]) < calls.index(creates[0])
    function_call, audit_call, custodian_call = creates
    assert audit_call == (
        f"keyvault role assignment create --hsm-name contoso-mhsm --role {AUDIT_SIGNER_ROLE} "
        f"--scope /keys/{DEFAULT_AUDIT_KEY} --assignee-object-id {FUNCTION_OID} --output none "
        "--assignee-principal-type ServicePrincipal"
    )
    for expected in (
        "--hsm-name contoso-mhsm",
        "--role BYOK Importer",
        "--scope /keys ",
        f"--assignee-object-id {FUNCTION_OID}",
        "--assignee-principal-type ServicePrincipal",
    ):
        assert expected in function_call + " ", function_call
    assert "--role BYOK KEK Custodian" in custodian_call
    assert "--scope /keys/KEKforBYOK " in custodian_call + " "
    assert f"--assignee-object-id {CUSTODIAN_OID}" in custodian_call
    assert not any("Managed HSM Crypto User" in c for c in calls)


def test_role_script_builtin_role_is_opt_in(tmp_path: Path) -> None:
    proc, calls = run_role_script([*CUSTODIAN_ARGS, "--builtin-role"], tmp_path, existing=0)
    assert proc.returncode == 0, proc.stderr
    assert not any(c.startswith("keyvault role definition") for c in calls)
    creates = [c for c in calls if c.startswith("keyvault role assignment create")]
    assert len(creates) == 3
    assert all("--role Managed HSM Crypto User" in c for c in creates)
    assert f"--scope /keys/{DEFAULT_AUDIT_KEY} " in creates[1]
    assert "--scope /keys/KEKforBYOK" in creates[2]


def test_role_script_is_idempotent(tmp_path: Path) -> None:
    proc, calls = run_role_script(CUSTODIAN_ARGS, tmp_path, existing=1)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if " create " in f" {c} "] == []
    assert any(c.startswith("keyvault role assignment list") for c in calls)
    assert any(c.startswith("keyvault role definition list") for c in calls)


def test_role_script_dry_run_calls_nothing(tmp_path: Path) -> None:
    proc, calls = run_role_script([*CUSTODIAN_ARGS, "--dry-run"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert calls == []
    assert "role definition 'BYOK Importer'" in proc.stdout
    assert "role definition 'BYOK Audit Signer'" in proc.stdout
    assert "role 'BYOK KEK Custodian' at scope '/keys/KEKforBYOK'" in proc.stdout
    assert (
        f"role 'BYOK Audit Signer' at scope '/keys/{DEFAULT_AUDIT_KEY}' for {FUNCTION_OID}"
        in proc.stdout
    )


ASSIGNMENT_RE = re.compile(
    r"keyvault role assignment create --hsm-name \S+ --role (.+?) --scope (\S+) "
    r"--assignee-object-id (\S+)"
)


def audit_signer_findings(infra: Path, tmp_path: Path) -> Findings:
    """The Function signs with its audit key only: the role file of `infra` grants sign and read
    and nothing else, the importer (at /keys) cannot sign, and the role script, run against a
    stand-in az with --audit-key, creates the role and assigns it to the Function at exactly
    /keys/<that key>, nowhere else."""
    findings: Findings = []
    roles = infra / "hsm-roles"
    signer = json.loads((roles / "byok-audit-signer.json").read_text(encoding="utf-8"))
    if signer.get("roleName") != AUDIT_SIGNER_ROLE:
        findings.append(f"hsm roles: the audit signer role must be named {AUDIT_SIGNER_ROLE!r}")
    actions = signer.get("dataActions", [])
    if sorted(actions) != sorted(AUDIT_SIGNER_DATA_ACTIONS):
        findings.append(
            f"hsm roles: {AUDIT_SIGNER_ROLE} must have exactly the data actions "
            f"{sorted(AUDIT_SIGNER_DATA_ACTIONS)}, has {actions}"
        )
    if any(signer.get(k) for k in ("actions", "notActions", "notDataActions")):
        findings.append(f"hsm roles: {AUDIT_SIGNER_ROLE} has actions beyond its data actions")
    for name in ("byok-importer.json", "byok-kek-custodian.json"):
        other = json.loads((roles / name).read_text(encoding="utf-8"))
        signing = [a for a in other.get("dataActions", []) if "sign" in a or "*" in a]
        if signing:
            findings.append(f"hsm roles: {other.get('roleName')} may sign: {signing}")
    key = "audit-key-under-test"
    script = infra / "assign-hsm-roles.sh"
    args = ["--hsm-name", "contoso-mhsm", "--function-principal-id", FUNCTION_OID]
    proc, calls = run_role_script([*args, "--audit-key", key], tmp_path, script=script)
    if proc.returncode != 0:
        return [*findings, f"hsm roles: the role script failed: {proc.stderr[-500:]}"]
    definition = (
        f"keyvault role definition create --hsm-name contoso-mhsm --role-definition "
        f"@{roles / 'byok-audit-signer.json'} --output none"
    )
    if definition not in calls:
        findings.append(f"hsm roles: the script does not create {AUDIT_SIGNER_ROLE} from its file")
    assigned = [m.groups() for m in map(ASSIGNMENT_RE.match, calls) if m]
    signer_scopes = sorted(
        (scope, principal) for role, scope, principal in assigned if role == AUDIT_SIGNER_ROLE
    )
    if signer_scopes != [(f"/keys/{key}", FUNCTION_OID)]:
        findings.append(
            f"hsm roles: {AUDIT_SIGNER_ROLE} must be assigned to the Function at /keys/{key} "
            f"only (--audit-key), is at {signer_scopes}"
        )
    return findings


def test_audit_signer_role_is_sign_and_read_on_the_audit_key_only(tmp_path: Path) -> None:
    assert audit_signer_findings(INFRA_DIR, tmp_path) == []


@pytest.mark.parametrize(
    ("relative", "old", "new", "phrase"),
    [
        (
            "hsm-roles/byok-audit-signer.json",
            f'"{HSM_KEYS}/sign/action",',
            f'"{HSM_KEYS}/sign/action",\n    "{HSM_KEYS}/encrypt/action",',
            "exactly the data actions",
        ),
        (
            "hsm-roles/byok-audit-signer.json",
            f'"{HSM_KEYS}/read/action"',
            f'"{HSM_KEYS}/*"',
            "exactly the data actions",
        ),
        (
            "hsm-roles/byok-importer.json",
            f'"{HSM_KEYS}/encrypt/action"',
            f'"{HSM_KEYS}/encrypt/action",\n    "{HSM_KEYS}/sign/action"',
            "BYOK Importer may sign",
        ),
        (
            "assign-hsm-roles.sh",
            '"$audit_role" "/keys/$audit_key"',
            '"$audit_role" "/keys"',
            "at /keys/audit-key-under-test only",
        ),
        (
            "assign-hsm-roles.sh",
            '      audit_key="$2"\n',
            '      : "$2"\n',
            "at /keys/audit-key-under-test only",
        ),
        (
            "assign-hsm-roles.sh",
            (
                'ensure_assignment "$function_principal_id" "$audit_role" "/keys/$audit_key" '
                '"ServicePrincipal"\n'
            ),
            "",
            "at /keys/audit-key-under-test only",
        ),
        (
            "assign-hsm-roles.sh",
            'readonly AUDIT_SIGNER_ROLE_FILE="$script_dir/hsm-roles/byok-audit-signer.json"',
            'readonly AUDIT_SIGNER_ROLE_FILE="$script_dir/hsm-roles/byok-importer.json"',
            "does not create BYOK Audit Signer from its file",
        ),
    ],
    ids=[
        "signer-encrypts",
        "signer-wildcard",
        "importer-signs",
        "signer-on-every-key",
        "audit-key-ignored",
        "signer-not-assigned",
        "signer-from-importer-file",
    ],
)
def test_audit_signer_check_catches_a_weakened_copy(
    tmp_path: Path, relative: str, old: str, new: str, phrase: str
) -> None:
    root = tmp_path / "infra"
    shutil.copytree(INFRA_DIR, root)
    target = root / relative
    text = target.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} must occur once in {relative}"
    target.write_text(text.replace(old, new), encoding="utf-8")
    findings = audit_signer_findings(root, tmp_path)
    assert any(phrase in f for f in findings), findings


def test_role_script_audit_key_is_idempotent(tmp_path: Path) -> None:
    args = [*CUSTODIAN_ARGS, "--audit-key", "signer-2"]
    proc, calls = run_role_script(args, tmp_path, existing=1)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if " create " in f" {c} "] == []
    assert any(
        c.startswith("keyvault role assignment list")
        and "--scope /keys/signer-2 --role BYOK Audit Signer" in c
        for c in calls
    ), calls
    assert any(
        c.startswith("keyvault role definition list") and "'BYOK Audit Signer'" in c for c in calls
    ), calls


# --------------------------------------------------------------------------- tests: README


def test_readme_covers_the_runbook() -> None:
    text = README.read_text(encoding="utf-8")
    for phrase in (
        "az deployment group create",
        "func azure functionapp publish",
        "assign-hsm-roles.sh",
        "deployEventSubscription=true",
        "workbook",
        "checkov-skips.json",
        "byok policy set",
        "policyAdminPrincipalIds",
        "BYOK Blob Writer",
        "byok-config",
        "byok-approvals",
        "BYOK_POLICY_BLOB",
        "byok-audit-people",
        "auditSigningKid",
        "BYOK_AUDIT_SIGNING_KID",
        "byok audit init",
        "--audit-key",
        "BYOK Audit Signer",
        "auditPeoplePolicyLocked",
        "Monitoring Metrics Publisher",
    ):
        assert phrase in text, phrase


def test_every_binding_expression_of_the_function_app_is_an_app_setting() -> None:
    """A `%NAME%` in a trigger that no app setting defines stops the Function from indexing."""
    source = (REPO_ROOT / "function_app.py").read_text()
    names = set(re.findall(r"%([A-Za-z0-9_]+)%", source))
    assert names == {
        "BYOK_INCOMING_CONTAINER",
        "BYOK_APPROVALS_CONTAINER",
        "BYOK_RECONCILE_SCHEDULE",
    }
    assert names <= REQUIRED_APP_SETTINGS


BLOB_TRIGGER_RE = re.compile(
    r'@app\.function_name\("(\w+)"\)\s*@app\.blob_trigger\((.*?)\)\s*def ', re.DOTALL
)


def event_grid_triggers(source: str) -> dict[str, str]:
    """Container -> function name of each Event Grid blob trigger in function_app.py."""
    triggers: dict[str, str] = {}
    for function, arguments in BLOB_TRIGGER_RE.findall(source):
        setting = re.search(r'path="%(\w+)%/', arguments)
        if "BlobSource.EVENT_GRID" in arguments and setting:
            triggers[EXPECTED_CONTAINER_SETTINGS.get(setting.group(1), setting.group(1))] = function
    return triggers


def test_every_event_grid_blob_trigger_has_its_subscription(deployment: Deployment) -> None:
    """An Event Grid blob trigger runs only if a subscription delivers its container's events to
    its own function name: the two lists must agree (and check_event_grid holds the Bicep to
    EXPECTED_SUBSCRIPTIONS)."""
    triggers = event_grid_triggers((REPO_ROOT / "function_app.py").read_text())
    assert triggers == EXPECTED_SUBSCRIPTIONS
    assert check_event_grid(deployment) == []
