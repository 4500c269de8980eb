// Azure RBAC for the data plane of storage and Application Insights.
// Narrowest built-in roles, each assignment named guid(scope, principal, role) so that a
// redeployment finds it again instead of failing or duplicating it.
// The Managed HSM's data-plane roles are not ARM resources: see infra/assign-hsm-roles.sh.

param storageAccountName string
param appInsightsName string
param functionPrincipalId string
param incomingContainerName string
param statusContainerName string
param uploaderPrincipalIds array
param statusReaderPrincipalIds array

// Built-in role definition ids (the same in every tenant).
var roleIds = {
  // Read, write, delete blobs and containers. Not Storage Blob Data Owner: the pipeline never
  // manages ACLs or blob-level immutability policies, and must not be able to.
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  // Read-only access to blobs.
  storageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  // The blob trigger's poison queue and the host's internal queues.
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  // Send telemetry to an Application Insights component whose local auth is disabled.
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: storageAccount
  name: 'default'
}

resource incomingContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: incomingContainerName
}

resource statusContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: statusContainerName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// The function reads packages, moves them to archive or quarantine, writes status documents and
// appends audit records; the Functions host keeps its locks and the deployment package in blobs.
// Account scope because the host creates its own containers (azure-webjobs-hosts, -secrets).
resource functionBlobAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storageAccount.id, functionPrincipalId, roleIds.storageBlobDataContributor)
  scope: storageAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: functionPrincipalId
    principalType: 'ServicePrincipal'
    description: 'byok-managed-hsm function: read packages, write status, archive, quarantine and audit blobs'
  }
}

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

// Uploaders may write packages to the incoming container and nothing else.
resource uploaderAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in uploaderPrincipalIds: {
  name: guid(incomingContainer.id, principalId, roleIds.storageBlobDataContributor)
  scope: incomingContainer
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds.storageBlobDataContributor)
    principalId: principalId
    description: 'byok-managed-hsm uploader: drop .byok packages into the incoming container'
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
