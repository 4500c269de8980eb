// Log Analytics workspace and workspace-based Application Insights.
// The pipeline's audit events arrive as OpenTelemetry log records and land in table AppTraces,
// with the event's fields in the Properties column. The Managed HSM's AuditEvent logs and the
// storage account's logs go to the same workspace (see hsm-diagnostics.bicep, storage.bicep).

param location string
param tags object
param workspaceName string
param appInsightsName string
param logRetentionDays int

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
    features: {
      // Only Entra ID callers (the portal, az, the workbook) read or write; no shared keys.
      disableLocalAuth: true
      enableLogAccessUsingOnlyResourcePermissions: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
    // Telemetry (and so the audit events) is accepted only with an Entra ID token: the function
    // sends it as its user-assigned identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING), which holds
    // Monitoring Metrics Publisher on this component. Nobody can forge audit events with the
    // instrumentation key alone.
    DisableLocalAuth: true
  }
}

output workspaceId string = workspace.id
output appInsightsName string = appInsights.name
output appInsightsId string = appInsights.id
