// The existing Managed HSM: its AuditEvent logs (every key operation, including imports, with
// the caller's identity and the result) go to the shared workspace.
// Deployed at the HSM's resource group scope; the HSM itself is not modified.

param managedHsmName string
param workspaceId string

resource managedHsm 'Microsoft.KeyVault/managedHSMs@2023-07-01' existing = {
  name: managedHsmName
}

resource hsmDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'byok-to-log-analytics'
  scope: managedHsm
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'AuditEvent'
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

// The data-plane URL the pipeline talks to, without the trailing slash the service reports.
output hsmUrl string = endsWith(managedHsm.properties.hsmUri, '/') ? substring(managedHsm.properties.hsmUri, 0, length(managedHsm.properties.hsmUri) - 1) : managedHsm.properties.hsmUri
