#!/usr/bin/env bash
# Assign Managed HSM data-plane (local RBAC) roles for the BYOK pipeline.
#
# Managed HSM keeps its data-plane role assignments inside the HSM, not in Azure Resource Manager,
# so Bicep cannot create them. This script does, with `az keyvault role assignment create`.
# It is idempotent: an assignment that already exists (same principal, role and scope) is left
# alone, so it can be run again after every deployment.
set -euo pipefail

readonly DEFAULT_FUNCTION_ROLE="Managed HSM Crypto User"
readonly DEFAULT_CUSTODIAN_ROLE="Managed HSM Crypto User"

usage() {
  cat <<'EOF'
Usage: assign-hsm-roles.sh --hsm-name NAME --function-principal-id OBJECT_ID
                           [--custodian-object-id OBJECT_ID]... [--kek-name NAME]...
                           [--function-role ROLE] [--custodian-role ROLE] [--dry-run]

Assigns Managed HSM local RBAC roles for the BYOK pipeline:

  * the Function's user-assigned identity (output functionPrincipalId of infra/main.bicep)
    gets ROLE (default "Managed HSM Crypto User") at scope /keys: it imports packages
    and reads the imported keys back to verify them;
  * each custodian (user or group object id) who creates and downloads KEKs gets ROLE
    (default "Managed HSM Crypto User") at scope /keys/<KEK name> for every --kek-name,
    or at /keys when no --kek-name is given.

Options:
  --hsm-name NAME                 Managed HSM name (the part before .managedhsm.azure.net)
  --function-principal-id ID      object id of the Function's managed identity
  --custodian-object-id ID        object id of a KEK custodian (user or group); repeatable
  --kek-name NAME                 limit custodians to this KEK (scope /keys/NAME); repeatable
  --function-role ROLE            role for the Function (name or id), e.g. a custom role
  --custodian-role ROLE           role for the custodians (name or id)
  --dry-run                       print what would be assigned; call nothing
  -h, --help                      show this help

Exit status: 0 done (or nothing to do), 1 an az command failed, 2 bad arguments.
Needs: Azure CLI, signed in as a principal that may manage role assignments in the HSM
(e.g. "Managed HSM Administrator" or "Managed HSM Policy Administrator").
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
function_role="$DEFAULT_FUNCTION_ROLE"
custodian_role="$DEFAULT_CUSTODIAN_ROLE"
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
done
[[ -n "$function_role" ]] || die_usage "--function-role must not be empty"
[[ -n "$custodian_role" ]] || die_usage "--custodian-role must not be empty"

if [[ "$dry_run" == false ]] && ! command -v az >/dev/null 2>&1; then
  echo "assign-hsm-roles.sh: the Azure CLI (az) is not on PATH" >&2
  exit 1
fi

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

# The Function: import packages, read the imported key back for verification.
ensure_assignment "$function_principal_id" "$function_role" "/keys" "ServicePrincipal"

# Custodians: create and download KEKs. Narrowed to the named KEKs when given.
custodian_scopes=()
if [[ ${#kek_names[@]} -gt 0 ]]; then
  for kek in "${kek_names[@]}"; do
    custodian_scopes+=("/keys/$kek")
  done
else
  custodian_scopes+=("/keys")
fi
for custodian in "${custodians[@]+"${custodians[@]}"}"; do
  for scope in "${custodian_scopes[@]}"; do
    ensure_assignment "$custodian" "$custodian_role" "$scope"
  done
done
