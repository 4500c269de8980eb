#!/usr/bin/env bash
# Assign Managed HSM data-plane (local RBAC) roles for the BYOK pipeline.
#
# Managed HSM keeps its data-plane role definitions and assignments inside the HSM, not in Azure
# Resource Manager, so Bicep cannot create them. This script does, with
# `az keyvault role definition create` (the custom roles in infra/hsm-roles/*.json) and
# `az keyvault role assignment create`. It is idempotent: a role definition with the same name,
# or an assignment with the same principal, role and scope, is left alone, so it can be run
# again after every deployment.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly IMPORTER_ROLE="BYOK Importer"
readonly IMPORTER_ROLE_FILE="$script_dir/hsm-roles/byok-importer.json"
readonly AUDIT_SIGNER_ROLE="BYOK Audit Signer"
readonly AUDIT_SIGNER_ROLE_FILE="$script_dir/hsm-roles/byok-audit-signer.json"
readonly DEFAULT_AUDIT_KEY="byok-audit-signer"
readonly CUSTODIAN_ROLE="BYOK KEK Custodian"
readonly CUSTODIAN_ROLE_FILE="$script_dir/hsm-roles/byok-kek-custodian.json"
readonly BUILTIN_ROLE="Managed HSM Crypto User"

usage() {
  cat <<'EOF'
Usage: assign-hsm-roles.sh --hsm-name NAME --function-principal-id OBJECT_ID
                           [--custodian-object-id OBJECT_ID --kek-name NAME...]...
                           [--audit-key NAME] [--builtin-role] [--function-role ROLE]
                           [--audit-role ROLE] [--custodian-role ROLE] [--dry-run]

Assigns Managed HSM local RBAC roles for the BYOK pipeline:

  * the Function's user-assigned identity (output functionPrincipalId of infra/main.bicep)
    gets the custom role "BYOK Importer" (infra/hsm-roles/byok-importer.json: key read,
    import, update and encrypt only) at scope /keys: it imports packages, reads the imported
    keys back, disables a version that failed verification and computes the AES check value;
  * the same identity gets the custom role "BYOK Audit Signer"
    (infra/hsm-roles/byok-audit-signer.json: key sign and read only) at scope /keys/<audit key>
    (--audit-key, default byok-audit-signer, the key `byok audit init` creates): it signs its
    audit records with that key and no other;
  * each custodian (user or group object id) who creates and downloads KEKs gets the custom
    role "BYOK KEK Custodian" (infra/hsm-roles/byok-kek-custodian.json: key create and read
    only) at scope /keys/<KEK name> for every --kek-name. Custodians need --kek-name: the
    script refuses to give them a role on every key.

The custom role definitions are created first when the HSM does not have them yet.

Options:
  --hsm-name NAME                 Managed HSM name (the part before .managedhsm.azure.net)
  --function-principal-id ID      object id of the Function's managed identity
  --custodian-object-id ID        object id of a KEK custodian (user or group); repeatable
  --kek-name NAME                 the custodians' KEK (scope /keys/NAME); repeatable; required
                                  with --custodian-object-id
  --audit-key NAME                the Function's audit signing key (scope /keys/NAME); default
                                  byok-audit-signer; must not be a --kek-name
  --builtin-role                  opt in to the built-in "Managed HSM Crypto User" for all
                                  three (every key operation except purge, recover and export);
                                  no custom role definitions are created
  --function-role ROLE            an existing role for the Function (name or id) instead
  --audit-role ROLE               an existing role for the Function on the audit key instead
  --custodian-role ROLE           an existing role for the custodians (name or id) instead
  --dry-run                       print what would be created and assigned; call nothing
  -h, --help                      show this help

Exit status: 0 done (or nothing to do), 1 an az command failed, 2 bad arguments.
Needs: Azure CLI, signed in as a principal that may manage role definitions and assignments
in the HSM (e.g. "Managed HSM Administrator").
EOF
}

