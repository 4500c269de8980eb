// Azure RBAC for the data plane of storage and Application Insights.
// Narrowest built-in roles at the narrowest scope (a container wherever a blob role is granted),
// each assignment named guid(scope, principal, role) so that a redeployment finds it again
// instead of failing or duplicating it.
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
param deploymentContainerName string
param uploaderPrincipalIds array
param statusReaderPrincipalIds array
param custodianPrincipalIds array
param auditorPrincipalIds array

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

// The containers the Function's runtime identity works in: the pipeline's five, and the two the
// Functions host keeps its locks, blob receipts and keys in (pre-created in storage.bicep).
// Not the deployment package container (app-package): only the deployment identity has that.
var functionContainerNames = [
  incomingContainerName
  statusContainerName
  archiveContainerName
  quarantineContainerName
  auditContainerName
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]

// Azure ABAC condition on the upload grants (Storage Blob Data Contributor on byok-incoming):
// no delete and no move/rename of blobs, so an uploader cannot remove a package that waits for the
// pipeline. Conditions cannot tell a new blob from an overwrite of an existing one (both are
// blobs/write), so overwriting stays possible; blob versioning keeps the overwritten version
// (infra/README.md, "Known limits").
var noDeleteCondition = '((!(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete\'}) AND !(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/move/action\'})))'

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

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: deploymentContainerName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// The function reads packages, moves them to archive or quarantine, writes status documents and
// appends audit records; the host keeps its locks, blob receipts and keys. One grant per container.
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

// Uploaders may add packages to the incoming container and nothing else (no delete, no move).
resource uploaderAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in uploaderPrincipalIds: {
  name: guid(incomingContainer.id, principalId, roleIds.storageBlobDataContributor)
  scope: incomingContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: principalId
    description: 'byok-managed-hsm uploader: drop .byok packages into the incoming container'
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

// KEK custodians (the `byok` CLI): upload packages, append the KEK events (byok.kek.created,
// byok.kek.downloaded) to the audit log, read status documents, and send those events as
// telemetry. The audit container's retention policy stops any overwrite or delete there.
resource custodianUpload 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(incomingContainer.id, principalId, roleIds.storageBlobDataContributor)
  scope: incomingContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: principalId
    description: 'byok-managed-hsm custodian: upload .byok packages'
    condition: noDeleteCondition
    conditionVersion: '2.0'
  }
}]

resource custodianAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in custodianPrincipalIds: {
  name: guid(auditContainer.id, principalId, roleIds.storageBlobDataContributor)
  scope: auditContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: principalId
    description: 'byok-managed-hsm custodian: append KEK events to the immutable audit log'
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

// Auditors read the audit log and the status documents, nothing else.
resource auditorAudit 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in auditorPrincipalIds: {
  name: guid(auditContainer.id, principalId, roleIds.storageBlobDataReader)
  scope: auditContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataReader)
    principalId: principalId
    description: 'byok-managed-hsm auditor: read the audit log'
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
