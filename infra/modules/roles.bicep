// Azure RBAC for the data plane of storage and Application Insights.
// Narrowest roles at the narrowest scope (a container wherever a blob role is granted), each
// assignment named guid(scope, principal, role) so that a redeployment finds it again instead of
// failing or duplicating it. People who write blobs (uploaders, custodians, policy administrators)
// get a custom data-only role (blobWriterRole below), not Storage Blob Data Contributor; so does
// the Function for the audit trail (byok-audit), where it only creates and appends.
// Audit trail: each writer writes its own container and no other. The Function's signed chains go
// to byok-audit, which no person can write; people's signed chains (custodians' KEK events,
// policy administrators' policy changes) go to byok-audit-people, which the Function cannot reach.
// The Managed HSM's data-plane roles are not ARM resources: see infra/assign-hsm-roles.sh.

param storageAccountName string
param appInsightsName string
param functionPrincipalId string
param deploymentPrincipalId string
param incomingContainerName string
param statusContainerName string
param archiveContainerName string
param quarantineContainerName string
param auditContainerName string
param auditPeopleContainerName string
param configContainerName string
param approvalsContainerName string
param deploymentContainerName string
param uploaderPrincipalIds array
param statusReaderPrincipalIds array
param custodianPrincipalIds array
param auditorPrincipalIds array
param policyAdminPrincipalIds array

// Built-in role definition ids (the same in every tenant).
var roleIds = {
  // Read, write, delete blobs. Not Storage Blob Data Owner: the pipeline never manages ACLs or
  // blob-level immutability policies, and must not be able to.
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  // Read-only access to blobs.
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  // The blob trigger's poison queue and the host's internal queues.
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  // Send telemetry to an Application Insights component whose local auth is disabled.
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// The containers the Function's runtime identity reads, writes and deletes in: the pipeline's
// four, and the two the Functions host keeps its locks, blob receipts and keys in (pre-created in
// storage.bicep). Not the audit container (the Function only creates and appends there: the
// writer role, functionAudit below), not the people's audit container (no access at all) and
// not the deployment package container (app-package): only the deployment identity has that.
var functionContainerNames = [
  incomingContainerName
  statusContainerName
  archiveContainerName
  quarantineContainerName
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]

// Azure ABAC condition on every grant of the writer role (blobWriterRole): no delete and no
// move/rename of blobs, so nobody who uploads packages or approvals can remove one that waits for
// the pipeline. The role itself has neither data action; the condition is a second fence that
// still holds if the role is ever widened. Conditions cannot tell a new blob from an overwrite of
// an existing one (both are blobs/write), so overwriting stays possible; blob versioning keeps the
// overwritten version (infra/README.md, "Known limits").
var noDeleteCondition = '((!(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete\'}) AND !(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/move/action\'})))'

// The data-only role of the people who write blobs: uploaders (byok-incoming, byok-approvals),
// KEK custodians (byok-incoming, byok-approvals, byok-audit-people) and policy administrators
// (byok-config, byok-audit-people); and of the Function on the audit container (byok-audit),
// always assigned on one container. Storage Blob Data Contributor would also give them the
// control-plane Actions containers/write and containers/delete (change or delete the whole
// container through ARM) and the data actions blobs/delete and blobs/move/action; this role
// has no Actions at all and only these data actions:
//   blobs/read        read and list blobs (the uploaded package, the current policy, an audit
//                     chain's tail when a lost append is looked up)
//   blobs/write       create a blob with its metadata (Put Blob, Put Block List), or overwrite one
//   blobs/add/action  create a blob and append to an append blob (Put Blob of an append blob,
//                     Append Block: the signed audit chains)
// Not delete, move, deleteBlobVersion, permanentDelete, tags, immutability (runAsSuperUser),
// ownership or ACLs. One definition per resource group (name and id derived from it), assignable
// only in this resource group. Creating it needs Microsoft.Authorization/roleDefinitions/write on
// the group (Owner or User Access Administrator; infra/README.md, "Deploy").
resource blobWriterRole 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'byok-managed-hsm', 'blob-writer')
  properties: {
    // Role names are unique in the tenant: one per resource group.
    roleName: 'BYOK Blob Writer (${resourceGroup().name}, ${uniqueString(resourceGroup().id)})'
    description: 'byok-managed-hsm: read, create and write blobs in the containers it is assigned on; no delete, no move, no control-plane action.'
    type: 'CustomRole'
    permissions: [
      {
        actions: []
        notActions: []
        dataActions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action'
        ]
        notDataActions: []
      }
    ]
    assignableScopes: [
      resourceGroup().id
    ]
  }
}

// A custom role definition is addressed like a built-in one, at the subscription.
var blobWriterRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', blobWriterRole.name)

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storageAccount
  name: 'default'
}

resource functionContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = [for containerName in functionContainerNames: {
  parent: blobService
  name: containerName
}]

resource incomingContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: incomingContainerName
}

resource statusContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: statusContainerName
}

resource auditContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: auditContainerName
}

resource auditPeopleContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: auditPeopleContainerName
}

resource configContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: configContainerName
}

resource approvalsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: approvalsContainerName
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deploymentContainerName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// The function reads packages, moves them to archive or quarantine and writes status documents;
// the host keeps its locks, blob receipts and keys. One grant per container.
resource functionBlobAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (containerName, i) in functionContainerNames: {
  name: guid(functionContainers[i].id, functionPrincipalId, roleIds.storageBlobDataContributor)
  scope: functionContainers[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: pipeline and Functions host blobs in ${containerName}'
  }
}]