die_usage() {
  echo "assign-hsm-roles.sh: $*" >&2
  echo "Try 'assign-hsm-roles.sh --help'." >&2
  exit 2
}

readonly GUID_RE='^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
readonly HSM_NAME_RE='^[a-zA-Z][a-zA-Z0-9-]{1,22}[a-zA-Z0-9]$'
readonly KEY_NAME_RE='^[0-9a-zA-Z-]{1,127}$'

hsm_name=""
function_principal_id=""
function_role=""
audit_role=""
audit_key="$DEFAULT_AUDIT_KEY"
custodian_role=""
builtin_role=false
dry_run=false
custodians=()
kek_names=()

need_value() {
  # $1 option name, $2 number of remaining arguments (including the option itself)
  if [[ "$2" -lt 2 ]]; then
    die_usage "option $1 needs a value"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --hsm-name)
      need_value "$1" "$#"
      hsm_name="$2"
      shift 2
      ;;
    --function-principal-id)
      need_value "$1" "$#"
      function_principal_id="$2"
      shift 2
      ;;
    --custodian-object-id)
      need_value "$1" "$#"
      custodians+=("$2")
      shift 2
      ;;
    --kek-name)
      need_value "$1" "$#"
      kek_names+=("$2")
      shift 2
      ;;
    --function-role)
      need_value "$1" "$#"
      function_role="$2"
      shift 2
      ;;
    --custodian-role)
      need_value "$1" "$#"
      custodian_role="$2"
      shift 2
      ;;
    --audit-key)
      need_value "$1" "$#"
      audit_key="$2"
      shift 2
      ;;
    --audit-role)
      need_value "$1" "$#"
      audit_role="$2"
      shift 2
      ;;
    --builtin-role)
      builtin_role=true
      shift
      ;;
    --dry-run)
      dry_run=true
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      die_usage "unknown argument: $1"
      ;;
  esac
done

[[ -n "$hsm_name" ]] || die_usage "--hsm-name is required"
[[ -n "$function_principal_id" ]] || die_usage "--function-principal-id is required"
[[ "$hsm_name" =~ $HSM_NAME_RE ]] || die_usage "not a Managed HSM name: $hsm_name"
[[ "$function_principal_id" =~ $GUID_RE ]] ||
  die_usage "--function-principal-id is not an object id (GUID): $function_principal_id"
for custodian in "${custodians[@]+"${custodians[@]}"}"; do
  [[ "$custodian" =~ $GUID_RE ]] || die_usage "--custodian-object-id is not an object id (GUID): $custodian"
done
for kek in "${kek_names[@]+"${kek_names[@]}"}"; do
  [[ "$kek" =~ $KEY_NAME_RE ]] || die_usage "not a key name: $kek"
  # Custodians may create versions of their KEK: never of the key that signs the Function's
  # records. Key names are case-insensitive in the HSM.
  [[ "${kek,,}" != "${audit_key,,}" ]] ||
    die_usage "--kek-name $kek is the audit signing key (--audit-key)"
