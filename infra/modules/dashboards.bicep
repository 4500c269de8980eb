// The BYOK workbook (infra/workbook.json) and the alert rules (infra/queries/*.kql).
// Both query the pipeline's audit events in table AppTraces of the shared workspace.

param location string
param tags object
param appName string
param workspaceId string
param alertEmailAddress string

resource workbook 'Microsoft.Insights/workbooks@2023-06-01' = {
  name: guid(resourceGroup().id, appName, 'byok-workbook')
  location: location
  tags: tags
  kind: 'shared'
  properties: {
    displayName: 'BYOK imports (${appName})'
    category: 'workbook'
    version: 'Notebook/1.0'
    sourceId: workspaceId
    serializedData: loadTextContent('../workbook.json')
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmailAddress)) {
  name: 'ag-${appName}-byok'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'byok-alerts'
    enabled: true
    emailReceivers: [
      {
        name: 'byok-operators'
        emailAddress: alertEmailAddress
        useCommonAlertSchema: true
      }
    ]
  }
}

var actionGroupIds = empty(alertEmailAddress) ? [] : [
  actionGroup.id
]

// Severity 1 (error): the HSM holds a key that does not match its package.
resource verificationFailedAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-${appName}-byok-verification-failed'
  location: location
  tags: tags
  properties: {
    displayName: 'BYOK: imported key failed verification'
    description: 'A byok.verification_failed audit event: the key in Managed HSM does not match its package. Investigate before the key is used.'
    severity: 1
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      workspaceId
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../queries/alert-verification-failed.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

// Severity 2 (warning): a package could not be imported.
resource failedAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: 'alert-${appName}-byok-failed'
  location: location
  tags: tags
  properties: {
    displayName: 'BYOK: package import failed'
    description: 'A byok.failed audit event: a package could not be imported into Managed HSM. See its status document and the workbook.'
    severity: 2
    enabled: true
    evaluationFrequency: 'PT5M'
    windowSize: 'PT5M'
    scopes: [
      workspaceId
    ]
    criteria: {
      allOf: [
        {
          query: loadTextContent('../queries/alert-failed.kql')
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

output workbookId string = workbook.id