// The function's signed audit chains: it creates append blobs (one chain per writer process, a new
// part per day) and appends to them (Put Blob of an append blob, Append Block), and reads its own
// chain's tail back when the response to an append was lost (Get Blob Properties, Get Blob). The
// data-only writer role does all three (blobs/read, blobs/write, blobs/add/action); it cannot
// delete or move a blob or touch the container through ARM, and the ABAC condition fences delete
// and move again. The retention policy forbids overwriting any block once written.
resource functionAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(auditContainer.id, functionPrincipalId, blobWriterRole.id)
  scope: auditContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: create and append its signed audit chains'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}

// The function reads the import policy (byok-config) and the signed approvals (byok-approvals) and
// never writes either: read only, so a compromised function cannot approve its own imports.
resource functionConfigRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(configContainer.id, functionPrincipalId, roleIds.storageBlobDataReader)
  scope: configContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: read the import policy'
  }
}

resource functionApprovalsRead 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(approvalsContainer.id, functionPrincipalId, roleIds.storageBlobDataReader)
  scope: approvalsContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: read the signed approvals'
  }
}

// Account scope on purpose: the host creates its queues itself (the blob trigger's
// webjobs-blobtrigger-poison and its internal queues), with names it chooses. Queues only.
resource functionQueueAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storageAccount.id, functionPrincipalId, roleIds.storageQueueDataContributor)
  scope: storageAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageQueueDataContributor)
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: blob trigger poison queue and host queues'
  }
}

// The deployment identity (functionAppConfig.deployment.storage) writes and reads the
// deployment package, in app-package only. The runtime identity has no access there.
resource deploymentPackageAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(deploymentContainer.id, deploymentPrincipalId, roleIds.storageBlobDataContributor)
  scope: deploymentContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: deploymentPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm deployment identity: the Flex Consumption deployment package'
  }
}

resource functionTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, functionPrincipalId, roleIds.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: send telemetry and audit events with Entra ID auth'
  }
}

// Uploaders may add packages to the incoming container and approvals to the approvals container,
// and nothing else (the writer role: no delete, no move, no control-plane action).
resource uploaderAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in uploaderPrincipalIds: {
  name: guid(incomingContainer.id, principalId, blobWriterRole.id)
  scope: incomingContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm uploader: drop .byok packages into the incoming container'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

resource uploaderApprovals 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in uploaderPrincipalIds: {
  name: guid(approvalsContainer.id, principalId, blobWriterRole.id)
  scope: approvalsContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm uploader: write signed approvals'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

// Status readers may read status documents and nothing else.
resource statusReaderAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in statusReaderPrincipalIds: {
  name: guid(statusContainer.id, principalId, roleIds.storageBlobDataReader)
  scope: statusContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: principalId
    description: 'byok-managed-hsm status reader: read status documents'
  }
}]

// KEK custodians (the `byok` CLI): upload packages, write signed approvals, append their own
// signed chains (byok.kek.created, byok.kek.downloaded, byok import) to the people's audit
// container, read status documents, and send those events as telemetry. No role on byok-audit:
// they cannot write (or rewrite) the Function's chains, and nothing they run reads them (an
// auditor verifies; a custodian who should verify too is listed in auditorPrincipalIds).
resource custodianUpload 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(incomingContainer.id, principalId, blobWriterRole.id)
  scope: incomingContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm custodian: upload .byok packages'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

resource custodianApprovals 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(approvalsContainer.id, principalId, blobWriterRole.id)
  scope: approvalsContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm custodian: write signed approvals'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

resource custodianPeopleAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(auditPeopleContainer.id, principalId, blobWriterRole.id)
  scope: auditPeopleContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm custodian: append signed KEK and import events to the people audit container'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

resource custodianStatus 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(statusContainer.id, principalId, roleIds.storageBlobDataReader)
  scope: statusContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: principalId
    description: 'byok-managed-hsm custodian: read status documents (byok status)'
  }
}]

resource custodianTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(appInsights.id, principalId, roleIds.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.monitoringMetricsPublisher)
    principalId: principalId
    description: 'byok-managed-hsm custodian: send KEK audit events with Entra ID auth'
  }
}]

// Auditors read both audit containers (byok audit verify merges the Function's and the people's
// chains) and the status documents, nothing else.
resource auditorAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in auditorPrincipalIds: {
  name: guid(auditContainer.id, principalId, roleIds.storageBlobDataReader)
  scope: auditContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: principalId
    description: 'byok-managed-hsm auditor: read the audit log'
  }
}]

resource auditorPeopleAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in auditorPrincipalIds: {
  name: guid(auditPeopleContainer.id, principalId, roleIds.storageBlobDataReader)
  scope: auditPeopleContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: principalId
    description: 'byok-managed-hsm auditor: read the people audit chains'
  }
}]

resource auditorStatus 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in auditorPrincipalIds: {
  name: guid(statusContainer.id, principalId, roleIds.storageBlobDataReader)
  scope: statusContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: principalId
    description: 'byok-managed-hsm auditor: read status documents'
  }
}]

// Policy administrators, and only they, write the import policy (byok policy set FILE writes
// byok-config/<BYOK_POLICY_BLOB>). The writer role: no delete, no control-plane action; blob
// versioning keeps every earlier policy.
resource policyAdminConfig 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in policyAdminPrincipalIds: {
  name: guid(configContainer.id, principalId, blobWriterRole.id)
  scope: configContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm policy administrator: write the import policy'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

// Policy administrators append their own signed chains (byok policy set) to the people's audit
// container; no role on byok-audit.
resource policyAdminPeopleAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in policyAdminPrincipalIds: {
  name: guid(auditPeopleContainer.id, principalId, blobWriterRole.id)
  scope: auditPeopleContainer
  properties: {
    roleDefinitionId: blobWriterRoleId
    principalId: principalId
    description: 'byok-managed-hsm policy administrator: append signed policy events to the people audit container'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]