done
[[ "$audit_key" =~ $KEY_NAME_RE ]] || die_usage "--audit-key is not a key name: $audit_key"
if [[ ${#custodians[@]} -gt 0 && ${#kek_names[@]} -eq 0 ]]; then
  die_usage "--custodian-object-id needs --kek-name: custodians get a role on their KEK only, never on /keys"
fi

# Which role each side gets, and which custom role definitions must exist first.
function_role_file=""
audit_role_file=""
custodian_role_file=""
if [[ -z "$function_role" ]]; then
  if [[ "$builtin_role" == true ]]; then
    function_role="$BUILTIN_ROLE"
  else
    function_role="$IMPORTER_ROLE"
    function_role_file="$IMPORTER_ROLE_FILE"
  fi
fi
if [[ -z "$audit_role" ]]; then
  if [[ "$builtin_role" == true ]]; then
    audit_role="$BUILTIN_ROLE"
  else
    audit_role="$AUDIT_SIGNER_ROLE"
    audit_role_file="$AUDIT_SIGNER_ROLE_FILE"
  fi
fi
if [[ -z "$custodian_role" ]]; then
  if [[ "$builtin_role" == true ]]; then
    custodian_role="$BUILTIN_ROLE"
  else
    custodian_role="$CUSTODIAN_ROLE"
    custodian_role_file="$CUSTODIAN_ROLE_FILE"
  fi
fi
for role_file in "$function_role_file" "$audit_role_file" "$custodian_role_file"; do
  if [[ -n "$role_file" && ! -f "$role_file" ]]; then
    echo "assign-hsm-roles.sh: role definition file not found: $role_file" >&2
    exit 1
  fi
done

if [[ "$dry_run" == false ]] && ! command -v az >/dev/null 2>&1; then
  echo "assign-hsm-roles.sh: the Azure CLI (az) is not on PATH" >&2
  exit 1
fi

# ensure_role_definition ROLE_NAME FILE: create the custom role unless the HSM has one by that name.
ensure_role_definition() {
  local role="$1" file="$2"
  if [[ "$dry_run" == true ]]; then
    echo "would ensure: role definition '$role' from $file in HSM $hsm_name"
    return 0
  fi
  local existing
  existing="$(az keyvault role definition list \
    --hsm-name "$hsm_name" \
    --query "length([?roleName=='$role'])" \
    --output tsv)"
  if [[ "$existing" =~ ^[0-9]+$ ]] && [[ "$existing" -gt 0 ]]; then
    echo "exists:   role definition '$role'"
    return 0
  fi
  az keyvault role definition create \
    --hsm-name "$hsm_name" \
    --role-definition "@$file" \
    --output none
  echo "created:  role definition '$role'"
}

# ensure_assignment OBJECT_ID ROLE SCOPE [PRINCIPAL_TYPE]
ensure_assignment() {
  local object_id="$1" role="$2" scope="$3" principal_type="${4:-}"
  if [[ "$dry_run" == true ]]; then
    echo "would ensure: role '$role' at scope '$scope' for $object_id in HSM $hsm_name"
    return 0
  fi
  local existing
  existing="$(az keyvault role assignment list \
    --hsm-name "$hsm_name" \
    --scope "$scope" \
    --role "$role" \
    --assignee-object-id "$object_id" \
    --query "length(@)" \
    --output tsv)"
  if [[ "$existing" =~ ^[0-9]+$ ]] && [[ "$existing" -gt 0 ]]; then
    echo "exists:   role '$role' at scope '$scope' for $object_id"
    return 0
  fi
  local args=(
    keyvault role assignment create
    --hsm-name "$hsm_name"
    --role "$role"
    --scope "$scope"
    --assignee-object-id "$object_id"
    --output none
  )
  if [[ -n "$principal_type" ]]; then
    args+=(--assignee-principal-type "$principal_type")
  fi
  az "${args[@]}"
  echo "assigned: role '$role' at scope '$scope' for $object_id"
}

# Custom role definitions first: an assignment needs its role to exist.
if [[ -n "$function_role_file" ]]; then
  ensure_role_definition "$function_role" "$function_role_file"
fi
if [[ -n "$audit_role_file" ]]; then
  ensure_role_definition "$audit_role" "$audit_role_file"
fi
if [[ -n "$custodian_role_file" && ${#custodians[@]} -gt 0 ]]; then
  ensure_role_definition "$custodian_role" "$custodian_role_file"
fi

# The Function: import packages, read them back, disable a failed version, AES check value.
ensure_assignment "$function_principal_id" "$function_role" "/keys" "ServicePrincipal"

# The Function: sign its audit records with the audit signing key, and only that key.
ensure_assignment "$function_principal_id" "$audit_role" "/keys/$audit_key" "ServicePrincipal"

# Custodians: create and download their KEKs, and only those.
for custodian in "${custodians[@]+"${custodians[@]}"}"; do
  for kek in "${kek_names[@]}"; do
    ensure_assignment "$custodian" "$custodian_role" "/keys/$kek"
  done
done
