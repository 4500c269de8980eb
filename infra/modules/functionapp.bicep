// The Function app on Flex Consumption (Python 3.11) with a user-assigned managed identity.
// Every connection is identity-based: no connection strings, no account keys, no SAS.

param location string
param tags object
param functionAppName string
param planName string
param identityName string
param deploymentIdentityName string
param storageAccountName string
param deploymentContainerName string
param appInsightsName string
param workspaceId string
param managedHsmUrl string
param kekKid string
param incomingContainerName string
param statusContainerName string
param archiveContainerName string
param quarantineContainerName string
param auditContainerName string
// The versioned kid of the pipeline's audit signing key in the Managed HSM (byok audit init);
// empty until the second deployment pass sets it.
param auditSigningKid string
param configContainerName string
param approvalsContainerName string
param policyBlobName string
param maxPackageBytes int
param maxAttempts int
param allowedKekNames string
param allowedTargetTypes string
param maximumInstanceCount int
param instanceMemoryMB int
param hsmImportsPerSecond int

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: appInsightsName
}

// The runtime identity: storage, the host, Application Insights and the Managed HSM data plane.
// Its data-plane role in the HSM is assigned by infra/assign-hsm-roles.sh.
resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
  tags: tags
}

// The deployment identity: reads and writes the deployment package in the app-package container
// and nothing else (functionAppConfig.deployment.storage), so the code the Function runs cannot
// be replaced with the runtime identity's rights.
resource deploymentIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: deploymentIdentityName
  location: location
  tags: tags
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
      '${deploymentIdentity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientAffinityEnabled: false
    publicNetworkAccess: 'Enabled'
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      appSettings: [
        // Functions host storage, through the managed identity.
        {
          name: 'AzureWebJobsStorage__blobServiceUri'
          value: storageAccount.properties.primaryEndpoints.blob
        }
        {
          name: 'AzureWebJobsStorage__queueServiceUri'
          value: storageAccount.properties.primaryEndpoints.queue
        }
        {
          name: 'AzureWebJobsStorage__credential'
          value: 'managedidentity'
        }
        {
          name: 'AzureWebJobsStorage__clientId'
          value: identity.properties.clientId
        }
        // The pipeline's own storage connection (blob trigger, status, archive, audit).
        {
          name: 'BYOK_STORAGE__blobServiceUri'
          value: storageAccount.properties.primaryEndpoints.blob
        }
        {
          name: 'BYOK_STORAGE__queueServiceUri'
          value: storageAccount.properties.primaryEndpoints.queue
        }
        {
          name: 'BYOK_STORAGE__credential'
          value: 'managedidentity'
        }
        {
          name: 'BYOK_STORAGE__clientId'
          value: identity.properties.clientId
        }
        // Key Vault client (DefaultAzureCredential picks the user-assigned identity).
        {
          name: 'AZURE_CLIENT_ID'
          value: identity.properties.clientId
        }
        {
          name: 'BYOK_HSM_URL'
          value: managedHsmUrl
        }
        {
          name: 'BYOK_KEK_KID'
          value: kekKid
        }
        {
          name: 'BYOK_INCOMING_CONTAINER'
          value: incomingContainerName
        }
        {
          name: 'BYOK_STATUS_CONTAINER'
          value: statusContainerName
        }
        {
          name: 'BYOK_ARCHIVE_CONTAINER'
          value: archiveContainerName
        }
        {
          name: 'BYOK_QUARANTINE_CONTAINER'
          value: quarantineContainerName
        }
        {
          name: 'BYOK_AUDIT_CONTAINER'
          value: auditContainerName
        }
        // The HSM key (EC P-256, sign only) that signs the Function's audit chains. Not a secret:
        // a key id. The identity may sign with that key and with no other
        // (assign-hsm-roles.sh --audit-key). Empty: the Function cannot build its audit trail and
        // processes no package, so nothing is processed unaudited.
        {
          name: 'BYOK_AUDIT_SIGNING_KID'
          value: auditSigningKid
        }
        // Import authorization: the policy (written by policy administrators only) and the
        // signed approvals; the function reads both and writes neither.
        {
          name: 'BYOK_CONFIG_CONTAINER'
          value: configContainerName
        }
        {
          name: 'BYOK_POLICY_BLOB'
          value: policyBlobName
        }
        {
          // a deleted or missing policy stops imports instead of falling back to the defaults
          name: 'BYOK_POLICY_REQUIRED'
          value: 'true'
        }
        {
          name: 'BYOK_APPROVALS_CONTAINER'
          value: approvalsContainerName
        }
        {
          name: 'BYOK_MAX_PACKAGE_BYTES'
          value: string(maxPackageBytes)
        }
        {
          name: 'BYOK_MAX_ATTEMPTS'
          value: string(maxAttempts)
        }
        {
          name: 'BYOK_RECONCILE_SCHEDULE'
          value: '0 */10 * * * *'
        }
        // One figure bounds the pace: each instance paces imports at it (halving on 429s), and
        // runs at most twice as many blob-triggered deliveries at once (host.json override).
        {
          name: 'BYOK_HSM_IMPORTS_PER_SECOND'
          value: string(hsmImportsPerSecond)
        }
        {
          name: 'AzureFunctionsJobHost__extensions__blobs__maxDegreeOfParallelism'
          value: string(2 * hsmImportsPerSecond)
        }
        {
          name: 'BYOK_ALLOWED_KEK_NAMES'
          value: allowedKekNames
        }
        {
          name: 'BYOK_ALLOWED_TARGET_TYPES'
          value: allowedTargetTypes
        }
        // Telemetry and audit events. The connection string only says where to send; with local
        // authentication disabled on the component, ingestion needs the identity's Entra token.
        {
          name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
          value: appInsights.properties.ConnectionString
        }
        {
          name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
          value: 'Authorization=AAD;ClientId=${identity.properties.clientId}'
        }
      ]
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storageAccount.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: deploymentIdentity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// No FTP and no basic-auth publishing: code is published with an Entra ID token.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2023-12-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

// Platform logs of the app (function executions, host errors) next to the audit events.
resource functionDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: functionApp
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'FunctionAppLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output functionAppName string = functionApp.name
output functionAppId string = functionApp.id
output defaultHostName string = functionApp.properties.defaultHostName
output identityPrincipalId string = identity.properties.principalId
output identityClientId string = identity.properties.clientId
output deploymentIdentityPrincipalId string = deploymentIdentity.properties.principalId
