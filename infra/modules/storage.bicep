// The storage account: packages come in, status documents and audit records go out.
// Entra ID only (no shared keys, no SAS signed with account keys), TLS 1.2, HTTPS only,
// no anonymous access, soft delete and versioning, and two immutable audit containers: the
// pipeline's signed chains (byok-audit) and the chains people's CLI commands write
// (byok-audit-people).

param location string
param tags object
param storageAccountName string
param skuName string
param incomingContainerName string
param statusContainerName string
param archiveContainerName string
param quarantineContainerName string
param auditContainerName string
param auditPeopleContainerName string
param configContainerName string
param approvalsContainerName string
param deadletterContainerName string
param deploymentContainerName string
param auditRetentionDays int
// True once the audit retention policy has been locked (infra/README.md, step 6): ARM cannot
// create-or-update a locked policy, so from then on the template must leave it alone.
param auditPolicyLocked bool
// The same switch for the people's audit container, kept apart so that a deployment whose
// byok-audit policy was locked before byok-audit-people existed still gets the new container's
// policy (auditPolicyLocked=true, auditPeoplePolicyLocked=false) until that one is locked too.
param auditPeoplePolicyLocked bool
param softDeleteRetentionDays int
param workspaceId string

// Containers without special policies: uploads, results, the import policy (byok-config, written
// by policy administrators only) and the signed approvals (byok-approvals), the Event Grid dead
// letters, the Flex Consumption deployment package, and the two containers the Functions host
// uses (created here so that the Function's identity needs no account-wide blob role to create
// them). Who may do what in each is in roles.bicep.
var plainContainerNames = [
  incomingContainerName
  statusContainerName
  archiveContainerName
  quarantineContainerName
  configContainerName
  approvalsContainerName
  deadletterContainerName
  deploymentContainerName
  'azure-webjobs-hosts'
  'azure-webjobs-secrets'
]

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: skuName
  }
  properties: {
    accessTier: 'Hot'
    // Every caller authenticates with Entra ID: the function's managed identity, Event Grid's
    // identity for dead letters, uploaders with their own accounts.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    allowCrossTenantReplication: false
    allowedCopyScope: 'AAD'
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    isVersioningEnabled: true
    deleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: softDeleteRetentionDays
    }
    changeFeed: {
      enabled: true
      retentionInDays: softDeleteRetentionDays
    }
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storageAccount
  name: 'default'
}

resource containers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [for containerName in plainContainerNames: {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}]

resource auditContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: auditContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Time-based retention on the audit container: blobs can be created and read, and append blobs
// can grow (the Function's signed chains), but nothing can be overwritten or deleted until the
// retention period has passed. ARM creates the policy unlocked; lock it once validated
// (infra/README.md, "Lock the audit retention policies"). A locked policy rejects ARM's
// create-or-update, so redeployments after locking pass auditPolicyLocked=true and skip it
// (the locked policy stays in force: it can no longer be deleted or shortened by anyone).
resource auditImmutability 'Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies@2023-05-01' = if (!auditPolicyLocked) {
  parent: auditContainer
  name: 'default'
  properties: {
    immutabilityPeriodSinceCreationInDays: auditRetentionDays
    allowProtectedAppendWrites: true
  }
}

// The people's audit container: the signed chains that custodians and policy administrators
// append with the CLI (byok kek create/download, byok policy set, byok import). Written by them
// only, never by the Function; the same retention, with protected appends, as byok-audit.
resource auditPeopleContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: auditPeopleContainerName
  properties: {
    publicAccess: 'None'
  }
}

// Deployed unless locked (auditPeoplePolicyLocked, README step 6), like auditImmutability.
resource auditPeopleImmutability 'Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies@2023-05-01' = if (!auditPeoplePolicyLocked) {
  parent: auditPeopleContainer
  name: 'default'
  properties: {
    immutabilityPeriodSinceCreationInDays: auditRetentionDays
    allowProtectedAppendWrites: true
  }
}

// Old versions of processed packages and status documents do not pile up for ever.
// The audit containers are left out: their blobs are protected by the retention policies. So are the
// config and approvals containers: every earlier import policy and every overwritten approval
// stays as a version (they are small, and they are evidence of who authorized what).
resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'expire-old-versions'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${incomingContainerName}/'
                '${statusContainerName}/'
                '${archiveContainerName}/'
                '${quarantineContainerName}/'
              ]
            }
            actions: {
              version: {
                delete: {
                  daysAfterCreationGreaterThan: softDeleteRetentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

// Storage logs to the shared workspace: who read, wrote and deleted which blob or message.
resource blobDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: blobService
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'StorageRead'
        enabled: true
      }
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource queueDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: queueService
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'StorageRead'
        enabled: true
      }
      {
        category: 'StorageWrite'
        enabled: true
      }
      {
        category: 'StorageDelete'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

resource accountDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: storageAccount
  properties: {
    workspaceId: workspaceId
    metrics: [
      {
        category: 'Transaction'
        enabled: true
      }
    ]
  }
}

output storageAccountName string = storageAccount.name
output storageAccountId string = storageAccount.id
output blobEndpoint string = storageAccount.properties.primaryEndpoints.blob
